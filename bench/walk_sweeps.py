"""Where the tree walk's time goes: the route sweep and the output sweep timed apart, on one thread.

`kernels.fff_walk` runs two sweeps over the tokens: every token's route (`_fff_route_tile`, 16
tokens at a time), then every token's output (`_fff_output`, 16 tokens at a time). This script times each sweep alone
(a loop over the same functions the walk calls), the whole walk on preallocated buffers, and
`model.fff` as the FF-layer bench and the engine call it (fresh output buffers every call, so the
page faults of a fresh 50 MB output at 16384 tokens are counted there and only there). Cases:
`hot` (random routing, one layer whose weights stay in cache) and `paper` (weights and inputs all
zero, one path, the paper's setup). The variants take turns sample by sample, so a burst of load
from other processes hits them alike; medians are reported.

    python bench/walk_sweeps.py [--tokens 128,2048,16384] [--rounds 9] [--out DIR] [--smoke]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import ufcpu  # noqa: F401  (before NumPy, as for any user)
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import fmt, log  # noqa: E402

from ufcpu import kernels, threads  # noqa: E402
from ufcpu import model as fwd  # noqa: E402

f32 = np.float32
_drivers = None


def drivers():
    """(route_sweep, output_sweep): plain loops over the walk's own per-tile and per-token
    functions in ufcpu/kernels.py, compiled on first use (bench/__pycache__, git-ignored)."""
    global _drivers
    if _drivers is None:
        from numba import njit

        @njit(nogil=True, cache=True)
        def route_sweep(x, w_in, b_in, depth, routes, logits):  # [T, H] -> routes, logits [T, D+1]
            size = kernels.route_tile(x.shape[0], kernels.ROUTE_TILE_MAX, 1)
            for tile in range((x.shape[0] + size - 1) // size):
                kernels._fff_route_tile(x, w_in, b_in, depth, routes, logits, tile, size)

        @njit(nogil=True, cache=True)
        def output_sweep(w_out, depth, routes, logits, out, order):  # routes, logits [T, D+1] -> out [T, H]
            g = np.empty((kernels.OUTPUT_BLOCK, depth + 1), np.float32)
            for i in range(0, out.shape[0], kernels.OUTPUT_BLOCK):
                kernels._fff_output(w_out, routes, logits, out, order[i:i + kernels.OUTPUT_BLOCK], g)
        _drivers = (route_sweep, output_sweep)
    return _drivers


def layer(case: str, tokens: int, hidden: int, depth: int, seed: int) -> tuple:
    """-> (x [T, H], w_in [N, H], b_in [N], w_out [N, H]), weights read-only as the engine maps
    them. hot: the FF-layer bench's scales (routes spread over the tree); paper: all zeros, written
    (not calloc's shared zero page), so memory behaves as for real values."""
    n = 2 ** (depth + 1) - 1
    rng = np.random.default_rng(seed)
    if case == "paper":
        arrays = [np.full((tokens, hidden), 0, f32), np.full((n, hidden), 0, f32), np.full(n, 0, f32),
                  np.full((n, hidden), 0, f32)]
    else:
        x = rng.standard_normal((tokens, hidden), dtype=f32)
        x -= x.mean(axis=1, keepdims=True)
        x /= x.std(axis=1, keepdims=True)
        arrays = [x, rng.standard_normal((n, hidden), dtype=f32) * f32(1 / math.sqrt(hidden)),
                  rng.standard_normal(n, dtype=f32) * f32(0.3),
                  rng.standard_normal((n, hidden), dtype=f32) * f32(1 / math.sqrt(n))]
    arrays = [a if a.ndim == 1 else common.as_engine(a) for a in arrays]   # rows on cache lines, as in the engine
    for a in arrays[1:]:
        a.flags.writeable = False
    return tuple(arrays)


def variants(x, w_in, b_in, w_out, depth) -> dict:
    """name -> a function running it once. All write the same buffers except `model.fff`."""
    route_sweep, output_sweep = drivers()
    t = x.shape[0]
    out = np.zeros_like(x)
    routes = np.zeros((t, depth + 1), np.int32)
    logits = np.zeros((t, depth + 1), f32)
    return {
        "walk": lambda: threads.run_here(kernels.fff_walk, x, w_in, b_in, w_out, depth, out, routes, logits),
        "route": lambda: route_sweep(x, w_in, b_in, depth, routes, logits),
        "output": lambda: output_sweep(w_out, depth, routes, logits, out, np.arange(t, dtype=np.int32)),
        "output by leaf": lambda: output_sweep(w_out, depth, routes, logits, out,
                                               kernels._leaf_order(routes, depth, 0)),
        "model.fff": lambda: fwd.fff(x, w_in, b_in, w_out, depth),
    }


def time_case(fns: dict, rounds: int, min_sample_s: float) -> dict:
    """name -> {ms: median of this thread's CPU time per call, wall_ms: median wall-clock,
    min_ms, repeats}: one sample of each variant per round. Everything runs on this thread, so
    its CPU time leaves out the time other processes of a shared machine hold the core."""
    for f in fns.values():
        f()
    calls = {}
    for name, f in fns.items():
        t = time.perf_counter()
        f()
        calls[name] = max(1, math.ceil(min_sample_s / max(time.perf_counter() - t, 1e-7)))
    cpu: dict[str, list[float]] = {n: [] for n in fns}
    wall: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t, c = time.perf_counter(), time.thread_time()
            for _ in range(calls[name]):
                f()
            cpu[name].append((time.thread_time() - c) / calls[name])
            wall[name].append((time.perf_counter() - t) / calls[name])
    return {n: {"ms": 1e3 * float(np.median(cpu[n])), "min_ms": 1e3 * min(cpu[n]),
                "wall_ms": 1e3 * float(np.median(wall[n])), "repeats": len(cpu[n]),
                "calls_per_sample": calls[n]} for n in fns}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default=None, help="token counts (default 128,2048,16384; --smoke: 16,64)")
    ap.add_argument("--rounds", type=int, default=None, help="samples per variant (default 9)")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="results folder (default bench/results)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks the script runs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    hidden, depth = (64, 4) if args.smoke else (768, 11)
    tokens = common.parse_ints(args.tokens or ("16,64" if args.smoke else "128,2048,16384"))
    rounds = args.rounds or (1 if args.smoke else 9)
    started = time.perf_counter()
    info = common.machine_info()
    threads.set_threads(1)
    kernels.warmup()
    rows = []
    for case in ("paper", "hot"):
        for t in tokens:
            fns = variants(*layer(case, t, hidden, depth, args.seed), depth)
            with common.OthersCpu() as others:
                timed = time_case(fns, rounds, 0.0 if args.smoke else 0.05)
            row = {"case": case, "tokens": t, "others_cpu_cores": others.cores,
                   **{f"{n}_ms": v["ms"] for n, v in timed.items()}, "timings": timed}
            row["us_per_token"] = {n: 1e3 * v["ms"] / t for n, v in timed.items()}
            rows.append(row)
            log(f"  {case:5} T={t:<6} " + "  ".join(f"{n} {v['ms']:.3f}" for n, v in timed.items()) + " ms")
    slug = common.cpu_slug(info)
    md = ["# Tree walk by sweep, 1 thread", "",
          f"CPU: {info['cpu_model']} (LLVM: {info['llvm_host_cpu']}). H = {hidden}, depth {depth}. ms per call of "
          f"this thread's CPU time (wall-clock in the JSON), median of {rounds} samples; the variants take "
          f"turns. walk = `fff_walk` on preallocated buffers; "
          f"route / output = each sweep alone, the outputs in token order and (sort included) in leaf "
          f"order, which `fff_walk` takes from {kernels.LEAF_ORDER_MIN} tokens on this CPU; model.fff = "
          f"fresh output buffers every call, as the FF-layer bench measures it.", "",
          common.md_table(["case", "tokens", "walk ms", "route ms", "output ms", "output by leaf ms",
                           "model.fff ms", "us/token walk", "others' CPUs"],
                          [[r["case"], r["tokens"], fmt(r["walk_ms"]), fmt(r["route_ms"]), fmt(r["output_ms"]),
                            fmt(r["output by leaf_ms"]), fmt(r["model.fff_ms"]), fmt(r["us_per_token"]["walk"]),
                            fmt(r["others_cpu_cores"], 2)]
                           for r in rows]), ""]
    info["loadavg_at_end"] = common.loadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / f"walk_sweeps-{slug}.json", {
        "benchmark": "walk_sweeps", "smoke": args.smoke, "machine": info, "hidden": hidden, "depth": depth,
        "rounds": rounds, "rows": rows, "wall_s": time.perf_counter() - started})
    common.write_text(args.out / f"walk_sweeps-{slug}.md", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
