"""Kernel-level measurements behind two of ufcpu's choices, so that they can be checked on any machine:

- `shared`: each kernel (ufcpu/kernels.py) on the calling thread alone against `threads.run`,
  where helper threads join it, at growing sizes, with a BLAS product before every call as in the
  forward pass (every kernel there follows a GEMM). The size from which helpers pay off is the
  threshold in `kernels._SHARED`.
- `products`: x @ w.T for a few tokens (M = 1..256; w [N, 768] with N = 2304 for QKV and 768 for
  the output projection): OpenBLAS against `kernels.matmul_nt`, both as `model.linear` calls them,
  over 16 distinct weight matrices so that weights stream from memory as in a forward pass. The
  token count up to which the kernel wins is `model.SMALL_PRODUCT_TOKENS`.
- `int8`: the same products (M = 1, 11, 16, 128, 1024) at 1 and 2 threads in GOPS (2 M N K / s):
  float32 OpenBLAS and `kernels.matmul_nt` against `quant.linear` with each int8 product this CPU
  runs (the activations' quantization included), next to the CPU's int8 and float32 peaks, and the
  GB/s of int8 weights the fastest one reads. `--ab REV` adds the int8 products of git revision
  REV (its ufcpu/ unpacked beside this one), taking turns with this checkout's.

Microseconds per call, medians of repeats, one process, the variants taking turns.

    python bench/kernels.py [--threads 2] [--out DIR] [--smoke] [--only int8] [--ab REV]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import ufcpu  # noqa: F401  (before NumPy: ufcpu settles OpenBLAS's idle workers, as for any user)
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import fmt, log  # noqa: E402

from ufcpu import kernels, quant, settings, threads  # noqa: E402
from ufcpu import model as fwd  # noqa: E402

f32 = np.float32
H, HEADS, DEPTH = 768, 12, 11


def per_call_us(fn, before, repeats: int) -> float:
    """Median wall-clock microseconds of fn(), with before() (untimed) ahead of every call."""
    fn()
    samples = []
    for _ in range(repeats):
        before()
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return 1e6 * float(np.median(samples))


def gemm_before(tokens: int, rng: np.random.Generator):
    """-> a function doing the BLAS product of `tokens` rows that precedes every kernel in a forward pass."""
    y = rng.standard_normal((tokens, H), dtype=f32)
    w = rng.standard_normal((H, H), dtype=f32)
    return lambda: y @ w.T


def shared_cases(tokens: int, rng: np.random.Generator, tree) -> dict:
    """kernel name -> (kernel, arguments without the state) for `tokens` rows of width H, as the
    forward pass calls them (attention: tokens // 128 sequences of 128, or one shorter)."""
    w_in, b_in, w_out = tree
    x = rng.standard_normal((tokens, H), dtype=f32)
    seqs, s = max(tokens // 128, 1), min(tokens, 128)
    return {
        "layer_norm": (kernels.layer_norm, (x, np.ones(H, f32), np.zeros(H, f32), f32(1e-12), np.empty_like(x))),
        "attention_heads": (kernels.attention_heads, (rng.standard_normal((seqs * s, 3 * H), dtype=f32),
                                                      fwd.spans(np.full(seqs, s), s), np.zeros((seqs, s), f32),
                                                      f32(0.125), HEADS,
                                                      np.empty((seqs * s, H), f32))),
        "gelu_": (kernels.gelu_, (rng.standard_normal((tokens, 4 * H), dtype=f32),)),
        "fff_walk": (kernels.fff_walk, (x, w_in, b_in, w_out, DEPTH, np.empty_like(x),
                                        np.empty((tokens, DEPTH + 1), np.int32), np.empty((tokens, DEPTH + 1), f32))),
        "matmul_nt": (kernels.matmul_nt, (x, rng.standard_normal((3 * H, H), dtype=f32), np.empty((tokens, 3 * H), f32))),
    }


def measure_shared(token_counts, repeats: int, rng) -> list[dict]:
    n = 2 ** (DEPTH + 1) - 1
    tree = (rng.standard_normal((n, H), dtype=f32) * f32(1 / math.sqrt(H)),
            rng.standard_normal(n, dtype=f32) * f32(0.3),
            rng.standard_normal((n, H), dtype=f32) * f32(1 / math.sqrt(n)))
    rows = []
    for t in token_counts:
        gemm = gemm_before(t, rng)
        for name, (kernel, args) in shared_cases(t, rng, tree).items():
            if name == "matmul_nt" and t > fwd.SMALL_PRODUCT_TOKENS:
                continue
            before = gemm
            if name == "gelu_":   # in place: the same rows again and again would sink into denormals
                fresh = args[0].copy()
                before = lambda: (gemm(), np.copyto(args[0], fresh))  # noqa: E731
            alone = per_call_us(lambda: threads.run_here(kernel, *args), before, repeats)
            shared = per_call_us(lambda: threads.run(kernel, *args), before, repeats)
            helped = args[0].size >= kernels._SHARED[kernel]
            rows.append({"kernel": name, "tokens": t, "alone_us": alone, "shared_us": shared,
                         "run_uses": "helpers" if helped else "alone"})
            log(f"  {name:16} {t:5} tokens: alone {alone:8.0f} us  with helpers {shared:8.0f} us")
    return rows


def measure_products(token_counts, repeats: int, rng) -> list[dict]:
    rows = []
    for n_out in (3 * H, H):
        ws = [rng.standard_normal((n_out, H), dtype=f32) for _ in range(16)]
        for m in token_counts:
            x = rng.standard_normal((m, H), dtype=f32)
            out = np.empty((m, n_out), f32)

            def blas():
                for w in ws:
                    x @ w.T

            def kernel():
                for w in ws:
                    threads.run(kernels.matmul_nt, x, w, out)
            b = per_call_us(blas, lambda: None, repeats) / len(ws)
            k = per_call_us(kernel, lambda: None, repeats) / len(ws)
            rows.append({"n": n_out, "tokens": m, "blas_us": b, "matmul_nt_us": k,
                         "linear_uses": "matmul_nt" if 2 <= m <= fwd.SMALL_PRODUCT_TOKENS else "blas"})
            log(f"  {m:4} x {H} @ {H} x {n_out}: OpenBLAS {b:8.0f} us  matmul_nt {k:8.0f} us")
    return rows


def peaks(info: dict) -> dict:
    """Per-core peaks at the nominal clock, assuming two 512-bit units: vpdpbusd does 64 u8 x s8
    multiply-adds per instruction (128 ops), an FMA 16 float32 ones (32 flops)."""
    ghz = common._cpuinfo().get("cpu MHz")
    ghz = float(ghz) / 1000 if ghz else None
    has_vnni = "avx512_vnni" in info.get("cpu_flags", [])
    return {"ghz": ghz, "int8_gops_per_core": 2 * 128 * ghz if ghz and has_vnni else None,
            "f32_gflops_per_core": 2 * 32 * ghz if ghz else None}


def other_quant(revision: str):
    """-> (quant, threads) modules of git revision `revision`, as bench/kernels_ab.py unpacks it."""
    import importlib

    from kernels_ab import other_kernels
    other_kernels(revision)
    return importlib.import_module("ufcpu_ab.quant"), importlib.import_module("ufcpu_ab.threads")


def measure_int8(token_counts, repeats: int, rng, thread_counts=(1, 2), ab: str | None = None) -> list[dict]:
    rows = []
    other = other_quant(ab) if ab else None
    for n_out in (3 * H, H):
        ws = [rng.standard_normal((n_out, H), dtype=f32) * f32(0.05) for _ in range(8)]
        qs = {name: [quant.quantize(w, name) for w in ws] for name in quant.available()}
        old = {name: [other[0].quantize(w, name) for w in ws] for name in other[0].available()} if other else {}
        for t in thread_counts:
            threads.set_threads(t)
            if other:
                other[1].set_threads(t)
            for m in token_counts:
                x = rng.standard_normal((m, H), dtype=f32)
                out = np.empty((m, n_out), f32)
                variants = {"OpenBLAS f32": lambda: [x @ w.T for w in ws],
                            "matmul_nt f32": lambda: [threads.run(kernels.matmul_nt, x, w, out) for w in ws]}
                for name, q in qs.items():
                    variants[f"int8 {name}"] = lambda q=q: [quant.linear(x, w) for w in q]
                for name, q in old.items():
                    variants[f"int8 {name} @{ab}"] = lambda q=q: [other[0].linear(x, w) for w in q]
                times = interleaved_us(variants, repeats, len(ws))
                ops = 2.0 * m * n_out * H
                best = min((k for k in times if k.startswith("int8") and "@" not in k), key=times.get)
                row = {"n": n_out, "tokens": m, "threads": t,
                       "us": times, "gops": {k: ops / (v * 1e3) for k, v in times.items()},
                       "int8_weights_gbps": n_out * H / (times[best] * 1e3)}
                rows.append(row)
                log(f"  {t} threads {m:5} x {H} @ {H} x {n_out}: " +
                    "  ".join(f"{k} {row['gops'][k]:.0f} GOPS" for k in times))
    return rows


def interleaved_us(variants: dict, repeats: int, calls: int) -> dict:
    """-> microseconds per call of each variant, medians; the variants take turns, in an order
    reversed every repeat, so that a slow spell of a shared machine falls on all of them."""
    names = list(variants)
    for fn in variants.values():
        fn()
    samples = {k: [] for k in names}
    for r in range(repeats):
        for k in (names if r % 2 else names[::-1]):
            t = time.perf_counter()
            variants[k]()
            samples[k].append(time.perf_counter() - t)
    return {k: 1e6 * float(np.median(v)) / calls for k, v in samples.items()}


def markdown_int8(rows: list[dict], peak: dict) -> list[str]:
    names = list(rows[0]["us"]) if rows else []
    out = ["", "## int8 products against float32 (GOPS = 2 M N K per second; 8 distinct weight matrices)", "",
           f"Peaks per core at {fmt(peak['ghz'])} GHz, assuming two 512-bit units: int8 (vpdpbusd) "
           f"{fmt(peak['int8_gops_per_core'])} GOPS, float32 (FMA) {fmt(peak['f32_gflops_per_core'])} GFLOPS. "
           "int8 times include quantizing the activations.", ""]
    out.append(common.md_table(
        ["threads", "x", "w", *[f"{k} GOPS" for k in names], "int8 / best f32", "int8 weights GB/s"],
        [[r["threads"], f"{r['tokens']} x {H}", f"{r['n']} x {H}", *[fmt(r["gops"][k]) for k in names],
          fmt(max(v for k, v in r["gops"].items() if k.startswith("int8") and "@" not in k) /
              max(v for k, v in r["gops"].items() if k.endswith("f32"))),
          fmt(r["int8_weights_gbps"])] for r in rows]))
    return out


def markdown(shared: list[dict], products: list[dict], n_threads: int, info: dict, int8=(), peak=None) -> str:
    out = ["# Kernels: helper thresholds and small products", "",
           f"{n_threads} threads; {info.get('cpu_model') or 'CPU'}. Microseconds per call, medians. "
           "'used' is what ufcpu picks at that size (threads.run, model.linear).", "",
           "## The calling thread alone, or helpers joining it (a BLAS product before every call)", ""]
    out.append(common.md_table(
        ["kernel", "tokens", "alone us", "with helpers us", "faster", "used"],
        [[r["kernel"], r["tokens"], fmt(r["alone_us"]), fmt(r["shared_us"]),
          "helpers" if r["shared_us"] < r["alone_us"] else "alone", r["run_uses"]] for r in shared]))
    out += ["", "## x @ w.T for a few tokens: OpenBLAS or matmul_nt (16 distinct weight matrices)", ""]
    out.append(common.md_table(
        ["w", "tokens", "OpenBLAS us", "matmul_nt us", "faster", "used"],
        [[f"{r['n']} x {H}", r["tokens"], fmt(r["blas_us"]), fmt(r["matmul_nt_us"]),
          "matmul_nt" if r["matmul_nt_us"] < r["blas_us"] else "OpenBLAS", r["linear_uses"]] for r in products]))
    if int8:
        out += markdown_int8(int8, peak)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="threads for both pools (default 2)")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="results folder (default bench/results)")
    ap.add_argument("--smoke", action="store_true", help="two sizes, a few repeats: checks the script runs")
    ap.add_argument("--only", choices=("shared", "products", "int8"), action="append", default=None,
                    help="measure only this part (repeatable; default: all)")
    ap.add_argument("--ab", metavar="REV", default=None,
                    help="also run the int8 products of this git revision, taking turns with these")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    n = threads.set_threads(args.threads)
    kernels.warmup()
    rng = np.random.default_rng(0)
    shared_tokens = (11, 128) if args.smoke else (11, 64, 128, 256, 512, 1024, 2048)
    product_tokens = (2, 11) if args.smoke else (1, 2, 4, 11, 16, 32, 64, 128, 256)
    repeats = 3 if args.smoke else 40
    parts = set(args.only or ("shared", "products", "int8"))
    log(f"alone or with helpers, {n} threads")
    shared = measure_shared(shared_tokens, repeats, rng) if "shared" in parts else []
    log("small products")
    products = measure_products(product_tokens, max(3, repeats // 4), rng) if "products" in parts else []
    log("int8 products")
    int8 = measure_int8((1, 11) if args.smoke else (1, 11, 16, 128, 1024), max(3, repeats // 8), rng,
                        (1,) if args.smoke else (1, 2), args.ab) if "int8" in parts else []
    threads.set_threads(n)
    info = common.machine_info()
    peak = peaks(info)
    info["threads"] = common.ufcpu_threads()
    info["blas_idle_workers_sleep"] = settings.blas_workers_sleep()
    args.out.mkdir(parents=True, exist_ok=True)
    name = "kernels" if args.smoke else f"kernels-{common.cpu_slug(info)}"   # one file per CPU
    common.write_json(args.out / f"{name}.json", {"benchmark": "kernels", "smoke": args.smoke, "threads": n,
                                                  "machine": info, "shared": shared,
                                                  "products": products, "int8": int8, "peaks": peak,
                                                  "wall_s": time.perf_counter() - started})
    md = markdown(shared, products, n, info, int8, peak)
    common.write_text(args.out / f"{name}.md", md)
    print(md)
    log(f"wrote {args.out / name}.json, .md in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
