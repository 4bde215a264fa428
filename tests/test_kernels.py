"""Every Numba kernel against a naive NumPy version, on random inputs over several shapes."""
from __future__ import annotations

import math

import numpy as np
import pytest

import ufcpu
from ufcpu import kernels, threads
from ufcpu import model as fwd

f32 = np.float32
_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu_ref(z):
    z = np.asarray(z, np.float64)
    return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))


def fff_ref(x, w_in, b_in, w_out):
    """Token by token, level by level, in float64: the walk as MODEL.md writes it."""
    n, h = w_in.shape
    depth = int(math.log2(n + 1)) - 1
    out = np.zeros(x.shape, np.float64)
    routes = np.zeros((x.shape[0], depth + 1), np.int64)
    for t in range(x.shape[0]):
        node = 0
        for level in range(depth + 1):
            z = float(w_in[node].astype(np.float64) @ x[t].astype(np.float64) + b_in[node])
            routes[t, level] = node
            out[t] += gelu_ref(z) * w_out[node]
            node = 2 * node + 1 + (z > 0)
    return out, routes


def random_tree(rng, t, h, depth):
    n = 2 ** (depth + 1) - 1
    x = rng.standard_normal((t, h), dtype=f32)
    w_in = (rng.standard_normal((n, h), dtype=f32) / np.sqrt(h)).astype(f32)
    b_in = (0.3 * rng.standard_normal(n, dtype=f32)).astype(f32)
    w_out = (rng.standard_normal((n, h), dtype=f32) / np.sqrt(n)).astype(f32)
    return x, w_in, b_in, w_out


@pytest.mark.parametrize("t,h,depth", [(1, 8, 0), (5, 16, 1), (33, 64, 4), (7, 96, 7), (64, 128, 11)])
def test_fff_walk_matches_naive(t, h, depth):
    rng = np.random.default_rng(depth * 100 + t)
    x, w_in, b_in, w_out = random_tree(rng, t, h, depth)
    out, routes, logits = fwd.fff(x, w_in, b_in, w_out, depth)
    ref, ref_routes = fff_ref(x, w_in, b_in, w_out)
    assert out.dtype == np.float32 and out.shape == (t, h)
    np.testing.assert_array_equal(routes, ref_routes)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)
    # the logits recorded are those of the path
    z = np.einsum("th,tlh->tl", x.astype(np.float64), w_in[routes].astype(np.float64)) + b_in[routes]
    np.testing.assert_allclose(logits, z, atol=1e-4)
    # tokens really take different routes (real routing, not one shared path)
    if t > 8 and depth > 2:
        assert len({tuple(r) for r in routes}) > 1


@pytest.mark.parametrize("t,depth", [(7, 5), (35, 6)])
def test_fff_walk_token_independent_of_its_batch(t, depth):
    """The route sweep computes two tokens per pass (a lone last token with itself): a token's
    route, logits and output are the same bits alone, in any batch and at any position."""
    rng = np.random.default_rng(t)
    x, w_in, b_in, w_out = random_tree(rng, t, 48, depth)
    whole = fwd.fff(x, w_in, b_in, w_out, depth)
    shifted = fwd.fff(x[1:], w_in, b_in, w_out, depth)   # every pair regrouped
    for i in range(t):
        alone = fwd.fff(x[i:i + 1], w_in, b_in, w_out, depth)
        for got, one in zip(whole, alone):
            np.testing.assert_array_equal(got[i], one[0])
        if i:
            for got, one in zip(shifted, alone):
                np.testing.assert_array_equal(got[i - 1], one[0])


@pytest.mark.parametrize("t,depth,min_tokens", [(0, 3, 0), (1, 2, 0), (300, 6, 0), (2000, 11, 0), (50, 4, 51)])
def test_fff_leaf_order_is_a_stable_sort_by_leaf(t, depth, min_tokens):
    rng = np.random.default_rng(t)
    first = 2 ** depth - 1
    routes = np.zeros((t, depth + 1), np.int32)
    routes[:, depth] = first + rng.integers(0, 2 ** depth, t)
    order = kernels._leaf_order(routes, depth, min_tokens)
    assert order.dtype == np.int32
    if t < min_tokens:                   # empty: the output sweep keeps token order
        assert order.shape == (0,)
    else:
        np.testing.assert_array_equal(order, np.argsort(routes[:, depth], kind="stable"))


def test_fff_walk_in_leaf_order_gives_each_token_its_own_bits(monkeypatch):
    """From LEAF_ORDER_MIN tokens (512 on Ice Lake-SP) the output sweep may take tokens by leaf: every token's output is
    still the same bits as when it is walked alone (and matches the naive walk)."""
    t = 1100
    rng = np.random.default_rng(11)
    x, w_in, b_in, w_out = random_tree(rng, t, 40, 6)
    out, routes, logits = fwd.fff(x, w_in, b_in, w_out, 6)
    ref, ref_routes = fff_ref(x, w_in, b_in, w_out)
    np.testing.assert_array_equal(routes, ref_routes)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)
    for i in rng.choice(t, 25, replace=False):
        alone = fwd.fff(x[i:i + 1], w_in, b_in, w_out, 6)
        for got, one in zip((out, routes, logits), alone):
            np.testing.assert_array_equal(got[i], one[0])


@pytest.mark.parametrize("depth", [11, 12])
def test_fff_output_one_pass_of_twelve_rows(depth):
    """Depth 11 (12 levels) is one pass of 12 rows; depth 12 adds a one-row pass after it."""
    rng = np.random.default_rng(depth)
    x, w_in, b_in, w_out = random_tree(rng, 9, 32, depth)
    out, routes, _ = fwd.fff(x, w_in, b_in, w_out, depth)
    ref, ref_routes = fff_ref(x, w_in, b_in, w_out)
    np.testing.assert_array_equal(routes, ref_routes)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


def test_walk_tuning_table_names_known_tunables_only():
    assert set(kernels.TUNING) == set(kernels.DEFAULT_TUNING)
    for cpu, tuning in kernels.WALK_TUNING.items():
        assert set(tuning) <= set(kernels.DEFAULT_TUNING), cpu
    assert kernels.LEAF_ORDER_MIN == kernels.TUNING["leaf_order_min"] >= 1


def test_fff_routes_right_only_when_z_positive():
    """z == 0 exactly goes left (strict >)."""
    h, depth = 4, 2
    n = 2 ** (depth + 1) - 1
    x = np.ones((1, h), f32)
    w_in = np.zeros((n, h), f32)
    b_in = np.zeros(n, f32)
    b_in[2] = 1.0   # never reached: root has z == 0 -> left child 1
    w_out = np.eye(n, h, dtype=f32)
    _, routes, _ = fwd.fff(x, w_in, b_in, w_out, depth)
    assert routes.tolist() == [[0, 1, 3]]


@pytest.mark.parametrize("t,h,depth", [(3, 16, 3), (40, 32, 6)])
def test_fff_forward_public_api(t, h, depth):
    rng = np.random.default_rng(7)
    x, w_in, b_in, w_out = random_tree(rng, t, h, depth)
    ref, _ = fff_ref(x, w_in, b_in, w_out)
    got = ufcpu.fff_forward(x, w_in, b_in, w_out)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
    # float64 or non-contiguous inputs are accepted and give the same answer
    got64 = ufcpu.fff_forward(x.astype(np.float64), np.asfortranarray(w_in), b_in, w_out)
    np.testing.assert_allclose(got64, got, atol=1e-6)


def test_fff_forward_zero_weights_give_zero():
    """The control case for the rejections below: matching shapes are accepted."""
    out = ufcpu.fff_forward(*(np.zeros(s, f32) for s in ((4, 8), (7, 8), (7,), (7, 8))))
    assert out.shape == (4, 8) and not out.any()


@pytest.mark.parametrize("shapes,match", [
    (((4, 8), (6, 8), (6,), (6, 8)), "2\\^\\(D\\+1\\)-1"),
    (((4, 8), (7, 9), (7,), (7, 8)), "shapes disagree"),
    (((4, 8), (7, 8), (5,), (7, 8)), "shapes disagree"),
    (((4, 8), (7, 8), (7,), (8, 7)), "shapes disagree"),
    (((8,), (7, 8), (7,), (7, 8)), "expects x"),
])
def test_fff_forward_rejects_bad_shapes(shapes, match):
    arrays = [np.zeros(s, f32) for s in shapes]
    with pytest.raises(ufcpu.InputError, match=match):
        ufcpu.fff_forward(*arrays)


def test_dense_masked_equals_walk():
    rng = np.random.default_rng(3)
    depth, h = 5, 32
    x, w_in, b_in, w_out = random_tree(rng, 50, h, depth)
    cfg = type("C", (), {"hidden": h, "depth": depth})()
    layer = type("L", (), {"w_in": w_in, "b_in": b_in, "w_out": w_out})()
    walk = fwd.fff(x, w_in, b_in, w_out, depth)[0]
    dense = fwd.feedforward_dense_masked(x[None], layer, cfg)[0]
    np.testing.assert_allclose(dense, walk, atol=1e-5)


@pytest.mark.parametrize("t,h", [(1, 4), (17, 64), (256, 768)])
def test_layer_norm_matches_naive(t, h):
    rng = np.random.default_rng(t)
    x = (3 * rng.standard_normal((t, h)) + 1).astype(f32)
    w = rng.standard_normal(h).astype(f32)
    b = rng.standard_normal(h).astype(f32)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-12) * w + b
    got = fwd.layer_norm(x, w, b, 1e-12)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)


def test_gelu_matches_erf():
    z = np.linspace(-8, 8, 1001, dtype=f32)[None].copy()
    ref = gelu_ref(z)
    threads.run(kernels.gelu_, z)
    np.testing.assert_allclose(z, ref, atol=1e-6)


def test_sinusoidal_positions_interleaved():
    pe = fwd.sinusoidal_positions(5, 8)
    p, i = 3, 2
    div = math.exp(2 * i * (-math.log(10000.0) / 8))
    assert pe.dtype == np.float32
    assert abs(pe[p, 2 * i] - math.sin(p * div)) < 1e-6
    assert abs(pe[p, 2 * i + 1] - math.cos(p * div)) < 1e-6


def elementwise(scalar_kernel):
    """A jitted loop applying a scalar (inline) kernel to every element of a 1-D array."""
    from numba import njit

    @njit(cache=False)
    def apply(x):
        out = np.empty_like(x)
        for i in range(x.shape[0]):
            out[i] = scalar_kernel(x[i])
        return out
    return apply


def test_exp_f32_matches_numpy():
    """The softmax's vectorisable exp: relative error within 1e-7 + |x| * 1e-7 over its range."""
    apply = elementwise(kernels.exp_f32)
    x = np.concatenate([np.linspace(-80, 10, 200001), [0.0, -0.5, 0.5, -1e-8]]).astype(f32)
    ref = np.exp(x.astype(np.float64))
    rel = np.abs(apply(x) - ref) / ref
    assert (rel <= 2e-7 + np.abs(x) * 1e-7).all(), rel.max()
    # far below: exactly 0, never a denormal (they slow every product that follows) and never NaN
    assert (apply(np.array([-80.5, -1e4, -np.inf], f32)) == 0).all()


def test_erf_f32_matches_math_erf():
    apply = elementwise(kernels.erf_f32)
    x = np.concatenate([np.linspace(-10, 10, 400001), [0.0, 1e-8, -1e-8, 4.0, -4.0, 1e30, -1e30]]).astype(f32)
    ref = _erf(x.astype(np.float64))
    assert np.abs(apply(x) - ref).max() < 5e-7   # a few float32 ulps


def matmul_nt_ref(x, w):
    """Every output a float64 dot product of a token row and a weight row."""
    out = np.zeros((x.shape[0], w.shape[0]), np.float64)
    for m in range(x.shape[0]):
        for n in range(w.shape[0]):
            out[m, n] = float(np.dot(x[m].astype(np.float64), w[n].astype(np.float64)))
    return out


# M and N around the 4 x 4 blocks (a last 1, 2 or 3 tokens; 1-3 rows), K odd and tiny, and the
# shape of a short sentence's QKV product.
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (2, 3, 5), (3, 4, 2), (4, 4, 8), (5, 7, 3), (6, 5, 17), (7, 9, 13), (8, 12, 64),
                                   (13, 10, 1), (11, 2304, 768)])
def test_matmul_nt_matches_naive(m, n, k):
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.standard_normal((m, k), dtype=f32)
    w = rng.standard_normal((n, k), dtype=f32)
    w.flags.writeable = False                 # weights are read-only memory maps in the engine
    out = np.full((m, n), np.nan, f32)
    threads.run(kernels.matmul_nt, x, w, out)
    ref = matmul_nt_ref(x, w) if m * n * k < 1e6 else x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6 * math.sqrt(k) * 4)


@pytest.mark.parametrize("m", [1, 2, 11, fwd.SMALL_PRODUCT_TOKENS, fwd.SMALL_PRODUCT_TOKENS + 1, 200])
def test_linear_same_on_both_paths(m):
    """model.linear picks the kernel or BLAS by token count; both give x @ w.T."""
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, 96), dtype=f32)
    w = rng.standard_normal((40, 96), dtype=f32)
    np.testing.assert_allclose(fwd.linear(x, w), x @ w.T, rtol=0, atol=1e-4)
    np.testing.assert_allclose(fwd.linear(x[:, ::2], w[:, ::2].copy()), x[:, ::2] @ w[:, ::2].T, rtol=0, atol=1e-4)


def shared_cases(rng):
    """kernel -> arguments of a realistic size, without the state (written outputs come last)."""
    x, w_in, b_in, w_out = random_tree(rng, 600, 64, 7)
    return {
        kernels.gelu_: (rng.standard_normal((50, 300), dtype=f32),),
        kernels.layer_norm: (x, rng.standard_normal(64, dtype=f32), rng.standard_normal(64, dtype=f32), f32(1e-12),
                             np.full_like(x, np.nan)),
        kernels.attention_heads: (rng.standard_normal((3 * 70, 3 * 768), dtype=f32), fwd.key_bias(rng.random((3, 70)) > 0.3),
                                  f32(0.125), 12, np.full((3 * 70, 768), np.nan, f32)),
        kernels.matmul_nt: (x[:11], rng.standard_normal((2304, 64), dtype=f32), np.full((11, 2304), np.nan, f32)),
        kernels.fff_walk: (x, w_in, b_in, w_out, 7, np.full_like(x, np.nan), np.full((600, 8), -1, np.int32),
                           np.full((600, 8), np.nan, f32)),
    }


def _copies(args):
    return [a.copy() if isinstance(a, np.ndarray) else a for a in args]


@pytest.mark.parametrize("name", ["gelu_", "layer_norm", "attention_heads", "matmul_nt", "fff_walk"])
def test_shared_kernel_with_helpers_equals_itself_alone(name, monkeypatch):
    """Helpers claim blocks computed by the same code: the same bits as the kernel alone on one
    thread, whichever thread did which block (repeated, so that the split differs)."""
    kernel = getattr(kernels, name)
    args = shared_cases(np.random.default_rng(7))[kernel]
    alone = _copies(args)
    state = np.zeros(kernels.SHARED_SLOTS, np.int64)
    kernel(*alone, state)
    assert state[kernels.SHARED_INSIDE] == 0 and kernels.helpers_done(state, 1)
    monkeypatch.setitem(kernels._SHARED, kernel, 1)              # helpers at every size
    with threads.calls(3):                                          # two helpers
        for _ in range(10):
            got = _copies(args)
            threads.run(kernel, *got)
            for a, b in zip(got, alone):
                if isinstance(a, np.ndarray):
                    np.testing.assert_array_equal(a, b)


def test_a_used_state_has_nothing_left_to_claim():
    x = np.ones((5, 8), f32)
    w = np.ones((13, 8), f32)
    state = np.zeros(kernels.SHARED_SLOTS, np.int64)
    out = np.empty((5, 13), f32)
    kernels.matmul_nt(x, w, out, state)
    np.testing.assert_array_equal(out, np.full((5, 13), 8, f32))
    out[:] = 0
    kernels.matmul_nt(x, w, out, state)
    assert not out.any() and state[kernels.SHARED_INSIDE] == 0


def test_run_offers_helpers_by_size_and_threads(monkeypatch):
    offered = []
    monkeypatch.setattr(threads, "offer", lambda kernel, args, count: offered.append((args[0].size, count)))
    monkeypatch.setitem(kernels._SHARED, kernels.gelu_, 100)
    with threads.calls(2):
        threads.run(kernels.gelu_, np.zeros((1, 99), f32))
        threads.run(kernels.gelu_, np.zeros((1, 100), f32))
    with threads.calls(1):
        threads.run(kernels.gelu_, np.zeros((1, 1000), f32))
    assert offered == [(100, 1)]


def test_thread_setting_is_per_python_thread():
    import threading
    seen = []
    with threads.calls(1):
        t = threading.Thread(target=lambda: seen.append(threads.count()))
        t.start()
        t.join()
        assert threads.count() == 1 and seen == [threads.available()]
    assert threads.count() == threads.available()              # a call's setting ends with it


def test_fetch_add_returns_the_old_value():
    from numba import njit

    @njit
    def bump(a):
        return kernels.fetch_add(a, 1, 5), kernels.fetch_add(a, 1, -2)

    a = np.array([7, 10], np.int64)
    assert bump(a) == (10, 15) and a.tolist() == [7, 13]


# --- int8 products ---------------------------------------------------------------------------------

from ufcpu import quant  # noqa: E402


def quantize_rows_ref(x):
    """Per token: scale max|x| / 127, q = rint(x / scale) in [-127, 127], as float32 NumPy."""
    amax = np.abs(x).max(axis=1)
    inv = np.divide(f32(127), amax, out=np.zeros_like(amax), where=amax > 0).astype(f32)
    q = np.zeros((x.shape[0], quant.padded(x.shape[1], kernels.INT8_K_ALIGN)), np.int8)
    q[:, :x.shape[1]] = np.clip(np.rint(x * inv[:, None]), -127, 127)
    return q, (amax / f32(127)).astype(f32)


def matmul_s8_ref(xq, wq):  # [M, Kp] int8, [N, Kp] int8 -> [M, N] int32, every sum in int32
    return xq.astype(np.int32) @ wq.astype(np.int32).T


@pytest.mark.parametrize("m,k", [(1, 768), (3, 5), (17, 201), (128, 768), (2, 1)])
def test_quantize_rows_matches_naive(m, k):
    rng = np.random.default_rng(m + k)
    x = (rng.standard_normal((m, k), dtype=f32) * rng.uniform(0.01, 30, (m, 1))).astype(f32)
    x[0, 0] = -np.abs(x[0]).max() * 2                # the extreme is exactly -127
    q, scale = quant.quantize_activations(x)
    ref_q, ref_scale = quantize_rows_ref(x)
    np.testing.assert_array_equal(q, ref_q)
    np.testing.assert_array_equal(scale, ref_scale)
    assert q[0, 0] == -127 and q.min() >= -127


def test_quantize_rows_zero_and_bad_tokens():
    x = np.array([[0, 0, 0], [1, np.nan, 2], [np.inf, 1, 0], [-3, 0, 1.5]], f32)
    q, scale = quant.quantize_activations(x)
    assert scale[0] == 0 and not q[0].any()
    assert np.isnan(scale[1]) and np.isnan(scale[2]) and not q[1].any() and not q[2].any()
    assert q[3, :3].tolist() == [-127, 0, 64] and scale[3] == f32(3) / f32(127)


INT8_SHAPES = [(m, k, n) for m in (1, 2, 3, 5, 17, 128) for k, n in ((768, 100), (200, 2304 if m < 17 else 77))] + \
    [(4, 3, 1), (6, 36, 65), (7, 768, 768)]


def product_args(name, xq, xs, wq, ws):
    """The arguments of product `name` for activations xq and int8 weights wq [N, Kp]."""
    data, wsum = quant.PRODUCTS[name].pack(wq)
    if name == "avx512_vnni":
        return (xq, xs, data, ws, wsum)
    return (xq, xs, data, ws)


@pytest.mark.parametrize("name", quant.available())
@pytest.mark.parametrize("m,k,n", INT8_SHAPES)
def test_int8_products_match_naive_exactly(name, m, k, n):
    """Random ints over the whole range (s8 -128..127 activations, i.e. u8 0..255 inside VNNI;
    weights -127..127) and the extremes: the integer sums equal NumPy's int32 ones, exactly
    (unit scales: every sum here is below 2^24, so float32 holds it exactly), for every product
    this CPU runs; K not a multiple of 64 (or 4), N not a multiple of the column block."""
    rng = np.random.default_rng(m * 7 + k + n)
    kp = quant.padded(k, kernels.INT8_K_ALIGN)
    xq = np.zeros((m, kp), np.int8)
    xq[:, :k] = rng.integers(-128, 128, (m, k))
    wq = np.zeros((n, kp), np.int8)
    wq[:, :k] = rng.integers(-127, 128, (n, k))
    xq[0, :k], wq[0, :k] = -128, -127                   # the extremes: the largest sums there are
    if n > 1:
        wq[1, :k] = 127
    ref = matmul_s8_ref(xq, wq)
    assert np.abs(ref).max() < 2 ** 24
    product = quant.PRODUCTS[name]
    out = np.full((m, n), np.nan, f32)
    threads.run(product.kernel, *product_args(name, xq, np.ones(m, f32), wq, np.ones(n, f32)), out)
    np.testing.assert_array_equal(out, ref.astype(f32))
    # with scales: the exact sum times x_scale[m] * w_scale[n], rounded as NumPy rounds it
    xs = rng.uniform(0.001, 0.1, m).astype(f32)
    ws = rng.uniform(0.001, 0.1, n).astype(f32)
    threads.run(product.kernel, *product_args(name, xq, xs, wq, ws), out)
    np.testing.assert_array_equal(out, ref.astype(f32) * (xs[:, None] * ws[None, :]))


def test_vnni_layout_puts_four_k_of_sixteen_columns_together():
    wq = np.arange(20 * 8, dtype=np.int64).reshape(20, 8).astype(np.int8)   # [N 20, Kp 8]
    packed, wsum = quant.pack_vnni(wq)
    assert packed.shape == (kernels.VNNI_COLS // 16, 2, 16, 4)               # N padded to 64
    assert packed[0, 1, 3].tolist() == wq[3, 4:8].tolist() and packed[1, 0, 2].tolist() == wq[18, 0:4].tolist()
    assert not packed[1, :, 4:].any()
    np.testing.assert_array_equal(wsum, 128 * wq.astype(np.int32).sum(axis=1))


@pytest.mark.parametrize("name", quant.available())
def test_int8_products_with_helpers_equal_themselves_alone(name, monkeypatch):
    rng = np.random.default_rng(11)
    xq = rng.integers(-127, 128, (19, 96)).astype(np.int8)
    wq = rng.integers(-127, 128, (300, 96)).astype(np.int8)
    args = product_args(name, xq, rng.uniform(0.01, 1, 19).astype(f32), wq, rng.uniform(0.01, 1, 300).astype(f32))
    kernel = quant.PRODUCTS[name].kernel
    alone = np.full((19, 300), np.nan, f32)
    kernel(*args, alone, np.zeros(kernels.SHARED_SLOTS, np.int64))
    monkeypatch.setitem(kernels._SHARED, kernel, 1)
    monkeypatch.setitem(kernels._SHARED, kernels.quantize_rows, 1)
    threads.set_threads(3)
    try:
        for _ in range(10):
            got = np.full_like(alone, np.nan)
            threads.run(kernel, *args, got)
            np.testing.assert_array_equal(got, alone)
        x = rng.standard_normal((300, 50), dtype=f32)
        np.testing.assert_array_equal(quant.quantize_activations(x)[0], quantize_rows_ref(x)[0])
    finally:
        threads.set_threads(threads.available())


def test_vnni_product_is_never_offered_without_the_feature(monkeypatch):
    """Its instruction does not exist on such a CPU: not in the products, not compiled by warmup."""
    monkeypatch.setattr(kernels, "host_features", lambda: frozenset({"avx2", "fma"}))
    assert kernels.int8_kernels() == [kernels.matmul_s8_rows]
    assert kernels.matmul_s8_vnni not in kernels._example_calls()
    assert quant.available() == ["portable"]
    assert quant.quantize(np.ones((4, 8), f32)).product == "portable"


# --- attention: scores, softmax and context, fused -------------------------------------------------

def attention_ref(qkv, bias, scale, heads):
    """[n*S, 3H] Q | K | V, [n, S] additive bias -> [n*S, H]: each (sequence, head) in float64, as
    MODEL.md writes it (scores scaled, bias added, softmax over keys, times V; feature = head*d + i)."""
    n, s = bias.shape
    hid = qkv.shape[1] // 3
    d = hid // heads
    x = qkv.astype(np.float64).reshape(n, s, 3, heads, d)
    out = np.zeros((n, s, heads, d))
    for b in range(n):
        for a in range(heads):
            q, k, v = x[b, :, 0, a], x[b, :, 1, a], x[b, :, 2, a]         # [S, d] each
            scores = q @ k.T * scale + bias[b][None, :].astype(np.float64)  # [S, S]
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            out[b, :, a] = (p / p.sum(axis=1, keepdims=True)) @ v
    return out.reshape(n * s, hid)


def attention_case(rng, n, s, heads, d, padded):
    qkv = rng.standard_normal((n * s, 3 * heads * d), dtype=f32)
    mask = np.ones((n, s), np.int64)
    if padded:
        mask = (rng.random((n, s)) > 0.4).astype(np.int64)
        mask[:, 0] = 1
    return qkv, fwd.key_bias(mask), mask


def run_attention(qkv, bias, heads, scale=f32(0.125)):
    out = np.full((qkv.shape[0], qkv.shape[1] // 3), np.nan, f32)
    threads.run(kernels.attention_heads, qkv, bias, scale, heads, out)
    return out


# S around the key rows (8) and the query tile (32), heads 1 and 12, d = 64 (the full model's, four
# whole vectors), 20 (not a multiple of 8: V padded) and 72 (past one 64-feature context tile).
@pytest.mark.parametrize("s", [1, 2, 3, 17, 128, 129])
@pytest.mark.parametrize("heads,d", [(1, 64), (12, 64), (1, 20), (3, 72)])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_heads_matches_naive(s, heads, d, padded):
    rng = np.random.default_rng(s * 100 + heads * 7 + d + padded)
    n = 1 if s > 100 and heads == 12 else 3
    qkv, bias, _ = attention_case(rng, n, s, heads, d, padded)
    got = run_attention(qkv, bias, heads)
    assert got.dtype == np.float32 and not np.isnan(got).any()
    np.testing.assert_allclose(got, attention_ref(qkv, bias, 0.125, heads), rtol=0, atol=2e-6)


def test_attention_heads_gives_padded_keys_no_weight():
    """A padded key's bias (-10000) gives it exactly no weight: its V, however large, changes
    nothing, and the real keys' context is that of the sequence without it."""
    rng = np.random.default_rng(5)
    qkv, bias, mask = attention_case(rng, 2, 40, 12, 64, padded=True)
    hid = 12 * 64
    loud = qkv.copy()
    loud[np.flatnonzero(mask.ravel() == 0), 2 * hid:] = 1e6          # V of every padded key
    np.testing.assert_array_equal(run_attention(loud, bias, 12), run_attention(qkv, bias, 12))
    keep = np.flatnonzero(mask[1])                                    # sequence 1, real keys only
    alone = qkv[40 + keep]
    np.testing.assert_allclose(run_attention(alone, np.zeros((1, len(keep)), f32), 12),
                               run_attention(qkv, bias, 12)[40 + keep], rtol=0, atol=1e-6)


def test_attention_heads_uses_the_scale():
    rng = np.random.default_rng(9)
    qkv, bias, _ = attention_case(rng, 1, 33, 2, 64, padded=False)
    for scale in (0.0625, 0.125, 0.3):
        np.testing.assert_allclose(run_attention(qkv, bias, 2, f32(scale)), attention_ref(qkv, bias, scale, 2),
                                   rtol=0, atol=2e-6)
    assert np.abs(run_attention(qkv, bias, 2, f32(0.3)) - run_attention(qkv, bias, 2, f32(0.125))).max() > 0.01


def test_self_attention_runs_every_sequence_of_a_group():
    """model.self_attention: [n, S, 3H] of n sequences -> their context rows in order."""
    from ufcpu.config import Config
    rng = np.random.default_rng(4)
    qkv, bias, _ = attention_case(rng, 4, 9, 12, 64, padded=True)
    layer = type("L", (), {"norm_factor": f32(0.125)})()
    cfg = Config(layers=1, hidden=768, heads=12, vocab=10, depth=1)
    got = fwd.self_attention(qkv.reshape(4, 9, -1), bias, layer, cfg)
    np.testing.assert_allclose(got, attention_ref(qkv, bias, 0.125, 12), rtol=0, atol=2e-6)
