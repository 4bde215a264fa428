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
import platform

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.core.registry import CPUDispatcher
from numba.extending import intrinsic

from . import settings

# LLVM fast-math flags: everything but the two that drop NaN/inf semantics.
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
_JIT = dict(cache=settings.kernel_cache_dir() is not None, fastmath=FASTMATH, nogil=True)

SQRT1_2 = np.float32(1.0 / math.sqrt(2.0))   # exact GELU: 0.5 z (1 + erf(z / sqrt 2))
MASK_BIAS = np.float32(-10000.0)              # additive score of a padded key, as the reference does


ALIGN = 64   # bytes: a cache line, and one zmm load


@njit(**_JIT)
def lanes_to_align(a):  # float32 array -> how many elements from its start to the first ALIGN boundary
    return (-a.ctypes.data % ALIGN) // 4


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
SHARED_THREADS = 4   # threads the caller expects to join (0: unknown); a small input may be cut for them
SHARED_SLOTS = 5


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


@intrinsic
def load_acquire(typingctx, array, index):
    """array[index] (int64), read atomically: a thread spinning on a counter reads it so, because
    an atomic add would take the cache line from its writer at every check."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        arr = context.make_array(array_type)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, array_type, arr, [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)
    return types.int64(array, index), codegen


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


@intrinsic
def _spin_pause(typingctx):
    """x86's `pause` (a spinning thread yields the core's pipeline and saves power); elsewhere nothing."""
    def codegen(context, builder, signature, args):
        if _X86:
            pause = builder.module.declare_intrinsic("llvm.x86.sse2.pause", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(pause, [])
        return context.get_dummy_value()
    return types.void(), codegen


@njit(**_JIT)
def wait_offer(posted, seen, ahead, checks, awake, box):
    """Spin, at most `checks` checks a pause apart, until posted[0] is no longer `seen` (an offer)
    and the shared state `ahead` shows its caller inside the kernel -> whether an offer came.
    awake[0] counts the helpers running Python: one less while this one waits here.
    A helper waits here between kernels, without the GIL: the OS takes tens of microseconds to
    wake a sleeping thread, and a helper that took the GIL before the caller let it go would sleep
    on it (the caller holds the GIL until its own kernel starts). Meanwhile it joins every
    kernel posted to `box` ("The box"), and spins `checks` more after each."""
    fetch_add(awake, 0, -1)
    fetch_add(box, BOX_SPINNING, 1)
    offered = False
    box_seen = np.int64(-1)
    left = checks
    while left > 0:
        left -= 1
        if not offered:
            offered = load_acquire(posted, 0) != seen
        if offered and (load_acquire(ahead, SHARED_INSIDE) > 0 or load_acquire(ahead, SHARED_NEXT) > 0):
            break
        if load_acquire(box, BOX_EPOCH) != box_seen:
            box_seen = _box_turn(box, box_seen)
            left = checks
        _spin_pause()
    fetch_add(box, BOX_SPINNING, -1)
    fetch_add(awake, 0, 1)
    return offered


@njit(**_JIT)
def count_add(counter, value):
    """counter[0] += value, atomically (for Python code sharing a counter with kernels)."""
    fetch_add(counter, 0, value)


@njit(**_JIT)
def wait_zero(counter, index, checks):
    """Spin until counter[index] is 0, at most `checks` checks a pause apart -> whether it is."""
    for _ in range(checks):
        if load_acquire(counter, index) == 0:
            return True
        _spin_pause()
    return False


@njit(**_JIT)
def helpers_done(state, spins):
    """Spin until no thread is inside the kernel, at most `spins` checks -> whether none is."""
    return wait_zero(state, SHARED_INSIDE, spins)


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
    n = np.float32(h)   # (a float32 divided by an int is a float64 in Numba: every pass below was)
    mean = np.float32(0.0)
    for j in range(h):
        mean += row[j]
    mean /= n
    var = np.float32(0.0)
    for j in range(h):
        d = row[j] - mean
        var += d * d
    var /= n
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


@njit(inline="always", **_JIT)
def _add_layer_norm_block(blk, args):
    x, d, w, b, eps, s, out = args
    for t in range(blk * ROW_BLOCK, min((blk + 1) * ROW_BLOCK, x.shape[0])):
        xt, dt, st = x[t], d[t], s[t]
        for j in range(st.shape[0]):
            st[j] = xt[j] + dt[j]
        _layer_norm_row(s, w, b, eps, out, t)


_add_layer_norm_loop = claim_loop(_add_layer_norm_block)


@njit(**_JIT)
def add_layer_norm(x, d, w, b, eps, s, out, state):  # [T, H] x2, [H], [H], float -> s = x + d, out = LN(s); shared
    """A residual add and the LayerNorm after it in one pass over each row (a layer has two)."""
    fetch_add(state, SHARED_INSIDE, 1)
    _add_layer_norm_loop(state, SHARED_NEXT, (x.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK, (x, d, w, b, eps, s, out))
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


def _exp_ir(builder, x):
    """IR of exp on a <16 x float> x, Cephes' exp2f: x = (n + f) ln 2 with |f| <= 1/2, 2^f by its
    polynomial, 2^n from its exponent bits. x is clamped at EXP_MIN first (so that 2^n is a
    float32) and the result below it is 0, exactly. FMAs, no fast-math flags: a fixed rounding."""
    f, i32 = ir.FloatType(), ir.IntType(32)
    vec, ivec = ir.VectorType(f, F32_LANES), ir.VectorType(i32, F32_LANES)
    module = builder.module
    fma = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec, vec, vec]), "llvm.fma.v16f32")
    floor = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec]), "llvm.floor.v16f32")

    def splat(c):
        return ir.Constant(vec, [ir.Constant(f, float(c))] * F32_LANES)
    below = builder.fcmp_ordered("<", x, splat(EXP_MIN))
    t = builder.fmul(builder.select(below, splat(EXP_MIN), x), splat(LOG2E))
    n = builder.call(floor, [builder.fadd(t, splat(0.5))])
    frac = builder.fsub(t, n)
    p = splat(P0)
    for c in (P1, P2, P3, P4, P5):
        p = builder.call(fma, [p, frac, splat(c)])
    p = builder.call(fma, [p, frac, splat(1.0)])
    bits = builder.shl(builder.add(builder.fptosi(n, ivec), ir.Constant(ivec, [ir.Constant(i32, 127)] * F32_LANES)),
                       ir.Constant(ivec, [ir.Constant(i32, 23)] * F32_LANES))
    e = builder.fmul(p, builder.bitcast(bits, vec))
    return builder.select(below, splat(0.0), e)


@intrinsic
def _exp16(typingctx, src, dst):
    """dst[0:16] = exp(src[0:16]) (addresses), through _exp_ir."""
    def codegen(context, builder, signature, args):
        vec = ir.VectorType(ir.FloatType(), F32_LANES)
        a, b = (builder.inttoptr(context.cast(builder, v, t, types.int64), vec.as_pointer())
                for v, t in zip(args, signature.args))
        builder.store(_exp_ir(builder, builder.load(a, align=4)), b, align=4)
        return context.get_dummy_value()
    return types.void(src, dst), codegen


@njit(**_JIT)
def exp_f32(x, out):
    """out = exp(x) for float32 [n] arrays, 16 at a time (the softmax's exp, for its tests)."""
    buf = np.zeros(F32_LANES, np.float32)
    res = np.empty(F32_LANES, np.float32)
    for i in range(0, x.shape[0], F32_LANES):
        k = min(F32_LANES, x.shape[0] - i)
        buf[:k] = x[i:i + k]
        _exp16(np.int64(buf.ctypes.data), np.int64(res.ctypes.data))
        out[i:i + k] = res[:k]


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
# The softmax then runs down the columns, 32 queries at once in two vectors (LLVM IR, _softmax_tile),
# each query's scores in key order: times the scale plus the key's bias, the max, exp of the
# difference, their sum, times 1 / sum.

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


@intrinsic
def _softmax_tile(typingctx, st, st_row, s_len, bias, scale):
    """Softmax down the columns of scores^T [s_len, 32] (a query per column, rows st_row bytes
    apart, at address st), in place: times `scale` plus the key's bias (float32 [s_len] at address
    bias), minus the column's max, exp, times 1 / the column's sum. Written in LLVM IR with the 32
    columns in two vectors: the maxima and sums stay in registers over the keys."""
    def codegen(context, builder, signature, args):
        f, i64 = ir.FloatType(), ir.IntType(64)
        vec = ir.VectorType(f, F32_LANES)
        st, st_row, s_len, bias = (context.cast(builder, v, t, types.int64) for v, t in zip(args[:4], signature.args[:4]))
        scale = context.cast(builder, args[4], signature.args[4], types.float32)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), "llvm.fma.v16f32")
        undef, lanes = ir.Constant(vec, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), F32_LANES), None)

        def splat(value):
            return builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0)), undef, lanes)

        def halves(k):   # the two <16 x float> pointers of row k
            row = builder.add(st, builder.mul(k, st_row))
            return [builder.inttoptr(builder.add(row, ir.Constant(i64, 4 * F32_LANES * h)), vec.as_pointer()) for h in (0, 1)]
        vs = splat(scale)
        neg = ir.Constant(vec, [ir.Constant(f, float("-inf"))] * F32_LANES)
        m = [cgutils.alloca_once_value(builder, neg) for _ in (0, 1)]
        total = [cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in (0, 1)]
        with cgutils.for_range(builder, s_len) as loop:    # scores * scale + bias, and the max
            b = splat(builder.load(builder.inttoptr(builder.add(bias, builder.mul(loop.index, ir.Constant(i64, 4))),
                                                    f.as_pointer()), align=4))
            for h, ptr in enumerate(halves(loop.index)):
                v = builder.call(fma, [builder.load(ptr, align=4), vs, b])
                builder.store(v, ptr, align=4)
                old = builder.load(m[h])
                builder.store(builder.select(builder.fcmp_ordered(">", v, old), v, old), m[h])
        with cgutils.for_range(builder, s_len) as loop:    # exp of the difference, and the sum
            for h, ptr in enumerate(halves(loop.index)):
                e = _exp_ir(builder, builder.fsub(builder.load(ptr, align=4), builder.load(m[h])))
                builder.store(e, ptr, align=4)
                builder.store(builder.fadd(builder.load(total[h]), e), total[h])
        one = ir.Constant(vec, [ir.Constant(f, 1.0)] * F32_LANES)
        inv = [builder.fdiv(one, builder.load(total[h])) for h in (0, 1)]
        with cgutils.for_range(builder, s_len) as loop:    # times 1 / sum
            for h, ptr in enumerate(halves(loop.index)):
                builder.store(builder.fmul(builder.load(ptr, align=4), inv[h]), ptr, align=4)
        return context.get_dummy_value()
    return types.void(st, st_row, s_len, bias, scale), codegen


def _prefetch_ir(builder, ptr, locality: int) -> None:
    """IR: ask for the cache line at i8* ptr without waiting for it (locality 3: into L1, 2: L2)."""
    i8, i32 = ir.IntType(8), ir.IntType(32)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8.as_pointer(), i32, i32, i32]),
                                        "llvm.prefetch.p0")
    builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, locality), ir.Constant(i32, 1)])


@intrinsic
def _prefetch(typingctx, address):
    """Ask for the cache line at an integer address (into L2 and closer), without waiting for it."""
    def codegen(context, builder, signature, args):
        address = context.cast(builder, args[0], signature.args[0], types.int64)
        _prefetch_ir(builder, builder.inttoptr(address, ir.IntType(8).as_pointer()), 2)
        return context.get_dummy_value()
    return types.void(address), codegen


@njit(inline="always", **_JIT)
def _prefetch_head(at, rows, row_bytes, cols, width_bytes):
    """Prefetch `width_bytes` at each of `cols` byte offsets in `rows` rows from `at`: a head's
    Q, K and V slices are 256 bytes in rows 9 KB apart, which the hardware prefetchers miss; asked
    for all at once they arrive together instead of one row's latency after another."""
    for r in range(rows):
        row = at + r * row_bytes
        for c in cols:
            for b in range(0, width_bytes, 64):
                _prefetch(row + c + b)


@njit(inline="always", **_JIT)
def _attention_block(blk, args):  # block blk = (sequence, head, query tile)
    qkv, seqs, key_bias, scale, out, heads, first, qt, st, kp, vp, cx = args
    seq = np.searchsorted(first, blk, side="right") - 1             # first [n + 1]: each sequence's first block
    base, s_len = seqs[seq, 0], seqs[seq, 1]                        # this sequence's first row, its length
    tiles = (s_len + ATTN_QUERY_TILE - 1) // ATTN_QUERY_TILE
    tile = (blk - first[seq]) % tiles
    head = (blk - first[seq]) // tiles
    hid = out.shape[1]
    d = hid // heads
    qc, kc, vc = head * d, hid + head * d, 2 * hid + head * d       # this head's Q | K | V columns
    q0 = tile * ATTN_QUERY_TILE
    rows = min(ATTN_QUERY_TILE, s_len - q0)
    row_bytes = np.int64(qkv.strides[0])
    at = np.int64(qkv.ctypes.data) + base * row_bytes              # this sequence's QKV rows
    if tile == 0:   # K and V are every key's (the first tile reads them), Q this tile's queries
        _prefetch_head(at, s_len, row_bytes, (kc * 4, vc * 4), d * 4)
    _prefetch_head(at + q0 * row_bytes, rows, row_bytes, (qc * 4,), d * 4)
    for c in range(rows):                                           # Q^T [d, 32]: past the tile's queries, zeros or an
        qr = qkv[base + q0 + c, qc:qc + d]                          # earlier tile's (finite; their columns are never read)
        for i in range(d):
            qt[i, c] = qr[i]
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
    _softmax_tile(st_at, st_row, s_len, np.int64(key_bias.ctypes.data) + seq * np.int64(key_bias.strides[0]), scale)
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
def attention_heads(qkv, seqs, key_bias, scale, heads, out, state):
    """qkv [T, 3H] (Q | K | V, feature = head*d + i in each; C-contiguous), seqs [n, 2] int64
    (first row in qkv, length) of each sequence, key_bias [n, S] additive (S >= every length; a
    sequence reads the first `length` of its row), scale float32 -> out [T, H] = softmax(Q K^T *
    scale + bias) V of each (sequence, head), feature = head*d + i; rows outside every sequence
    are not written. Shared over (sequence, head, query tile) blocks: sequences of every length
    in one launch."""
    fetch_add(state, SHARED_INSIDE, 1)
    n = seqs.shape[0]
    first = np.empty(n + 1, np.int64)                              # each sequence's first block
    first[0] = 0
    s_max = 1
    for i in range(n):
        first[i + 1] = first[i] + heads * ((seqs[i, 1] + ATTN_QUERY_TILE - 1) // ATTN_QUERY_TILE)
        s_max = max(s_max, seqs[i, 1])
    d = out.shape[1] // heads
    s_pad = (s_max + ATTN_KEY_ROWS - 1) // ATTN_KEY_ROWS * ATTN_KEY_ROWS
    d_pad = (d + F32_LANES - 1) // F32_LANES * F32_LANES
    args = (qkv, seqs, key_bias, scale, out, heads, first,        # and this thread's scratch:
            np.zeros((d, ATTN_QUERY_TILE), np.float32),            # Q^T (zeros: never a denormal in a spare column)
            np.empty((s_pad, ATTN_QUERY_TILE), np.float32),        # scores^T, then P^T
            np.empty((ATTN_KEY_ROWS, d), np.float32),              # the last keys, padded
            np.empty((s_max, d_pad), np.float32),                  # V, padded
            np.empty((ATTN_CTX_ROWS, 4 * F32_LANES), np.float32))  # a context tile
    _attention_loop(state, SHARED_NEXT, first[n], args)
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
#
# Tokens at one node share each load of its rows: the route sweep takes a tile's tokens by node
# at every pass, the output sweep gives four tokens on one path one pass over its rows. The sums
# are LLVM IR without fast-math flags (`_walk_dots`, `_walk_out`), the same code for a token
# alone or in any group, so a token's route, logits and output never depend on its batch; that
# is what lets the schedule change with the batch. Large batches on some CPUs (WALK_TUNING)
# route by tiles down to a split level, then by the subtree each token entered there, with its
# outputs: a deep row is read once for all the tokens at its node.

ROUTE_TILE = 16   # tokens whose routes advance together, below ROUTE_TILE * ROUTE_TILES tokens
SHARE = 4         # tokens that share each load of a node's rows (`_dots_share3`, `_out_share`)


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
#   route_tile_max: the largest route tile (`route_tile`); tiles of 16 below 512 tokens.
#   split_group: tokens per node at the split level (`_split_level`); NEVER: no split.
#   walk_vec: floats per vector of the walk's sums (`_walk_dots`, `_walk_out`).
NEVER = 1 << 62
DEFAULT_TUNING = {"leaf_order_min": NEVER, "route_tile_max": ROUTE_TILE, "split_group": NEVER, "walk_vec": 8}
WALK_TUNING = {
    # Xeon Ice Lake-SP: an L3 as slow as DRAM, so deep rows are worth reading once per group;
    # full-width sums pay once the rows start on a cache line (`model.empty_aligned`)
    "icelake-server": {"leaf_order_min": 512, "route_tile_max": 64, "split_group": 32, "walk_vec": 16},
}
TUNING = {**DEFAULT_TUNING, **WALK_TUNING.get(_target_cpu(), {})}
LEAF_ORDER_MIN = TUNING["leaf_order_min"]
ROUTE_TILE_MAX = TUNING["route_tile_max"]
SPLIT_GROUP = TUNING["split_group"]
WALK_VEC = TUNING["walk_vec"]


def _vec_sum(builder, v):  # <n x float> -> float: lanes halved in a fixed order, no reassociation
    i32 = ir.IntType(32)
    width = v.type.count // 2
    while width >= 1:
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, width), list(range(width))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, width), list(range(width, 2 * width))))
        v = builder.fadd(lo, hi)
        width //= 2
    return builder.extract_element(v, ir.Constant(i32, 0)) if isinstance(v.type, ir.VectorType) else v


def _f32_at(builder, base, index, lanes):  # float* base, int64 index -> load 1 float (lanes 0) or a vector there
    ptr = builder.gep(base, [index])
    if lanes:
        return builder.load(builder.bitcast(ptr, ir.VectorType(ir.FloatType(), lanes).as_pointer()), align=4)
    return builder.load(ptr, align=4)


def _fma(builder, lanes):  # -> llvm.fma of <lanes x float> (lanes 0: of float)
    kind = ir.VectorType(ir.FloatType(), lanes) if lanes else ir.FloatType()
    name = f"llvm.fma.v{lanes}f32" if lanes else "llvm.fma.f32"
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(kind, [kind] * 3), name)


def _walk_dots(pairs, lanes=WALK_VEC):
    """-> an intrinsic dots(xs, ws, h): for each (s, r) in `pairs`, the dot product of the h
    floats at address xs[s] with the h floats at address ws[r], as a tuple of float32. Each x row
    and weight row is loaded once per chunk for every pair that uses it, so tokens at one node
    share the loads of its rows. Written in LLVM IR with no fast-math flags: every dot of every
    intrinsic made here with the same `lanes` is summed the same way (two partial sums of `lanes`
    lanes over chunks of 2 x lanes floats, one chunk of `lanes` into the first, the lanes halved,
    then the tail in order), so a dot's bits do not depend on which other dots share its pass."""
    n_x = 1 + max(s for s, _ in pairs)
    n_w = 1 + max(r for _, r in pairs)

    @intrinsic
    def dots(typingctx, xs, ws, h):
        def codegen(context, builder, signature, args):
            f32, i64 = ir.FloatType(), ir.IntType(64)
            vec = ir.VectorType(f32, lanes)
            fma_v, fma_s = _fma(builder, lanes), _fma(builder, 0)
            xp = [builder.inttoptr(a, f32.as_pointer()) for a in cgutils.unpack_tuple(builder, args[0], n_x)]
            wp = [builder.inttoptr(a, f32.as_pointer()) for a in cgutils.unpack_tuple(builder, args[1], n_w)]
            n = context.cast(builder, args[2], signature.args[2], types.int64)
            acc = [[cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in range(2)] for _ in pairs]
            tail = [cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0)) for _ in pairs]

            def step(off, half, vector):   # every pair's acc[half] (or tail) += w[off..] * x[off..]
                xv = [_f32_at(builder, p, off, lanes if vector else 0) for p in xp]
                wv = [_f32_at(builder, p, off, lanes if vector else 0) for p in wp]
                for d, (s, r) in enumerate(pairs):
                    cell = acc[d][half] if vector else tail[d]
                    builder.store(builder.call(fma_v if vector else fma_s, [wv[r], xv[s], builder.load(cell)]), cell)

            chunk = ir.Constant(i64, 2 * lanes)
            chunks = builder.sdiv(n, chunk)
            with cgutils.for_range(builder, chunks) as loop:
                off = builder.mul(loop.index, chunk)
                step(off, 0, True)
                step(builder.add(off, ir.Constant(i64, lanes)), 1, True)
            done = builder.mul(chunks, chunk)
            with builder.if_then(builder.icmp_signed(">=", builder.sub(n, done), ir.Constant(i64, lanes))):
                step(done, 0, True)
            start = builder.sub(n, builder.srem(n, ir.Constant(i64, lanes)))
            with cgutils.for_range_slice(builder, start, n, ir.Constant(i64, 1)) as (j, _):
                step(j, 0, False)
            sums = [builder.fadd(_vec_sum(builder, builder.fadd(builder.load(a0), builder.load(a1))), builder.load(t))
                    for (a0, a1), t in zip(acc, tail)]
            return context.make_tuple(builder, signature.return_type, sums)
        return types.UniTuple(types.float32, len(pairs))(xs, ws, h), codegen
    return dots


# The route sweep's passes: rows 0-2 are a node's and its two children's (2n+1, 2n+2), row 0 alone at the leaves.
_dots_pair3 = _walk_dots(((0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)))     # 2 tokens, their own 3 rows
_dots_share3 = _walk_dots(tuple((t, r) for t in range(SHARE) for r in range(3)))  # 4 tokens, one node's 3 rows
_dots_pair1 = _walk_dots(((0, 0), (1, 1)))
_dots_share1 = _walk_dots(tuple((t, 0) for t in range(SHARE)))


def _walk_out(k, lanes=WALK_VEC):
    """-> an intrinsic out_rows(gs, base, stride, route, n_rows, outs, h): for k tokens on one
    path, outs[i][j] = sum over levels l < n_rows of gs[i][l] * w[route[l]][j], w's rows at
    base + node * stride (bytes), route an int32 array's address, gs the tokens' GELU(z). Each
    row chunk is loaded once for the k tokens. Every column is the same chain of FMAs, level 0
    first, in every intrinsic made here with the same `lanes` (no fast-math flags), so a token's
    output does not depend on how many tokens shared its loads."""
    @intrinsic
    def out_rows(typingctx, gs, base, stride, route, n_rows, outs, h):
        def codegen(context, builder, signature, args):
            f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
            vec = ir.VectorType(f32, lanes)
            fma_v, fma_s = _fma(builder, lanes), _fma(builder, 0)
            gp = [builder.inttoptr(a, f32.as_pointer()) for a in cgutils.unpack_tuple(builder, args[0], k)]
            op = [builder.inttoptr(a, f32.as_pointer()) for a in cgutils.unpack_tuple(builder, args[5], k)]
            w0 = builder.inttoptr(args[1], ir.IntType(8).as_pointer())
            row_bytes = args[2]
            rp = builder.inttoptr(args[3], i32.as_pointer())
            n_rows = context.cast(builder, args[4], signature.args[4], types.int64)
            n = context.cast(builder, args[6], signature.args[6], types.int64)

            def columns(col, vecs):   # outs[.][col .. col + vecs * lanes) (vecs = 0: the one column col)
                width = vecs or 1
                kind = vec if vecs else f32
                cells = [[cgutils.alloca_once_value(builder, ir.Constant(kind, None)) for _ in range(width)]
                         for _ in range(k)]
                for row in cells:
                    for c in row:
                        builder.store(ir.Constant(kind, None), c)
                with cgutils.for_range(builder, n_rows) as level:
                    node = builder.sext(builder.load(builder.gep(rp, [level.index])), i64)
                    w = builder.bitcast(builder.gep(w0, [builder.mul(node, row_bytes)]), f32.as_pointer())
                    rv = [_f32_at(builder, w, builder.add(col, ir.Constant(i64, v * lanes)), lanes if vecs else 0)
                          for v in range(width)]
                    for i in range(k):
                        g = builder.load(builder.gep(gp[i], [level.index]))
                        if vecs:
                            g = builder.shuffle_vector(builder.insert_element(ir.Constant(vec, None), g, ir.Constant(i32, 0)),
                                                       ir.Constant(vec, None), ir.Constant(ir.VectorType(i32, lanes), None))
                        for v in range(width):
                            c = cells[i][v]
                            builder.store(builder.call(fma_v if vecs else fma_s, [rv[v], g, builder.load(c)]), c)
                for i in range(k):
                    for v in range(width):
                        ptr = builder.gep(op[i], [builder.add(col, ir.Constant(i64, v * lanes))])
                        if vecs:
                            ptr = builder.bitcast(ptr, vec.as_pointer())
                        builder.store(builder.load(cells[i][v]), ptr, align=4)

            block = 4 * lanes
            c_block = ir.Constant(i64, block)
            chunks = builder.sdiv(n, c_block)
            with cgutils.for_range(builder, chunks) as loop:
                columns(builder.mul(loop.index, c_block), 4)
            start = builder.mul(chunks, c_block)
            n_vec = builder.sub(n, builder.srem(n, ir.Constant(i64, lanes)))
            with cgutils.for_range_slice(builder, start, n_vec, ir.Constant(i64, lanes)) as (col, _):
                columns(col, 1)
            with cgutils.for_range_slice(builder, n_vec, n, ir.Constant(i64, 1)) as (col, _):
                columns(col, 0)
            return context.get_dummy_value()
        return types.void(gs, base, stride, route, n_rows, outs, h), codegen
    return out_rows


_out_one = _walk_out(1)
_out_share = _walk_out(SHARE)


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
def _route_pair(xa, b_in, wa, wst, h, depth, routes, logits, ta, tb, level):
    """Tokens ta and tb (tb == ta for a lone token), each at its own node: the logits at `level`
    and `level + 1` in one pass over their rows (the node's and both children's, adjacent in
    memory: the child's row is read while the node's is, instead of after a round trip for z).
    xa: the tokens' rows' addresses (ta's, tb's); wa, wst: w_in's address and row stride."""
    na = routes[ta, level]
    nb = routes[tb, level]
    if level == depth:          # the leaf level: one row each
        za, zb = _dots_pair1(xa, (wa + na * wst, wa + nb * wst), h)
        logits[ta, level] = b_in[na] + za
        logits[tb, level] = b_in[nb] + zb
        return
    la = 2 * na + 1
    lb = 2 * nb + 1
    za0, za1, za2, zb0, zb1, zb2 = _dots_pair3(
        xa, (wa + na * wst, wa + la * wst, wa + (la + 1) * wst, wa + nb * wst, wa + lb * wst, wa + (lb + 1) * wst),
        h)
    _route_take(routes, logits, depth, level, ta, b_in[na] + za0, b_in[la] + za1, b_in[la + 1] + za2, la)
    _route_take(routes, logits, depth, level, tb, b_in[nb] + zb0, b_in[lb] + zb1, b_in[lb + 1] + zb2, lb)


@njit(inline="always", **_JIT)
def _route_share(xa, b_in, wa, wst, h, depth, routes, logits, tk, level):
    """Four tokens tk at one node (the last repeated for fewer): the node's rows loaded once for
    all four, each token's sums the same bits as in `_route_pair`."""
    n0 = routes[tk[0], level]
    if level == depth:
        z = _dots_share1(xa, (wa + n0 * wst,), h)
        for i in range(SHARE):
            logits[tk[i], level] = b_in[n0] + z[i]
        return
    left = 2 * n0 + 1
    z = _dots_share3(xa, (wa + n0 * wst, wa + left * wst, wa + (left + 1) * wst), h)
    for i in range(SHARE):
        _route_take(routes, logits, depth, level, tk[i], b_in[n0] + z[3 * i], b_in[left] + z[3 * i + 1],
                    b_in[left + 1] + z[3 * i + 2], left)


@njit(inline="always", **_JIT)
def _group_end(routes, order, level, i, k):  # -> the end of the run of order[i:k] at order[i]'s node
    node = routes[order[i], level]
    j = i + 1
    while j < k and routes[order[j], level] == node:
        j += 1
    return j


@njit(**_JIT)
def _route_levels(x, w_in, b_in, depth, routes, logits, order, spare, level, stop):
    """Route the tokens of `order` (stably sorted by their node at `level`) through the passes
    at level, level + 2, ... below `stop`. Two levels per pass, across the tokens, so the row
    loads of different tokens are independent and overlap; at each pass the tokens are taken by
    node, four tokens at one node sharing each load of its rows, the rest two by two. On return
    `order` holds them sorted by their node at the last pass's level. spare: as long as order."""
    k = order.shape[0]
    h = x.shape[1]
    xa0, xst = np.int64(x.ctypes.data), np.int64(x.strides[0])   # int64: uintp + int64 would be a float
    wa, wst = np.int64(w_in.ctypes.data), np.int64(w_in.strides[0])
    while level < stop:
        n_rest = 0
        i = 0
        while i < k:
            j = _group_end(routes, order, level, i, k)
            while j - i >= SHARE - 1:          # three or more: one shared pass (a fourth repeats the third)
                tk = (order[i], order[min(i + 1, j - 1)], order[min(i + 2, j - 1)], order[min(i + 3, j - 1)])
                _route_share((xa0 + tk[0] * xst, xa0 + tk[1] * xst, xa0 + tk[2] * xst, xa0 + tk[3] * xst),
                             b_in, wa, wst, h, depth, routes, logits, tk, level)
                i = min(i + SHARE, j)
            while i < j:
                spare[n_rest] = order[i]
                n_rest += 1
                i += 1
        for r in range(0, n_rest, 2):
            ta, tb = spare[r], spare[min(r + 1, n_rest - 1)]
            _route_pair((xa0 + ta * xst, xa0 + tb * xst), b_in, wa, wst, h, depth, routes, logits, ta, tb, level)
        if level + 2 <= depth:   # re-sort: each node's run splits stably into its four grandchildren's
            i = 0
            n = 0
            while i < k:
                j = _group_end(routes, order, level, i, k)
                first = 4 * routes[order[i], level] + 3
                for c in range(4):
                    for m in range(i, j):
                        if routes[order[m], level + 2] == first + c:
                            spare[n] = order[m]
                            n += 1
                i = j
            for i in range(k):
                order[i] = spare[i]
        level += 2


@njit(**_JIT)
def _fff_route_tile(x, w_in, b_in, depth, routes, logits, tile, size, stop=1 << 30):
    """The paths of tokens [size tile, size tile + size) down to level `stop` (the node at stop
    included): node ids and logits z, root first (heap order: children 2n+1, 2n+2)."""
    t0 = tile * size
    t1 = min(t0 + size, x.shape[0])
    order = np.arange(t0, t1)   # int64, as t0
    for t in range(t0, t1):
        routes[t, 0] = 0
    _route_levels(x, w_in, b_in, depth, routes, logits, order, np.empty_like(order), 0, min(stop, depth + 1))


@njit(inline="always", **_JIT)
def _gelu_path(logits, g):  # [D+1] z on the path -> g [D+1] GELU(z), by one loop for every token
    for level in range(logits.shape[0]):
        g[level] = gelu_scalar(logits[level])


@njit(inline="always", **_JIT)
def _same_path(routes, a, b):
    for level in range(routes.shape[1]):
        if routes[a, level] != routes[b, level]:
            return False
    return True


@njit(**_JIT)
def _fff_output(w_out, routes, logits, out, tokens, g):
    """out[t] = sum over t's path of GELU(z) * w_out[node] for the tokens t of `tokens`, in that
    order: four consecutive tokens on one path share each load of its rows (`_out_share`), the
    others go one by one (`_out_one`), the same bits either way. g: [len(tokens), D+1] scratch."""
    n = tokens.shape[0]
    rows = routes.shape[1]
    wa, wst = np.int64(w_out.ctypes.data), np.int64(w_out.strides[0])
    ga, gst = np.int64(g.ctypes.data), np.int64(g.strides[0])
    oa, ost = np.int64(out.ctypes.data), np.int64(out.strides[0])
    ra, rst = np.int64(routes.ctypes.data), np.int64(routes.strides[0])
    h = out.shape[1]
    for i in range(n):
        _gelu_path(logits[tokens[i]], g[i])
    i = 0
    while i < n:
        t = tokens[i]
        if i + SHARE <= n and _same_path(routes, t, tokens[i + SHARE - 1]) and _same_path(routes, t, tokens[i + 1]) \
                and _same_path(routes, t, tokens[i + 2]):
            tk = (tokens[i], tokens[i + 1], tokens[i + 2], tokens[i + 3])
            _out_share((ga + i * gst, ga + (i + 1) * gst, ga + (i + 2) * gst, ga + (i + 3) * gst), wa, wst,
                       ra + t * rst, rows, (oa + tk[0] * ost, oa + tk[1] * ost, oa + tk[2] * ost, oa + tk[3] * ost), h)
            i += SHARE
        else:
            _out_one((ga + i * gst,), wa, wst, ra + t * rst, rows, (oa + t * ost,), h)
            i += 1


OUTPUT_BLOCK = 16  # tokens per claim in the output sweep


SPLIT_UNIT = 64    # tokens per claim below the split: one node's, in units small enough to share
SPLIT_PROBE = 64   # tokens routed to the split level to see whether they spread (`_worth_splitting`)
SPLIT_SPREAD = 8   # split when those enter more than one subtree in 8 of those they could
ROUTE_TILES = 16   # route tiles a large batch keeps at least, for the threads to share


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
def route_tile(t_count, largest, threads):  # tokens -> tokens per route tile: 16, up to `largest` for large batches
    """Larger tiles put more tokens at each node of a pass (more shared row loads); at least
    ROUTE_TILES tiles are kept for the threads to share. Fewer tokens than `threads` tiles of 16
    are cut evenly among the threads (a sentence's 11 tokens: 6 and 5), since one core's route
    sweep waits on its row loads while the other's memory bandwidth is idle; alone (threads <= 1)
    a small input stays one tile. Tiles change no bits."""
    size = ROUTE_TILE
    while size * 2 <= largest and size * 2 * ROUTE_TILES <= t_count:
        size *= 2
    if threads > 1 and t_count < threads * size:
        size = max(1, (t_count + threads - 1) // threads)
    return size


@njit(inline="always", **_JIT)
def _fff_route_block(tile, args):  # one route tile, counted done for the output sweep
    x, w_in, b_in, depth, routes, logits, state, size, stop = args
    _fff_route_tile(x, w_in, b_in, depth, routes, logits, tile, size, stop)
    fetch_add(state, SHARED_DONE, 1)


@njit(inline="always", **_JIT)
def _fff_output_block(b, args):  # order: [T] token ids, the order the output sweep takes them in
    w_out, routes, logits, out, order, g = args
    _fff_output(w_out, routes, logits, out, order[b * OUTPUT_BLOCK:(b + 1) * OUTPUT_BLOCK], g)


@njit(**_JIT)
def _split_level(t_count, depth, group):  # -> the deepest even level with >= `group` tokens per node, or D+1
    """Where a large batch stops routing by tiles: from there on the tokens are taken by the
    subtree they entered, so that each deep row is read once for the group at its node instead
    of once per token. depth + 1: no split (too few tokens for groups of `group`)."""
    split = depth + 1
    level = 2
    while level <= depth and (t_count >> level) >= group:
        split = level
        level += 2
    return split


@njit(**_JIT)
def _worth_splitting(x, w_in, b_in, depth, split, probe):  # -> whether the first tokens spread at `split`
    """Splitting pays when the tokens spread over many subtrees, whose deep rows then do not all
    stay in cache; it costs a second read of every token's activations, which is all it does
    when they take a few paths (the paper's setup: one). The first `probe` tokens are routed
    down to `split` (into this thread's own arrays: every thread decides the same) and counted:
    split if they enter more than one subtree in SPLIT_SPREAD of those they could (and two or more)."""
    k = min(probe, x.shape[0])
    routes = np.zeros((k, depth + 1), np.int32)
    logits = np.empty((k, depth + 1), np.float32)
    order = np.arange(np.int64(k))
    _route_levels(x, w_in, b_in, depth, routes, logits, order, np.empty_like(order), 0, split)
    distinct = 1
    for i in range(1, k):   # order is sorted by node at the last pass: count the runs at `split`
        distinct += routes[order[i], split] != routes[order[i - 1], split]
    return distinct > 1 and distinct * SPLIT_SPREAD > min(k, 1 << split)


@njit(**_JIT)
def _split_units(routes, level, unit):  # routes [T, D+1] -> order [T] int64, bounds [U + 1] int64
    """The tokens by their node at `level` (a counting sort, stable), cut into units of at most
    `unit` tokens at one node: unit u is order[bounds[u]:bounds[u + 1]]."""
    t_count = routes.shape[0]
    first = (1 << level) - 1
    starts = np.zeros((1 << level) + 1, np.int64)   # [nodes + 1]
    for t in range(t_count):
        starts[routes[t, level] - first + 1] += 1
    n_units = 0
    for i in range(1, starts.shape[0]):
        n_units += (starts[i] + unit - 1) // unit
        starts[i] += starts[i - 1]
    bounds = np.empty(n_units + 1, np.int64)
    u = 0
    for i in range(starts.shape[0] - 1):
        for a in range(starts[i], starts[i + 1], unit):
            bounds[u] = a
            u += 1
    bounds[n_units] = t_count
    order = np.empty(t_count, np.int64)
    for t in range(t_count):
        node = routes[t, level] - first
        order[starts[node]] = t
        starts[node] += 1
    return order, bounds


@njit(inline="always", **_JIT)
def _leaf_sort(routes, depth, tokens):  # tokens, in place: a stable insertion sort by leaf (nearly sorted)
    for i in range(1, tokens.shape[0]):
        t = tokens[i]
        leaf = routes[t, depth]
        j = i
        while j > 0 and routes[tokens[j - 1], depth] > leaf:
            tokens[j] = tokens[j - 1]
            j -= 1
        tokens[j] = t


@njit(inline="always", **_JIT)
def _fff_deep_block(u, args):  # unit u of `_split_units`: its routes below the split, then its outputs
    x, w_in, b_in, w_out, depth, routes, logits, out, order, bounds, split, g, spare = args
    tokens = order[bounds[u]:bounds[u + 1]]   # this thread's own copy of order: sorted in place
    _route_levels(x, w_in, b_in, depth, routes, logits, tokens, spare, split, depth + 1)
    _leaf_sort(routes, depth, tokens)
    _fff_output(w_out, routes, logits, out, tokens, g)


_fff_route_loop = claim_loop(_fff_route_block)
_fff_deep_loop = claim_loop(_fff_deep_block)
_fff_output_loop = claim_loop(_fff_output_block)


@njit(**_JIT)
def fff_walk(x, w_in, b_in, w_out, depth, out, routes, logits, state):
    """x [T, H], w_in [N, H], b_in [N], w_out [N, H] -> out [T, H], routes/logits [T, D+1].
    A shared kernel (see "Shared kernels"): threads claim route tiles, wait until every tile is
    routed (only for tiles other threads are still on), then claim blocks of outputs.

    Only the visited rows of w_in and w_out are read: 2 * (D+1) rows instead of 2 * (2^(D+1)-1).
    """
    fetch_add(state, SHARED_INSIDE, 1)
    split = _split_level(x.shape[0], depth, SPLIT_GROUP)
    if split <= depth and not _worth_splitting(x, w_in, b_in, depth, split, SPLIT_PROBE):
        split = depth + 1
    size = route_tile(x.shape[0], ROUTE_TILE_MAX, state[SHARED_THREADS])
    tiles = (x.shape[0] + size - 1) // size
    _fff_route_loop(state, SHARED_NEXT, tiles, (x, w_in, b_in, depth, routes, logits, state, size, split))
    while fetch_add(state, SHARED_DONE, 0) < tiles:   # tiles other threads are still routing
        pass
    if split <= depth:   # [T] by node at the split, the same in every thread; units of one node's tokens
        order, bounds = _split_units(routes, split, SPLIT_UNIT)
        g = np.empty((SPLIT_UNIT, depth + 1), np.float32)
        spare = np.empty(SPLIT_UNIT, np.int64)
        _fff_deep_loop(state, SHARED_NEXT_2, bounds.shape[0] - 1,
                       (x, w_in, b_in, w_out, depth, routes, logits, out, order, bounds, split, g, spare))
        fetch_add(state, SHARED_INSIDE, -1)
        return
    order = _leaf_order(routes, depth, LEAF_ORDER_MIN)   # [T], the same in every thread
    if order.shape[0] == 0:
        order = np.arange(x.shape[0], dtype=np.int32)
    g = np.empty((OUTPUT_BLOCK, depth + 1), np.float32)   # this thread's GELU(z) of a block's paths
    blocks = (x.shape[0] + OUTPUT_BLOCK - 1) // OUTPUT_BLOCK
    _fff_output_loop(state, SHARED_NEXT_2, blocks, (w_out, routes, logits, out, order, g))
    fetch_add(state, SHARED_INSIDE, -1)


# ---------------------------------------------------------------------------------------------
# int8 projections: per-token quantized activations times per-output-channel int8 weights
# ---------------------------------------------------------------------------------------------
# out[m, n] = float32(sum_k xq[m, k] * wq[n, k]) * (x_scale[m] * w_scale[n]), the sum exact in int32.
# Activations: s8 in [-127, 127], scale max|x| / 127 per token, K padded with zeros to INT8_K_ALIGN;
# stored as u8 (s8 + 128) for the VNNI product, whose vpdpbusd multiplies u8 by s8.
# Two products, one per weight layout (ufcpu/quant.py packs the weights for the one the CPU runs):
# - matmul_s8_rows: plain rows [N, Kp], summed exactly on the float32 units (below); any CPU.
# - matmul_s8_vnni: AVX-512 VNNI vpdpbusd on packed groups [Np/16, Kp/4, 16, 4]; only where the
#   CPU has avx512_vnni (elsewhere its instruction is illegal), chosen by `INT8_FEATURE`;
#   linear_s8_vnni quantizes the activations and runs it in one launch (what quant.py calls).

INT8_K_ALIGN = 4     # K of activations and weights padded to a 4-byte group (one vpdpbusd lane)
VNNI_GROUP = 16      # output columns of one vpdpbusd (16 int32 lanes)
VNNI_GROUPS = 3      # column groups of a register block: 8 tokens x 48 columns in 24 zmm accumulators
VNNI_ROWS = 8        # tokens of a register block (at most)
VNNI_COLS = VNNI_GROUP * VNNI_GROUPS   # output columns per claim; N is padded to a multiple of it
VNNI_SPAN = 4        # column blocks per claim: each thread streams runs of consecutive weights (the prefetchers lose
                     # track when two threads take turns block by block, and a shared product got slower than one alone)
VNNI_PREFETCH = 16   # steps (64 B of a group each) a register block prefetches its weights ahead: the hardware
                     # prefetchers start again at every 4 KB page of the three streams (bench/README.md, "int8")
VNNI_TOKENS = 256    # tokens per claim: their activations (192 KB at K 768) stay in L2 over every column block
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


@intrinsic
def _f32_bits(typingctx, value):
    """The bits of a float32 as an int32 (the inverse of _f32_from_bits)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


F32_ABS = np.int32(0x7FFFFFFF)   # all bits but the sign
F32_INF = np.int32(0x7F800000)   # +inf; the bits of |x| are above it only for NaN


@njit(inline="always", **_JIT)
def _quantize_row(x, q, scale, zero, t):
    row = x[t]
    # max |x| on the bits: integers order |x| as floats do (NaN above inf), and an integer max
    # vectorises where a float max reduction (without fast-math's nnan) does not: 6x faster.
    top = np.int32(0)
    for k in range(row.shape[0]):
        b = _f32_bits(row[k]) & F32_ABS
        top = b if b > top else top
    qr = q[t]
    if top >= F32_INF or top == 0:   # NaN/inf give NaN outputs, zeros give zeros
        scale[t] = np.float32(np.nan) if top else np.float32(0.0)
        for k in range(qr.shape[0]):
            qr[k] = zero
        return
    amax = _f32_from_bits(top)
    inv = _divide(np.float32(127.0), amax)
    scale[t] = _divide(amax, np.float32(127.0))
    for k in range(row.shape[0]):
        qr[k] = np.int32(min(max(np.rint(row[k] * inv), np.float32(-127.0)), np.float32(127.0))) + zero
    for k in range(row.shape[0], qr.shape[0]):
        qr[k] = zero


@njit(inline="always", **_JIT)
def _quantize_block(blk, args):
    x, q, scale, zero = args
    for t in range(blk * ROW_BLOCK, min((blk + 1) * ROW_BLOCK, x.shape[0])):
        _quantize_row(x, q, scale, zero, t)


_quantize_loop = claim_loop(_quantize_block)


@njit(**_JIT)
def quantize_rows(x, q, scale, zero, state):
    """x [M, K] float32 -> q [M, Kp], scale [M] float32: q = rint(x / scale) + zero, with zero 0
    for int8 q (s8) or 128 for uint8 q (the u8 operand of vpdpbusd); K padded with `zero`. Shared."""
    fetch_add(state, SHARED_INSIDE, 1)
    _quantize_loop(state, SHARED_NEXT, (x.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK, (x, q, scale, np.int32(zero)))
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


def _vnni_rows(builder, dp, rows, xbase, xstride, wbase, wstride, count, cells):
    """IR of one register block of `rows` tokens: cells[r][g] += u8 x_r[4i..4i+3] . s8 w[g][i]
    over i < count; token r's bytes at xbase + r * xstride, group g's at wbase + g * wstride."""
    i32, i64 = ir.IntType(32), ir.IntType(64)
    v16 = ir.VectorType(i32, VNNI_GROUP)
    zeros = ir.Constant(v16, None)
    xs = [builder.gep(xbase, [builder.mul(ir.Constant(i64, r), xstride)]) for r in range(rows)]
    ws = [builder.gep(wbase, [builder.mul(ir.Constant(i64, g), wstride)]) for g in range(VNNI_GROUPS)]
    for r in range(rows):
        for g in range(VNNI_GROUPS):
            builder.store(zeros, cells[r][g])
    with cgutils.for_range(builder, count) as loop:
        i = loop.index
        wv = [builder.load(builder.bitcast(builder.gep(w, [builder.mul(i, ir.Constant(i64, 64))]), v16.as_pointer()),
                           align=1) for w in ws]
        for w in ws:   # each group's stream VNNI_PREFETCH steps ahead (past its end: the next group's start)
            _prefetch_ir(builder, builder.gep(w, [builder.mul(builder.add(i, ir.Constant(i64, VNNI_PREFETCH)),
                                                              ir.Constant(i64, 64))]), 3)
        for r in range(rows):
            word = builder.load(builder.bitcast(builder.gep(xs[r], [builder.mul(i, ir.Constant(i64, 4))]),
                                                i32.as_pointer()), align=1)
            bcast = builder.shuffle_vector(builder.insert_element(zeros, word, ir.Constant(i32, 0)), zeros, zeros)
            for g in range(VNNI_GROUPS):
                builder.store(builder.call(dp, [builder.load(cells[r][g]), bcast, wv[g]]), cells[r][g])


# Numba's fast-math pass gives every float instruction that has no flags its own: one flag that
# means nothing to a product (reciprocals) keeps these two IEEE, as _dequant's.
_NO_REASSOC = ("arcp",)


def _vnni_scale_rows(builder, rows, cells, xs, ws, wsum, out, out_stride):
    """IR: out[r, 16g + j] = float32(cells[r][g][j] - wsum[16g + j]) * (xs[r] * ws[16g + j]) for a
    full block of VNNI_COLS columns (the rounding of _dequant: IEEE products, no fast-math flags)."""
    f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
    v16i, v16f = ir.VectorType(i32, VNNI_GROUP), ir.VectorType(f32, VNNI_GROUP)
    zeros = ir.Constant(v16i, None)
    wsv = [builder.load(builder.bitcast(builder.gep(ws, [ir.Constant(i64, 16 * g)]), v16f.as_pointer()), align=4)
           for g in range(VNNI_GROUPS)]
    zv = [builder.load(builder.bitcast(builder.gep(wsum, [ir.Constant(i64, 16 * g)]), v16i.as_pointer()), align=4)
          for g in range(VNNI_GROUPS)]
    for r in range(rows):
        c = builder.load(builder.gep(xs, [ir.Constant(i64, r)]))
        cv = builder.shuffle_vector(builder.insert_element(ir.Constant(v16f, None), c, ir.Constant(i32, 0)),
                                    ir.Constant(v16f, None), zeros)
        row = builder.gep(out, [builder.mul(ir.Constant(i64, r), out_stride)])
        for g in range(VNNI_GROUPS):
            exact = builder.sitofp(builder.sub(builder.load(cells[r][g]), zv[g]), v16f)
            value = builder.fmul(exact, builder.fmul(cv, wsv[g], flags=_NO_REASSOC), flags=_NO_REASSOC)
            ptr = builder.bitcast(builder.gep(row, [ir.Constant(i64, 16 * g)]), v16f.as_pointer())
            builder.store(value, ptr, align=4)


@intrinsic
def _vnni_tile(typingctx, x, x_stride, rows, w, w_stride, kq, scales, acc):
    """The register block of matmul_s8_vnni, written in LLVM IR (Numba has no vector types):
    sums[r, 16g + j] = sum_i u8(x[r * x_stride + 4i ..]) . s8(w[g * w_stride + 64i + 4j ..]) for
    `rows` (1..VNNI_ROWS) tokens and VNNI_GROUPS column groups, i < kq, one loop per token count
    (a short last tile computes only its own rows). scales = (xs, ws, wsum, out, out_stride, full):
    addresses of the tile's first x_scale, w_scale, wsum and output, the output's row stride in
    floats; a full block of columns is scaled into out here, else the sums go to acc [VNNI_ROWS,
    VNNI_COLS] int32 for the caller to scale the columns that exist. Addresses are integers."""
    def codegen(context, builder, signature, args):
        i8, i32, i64, f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
        v16 = ir.VectorType(i32, VNNI_GROUP)
        # The <16 x i32> operand form: LLVM 22 (llvmlite 0.46) declares <64 x i8> and upgrades this one.
        dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16, v16, v16]),
                                            "llvm.x86.avx512.vpdpbusd.512")
        xbase = builder.inttoptr(args[0], i8.as_pointer())
        wbase = builder.inttoptr(args[3], i8.as_pointer())
        xstride, rows, wstride, count = (context.cast(builder, args[j], signature.args[j], types.int64)
                                         for j in (1, 2, 4, 5))
        sc = cgutils.unpack_tuple(builder, args[6])
        xs, ws, out = (builder.inttoptr(sc[j], f32.as_pointer()) for j in (0, 1, 3))
        wsum = builder.inttoptr(sc[2], i32.as_pointer())
        out_stride, full = sc[4], builder.icmp_signed("!=", sc[5], ir.Constant(i64, 0))
        acc_arr = context.make_array(signature.args[7])(context, builder, args[7])
        acc = builder.bitcast(acc_arr.data, i32.as_pointer())
        cells = [[cgutils.alloca_once(builder, v16) for _ in range(VNNI_GROUPS)] for _ in range(VNNI_ROWS)]
        for r in range(1, VNNI_ROWS + 1):
            with builder.if_then(builder.icmp_signed("==", rows, ir.Constant(i64, r))):
                _vnni_rows(builder, dp, r, xbase, xstride, wbase, wstride, count, cells)
                with builder.if_else(full) as (scaled, partial):
                    with scaled:
                        _vnni_scale_rows(builder, r, cells, xs, ws, wsum, out, out_stride)
                    with partial:
                        for t in range(r):
                            for g in range(VNNI_GROUPS):
                                ptr = builder.gep(acc, [ir.Constant(i64, t * VNNI_COLS + g * VNNI_GROUP)])
                                builder.store(builder.load(cells[t][g]), builder.bitcast(ptr, v16.as_pointer()),
                                              align=4)
        return context.get_dummy_value()
    return types.void(x, x_stride, rows, w, w_stride, kq, scales, acc), codegen


@njit(inline="always", **_JIT)
def _vnni_block(i, args):  # claim i: column blocks VNNI_SPAN s .. of tokens VNNI_TOKENS c ..
    blocks = args[-1]
    spans = (blocks + VNNI_SPAN - 1) // VNNI_SPAN
    c, sp = divmod(i, spans)   # column blocks fastest: a chunk's activations stay in L2 while every block passes
    end = min((sp + 1) * VNNI_SPAN, blocks)
    for b in range(sp * VNNI_SPAN, end):
        _vnni_columns(c, b, args)


@njit(inline="always", **_JIT)
def _vnni_columns(c, b, args):  # output columns VNNI_COLS b .. of tokens VNNI_TOKENS c ..
    xq, xs, ws, wsum, out, acc, base_x, row_x, base_w, group_bytes, kq, blocks = args
    w = base_w + b * VNNI_GROUPS * group_bytes
    n0 = b * VNNI_COLS
    n1 = min(n0 + VNNI_COLS, out.shape[1])
    full = n1 - n0 == VNNI_COLS
    m_end = min((c + 1) * VNNI_TOKENS, xq.shape[0])
    row_out = np.int64(out.strides[0] // 4)
    for m in range(c * VNNI_TOKENS, m_end, VNNI_ROWS):
        rows = min(VNNI_ROWS, m_end - m)
        scales = (np.int64(xs.ctypes.data) + 4 * m, np.int64(ws.ctypes.data) + 4 * n0,
                  np.int64(wsum.ctypes.data) + 4 * n0, np.int64(out.ctypes.data) + 4 * (m * row_out + n0),
                  row_out, np.int64(full))
        _vnni_tile(base_x + m * row_x, row_x, rows, w, group_bytes, kq, scales, acc)
        if full:
            continue
        for r in range(rows):   # the last, partial block: slices from 0, a loop LLVM vectorises
            cs = xs[m + r]
            o = out[m + r, n0:n1]
            a = acc[r]
            s = ws[n0:n1]
            z = wsum[n0:n1]
            for j in range(o.shape[0]):
                o[j] = _dequant(np.float32(a[j] - z[j]), cs, s[j])


_vnni_loop = claim_loop(_vnni_block)


@njit(**_JIT)
def matmul_s8_vnni(xq, xs, wp, ws, wsum, out, state):
    """xq [M, Kp] u8 (s8 + 128, from quantize_rows with zero 128), xs [M], wp [Np/16, Kp/4, 16, 4]
    s8 (column n = 16 g + j at wp[g, :, j]), ws [N], wsum [N] int32 = 128 * sum_k w[n, k]
    -> out [M, N]; shared over (chunk of VNNI_TOKENS tokens, block of VNNI_COLS columns), each
    running its tokens through register blocks of VNNI_ROWS tokens while the block's weights stay in L1."""
    fetch_add(state, SHARED_INSIDE, 1)
    kq = wp.shape[1]
    blocks = wp.shape[0] // VNNI_GROUPS
    chunks = (xq.shape[0] + VNNI_TOKENS - 1) // VNNI_TOKENS
    acc = np.empty((VNNI_ROWS, VNNI_COLS), np.int32)   # this thread's register block, stored
    args = (xq, xs, ws, wsum, out, acc, np.int64(xq.ctypes.data),   # int64: uintp + int64 would be a float
            np.int64(xq.strides[0]), np.int64(wp.ctypes.data), kq * VNNI_GROUP * 4, kq, blocks)
    _vnni_loop(state, SHARED_NEXT, chunks * ((blocks + VNNI_SPAN - 1) // VNNI_SPAN), args)
    fetch_add(state, SHARED_INSIDE, -1)


@njit(inline="always", **_JIT)
def _quantize_counted(blk, args):  # _quantize_block, then count it done
    x, q, scale, zero, state = args
    _quantize_block(blk, (x, q, scale, zero))
    fetch_add(state, SHARED_DONE, 1)


_quantize_counted_loop = claim_loop(_quantize_counted)


@njit(**_JIT)
def linear_s8_vnni(x, xq, xs, wp, ws, wsum, out, state):
    """quantize_rows(x, xq, xs, U8_BIAS) then matmul_s8_vnni(xq, xs, wp, ws, wsum, out) as one
    shared kernel: one launch (and one wake of the helpers) per projection. Threads claim blocks
    of rows to quantize, wait until every row is (only for rows others are still on), then claim
    the product's blocks."""
    fetch_add(state, SHARED_INSIDE, 1)
    row_blocks = (x.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK
    _quantize_counted_loop(state, SHARED_NEXT, row_blocks, (x, xq, xs, U8_BIAS, state))
    while fetch_add(state, SHARED_DONE, 0) < row_blocks:   # rows other threads are still quantizing
        pass
    kq = wp.shape[1]
    blocks = wp.shape[0] // VNNI_GROUPS
    chunks = (xq.shape[0] + VNNI_TOKENS - 1) // VNNI_TOKENS
    acc = np.empty((VNNI_ROWS, VNNI_COLS), np.int32)
    args = (xq, xs, ws, wsum, out, acc, np.int64(xq.ctypes.data),
            np.int64(xq.strides[0]), np.int64(wp.ctypes.data), kq * VNNI_GROUP * 4, kq, blocks)
    _vnni_loop(state, SHARED_NEXT_2, chunks * ((blocks + VNNI_SPAN - 1) // VNNI_SPAN), args)
    fetch_add(state, SHARED_INSIDE, -1)


def host_features() -> frozenset:
    """The CPU features LLVM compiles the kernels for (llvmlite's reading of this CPU)."""
    import llvmlite.binding as llvm
    return frozenset(k for k, v in llvm.get_host_cpu_features().items() if v)


# ---------------------------------------------------------------------------------------------
# The box: spinning helpers join a kernel without leaving Numba
# ---------------------------------------------------------------------------------------------
# A helper that joins through threads.py's board takes the GIL and Numba's argument checks first,
# 15-20 us: a shared 1.77 MB projection of 16 tokens took 280 us that way, against 310 alone. The
# box holds a kernel's array addresses and sizes instead; a helper spinning in wait_offer reads
# them and runs its share at once (200 us for that projection), and stays in Numba between
# kernels. The caller keeps the arrays alive until every helper that entered has left. A helper
# enters only while the box is open, and both sides order these steps with sequentially
# consistent atomics: either the helper finds the box closed, or the caller finds it inside.
# Kernels with a box: the int8 projection (where the CPU has VNNI), the walk, attention, and the
# fused residual add and LayerNorm.

BOX_EPOCH = 0      # kernels posted so far
BOX_OPEN = 1       # 1 while the caller is inside the posted kernel
BOX_INSIDE = 2     # helpers that entered it (or are checking whether they may)
BOX_OWNER = 3      # callers holding the box: one at a time, the others take the board
BOX_SPINNING = 4   # helpers spinning in wait_offer, the ones that serve the box
BOX_LIMIT = 5      # helpers the caller lets in (its thread count - 1)
BOX_KIND = 6       # which kernel: one of the kinds below
BOX_ARGS = 8       # the kernel's array addresses, then its sizes
BOX_SLOTS = BOX_ARGS + 16
BOX_LINEAR, BOX_WALK, BOX_ATTENTION, BOX_ADD_LAYER_NORM = 1, 2, 3, 4


def _pointer_to(dtype):
    """-> an intrinsic: int64 address -> a pointer to `dtype` there (for numba.carray)."""
    @intrinsic
    def pointer(typingctx, address):
        pointer_type = types.CPointer(dtype)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(pointer_type))
        return pointer_type(types.int64), codegen
    return pointer


_F32_AT, _U8_AT, _I8_AT, _I32_AT, _I64_AT = (_pointer_to(t) for t in (types.float32, types.uint8, types.int8,
                                                                      types.int32, types.int64))


@njit(inline="always", **_JIT)
def _state_at(box, slot):
    return carray(_I64_AT(box[slot]), (SHARED_SLOTS,))


@njit(**_JIT)
def _run_linear(box):
    """linear_s8_vnni on the arrays the box holds (C-contiguous, as their caller checked)."""
    a, z = BOX_ARGS, BOX_ARGS + 8
    m, k, kp, groups, kq, n = box[z], box[z + 1], box[z + 2], box[z + 3], box[z + 4], box[z + 5]
    linear_s8_vnni(carray(_F32_AT(box[a]), (m, k)), carray(_U8_AT(box[a + 1]), (m, kp)),
                   carray(_F32_AT(box[a + 2]), (m,)), carray(_I8_AT(box[a + 3]), (groups, kq, VNNI_GROUP, 4)),
                   carray(_F32_AT(box[a + 4]), (n,)), carray(_I32_AT(box[a + 5]), (n,)),
                   carray(_F32_AT(box[a + 6]), (m, n)), _state_at(box, a + 7))


@njit(**_JIT)
def _run_portable(box):
    """fff_walk, attention_heads or add_layer_norm, as BOX_KIND says, on the arrays the box holds."""
    a, z = BOX_ARGS, BOX_ARGS + 8
    if box[BOX_KIND] == BOX_WALK:
        t, h, nodes, depth = box[z], box[z + 1], box[z + 2], box[z + 3]
        fff_walk(carray(_F32_AT(box[a]), (t, h)), carray(_F32_AT(box[a + 1]), (nodes, h)),
                 carray(_F32_AT(box[a + 2]), (nodes,)), carray(_F32_AT(box[a + 3]), (nodes, h)), depth,
                 carray(_F32_AT(box[a + 4]), (t, h)), carray(_I32_AT(box[a + 5]), (t, depth + 1)),
                 carray(_F32_AT(box[a + 6]), (t, depth + 1)), _state_at(box, a + 7))
    elif box[BOX_KIND] == BOX_ATTENTION:
        t, width, n, s_len, heads, hid = box[z], box[z + 1], box[z + 2], box[z + 3], box[z + 4], box[z + 5]
        attention_heads(carray(_F32_AT(box[a]), (t, width)), carray(_I64_AT(box[a + 1]), (n, 2)),
                        carray(_F32_AT(box[a + 2]), (n, s_len)), _f32_from_bits(np.int32(box[z + 6])), heads,
                        carray(_F32_AT(box[a + 3]), (t, hid)), _state_at(box, a + 4))
    elif box[BOX_KIND] == BOX_ADD_LAYER_NORM:
        t, h = box[z], box[z + 1]
        add_layer_norm(carray(_F32_AT(box[a]), (t, h)), carray(_F32_AT(box[a + 1]), (t, h)),
                       carray(_F32_AT(box[a + 2]), (h,)), carray(_F32_AT(box[a + 3]), (h,)),
                       _f32_from_bits(np.int32(box[z + 2])), carray(_F32_AT(box[a + 4]), (t, h)),
                       carray(_F32_AT(box[a + 5]), (t, h)), _state_at(box, a + 6))


@njit(inline="always", **_JIT)
def _door(box, seen):
    """-> (the epoch seen, 0: nothing to join; 1: entered, run it; 2: entered, not let in)"""
    epoch = load_acquire(box, BOX_EPOCH)
    if epoch == seen or load_acquire(box, BOX_OPEN) == 0:
        return epoch, 0
    if fetch_add(box, BOX_INSIDE, 1) < box[BOX_LIMIT] and fetch_add(box, BOX_OPEN, 0) == 1 \
            and fetch_add(box, BOX_EPOCH, 0) == epoch:
        return epoch, 1
    return epoch, 2


@njit(**_JIT)
def serve_box(box, seen):
    """A helper's turn at the box: if a kernel newer than `seen` is open and the caller lets one
    more helper in, run a share of it -> the epoch it looked at."""
    epoch, door = _door(box, seen)
    if door == 1 and box[BOX_KIND] == BOX_LINEAR:
        _run_linear(box)
    elif door == 1:
        _run_portable(box)
    if door:
        fetch_add(box, BOX_INSIDE, -1)
    return epoch


@njit(**_JIT)
def serve_box_portable(box, seen):
    """serve_box where the CPU has no VNNI: never the int8 projection (it would not compile)."""
    epoch, door = _door(box, seen)
    if door == 1 and box[BOX_KIND] != BOX_LINEAR:
        _run_portable(box)
    if door:
        fetch_add(box, BOX_INSIDE, -1)
    return epoch


# What wait_offer calls to serve the box. A global, so that wait_offer is cached as every kernel is.
_box_turn = serve_box if "avx512vnni" in host_features() else serve_box_portable


@njit(inline="always", **_JIT)
def _take_box(box, helpers, arrays_ok):
    """-> whether this caller now holds the box: some helper spins, the arrays are C-contiguous,
    and no other caller holds it."""
    if helpers < 1 or not arrays_ok or load_acquire(box, BOX_SPINNING) == 0:
        return False
    if fetch_add(box, BOX_OWNER, 1) != 0:
        fetch_add(box, BOX_OWNER, -1)
        return False
    return True


@njit(inline="always", **_JIT)
def _open_box(box, helpers, kind):
    box[BOX_LIMIT], box[BOX_KIND] = helpers, kind
    fetch_add(box, BOX_OPEN, 1)
    fetch_add(box, BOX_EPOCH, 1)


@njit(inline="always", **_JIT)
def _close_box(box):
    """Close the box, wait for the helpers still inside, and let go of it."""
    fetch_add(box, BOX_OPEN, -1)
    inside = fetch_add(box, BOX_INSIDE, 0)
    while inside != 0:                       # helpers on their last blocks, or about to find it closed
        _spin_pause()
        inside = load_acquire(box, BOX_INSIDE)
    fetch_add(box, BOX_OWNER, -1)


@njit(**_JIT)
def post_linear(box, helpers, x, xq, xs, wp, ws, wsum, out, state):
    """Post linear_s8_vnni's arrays (C-contiguous, kept alive by the caller) to the box, for up
    to `helpers` helpers, and open it (as post_walk and post_attention, for theirs)."""
    a, z = BOX_ARGS, BOX_ARGS + 8
    box[a], box[a + 1], box[a + 2], box[a + 3] = x.ctypes.data, xq.ctypes.data, xs.ctypes.data, wp.ctypes.data
    box[a + 4], box[a + 5], box[a + 6], box[a + 7] = ws.ctypes.data, wsum.ctypes.data, out.ctypes.data, state.ctypes.data
    box[z], box[z + 1], box[z + 2] = x.shape[0], x.shape[1], xq.shape[1]
    box[z + 3], box[z + 4], box[z + 5] = wp.shape[0], wp.shape[1], out.shape[1]
    _open_box(box, helpers, BOX_LINEAR)


@njit(**_JIT)
def post_walk(box, helpers, x, w_in, b_in, w_out, depth, out, routes, logits, state):  # as post_linear
    a, z = BOX_ARGS, BOX_ARGS + 8
    box[a], box[a + 1], box[a + 2], box[a + 3] = x.ctypes.data, w_in.ctypes.data, b_in.ctypes.data, w_out.ctypes.data
    box[a + 4], box[a + 5], box[a + 6], box[a + 7] = out.ctypes.data, routes.ctypes.data, logits.ctypes.data, \
        state.ctypes.data
    box[z], box[z + 1], box[z + 2], box[z + 3] = x.shape[0], x.shape[1], w_in.shape[0], depth
    _open_box(box, helpers, BOX_WALK)


@njit(**_JIT)
def post_attention(box, helpers, qkv, seqs, key_bias, scale, heads, out, state):  # as post_linear
    a, z = BOX_ARGS, BOX_ARGS + 8
    box[a], box[a + 1], box[a + 2], box[a + 3], box[a + 4] = qkv.ctypes.data, seqs.ctypes.data, \
        key_bias.ctypes.data, out.ctypes.data, state.ctypes.data
    box[z], box[z + 1], box[z + 2], box[z + 3] = qkv.shape[0], qkv.shape[1], seqs.shape[0], key_bias.shape[1]
    box[z + 4], box[z + 5], box[z + 6] = heads, out.shape[1], _f32_bits(np.float32(scale))
    _open_box(box, helpers, BOX_ATTENTION)


@njit(**_JIT)
def post_add_layer_norm(box, helpers, x, d, w, b, eps, s, out, state):  # as post_linear
    a, z = BOX_ARGS, BOX_ARGS + 8
    box[a], box[a + 1], box[a + 2], box[a + 3] = x.ctypes.data, d.ctypes.data, w.ctypes.data, b.ctypes.data
    box[a + 4], box[a + 5], box[a + 6] = s.ctypes.data, out.ctypes.data, state.ctypes.data
    box[z], box[z + 1], box[z + 2] = x.shape[0], x.shape[1], _f32_bits(np.float32(eps))
    _open_box(box, helpers, BOX_ADD_LAYER_NORM)


@njit(**_JIT)
def linear_s8_vnni_boxed(box, helpers, x, xq, xs, wp, ws, wsum, out, state):
    """linear_s8_vnni(x, ..., out, state), with up to `helpers` spinning helpers joining through
    the box -> True. False, having done nothing, when no helper spins, another caller holds the
    box, or an array is not C-contiguous: then launch it on threads.py's board instead."""
    ok = (x.flags.c_contiguous and xq.flags.c_contiguous and xs.flags.c_contiguous and wp.flags.c_contiguous
          and ws.flags.c_contiguous and wsum.flags.c_contiguous and out.flags.c_contiguous)
    if not _take_box(box, helpers, ok):
        return False
    post_linear(box, helpers, x, xq, xs, wp, ws, wsum, out, state)
    linear_s8_vnni(x, xq, xs, wp, ws, wsum, out, state)
    _close_box(box)
    return True


@njit(**_JIT)
def fff_walk_boxed(box, helpers, x, w_in, b_in, w_out, depth, out, routes, logits, state):
    """fff_walk(...) with helpers joining through the box -> True; False as linear_s8_vnni_boxed."""
    ok = (x.flags.c_contiguous and w_in.flags.c_contiguous and b_in.flags.c_contiguous and w_out.flags.c_contiguous
          and out.flags.c_contiguous and routes.flags.c_contiguous and logits.flags.c_contiguous)
    if not _take_box(box, helpers, ok):
        return False
    state[SHARED_THREADS] = 1 + min(helpers, load_acquire(box, BOX_SPINNING))   # these will come at once
    post_walk(box, helpers, x, w_in, b_in, w_out, depth, out, routes, logits, state)
    fff_walk(x, w_in, b_in, w_out, depth, out, routes, logits, state)
    _close_box(box)
    return True


@njit(**_JIT)
def attention_heads_boxed(box, helpers, qkv, seqs, key_bias, scale, heads, out, state):
    """attention_heads(...) with helpers joining through the box -> True; False as linear_s8_vnni_boxed."""
    ok = qkv.flags.c_contiguous and seqs.flags.c_contiguous and key_bias.flags.c_contiguous and out.flags.c_contiguous
    if not _take_box(box, helpers, ok):
        return False
    post_attention(box, helpers, qkv, seqs, key_bias, scale, heads, out, state)
    attention_heads(qkv, seqs, key_bias, scale, heads, out, state)
    _close_box(box)
    return True


@njit(**_JIT)
def add_layer_norm_boxed(box, helpers, x, d, w, b, eps, s, out, state):
    """add_layer_norm(...) with helpers joining through the box -> True; False as linear_s8_vnni_boxed."""
    ok = (x.flags.c_contiguous and d.flags.c_contiguous and w.flags.c_contiguous and b.flags.c_contiguous
          and s.flags.c_contiguous and out.flags.c_contiguous)
    if not _take_box(box, helpers, ok):
        return False
    post_add_layer_norm(box, helpers, x, d, w, b, eps, s, out, state)
    add_layer_norm(x, d, w, b, eps, s, out, state)
    _close_box(box)
    return True


# kernel -> its boxed launch (threads.run tries it first)
BOXED = {linear_s8_vnni: linear_s8_vnni_boxed, fff_walk: fff_walk_boxed, attention_heads: attention_heads_boxed,
         add_layer_norm: add_layer_norm_boxed}
# kernel -> the fewest rows (of its first argument) worth a boxed launch: rows of one claim have
# nothing to share, and the launch's dispatch alone costs a few microseconds
BOX_MIN_ROWS = {add_layer_norm: ROW_BLOCK + 1}


# int8 kernel -> the CPU feature it needs (None: any CPU), fastest first; quant.py picks from here
INT8_FEATURE = {matmul_s8_vnni: "avx512vnni", linear_s8_vnni: "avx512vnni", matmul_s8_rows: None}


def int8_kernels() -> list:
    """-> the int8 kernels this CPU runs, fastest first."""
    have = host_features()
    return [k for k, feature in INT8_FEATURE.items() if feature is None or feature in have]


# ---------------------------------------------------------------------------------------------
# Registry: every shared kernel, with the size from which helpers join it and what to compile for
# ---------------------------------------------------------------------------------------------
# Offering a share costs the caller a few microseconds; a kernel too small to split gains less
# than the next kernels lose by reading what the other core wrote. Helpers are offered a share from the size
# (elements of the first argument) where they paid off (bench/README.md, "Threads";
# `python bench/kernels.py`).

_SHARED = {  # kernel -> first-argument size from which helpers are offered a share
    matmul_nt: 2 * 768,
    fff_walk: 32 * 768,
    layer_norm: 256 * 768,
    add_layer_norm: 256 * 768,      # as LayerNorm
    attention_heads: 64 * 3 * 768,  # QKV elements: from 64 tokens of the full model
    gelu_: 16 * 3072,
    quantize_rows: 256 * 768,       # as LayerNorm: one pass over each row
    matmul_s8_rows: 2 * 768,        # as matmul_nt
    matmul_s8_vnni: 2 * 768,
    linear_s8_vnni: 24 * 768,       # a 16-token forward was 5% slower shared, 24-40 tokens 12-15% faster
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
        add_layer_norm: [(x, np.ones((2, 4), f32), k(np.ones(4, f32)), k(np.zeros(4, f32)), f32(1e-12),
                          np.empty_like(x), np.empty_like(x)) for k in kinds],
        attention_heads: [(np.ones((2, 6), f32), np.array([[0, 2]], np.int64), np.zeros((1, 2), f32), f32(1.0), 1,
                           np.empty((2, 2), f32))],
        matmul_nt: [(x, k(np.ones((3, 4), f32)), np.empty((2, 3), f32)) for k in kinds],
        fff_walk: [(x, k(np.ones((3, 4), f32)), k(np.zeros(3, f32)), k(np.ones((3, 4), f32)), 1,
                    np.empty_like(x), np.empty((2, 2), np.int32), np.empty((2, 2), f32)) for k in kinds],
        quantize_rows: [(k(np.ones((2, 4), f32)), np.empty((2, 4), dt), np.empty(2, f32), zero)
                        for k in kinds for dt, zero in ((np.int8, 0), (np.uint8, 128))],
        matmul_s8_rows: [(np.ones((2, 4), np.int8), np.ones(2, f32), k(np.ones((3, 4), np.int8)), k(np.ones(3, f32)),
                          np.empty((2, 3), f32)) for k in kinds],
    }
    if matmul_s8_vnni in int8_kernels():   # never compiled where its instruction does not exist
        calls[matmul_s8_vnni] = [(np.ones((2, 4), np.uint8), np.ones(2, f32), k(np.ones((3, 1, 16, 4), np.int8)),
                                  k(np.ones(3, f32)), k(np.zeros(3, np.int32)), np.empty((2, 3), f32)) for k in kinds]
        calls[linear_s8_vnni] = [(np.ones((2, 4), f32), np.empty((2, 4), np.uint8), np.empty(2, f32),
                                  k(np.ones((3, 1, 16, 4), np.int8)), k(np.ones(3, f32)), k(np.zeros(3, np.int32)),
                                  np.empty((2, 3), f32)) for k in kinds]
    return calls


def warmup() -> None:
    """Compile (or load from the cache) every kernel."""
    for kernel, calls in _example_calls().items():
        for args in calls:
            kernel(*args, np.zeros(SHARED_SLOTS, np.int64))
    helpers_done(np.zeros(SHARED_SLOTS, np.int64), 1)
    wait_offer(np.zeros(1, np.int64), 0, np.zeros(SHARED_SLOTS, np.int64), 1, np.ones(1, np.int64),
               np.zeros(BOX_SLOTS, np.int64))
    count_add(np.zeros(1, np.int64), 1)


# Numba would unpickle whatever it finds in its cache folder: every kernel's cache checks its files.
settings.guard_kernel_caches(v for v in list(globals().values()) if isinstance(v, CPUDispatcher))
