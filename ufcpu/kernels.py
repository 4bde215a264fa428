"""Every Numba kernel of the engine, and every constant a kernel reads.

Policy, the same for all kernels (see `_JIT`):
- `cache=True`: compiled machine code is kept on disk, so only the first run of a fresh install
  pays the compile (a few seconds). `ufcpu warmup` does that ahead of time.
- `fastmath` is a subset of LLVM flags: reassociation and contraction let the dot products
  vectorise, but NaN/inf semantics stay on ("nnan"/"ninf" are off) so bad weights show up as NaN
  instead of silently routing somewhere.
- `parallel=True` kernels split work over tokens with `prange`. They run between NumPy GEMMs,
  never during one. Numba's pool is the "workqueue" layer (unless NUMBA_THREADING_LAYER says
  otherwise): its idle workers sleep, where OpenMP's spin and steal the cores from OpenBLAS
  (measured here: the same kernels 3-6x slower under the "omp" layer while BLAS ran alongside).
  Workqueue does not allow two launches at once, so every parallel launch goes through `run`,
  which holds one process-wide lock (uncontended it costs well under a microsecond).
- Kernels only do math on arrays the Python wrapper has already checked (shapes, dtypes,
  contiguity): an out-of-bounds index inside a kernel is a segfault, not an exception.

Every kernel here is tested against a naive NumPy version in tests/test_kernels.py.
"""
from __future__ import annotations

import math
import os
import tempfile
import threading

import numpy as np


def _writable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _choose_cache_dir() -> bool:
    """Numba caches next to the package unless told otherwise, and refuses to import a
    `cache=True` function when it cannot write anywhere. Pick the first writable folder of:
    NUMBA_CACHE_DIR, the package folder, ~/.cache/ufcpu/numba, a per-user temporary folder.
    -> False when none is writable (kernels then compile in every process, uncached)."""
    here = os.path.dirname(os.path.abspath(__file__))
    user = os.environ.get("NUMBA_CACHE_DIR")
    if user and _writable(user):
        return True
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    candidates = ([] if user else [None]) + [
        os.path.join(base, "ufcpu", "numba"),
        os.path.join(tempfile.gettempdir(), f"ufcpu-numba-{os.getuid() if hasattr(os, 'getuid') else 'user'}")]
    for folder in candidates:
        if folder is None:
            if _writable(os.path.join(here, "__pycache__")):
                return True
            continue
        if _writable(folder):
            os.environ["NUMBA_CACHE_DIR"] = folder
            return True
    return False


_CACHE = _choose_cache_dir()

import numba  # noqa: E402  (after NUMBA_CACHE_DIR is settled)
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

if os.environ.get("NUMBA_CACHE_DIR"):
    numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]   # in case numba was imported first
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

_LAUNCH_LOCK = threading.Lock()


def run(kernel, *args):
    """Launch a parallel kernel; one launch at a time per process (see the module docstring)."""
    with _LAUNCH_LOCK:
        return kernel(*args)

# LLVM fast-math flags: everything but the two that drop NaN/inf semantics.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
_JIT = dict(cache=_CACHE, fastmath=FASTMATH, nogil=True)

SQRT1_2 = np.float32(1.0 / math.sqrt(2.0))   # exact GELU: 0.5 z (1 + erf(z / sqrt 2))
MASK_BIAS = np.float32(-10000.0)              # additive score of a padded key, as the reference does


# ---------------------------------------------------------------------------------------------
# GELU (exact, erf-based), with erf as a rational polynomial: a libm erf call per node was a
# third of the tree walk's time. Eigen's float32 erf: |error| < 5e-7 (a few ulps) on [-4, 4], and
# erf(+-4) rounds to +-1 in float32, so clamping there is exact.
# ---------------------------------------------------------------------------------------------

ERF_A = tuple(np.float32(c) for c in (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
                                      -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
                                      -1.60960333262415e-02))
ERF_B = tuple(np.float32(c) for c in (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
                                      -7.37332916720468e-03, -1.42647390514189e-02))
A0, A1, A2, A3, A4, A5, A6 = ERF_A
B0, B1, B2, B3, B4 = ERF_B


@njit(inline="always", **_JIT)
def erf_f32(x):
    x = min(max(x, np.float32(-4.0)), np.float32(4.0))
    x2 = x * x
    p = (((((A0 * x2 + A1) * x2 + A2) * x2 + A3) * x2 + A4) * x2 + A5) * x2 + A6
    q = (((B0 * x2 + B1) * x2 + B2) * x2 + B3) * x2 + B4
    return x * p / q


@njit(**_JIT)
def gelu_scalar(z):
    return np.float32(0.5) * z * (np.float32(1.0) + erf_f32(z * SQRT1_2))


@njit(parallel=True, **_JIT)
def gelu_(x):  # [T, F] float32, in place
    for t in prange(x.shape[0]):
        row = x[t]
        for j in range(row.shape[0]):
            row[j] = gelu_scalar(row[j])


# ---------------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------------

@njit(parallel=True, **_JIT)
def layer_norm(x, w, b, eps, out):  # [T, H], [H], [H], float, [T, H] -> out
    t_count, h = x.shape
    for t in prange(t_count):
        row = x[t]
        mean = np.float32(0.0)
        for j in range(h):
            mean += row[j]
        mean /= h
        var = np.float32(0.0)
        for j in range(h):
            d = row[j] - mean
            var += d * d
        var /= h
        inv = np.float32(1.0) / np.sqrt(var + eps)
        o = out[t]
        for j in range(h):
            o[j] = (row[j] - mean) * inv * w[j] + b[j]


# ---------------------------------------------------------------------------------------------
# exp for the softmax: a polynomial LLVM can vectorise (a call to libm's expf cannot be)
# ---------------------------------------------------------------------------------------------

@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret an int32 as the float32 with the same bits (builds 2^n from its exponent)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


LOG2E = np.float32(1.4426950408889634)
# Below this the result is 0 exactly, as expf's would be for a padded key (score - 10000): a tiny
# nonzero value would be divided into a denormal and make the following P @ V GEMM crawl.
EXP_MIN = np.float32(-80.0)
# 2^f for f in [-0.5, 0.5] (Cephes exp2f): relative error ~1e-7 plus |x| * 6e-8 from rounding x*log2(e)
P0, P1, P2, P3, P4, P5 = (np.float32(c) for c in (1.535336188319500e-4, 1.339887440266574e-3,
                                                   9.618437357674640e-3, 5.550332471162809e-2,
                                                   2.402264791363012e-1, 6.931472028550421e-1))


@njit(inline="always", **_JIT)
def exp_f32(x):
    if x < EXP_MIN:
        return np.float32(0.0)
    t = x * LOG2E
    n = math.floor(t + np.float32(0.5))     # x = (n + f) ln 2, |f| <= 1/2
    f = t - n
    p = ((((P0 * f + P1) * f + P2) * f + P3) * f + P4) * f + P5
    return (p * f + np.float32(1.0)) * _f32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


# ---------------------------------------------------------------------------------------------
# Attention softmax: scale, additive key mask, softmax over keys, in place
# ---------------------------------------------------------------------------------------------

@njit(parallel=True, **_JIT)
def masked_softmax_(scores, key_bias, scale):  # [B, A, S, S], [B, S] additive, float32 -> in place
    b_count, a_count, s_count, k_count = scores.shape
    for ba in prange(b_count * a_count):
        bi = ba // a_count
        ai = ba % a_count
        bias = key_bias[bi]
        for q in range(s_count):
            row = scores[bi, ai, q]
            m = np.float32(-np.inf)
            for k in range(k_count):
                v = row[k] * scale + bias[k]
                row[k] = v
                m = max(m, v)
            total = np.float32(0.0)
            for k in range(k_count):
                e = exp_f32(row[k] - m)
                row[k] = e
                total += e
            inv = np.float32(1.0) / total
            for k in range(k_count):
                row[k] *= inv


# ---------------------------------------------------------------------------------------------
# Fast feedforward: the tree walk
# ---------------------------------------------------------------------------------------------

@njit(**_JIT)
def _fff_token(y, w_in, b_in, w_out, depth, out_row, route, logits):
    """One token's walk: depth+1 nodes from the root, each adds GELU(z) * w_out[node].

    Only the visited rows of w_in and w_out are read: 2 * (D+1) rows instead of 2 * (2^(D+1)-1).
    """
    h = y.shape[0]
    for j in range(h):
        out_row[j] = np.float32(0.0)
    node = 0
    for level in range(depth + 1):
        wrow = w_in[node]
        z = b_in[node]
        for j in range(h):
            z += wrow[j] * y[j]
        route[level] = node
        logits[level] = z
        g = gelu_scalar(z)
        orow = w_out[node]
        for j in range(h):
            out_row[j] += g * orow[j]
        # strict >: a token goes right only if z > 0 (heap order: children 2n+1, 2n+2)
        node = 2 * node + 1 + (1 if z > np.float32(0.0) else 0)


@njit(parallel=True, **_JIT)
def fff_walk(x, w_in, b_in, w_out, depth, out, routes, logits):
    """x [T, H], w_in [N, H], b_in [N], w_out [N, H] -> out [T, H], routes/logits [T, D+1]."""
    for t in prange(x.shape[0]):
        _fff_token(x[t], w_in, b_in, w_out, depth, out[t], routes[t], logits[t])


def warmup() -> None:
    """Compile (or load from cache) every kernel for the argument types the engine passes:
    weights are read-only views into a memory map, activations are writable."""
    f32 = np.float32

    def ro(a):
        a.flags.writeable = False
        return a

    x = np.ones((2, 4), f32)
    gelu_(x.copy())
    layer_norm(x, ro(np.ones(4, f32)), ro(np.zeros(4, f32)), f32(1e-12), np.empty_like(x))
    layer_norm(x, np.ones(4, f32), np.zeros(4, f32), f32(1e-12), np.empty_like(x))
    masked_softmax_(np.ones((1, 1, 2, 2), f32), np.zeros((1, 2), f32), f32(1.0))
    for make in (ro, lambda a: a):
        fff_walk(x, make(np.ones((3, 4), f32)), make(np.zeros(3, f32)), make(np.ones((3, 4), f32)), 1,
                 np.empty_like(x), np.empty((2, 2), np.int32), np.empty((2, 2), f32))


def set_threads(n: int) -> None:
    numba.set_num_threads(n)


def max_threads() -> int:
    return numba.config.NUMBA_NUM_THREADS
