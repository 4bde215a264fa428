"""Encoder benchmark: tokens/s of the full-size model, ufcpu's FFF against dense feedforwards and peers.

Rows (ROWS below), all on the same checkpoint (the project's random full-size checkpoint in the
exact Hub layout unless --model names a real one) and the same token ids:
- ufcpu with the FFF tree walk: the product;
- the same engine computing the FFF as the published code does (all 4095 nodes, masked):
  `ffn="dense-masked"`, what Hub users get today;
- the same engine with a dense 3072-wide FF (crammedBERT cost; random weights);
- ONNX Runtime on an equivalent dense graph (3072, and 4095 wide with the FFF's own weights) and a
  PyTorch module doing the same, each only when installed (the optional [bench] extras);
- reduced precision: ufcpu with `precision="int8"`, the 3072 graph quantized by ONNX Runtime
  (`quantize_dynamic`, int8 weights) and the same graph compiled by OpenVINO at its default precision
  (bfloat16 where the CPU has it); each with the token cosine to the float32 version of the same
  engine and graph.
Workloads: batches of 1, 8 and 32 sequences of 128 tokens, a realistic mix of lengths (8 to 128,
mean about 30, sorted and batched by 32 as ufcpu.Model.encode does), and the p50/p95 latency of one
short sentence; at 1 and 2 threads; peak memory per row.

Each (row, threads) runs in its own process: thread pools (OpenBLAS, Numba's OpenMP, ORT, torch)
never share a process, and the peak memory belongs to that row alone. Peer rows are checked against
ufcpu's dense row on the same weights (max abs difference of hidden states), so the comparison is
between equivalent computations.

With --rounds N every row runs N times, the rows taking turns in each round (row A, row B, ...,
then again): the tables give each row's median over the rounds, and each ratio between rows is
taken within a round (the rows of one round saw the same machine) and given as the median over the
rounds with its range. A shared machine drifts by more than the differences measured here between
runs minutes apart; turns and medians keep the ratios fair.

    python bench/encoder.py [--threads 1,2] [--model PATH] [--rows a,b] [--rounds N] [--out DIR] [--smoke]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ufcpu  # noqa: F401  (before NumPy: ufcpu settles OpenBLAS's idle workers, as for any user)
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import fmt, log  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog."


# --- what runs ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    family: str         # which runner builds it: "ufcpu", "onnxruntime" or "torch"
    ffn: str            # "fff", "dense-masked", "dense-crammed" (4H, random) or "dense-equal" (N, the FFF's weights)
    what: str           # "{n}" is replaced by the FF width
    default: bool = True   # run without --rows (False: only on request, to keep the run short)
    precision: str = "float32"   # "int8", or "default" (the engine's own choice: OpenVINO's bf16 on bf16 CPUs)


ROWS = (
    Row("ufcpu-fff", "ufcpu", "fff", "ufcpu, FFF tree walk (the product)"),
    Row("ufcpu-dense-masked", "ufcpu", "dense-masked",
        "ufcpu, FFF computed as the published code does: all {n} nodes, masked (what Hub users get)"),
    Row("ufcpu-dense-crammed", "ufcpu", "dense-crammed", "ufcpu engine, dense {n}-wide FF (crammedBERT cost)"),
    Row("ort-dense-crammed", "onnxruntime", "dense-crammed", "ONNX Runtime, equivalent dense graph, {n}-wide FF"),
    Row("ort-dense-equal", "onnxruntime", "dense-equal", "ONNX Runtime, equivalent dense graph, {n}-wide FF (FFF weights used densely)"),
    Row("torch-dense-crammed", "torch", "dense-crammed", "PyTorch eager module, {n}-wide FF"),
    Row("torch-dense-equal", "torch", "dense-equal", "PyTorch eager module, {n}-wide FF (FFF weights used densely)",
        default=False),
    Row("ufcpu-int8", "ufcpu", "fff", "ufcpu, FFF tree walk, precision=\"int8\"", precision="int8"),
    Row("ort-int8-crammed", "onnxruntime", "dense-crammed",
        "ONNX Runtime, the {n}-wide graph quantized (quantize_dynamic, QInt8 weights)", precision="int8"),
    Row("openvino-crammed", "openvino", "dense-crammed",
        "OpenVINO, the {n}-wide graph at its default precision (LATENCY hint)", precision="default"),
)

# family -> the optional modules it needs
FAMILY_NEEDS = {"ufcpu": (), "onnxruntime": ("onnx", "onnxruntime"), "torch": ("torch",),
                "openvino": ("onnx", "openvino")}
ONNX_FAMILIES = ("onnxruntime", "openvino")   # the runners that read bench/onnx_graph.py's graph

# --smoke runs these families together, to save process start-ups. torch brings its own OpenMP
# runtime: it never shares a process with Numba's OpenMP pool, even in the smoke run.
SMOKE_GROUPS = (("ufcpu", "onnxruntime"), ("torch",), ("openvino",))

# row ffn -> the ufcpu computation a row's output is checked against ("the same math, another code")
CHECK_AGAINST = {"fff": "dense-masked", "dense-masked": "fff", "dense-crammed": "dense-crammed",
                 "dense-equal": "dense-equal"}


def width(ffn: str, cfg) -> int:
    return {"fff": cfg.depth + 1, "dense-masked": cfg.nodes, "dense-crammed": 4 * cfg.hidden,
            "dense-equal": cfg.nodes}[ffn]


def label(row: Row, cfg) -> str:
    return row.what.format(n=width(row.ffn, cfg))


# --- sizes and workloads --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sizes:
    checkpoint: dict | None     # write_random_checkpoint dimensions (None: the full model)
    seq: int                    # tokens per sequence of the fixed batches
    batches: tuple[int, ...]    # sequences per fixed batch
    mix_count: int              # sequences in the mixed-length workload
    mix_range: tuple[int, int]  # their length range (before clipping to max_seq)
    mix_mean: float             # ... and target mean
    min_repeats: int
    max_repeats: int
    budget_s: float             # per workload: keep repeating while under this (after min_repeats)
    enough_s: float             # ... but a first run longer than this is kept alone (see common.repeat)
    latency_repeats: tuple[int, int]   # min, max single-sentence calls
    latency_budget_s: float


FULL = Sizes(checkpoint=None, seq=128, batches=(1, 8, 32), mix_count=48, mix_range=(8, 128), mix_mean=30,
             min_repeats=3, max_repeats=10, budget_s=2.0, enough_s=2.0, latency_repeats=(20, 200),
             latency_budget_s=1.0)
SMOKE = Sizes(checkpoint=common.SMOKE_CHECKPOINT, seq=16, batches=(1, 4),
              mix_count=10, mix_range=(3, 16), mix_mean=6, min_repeats=1, max_repeats=1, budget_s=0.0,
              enough_s=0.0, latency_repeats=(2, 2), latency_budget_s=0.0)


def mix_lengths(sizes: Sizes, max_seq: int, seed: int) -> list[int]:
    """Log-normal lengths (sigma 0.6) clipped to the range, scaled until their mean is the
    target: most texts short, a tail of long ones, as sentence/paragraph corpora look."""
    lo, hi = sizes.mix_range[0], min(sizes.mix_range[1], max_seq)
    z = np.exp(np.random.default_rng(seed).normal(0.0, 0.6, sizes.mix_count))
    scale = float(sizes.mix_mean)
    for _ in range(30):
        lengths = np.clip(np.round(scale * z), lo, hi)
        scale *= sizes.mix_mean / lengths.mean()
    return [int(n) for n in lengths]


def batches_of(lengths: list[int], batch_size: int, vocab: int, pad_id: int,
               rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sorted by length and cut into batches padded to their own longest sequence (as
    ufcpu.Model.encode batches); ids are random non-special tokens."""
    out = []
    order = sorted(lengths)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        s = max(chunk)
        ids = np.full((len(chunk), s), pad_id, np.int64)
        mask = np.zeros((len(chunk), s), np.int64)
        for j, n in enumerate(chunk):
            ids[j, :n] = rng.integers(7, vocab, n)
            mask[j, :n] = 1
        out.append((ids, mask))
    return out


def make_workloads(sizes: Sizes, cfg, pad_id: int, seed: int) -> dict[str, dict]:
    """name -> {"what", "batches": [(ids, mask)], "tokens": real tokens}."""
    rng = np.random.default_rng(seed)
    w = {}
    for b in sizes.batches:
        w[f"{b}x{sizes.seq}"] = {"what": f"{b} sequence{'s' if b > 1 else ''} of {sizes.seq} tokens",
                                 "batches": batches_of([sizes.seq] * b, b, cfg.vocab, pad_id, rng)}
    lengths = mix_lengths(sizes, cfg.max_seq, seed)
    w["mix"] = {"what": f"{len(lengths)} texts of {min(lengths)}-{max(lengths)} tokens (mean "
                        f"{np.mean(lengths):.1f}), sorted, batches of 32",
                "batches": batches_of(lengths, 32, cfg.vocab, pad_id, rng), "lengths": lengths}
    for v in w.values():
        v["tokens"] = int(sum(m.sum() for _, m in v["batches"]))
        v["padded_tokens"] = int(sum(m.size for _, m in v["batches"]))
    return w


# --- the model ------------------------------------------------------------------------------------

def onnx_path(engine_dir: Path, ffn: str, cache: Path) -> Path:
    from onnx_graph import GRAPH_VERSION
    from dense import CRAMMED_SEED
    return cache / "onnx" / f"{engine_dir.name}-{ffn}-s{CRAMMED_SEED}-g{GRAPH_VERSION}.onnx"


def graph_key(row: Row) -> str:
    """Which ONNX file a row runs: the float32 graph of its FF, or its quantized copy."""
    return f"{row.ffn}-int8" if row.family == "onnxruntime" and row.precision == "int8" else row.ffn


def ensure_graphs(rows: list[Row], engine_dir: Path, cache: Path) -> dict[str, Path]:
    """graph_key -> ONNX file, for every row that runs a graph."""
    out: dict[str, Path] = {}
    for r in rows:
        if r.family in ONNX_FAMILIES:
            out[r.ffn] = ensure_onnx(engine_dir, r.ffn, cache)
            if graph_key(r) != r.ffn:
                import onnx_graph
                out[graph_key(r)] = onnx_graph.quantized_int8(out[r.ffn], log=log)
    return out


def ensure_onnx(engine_dir: Path, ffn: str, cache: Path) -> Path:
    """Build (once) the ONNX graph of the encoder with this dense FF on the engine's weights."""
    path = onnx_path(engine_dir, ffn, cache)
    if path.is_file():
        return path
    import onnx_graph
    import ufcpu
    from dense import dense_layers
    log(f"building the ONNX graph {path.name} (once)")
    m = ufcpu.load(engine_dir)
    return onnx_graph.save(onnx_graph.build(m.weights, m.config, dense_layers(m.weights, dense_kind(ffn))), path)


# --- the worker: one process per (rows, threads) ---------------------------------------------------

def dense_kind(ffn: str) -> str:
    return ffn.removeprefix("dense-")        # "dense-crammed" -> "crammed" (bench/dense.py)


def ufcpu_ffn(name: str, weights):
    """The ffn callable for ufcpu.model.encoder: the engine's own choices, or a bench dense FF."""
    from dense import dense_layers, encoder_ffn
    from ufcpu import model as fwd
    if name in fwd.FFN:
        return fwd.FFN[name]
    return encoder_ffn(weights, dense_layers(weights, dense_kind(name)))


# Runners: (row, plan, threads) -> (run(ids, mask) -> hidden [B, S, H], threads actually set, extras).
# Set-up (loading, session creation, weight copies) is never timed.

def ufcpu_runner(row: Row, plan: dict, threads: int):
    import accuracy
    from ufcpu import kernels, settings
    from ufcpu import model as fwd
    from ufcpu import threads as ufcpu_threads
    settings.tune_malloc()                        # as the ufcpu command does
    m = accuracy.load(plan["engine_dir"], row.precision, threads)
    ufcpu_threads.set_threads(m.threads)          # fwd.encoder is called directly, outside a model call
    kernels.warmup()
    ffn = ufcpu_ffn(row.ffn, m.weights)
    extras = {"encode_sentence": lambda: m.encode(SENTENCE)} if row.ffn == "fff" else {}
    return (lambda ids, mask: fwd.encoder(ids, mask, m.weights, m.config, ffn)), m.threads, extras


def ort_runner(row: Row, plan: dict, threads: int):
    import onnx_graph
    sess = onnx_graph.session(Path(plan["onnx"][graph_key(row)]), threads)
    return (lambda ids, mask: sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]), threads, {}


def openvino_runner(row: Row, plan: dict, threads: int):
    import onnx_graph
    compiled = onnx_graph.openvino_compiled(Path(plan["onnx"][row.ffn]), threads, row.precision)
    request, out = compiled.create_infer_request(), compiled.output(0)

    def run(ids, mask):
        return request.infer({"input_ids": ids, "attention_mask": mask})[out]
    run.engine_precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()   # what "default" chose here
    return run, threads, {}


def torch_runner(row: Row, plan: dict, threads: int):
    import torch
    import torch_model
    import ufcpu
    from dense import dense_layers
    m = ufcpu.load(plan["engine_dir"], threads=1)
    run = torch_model.runner(m.weights, m.config, dense_layers(m.weights, dense_kind(row.ffn)), threads)
    del m                    # unmap the engine weights: the module holds its own copies
    return run, torch.get_num_threads(), {}


RUNNERS = {"ufcpu": ufcpu_runner, "onnxruntime": ort_runner, "torch": torch_runner, "openvino": openvino_runner}


def time_workload(run, batches, sizes: Sizes) -> dict:
    def once():
        for ids, mask in batches:
            run(ids, mask)
    return common.stats(common.repeat(once, sizes.min_repeats, sizes.max_repeats, sizes.budget_s, sizes.enough_s))


def latency(fn, sizes: Sizes) -> dict:
    lo, hi = sizes.latency_repeats
    s = common.repeat(fn, lo, hi, sizes.latency_budget_s)
    return {"p50_ms": 1e3 * float(np.percentile(s, 50)), "p95_ms": 1e3 * float(np.percentile(s, 95)),
            "repeats": len(s)}


# Blocks of ufcpu's forward pass timed by `breakdown`: model.<function> -> label, and the kernels
# launched through threads.run -> label. Both are looked up at call time (model.py calls its own
# globals and `threads.run`), so replacing them inside this worker process times them without
# touching the code.
TIMED_FUNCTIONS = {"attention": "attention", "linear": "projections",
                   "layer_norm": "layer_norm", "add_layer_norm": "layer_norm"}
TIMED_KERNELS = {"attention_heads": "attention_heads", "fff_walk": "fff_walk"}


def _timer(fn, label_of, acc):
    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            label = label_of(*a)
            if label:
                acc[label] += time.perf_counter() - t
    return timed


@contextlib.contextmanager
def timed_blocks():
    """-> a dict label -> seconds accumulated while the context is open."""
    from ufcpu import model as fwd
    from ufcpu import threads
    acc: dict[str, float] = collections.defaultdict(float)
    saved = [(fwd, name, getattr(fwd, name)) for name in TIMED_FUNCTIONS] + [(threads, "run", threads.run)]
    for name, label in TIMED_FUNCTIONS.items():
        setattr(fwd, name, _timer(getattr(fwd, name), lambda *a, label=label: label, acc))
    threads.run = _timer(threads.run, lambda kernel, *a: TIMED_KERNELS.get(kernel.py_func.__name__), acc)
    try:
        yield acc
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def breakdown(run, cases: dict) -> dict:
    """Where the product's time goes (one warm, instrumented run per case): the attention
    projections (QKV and output), the attention kernel (scores, softmax, context), the rest of
    attention, LayerNorms (with the residual adds before them), the FFF walk, and the rest
    (embedding, mask, Python). Shares of the wall-clock total; the timers add a few microseconds per call."""
    out = {}
    for name, batches in cases.items():
        with timed_blocks() as acc:
            t = time.perf_counter()
            for ids, mask in batches:
                run(ids, mask)
            total = time.perf_counter() - t
        parts = {"projections": acc["projections"],
                 "attention_other": acc["attention"] - acc["projections"] - acc["attention_heads"],
                 "attention_heads": acc["attention_heads"], "layer_norm": acc["layer_norm"], "fff_walk": acc["fff_walk"]}
        parts["other"] = total - sum(parts.values())
        out[name] = {"total_ms": 1e3 * total, **{k: 1e3 * v for k, v in parts.items()}}
    return out


def check(row: Row, run, plan: dict, data) -> dict:
    """Max abs difference of hidden states (real tokens) against ufcpu on the same weights and
    input. Run after the timings, so the reference's memory and threads do not touch them."""
    import ufcpu
    from ufcpu import model as fwd
    against = CHECK_AGAINST[row.ffn]
    if row.family == "ufcpu" and against == row.ffn:
        return {"against": "itself (the reference of the peer rows)", "max_abs_diff": 0.0}
    ids, mask = data["check_ids"], data["check_mask"]
    m = ufcpu.load(plan["engine_dir"], threads=1)
    ref = fwd.encoder(ids, mask, m.weights, m.config, ufcpu_ffn(against, m.weights))
    got = run(ids, mask)
    real = mask.astype(bool)
    return {"against": f"ufcpu {against}", "max_abs_diff": float(np.abs(got[real] - ref[real]).max()),
            "max_abs_ref": float(np.abs(ref[real]).max())}


def precision_check(row: Row, run, threads: int, plan: dict, data, workloads: dict) -> dict | None:
    """A reduced-precision row's token cosine (real tokens) to the float32 version of the same
    engine and graph, on the check input and the mixed-length batches; None for float32 rows."""
    import accuracy
    if row.precision == "float32":
        return None
    twin, _, _ = RUNNERS[row.family](dataclasses.replace(row, precision="float32"), plan, threads)
    inputs = [(data["check_ids"], data["check_mask"]), *workloads["mix"]]
    cos = np.concatenate([accuracy.token_cosines(run(ids, mask), twin(ids, mask), mask) for ids, mask in inputs])
    return {"against": f"{row.family}, float32, same weights", "token_cos_mean": float(cos.mean()),
            "token_cos_min": float(cos.min()), "tokens": int(cos.size)}


def measure_row(row: Row, threads: int, plan: dict, data, workloads: dict, sizes: Sizes) -> dict:
    """Set up one row, warm it, time every workload and the sentence latency, read its peak memory,
    then (untimed) the breakdown for the product row and the correctness check."""
    sentence = (data["sentence_ids"], data["sentence_mask"])
    t0 = time.perf_counter()
    run, n_set, extras = RUNNERS[row.family](row, plan, threads)
    res = {"row": row.key, "threads": n_set, "setup_s": time.perf_counter() - t0,
           "rss_after_setup_mb": common.rss_mb(), "peak_is_run_only": common.reset_peak_rss(), "workloads": {}}
    # warm-up, never timed: JIT compile, first touch of weights, and every workload once, so that
    # each engine's memory (an arena, or malloc's heap) has grown to the largest batch's size
    run(*sentence)
    for batches in workloads.values():
        for ids, mask in batches:
            run(ids, mask)
    for fn in extras.values():
        fn()
    for name, batches in workloads.items():
        st = time_workload(run, batches, sizes)
        res["workloads"][name] = {**st, "tokens_per_s": plan["tokens"][name] / st["median_s"]}
        log(f"  {row.key:20} threads={n_set} {name:7} {res['workloads'][name]['tokens_per_s']:9.1f} tok/s "
            f"({st['repeats']} repeats)")
    res["latency"] = latency(lambda: run(*sentence), sizes)
    for name, fn in extras.items():
        res[name] = latency(fn, sizes)
    res["peak_rss_mb"] = common.peak_rss_mb()
    res["loadavg_after"] = common.loadavg()          # the machine's, this row included
    if row.family == "ufcpu" and row.ffn == "fff":   # one sentence, one sequence, and the mix
        first = next(iter(workloads))
        res["breakdown"] = breakdown(run, {"sentence": [sentence], first: workloads[first],
                                           "mix": workloads["mix"]})
        res["threads_info"] = common.ufcpu_threads()
    res["check"] = check(row, run, plan, data)
    res["precision"] = getattr(run, "engine_precision", row.precision)
    res["to_float32"] = precision_check(row, run, n_set, plan, data, workloads)
    res["versions"] = common.versions()
    return res


def worker(rows: list[Row], threads: int, plan_path: Path, result_path: Path) -> None:
    """Entry point of a worker process: measure its rows one after the other, write JSON."""
    plan = json.loads(plan_path.read_text())
    sizes = Sizes(**{**plan["sizes"], "mix_range": tuple(plan["sizes"]["mix_range"])})
    data = np.load(plan["data"])
    workloads = {name: [(data[f"{name}/{i}/ids"], data[f"{name}/{i}/mask"]) for i in range(n)]
                 for name, n in plan["workloads"].items()}
    results = []
    for row in rows:
        try:
            results.append(measure_row(row, threads, plan, data, workloads, sizes))
        except Exception as e:   # one row failing (an engine that cannot run here) keeps the others
            line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log(f"  {row.key}: error: {type(e).__name__}: {line}")
            results.append({"row": row.key, "threads": threads, "error": f"{type(e).__name__}: {line}"})
    result_path.write_text(json.dumps(results))


# --- the orchestrator -----------------------------------------------------------------------------

def available(row: Row) -> str | None:
    """None if the row can run here, else why not."""
    import accuracy
    missing = [m for m in FAMILY_NEEDS[row.family] if not common.have(m)]
    if missing:
        return f"skipped: {', '.join(missing)} not installed (pip install -e '.[bench]')"
    if row.family == "ufcpu" and row.precision != "float32" and not accuracy.supports_precision():
        return f"skipped: this ufcpu has no ufcpu.load(..., precision=...), so {row.precision} cannot run"
    return None


def run_worker(rows: list[Row], threads: int, plan_path: Path, tmp: Path, wait_idle_s: float) -> list[dict]:
    """Run rows in a fresh process. Before it starts, note how idle the machine is (waiting up to
    wait_idle_s for other processes to leave the CPUs 90% idle): the noise floor of its numbers."""
    idle = common.wait_for_idle(0.9, wait_idle_s)
    out = tmp / f"result-{'+'.join(r.key for r in rows)}-{threads}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--rows", ",".join(r.key for r in rows),
           "--threads", str(threads), "--plan", str(plan_path), "--result", str(out)]
    with common.OthersCpu() as others:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    if proc.returncode != 0 or not out.is_file():
        return [{"row": r.key, "threads": threads, "error": f"worker exited with {proc.returncode}"} for r in rows]
    return [{**r, "cpu_idle_before": idle, "others_cpu_cores": others.cores} for r in json.loads(out.read_text())]


def flop_ceiling(cfg, padded_seq: float, dense_width: int) -> float:
    """Whole-encoder FLOP ratio dense/FFF per token per layer: attention 8H^2 + 4SH in both, FF
    4H*width vs 4H*(D+1). LayerNorms, softmax and embeddings are left out (small)."""
    h = cfg.hidden
    attn = 8 * h * h + 4 * padded_seq * h
    return (attn + 4 * h * dense_width) / (attn + 4 * h * (cfg.depth + 1))


def summarise(results: list[dict], rows: list[Row], cfg, workloads: dict) -> list[dict]:
    """Speedups of the product row over the dense rows, and the FLOP ceilings next to them."""
    get = {(r["row"], r["threads"]): r for r in results if "workloads" in r}
    out = []
    for (key, n), r in get.items():
        if key != "ufcpu-fff":
            continue
        for other, dense_width in (("ufcpu-dense-crammed", 4 * cfg.hidden), ("ufcpu-dense-masked", cfg.nodes)):
            o = get.get((other, n))
            if o is None:
                continue
            for name, w in workloads.items():
                seq = w["padded_tokens"] / sum(ids.shape[0] for ids, _ in w["batches"])
                out.append({"threads": n, "workload": name, "over": other,
                            "speedup": r["workloads"][name]["tokens_per_s"] / o["workloads"][name]["tokens_per_s"],
                            "flop_ceiling": flop_ceiling(cfg, seq, dense_width)})
    return out


# Issue 13's targets for ufcpu's fastest mode against the faster reduced-precision peer, per workload:
# tokens/s ratio at least this (the sentence: p50 latency ratio at most this).
PEER_ROWS = ("ort-int8-crammed", "openvino-crammed")
UFCPU_MODES = ("ufcpu-fff", "ufcpu-int8")
PEER_TARGETS = {"8x128": 2.0, "mix": 2.0, "1x128": 1.5}
SENTENCE_TARGET = 0.5


def peer_ratios(results: list[dict], workloads: dict, with_targets: bool = True) -> list[dict]:
    """Per thread count: ufcpu's fastest mode over the faster of ORT int8 and OpenVINO (tokens/s,
    and the sentence p50), and ufcpu-int8 over ufcpu-fff. The targets are for the full sizes."""
    ok = {(r["row"], r["threads"]): r for r in results if "workloads" in r}
    out = []
    for n in sorted({t for _, t in ok}):
        mine = [ok[k, n] for k in UFCPU_MODES if (k, n) in ok]
        peers = [ok[k, n] for k in PEER_ROWS if (k, n) in ok]
        if not mine or not peers:
            continue
        for name in [*workloads, "sentence"]:
            if name == "sentence":
                best = min(mine, key=lambda r: r["latency"]["p50_ms"])
                peer = min(peers, key=lambda r: r["latency"]["p50_ms"])
                ratio, target = best["latency"]["p50_ms"] / peer["latency"]["p50_ms"], SENTENCE_TARGET
            else:
                best = max(mine, key=lambda r: r["workloads"][name]["tokens_per_s"])
                peer = max(peers, key=lambda r: r["workloads"][name]["tokens_per_s"])
                ratio = best["workloads"][name]["tokens_per_s"] / peer["workloads"][name]["tokens_per_s"]
                target = PEER_TARGETS.get(name)
            target = target if with_targets else None
            reached = None if target is None else (ratio <= target if name == "sentence" else ratio >= target)
            int8 = ok.get(("ufcpu-int8", n))
            fp32 = ok.get(("ufcpu-fff", n))
            over_f32 = None
            if int8 and fp32:
                over_f32 = (fp32["latency"]["p50_ms"] / int8["latency"]["p50_ms"] if name == "sentence" else
                            int8["workloads"][name]["tokens_per_s"] / fp32["workloads"][name]["tokens_per_s"])
            out.append({"threads": n, "workload": name, "ufcpu": best["row"], "peer": peer["row"], "ratio": ratio,
                        "target": target, "reached": reached, "int8_over_float32": over_f32})
    return out


def by_round(results: list[dict]) -> list[list[dict]]:
    """Results grouped by the round that measured them, in round order."""
    rounds = sorted({r.get("round", 0) for r in results})
    return [[r for r in results if r.get("round", 0) == k] for k in rounds]


def combine_rounds(results: list[dict]) -> list[dict]:
    """One result per (row, threads): tokens/s and the sentence latencies are medians over the
    rounds (each round's value kept under "rounds"); the rest (checks, breakdown) is the last
    round's; peak memory the largest. A row that failed in any round is reported by its error."""
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in results:
        groups[r["row"], r["threads"]].append(r)
    out = []
    for runs in groups.values():
        failed = [r for r in runs if "workloads" not in r]
        if failed or len(runs) == 1:
            out.append(failed[0] if failed else runs[0])
            continue
        last = runs[-1]
        combined = {**last, "rounds": len(runs), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                    "others_cpu_cores": float(np.median([r.get("others_cpu_cores") or 0.0 for r in runs]))}
        combined["workloads"] = {
            name: {**w, "tokens_per_s": float(np.median([r["workloads"][name]["tokens_per_s"] for r in runs])),
                   "rounds_tokens_per_s": [r["workloads"][name]["tokens_per_s"] for r in runs]}
            for name, w in last["workloads"].items()}
        for key in ("latency", *(k for k in ("encode_sentence",) if k in last)):
            combined[key] = {**last[key], **{q: float(np.median([r[key][q] for r in runs]))
                                             for q in ("p50_ms", "p95_ms")},
                             "rounds_p50_ms": [r[key]["p50_ms"] for r in runs]}
        out.append(combined)
    return out


def peer_ratios_by_round(results: list[dict], workloads: dict, with_targets: bool = True) -> list[dict]:
    """peer_ratios within each round, then per (threads, workload) the median ratio over the rounds
    (its range and every round's value kept); a target is judged on the median."""
    per_round = [peer_ratios(rs, workloads, with_targets) for rs in by_round(results)]
    merged: dict[tuple, list[dict]] = collections.defaultdict(list)
    for ratios in per_round:
        for r in ratios:
            merged[r["threads"], r["workload"]].append(r)
    out = []
    for runs in merged.values():
        ratio = float(np.median([r["ratio"] for r in runs]))
        f32 = [r["int8_over_float32"] for r in runs if r["int8_over_float32"] is not None]
        target = runs[0]["target"]
        reached = None if target is None else (ratio <= target if runs[0]["workload"] == "sentence" else ratio >= target)
        out.append({**runs[-1], "ratio": ratio, "reached": reached, "rounds": [r["ratio"] for r in runs],
                    "ufcpu_by_round": [r["ufcpu"] for r in runs], "peer_by_round": [r["peer"] for r in runs],
                    "int8_over_float32": float(np.median(f32)) if f32 else None})
    return out


def _ratio_cell(r: dict) -> str:
    rounds = r.get("rounds", [])
    if len(rounds) < 2:
        return f"{fmt(r['ratio'])}x"
    return f"{fmt(r['ratio'])}x ({fmt(min(rounds))}-{fmt(max(rounds))}x)"


def peer_markdown(ratios: list[dict]) -> list[str]:
    if not ratios:
        return []
    out = ["## ufcpu's fastest mode against the faster reduced-precision peer", "",
           f"Tokens/s ratio (ufcpu / peer); the sentence row is the p50 latency ratio (ufcpu / peer, lower is "
           f"better). Targets (issue 13): {', '.join(f'{k} >= {v:g}x' for k, v in PEER_TARGETS.items())}, "
           f"sentence p50 <= {SENTENCE_TARGET:g}x. Last column: ufcpu-int8 speed over ufcpu-fff."
           + (f" Ratios taken within each of {len(ratios[0]['rounds'])} rounds: the median, its range in "
              f"brackets, the target judged on the median." if len(ratios[0].get("rounds", [])) > 1 else ""),
           ""]
    out.append(common.md_table(
        ["threads", "workload", "ufcpu mode", "peer", "ratio", "target", "int8 / float32"],
        [[r["threads"], r["workload"], r["ufcpu"], r["peer"], _ratio_cell(r),
          "-" if r["target"] is None else ("reached" if r["reached"] else "not reached"),
          "-" if r["int8_over_float32"] is None else f"{fmt(r['int8_over_float32'])}x"] for r in ratios]))
    return out + [""]


def markdown(results: list[dict], rows: list[Row], skipped: dict, cfg, workloads: dict, speedups: list[dict],
             meta: dict) -> str:
    names = list(workloads)
    out = [f"# Encoder: tokens/s ({cfg.layers} layers, H = {cfg.hidden}, {cfg.heads} heads, FFF depth {cfg.depth})", "",
           f"Model: {meta['model']}. Wall-clock, warm, median of repeats"
           + (f", then the median over {meta['rounds']} rounds in which the rows took turns" if meta["rounds"] > 1 else "")
           + f"; tokens/s counts real tokens "
           f"(padding excluded). Latency: one short sentence ({meta['sentence_tokens']} tokens), hidden states "
           f"only. Peak RSS: the row's own process while running (mapped weight pages included). "
           f"Others' CPUs: how many of the {os.cpu_count()} CPUs other processes kept busy during the row "
           f"(this machine is shared: the larger, the noisier the row).", "",
           "Workloads: " + "; ".join(f"`{k}` = {w['what']}" for k, w in workloads.items()) + ".", ""]
    table = []
    for r in sorted(results, key=lambda r: (r["threads"], [x.key for x in rows].index(r["row"]))):
        row = next(x for x in rows if x.key == r["row"])
        if "error" in r:
            table.append([f"{row.key}: error: {r['error']}", r["threads"]] + ["-"] * (len(names) + 5))
            continue
        chk, f32 = r["check"], r.get("to_float32")
        mode = "" if r.get("precision", "float32") == "float32" and row.precision == "float32" else f" ({r['precision']})"
        table.append([f"{row.key}: {label(row, cfg)}{mode}", r["threads"]]
                     + [fmt(r["workloads"][k]["tokens_per_s"]) for k in names]
                     + [f"{fmt(r['latency']['p50_ms'])} / {fmt(r['latency']['p95_ms'])}",
                        fmt(r["peak_rss_mb"], 4),
                        f"{chk['max_abs_diff']:.1e} vs {chk['against']}",
                        "-" if not f32 else f"{f32['token_cos_mean']:.5f} / {f32['token_cos_min']:.5f}",
                        fmt(r.get("others_cpu_cores"), 2)])
    out.append(common.md_table(["engine", "threads"] + [f"{k} tok/s" for k in names]
                               + ["sentence p50 / p95 ms", "peak RSS MB", "check: max abs diff",
                                  "token cos to its float32 (mean / min)", "others' CPUs"], table))
    out.append("")
    enc = [r for r in results if "encode_sentence" in r]
    if enc:
        out.append("End-to-end `Model.encode(sentence)` (tokenize + forward + mean pooling): "
                   + "; ".join(f"{r['row']} at {r['threads']} thread(s) p50 {fmt(r['encode_sentence']['p50_ms'])} ms, "
                               f"p95 {fmt(r['encode_sentence']['p95_ms'])} ms" for r in enc) + ".")
        out.append("")
    prof = [r for r in results if "breakdown" in r]
    if prof:
        parts = ("projections", "attention_heads", "attention_other", "layer_norm", "fff_walk", "other")
        out += ["## Where ufcpu's FFF rows spend their time", "",
                "One instrumented run per case; shares of wall-clock. projections = the QKV and output "
                "products; attention_heads = the kernel of the score and context products and the softmax; "
                "attention_other = the rest of attention (allocations, calls); layer_norm = the LayerNorms "
                "and the residual add each runs with (one kernel); other = embedding, mask, Python.", ""]
        out.append(common.md_table(["row", "threads", "case", "total ms"] + list(parts),
                                   [[r["row"], r["threads"], case, fmt(b["total_ms"])]
                                    + [f"{100 * b[p] / b['total_ms']:.0f}%" for p in parts]
                                    for r in prof for case, b in r["breakdown"].items()]))
        out.append("")
    for key, why in skipped.items():
        out.append(f"- `{key}` {why}")
    if skipped:
        out.append("")
    if speedups:
        out += ["## Speedup of ufcpu-fff over the same engine with a dense FF, and the FLOP ceiling", "",
                "Ceiling: attention (8H² + 4SH per token per layer) stays; only the FF shrinks.", ""]
        out.append(common.md_table(
            ["over", "threads"] + names,
            [[s_over, n] + [f"{fmt(s['speedup'])}x (ceiling {fmt(s['flop_ceiling'])}x)"
                            for s in speedups if s["over"] == s_over and s["threads"] == n]
             for s_over, n in dict.fromkeys((s["over"], s["threads"]) for s in speedups)]))
        out.append("")
    return "\n".join(out)


def plot(results: list[dict], rows: list[Row], cfg, workloads: dict, path: Path) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    ok = [r for r in results if "workloads" in r]
    thread_counts = sorted({r["threads"] for r in ok})
    names = list(workloads)
    fig, axes = plt.subplots(1, len(thread_counts), figsize=(6 * len(thread_counts), 4.5), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], thread_counts):
        sel = [r for r in ok if r["threads"] == n]
        step = 0.8 / max(1, len(sel))
        for i, r in enumerate(sel):
            x = np.arange(len(names)) + i * step
            ax.bar(x, [r["workloads"][k]["tokens_per_s"] for k in names], step, label=r["row"])
        ax.set_xticks(np.arange(len(names)) + 0.4 - step / 2, names)
        ax.set(title=f"{n} thread{'s' if n > 1 else ''}", xlabel="workload")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("tokens/s (real tokens)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Encoder throughput, {cfg.layers} x {cfg.hidden}, FFF depth {cfg.depth}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def save_plan(tmp: Path, engine_dir: Path, sizes: Sizes, workloads: dict, sentence, check_input,
              onnx_paths: dict) -> Path:
    arrays = {"sentence_ids": sentence[0], "sentence_mask": sentence[1],
              "check_ids": check_input[0], "check_mask": check_input[1]}
    for name, w in workloads.items():
        for i, (ids, mask) in enumerate(w["batches"]):
            arrays[f"{name}/{i}/ids"], arrays[f"{name}/{i}/mask"] = ids, mask
    np.savez(tmp / "data.npz", **arrays)
    plan = {"engine_dir": str(engine_dir), "sizes": dataclasses.asdict(sizes), "data": str(tmp / "data.npz"),
            "workloads": {k: len(w["batches"]) for k, w in workloads.items()},
            "tokens": {k: w["tokens"] for k, w in workloads.items()},
            "onnx": {k: str(p) for k, p in onnx_paths.items()}}
    path = tmp / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def check_input(cfg, pad_id: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two sequences, the second padded: the peers must agree with ufcpu on masking too."""
    s = min(16, cfg.max_seq)
    rng = np.random.default_rng(seed + 1)
    ids = rng.integers(7, cfg.vocab, (2, s)).astype(np.int64)
    mask = np.ones((2, s), np.int64)
    mask[1, s - s // 3:] = 0
    ids[mask == 0] = pad_id
    return ids, mask


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default=None, help="thread counts (default 1,2; --smoke: 1)")
    ap.add_argument("--model", default=None, help="a real checkpoint (Hub id or folder); default: the "
                    "project's random full-size checkpoint, written once into the ufcpu cache")
    ap.add_argument("--rows", default=None, help="comma-separated row keys (default: all that can run)")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="results folder (default bench/results)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, one repeat, rows grouped per process")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each row, wait up to this long for other processes to leave the CPUs "
                         "90%% idle (shared machines; default 0: just record how idle they were)")
    ap.add_argument("--rounds", type=common.positive_int, default=1, metavar="N",
                    help="run every row N times, the rows taking turns; report medians over the rounds "
                         "(default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None,
                    help="results file name without suffix (default encoder-<cpu>, e.g. encoder-icelake-server; "
                         "--smoke: encoder)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    by_key = {r.key: r for r in ROWS}
    if args.worker:
        worker([by_key[k] for k in args.rows.split(",")], int(args.threads), args.plan, args.result)
        return 0

    started = time.perf_counter()
    sizes = SMOKE if args.smoke else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:   # keep everything the smoke run writes inside --out
        os.environ["UFCPU_CACHE"] = str((args.out / "cache").resolve())
    import ufcpu
    from ufcpu import hub
    cache = hub.cache_dir() / "bench"
    info = common.machine_info()
    source = args.model or common.bench_checkpoint(args.smoke, sizes.checkpoint)
    engine_dir, _ = hub.resolve(source, log=log)
    m = ufcpu.load(engine_dir, threads=1)
    cfg, pad_id = m.config, m.tokenizer.pad_id
    sentence = m.tokenize(SENTENCE)
    sentence = (sentence["input_ids"], sentence["attention_mask"])
    workloads = make_workloads(sizes, cfg, pad_id, args.seed)
    del m

    wanted = [by_key[k] for k in args.rows.split(",")] if args.rows else [r for r in ROWS if r.default]
    skipped = {r.key: why for r in wanted if (why := available(r))}
    rows = [r for r in wanted if r.key not in skipped]
    onnx_paths = ensure_graphs(rows, engine_dir, cache)
    thread_counts = common.parse_ints(args.threads or ("1" if args.smoke else "1,2"))

    results = []
    with tempfile.TemporaryDirectory(prefix="ufcpu-bench-") as tmp:
        plan = save_plan(Path(tmp), engine_dir, sizes, workloads, sentence, check_input(cfg, pad_id, args.seed),
                         onnx_paths)
        # full runs: one process per row (isolated peak memory); smoke: as few as can share one
        groups = ([[r for r in rows if r.family in g] for g in SMOKE_GROUPS] if args.smoke else [[r] for r in rows])
        for k in range(args.rounds):
            for n in thread_counts:
                for group in filter(None, groups):
                    log(f"{'+'.join(r.key for r in group)} at {n} thread(s)"
                        + (f", round {k + 1} of {args.rounds}" if args.rounds > 1 else ""))
                    results += [{**r, "round": k} for r in run_worker(group, n, plan, Path(tmp), args.wait_idle)]

    ratios = peer_ratios_by_round(results, workloads, with_targets=not args.smoke)
    per_round = results
    results = combine_rounds(results)
    speedups = summarise(results, rows, cfg, workloads)
    meta = {"model": (f"{source} (real checkpoint)" if args.model else
                      "the project's random checkpoint in the exact Hub layout (weights_convert/random_checkpoint.py)"),
            "sentence_tokens": int(sentence[1].sum()), "rounds": args.rounds}
    name = args.name or ("encoder" if args.smoke else f"encoder-{common.cpu_slug(info)}")   # one file per CPU
    png = args.out / f"{name}.png"
    plotted = plot(results, rows, cfg, workloads, png)
    md = "\n".join([markdown(results, rows, skipped, cfg, workloads, speedups, meta), *peer_markdown(ratios)])
    if not plotted:
        md += "\n(plot skipped: matplotlib is not installed)\n"
    info["loadavg_at_end"] = common.loadavg()
    common.write_json(args.out / f"{name}.json", {
        "benchmark": "encoder", "smoke": args.smoke, "machine": info, "model": meta["model"],
        "engine_dir": str(engine_dir), "config": cfg.to_json(),
        "rows": {r.key: {"family": r.family, "ffn": r.ffn, "what": label(r, cfg)} for r in wanted},
        "skipped": skipped,
        "workloads": {k: {"what": w["what"], "tokens": w["tokens"], "padded_tokens": w["padded_tokens"],
                          "batch_shapes": [list(ids.shape) for ids, _ in w["batches"]]} for k, w in workloads.items()},
        "sentence": {"text": SENTENCE, "tokens": meta["sentence_tokens"]},
        "thread_control": {"ufcpu": "ufcpu.threads.set_threads(n) (OpenBLAS + ufcpu's helper threads)",
                           "onnxruntime": "intra_op_num_threads=n, inter_op_num_threads=1, sequential",
                           "torch": "torch.set_num_threads(n)"},
        "isolation": "one process per (row, threads)" if not args.smoke else f"process groups {SMOKE_GROUPS} (smoke)",
        "rounds": args.rounds, "results": results, "results_by_round": per_round if args.rounds > 1 else None,
        "speedups": speedups, "peer_ratios": ratios, "plot": png.name if plotted else None,
        "wall_s": time.perf_counter() - started})
    common.write_text(args.out / f"{name}.md", md)
    print(md)
    log(f"wrote {args.out / name}.json, .md{', .png' if plotted else ''} "
        f"in {time.perf_counter() - started:.0f} s")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
