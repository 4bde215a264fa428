"""bench/serve.py keeps working: --smoke runs it end to end (tiny random model, clients 1 and 4, a few
requests per point) and writes its table and JSON. No timing is asserted: the bench is not a test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import bench_module

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_serve_bench_smoke(tmp_path):
    env = dict(os.environ)
    env.pop("UFCPU_CACHE", None)            # --smoke keeps its cache under --out
    proc = subprocess.run([sys.executable, str(BENCH / "serve.py"), "--smoke", "--rounds", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "serve-float32.json").read_text())
    assert res["server_exit_code"] == 0 and res["offline"]["texts_per_s"] > 0
    points = {(p["mode"], p["clients"]) for p in res["points"]}
    assert points == {(m, c) for m in ("single", "batch32") for c in (1, 4)}
    assert all(p["errors"] == 0 and p["texts_per_s"] > 0 and p["p99_ms"] >= p["p50_ms"] for p in res["points"])
    assert (tmp_path / "serve-float32.md").read_text().startswith("# ufcpu serve under load")
    assert res["rounds"] == 2 and len(res["results_by_round"]) == 2
    assert all(len(p["rounds_x_offline"]) == 2 for p in res["points"])


def _point(clients: int, rate: float) -> dict:
    return {"mode": "single", "clients": clients, "requests": 8, "texts_per_s": rate, "p50_ms": 100.0 / rate,
            "p99_ms": 200.0 / rate, "mean_inputs": float(clients), "errors": 0}


def test_serve_rounds_take_ratios_within_rounds():
    """--rounds: each ratio is taken within its round (the machine slowed down in round 1 for the
    offline runs and the server alike: its ratios stay those of the others), the median judged."""
    sv = bench_module("serve")
    rounds = [([_point(1, 100.0), _point(16, 160.0)], {"texts_per_s": 200.0, "repeats": 6}),
              ([_point(1, 50.0), _point(16, 80.0)], {"texts_per_s": 100.0, "repeats": 6}),
              ([_point(1, 90.0), _point(16, 171.0)], {"texts_per_s": 190.0, "repeats": 6})]
    points, off = sv.combine_rounds(rounds)
    assert off["texts_per_s"] == 190.0 and off["rounds_texts_per_s"] == [200.0, 100.0, 190.0]
    one, sixteen = points
    assert sixteen["texts_per_s"] == 160.0 and sixteen["rounds_texts_per_s"] == [160.0, 80.0, 171.0]
    assert sixteen["rounds_x_offline"] == [0.8, 0.8, 0.9] and sixteen["x_offline"] == 0.8
    assert sixteen["rounds_x_one"] == [1.6, 1.6, 1.9] and sixteen["x_one"] == 1.6
    assert one["x_one"] == 1.0
    assert sv._ratio(sixteen, "x_offline") == "0.80 (0.80-0.90)"
    single = sv.combine_rounds(rounds[:1])[0][1]
    assert sv._ratio(single, "x_offline") == "0.80"
