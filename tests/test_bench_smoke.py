"""The benchmark scripts keep working: each runs end to end on tiny sizes (--smoke: tiny dims, one
repeat, results written to tmp_path). No timing is asserted: the bench is not a test.

The optional extras (onnx, onnxruntime, torch, matplotlib) are used when installed; one run hides
them (UFCPU_BENCH_WITHOUT) to check that their rows and plots are skipped cleanly, with a note.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
EXTRAS = ("onnx", "onnxruntime", "torch", "matplotlib")


def _run(script: str, out: Path, hide: tuple[str, ...] = ()) -> dict:
    env = dict(os.environ, UFCPU_BENCH_WITHOUT=",".join(hide))
    env.pop("UFCPU_CACHE", None)            # --smoke keeps its cache under --out
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / f"{script}.md").read_text().startswith("# ")
    return json.loads((out / f"{script}.json").read_text())


def _installed(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def _machine_recorded(res: dict) -> None:
    m = res["machine"]
    assert m["versions"]["numpy"] and "OPENBLAS_CORETYPE" in m["env"]
    assert isinstance(m["cpu_flags"], list)


def test_ff_layer_smoke(tmp_path):
    res = _run("ff_layer", tmp_path)
    _machine_recorded(res)
    impls = {p["impl"] for p in res["points"]}
    assert impls == {"fff", "dense-equal", "dense-crammed"}
    assert {r["case"] for r in res["rows"]} == {"hot", "cycled", "paper"}
    assert all(r["fff_ms"] > 0 and r["fff_floor_ms"] > 0 for r in res["rows"])
    # real routing: many tokens spread over more than one node per level below the root
    big = max(res["sizes"]["tokens"])
    assert res["routing_distinct_nodes_per_level"]["hot"][str(big)][-1] > 1
    # the paper's setup (all zeros): every token on the same path, one node per level
    assert res["routing_distinct_nodes_per_level"]["paper"][str(big)] == [1.0] * (res["sizes"]["depth"] + 1)
    assert (tmp_path / "ff_layer.png").is_file() == _installed("matplotlib")


def test_encoder_smoke(tmp_path):
    res = _run("encoder", tmp_path)
    _machine_recorded(res)
    ran = {r["row"] for r in res["results"]}
    assert {"ufcpu-fff", "ufcpu-dense-masked", "ufcpu-dense-crammed"} <= ran
    product = next(r for r in res["results"] if r["row"] == "ufcpu-fff")
    assert product["breakdown"]["sentence"]["fff_walk"] > 0
    assert not [r for r in res["results"] if "error" in r]
    for r in res["results"]:
        assert all(w["tokens_per_s"] > 0 for w in r["workloads"].values())
        # same computation: every row agrees with its ufcpu reference on the same weights
        assert r["check"]["max_abs_diff"] < 1e-3, r
    if _installed("onnxruntime") and _installed("onnx"):
        assert {"ort-dense-crammed", "ort-dense-equal"} <= ran
    if _installed("torch"):
        assert "torch-dense-crammed" in ran
    assert (tmp_path / "encoder.png").is_file() == _installed("matplotlib")


def test_encoder_without_optional_extras(tmp_path):
    """Peer rows and the plot are skipped with a note (ff_layer's only extra is matplotlib: its
    skip path is the same `common.pyplot()` check, not worth another run of the script)."""
    res = _run("encoder", tmp_path, hide=EXTRAS)
    assert not (tmp_path / "encoder.png").exists() and res["plot"] is None
    assert "plot skipped" in (tmp_path / "encoder.md").read_text()
    assert {r["row"] for r in res["results"]} == {"ufcpu-fff", "ufcpu-dense-masked", "ufcpu-dense-crammed"}
    assert set(res["skipped"]) == {"ort-dense-crammed", "ort-dense-equal", "torch-dense-crammed"}
    assert all("not installed" in why for why in res["skipped"].values())


def test_kernels_smoke(tmp_path):
    res = _run("kernels", tmp_path)
    _machine_recorded(res)
    assert {r["kernel"] for r in res["shared"]} == {"layer_norm", "masked_softmax_", "gelu_", "fff_walk", "matmul_nt"}
    assert all(r["alone_us"] > 0 and r["shared_us"] > 0 for r in res["shared"])
    assert {r["linear_uses"] for r in res["products"]} == {"matmul_nt"}   # 2 and 11 tokens


def test_narrow_weights_smoke(tmp_path):
    res = _run("narrow_weights", tmp_path)
    rows = {r["weights"]: r for r in res["rows"]}
    assert set(rows) == {"float32", "float16", "bfloat16"}
    assert rows["float32"]["max_abs"] <= res["tolerance"]           # the engine as it is keeps parity
    # rounding the FFF matrices moves the outputs: the table reports how far
    assert rows["float16"]["max_abs"] > rows["float32"]["max_abs"]
    assert rows["bfloat16"]["max_abs"] > rows["float16"]["max_abs"]


def test_bad_model_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "ff_layer.py"), "--smoke", "--out", str(tmp_path),
                           "--model", str(tmp_path / "missing")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ff_layer.py: error: ") and "missing" in lines[0], proc.stderr


def _run_named(script: str, out: Path) -> dict:
    """Scripts whose results are named after the CPU (<script>-<cpu>.json/.md)."""
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [js] = out.glob(f"{script}-*.json")
    assert (out / js.name.replace(".json", ".md")).read_text().startswith("# ")
    res = json.loads(js.read_text())
    assert js.stem == f"{script}-{res['machine']['llvm_host_cpu']}"
    return res


def test_walk_sweeps_smoke(tmp_path):
    res = _run_named("walk_sweeps", tmp_path)
    _machine_recorded(res)
    assert {(r["case"], r["tokens"]) for r in res["rows"]} == {(c, t) for c in ("paper", "hot") for t in (16, 64)}
    for r in res["rows"]:
        assert set(r["timings"]) == {"walk", "route", "output", "output by leaf", "model.fff"}
        assert all(v["wall_ms"] > 0 and v["repeats"] == 1 for v in r["timings"].values())


def test_memory_smoke(tmp_path):
    res = _run_named("memory", tmp_path)
    _machine_recorded(res)
    assert res["clock_ghz_estimate"] > 0
    assert [r["bytes"] for r in res["rows"]] == [16 << 10, 64 << 10]
    assert all(r["latency_ns"] > 0 and r["read_gbs"] > 0 and r["copy_gbs"] > 0 for r in res["rows"])


def test_ff_layer_thread_clock_needs_one_thread(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "ff_layer.py"), "--smoke", "--out", str(tmp_path),
                           "--clock", "thread", "--threads", "1,2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--threads 1" in proc.stderr
    assert not list(tmp_path.iterdir())
