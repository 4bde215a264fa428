"""FF-layer benchmark: ufcpu's FFF tree walk against dense feedforward GEMMs, one layer.

It reproduces the paper's CPU comparison (one feedforward layer, 16384 tokens x 768, depth 11 =
4095 nodes, a dense BLAS baseline of equal width 4095) without the flaws listed in MODEL.md:
- real routing: random activations at the scale of LayerNorm outputs and weights at the init scale
  of the checkpoint (or, with --model, activations captured from a forward pass of that checkpoint
  and its own FFF weights), never zero buffers; the distinct nodes each level touched are reported;
- wall-clock time after warm-up (JIT compile never counted), medians of repeats, threads stated;
- two labelled cases: one hot layer (the paper's case: one layer's 25 MB stay in cache) and 16
  distinct layers cycled (403 MB of FFF weights, what a real forward pass sees); and, to show what
  the paper's number measured, its own setup: weights and inputs all zero, every token on one path;
- token counts 1, 128, 2048 and the paper's 16384; dense baselines of width 4095 (equal parameters)
  and 3072 (crammedBERT), same inputs, same run.
Next to each result stand the ceilings: the FLOP limit (4095/12 = 341x) and the memory floor,
estimated (bytes the walk must read / streaming bandwidth measured here) and measured (the same
reads and writes alone, taking turns with the walk).

    python bench/ff_layer.py [--threads 1,2] [--model PATH] [--out DIR] [--clock wall|thread] [--smoke]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable

import ufcpu  # noqa: E402  (before NumPy: ufcpu settles OpenBLAS's idle workers, as for any user)
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import fmt, log  # noqa: E402
from dense import DenseFF, dense_ff, equal_params, random_crammed  # noqa: E402

from numba import njit  # noqa: E402

from ufcpu import kernels, threads  # noqa: E402
from ufcpu import model as fwd  # noqa: E402

f32 = np.float32


# --- sizes ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sizes:
    hidden: int                 # H
    depth: int                  # D: 2^(D+1)-1 nodes, D+1 visited per token
    tokens: tuple[int, ...]     # token counts T per call
    layers: int                 # distinct layers in the cycled case
    min_repeats: int            # samples per point, at least
    max_repeats: int            # ... and at most
    budget_s: float             # keep sampling a point while under this (after min_repeats)
    min_sample_s: float         # one sample repeats a tiny call until it lasts this long
    dram_probe_bytes: int       # bandwidth probe larger than the last-level cache

    @property
    def nodes(self) -> int:
        return 2 ** (self.depth + 1) - 1


FULL = Sizes(hidden=768, depth=11, tokens=(1, 128, 2048, 16384), layers=16, min_repeats=3,
             max_repeats=15, budget_s=3.0, min_sample_s=0.02, dram_probe_bytes=1 << 30)
SMOKE = Sizes(hidden=64, depth=4, tokens=(1, 16, 64), layers=2, min_repeats=1, max_repeats=1,
              budget_s=0.0, min_sample_s=0.0, dram_probe_bytes=8 << 20)


# --- weights and activations ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FFLayer:
    w_in: np.ndarray            # [N, H]  FFF node weights (engine layout)
    b_in: np.ndarray            # [N]
    w_out: np.ndarray           # [N, H]  node-major output vectors
    equal: DenseFF              # the same parameters as a dense N-wide FF
    crammed: DenseFF            # a dense 4H-wide FF (crammedBERT), random


def random_inputs(sizes: Sizes, seed: int) -> tuple[list[FFLayer], list[np.ndarray], dict]:
    """Weights with the checkpoint's init scale (weights_convert/random_checkpoint.py: w_in
    N(0, 1/H), b_in N(0, 0.3^2), w_out N(0, 1/N)) and activations shaped like LayerNorm outputs
    (unit rows times a LayerNorm affine 1 + N(0, 0.2^2), + N(0, 0.2^2)): FFF logits are O(1), so
    tokens spread over the tree as in a real model. One activation matrix serves every layer
    (different weights route it differently)."""
    h, n = sizes.hidden, sizes.nodes
    rng = np.random.default_rng(seed)
    crammed = random_crammed(sizes.layers, h)
    layers = []
    for i in range(sizes.layers):
        w_in = common.as_engine(rng.standard_normal((n, h), dtype=f32) * f32(1 / math.sqrt(h)))
        b_in = rng.standard_normal(n, dtype=f32) * f32(0.3)
        w_out = common.as_engine(rng.standard_normal((n, h), dtype=f32) * f32(1 / math.sqrt(n)))
        layers.append(FFLayer(w_in, b_in, w_out, equal_params(w_in, b_in, w_out), crammed[i]))
    y = rng.standard_normal((max(sizes.tokens), h), dtype=f32)
    y -= y.mean(axis=1, keepdims=True)
    y /= y.std(axis=1, keepdims=True)
    y *= f32(1) + f32(0.2) * rng.standard_normal(h, dtype=f32)
    y += f32(0.2) * rng.standard_normal(h, dtype=f32)
    y = common.as_engine(y)
    meta = {"source": "random", "weights": "init scale of the project's random checkpoints",
            "activations": "LayerNorm-shaped random rows, shared by all layers"}
    return layers, [y] * sizes.layers, meta


def word_salad(count: int, rng: np.random.Generator) -> list[str]:
    """English-looking texts (common words, sentences of 5-20 words) long enough to fill 128
    tokens: no corpus ships with the project and the bench must run offline."""
    from weights_convert.random_checkpoint import COMMON_WORDS
    texts = []
    for _ in range(count):
        sentences = []
        for _ in range(12):
            words = rng.choice(COMMON_WORDS, size=rng.integers(5, 21))
            sentences.append(" ".join(words).capitalize() + ".")
        texts.append(" ".join(sentences))
    return texts


def captured_inputs(model_path: str, sizes: Sizes, seed: int) -> tuple[Sizes, list[FFLayer], list[np.ndarray], dict]:
    """A checkpoint's own FFF weights, and each layer's real FFF inputs (the LN2 outputs of a
    forward pass over texts), captured by an `ffn` hook that records its input and then runs the
    walk. Tokens keep their sequence order, so small T takes one sentence's correlated tokens."""
    logging.getLogger("ufcpu").setLevel(logging.ERROR)     # truncation warnings are expected
    m = ufcpu.load(model_path)
    cfg = m.config
    sizes = dataclasses.replace(sizes, hidden=cfg.hidden, depth=cfg.depth, layers=cfg.layers)
    index = {id(layer): i for i, layer in enumerate(m.weights.layers)}
    captured: list[list[np.ndarray]] = [[] for _ in m.weights.layers]

    def hook(h, layer, c):  # [B, S, H] -> [B, S, H], recording the input
        captured[index[id(layer)]].append(h.reshape(-1, c.hidden).copy())
        return fwd.feedforward(h, layer, c)

    need = max(sizes.tokens)
    rng = np.random.default_rng(seed)
    got = 0
    keep: list[np.ndarray] = []
    while got < need:
        batch = m.tokenize(word_salad(16, rng))
        fwd.encoder(batch["input_ids"], batch["attention_mask"], m.weights, cfg, ffn=hook)
        real = batch["attention_mask"].reshape(-1).astype(bool)
        keep.append(real)
        got += int(real.sum())
    real = np.concatenate(keep)
    acts = [common.as_engine(np.concatenate(c)[real][:need]) for c in captured]   # aligned, as the engine's
    crammed = random_crammed(cfg.layers, cfg.hidden)
    layers = [FFLayer(ly.w_in, ly.b_in, ly.w_out, equal_params(ly.w_in, ly.b_in, ly.w_out), crammed[i])
              for i, ly in enumerate(m.weights.layers)]
    meta = {"source": str(m.source), "weights": "the checkpoint's FFF weights",
            "activations": f"captured LN2 outputs of {need} real tokens (word-salad English texts)"}
    return sizes, layers, acts, meta


_VISITED: dict[tuple[int, int], np.ndarray] = {}   # (id of a layer's w_in, tokens) -> its visited node ids


def visited_nodes(layer: FFLayer, y: np.ndarray, depth: int) -> np.ndarray:
    """The sorted ids of the nodes the walk visits for the tokens y [T, H] in this layer, once
    per (layer, T): the rows it must read."""
    key = (id(layer.w_in), y.shape[0])
    if key not in _VISITED:
        _, routes, _ = fwd.fff(y, layer.w_in, layer.b_in, layer.w_out, depth)
        _VISITED[key] = np.unique(routes).astype(np.int64)
    return _VISITED[key]


@njit(nogil=True, fastmath=True, cache=True)
def _read_rows(y, w_in, w_out, nodes, out):  # y [T, H], visited node ids -> out [T, H] = y + sum of their rows
    """The walk's memory traffic without its work: each visited row of w_in and w_out read once
    (in node order), the input read, the output written. Its time is the walk's memory floor."""
    acc = np.zeros(y.shape[1], np.float32)
    for n in nodes:
        for j in range(y.shape[1]):
            acc[j] += w_in[n, j] + w_out[n, j]
    for t in range(y.shape[0]):
        for j in range(y.shape[1]):
            out[t, j] = y[t, j] + acc[j]
    return out


def read_rows(y: np.ndarray, layer: FFLayer, depth: int) -> np.ndarray:
    """`_read_rows` into a fresh output, as `model.fff` writes one."""
    return _read_rows(y, layer.w_in, layer.w_out, visited_nodes(layer, y, depth), fwd.rows_like(y))


# --- what is timed --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Impl:
    key: str
    run: Callable[[np.ndarray, FFLayer, int], np.ndarray]   # (y [T, H], layer, depth) -> [T, H]
    width: Callable[[FFLayer, int], int]                     # neurons computed per token

    def label(self, layer: FFLayer, depth: int) -> str:
        return {"fff": f"FFF walk ({self.width(layer, depth)} of {layer.w_in.shape[0]} nodes)",
                "dense-equal": f"dense {self.width(layer, depth)} (equal params)",
                "dense-crammed": f"dense {self.width(layer, depth)} (crammedBERT)",
                "rows": "the walk's reads and writes alone, one thread (visited rows once, input, output)"}[self.key]


IMPLS = (
    Impl("fff", lambda y, ly, d: fwd.fff(y, ly.w_in, ly.b_in, ly.w_out, d)[0], lambda ly, d: d + 1),
    Impl("dense-equal", lambda y, ly, d: dense_ff(y, ly.equal), lambda ly, d: ly.equal.width),
    Impl("dense-crammed", lambda y, ly, d: dense_ff(y, ly.crammed), lambda ly, d: ly.crammed.width),
    Impl("rows", read_rows, lambda ly, d: 0),   # the floor: one thread reading what the walk must
)

def paper_setup(layers: list[FFLayer], acts: list[np.ndarray]) -> tuple[list[FFLayer], list[np.ndarray]]:
    """The paper's released benchmark: FFF weights and inputs left at zero, so every z is 0, every
    token goes left at every node (strict >) and the 12 rows of that one path stay in L1. The
    dense baselines keep the first layer's weights: a GEMM takes as long whatever the values."""
    ly = layers[0]
    zero = FFLayer(common.as_engine(np.zeros_like(ly.w_in)), np.zeros_like(ly.b_in),
                   common.as_engine(np.zeros_like(ly.w_out)), ly.equal, ly.crammed)
    return [zero], [common.as_engine(np.zeros_like(acts[0]))]


# case -> (layers, activations) it cycles through
CASES = {
    "hot": lambda layers, acts: (layers[:1], acts[:1]),
    "cycled": lambda layers, acts: (layers, acts),
    "paper": paper_setup,
}


def case_label(case: str, sizes: Sizes) -> str:
    mb = 2 * sizes.nodes * sizes.hidden * 4 / 1e6
    return {"hot": f"one hot layer (the paper's case): the same {fmt(mb)} MB of FFF weights every call",
            "cycled": f"{sizes.layers} distinct layers cycled: {fmt(sizes.layers * mb)} MB of FFF weights, "
                      f"as a forward pass sees them",
            "paper": "the paper's setup: FFF weights and inputs all zero, every token on one path "
                     "(what its 78x measured; not a real workload)"}[case]


def short_label(case: str, sizes: Sizes) -> str:
    mb = 2 * sizes.nodes * sizes.hidden * 4 / 1e6
    return {"hot": "hot: one layer, the paper's case",
            "cycled": f"cycled: {sizes.layers} layers, {fmt(sizes.layers * mb)} MB of FFF weights",
            "paper": "the paper's setup: all zeros, one path"}[case]


def distinct_nodes(layers: list[FFLayer], acts: list[np.ndarray], tokens: int, depth: int) -> list[float]:
    """Distinct nodes visited per level (root first) by the first `tokens` activations, averaged
    over the given layers. Their sum is the number of node rows the walk must load."""
    per_layer = []
    for layer, y in zip(layers, acts):
        level = np.floor(np.log2(visited_nodes(layer, y[:tokens], depth) + 1)).astype(np.int64)   # heap ids
        per_layer.append(np.bincount(level, minlength=depth + 1))
    return [float(x) for x in np.mean(per_layer, axis=0)]




# What a sample's time is: wall-clock, or the calling thread's CPU time (one thread only: then
# the time other processes of a shared machine take the core away is not counted).
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
CLOCK = "wall"


def sampler(impl: Impl, layers: list[FFLayer], acts: list[np.ndarray], tokens: int,
            sizes: Sizes) -> Callable[[], float]:
    """-> a function timing one sample, in seconds per call. Calls cycle through `layers` (one
    for the hot case). A sample repeats a tiny call until it lasts min_sample_s, so timer
    resolution does not matter. The first call here (first touch of this shape; JIT compile was
    done by the warm-up) calibrates that count and is not counted."""
    order = itertools.cycle(range(len(layers)))

    def one():
        i = next(order)
        impl.run(acts[i][:tokens], layers[i], sizes.depth)

    t = CLOCKS[CLOCK]()
    one()
    calls = max(1, math.ceil(sizes.min_sample_s / max(CLOCKS[CLOCK]() - t, 1e-7)))

    def sample() -> float:
        t = CLOCKS[CLOCK]()
        for _ in range(calls):
            one()
        return (CLOCKS[CLOCK]() - t) / calls
    sample.calls = calls
    return sample


def time_points(layers: list[FFLayer], acts: list[np.ndarray], tokens: int, sizes: Sizes) -> dict[str, dict]:
    """Median wall-clock ms per call of every impl on the same inputs. The impls take turns (one
    sample each per round), so a burst of load from other processes on a shared machine hits all
    of them alike and the speedups stay fair. Rounds: at least min_repeats, more while the
    budget lasts."""
    samplers = {impl.key: sampler(impl, layers, acts, tokens, sizes) for impl in IMPLS}
    samples: dict[str, list[float]] = {k: [] for k in samplers}
    start = time.perf_counter()
    while len(samples["fff"]) < sizes.max_repeats and (
            len(samples["fff"]) < sizes.min_repeats or time.perf_counter() - start < sizes.budget_s):
        for key, sample in samplers.items():
            samples[key].append(sample())
    out = {}
    for key, s in samples.items():
        st = common.stats(s)
        out[key] = {"ms": 1e3 * st["median_s"], "min_ms": 1e3 * st["min_s"], "max_ms": 1e3 * st["max_s"],
                    "repeats": st["repeats"], "calls_per_sample": samplers[key].calls}
    return out


def work(impl: Impl, layer: FFLayer, tokens: int, depth: int, distinct: float) -> tuple[float, float]:
    """(useful FLOPs, bytes that must move) of one call. FLOPs: a dot and an axpy of H per
    computed neuron (4H). Bytes: for the walk, the distinct visited rows of w_in and w_out plus
    their biases; for a dense layer every weight; plus the input and output activations.
    Intermediates ([T, F] for dense) are not counted: this is the minimum traffic."""
    h = layer.w_in.shape[1]
    flops = 4.0 * tokens * impl.width(layer, depth) * h
    act_bytes = 2.0 * tokens * h * 4
    if impl.key in ("fff", "rows"):
        return flops, distinct * (2 * h + 1) * 4 + act_bytes
    ff = layer.equal if impl.key == "dense-equal" else layer.crammed
    bias = 0 if ff.b1 is None else ff.b1.size
    return flops, (ff.w1.size + ff.w2.size + bias) * 4.0 + act_bytes


def walked_bytes(tokens: int, sizes: Sizes) -> float:
    """Bytes a token-at-a-time walk loads: 2 rows (+ a bias) per visited node per token, shared
    rows loaded again for every token. Against the minimum traffic of `work`, it shows how much
    grouping tokens by node could save."""
    return tokens * (sizes.depth + 1) * (2 * sizes.hidden + 1) * 4.0 + 2.0 * tokens * sizes.hidden * 4


# --- the run --------------------------------------------------------------------------------------

def measure_bandwidth(sizes: Sizes) -> dict:
    """Read bandwidth at the current thread count: DRAM (a working set beyond the last-level
    cache: the cycled case's floor) and one layer's FFF weights (the hot case's floor)."""
    layer_bytes = 2 * sizes.nodes * sizes.hidden * 4
    return {"dram_gbs": common.stream_bandwidth(sizes.dram_probe_bytes),
            "dram_probe_mb": sizes.dram_probe_bytes / 1e6,
            "layer_set_gbs": common.stream_bandwidth(layer_bytes),
            "layer_set_mb": layer_bytes / 1e6}


def run(sizes: Sizes, layers: list[FFLayer], acts: list[np.ndarray], thread_counts: tuple[int, ...]) -> dict:
    kernels.warmup()
    for impl in IMPLS:                                    # compile / first-touch everything once
        impl.run(acts[0][:2], layers[0], sizes.depth)
    inputs = {case: pick(layers, acts) for case, pick in CASES.items()}   # case -> (layers, acts)
    routing = {case: {t: distinct_nodes(*inputs[case], t, sizes.depth) for t in sizes.tokens} for case in CASES}
    points, bandwidth = [], {}
    for n in thread_counts:
        n_set = threads.set_threads(n)
        bandwidth[n_set] = bw = measure_bandwidth(sizes)
        log(f"threads={n_set}: DRAM {bw['dram_gbs']:.1f} GB/s, {fmt(bw['layer_set_mb'])} MB set {bw['layer_set_gbs']:.1f} GB/s")
        for case in CASES:
            for t in sizes.tokens:
                distinct = sum(routing[case][t])
                with common.OthersCpu() as others:
                    timed = time_points(*inputs[case], t, sizes)
                for impl in IMPLS:
                    p = timed[impl.key]
                    p["others_cpu_cores"] = others.cores
                    flops, nbytes = work(impl, layers[0], t, sizes.depth, distinct)
                    p.update(threads=n_set, case=case, tokens=t, impl=impl.key, flops=flops, bytes=nbytes,
                             gflops=flops / p["ms"] / 1e6, gbs=nbytes / p["ms"] / 1e6)
                    if impl.key == "fff":   # what a token-by-token walk actually streams from cache
                        p["walked_gbs"] = walked_bytes(t, sizes) / p["ms"] / 1e6
                    points.append(p)
                    log(f"  {case:6} T={t:<6} {impl.key:13} {p['ms']:10.3f} ms  ({p['repeats']} x {p['calls_per_sample']})")
    widths = {impl.key: impl.width(layers[0], sizes.depth) for impl in IMPLS}
    return {"points": points, "routing": routing, "bandwidth": bandwidth, "widths": widths}


def derive(res: dict, sizes: Sizes) -> list[dict]:
    """One row per (threads, case, tokens): times side by side, speedups and the ceilings."""
    by = {(p["threads"], p["case"], p["tokens"], p["impl"]): p for p in res["points"]}
    rows = []
    for (n, case, t, impl), p in by.items():
        if impl != "fff":
            continue
        eq, cr = by[(n, case, t, "dense-equal")], by[(n, case, t, "dense-crammed")]
        bw = res["bandwidth"][n]["dram_gbs" if case == "cycled" else "layer_set_gbs"]
        floor_ms = p["bytes"] / bw / 1e6
        rows_ms = by[(n, case, t, "rows")]["ms"] if n == 1 else None
        rows.append({
            "threads": n, "case": case, "tokens": t,
            "fff_ms": p["ms"], "dense_equal_ms": eq["ms"], "dense_crammed_ms": cr["ms"],
            "speedup_vs_equal": eq["ms"] / p["ms"], "speedup_vs_crammed": cr["ms"] / p["ms"],
            "flop_ceiling_vs_equal": sizes.nodes / (sizes.depth + 1),
            "flop_ceiling_vs_crammed": res["widths"]["dense-crammed"] / (sizes.depth + 1),
            "fff_gbs": p["gbs"], "fff_walked_gbs": p["walked_gbs"], "fff_gflops": p["gflops"],
            "dense_equal_gflops": eq["gflops"], "dense_crammed_gflops": cr["gflops"],
            "fff_bytes": p["bytes"], "bandwidth_gbs": bw, "fff_floor_ms": floor_ms,
            "fff_fraction_of_floor": floor_ms / p["ms"],
            "mem_ceiling_vs_equal": eq["ms"] / floor_ms,
            # measured floor (one thread: a floor for one-thread rows only)
            "rows_ms": rows_ms, "rows_ceiling_vs_equal": eq["ms"] / rows_ms if rows_ms else None,
            "fff_fraction_of_rows": rows_ms / p["ms"] if rows_ms else None,
            "distinct_nodes": sum(res["routing"][case][t]),
            "others_cpu_cores": p["others_cpu_cores"],
        })
    return rows


# --- reporting ------------------------------------------------------------------------------------

def markdown(rows: list[dict], res: dict, sizes: Sizes, meta: dict) -> str:
    w_eq, w_cr = res["widths"]["dense-equal"], res["widths"]["dense-crammed"]
    ceiling = sizes.nodes / (sizes.depth + 1)
    out = [f"# FF layer: FFF walk vs dense GEMM (H = {sizes.hidden}, depth {sizes.depth}, {sizes.nodes} nodes)", "",
           f"Inputs: {meta['activations']}; weights: {meta['weights']}. "
           f"{'Wall-clock' if CLOCK == 'wall' else 'Thread CPU time,'} ms per call, median of "
           f"repeats after warm-up. Speedup = dense ms / FFF ms. FLOP ceiling: {ceiling:.0f}x vs dense {w_eq}, "
           f"{w_cr / (sizes.depth + 1):.0f}x vs dense {w_cr}. Memory floor = bytes the walk must read "
           f"(distinct visited rows x 2 x {sizes.hidden * 4 / 1e3:.1f} KB + activations) / measured read "
           f"bandwidth (hot: a {fmt(res['bandwidth'][min(res['bandwidth'])]['layer_set_mb'])} MB set; "
           f"cycled: DRAM). 'mem ceiling' = dense {w_eq} ms / FFF floor ms. 'Reads alone': the time one "
           f"thread takes to read each visited row once, read the input and write a fresh output, taking "
           f"turns with the others (`read_rows`): the walk's memory floor, measured; 'their ceiling' = dense "
           f"{w_eq} ms / that time. FFF GB/s: bytes that must be read "
           f"(each visited row once) / time, and bytes a token-at-a-time walk loads (rows again for every "
           f"token) / time. Others' CPUs: how many CPUs other processes kept busy while a row was measured "
           f"(a shared machine: the larger, the noisier; the implementations take turns, so a row's ratios "
           f"stay fair).", ""]
    for n in sorted(res["bandwidth"]):
        bw = res["bandwidth"][n]
        for case in CASES:
            sel = [r for r in rows if r["threads"] == n and r["case"] == case]
            out += [f"## {n} thread{'s' if n > 1 else ''}, {case_label(case, sizes)}", "",
                    f"Read bandwidth: {bw['layer_set_gbs']:.1f} GB/s ({fmt(bw['layer_set_mb'])} MB set), "
                    f"{bw['dram_gbs']:.1f} GB/s (DRAM).", ""]
            out.append(common.md_table(
                ["tokens", "FFF ms", f"dense {w_eq} ms", f"dense {w_cr} ms", f"speedup vs {w_eq}",
                 f"speedup vs {w_cr}", "FFF GB/s (needed / as walked)", "FFF floor ms", "FFF % of floor",
                 f"mem ceiling vs {w_eq}", "reads alone ms", f"their ceiling vs {w_eq}",
                 f"GFLOP/s FFF / {w_eq} / {w_cr}", "distinct nodes", "others' CPUs"],
                [[r["tokens"], fmt(r["fff_ms"]), fmt(r["dense_equal_ms"]), fmt(r["dense_crammed_ms"]),
                  fmt(r["speedup_vs_equal"]) + "x", fmt(r["speedup_vs_crammed"]) + "x",
                  f"{fmt(r['fff_gbs'])} / {fmt(r['fff_walked_gbs'])}",
                  fmt(r["fff_floor_ms"]), f"{100 * r['fff_fraction_of_floor']:.0f}%",
                  fmt(r["mem_ceiling_vs_equal"]) + "x",
                  fmt(r["rows_ms"]) if r["rows_ms"] else "-",
                  fmt(r["rows_ceiling_vs_equal"]) + "x" if r["rows_ms"] else "-",
                  f"{fmt(r['fff_gflops'])} / {fmt(r['dense_equal_gflops'])} / {fmt(r['dense_crammed_gflops'])}",
                  f"{r['distinct_nodes']:.0f}", fmt(r["others_cpu_cores"], 2)] for r in sel]))
            out.append("")
    out += ["## Routing: distinct nodes touched per level (root first)", ""]
    levels = list(range(sizes.depth + 1))
    out.append(common.md_table(["case", "tokens"] + [f"L{lv}" for lv in levels] + ["total", f"of {sizes.nodes}"],
                               [[case, t] + [f"{x:.0f}" for x in res["routing"][case][t]]
                                + [f"{sum(res['routing'][case][t]):.0f}",
                                   f"{100 * sum(res['routing'][case][t]) / sizes.nodes:.0f}%"]
                                for case in CASES for t in sizes.tokens]))
    out.append("")
    return "\n".join(out)


def plot(rows: list[dict], res: dict, sizes: Sizes, path: Path) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    w_eq, w_cr = res["widths"]["dense-equal"], res["widths"]["dense-crammed"]
    fig, axes = plt.subplots(1, len(CASES), figsize=(15, 4.2), sharey=True)
    for ax, case in zip(axes, CASES):
        for n in sorted(res["bandwidth"]):
            sel = sorted((r for r in rows if r["threads"] == n and r["case"] == case), key=lambda r: r["tokens"])
            t = [r["tokens"] for r in sel]
            ax.plot(t, [r["speedup_vs_equal"] for r in sel], "o-", label=f"vs dense {w_eq}, {n} thr")
            ax.plot(t, [r["speedup_vs_crammed"] for r in sel], "s--", label=f"vs dense {w_cr}, {n} thr")
            if n == max(res["bandwidth"]):
                ax.plot(t, [r["mem_ceiling_vs_equal"] for r in sel], ":", color="grey",
                        label=f"memory-floor ceiling vs dense {w_eq}, {n} thr")
        ax.axhline(sizes.nodes / (sizes.depth + 1), color="red", lw=1,
                   label=f"FLOP limit vs {w_eq} ({sizes.nodes / (sizes.depth + 1):.0f}x)")
        ax.axhline(1, color="black", lw=0.5)
        ax.set(xscale="log", yscale="log", xlabel="tokens per call", title=short_label(case, sizes))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup of the FFF walk (dense ms / FFF ms)")
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"FF layer, H={sizes.hidden}, depth {sizes.depth}: ufcpu FFF vs NumPy/BLAS dense", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default=None, help="thread counts to run (default 1,2; --smoke: 1)")
    ap.add_argument("--model", default=None,
                    help="a checkpoint (Hub id or folder): use its FFF weights and captured activations")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="results folder (default bench/results)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks the script runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="wall-clock (default), or the calling thread's CPU time (needs --threads 1)")
    ap.add_argument("--name", default=None,
                    help="results file name without suffix (default ff_layer-<cpu>, e.g. ff_layer-znver4; "
                         "--smoke: ff_layer)")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = args.clock
    if CLOCK == "thread" and common.parse_ints(args.threads or "1") != (1,):
        ap.error("--clock thread measures one thread's CPU time: use it with --threads 1")
    sizes = SMOKE if args.smoke else FULL
    started = time.perf_counter()
    info = common.machine_info()
    if args.model:
        sizes, layers, acts, meta = captured_inputs(args.model, sizes, args.seed)
    else:
        layers, acts, meta = random_inputs(sizes, args.seed)
    log(f"inputs ready ({meta['source']}): {sizes.layers} layers, T up to {max(sizes.tokens)}")
    res = run(sizes, layers, acts, common.parse_ints(args.threads or ("1" if args.smoke else "1,2")))
    rows = derive(res, sizes)
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("ff_layer" if args.smoke else f"ff_layer-{common.cpu_slug(info)}")
    png = args.out / f"{name}.png"
    plotted = plot(rows, res, sizes, png)
    md = markdown(rows, res, sizes, meta)
    title, rest = md.split("\n", 1)
    md = (f"{title}\n\nCPU: {info['cpu_model']} (LLVM: {info.get('llvm_host_cpu')}; family/model/stepping "
          f"{'/'.join(str(v) for v in info.get('cpu_family_model_stepping', []))}), flags "
          f"{' '.join(info['simd_flags'])}.\n{rest}")
    if not plotted:
        md += "\n(plot skipped: matplotlib is not installed)\n"
    info["loadavg_at_end"] = common.loadavg()
    info["threads"] = common.ufcpu_threads()
    common.write_json(args.out / f"{name}.json", {
        "benchmark": "ff_layer", "smoke": args.smoke, "clock": CLOCK, "machine": info,
        "sizes": dataclasses.asdict(sizes),
        "inputs": meta, "cases": {c: case_label(c, sizes) for c in CASES},
        "impls": {impl.key: impl.label(layers[0], sizes.depth) for impl in IMPLS},
        "thread_control": "ufcpu.threads.set_threads(n): OpenBLAS's pool and ufcpu's helper threads",
        "bandwidth": res["bandwidth"], "routing_distinct_nodes_per_level": res["routing"],
        "widths": res["widths"], "points": res["points"], "rows": rows,
        "plot": png.name if plotted else None, "wall_s": time.perf_counter() - started})
    common.write_text(args.out / f"{name}.md", md)
    print(md)
    log(f"wrote {args.out / name}.json, .md{', .png' if plotted else ''} "
        f"in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
