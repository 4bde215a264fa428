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


def test_route_tiles_cut_a_small_input_evenly_for_the_threads_expected():
    tile = lambda t, threads: kernels.route_tile(t, 64, threads)   # noqa: E731
    assert [tile(11, n) for n in (0, 1, 2, 3)] == [16, 16, 6, 4]
    assert [tile(t, 2) for t in (1, 2, 16, 20, 31, 32, 40)] == [1, 1, 8, 10, 16, 16, 16]
    assert tile(4096, 2) == tile(4096, 1) == 64                     # large batches: as many tiles as ever


@pytest.mark.parametrize("t", [1, 3, 11, 20, 33])
def test_fff_walk_for_threads_expected_gives_the_same_bits(t):
    """A caller that expects helpers cuts a small input into more route tiles; done by one thread
    (the helpers never came) it gives the bits of one tile."""
    rng = np.random.default_rng(t)
    x, w_in, b_in, w_out = random_tree(rng, t, 64, 7)
    runs = []
    for threads_expected in (0, 2, 3):
        state = np.zeros(kernels.SHARED_SLOTS, np.int64)
        state[kernels.SHARED_THREADS] = threads_expected
        out = (np.full_like(x, np.nan), np.full((t, 8), -1, np.int32), np.full((t, 8), np.nan, f32))
        kernels.fff_walk(x, w_in, b_in, w_out, 7, *out, state)
        runs.append(out)
    assert not np.isnan(runs[0][0]).any()
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)


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
    assert kernels.ROUTE_TILE_MAX == kernels.TUNING["route_tile_max"] >= kernels.ROUTE_TILE
    assert kernels.SPLIT_GROUP == kernels.TUNING["split_group"] >= 1
    assert kernels.WALK_VEC == kernels.TUNING["walk_vec"] in (4, 8, 16)


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
    """The softmax's vector exp: relative error within 1e-7 + |x| * 1e-7 over its range."""
    def apply(x):
        out = np.full_like(x, np.nan)
        kernels.exp_f32(x, out)
        return out
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
        kernels.attention_heads: (rng.standard_normal((3 * 70, 3 * 768), dtype=f32), fwd.spans([70, 41, 99]),
                                  fwd.key_bias(rng.random((3, 99)) > 0.3), f32(0.125), 12,
                                  np.full((3 * 70, 768), np.nan, f32)),
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


# --- what helpers wait on (single-threaded here: every outcome is decided before the call) --------

def test_wait_offer_returns_when_an_offer_is_posted_and_its_caller_is_inside():
    posted, ahead, awake = np.array([5], np.int64), np.zeros(kernels.SHARED_SLOTS, np.int64), np.array([3], np.int64)
    box = np.zeros(kernels.BOX_SLOTS, np.int64)
    assert kernels.wait_offer(posted, 5, ahead, 100, awake, box) is False        # nothing posted
    posted[0] = 6
    assert kernels.wait_offer(posted, 5, ahead, 100, awake, box) is True         # posted; caller not in (yet)
    ahead[kernels.SHARED_INSIDE] = 1
    assert kernels.wait_offer(posted, 5, ahead, 1 << 40, awake, box) is True     # returns at once: a check cannot hang
    ahead[kernels.SHARED_INSIDE], ahead[kernels.SHARED_NEXT] = 0, 4               # caller in and out again
    assert kernels.wait_offer(posted, 5, ahead, 1 << 40, awake, box) is True
    assert awake[0] == 3 and box[kernels.BOX_SPINNING] == 0                      # counted only while inside


def test_wait_zero_and_count_add():
    c = np.array([2], np.int64)
    assert kernels.wait_zero(c, 0, 50) is False
    kernels.count_add(c, -2)
    assert kernels.wait_zero(c, 0, 1 << 40) is True and c[0] == 0
    kernels.count_add(c, 7)
    assert c[0] == 7


def test_run_offers_helpers_by_size_and_threads(monkeypatch):
    offered = []

    def post(kernel, args, count, shared):
        offered.append((args[0].size, count, shared))
        return np.zeros(kernels.SHARED_SLOTS, np.int64)
    monkeypatch.setattr(threads, "_post", post)
    monkeypatch.setitem(kernels._SHARED, kernels.gelu_, 100)
    with threads.calls(2):
        threads.run(kernels.gelu_, np.zeros((1, 99), f32))
        threads.run(kernels.gelu_, np.zeros((1, 100), f32))
    with threads.calls(1):
        threads.run(kernels.gelu_, np.zeros((1, 1000), f32))
    assert offered == [(100, 1, True)]


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


@pytest.mark.parametrize("zero", [0, 128])
@pytest.mark.parametrize("m,k", [(1, 768), (3, 5), (17, 201), (128, 768), (2, 1)])
def test_quantize_rows_matches_naive(m, k, zero):
    """s8 activations (zero 0), or the same values + 128 as u8 (zero 128, for VNNI), padding included."""
    rng = np.random.default_rng(m + k)
    x = (rng.standard_normal((m, k), dtype=f32) * rng.uniform(0.01, 30, (m, 1))).astype(f32)
    x[0, 0] = -np.abs(x[0]).max() * 2                # the extreme is exactly -127
    q, scale = quant.quantize_activations(x, zero)
    ref_q, ref_scale = quantize_rows_ref(x)
    assert q.dtype == (np.int8 if zero == 0 else np.uint8)
    np.testing.assert_array_equal(q.astype(np.int32) - zero, ref_q)
    np.testing.assert_array_equal(scale, ref_scale)
    assert q[0, 0] == zero - 127 and q.min() >= zero - 127


@pytest.mark.parametrize("zero", [0, 128])
def test_quantize_rows_zero_and_bad_tokens(zero):
    x = np.array([[0, 0, 0], [1, np.nan, 2], [np.inf, 1, 0], [-3, 0, 1.5]], f32)
    q, scale = quant.quantize_activations(x, zero)
    q = q.astype(np.int32) - zero
    assert scale[0] == 0 and not q[0].any()
    assert np.isnan(scale[1]) and np.isnan(scale[2]) and not q[1].any() and not q[2].any()
    assert q[3].tolist() == [-127, 0, 64, 0] and scale[3] == f32(3) / f32(127)


INT8_SHAPES = [(m, k, n) for m in (1, 2, 3, 5, 17, 128) for k, n in ((768, 100), (200, 2304 if m < 17 else 77))] + \
    [(4, 3, 1), (6, 36, 65), (7, 768, 768), (8, 20, 48), (9, 64, 49), (15, 44, 95), (16, 768, 97), (23, 12, 3),
     (3, 64, 6 * 48 - 41)]   # six column blocks: a claim of VNNI_SPAN, then a short one ending in a partial block


def product_args(name, xq, xs, wq, ws):
    """The arguments of product `name` for s8 activations xq and int8 weights wq [N, Kp] (the VNNI
    product takes its activations as u8, xq + 128)."""
    product = quant.PRODUCTS[name]
    data, wsum = product.pack(wq)
    xq = (xq.astype(np.int16) + product.zero).astype(quant.ACTIVATIONS[product.zero])
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
    assert packed.shape == (kernels.VNNI_COLS // 16, 2, 16, 4)               # N padded to 48
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


VNNI = pytest.mark.skipif("avx512_vnni" not in quant.available(), reason="this CPU has no AVX-512 VNNI")


@VNNI
@pytest.mark.parametrize("m,k,n", [(1, 768, 2304), (5, 36, 65), (17, 200, 100), (300, 96, 300)])
def test_vnni_linear_is_quantize_then_product(m, k, n, monkeypatch):
    """linear_s8_vnni (one launch) gives the bits of quantize_rows (u8) then matmul_s8_vnni,
    alone and with helpers joining both of its sweeps; zero and NaN tokens included."""
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k), dtype=f32)
    x[-1] = 0
    if m > 2:
        x[1, 3] = np.nan
    q = quant.quantize(rng.standard_normal((n, k), dtype=f32), "avx512_vnni")
    xq, xs = quant.quantize_activations(x, 128)
    want = np.full((m, n), np.nan, f32)
    kernels.matmul_s8_vnni(xq, xs, q.data, q.scale, q.wsum, want, np.zeros(kernels.SHARED_SLOTS, np.int64))
    kp = quant.padded(k, kernels.INT8_K_ALIGN)
    monkeypatch.setitem(kernels._SHARED, kernels.linear_s8_vnni, 1)
    for n_threads in (1, 3):
        threads.set_threads(n_threads)
        try:
            for _ in range(5 if n_threads > 1 else 1):
                got, gq, gs = np.full_like(want, np.nan), np.empty((m, kp), np.uint8), np.empty(m, f32)
                threads.run(kernels.linear_s8_vnni, x, gq, gs, q.data, q.scale, q.wsum, got)
                np.testing.assert_array_equal(gq, xq)
                np.testing.assert_array_equal(gs, xs)
                np.testing.assert_array_equal(got, want)
        finally:
            threads.set_threads(threads.available())
    assert not want[-1].any() and (m <= 2 or np.isnan(want[1]).all())
    np.testing.assert_array_equal(quant.linear(x, q), want)


def box_case(seed: int, m: int = 16, k: int = 96, n: int = 100):
    """-> (fresh(): linear_s8_vnni's arguments with a NaN output and a zero state, the output it gives)"""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k), dtype=f32)
    q = quant.quantize(rng.standard_normal((n, k), dtype=f32), "avx512_vnni")
    kp = quant.padded(k, kernels.INT8_K_ALIGN)

    def fresh():
        return (x, np.empty((m, kp), np.uint8), np.empty(m, f32), q.data, q.scale, q.wsum, np.full((m, n), np.nan, f32),
                np.zeros(kernels.SHARED_SLOTS, np.int64))
    want = fresh()
    kernels.linear_s8_vnni(*want)
    return fresh, want[6]


@VNNI
def test_a_helper_at_the_box_runs_the_posted_projection():
    """serve_box as a helper runs it (here on this thread, which then does every block): the bits
    linear_s8_vnni gives on the posted arrays; nothing when the projection was served already,
    when the caller lets no more helpers in, or once the box is closed."""
    fresh, want = box_case(1)
    box = np.zeros(kernels.BOX_SLOTS, np.int64)
    a = fresh()
    kernels.post_linear(box, 1, *a)
    assert kernels.serve_box(box, -1) == 1 and box[kernels.BOX_INSIDE] == 0
    np.testing.assert_array_equal(a[6], want)
    b = fresh()
    kernels.post_linear(box, 1, *b)
    assert kernels.serve_box(box, 2) == 2                        # this epoch served already
    box[kernels.BOX_LIMIT] = 0
    assert kernels.serve_box(box, 1) == 2                        # no helper let in
    box[kernels.BOX_LIMIT], box[kernels.BOX_OPEN] = 1, 0
    assert kernels.serve_box(box, 1) == 2                        # closed
    assert np.isnan(b[6]).all() and box[kernels.BOX_INSIDE] == 0


@VNNI
def test_a_boxed_launch_needs_a_spinning_helper_and_the_box_to_itself():
    fresh, want = box_case(2)
    box = np.zeros(kernels.BOX_SLOTS, np.int64)
    a = fresh()
    assert kernels.linear_s8_vnni_boxed(box, 1, *a) is False           # no helper spins
    box[kernels.BOX_SPINNING] = 1
    assert kernels.linear_s8_vnni_boxed(box, 0, *a) is False           # no helper allowed
    box[kernels.BOX_OWNER] = 1
    assert kernels.linear_s8_vnni_boxed(box, 1, *a) is False           # another caller holds it
    box[kernels.BOX_OWNER] = 0
    wide = np.full((a[6].shape[0], 2 * a[6].shape[1]), np.nan, f32)
    assert kernels.linear_s8_vnni_boxed(box, 1, *a[:6], wide[:, ::2], a[7]) is False   # not contiguous
    assert np.isnan(a[6]).all() and np.isnan(wide).all() and box[kernels.BOX_EPOCH] == 0
    # a "spinning" helper that never comes: the caller does every block, and leaves the box closed
    assert kernels.linear_s8_vnni_boxed(box, 1, *a) is True
    np.testing.assert_array_equal(a[6], want)
    assert box[kernels.BOX_EPOCH] == 1 and box[[kernels.BOX_OPEN, kernels.BOX_INSIDE, kernels.BOX_OWNER]].tolist() == [0, 0, 0]


def portable_box_cases(seed):
    """-> {name: (boxed launch, post, kernel, fresh(): its arguments with NaN outputs and a zero
    state)} for the walk, attention and add_layer_norm, the boxes every CPU has."""
    rng = np.random.default_rng(seed)
    x, w_in, b_in, w_out = random_tree(rng, 11, 64, 7)
    qkv = rng.standard_normal((29, 3 * 128), dtype=f32)
    seqs = fwd.spans([11, 1, 17])
    bias = fwd.key_bias(rng.random((3, 17)) > 0.2)
    x_ln, d_ln = np.ascontiguousarray(qkv[:, :64]), np.ascontiguousarray(qkv[:, 64:128])
    return {
        "walk": (kernels.fff_walk_boxed, kernels.post_walk, kernels.fff_walk,
                 lambda: (x, w_in, b_in, w_out, 7, np.full_like(x, np.nan), np.full((11, 8), -1, np.int32),
                          np.full((11, 8), np.nan, f32), np.zeros(kernels.SHARED_SLOTS, np.int64))),
        "attention": (kernels.attention_heads_boxed, kernels.post_attention, kernels.attention_heads,
                      lambda: (qkv, seqs, bias, f32(0.3), 2, np.full((29, 128), np.nan, f32),
                               np.zeros(kernels.SHARED_SLOTS, np.int64))),
        "add_layer_norm": (kernels.add_layer_norm_boxed, kernels.post_add_layer_norm, kernels.add_layer_norm,
                           lambda: (x_ln, d_ln, w_in[0], b_in[:64].copy(), f32(1e-5),
                                    np.full((29, 64), np.nan, f32), np.full((29, 64), np.nan, f32),
                                    np.zeros(kernels.SHARED_SLOTS, np.int64))),
    }


def assert_same_arrays(got, want):
    for a, b in zip(got, want):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["walk", "attention", "add_layer_norm"])
def test_the_portable_boxes_give_the_kernels_bits(name):
    """As a helper would (serve_box on this thread, which then does every block) and as a caller
    whose helper never comes: the bits of the kernel alone; the box left closed and free."""
    boxed, post, kernel, fresh = portable_box_cases(7)[name]
    want = fresh()
    kernel(*want)
    assert not np.isnan(want[-2]).any()                          # (the kernel wrote its output)
    box = np.zeros(kernels.BOX_SLOTS, np.int64)
    got = fresh()
    post(box, 1, *got)
    assert kernels._box_turn(box, -1) == 1
    box[kernels.BOX_OPEN] = 0
    assert_same_arrays(got[:-1], want[:-1])
    box[kernels.BOX_SPINNING] = 1
    alone = fresh()
    assert boxed(box, 1, *alone) is True
    assert_same_arrays(alone[:-1], want[:-1])
    assert box[[kernels.BOX_OPEN, kernels.BOX_INSIDE, kernels.BOX_OWNER]].tolist() == [0, 0, 0]


@pytest.mark.parametrize("name", ["walk", "attention", "add_layer_norm"])
def test_the_portable_boxes_through_threads_give_the_same_bits(name):
    boxed, post, kernel, fresh = portable_box_cases(8)[name]
    want = fresh()
    kernel(*want)
    with threads.calls(2):
        for _ in range(20):
            got = fresh()
            threads.run(kernel, *got[:-1])
            assert_same_arrays(got[:-1], want[:-1])


@VNNI
@pytest.mark.parametrize("m", [1, 16, 40])
def test_projections_with_helpers_at_the_box_give_the_same_bits(m):
    """At 2 threads (helpers spinning, as in a model call) each projection gives the bits it
    gives on one thread, through the box or the board, whichever the helpers are at."""
    fresh, want = box_case(3, m=m, k=768, n=2304)
    with threads.calls(2):
        for _ in range(20):
            a = fresh()
            threads.run(kernels.linear_s8_vnni, *a[:7])
            np.testing.assert_array_equal(a[6], want)
    assert threads._box[[kernels.BOX_OPEN, kernels.BOX_INSIDE, kernels.BOX_OWNER]].tolist() == [0, 0, 0]


def test_vnni_product_is_never_offered_without_the_feature(monkeypatch):
    """Its instruction does not exist on such a CPU: not in the products, not compiled by warmup."""
    monkeypatch.setattr(kernels, "host_features", lambda: frozenset({"avx2", "fma"}))
    assert kernels.int8_kernels() == [kernels.matmul_s8_rows]
    assert not {kernels.matmul_s8_vnni, kernels.linear_s8_vnni} & set(kernels._example_calls())
    assert quant.available() == ["portable"]
    assert quant.quantize(np.ones((4, 8), f32)).product == "portable"


# --- the tree walk's shared row loads (kernels._walk_dots, _walk_out, the split walk) -----------

from numba import njit  # noqa: E402


LANES = sorted({8, 16, kernels.WALK_VEC})   # every vector width a CPU's tuning may choose, whichever this one runs


def _walk_sums(lanes):
    """-> (share3_of, pair3_of, out_of): the walk's intrinsics built with `lanes`, as functions
    of arrays; with kernels.WALK_VEC, the kernels' own."""
    own = lanes == kernels.WALK_VEC
    share3 = kernels._dots_share3 if own else kernels._walk_dots(tuple((t, r) for t in range(4) for r in range(3)), lanes)
    pair3 = kernels._dots_pair3 if own else kernels._walk_dots(((0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)), lanes)
    out_share = kernels._out_share if own else kernels._walk_out(4, lanes)
    out_one = kernels._out_one if own else kernels._walk_out(1, lanes)

    @njit(cache=False)
    def share3_of(x, w):  # x [4, H], w [3, H] -> [4, 3]: every token with every row
        xa, xs = np.int64(x.ctypes.data), np.int64(x.strides[0])
        wa, ws = np.int64(w.ctypes.data), np.int64(w.strides[0])
        z = share3((xa, xa + xs, xa + 2 * xs, xa + 3 * xs), (wa, wa + ws, wa + 2 * ws), x.shape[1])
        out = np.empty((4, 3), np.float32)
        for i in range(12):
            out[i // 3, i % 3] = z[i]
        return out

    @njit(cache=False)
    def pair3_of(x, w, a, b):  # tokens a, b with rows w[3a..3a+2], w[3b..3b+2] -> [2, 3]
        xa, xs = np.int64(x.ctypes.data), np.int64(x.strides[0])
        wa, ws = np.int64(w.ctypes.data), np.int64(w.strides[0])
        z = pair3((xa + a * xs, xa + b * xs), (wa, wa + ws, wa + 2 * ws, wa + 3 * ws, wa + 4 * ws, wa + 5 * ws),
                  x.shape[1])
        return np.array([[z[0], z[1], z[2]], [z[3], z[4], z[5]]], np.float32)

    @njit(cache=False)
    def out_of(w, route, g, share):  # w [N, H], route [L] int32, g [4, L] -> [4, H] each token's sum
        out = np.full((4, w.shape[1]), np.nan, np.float32)
        wa, ws = np.int64(w.ctypes.data), np.int64(w.strides[0])
        ga, gs = np.int64(g.ctypes.data), np.int64(g.strides[0])
        oa, os = np.int64(out.ctypes.data), np.int64(out.strides[0])
        ra = np.int64(route.ctypes.data)
        if share:
            out_share((ga, ga + gs, ga + 2 * gs, ga + 3 * gs), wa, ws, ra, route.shape[0],
                      (oa, oa + os, oa + 2 * os, oa + 3 * os), w.shape[1])
        else:
            for i in range(4):
                out_one((ga + i * gs,), wa, ws, ra, route.shape[0], (oa + i * os,), w.shape[1])
        return out
    return share3_of, pair3_of, out_of


WALK_SUMS = {lanes: _walk_sums(lanes) for lanes in LANES}


@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("h", [1, 7, 8, 15, 16, 24, 40, 48, 57, 768])
def test_walk_dots_match_numpy_and_each_other(h, lanes):
    """A dot product is the same bits whichever intrinsic computes it and whatever shares its loads."""
    share3_of, pair3_of, _ = WALK_SUMS[lanes]
    rng = np.random.default_rng(h)
    x = rng.standard_normal((4, h), dtype=f32)
    w = rng.standard_normal((6, h), dtype=f32)
    shared = share3_of(x, w[:3])
    np.testing.assert_allclose(shared, x.astype(np.float64) @ w[:3].T.astype(np.float64), rtol=1e-5, atol=1e-5 * h)
    for a, b in ((0, 1), (2, 3), (1, 1)):
        w2 = np.concatenate([w[:3], w[:3]])
        pair = pair3_of(x, w2, a, b)
        np.testing.assert_array_equal(pair[0], shared[a])
        np.testing.assert_array_equal(pair[1], shared[b])


@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("h,levels", [(1, 1), (7, 3), (40, 12), (100, 12), (768, 12), (64, 13)])
def test_walk_output_rows_match_numpy_and_each_other(h, levels, lanes):
    _, _, out_of = WALK_SUMS[lanes]
    rng = np.random.default_rng(h + levels)
    w = rng.standard_normal((50, h), dtype=f32)
    route = rng.integers(0, 50, levels).astype(np.int32)
    g = rng.standard_normal((4, levels), dtype=f32)
    shared = out_of(w, route, g, True)
    np.testing.assert_allclose(shared, g.astype(np.float64) @ w[route].astype(np.float64), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out_of(w, route, g, False), shared)


def _misaligned(a, offset):  # -> a copy of a whose data starts `offset` bytes past a 64-byte boundary
    buf = np.empty(a.nbytes + 128, np.uint8)
    start = -buf.ctypes.data % 64 + offset
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


@pytest.mark.parametrize("offset", [4, 16, 32])
def test_fff_walk_bits_do_not_depend_on_where_the_rows_start(offset):
    """Aligned rows only make the walk's vector loads cheaper: inputs and weights anywhere give
    the same bits (here in the tiled and the split walk of this CPU)."""
    x, w_in, b_in, w_out = random_tree(np.random.default_rng(offset), 700, 768, 11)
    want = fwd.fff(*(_misaligned(a, 0) for a in (x, w_in, b_in, w_out)), 11)
    for t in (9, 700):
        got = fwd.fff(*(_misaligned(a, offset) for a in (x[:t], w_in, b_in, w_out)), 11)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w[:t])


@pytest.mark.parametrize("rows,cols", [(0, 768), (1, 1), (3, 5), (11, 768), (700, 24)])
def test_empty_aligned_starts_on_a_cache_line(rows, cols):
    a = fwd.empty_aligned((rows, cols))
    assert a.shape == (rows, cols) and a.dtype == f32 and a.flags.c_contiguous and a.flags.writeable
    assert a.size == 0 or a.ctypes.data % kernels.ALIGN == 0   # an empty array has no first element
    a[...] = 1.5   # its own memory, all of it
    assert a.sum() == 1.5 * rows * cols
    big = fwd.rows_like(np.ones((max(rows, fwd.ALIGNED_MIN_ROWS), cols), f32))
    assert big.ctypes.data % kernels.ALIGN == 0 and big.dtype == f32


@njit(cache=False)
def _walk_variant(x, w_in, b_in, w_out, depth, group, tile_max, unit):
    """One thread's fff_walk with the tunables as arguments: the tiled walk (group huge) or the
    split walk at `_split_level(T, depth, group)`."""
    t_count = x.shape[0]
    out = np.full_like(x, np.nan)
    routes = np.full((t_count, depth + 1), -1, np.int32)
    logits = np.full((t_count, depth + 1), np.nan, np.float32)
    split = kernels._split_level(t_count, depth, group)
    size = kernels.route_tile(t_count, tile_max, 1)
    for tile in range((t_count + size - 1) // size):
        kernels._fff_route_tile(x, w_in, b_in, depth, routes, logits, tile, size, split)
    if split <= depth:
        order, bounds = kernels._split_units(routes, split, unit)
        g = np.empty((unit, depth + 1), np.float32)
        spare = np.empty(unit, np.int64)
        for u in range(bounds.shape[0] - 1):
            kernels._fff_deep_block(u, (x, w_in, b_in, w_out, depth, routes, logits, out, order, bounds, split, g, spare))
    else:
        order = np.arange(t_count).astype(np.int32)
        g = np.empty((kernels.OUTPUT_BLOCK, depth + 1), np.float32)
        for b in range((t_count + kernels.OUTPUT_BLOCK - 1) // kernels.OUTPUT_BLOCK):
            kernels._fff_output_block(b, (w_out, routes, logits, out, order, g))
    return out, routes, logits, split


def _clustered_batch(rng, x, copies):  # -> x with each row repeated 1..copies times, shuffled: tokens sharing paths
    rows = np.repeat(np.arange(x.shape[0]), rng.integers(1, copies + 1, x.shape[0]))
    return np.ascontiguousarray(x[rng.permutation(rows)])


@pytest.mark.parametrize("t,h,depth", [(300, 40, 6), (700, 24, 11), (150, 33, 5)])
def test_fff_split_and_tiled_walks_give_every_token_its_own_bits(t, h, depth):
    """Tokens grouped by node (four per shared row load, three with one repeated, the rest two by
    two), by tile of any size or by subtree below a split: each token's route, logits and output
    are the same bits in every schedule, and those of the naive walk's route."""
    rng = np.random.default_rng(t + depth)
    x, w_in, b_in, w_out = random_tree(rng, t // 4, h, depth)
    x = _clustered_batch(rng, x, 9)
    ref, ref_routes = fff_ref(x, w_in, b_in, w_out)
    tiled = _walk_variant(x, w_in, b_in, w_out, depth, 1 << 62, 16, 64)
    assert tiled[3] == depth + 1
    np.testing.assert_array_equal(tiled[1], ref_routes)
    np.testing.assert_allclose(tiled[0], ref, atol=2e-5, rtol=1e-4)
    splits = set()
    for group, tile_max, unit in ((32, 16, 64), (8, 64, 5), (4, 256, 3), (1 << 62, 1024, 64)):
        got = _walk_variant(x, w_in, b_in, w_out, depth, group, tile_max, unit)
        splits.add(got[3])
        for a, b in zip(got[:3], tiled[:3]):
            np.testing.assert_array_equal(a, b)
    assert len(splits) >= 3          # several split levels were taken, and the tiled walk
    alone = fwd.fff(x[:1], w_in, b_in, w_out, depth)
    for got, one in zip(tiled, alone):
        np.testing.assert_array_equal(got[0], one[0])


def test_fff_walk_of_clustered_tokens_matches_each_token_alone():
    """The engine's walk (with this CPU's tuning) on a batch where many tokens share paths."""
    rng = np.random.default_rng(5)
    x, w_in, b_in, w_out = random_tree(rng, 200, 48, 11)
    x = _clustered_batch(rng, x, 7)
    out, routes, logits = fwd.fff(x, w_in, b_in, w_out, 11)
    _, ref_routes = fff_ref(x, w_in, b_in, w_out)
    np.testing.assert_array_equal(routes, ref_routes)
    for i in rng.choice(x.shape[0], 20, replace=False):
        alone = fwd.fff(x[i:i + 1], w_in, b_in, w_out, 11)
        for got, one in zip((out, routes, logits), alone):
            np.testing.assert_array_equal(got[i], one[0])


@pytest.mark.parametrize("t,level,unit", [(0, 2, 4), (1, 2, 4), (300, 4, 7), (2000, 6, 64)])
def test_fff_split_units_are_a_stable_sort_by_node_cut_per_node(t, level, unit):
    rng = np.random.default_rng(t)
    routes = np.zeros((t, level + 2), np.int32)
    routes[:, level] = (2 ** level - 1) + rng.integers(0, 2 ** level, t) // 3   # some nodes empty
    order, bounds = kernels._split_units(routes, level, unit)
    np.testing.assert_array_equal(order, np.argsort(routes[:, level], kind="stable"))
    assert bounds[0] == 0 and bounds[-1] == t and np.all(np.diff(bounds) >= 1)
    for a, b in zip(bounds[:-1], bounds[1:]):
        assert b - a <= unit
        assert len(set(routes[order[a:b], level])) == 1


@pytest.mark.parametrize("t,depth,group,split", [(16384, 11, 32, 8), (2048, 11, 32, 6), (128, 11, 32, 2),
                                                 (127, 11, 32, 12), (16384, 4, 32, 4), (100, 3, 1, 2)])
def test_fff_split_level_is_the_deepest_even_level_with_enough_tokens(t, depth, group, split):
    assert kernels._split_level(t, depth, group) == split


def test_fff_probe_splits_spread_tokens_and_keeps_one_path_tiled():
    rng = np.random.default_rng(3)
    x, w_in, b_in, w_out = random_tree(rng, 256, 32, 11)
    assert kernels._worth_splitting(x, w_in, b_in, 11, 8, 64)
    assert kernels._worth_splitting(x, w_in, b_in, 11, 2, 64)
    one_path = np.zeros_like(x), np.zeros_like(w_in), np.zeros_like(b_in)
    assert not kernels._worth_splitting(*one_path, 11, 8, 64)
    assert not kernels._worth_splitting(*one_path, 11, 2, 64)


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


def run_attention(qkv, bias, heads, scale=f32(0.125), seqs=None):
    """attention_heads of the n sequences of bias [n, S]: each S rows of qkv, unless `seqs` says."""
    if seqs is None:
        seqs = fwd.spans(np.full(bias.shape[0], bias.shape[1]), bias.shape[1])
    out = np.full((qkv.shape[0], qkv.shape[1] // 3), np.nan, f32)
    threads.run(kernels.attention_heads, qkv, seqs, bias, scale, heads, out)
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


def test_a_query_tile_is_not_touched_by_the_spare_columns_of_an_earlier_one():
    """Q^T's columns past a short tile's queries keep an earlier tile's queries (zeroing them cost
    more than the rest of a short sequence's block): even a NaN query there leaves every other
    query's context, in any tile, the bits it has without it."""
    rng = np.random.default_rng(11)
    qkv, bias, _ = attention_case(rng, 1, 40, 2, 64, padded=False)   # tiles of 32 and 8 queries
    bad = qkv.copy()
    bad[20, :2 * 64] = np.nan                                         # query 20 of both heads
    with threads.calls(1):
        got, want = run_attention(bad, bias, 2), run_attention(qkv, bias, 2)
    others = np.arange(40) != 20
    np.testing.assert_array_equal(got[others], want[others])
    assert np.isnan(got[20]).all()


def test_attention_heads_uses_the_scale():
    rng = np.random.default_rng(9)
    qkv, bias, _ = attention_case(rng, 1, 33, 2, 64, padded=False)
    for scale in (0.0625, 0.125, 0.3):
        np.testing.assert_allclose(run_attention(qkv, bias, 2, f32(scale)), attention_ref(qkv, bias, scale, 2),
                                   rtol=0, atol=2e-6)
    assert np.abs(run_attention(qkv, bias, 2, f32(0.3)) - run_attention(qkv, bias, 2, f32(0.125))).max() > 0.01


@pytest.mark.parametrize("threads_n", [1, 2])
def test_sequences_of_every_length_run_in_one_launch(threads_n):
    """Sequences of different lengths (and a padded one) in one launch: each gets the bits it gets
    alone and the naive result, in any order, rows between them untouched."""
    rng = np.random.default_rng(4)
    lengths, gap = [9, 1, 40, 33, 9, 128], 3
    firsts = np.cumsum([0] + [n + gap for n in lengths[:-1]])
    qkv = rng.standard_normal((firsts[-1] + lengths[-1], 3 * 768), dtype=f32)
    mask = np.zeros((len(lengths), max(lengths)), np.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    mask[2, 5] = 0                                                   # a padded key inside sequence 2
    bias = fwd.key_bias(mask)
    seqs = np.stack([firsts, lengths], axis=1).astype(np.int64)[::-1].copy()   # any order
    with threads.calls(threads_n):
        got = run_attention(qkv, bias[::-1].copy(), 12, seqs=seqs)
    for (first, n), b in zip(seqs, bias[::-1]):
        rows = slice(first, first + n)
        alone = run_attention(qkv[rows].copy(), b[None, :n].copy(), 12)
        np.testing.assert_array_equal(got[rows], alone)
        np.testing.assert_allclose(alone, attention_ref(qkv[rows], b[None, :n], 0.125, 12), rtol=0, atol=2e-6)
    between = np.ones(len(qkv), bool)
    for first, n in seqs:
        between[first:first + n] = False
    assert np.isnan(got[between]).all()


def test_self_attention_runs_every_sequence():
    """model.self_attention: [T, 3H] and the spans of its sequences -> their context rows in order."""
    from ufcpu.config import Config
    rng = np.random.default_rng(4)
    qkv, bias, _ = attention_case(rng, 4, 9, 12, 64, padded=True)
    layer = type("L", (), {"norm_factor": f32(0.125)})()
    cfg = Config(layers=1, hidden=768, heads=12, vocab=10, depth=1)
    got = fwd.self_attention(qkv, fwd.spans(np.full(4, 9), 9), bias, layer, cfg)
    np.testing.assert_allclose(got, attention_ref(qkv, bias, 0.125, 12), rtol=0, atol=2e-6)


@pytest.mark.parametrize("t,h", [(1, 8), (11, 768), (70, 40)])
def test_add_layer_norm_is_the_add_then_layer_norm(t, h):
    """The fused residual add and LayerNorm: the sum numpy's float32 add gives, and the bits of
    layer_norm on it; with helpers too."""
    rng = np.random.default_rng(t)
    x, d = rng.standard_normal((t, h), dtype=f32), rng.standard_normal((t, h), dtype=f32)
    w, b = rng.standard_normal(h, dtype=f32), rng.standard_normal(h, dtype=f32)
    want_s = x + d
    want = fwd.layer_norm(want_s, w, b, 1e-12)
    s, out = fwd.add_layer_norm(x, d, w, b, 1e-12)
    np.testing.assert_array_equal(s, want_s)
    np.testing.assert_array_equal(out, want)
    with threads.calls(2):
        s2, out2 = fwd.add_layer_norm(x[None], d[None], w, b, 1e-12)   # [1, T, H] keeps its shape
    assert s2.shape == out2.shape == (1, t, h)
    np.testing.assert_array_equal(s2[0], want_s)
    np.testing.assert_array_equal(out2[0], want)
    ref = (want_s - want_s.mean(1, keepdims=True)) / np.sqrt(want_s.var(1, keepdims=True) + 1e-12) * w + b
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)




def test_a_layer_norm_of_one_block_is_not_boxed(monkeypatch):
    """Rows of one claim have nothing to share: threads.run does not launch them through the box
    (its dispatch alone would cost more than sharing gains); one row more, it does."""
    launched = []

    def boxed(box, helpers, *args):
        launched.append(args[0].shape[0])
        return False                                  # declined: threads.run runs it alone
    monkeypatch.setitem(kernels.BOXED, kernels.add_layer_norm, boxed)
    rng = np.random.default_rng(3)
    for rows in (kernels.ROW_BLOCK, kernels.ROW_BLOCK + 1):
        x, d = (rng.standard_normal((rows, 8), dtype=f32) for _ in range(2))
        with threads.calls(2):
            s, out = fwd.add_layer_norm(x, d, np.ones(8, f32), np.zeros(8, f32), 1e-5)
        np.testing.assert_array_equal(s, x + d)
    assert launched == [kernels.ROW_BLOCK + 1]
