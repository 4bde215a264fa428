"""This checkout's kernels against those of another git revision, each kernel alone on the
calling thread (no helpers), the two alternating call by call: for changes to a kernel's code that
must not change its speed. Median thread CPU time per call (less disturbed than wall-clock time
by the other processes of a shared machine), and the ratio this/other.

    python bench/kernels_ab.py REVISION [--repeats 300] [--kernels fff_walk,layer_norm]
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import ufcpu  # noqa: F401  (before NumPy, as for any user)
import numpy as np

from ufcpu import kernels as here

ROOT = Path(__file__).resolve().parent.parent
f32 = np.float32
H, DEPTH = 768, 11


def other_kernels(revision: str):
    """ufcpu/ of `revision`, unpacked as the package `ufcpu_ab` -> its kernels module."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "ufcpu"], capture_output=True, check=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="ufcpu-ab-"))
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "ufcpu").rename(folder / "ufcpu_ab")
    sys.path.insert(0, str(folder))
    return importlib.import_module("ufcpu_ab.kernels")


def cases(k, rng) -> dict:
    """name -> (kernel, arguments without the state), full-size shapes."""
    n = 2 ** (DEPTH + 1) - 1
    w_in = (rng.standard_normal((n, H), dtype=f32) / np.sqrt(H)).astype(f32)
    b_in = (0.3 * rng.standard_normal(n, dtype=f32)).astype(f32)
    w_out = (rng.standard_normal((n, H), dtype=f32) / np.sqrt(n)).astype(f32)

    def walk(t):
        return (rng.standard_normal((t, H), dtype=f32), w_in, b_in, w_out, DEPTH, np.empty((t, H), f32),
                np.empty((t, DEPTH + 1), np.int32), np.empty((t, DEPTH + 1), f32))
    return {
        "matmul_nt": (k.matmul_nt, (rng.standard_normal((11, H), dtype=f32), rng.standard_normal((2304, H), dtype=f32),
                                    np.empty((11, 2304), f32))),
        "fff_walk": (k.fff_walk, walk(128)),
        "fff_walk_2048": (k.fff_walk, walk(2048)),
        "layer_norm": (k.layer_norm, (rng.standard_normal((1024, H), dtype=f32), np.ones(H, f32), np.zeros(H, f32),
                                      f32(1e-12), np.empty((1024, H), f32))),
        "attention_heads": (getattr(k, "attention_heads", None), (rng.standard_normal((128, 3 * H), dtype=f32),
                                                                  np.zeros((1, 128), f32), f32(0.125), 12,
                                                                  np.empty((128, H), f32))),
        "gelu_": (k.gelu_, (rng.standard_normal((128, 3072), dtype=f32),)),
    }


def cpu_us(kernel, args, inner: int = 5) -> float:
    t0 = time.thread_time()
    for _ in range(inner):
        kernel(*args, np.zeros(4, np.int64))
    return (time.thread_time() - t0) / inner * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("revision")
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--kernels", default=None, help="comma-separated case names (default: all)")
    args = ap.parse_args()
    other = other_kernels(args.revision)
    mine, theirs = cases(here, np.random.default_rng(0)), cases(other, np.random.default_rng(0))
    names = args.kernels.split(",") if args.kernels else list(mine)
    for name in names:
        if mine[name][0] is None or theirs[name][0] is None:    # a kernel one of the two revisions lacks
            print(f"{name:16s} skipped: not in both revisions", flush=True)
            continue
        for k, a in (mine[name], theirs[name]):
            k(*a, np.zeros(4, np.int64))                     # compile or load, untimed
        t = {"this": [], "other": []}
        for r in range(args.repeats):
            order = (("this", mine), ("other", theirs)) if r % 2 else (("other", theirs), ("this", mine))
            for tag, c in order:
                t[tag].append(cpu_us(*c[name]))
        a, b = statistics.median(t["this"]), statistics.median(t["other"])
        print(f"{name:16s} this {a:9.1f} us  {args.revision} {b:9.1f} us  this/other {a / b:.3f}", flush=True)


if __name__ == "__main__":
    main()
