"""The memory hierarchy of one core, as the tree walk sees it: load latency and stream bandwidth.

- Latency: a pointer chase (each load's address is the previous load's value, in a random cyclic
  order of 64-byte lines) over working sets from 16 KB to 512 MB: ns per dependent load, i.e. the
  L1, L2, L3 and DRAM latencies (the route sweep's dependent row loads wait on these).
- Bandwidth, one core: a read-only sum, a store-only fill and a copy over working sets from 32 KB
  to 512 MB, GB/s (the output sweep writes a [T, 768] float32 output: 50 MB at 16384 tokens).
- Clock: the time of a chain of dependent integer adds (1 cycle each), to turn ns into cycles in
  a virtual machine where hardware counters cannot be read.
Every time is this thread's CPU time, so the time other processes of a shared machine hold the
core is left out (what they do to the shared caches and memory is not).

    python bench/memory.py [--out DIR] [--smoke]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import ufcpu  # noqa: F401  (before NumPy, as for any user)
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import fmt, log  # noqa: E402

LINE = 64
_k = None


def probes():
    """(chase, read_sum, fill, copy, add_chain), compiled on first use (bench/__pycache__)."""
    global _k
    if _k is None:
        from numba import njit

        @njit(nogil=True, cache=True)
        def chase(nxt, steps):  # nxt [n] int64, a cycle of line indices -> the index reached
            i = 0
            for _ in range(steps):
                i = nxt[i * 8]   # 8 int64 per 64-byte line: one line per step
            return i

        @njit(nogil=True, fastmath=True, cache=True)
        def read_sum(a):  # [n] float32 -> float32, every element read once
            s = np.float32(0.0)
            for i in range(a.shape[0]):
                s += a[i]
            return s

        @njit(nogil=True, cache=True)
        def fill(a, v):  # [n] float32, every element written once
            for i in range(a.shape[0]):
                a[i] = v

        @njit(nogil=True, cache=True)
        def copy(src, dst):  # [n] float32 -> dst
            for i in range(src.shape[0]):
                dst[i] = src[i]

        @njit(nogil=True, cache=True)
        def add_chain(n, k):  # n dependent adds of a value the compiler cannot fold
            x = k
            for _ in range(n):
                x = (x + k) ^ (x >> 63)
            return x
        _k = (chase, read_sum, fill, copy, add_chain)
    return _k


def chase_array(nbytes: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [nbytes / 8]: line i's first word holds the next line of one random cycle over all lines."""
    lines = max(2, nbytes // LINE)
    order = rng.permutation(lines)
    nxt = np.zeros(lines * 8, np.int64)
    nxt[order * 8] = np.roll(order, -1)
    return nxt


def latency_ns(nbytes: int, rng: np.random.Generator, min_s: float) -> float:
    chase = probes()[0]
    nxt = chase_array(nbytes, rng)
    lines = nxt.size // 8
    chase(nxt, lines)                        # warm: every line once, TLB and caches filled
    steps = max(lines, 1 << 16)
    best = float("inf")
    for _ in range(3):
        t = time.thread_time()
        chase(nxt, steps)
        dt = time.thread_time() - t
        best = min(best, dt / steps)
        if dt > min_s:
            steps = max(lines, int(steps * min_s / dt))
    return best * 1e9


def bandwidth_gbs(kind: str, nbytes: int, min_s: float) -> float:
    """Best GB/s of three timed runs, each a repeat of passes lasting about min_s (bytes moved:
    read for `read`, written for `fill`, read + written for `copy`)."""
    _, read_sum, fill, copy, _ = probes()
    a = np.ones(max(16, nbytes // 4), np.float32)
    b = np.ones_like(a) if kind == "copy" else None
    run = {"read": lambda: read_sum(a), "fill": lambda: fill(a, np.float32(2.0)),
           "copy": lambda: copy(a, b)}[kind]
    run()
    reps = max(1, int(2e8 // a.nbytes))
    best = float("inf")
    for _ in range(3):
        t = time.thread_time()
        for _ in range(reps):
            run()
        best = min(best, (time.thread_time() - t) / reps)
    moved = a.nbytes * (2 if kind == "copy" else 1)
    return moved / best / 1e9


def clock_ghz(n: int = 200_000_000) -> float:
    """Dependent adds per ns: one add and one xor-shift per step, 2 cycles at 1 cycle each."""
    add_chain = probes()[4]
    add_chain(1000, 3)
    best = float("inf")
    for _ in range(3):
        t = time.thread_time()
        add_chain(n, 3)
        best = min(best, time.thread_time() - t)
    return 2 * n / best / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="results folder (default bench/results)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    info = common.machine_info()
    rng = np.random.default_rng(0)
    kb = 1 << 10
    sizes = [16 * kb, 64 * kb] if args.smoke else [16 * kb, 32 * kb, 64 * kb, 256 * kb, 512 * kb, 1024 * kb,
                                                   2048 * kb, 4096 * kb, 8192 * kb, 16384 * kb, 32768 * kb,
                                                   65536 * kb, 131072 * kb, 524288 * kb]
    min_s = 0.01 if args.smoke else 0.2
    ghz = clock_ghz(1_000_000 if args.smoke else 200_000_000)
    log(f"clock ~{ghz:.2f} GHz (dependent adds)")
    rows = []
    with common.OthersCpu() as others:
        for n in sizes:
            lat = latency_ns(n, rng, min_s)
            bw = {k: bandwidth_gbs(k, max(n, 32 * kb), min_s) for k in ("read", "fill", "copy")}
            rows.append({"bytes": n, "latency_ns": lat, "latency_cycles": lat * ghz,
                         **{f"{k}_gbs": v for k, v in bw.items()}})
            log(f"  {n // kb:>7} KB  {lat:7.2f} ns  read {bw['read']:6.1f}  fill {bw['fill']:6.1f}  "
                f"copy {bw['copy']:6.1f} GB/s")
    slug = common.cpu_slug(info)
    md = ["# Memory hierarchy of one core", "",
          f"CPU: {info['cpu_model']} (LLVM: {info['llvm_host_cpu']}); caches {info['caches']}. Clock "
          f"estimate {ghz:.2f} GHz from a chain of dependent adds. Latency: pointer chase over a random "
          f"cycle of 64-byte lines (best of 3). Bandwidth: one thread, best of 3; copy counts read + "
          f"written bytes. Others' CPUs during the run: {fmt(others.cores, 2)}.", "",
          common.md_table(["working set", "latency ns", "latency cycles", "read GB/s", "fill GB/s", "copy GB/s"],
                          [[f"{r['bytes'] // kb} KB", fmt(r["latency_ns"]), fmt(r["latency_cycles"]),
                            fmt(r["read_gbs"]), fmt(r["fill_gbs"]), fmt(r["copy_gbs"])] for r in rows]), ""]
    info["loadavg_at_end"] = common.loadavg()
    common.write_json(args.out / f"memory-{slug}.json", {
        "benchmark": "memory", "smoke": args.smoke, "machine": info, "clock_ghz_estimate": ghz,
        "others_cpu_cores": others.cores, "rows": rows, "wall_s": time.perf_counter() - started})
    common.write_text(args.out / f"memory-{slug}.md", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
