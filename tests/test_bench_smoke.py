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

import numpy as np

import ufcpu
from conftest import bench_module

BENCH = Path(__file__).resolve().parent.parent / "bench"
EXTRAS = ("onnx", "onnxruntime", "openvino", "torch", "matplotlib")
PEERS_NEEDING_EXTRAS = {"ort-dense-crammed", "ort-dense-equal", "torch-dense-crammed", "ort-int8-crammed",
                        "openvino-crammed"}


def _run(script: str, out: Path, hide: tuple[str, ...] = (), args: tuple[str, ...] = ()) -> dict:
    env = dict(os.environ, UFCPU_BENCH_WITHOUT=",".join(hide))
    env.pop("UFCPU_CACHE", None)            # --smoke keeps its cache under --out
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--smoke", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / f"{script}.md").read_text().startswith("# ")
    return json.loads((out / f"{script}.json").read_text())


def _installed(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def _has_precision() -> bool:
    """Whether this ufcpu's load() takes precision= (reduced-precision modes built in)."""
    import inspect
    import ufcpu
    return "precision" in inspect.signature(ufcpu.load).parameters


def _machine_recorded(res: dict) -> None:
    m = res["machine"]
    assert m["versions"]["numpy"] and "OPENBLAS_CORETYPE" in m["env"]
    assert isinstance(m["cpu_flags"], list)


def test_ff_layer_smoke(tmp_path):
    res = _run("ff_layer", tmp_path)
    _machine_recorded(res)
    impls = {p["impl"] for p in res["points"]}
    assert impls == {"fff", "dense-equal", "dense-crammed", "rows"}
    assert {r["case"] for r in res["rows"]} == {"hot", "cycled", "paper"}
    assert all(r["fff_ms"] > 0 and r["fff_floor_ms"] > 0 for r in res["rows"])
    assert all(r["rows_ms"] > 0 and r["rows_ceiling_vs_equal"] > 0 for r in res["rows"] if r["threads"] == 1)
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
        if r["precision"] == "float32":
            # same computation: every float32 row agrees with its ufcpu reference on the same weights
            assert r["check"]["max_abs_diff"] < 1e-3, r
            assert r["to_float32"] is None
        else:
            # reduced precision: close to, and measured against, the same engine in float32
            f32 = r["to_float32"]
            assert f32["tokens"] > 0 and 0.99 < f32["token_cos_min"] <= f32["token_cos_mean"] <= 1.0 + 1e-12, r
    if _installed("onnxruntime") and _installed("onnx"):
        assert {"ort-dense-crammed", "ort-dense-equal", "ort-int8-crammed"} <= ran
        ort8 = next(r for r in res["results"] if r["row"] == "ort-int8-crammed")
        assert ort8["to_float32"]["token_cos_min"] < 1.0       # the quantized graph is not the float one
    if _installed("openvino") and _installed("onnx"):
        assert "openvino-crammed" in ran
    if _installed("torch"):
        assert "torch-dense-crammed" in ran
    if _has_precision():
        assert "ufcpu-int8" in ran
    else:
        assert "ufcpu-int8" not in ran and "precision=" in res["skipped"]["ufcpu-int8"]
    assert (tmp_path / "encoder.png").is_file() == _installed("matplotlib")


def test_encoder_without_optional_extras(tmp_path):
    """Peer rows and the plot are skipped with a note (ff_layer's only extra is matplotlib: its
    skip path is the same `common.pyplot()` check, not worth another run of the script)."""
    res = _run("encoder", tmp_path, hide=EXTRAS)
    assert not (tmp_path / "encoder.png").exists() and res["plot"] is None
    assert "plot skipped" in (tmp_path / "encoder.md").read_text()
    int8 = {"ufcpu-int8"} if _has_precision() else set()
    assert {r["row"] for r in res["results"]} == {"ufcpu-fff", "ufcpu-dense-masked", "ufcpu-dense-crammed"} | int8
    assert set(res["skipped"]) == PEERS_NEEDING_EXTRAS | ({"ufcpu-int8"} - int8)
    assert all("not installed" in res["skipped"][k] for k in PEERS_NEEDING_EXTRAS)


def test_kernels_smoke(tmp_path):
    res = _run("kernels", tmp_path)
    _machine_recorded(res)
    assert {r["kernel"] for r in res["shared"]} == {"layer_norm", "attention_heads", "gelu_", "fff_walk", "matmul_nt"}
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


def test_precision_float32_against_itself(tmp_path):
    """float32 against a second float32 load: every figure exactly 1.0, every target passed, on
    every fixture in tests/data and the (smoke) random checkpoint."""
    res = _run("precision", tmp_path, args=("--precision", "float32"))
    _machine_recorded(res)
    assert res["machine"]["cpu_model"] is not None and res["precision"] == "float32" and not res["failed"]
    data = Path(__file__).parent / "data"
    fixtures = {p.name for p in data.iterdir() if (p / "config.json").is_file()}
    cases = {r["case"] for r in res["rows"]}
    with_eval = sum((data / f / "eval.npz").is_file() for f in fixtures)    # held-out sequences and texts
    assert {c.split(" (")[0] for c in cases} >= fixtures and len(cases) == len(fixtures) + with_eval + 1
    for r in res["rows"]:
        m = r["metrics"]
        assert m["tokens"] > 0
        assert m["token_cos_mean"] == m["token_cos_min"] == m["pooled_cos_min"] == 1.0, r["case"]
        assert m["routes_unchanged"] == 1.0
        assert m["top1_agreement"] == (None if r["config"]["task"] == "classification" else 1.0)
        assert r["targets"] and all(r["targets"].values())
    heldout = next(r["metrics"] for r in res["rows"] if r["case"] == "trained-tiny (masked held-out)")
    ref = float(np.load(data / "trained-tiny" / "eval.npz")["masked_accuracy"])
    assert heldout["masked_accuracy"] == heldout["masked_accuracy_ref_model"]
    assert abs(heldout["masked_accuracy"] - ref) < 1e-6 and heldout["masked_accuracy_change"] == 0.0
    assert "pass" in (tmp_path / "precision.md").read_text()


def test_precision_int8(tmp_path):
    """int8 against float32 meets issue 13's targets on every fixture; where ufcpu has no
    precision= (int8 not built in), the script says so in one line, exit code 2."""
    if not _has_precision():
        env = dict(os.environ)
        env.pop("UFCPU_CACHE", None)
        proc = subprocess.run([sys.executable, str(BENCH / "precision.py"), "--smoke", "--out", str(tmp_path),
                               "--precision", "int8"], capture_output=True, text=True, env=env, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("precision.py: error: ") and "int8" in lines[0] and "precision=" in lines[0]
        return
    res = _run("precision", tmp_path, args=("--precision", "int8"))
    assert res["precision"] == "int8"
    fixture_rows = [r for r in res["rows"] if "random" not in r["case"]]
    assert fixture_rows and not [(c, k) for c, k in res["failed"] if "random" not in c], res["failed"]
    for r in fixture_rows:
        m = r["metrics"]
        assert m["token_cos_min"] <= m["token_cos_mean"] <= 1.0 + 1e-12 and 0.0 < m["routes_unchanged"] <= 1.0


def test_accuracy_metrics_see_every_difference():
    """bench/accuracy.py's metrics on arrays with known differences (padded positions ignored)."""
    acc = bench_module("accuracy")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 8)).astype(np.float32)          # [B, S, H]
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    b = a.copy()
    b[0, 1] *= -1                                                  # one real token reversed
    b[1, 2] = 7.0                                                  # a padded position: not counted
    cos = acc.token_cosines(a, b, mask)
    assert cos.shape == (5,) and cos[1] == -1.0 and (np.delete(cos, 1) == 1.0).all()
    pooled = acc.pooled_cosines(a, b, mask)
    assert pooled[1] == 1.0 and pooled[0] < 1.0
    routes = rng.integers(0, 15, (2, 2, 3, 4))                     # [L, B, S, D+1]
    other = routes.copy()
    other[1, 0, 2, 3] += 1                                         # one real token-layer's leaf
    other[0, 1, 2, 0] += 1                                         # padded: not counted
    assert acc.routes_unchanged(routes, other, mask) == 9 / 10
    top = rng.integers(0, 50, (2, 3))
    top_b = top.copy()
    top_b[1, 0] += 1
    assert acc.top1_agreement(top, top_b, mask) == 4 / 5
    labels = np.full((2, 3), -100)
    labels[0, 0], labels[1, 1] = top[0, 0], top[1, 1] + 1         # one right, one wrong
    assert acc.masked_accuracy(top, labels) == 0.5


def test_accuracy_targets():
    acc = bench_module("accuracy")
    ok = {"token_cos_mean": 0.999, "pooled_cos_min": 0.9995, "top1_agreement": 0.97, "masked_accuracy_change": -0.01}
    assert acc.check_targets(ok) == {k: True for k in ok}
    bad = {"token_cos_mean": 0.9989, "pooled_cos_min": 0.5, "top1_agreement": 0.969, "masked_accuracy_change": 0.011}
    assert acc.check_targets(bad) == {k: False for k in bad}
    assert acc.check_targets({"token_cos_mean": 1.0, "top1_agreement": None}) == {"token_cos_mean": True}


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


def test_ff_layer_floor_reads_every_visited_row_and_the_input():
    """The measured floor (`read_rows`) does read what it claims: out = y + the sum of the rows
    of the nodes the walk visits, each row once."""
    ffl = bench_module("ff_layer")
    rng = np.random.default_rng(0)
    n, h, depth = 31, 24, 4
    layer = ffl.FFLayer(rng.standard_normal((n, h), dtype=np.float32), rng.standard_normal(n, dtype=np.float32),
                        rng.standard_normal((n, h), dtype=np.float32), None, None)
    y = rng.standard_normal((40, h), dtype=np.float32)
    nodes = ffl.visited_nodes(layer, y, depth)
    _, routes, _ = ufcpu.model.fff(y, layer.w_in, layer.b_in, layer.w_out, depth)
    np.testing.assert_array_equal(nodes, np.unique(routes))
    want = y + (layer.w_in[nodes] + layer.w_out[nodes]).sum(axis=0)
    np.testing.assert_allclose(ffl.read_rows(y, layer, depth), want, rtol=1e-5, atol=1e-4)
    assert ffl.distinct_nodes([layer], [y], 40, depth) == [float(np.unique(routes[:, lv]).size) for lv in range(depth + 1)]


def _result(row: str, k: int, tok_s: dict, p50: float) -> dict:
    return {"row": row, "threads": 2, "round": k, "peak_rss_mb": 100.0 + k, "others_cpu_cores": 0.1,
            "workloads": {w: {"tokens_per_s": v, "median_s": 1.0} for w, v in tok_s.items()},
            "latency": {"p50_ms": p50, "p95_ms": 2 * p50}}


def test_encoder_rounds_take_medians_and_ratios_within_rounds():
    """--rounds: each row's figures are medians over its rounds, and each ratio is taken within a
    round (the rows of a round saw the same machine), then the median over rounds is judged."""
    enc = bench_module("encoder")
    workloads = {"8x128": None, "mix": None}
    # the machine slows down in round 1 for both rows: within-round ratios stay 2.5x and 3x
    mine = [(1000.0, 3000.0, 4.0), (500.0, 1500.0, 8.0), (900.0, 2700.0, 5.0)]
    peer = [(400.0, 1000.0, 10.0), (200.0, 500.0, 20.0), (300.0, 1000.0, 9.0)]
    results = []
    for k, ((a, b, la), (c, d, lc)) in enumerate(zip(mine, peer)):
        results += [_result("ufcpu-int8", k, {"8x128": a, "mix": b}, la),
                    _result("ort-int8-crammed", k, {"8x128": c, "mix": d}, lc)]
    combined = {r["row"]: r for r in enc.combine_rounds(results)}
    assert combined["ufcpu-int8"]["workloads"]["8x128"]["tokens_per_s"] == 900.0
    assert combined["ufcpu-int8"]["workloads"]["8x128"]["rounds_tokens_per_s"] == [1000.0, 500.0, 900.0]
    assert combined["ort-int8-crammed"]["latency"]["p50_ms"] == 10.0
    assert combined["ufcpu-int8"]["peak_rss_mb"] == 102.0 and combined["ufcpu-int8"]["rounds"] == 3
    ratios = {r["workload"]: r for r in enc.peer_ratios_by_round(results, workloads)}
    assert ratios["8x128"]["rounds"] == [2.5, 2.5, 3.0] and ratios["8x128"]["ratio"] == 2.5
    assert ratios["8x128"]["reached"] is True                    # target 2x, judged on the median
    assert ratios["sentence"]["rounds"] == [0.4, 0.4, 5.0 / 9.0] and ratios["sentence"]["reached"] is True
    assert ratios["mix"]["ratio"] == 3.0
    # the medians of the combined figures would give another ratio: rounds are not mixed
    assert combined["ufcpu-int8"]["workloads"]["8x128"]["tokens_per_s"] / \
        combined["ort-int8-crammed"]["workloads"]["8x128"]["tokens_per_s"] == 900.0 / 300.0
    assert "2.50x (2.50-3.00x)" in "\n".join(enc.peer_markdown(list(ratios.values())))


def test_encoder_one_round_is_unchanged():
    enc = bench_module("encoder")
    results = [_result("ufcpu-int8", 0, {"mix": 3000.0}, 4.0), _result("ort-int8-crammed", 0, {"mix": 1000.0}, 10.0)]
    assert enc.combine_rounds(results) == results
    (mix, sentence) = enc.peer_ratios_by_round(results, {"mix": None})
    assert mix["ratio"] == 3.0 and mix["rounds"] == [3.0] and sentence["ratio"] == 0.4


def test_encoder_rounds_must_be_positive(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "encoder.py"), "--smoke", "--out", str(tmp_path),
                           "--rounds", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--rounds: expected a whole number >= 1, got '0'" in proc.stderr
