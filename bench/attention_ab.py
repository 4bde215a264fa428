"""Attention per layer, this checkout against another git revision: `model.self_attention` of each
(the score and context products and the softmax; the projections are not timed), on the same QKV
output, which a QKV product writes just before every call as in a forward pass. The two alternate
call by call; medians of wall-clock time, and at 1 thread also of the calling thread's CPU time
(less disturbed by the other processes of a shared machine). Results print as one line per case.

    python bench/attention_ab.py [REVISION] [--threads 1,2] [--cases 1x16,1x128,8x128,32x128,1x512]

Cases are SEQUENCESxTOKENS of the full model's width (768, 12 heads); longer than its 128
positions is fine here, since only attention runs.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import time

import ufcpu  # noqa: F401  (before NumPy, as for any user)
import numpy as np

from ufcpu import model as this_model, threads as this_threads
from ufcpu.config import Config
from kernels_ab import other_kernels   # unpacks another revision's ufcpu/ as ufcpu_ab

f32 = np.float32
H, HEADS = 768, 12


def other_package(revision: str):
    """ufcpu/ of `revision`, unpacked as the package `ufcpu_ab` -> (its model, its threads)."""
    other_kernels(revision)
    return importlib.import_module("ufcpu_ab.model"), importlib.import_module("ufcpu_ab.threads")


def uniform(self_attention):
    """-> fn(qkv [n, S, 3H], bias [n, S], layer, cfg) for either signature of model.self_attention:
    with the sequences' spans (one launch for any lengths) or without (n sequences of one length)."""
    if "seqs" not in inspect.signature(self_attention).parameters:
        return self_attention
    spans = this_model.spans
    return lambda qkv, bias, layer, cfg: self_attention(qkv.reshape(-1, qkv.shape[-1]),
                                                         spans(np.full(qkv.shape[0], qkv.shape[1]), qkv.shape[1]),
                                                         bias, layer, cfg)


def measure(fns: dict, n: int, s: int, rng) -> tuple[dict, dict, int]:
    """-> (wall seconds, CPU seconds, repeats) per name, medians over alternating repeats."""
    cfg = Config(layers=1, hidden=H, heads=HEADS, vocab=10, depth=1)
    layer = type("Layer", (), {"norm_factor": f32(0.125)})()
    bias = np.zeros((n, s), f32)
    h = rng.standard_normal((n * s, H), dtype=f32) * f32(0.5)
    w = rng.standard_normal((3 * H, H), dtype=f32) * f32(1 / 28)
    qkv = np.empty((n, s, 3 * H), f32)
    np.matmul(h, w.T, out=qkv.reshape(n * s, -1))
    results = [fn(qkv, bias, layer, cfg) for fn in fns.values()]
    assert all(np.abs(r - results[0]).max() < 1e-5 for r in results)
    repeats = max(5, min(40, int(4e6 / (n * s * s))))
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            np.matmul(h, w.T, out=qkv.reshape(n * s, -1))       # untimed, as the product before attention
            w0, c0 = time.perf_counter(), time.thread_time()
            fns[name](qkv, bias, layer, cfg)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.thread_time() - c0)
    return ({k: float(np.median(v)) for k, v in wall.items()}, {k: float(np.median(v)) for k, v in cpu.items()},
            repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("revision", nargs="?", default="main")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--cases", default="1x16,1x128,8x128,32x128,1x512")
    args = ap.parse_args()
    other_model, other_threads = other_package(args.revision)
    fns = {"this": uniform(this_model.self_attention), args.revision: uniform(other_model.self_attention)}
    rng = np.random.default_rng(0)
    for t in map(int, args.threads.split(",")):
        for n, s in (tuple(map(int, c.split("x"))) for c in args.cases.split(",")):
            with other_threads.calls(t), this_threads.calls(t):
                wall, cpu, repeats = measure(fns, n, s, rng)
            a, b = wall["this"], wall[args.revision]
            line = (f"{t} thread(s) {n} x {s}: wall this {1e3 * a:.3f} ms, {args.revision} {1e3 * b:.3f} ms "
                    f"per layer, {args.revision}/this {b / a:.2f}x")
            if t == 1:
                line += (f"; CPU this {1e3 * cpu['this']:.3f} ms, {args.revision} {1e3 * cpu[args.revision]:.3f} ms, "
                         f"{cpu[args.revision] / cpu['this']:.2f}x")
            print(line + f" ({repeats} repeats)", flush=True)


if __name__ == "__main__":
    main()
