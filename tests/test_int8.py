"""precision="int8" against float32 of the same engine: accuracy on every fixture, the choice of
int8 product, and the surface (load, CLI, errors).

Targets (README, "Precision"): token cosine mean >= 0.999, pooled (mean) cosine min >= 0.999,
MLM top-1 agreement >= 97%, masked-token accuracy on trained-tiny within 1 point of float32.
Asserted with a margin; `python -m pytest tests/test_int8.py -s` prints the measured figures.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ufcpu
from conftest import ALL_FIXTURES, DATA, MLM_FIXTURES, expected, load_fixture
from ufcpu import kernels, quant
from ufcpu import model as fwd
from ufcpu.errors import CheckpointError, InputError

TRAINED = "trained-tiny"
FIXTURES = ALL_FIXTURES + (TRAINED,)
f32 = np.float32


def batch_of(name: str) -> tuple[np.ndarray, np.ndarray]:
    """-> input ids and mask [B, S]: the fixture's reference batch (trained-tiny: its held-out eval set)."""
    if name == TRAINED:
        ids = np.load(DATA / TRAINED / "eval.npz")["input_ids"]
        return ids, np.ones_like(ids)
    d = expected(name)
    return d["input_ids"], d["attention_mask"]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # [..., H] x2 -> [...]
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


_figures: dict = {}


def figures(name: str) -> dict:
    """int8 against float32 on the fixture's batch: cosines, unchanged routes, MLM agreement."""
    if name in _figures:
        return _figures[name]
    m32, m8 = load_fixture(name), load_fixture(name, precision="int8")
    ids, mask = batch_of(name)
    real = mask.astype(bool)
    t32 = fwd.encoder_trace(ids, mask, m32.weights, m32.config)
    t8 = fwd.encoder_trace(ids, mask, m8.weights, m8.config)
    tok = cosine(t32["final_hidden"], t8["final_hidden"])[real]                          # [T]
    pooled = cosine(*(ufcpu.heads.mean_pool(t["final_hidden"], mask) for t in (t32, t8)))  # [B]
    same_route = (t32["routes"] == t8["routes"]).all(axis=-1)[:, real]                  # [L, T]
    out = {"token_cos_mean": float(tok.mean()), "token_cos_min": float(tok.min()),
           "pooled_cos_min": float(pooled.min()), "routes_unchanged": float(same_route.mean())}
    if m32.config.task == "mlm":
        l32 = ufcpu.heads.mlm_logits(t32["final_hidden"][real], m32.weights)
        l8 = ufcpu.heads.mlm_logits(t8["final_hidden"][real], m8.weights)
        out["top1_agreement"] = float((l32.argmax(-1) == l8.argmax(-1)).mean())
    _figures[name] = out
    print(f"\n{name} int8 vs float32: " + ", ".join(f"{k} {v:.5f}" for k, v in out.items()))
    return out


@pytest.mark.parametrize("name", FIXTURES)
def test_int8_hidden_states_close_to_float32(name):
    f = figures(name)
    assert f["token_cos_mean"] >= 0.9992, f    # target 0.999
    assert f["pooled_cos_min"] >= 0.9995, f    # target 0.999


@pytest.mark.parametrize("name", MLM_FIXTURES + (TRAINED,))
def test_int8_mlm_top1_agrees_with_float32(name):
    assert figures(name)["top1_agreement"] >= 0.98, figures(name)   # target 0.97


@pytest.mark.parametrize("name", FIXTURES)
def test_int8_keeps_most_routes(name):
    """The tree walk stays float32, but its input moves a little: report how many token-layers
    keep their route (asserted loosely; the figures are in the README)."""
    assert figures(name)["routes_unchanged"] >= 0.9, figures(name)


def test_int8_masked_accuracy_within_a_point_of_float32():
    d = np.load(DATA / TRAINED / "eval.npz")
    labels = d["labels"]
    sel = labels >= 0
    acc = {}
    for precision in ("float32", "int8"):
        m = load_fixture(TRAINED, precision=precision)
        acc[precision] = float((m.mlm_logits(d["input_ids"]).argmax(-1)[sel] == labels[sel]).mean())
    print(f"\n{TRAINED} masked accuracy over {sel.sum()} tokens: float32 {acc['float32']:.4f}, "
          f"int8 {acc['int8']:.4f}, reference {float(d['masked_accuracy']):.4f}")
    assert acc["float32"] == pytest.approx(float(d["masked_accuracy"]), abs=1e-9)
    assert abs(acc["int8"] - acc["float32"]) <= 0.007


def test_int8_classifier_close_to_float32():
    texts = [str(t) for t in expected("tiny-ufb-cls")["texts"]]
    l32 = load_fixture("tiny-ufb-cls").classify(texts)
    l8 = load_fixture("tiny-ufb-cls", precision="int8").classify(texts)
    assert l8.shape == l32.shape and l8.dtype == np.float32
    np.testing.assert_allclose(l8, l32, rtol=0, atol=0.02 * np.abs(l32).max())
    assert (l8.argmax(-1) == l32.argmax(-1)).all()


def test_int8_quantizes_exactly_the_projections_and_heads():
    m = load_fixture("tiny-ufb-cls", precision="int8")
    w = m.weights
    assert all(isinstance(layer.qkv, quant.QLinear) and isinstance(layer.attn_out, quant.QLinear)
               for layer in w.layers)
    assert isinstance(w.pooler_w, quant.QLinear) and isinstance(w.head_w, np.ndarray)
    assert all(isinstance(layer.w_in, np.ndarray) and layer.w_in.dtype == f32 for layer in w.layers)  # walk: float32
    mlm = load_fixture("tiny-ufb", precision="int8").weights
    assert isinstance(mlm.decoder, quant.QLinear) and mlm.word.dtype == f32   # the embedding lookup stays float32
    assert mlm.decoder.shape == mlm.word.shape


def test_float32_is_the_default_and_untouched():
    m = load_fixture("tiny-ufb")
    assert m.precision == "float32" and "precision='float32'" in repr(m)
    assert m.weights.decoder is None and all(type(layer.qkv) is not quant.QLinear for layer in m.weights.layers)
    assert "precision='int8'" in repr(load_fixture("tiny-ufb", precision="int8"))


@pytest.mark.parametrize("bad", ["int4", "INT8", "", None, 8])
def test_bad_precision_is_one_line_naming_the_choices(bad):
    with pytest.raises(InputError, match=r"^precision must be one of float32, int8, got .+$"):
        ufcpu.load(DATA / "tiny-ufb", precision=bad)


@pytest.mark.parametrize("product", quant.available())
def test_every_product_this_cpu_runs_gives_the_same_bits(product):
    """Each int8 product computes the same integer sums and scales them the same way: forcing
    each one that this CPU runs gives the same hidden states, bit for bit."""
    m = load_fixture(TRAINED)
    ids, mask = batch_of(TRAINED)
    ids, mask = ids[:3, :40], mask[:3, :40]
    default = fwd.encoder(ids, mask, load_fixture(TRAINED, precision="int8").weights, m.config)
    forced = quant.int8_weights(m.weights, m.config, product=product)
    assert {layer.qkv.product for layer in forced.layers} == {product}
    np.testing.assert_array_equal(fwd.encoder(ids, mask, forced, m.config), default)


def test_products_are_offered_by_cpu_feature(monkeypatch):
    monkeypatch.setattr(kernels, "host_features", lambda: frozenset())
    assert quant.available() == ["portable"]
    monkeypatch.setattr(kernels, "host_features", lambda: frozenset({"avx512vnni", "avx512f"}))
    assert quant.available() == ["avx512_vnni", "portable"]
    assert quant.available()[0] == next(iter(quant.PRODUCTS))   # the fastest first
    monkeypatch.setattr(kernels, "host_features", lambda: frozenset())
    with pytest.raises(InputError, match="'avx512_vnni' does not run on this CPU; it runs portable"):
        quant.quantize(np.ones((4, 8), f32), "avx512_vnni")


def test_portable_product_refuses_a_k_it_cannot_sum_exactly():
    w = np.ones((3, kernels.S8_FLOAT_K + 4), f32)
    with pytest.raises(CheckpointError, match="at most 1040 inputs"):
        quant.quantize(w, "portable")


def test_amx_status_reads_the_flags():
    assert quant.amx_status(frozenset({"avx512f"})) == "not exposed by this CPU"
    assert quant.amx_status(frozenset({"amx_tile"})) == "not exposed by this CPU"
    status = quant.amx_status()
    assert status in ("not exposed by this CPU", "exposed and granted (no AMX kernel in this engine yet)") \
        or status.startswith("exposed, but")


def test_int8_linear_edge_cases():
    """No tokens; a zero token (scale 0) gives zeros; a NaN in a token gives NaN, not a number."""
    rng = np.random.default_rng(3)
    q = quant.quantize(rng.standard_normal((20, 24), dtype=f32))
    assert quant.linear(np.zeros((0, 24), f32), q).shape == (0, 20)
    x = rng.standard_normal((3, 24), dtype=f32)
    x[1] = 0
    x[2, 5] = np.nan
    out = quant.linear(x, q)
    assert np.isfinite(out[0]).all() and not out[1].any() and np.isnan(out[2]).all()


def test_cli_precision_int8(tmp_path):
    env_run = [sys.executable, "-m", "ufcpu"]
    enc = subprocess.run(env_run + ["encode", "--model", str(DATA / TRAINED), "--precision", "int8", "a sentence"],
                         capture_output=True, text=True, timeout=300)
    assert enc.returncode == 0, enc.stderr
    vec = np.array(json.loads(enc.stdout)[0], f32)
    ref = load_fixture(TRAINED).encode("a sentence")
    assert vec.shape == ref.shape and cosine(vec, ref) > 0.999
    info = subprocess.run(env_run + ["info", "--model", str(DATA / TRAINED), "--precision", "int8"],
                          capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    got = json.loads(info.stdout)
    assert got["precision"] == "int8" and got["int8_kernels"]["products"] == quant.available()
    assert "amx" in got["int8_kernels"]
    bad = subprocess.run(env_run + ["encode", "--model", str(DATA / TRAINED), "--precision", "int4", "x"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "int4" in bad.stderr


# --- the int8 weight file ---------------------------------------------------------------------------

@pytest.fixture
def engine(tmp_path, monkeypatch):
    """A private converted copy of trained-tiny (its own cache), -> the engine folder."""
    monkeypatch.setenv("UFCPU_CACHE", str(tmp_path / "cache"))
    return ufcpu.load(DATA / TRAINED).path


def _int8_path(engine_dir):
    return quant.int8_file(engine_dir, quant.available()[0])


def test_int8_weights_are_written_once_then_mapped(engine):
    first = ufcpu.load(engine, precision="int8")
    path = _int8_path(engine)
    assert path.parent == engine and path.is_file()
    stamp = path.stat().st_mtime_ns
    again = ufcpu.load(engine, precision="int8")
    assert path.stat().st_mtime_ns == stamp                         # not written again
    q = again.weights.layers[0].qkv
    assert isinstance(q, quant.QLinear) and not q.data.flags.writeable and not q.data.flags.owndata
    ids = np.load(DATA / TRAINED / "eval.npz")["input_ids"][:2]
    np.testing.assert_array_equal(again.hidden_states(ids), first.hidden_states(ids))
    np.testing.assert_array_equal(again.mlm_logits(ids), first.mlm_logits(ids))


def test_an_edited_engine_or_a_damaged_file_is_quantized_again(engine):
    ufcpu.load(engine, precision="int8")
    path = _int8_path(engine)
    weights = engine / "engine.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))   # the engine changed
    stamp = path.stat().st_mtime_ns
    ufcpu.load(engine, precision="int8")
    assert path.stat().st_mtime_ns != stamp
    for damage in (lambda b: b[: len(b) // 2], lambda b: b"garbage" + b):
        path.write_bytes(damage(path.read_bytes()))
        m = ufcpu.load(engine, precision="int8")
        assert quant._read(path, quant._key(weights), ufcpu.load(engine).weights, m.config,
                           quant.available()[0]) is not None         # rewritten whole
    assert not [p for p in engine.iterdir() if ".partial-" in p.name]


def test_a_read_only_engine_folder_keeps_its_int8_file_in_the_cache(engine, tmp_path, monkeypatch):
    monkeypatch.setattr(quant.os, "access", lambda path, mode: Path(path) != engine)   # as for another user
    m = ufcpu.load(engine, precision="int8")
    path = _int8_path(engine)
    assert path.is_file() and tmp_path / "cache" in path.parents and isinstance(m.weights.decoder, quant.QLinear)
    assert not (engine / path.name).exists()
