"""bench/serve.py keeps working: --smoke runs it end to end (tiny random model, clients 1 and 4, a few
requests per point) and writes its table and JSON. No timing is asserted: the bench is not a test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_serve_bench_smoke(tmp_path):
    env = dict(os.environ)
    env.pop("UFCPU_CACHE", None)            # --smoke keeps its cache under --out
    proc = subprocess.run([sys.executable, str(BENCH / "serve.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "serve-float32.json").read_text())
    assert res["server_exit_code"] == 0 and res["offline"]["texts_per_s"] > 0
    points = {(p["mode"], p["clients"]) for p in res["points"]}
    assert points == {(m, c) for m in ("single", "batch32") for c in (1, 4)}
    assert all(p["errors"] == 0 and p["texts_per_s"] > 0 and p["p99_ms"] >= p["p50_ms"] for p in res["points"])
    assert (tmp_path / "serve-float32.md").read_text().startswith("# ufcpu serve under load")
