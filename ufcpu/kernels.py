"""Every Numba kernel of the engine, and every constant a kernel reads.

Policy, the same for all kernels (see `_JIT`):
- `cache=True`: compiled machine code is kept on disk, in the folder ufcpu/settings.py chooses
  (one only this user can write; files checked before they are loaded), so only the first run of
  a fresh install pays the compile. `ufcpu warmup` does that ahead of time.
- `fastmath` is a subset of LLVM flags: reassociation and contraction let the dot products
  vectorise, but NaN/inf semantics stay on ("nnan"/"ninf" are off) so bad weights show up as NaN
  instead of silently routing somewhere.
- Every kernel is "shared": it splits its work into blocks (rows, heads, route tiles) that any
  thread running it claims from one atomic counter (`claim_loop`), and a block gives the same bits
  whichever thread computes it. ufcpu/threads.py launches kernels (`threads.run`) and decides who
  joins; there is no Numba thread pool (see "Shared kernels").
- Kernels only do math on arrays the Python wrapper has already checked (shapes, dtypes,
  contiguity): an out-of-bounds index inside a kernel is a segfault, not an exception.

Adding a kernel: write its block function `_name_block(i, args)` (block i of the work; `args` the
kernel's arrays as one tuple), make its loop with `claim_loop`, and the kernel
`name(..., state)` as `layer_norm` below; register it in `_SHARED` (the size from which helper
threads join) and `_example_calls` (the argument types to compile for), and call it as
`threads.run(kernels.name, ...)`.

Every kernel here is tested against a naive NumPy version in tests/test_kernels.py, and with
helpers against itself alone.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.registry import CPUDispatcher
from numba.extending import intrinsic

from . import settings

# LLVM fast-math flags: everything but the two that drop NaN/inf semantics.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
_JIT = dict(cache=settings.kernel_cache_dir() is not None, fastmath=FASTMATH, nogil=True)

SQRT1_2 = np.float32(1.0 / math.sqrt(2.0))   # exact GELU: 0.5 z (1 + erf(z / sqrt 2))
MASK_BIAS = np.float32(-10000.0)              # additive score of a padded key, as the reference does


# ---------------------------------------------------------------------------------------------
# Shared kernels: the calling thread and helper threads claim blocks from one counter
# ---------------------------------------------------------------------------------------------
# A shared kernel starts on the calling thread at once, and helper threads (ufcpu/threads.py) join
# when they wake: each thread claims the next blocks with an atomic add until none is left, so a
# helper that wakes late just does less, and the caller waits only for blocks a helper is still
# computing. Every block is computed by the same code whichever thread claims it: the result is the
# same bits with or without helpers. state: int64 [SHARED_SLOTS], zeros, one per call.

SHARED_NEXT = 0      # the next block nobody has claimed
SHARED_INSIDE = 1    # threads inside the kernel
SHARED_DONE = 2      # blocks finished, for a kernel whose second sweep needs the whole first
SHARED_NEXT_2 = 3    # the next block of that second sweep
SHARED_SLOTS = 4


@intrinsic
def fetch_add(typingctx, array, index, value):
    """Atomically add `value` to array[index] (an int64 array) -> the value before. Sequentially
    consistent: what a thread wrote before its fetch_add is seen by a thread after its own."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        arr = context.make_array(array_type)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, array_type, arr, [args[1]])
        add = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, add, "seq_cst")
    return types.int64(array, index, value), codegen


@njit(inline="always", **_JIT)
def _claim(state, slot, count):
    """-> the next index below `count` nobody has claimed from this slot, or -1 when none is left"""
    i = fetch_add(state, slot, 1)
    return i if i < count else -1


def claim_loop(block):
    """-> loop(state, slot, count, args): block(i, args) for every i below `count` that this thread
    claims from state[slot], then return. Written once for every kernel; `block` is compiled into
    each loop (a closure over a kernel, which Numba inlines and caches; a function passed as an
    argument could not be cached)."""
    @njit(inline="always", **_JIT)
    def loop(state, slot, count, args):
        i = _claim(state, slot, count)
        while i >= 0:
            block(i, args)
            i = _claim(state, slot, count)
    return loop


@njit(**_JIT)
def helpers_done(state, spins):
    """Spin until no thread is inside the kernel, at most `spins` checks -> whether none is."""
    for _ in range(spins):
        if fetch_add(state, SHARED_INSIDE, 0) == 0:
            return True
    return False


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


@njit(inline="always", **_JIT)
def _gelu_row(x, t):
    row = x[t]
    for j in range(row.shape[0]):
        row[j] = gelu_scalar(row[j])


ROW_BLOCK = 16   # rows per claim for the row-wise kernels (GELU, LayerNorm)


@njit(inline="always", **_JIT)
def _gelu_block(b, args):
    x, = args
    for t in range(b * ROW_BLOCK, min((b + 1) * ROW_BLOCK, x.shape[0])):
        _gelu_row(x, t)


_gelu_loop = claim_loop(_gelu_block)


@njit(**_JIT)
def gelu_(x, state):  # [T, F] float32, in place; shared
    fetch_add(state, SHARED_INSIDE, 1)
    _gelu_loop(state, SHARED_NEXT, (x.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK, (x,))
    fetch_add(state, SHARED_INSIDE, -1)


# ---------------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------------

@njit(inline="always", **_JIT)
def _layer_norm_row(x, w, b, eps, out, t):
    row = x[t]
    h = row.shape[0]
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


@njit(inline="always", **_JIT)
def _layer_norm_block(blk, args):
    x, w, b, eps, out = args
    for t in range(blk * ROW_BLOCK, min((blk + 1) * ROW_BLOCK, x.shape[0])):
        _layer_norm_row(x, w, b, eps, out, t)


_layer_norm_loop = claim_loop(_layer_norm_block)


@njit(**_JIT)
def layer_norm(x, w, b, eps, out, state):  # [T, H], [H], [H], float, [T, H] -> out; shared
    fetch_add(state, SHARED_INSIDE, 1)
    _layer_norm_loop(state, SHARED_NEXT, (x.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK, (x, w, b, eps, out))
    fetch_add(state, SHARED_INSIDE, -1)


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
    n = np.floor(t + np.float32(0.5))       # x = (n + f) ln 2, |f| <= 1/2; float32 (math.floor's int made it float64)
    f = t - n
    p = ((((P0 * f + P1) * f + P2) * f + P3) * f + P4) * f + P5
    return (p * f + np.float32(1.0)) * _f32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


# ---------------------------------------------------------------------------------------------
# Attention: scores, softmax and context of every (sequence, head, query tile), fused
# ---------------------------------------------------------------------------------------------
# One block is a tile of up to ATTN_QUERY_TILE queries of one head of one sequence. Its scores
# are kept transposed, [S, tile] (a key per row), in a thread-local buffer (L1/L2 up to S = 512),
# never an [n, A, S, S] array; its context goes straight to its head's columns, in the layout the
# output projection reads. Both products are rank-1 updates of a register tile (_fma_tile):
# - scores^T [8 keys, 32 queries] += K[k, i] * Q^T[i, :], K's rows read in place, Q^T copied
#   once per block;
# - context [4 queries, 64 features] += P^T[k, q] * V[k, :], V's rows copied together once per
#   block (read in place, 9 KB apart, they made the context product 1.7x slower).
# The softmax then runs down the columns, 32 queries at once, each query's scores in key order:
# times the scale plus the key's bias, the max, exp of the difference, their sum, times 1 / sum.

ATTN_QUERY_TILE = 32   # queries per block, two vectors of 16: 1 sequence x 12 heads x 128 tokens is 48 blocks
ATTN_KEY_ROWS = 8      # keys of a score tile: 8 x 2 vectors of accumulators
ATTN_CTX_ROWS = 4      # queries of a context tile: 4 x 4 vectors (64 features) of accumulators
F32_LANES = 16         # float32 lanes of one 512-bit vector


def _make_fma_tile(rows: int, vectors: int):
    """-> an intrinsic fma_tile(a, a_row, a_step, b, b_row, count, c, c_row) computing, for r < rows,
    C[r, :16 vectors] = sum_{j < count} A[r, j] * B[j, :16 vectors] in registers (LLVM IR with
    explicit <16 x float> vectors: Numba has no vector types, and LLVM does not keep an outer
    product's accumulators in registers by itself). Addresses and strides are in bytes: A[r, j] at
    a + r a_row + j a_step, B[j, :] at b + j b_row, C[r, :] stored at c + r c_row."""
    @intrinsic
    def fma_tile(typingctx, a, a_row, a_step, b, b_row, count, c, c_row):
        def codegen(context, builder, signature, args):
            f, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
            vec = ir.VectorType(f, F32_LANES)
            a, a_row, a_step, b, b_row, count, c, c_row = (
                context.cast(builder, v, t, types.int64) for v, t in zip(args, signature.args))
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                                 "llvm.fma.v16f32")
            acc = [[cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in range(vectors)]
                   for _ in range(rows)]
            undef = ir.Constant(vec, ir.Undefined)
            splat = ir.Constant(ir.VectorType(i32, F32_LANES), None)
            with cgutils.for_range(builder, count) as loop:
                j = loop.index
                b_at = builder.add(b, builder.mul(j, b_row))
                bv = [builder.load(builder.inttoptr(builder.add(b_at, ir.Constant(i64, 4 * F32_LANES * v)),
                                                    vec.as_pointer()), align=4) for v in range(vectors)]
                a_at = builder.add(a, builder.mul(j, a_step))
                for r in range(rows):
                    ptr = builder.inttoptr(builder.add(a_at, builder.mul(ir.Constant(i64, r), a_row)), f.as_pointer())
                    av = builder.shuffle_vector(builder.insert_element(undef, builder.load(ptr, align=4),
                                                                       ir.Constant(i32, 0)), undef, splat)
                    for v in range(vectors):
                        builder.store(builder.call(fma, [av, bv[v], builder.load(acc[r][v])]), acc[r][v])
            for r in range(rows):
                row = builder.add(c, builder.mul(ir.Constant(i64, r), c_row))
                for v in range(vectors):
                    ptr = builder.inttoptr(builder.add(row, ir.Constant(i64, 4 * F32_LANES * v)), vec.as_pointer())
                    builder.store(builder.load(acc[r][v]), ptr, align=4)
            return context.get_dummy_value()
        return types.void(a, a_row, a_step, b, b_row, count, c, c_row), codegen
    return fma_tile


_score_tile = _make_fma_tile(ATTN_KEY_ROWS, ATTN_QUERY_TILE // F32_LANES)
_ctx_tile_1 = _make_fma_tile(ATTN_CTX_ROWS, 1)   # 16 features
_ctx_tile_2 = _make_fma_tile(ATTN_CTX_ROWS, 2)
_ctx_tile_3 = _make_fma_tile(ATTN_CTX_ROWS, 3)
_ctx_tile_4 = _make_fma_tile(ATTN_CTX_ROWS, 4)   # 64 features: a head of the full model


@njit(inline="always", **_JIT)
def _ctx_tile(vectors, a, a_row, a_step, b, b_row, count, c, c_row):
    if vectors == 4:
        _ctx_tile_4(a, a_row, a_step, b, b_row, count, c, c_row)
    elif vectors == 3:
        _ctx_tile_3(a, a_row, a_step, b, b_row, count, c, c_row)
    elif vectors == 2:
        _ctx_tile_2(a, a_row, a_step, b, b_row, count, c, c_row)
    else:
        _ctx_tile_1(a, a_row, a_step, b, b_row, count, c, c_row)


@njit(inline="always", **_JIT)
def _softmax_columns(st, s_len, bias, scale, m, total):  # scores^T [S, 32] -> P^T, a query per column
    for q in range(ATTN_QUERY_TILE):                                # (constant trip counts: LLVM vectorises
        m[q] = -np.inf                                              # a loop of 32 only when it knows it)
        total[q] = np.float32(0.0)
    for k in range(s_len):
        row = st[k]
        b = bias[k]
        for q in range(ATTN_QUERY_TILE):
            v = row[q] * scale + b
            row[q] = v
            m[q] = max(m[q], v)
    for k in range(s_len):
        row = st[k]
        for q in range(ATTN_QUERY_TILE):
            e = exp_f32(row[q] - m[q])
            row[q] = e
            total[q] += e
    for q in range(ATTN_QUERY_TILE):
        total[q] = np.float32(1.0) / total[q]
    for k in range(s_len):
        row = st[k]
        for q in range(ATTN_QUERY_TILE):
            row[q] *= total[q]


@njit(inline="always", **_JIT)
def _attention_block(blk, args):  # block blk = (sequence, head, query tile)
    qkv, key_bias, scale, out, heads, s_len, qt, st, kp, vp, cx, m, total = args
    tiles = (s_len + ATTN_QUERY_TILE - 1) // ATTN_QUERY_TILE
    tile = blk % tiles
    head = (blk // tiles) % heads
    seq = blk // (tiles * heads)
    hid = out.shape[1]
    d = hid // heads
    base = seq * s_len                                              # this sequence's first row
    qc, kc, vc = head * d, hid + head * d, 2 * hid + head * d       # this head's Q | K | V columns
    q0 = tile * ATTN_QUERY_TILE
    rows = min(ATTN_QUERY_TILE, s_len - q0)
    row_bytes = np.int64(qkv.strides[0])
    at = np.int64(qkv.ctypes.data) + base * row_bytes              # this sequence's QKV rows
    for c in range(ATTN_QUERY_TILE):                                # Q^T [d, 32], zeros past the tile's queries
        if c < rows:
            qr = qkv[base + q0 + c, qc:qc + d]
            for i in range(d):
                qt[i, c] = qr[i]
        else:
            for i in range(d):
                qt[i, c] = np.float32(0.0)
    qt_at, st_at = np.int64(qt.ctypes.data), np.int64(st.ctypes.data)
    st_row = np.int64(st.strides[0])
    for k0 in range(0, s_len, ATTN_KEY_ROWS):                       # scores^T [S, 32] = K Q^T
        if k0 + ATTN_KEY_ROWS <= s_len:
            a, a_row = at + k0 * row_bytes + kc * 4, row_bytes
        else:                                                       # the last keys, padded with zeros
            for r in range(ATTN_KEY_ROWS):
                for i in range(d):
                    kp[r, i] = qkv[base + k0 + r, kc + i] if k0 + r < s_len else np.float32(0.0)
            a, a_row = np.int64(kp.ctypes.data), np.int64(kp.strides[0])
        _score_tile(a, a_row, 4, qt_at, np.int64(qt.strides[0]), d, st_at + k0 * st_row, st_row)
    _softmax_columns(st, s_len, key_bias[seq], scale, m, total)
    for k in range(s_len):                                          # V's rows, together, padded to whole vectors
        v = qkv[base + k, vc:vc + d]
        vr = vp[k]
        for i in range(d):
            vr[i] = v[i]
        for i in range(d, vr.shape[0]):
            vr[i] = np.float32(0.0)
    v_at, v_row = np.int64(vp.ctypes.data), np.int64(vp.strides[0])
    cx_at, cx_row = np.int64(cx.ctypes.data), np.int64(cx.strides[0])
    for r0 in range(0, rows, ATTN_CTX_ROWS):                        # context [rows, d] = P V
        for g in range(0, d, 4 * F32_LANES):
            width = min(4 * F32_LANES, d - g)
            _ctx_tile((width + F32_LANES - 1) // F32_LANES, st_at + r0 * 4, 4, st_row, v_at + g * 4, v_row,
                      s_len, cx_at, cx_row)
            for r in range(min(ATTN_CTX_ROWS, rows - r0)):
                o = out[base + q0 + r0 + r, qc + g:qc + g + width]
                c = cx[r]
                for i in range(width):
                    o[i] = c[i]


_attention_loop = claim_loop(_attention_block)


@njit(**_JIT)
def attention_heads(qkv, key_bias, scale, heads, out, state):
    """qkv [n*S, 3H] (Q | K | V, feature = head*d + i in each; C-contiguous), key_bias [n, S]
    additive, scale float32 -> out [n*S, H] = softmax(Q K^T * scale + bias) V of each (sequence,
    head), feature = head*d + i; shared over (sequence, head, query tile) blocks."""
    fetch_add(state, SHARED_INSIDE, 1)
    n, s_len = key_bias.shape
    d = out.shape[1] // heads
    tiles = (s_len + ATTN_QUERY_TILE - 1) // ATTN_QUERY_TILE
    s_pad = (s_len + ATTN_KEY_ROWS - 1) // ATTN_KEY_ROWS * ATTN_KEY_ROWS
    d_pad = (d + F32_LANES - 1) // F32_LANES * F32_LANES
    args = (qkv, key_bias, scale, out, heads, s_len,               # and this thread's scratch:
            np.empty((d, ATTN_QUERY_TILE), np.float32),            # Q^T
            np.empty((s_pad, ATTN_QUERY_TILE), np.float32),        # scores^T, then P^T
            np.empty((ATTN_KEY_ROWS, d), np.float32),              # the last keys, padded
            np.empty((s_len, d_pad), np.float32),                  # V, padded
            np.empty((ATTN_CTX_ROWS, 4 * F32_LANES), np.float32),  # a context tile
            np.empty(ATTN_QUERY_TILE, np.float32), np.empty(ATTN_QUERY_TILE, np.float32))  # max, 1 / sum
    _attention_loop(state, SHARED_NEXT, n * heads * tiles, args)
    fetch_add(state, SHARED_INSIDE, -1)


# ---------------------------------------------------------------------------------------------
# Projections of a few tokens: out = x @ w.T with w stored [out, in] (as the checkpoint's Linear)
# ---------------------------------------------------------------------------------------------
# For a short sentence (M ~ 10) OpenBLAS's packing and blocking cost more than the product; this
# kernel's inner loop keeps a 4 x 4 block of outputs in 16 registers (16 FMAs per 8 loads) and reads
# each weight row once per 4 tokens. The last 2-3 tokens go through the same 4 x 4 block, the
# missing rows repeating the last token: one token at a time is load-bound (4 FMAs per 5 loads).
# Timings: bench/README.md, "Projections of a few tokens".

@njit(inline="always", **_JIT)
def _matmul_nt_block(x, w, out, nb):  # rows 4nb..4nb+3 of w, every token
    m_count, k_count = x.shape
    n_count = w.shape[0]
    n = nb * 4
    if n + 4 > n_count:       # the last rows when N % 4 != 0: one dot product each
        for r in range(n, n_count):
            wr = w[r]
            for m in range(m_count):
                xm = x[m]
                acc = np.float32(0.0)
                for k in range(k_count):
                    acc += xm[k] * wr[k]
                out[m, r] = acc
        return
    w0 = w[n]
    w1 = w[n + 1]
    w2 = w[n + 2]
    w3 = w[n + 3]
    last = m_count - 1
    m = 0
    while m < last:           # 2 or more tokens left: 4 tokens x 4 rows, rows past the end repeat the last
        x0 = x[m]
        x1 = x[m + 1]
        x2 = x[min(m + 2, last)]
        x3 = x[min(m + 3, last)]
        a00 = a01 = a02 = a03 = np.float32(0.0)
        a10 = a11 = a12 = a13 = np.float32(0.0)
        a20 = a21 = a22 = a23 = np.float32(0.0)
        a30 = a31 = a32 = a33 = np.float32(0.0)
        for k in range(k_count):
            u0, u1, u2, u3 = w0[k], w1[k], w2[k], w3[k]
            v = x0[k]
            a00 += v * u0; a01 += v * u1; a02 += v * u2; a03 += v * u3  # noqa: E702
            v = x1[k]
            a10 += v * u0; a11 += v * u1; a12 += v * u2; a13 += v * u3  # noqa: E702
            v = x2[k]
            a20 += v * u0; a21 += v * u1; a22 += v * u2; a23 += v * u3  # noqa: E702
            v = x3[k]
            a30 += v * u0; a31 += v * u1; a32 += v * u2; a33 += v * u3  # noqa: E702
        out[m, n], out[m, n + 1], out[m, n + 2], out[m, n + 3] = a00, a01, a02, a03
        out[m + 1, n], out[m + 1, n + 1], out[m + 1, n + 2], out[m + 1, n + 3] = a10, a11, a12, a13
        if m + 2 <= last:
            out[m + 2, n], out[m + 2, n + 1], out[m + 2, n + 2], out[m + 2, n + 3] = a20, a21, a22, a23
        if m + 3 <= last:
            out[m + 3, n], out[m + 3, n + 1], out[m + 3, n + 2], out[m + 3, n + 3] = a30, a31, a32, a33
        m += 4
    if m == last:             # one token left: 1 token x 4 rows
        x0 = x[m]
        a00 = a01 = a02 = a03 = np.float32(0.0)
        for k in range(k_count):
            v = x0[k]
            a00 += v * w0[k]; a01 += v * w1[k]; a02 += v * w2[k]; a03 += v * w3[k]  # noqa: E702
        out[m, n], out[m, n + 1], out[m, n + 2], out[m, n + 3] = a00, a01, a02, a03


MATMUL_NT_GRAIN = 4   # blocks per claim: 16 output columns, one 64-byte line of each token's row


@njit(inline="always", **_JIT)
def _matmul_nt_grain(g, args):
    x, w, out = args
    blocks = (w.shape[0] + 3) // 4
    for nb in range(g * MATMUL_NT_GRAIN, min((g + 1) * MATMUL_NT_GRAIN, blocks)):
        _matmul_nt_block(x, w, out, nb)


_matmul_nt_loop = claim_loop(_matmul_nt_grain)


@njit(**_JIT)
def matmul_nt(x, w, out, state):  # x [M, K], w [N, K] -> out [M, N] = x @ w.T; shared
    """Every thread that runs it with the same `state` claims grains of weight rows until none
    is left (see "Shared kernels")."""
    fetch_add(state, SHARED_INSIDE, 1)
    grains = ((w.shape[0] + 3) // 4 + MATMUL_NT_GRAIN - 1) // MATMUL_NT_GRAIN
    _matmul_nt_loop(state, SHARED_NEXT, grains, (x, w, out))
    fetch_add(state, SHARED_INSIDE, -1)


# ---------------------------------------------------------------------------------------------
# Fast feedforward: the tree walk
# ---------------------------------------------------------------------------------------------

# Two sweeps over the tokens: first every token's route (D+1 dot products with rows of w_in), then
# every token's output (D+1 rows of w_out). A token-at-a-time walk needs both matrices at once:
# 25 MB per layer, most of this machine's 32 MB L3 once the activations stream through it; each
# sweep needs half. Measured against the token-at-a-time walk, same inputs and results: 16384
# tokens on one hot layer 46 vs 63-72 ms at 1 thread and 24 vs 36 ms at 2 threads; 2048 tokens
# 7.2 vs 9.3 ms (bench/README.md).

ROUTE_TILE = 16   # tokens whose routes advance together


@njit(inline="always", **_JIT)
def _route_take(routes, logits, depth, level, t, z0, z1, z2, left):
    """Token t's step from its node's logit z0 and its children's z1, z2 (rows left, left + 1):
    the logits at `level` and `level + 1`, the child, and the node it visits at `level + 2`."""
    right = z0 > np.float32(0.0)     # strict >: right only if z > 0
    child = left + 1 if right else left
    z = z2 if right else z1
    logits[t, level] = z0
    routes[t, level + 1] = child
    logits[t, level + 1] = z
    if level + 1 < depth:
        routes[t, level + 2] = 2 * child + 1 + (1 if z > np.float32(0.0) else 0)


@njit(inline="always", **_JIT)
def _route_pair(x, w_in, b_in, depth, routes, logits, ta, tb, level):
    """Tokens ta and tb (tb == ta for a lone last token): each one's logit at `level` and at
    `level + 1`, in one pass over their rows.
    - Two levels per pass: the node's dot product and both children's (rows 2n+1 and 2n+2,
      adjacent in memory). The child's row is read while the node's is, instead of after a round
      trip to memory for z: 1.5x the FMAs for half the dependent waits (16 layers cycled, 128
      tokens: 0.51 vs 0.57 ms per layer for the walk; one hot layer unchanged).
    - Two tokens per pass: twice the independent row loads in flight. 16 layers cycled, 1 thread,
      against one token per pass: 128 tokens 1.06-1.08x, 16 tokens 1.08-1.09x, 2048 tokens
      1.02-1.06x; one hot layer of 16384 tokens 0.99-1.06x.
    A token's sums are the same code whichever token it is paired with, itself included, so its
    route and logits do not depend on the other tokens of the batch."""
    na = routes[ta, level]
    nb = routes[tb, level]
    ya = x[ta]
    yb = x[tb]
    if level == depth:          # the leaf level: one row each
        wa, wb = w_in[na], w_in[nb]
        za, zb = b_in[na], b_in[nb]
        for j in range(ya.shape[0]):
            za += wa[j] * ya[j]
            zb += wb[j] * yb[j]
        logits[ta, level] = za
        logits[tb, level] = zb
        return
    la = 2 * na + 1
    lb = 2 * nb + 1
    a0, a1, a2 = w_in[na], w_in[la], w_in[la + 1]
    b0, b1, b2 = w_in[nb], w_in[lb], w_in[lb + 1]
    za0, za1, za2 = b_in[na], b_in[la], b_in[la + 1]
    zb0, zb1, zb2 = b_in[nb], b_in[lb], b_in[lb + 1]
    for j in range(ya.shape[0]):
        u = ya[j]
        v = yb[j]
        za0 += a0[j] * u
        za1 += a1[j] * u
        za2 += a2[j] * u
        zb0 += b0[j] * v
        zb1 += b1[j] * v
        zb2 += b2[j] * v
    _route_take(routes, logits, depth, level, ta, za0, za1, za2, la)
    _route_take(routes, logits, depth, level, tb, zb0, zb1, zb2, lb)


@njit(**_JIT)
def _fff_route_tile(x, w_in, b_in, depth, routes, logits, tile):
    """The paths of tokens [16 tile, 16 tile + 16): node ids and logits z, root first (heap order:
    children 2n+1, 2n+2). Two levels at a time across the tile, so the row loads of different
    tokens are independent and overlap; one token at a time, each load waits for the previous
    level's z (16 layers cycled, 128 tokens: 0.36 vs 0.42 ms for this sweep)."""
    t0 = tile * ROUTE_TILE
    t1 = min(t0 + ROUTE_TILE, x.shape[0])
    for t in range(t0, t1):
        routes[t, 0] = 0
    level = 0
    while level <= depth:
        for t in range(t0, t1, 2):
            _route_pair(x, w_in, b_in, depth, routes, logits, t, min(t + 1, t1 - 1), level)
        level += 2


@njit(inline="always", **_JIT)
def _output_12(w_out, route, logits, out_row):
    """out_row = the first 12 rows of the path times their GELU(z), in one pass that writes
    out_row once and never reads it (a tree of depth 11 has exactly 12 levels). Summed in the
    order of three passes of four rows, (p0 + p1) + p2: the same bits as those passes."""
    g0, g1, g2, g3 = (gelu_scalar(logits[0]), gelu_scalar(logits[1]), gelu_scalar(logits[2]),
                      gelu_scalar(logits[3]))
    g4, g5, g6, g7 = (gelu_scalar(logits[4]), gelu_scalar(logits[5]), gelu_scalar(logits[6]),
                      gelu_scalar(logits[7]))
    g8, g9, g10, g11 = (gelu_scalar(logits[8]), gelu_scalar(logits[9]), gelu_scalar(logits[10]),
                        gelu_scalar(logits[11]))
    r0, r1, r2, r3 = w_out[route[0]], w_out[route[1]], w_out[route[2]], w_out[route[3]]
    r4, r5, r6, r7 = w_out[route[4]], w_out[route[5]], w_out[route[6]], w_out[route[7]]
    r8, r9, r10, r11 = w_out[route[8]], w_out[route[9]], w_out[route[10]], w_out[route[11]]
    for j in range(out_row.shape[0]):
        p0 = (g0 * r0[j] + g1 * r1[j]) + (g2 * r2[j] + g3 * r3[j])
        p1 = (g4 * r4[j] + g5 * r5[j]) + (g6 * r6[j] + g7 * r7[j])
        p2 = (g8 * r8[j] + g9 * r9[j]) + (g10 * r10[j] + g11 * r11[j])
        out_row[j] = (p0 + p1) + p2


@njit(**_JIT)
def _fff_output(w_out, depth, route, logits, out_row):
    """out = sum over the path of GELU(z) * w_out[node]: the first 12 rows in one pass
    (`_output_12`: out_row written once, never zeroed or read), then four rows per pass over
    out_row (a quarter of the loads and stores of out_row that one row per pass costs)."""
    h = out_row.shape[0]
    level = 0
    if depth + 1 >= 12:
        _output_12(w_out, route, logits, out_row)
        level = 12
    else:
        for j in range(h):
            out_row[j] = np.float32(0.0)
    while level + 4 <= depth + 1:
        g0 = gelu_scalar(logits[level])
        g1 = gelu_scalar(logits[level + 1])
        g2 = gelu_scalar(logits[level + 2])
        g3 = gelu_scalar(logits[level + 3])
        r0 = w_out[route[level]]
        r1 = w_out[route[level + 1]]
        r2 = w_out[route[level + 2]]
        r3 = w_out[route[level + 3]]
        for j in range(h):
            out_row[j] += (g0 * r0[j] + g1 * r1[j]) + (g2 * r2[j] + g3 * r3[j])
        level += 4
    while level <= depth:
        g = gelu_scalar(logits[level])
        r = w_out[route[level]]
        for j in range(h):
            out_row[j] += g * r[j]
        level += 1


OUTPUT_BLOCK = 16  # tokens per claim in the output sweep


def _target_cpu() -> str:
    """The CPU name LLVM compiles the kernels for: the one Numba keys its cache on, so a cached
    kernel always holds the tunables of its own CPU."""
    import llvmlite.binding as llvm
    from numba.core import config
    return config.CPU_NAME or llvm.get_host_cpu_name()


# Tunables of the walk that suit one CPU and not another, read once at import (numbers:
# bench/README.md, "The walk per CPU"). A CPU not listed keeps DEFAULT_TUNING, the tuning
# measured on Zen 4.
#   leaf_order_min: tokens from which the output sweep takes them by leaf (`_leaf_order`).
NEVER = 1 << 62
DEFAULT_TUNING = {"leaf_order_min": NEVER}
WALK_TUNING = {
    "icelake-server": {"leaf_order_min": 512},    # Xeon Ice Lake-SP: w_out rows from a slow L3 and DRAM
}
TUNING = {**DEFAULT_TUNING, **WALK_TUNING.get(_target_cpu(), {})}
LEAF_ORDER_MIN = TUNING["leaf_order_min"]


@njit(**_JIT)
def _leaf_order(routes, depth, min_tokens):  # routes [T, D+1] -> [T] int32 token ids, or [0]
    """The order the output sweep takes the tokens in: by leaf (a counting sort, stable) from
    `min_tokens` tokens on; below, an empty array, which means token order (nothing allocated).
    Tokens with one leaf share their whole path, and neighbouring leaves their upper levels, so
    a w_out row is read from memory once for all the tokens on it instead of once per token;
    each token's output is computed by the same code, so its bits do not depend on the order."""
    t_count = routes.shape[0]
    if t_count < min_tokens:
        return routes[:0, depth]
    order = np.empty(t_count, np.int32)
    first = (1 << depth) - 1                       # heap id of the first leaf
    starts = np.zeros((1 << depth) + 1, np.int64)  # [leaves + 1]
    for t in range(t_count):
        starts[routes[t, depth] - first + 1] += 1
    for i in range(1, starts.shape[0]):
        starts[i] += starts[i - 1]
    for t in range(t_count):
        leaf = routes[t, depth] - first
        order[starts[leaf]] = t
        starts[leaf] += 1
    return order


@njit(inline="always", **_JIT)
def _fff_route_block(tile, args):  # one route tile, counted done for the output sweep
    x, w_in, b_in, depth, routes, logits, state = args
    _fff_route_tile(x, w_in, b_in, depth, routes, logits, tile)
    fetch_add(state, SHARED_DONE, 1)


@njit(inline="always", **_JIT)
def _fff_output_block(b, args):  # order: [T] token ids, or [0] for token order (`_leaf_order`)
    w_out, depth, routes, logits, out, order = args
    for i in range(b * OUTPUT_BLOCK, min((b + 1) * OUTPUT_BLOCK, out.shape[0])):
        t = order[i] if order.shape[0] else i
        _fff_output(w_out, depth, routes[t], logits[t], out[t])


_fff_route_loop = claim_loop(_fff_route_block)
_fff_output_loop = claim_loop(_fff_output_block)


@njit(**_JIT)
def fff_walk(x, w_in, b_in, w_out, depth, out, routes, logits, state):
    """x [T, H], w_in [N, H], b_in [N], w_out [N, H] -> out [T, H], routes/logits [T, D+1].
    A shared kernel (see "Shared kernels"): threads claim route tiles, wait until every tile is
    routed (only for tiles other threads are still on), then claim blocks of outputs.

    Only the visited rows of w_in and w_out are read: 2 * (D+1) rows instead of 2 * (2^(D+1)-1).
    """
    fetch_add(state, SHARED_INSIDE, 1)
    tiles = (x.shape[0] + ROUTE_TILE - 1) // ROUTE_TILE
    _fff_route_loop(state, SHARED_NEXT, tiles, (x, w_in, b_in, depth, routes, logits, state))
    while fetch_add(state, SHARED_DONE, 0) < tiles:   # tiles other threads are still routing
        pass
    order = _leaf_order(routes, depth, LEAF_ORDER_MIN)   # [T], the same in every thread
    blocks = (x.shape[0] + OUTPUT_BLOCK - 1) // OUTPUT_BLOCK
    _fff_output_loop(state, SHARED_NEXT_2, blocks, (w_out, depth, routes, logits, out, order))
    fetch_add(state, SHARED_INSIDE, -1)


# ---------------------------------------------------------------------------------------------
# int8 projections: per-token quantized activations times per-output-channel int8 weights
# ---------------------------------------------------------------------------------------------
# out[m, n] = float32(sum_k xq[m, k] * wq[n, k]) * (x_scale[m] * w_scale[n]), the sum exact in int32.
# Activations: s8 in [-127, 127], scale max|x| / 127 per token, K padded with zeros to INT8_K_ALIGN.
# Two products, one per weight layout (ufcpu/quant.py packs the weights for the one the CPU runs):
# - matmul_s8_rows: plain rows [N, Kp], summed exactly on the float32 units (below); any CPU.
# - matmul_s8_vnni: AVX-512 VNNI vpdpbusd on packed groups [Np/16, Kp/4, 16, 4]; only where the
#   CPU has avx512_vnni (elsewhere its instruction is illegal), chosen by `INT8_FEATURE`.

INT8_K_ALIGN = 4     # K of activations and weights padded to a 4-byte group (one vpdpbusd lane)
VNNI_GROUP = 16      # output columns of one vpdpbusd (16 int32 lanes)
VNNI_GROUPS = 4      # column groups of a register block: 4 tokens x 64 columns in 16 zmm accumulators
VNNI_ROWS = 4        # tokens of a register block
VNNI_COLS = VNNI_GROUP * VNNI_GROUPS   # output columns per claim; N is padded to a multiple of it
U8_BIAS = np.int32(128)                # vpdpbusd multiplies u8 by s8: x + 128, minus 128 * sum_k w[n, k]


# fastmath=False said explicitly: a callee left unset inherits its fast-math caller's flags (and
# reassociates), and every int8 product must round these two multiplications the same way.
_STRICT = dict(cache=_JIT["cache"], nogil=True, fastmath=False)

@njit(**_STRICT)
def _dequant(acc, x_scale, w_scale):  # exact integer sum (as float32) -> the output value
    return acc * (x_scale * w_scale)


@njit(**_STRICT)   # as _dequant
def _dequant_tile(acc, xs, ws, out, m, n):  # acc [4, 4] exact sums of tokens m.., columns n..n+3 -> out
    for r in range(min(4, out.shape[0] - m)):
        c = xs[m + r]
        for j in range(4):
            out[m + r, n + j] = acc[r, j] * (c * ws[n + j])


@njit(**_STRICT)   # a true division: fast-math's a * (1 / b) is 1 ulp off
def _divide(a, b):
    return a / b


@njit(inline="always", **_JIT)
def _quantize_row(x, q, scale, t):
    row = x[t]
    amax = np.float32(0.0)
    bad = False
    for k in range(row.shape[0]):
        a = abs(row[k])
        bad |= a != a
        amax = max(amax, a)
    qr = q[t]
    if bad or not np.isfinite(amax) or amax == np.float32(0.0):   # NaN/inf give NaN outputs, zeros give zeros
        scale[t] = np.float32(np.nan) if amax != np.float32(0.0) or bad else np.float32(0.0)
        for k in range(qr.shape[0]):
            qr[k] = 0
        return
    inv = _divide(np.float32(127.0), amax)
    scale[t] = _divide(amax, np.float32(127.0))
    for k in range(row.shape[0]):
        qr[k] = np.int8(min(max(np.rint(row[k] * inv), np.float32(-127.0)), np.float32(127.0)))
    for k in range(row.shape[0], qr.shape[0]):
        qr[k] = 0


@njit(inline="always", **_JIT)
def _quantize_block(blk, args):
    x, q, scale = args
    for t in range(blk * ROW_BLOCK, min((blk + 1) * ROW_BLOCK, x.shape[0])):
        _quantize_row(x, q, scale, t)


_quantize_loop = claim_loop(_quantize_block)


@njit(**_JIT)
def quantize_rows(x, q, scale, state):  # x [M, K] float32 -> q [M, Kp] int8, scale [M] float32; shared
    fetch_add(state, SHARED_INSIDE, 1)
    _quantize_loop(state, SHARED_NEXT, (x.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK, (x, q, scale))
    fetch_add(state, SHARED_INSIDE, -1)


# The portable product sums int8 values on the float32 units, as matmul_nt does, from a quarter of
# its weight bytes: exact, since every partial sum stays below 2^24 for K <= S8_FLOAT_K (127 * 127 *
# 1040 < 2^24). Integer sums (Numba's arithmetic is int64) vectorised badly: 12-34 GOPS against 60-68
# for this, M = 128, one core; cutting K into chunks inside the kernel stopped the vectorisation too.
S8_FLOAT_K = 1040


@njit(inline="always", **_JIT)
def _s8_rows_block(xq, xs, wq, ws, out, nb):  # rows 4nb..4nb+3 of wq, every token
    m_count, k_count = xq.shape
    n_count = out.shape[1]
    n = nb * 4
    if n + 4 > n_count:       # the last rows when N % 4 != 0: one dot product each
        for r in range(n, n_count):
            wr = wq[r]
            for m in range(m_count):
                xm = xq[m]
                acc = np.float32(0.0)
                for k in range(k_count):
                    acc += np.float32(xm[k]) * np.float32(wr[k])
                out[m, r] = _dequant(acc, xs[m], ws[r])
        return
    w0, w1, w2, w3 = wq[n], wq[n + 1], wq[n + 2], wq[n + 3]
    last = m_count - 1
    acc = np.empty((4, 4), np.float32)
    for m in range(0, m_count, 4):   # 4 tokens x 4 rows, tokens past the end repeat the last
        x0 = xq[m]
        x1 = xq[min(m + 1, last)]
        x2 = xq[min(m + 2, last)]
        x3 = xq[min(m + 3, last)]
        a00 = a01 = a02 = a03 = np.float32(0.0)
        a10 = a11 = a12 = a13 = np.float32(0.0)
        a20 = a21 = a22 = a23 = np.float32(0.0)
        a30 = a31 = a32 = a33 = np.float32(0.0)
        for k in range(k_count):
            u0, u1, u2, u3 = np.float32(w0[k]), np.float32(w1[k]), np.float32(w2[k]), np.float32(w3[k])
            v = np.float32(x0[k])
            a00 += v * u0; a01 += v * u1; a02 += v * u2; a03 += v * u3  # noqa: E702
            v = np.float32(x1[k])
            a10 += v * u0; a11 += v * u1; a12 += v * u2; a13 += v * u3  # noqa: E702
            v = np.float32(x2[k])
            a20 += v * u0; a21 += v * u1; a22 += v * u2; a23 += v * u3  # noqa: E702
            v = np.float32(x3[k])
            a30 += v * u0; a31 += v * u1; a32 += v * u2; a33 += v * u3  # noqa: E702
        acc[0, 0], acc[0, 1], acc[0, 2], acc[0, 3] = a00, a01, a02, a03
        acc[1, 0], acc[1, 1], acc[1, 2], acc[1, 3] = a10, a11, a12, a13
        acc[2, 0], acc[2, 1], acc[2, 2], acc[2, 3] = a20, a21, a22, a23
        acc[3, 0], acc[3, 1], acc[3, 2], acc[3, 3] = a30, a31, a32, a33
        _dequant_tile(acc, xs, ws, out, m, n)


@njit(inline="always", **_JIT)
def _s8_rows_grain(g, args):
    xq, xs, wq, ws, out = args
    blocks = (out.shape[1] + 3) // 4
    for nb in range(g * MATMUL_NT_GRAIN, min((g + 1) * MATMUL_NT_GRAIN, blocks)):
        _s8_rows_block(xq, xs, wq, ws, out, nb)


_s8_rows_loop = claim_loop(_s8_rows_grain)


@njit(**_JIT)
def matmul_s8_rows(xq, xs, wq, ws, out, state):  # xq [M, Kp] s8, xs [M], wq [N, Kp] s8, ws [N] -> out [M, N]; Kp <= S8_FLOAT_K; shared
    fetch_add(state, SHARED_INSIDE, 1)
    grains = ((out.shape[1] + 3) // 4 + MATMUL_NT_GRAIN - 1) // MATMUL_NT_GRAIN
    _s8_rows_loop(state, SHARED_NEXT, grains, (xq, xs, wq, ws, out))
    fetch_add(state, SHARED_INSIDE, -1)


@intrinsic
def _vnni_tile(typingctx, x0, x1, x2, x3, w, w_stride, kq, acc):
    """The register block of matmul_s8_vnni, written in LLVM IR (Numba has no vector types):
    acc[r, 16g + j] = sum_i u8(x_r[4i..4i+3]) . s8(w[g * w_stride + 64i + 4j ..]) for 4 token rows
    x_r, 4 column groups g, i < kq; x_r are s8 rows, made u8 by flipping the top bit (x + 128).
    Addresses are integers (`arr.ctypes.data`); acc is int32 [4, 64]."""
    def codegen(context, builder, signature, args):
        i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
        v16 = ir.VectorType(i32, VNNI_GROUP)
        # The <16 x i32> operand form: LLVM 22 (llvmlite 0.46) declares <64 x i8> and upgrades this one.
        dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16, v16, v16]),
                                            "llvm.x86.avx512.vpdpbusd.512")
        xs = [builder.inttoptr(a, i8.as_pointer()) for a in args[:4]]
        wbase = builder.inttoptr(args[4], i8.as_pointer())
        stride = context.cast(builder, args[5], signature.args[5], types.int64)
        count = context.cast(builder, args[6], signature.args[6], types.int64)
        cells = [[cgutils.alloca_once_value(builder, ir.Constant(v16, None)) for _ in range(VNNI_GROUPS)]
                 for _ in range(VNNI_ROWS)]
        flip = ir.Constant(i32, 0x80808080 - (1 << 32))
        zeros = ir.Constant(ir.VectorType(i32, VNNI_GROUP), None)
        with cgutils.for_range(builder, count) as loop:
            i = loop.index
            wv = []
            for g in range(VNNI_GROUPS):
                off = builder.add(builder.mul(ir.Constant(i64, g), stride), builder.mul(i, ir.Constant(i64, 64)))
                ptr = builder.bitcast(builder.gep(wbase, [off]), v16.as_pointer())
                wv.append(builder.load(ptr, align=1))
            for r in range(VNNI_ROWS):
                ptr = builder.bitcast(builder.gep(xs[r], [builder.mul(i, ir.Constant(i64, 4))]), i32.as_pointer())
                word = builder.xor(builder.load(ptr, align=1), flip)
                bcast = builder.shuffle_vector(builder.insert_element(zeros, word, ir.Constant(i32, 0)), zeros,
                                               ir.Constant(ir.VectorType(i32, VNNI_GROUP), None))
                for g in range(VNNI_GROUPS):
                    cell = cells[r][g]
                    builder.store(builder.call(dp, [builder.load(cell), bcast, wv[g]]), cell)
        acc_type = signature.args[7]
        acc_arr = context.make_array(acc_type)(context, builder, args[7])
        base = builder.bitcast(acc_arr.data, i32.as_pointer())
        for r in range(VNNI_ROWS):
            for g in range(VNNI_GROUPS):
                ptr = builder.bitcast(builder.gep(base, [ir.Constant(i64, r * VNNI_COLS + g * VNNI_GROUP)]),
                                      v16.as_pointer())
                builder.store(builder.load(cells[r][g]), ptr, align=4)
        return context.get_dummy_value()
    return types.void(x0, x1, x2, x3, w, w_stride, kq, acc), codegen


@njit(inline="always", **_JIT)
def _vnni_block(b, args):  # output columns 64b..64b+63 of every token
    xq, xs, ws, wsum, out, acc, base_x, row_x, base_w, group_bytes, kq = args
    m_count = xq.shape[0]
    last = m_count - 1
    w = base_w + b * VNNI_GROUPS * group_bytes
    n0 = b * VNNI_COLS
    n1 = min(n0 + VNNI_COLS, out.shape[1])
    for m in range(0, m_count, VNNI_ROWS):
        _vnni_tile(base_x + m * row_x, base_x + min(m + 1, last) * row_x,
                   base_x + min(m + 2, last) * row_x, base_x + min(m + 3, last) * row_x,
                   w, group_bytes, kq, acc)
        for r in range(min(VNNI_ROWS, m_count - m)):   # slices from 0: a loop LLVM vectorises
            c = xs[m + r]
            o = out[m + r, n0:n1]
            a = acc[r]
            s = ws[n0:n1]
            z = wsum[n0:n1]
            for j in range(o.shape[0]):
                o[j] = _dequant(np.float32(a[j] - z[j]), c, s[j])


_vnni_loop = claim_loop(_vnni_block)


@njit(**_JIT)
def matmul_s8_vnni(xq, xs, wp, ws, wsum, out, state):
    """xq [M, Kp] s8, xs [M], wp [Np/16, Kp/4, 16, 4] s8 (column n = 16 g + j at wp[g, :, j]),
    ws [N], wsum [N] int32 = 128 * sum_k w[n, k] -> out [M, N]; shared over blocks of 64 columns.
    Every register block reads 4 token rows (the last repeated past M) and 4 column groups."""
    fetch_add(state, SHARED_INSIDE, 1)
    kq = wp.shape[1]
    acc = np.empty((VNNI_ROWS, VNNI_COLS), np.int32)   # this thread's register block, stored
    args = (xq, xs, ws, wsum, out, acc, np.int64(xq.ctypes.data),   # int64: uintp + int64 would be a float
            np.int64(xq.strides[0]), np.int64(wp.ctypes.data), kq * VNNI_GROUP * 4, kq)
    _vnni_loop(state, SHARED_NEXT, wp.shape[0] // VNNI_GROUPS, args)
    fetch_add(state, SHARED_INSIDE, -1)


def host_features() -> frozenset:
    """The CPU features LLVM compiles the kernels for (llvmlite's reading of this CPU)."""
    import llvmlite.binding as llvm
    return frozenset(k for k, v in llvm.get_host_cpu_features().items() if v)


# int8 product -> the CPU feature it needs (None: any CPU), fastest first; quant.py picks from here
INT8_FEATURE = {matmul_s8_vnni: "avx512vnni", matmul_s8_rows: None}


def int8_kernels() -> list:
    """-> the int8 products this CPU runs, fastest first."""
    have = host_features()
    return [k for k, feature in INT8_FEATURE.items() if feature is None or feature in have]


# ---------------------------------------------------------------------------------------------
# Registry: every shared kernel, with the size from which helpers join it and what to compile for
# ---------------------------------------------------------------------------------------------
# Offering a share costs the caller a queue put; a helper that wakes for a kernel too small to
# split only takes CPU from the caller's next step. Helpers are offered a share from the size
# (elements of the first argument) where they paid off (bench/README.md, "Threads";
# `python bench/kernels.py`).

_SHARED = {  # kernel -> first-argument size from which helpers are offered a share
    matmul_nt: 2 * 768,
    fff_walk: 32 * 768,
    layer_norm: 256 * 768,
    attention_heads: 64 * 3 * 768,  # QKV elements: from 64 tokens of the full model
    gelu_: 16 * 3072,
    quantize_rows: 256 * 768,       # as LayerNorm: one pass over each row
    matmul_s8_rows: 2 * 768,        # as matmul_nt
    matmul_s8_vnni: 2 * 768,
}


def _example_calls() -> dict:
    """kernel -> tiny arguments (without the state) of every type combination the engine
    passes: weights are read-only views into a memory map, activations are writable."""
    f32 = np.float32
    x = np.ones((2, 4), f32)

    def ro(a):
        a.flags.writeable = False
        return a

    kinds = (ro, lambda a: a)
    calls = {
        gelu_: [(np.ones((2, 4), f32),)],
        layer_norm: [(x, k(np.ones(4, f32)), k(np.zeros(4, f32)), f32(1e-12), np.empty_like(x)) for k in kinds],
        attention_heads: [(np.ones((2, 6), f32), np.zeros((1, 2), f32), f32(1.0), 1, np.empty((2, 2), f32))],
        matmul_nt: [(x, k(np.ones((3, 4), f32)), np.empty((2, 3), f32)) for k in kinds],
        fff_walk: [(x, k(np.ones((3, 4), f32)), k(np.zeros(3, f32)), k(np.ones((3, 4), f32)), 1,
                    np.empty_like(x), np.empty((2, 2), np.int32), np.empty((2, 2), f32)) for k in kinds],
        quantize_rows: [(k(np.ones((2, 4), f32)), np.empty((2, 4), np.int8), np.empty(2, f32)) for k in kinds],
        matmul_s8_rows: [(np.ones((2, 4), np.int8), np.ones(2, f32), k(np.ones((3, 4), np.int8)), k(np.ones(3, f32)),
                          np.empty((2, 3), f32)) for k in kinds],
    }
    if matmul_s8_vnni in int8_kernels():   # never compiled where its instruction does not exist
        calls[matmul_s8_vnni] = [(np.ones((2, 4), np.int8), np.ones(2, f32), k(np.ones((4, 1, 16, 4), np.int8)),
                                  k(np.ones(3, f32)), k(np.zeros(3, np.int32)), np.empty((2, 3), f32)) for k in kinds]
    return calls


def warmup() -> None:
    """Compile (or load from the cache) every kernel."""
    for kernel, calls in _example_calls().items():
        for args in calls:
            kernel(*args, np.zeros(SHARED_SLOTS, np.int64))
    helpers_done(np.zeros(SHARED_SLOTS, np.int64), 1)


# Numba would unpickle whatever it finds in its cache folder: every kernel's cache checks its files.
settings.guard_kernel_caches(v for v in list(globals().values()) if isinstance(v, CPUDispatcher))
