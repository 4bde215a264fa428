"""Parity with the reference implementation on the golden fixtures (tests/data/*/expected.npz).

Tolerances (fixtures/README.md): hidden states and every layer's output within 1e-5 max abs on
real positions; FFF routes identical, except a flip where the reference's |z| < 1e-4; MLM logits
within 1e-5 relative; everything float32.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import ALL_FIXTURES, MLM_FIXTURES, expected, load_fixture, texts_of
from ufcpu import model as fwd

ATOL = 1e-5
FLIP_Z = 1e-4


def _trace(name):
    m = load_fixture(name)
    d = expected(name)
    return m, d, fwd.encoder_trace(d["input_ids"], d["attention_mask"], m.weights, m.config)


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_token_ids_identical(name):
    m, d = load_fixture(name), expected(name)
    batch = m.tokenize(texts_of(name))
    np.testing.assert_array_equal(batch["input_ids"], d["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], d["attention_mask"])
    for i, text in enumerate(texts_of(name)):
        np.testing.assert_array_equal(m.tokenize(text)["input_ids"][0], d[f"single{i}_input_ids"])


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_every_layer_matches(name):
    m, d, tr = _trace(name)
    real = d["attention_mask"].astype(bool)
    assert tr["embedding_out"].dtype == np.float32
    assert np.abs(tr["embedding_out"] - d["embedding_out"])[real].max() <= ATOL
    for layer in range(m.config.layers):
        diff = np.abs(tr["layer_out"][layer] - d["layer_out"][layer])[real].max()
        assert diff <= ATOL, f"layer {layer}: max abs diff {diff}"
    assert tr["final_hidden"].dtype == np.float32
    assert np.abs(tr["final_hidden"] - d["final_hidden"])[real].max() <= ATOL


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_routes_identical(name):
    m, d, tr = _trace(name)
    real = d["attention_mask"].astype(bool)
    got, want = tr["routes"][:, real], d["routes"][:, real]          # [L, T, D+1]
    assert got.shape == want.shape and got.shape[-1] == m.config.depth + 1
    flipped = (got != want).any(axis=-1)                               # [L, T]
    if flipped.any():
        # a flip is acceptable only where the reference's logit on the path was within noise of 0
        z = np.abs(d["route_logits"][:, real])
        for layer, tok in zip(*np.nonzero(flipped)):
            first = np.argmax(got[layer, tok] != want[layer, tok]) - 1
            assert first >= 0 and z[layer, tok, first] < FLIP_Z
    # the logits on the path agree too
    same = ~flipped
    assert np.abs(tr["route_logits"][:, real][same] - d["route_logits"][:, real][same]).max() <= ATOL


@pytest.mark.parametrize("name", MLM_FIXTURES)
def test_mlm_logits(name):
    m, d = load_fixture(name), expected(name)
    logits = m.mlm_logits(d["input_ids"], d["attention_mask"])
    assert logits.dtype == np.float32 and logits.shape == (*d["input_ids"].shape, m.config.vocab)
    keys = [k for k in d.files if k.startswith("batch") and k.endswith("_mlm_logits")]
    assert keys
    for k in keys:
        i = int(k[len("batch"):-len("_mlm_logits")])
        ref = d[k]
        got = logits[i, :ref.shape[0]]
        assert np.abs(got - ref).max() <= ATOL * np.abs(ref).max(), k


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_single_texts_match_reference(name):
    """Each text run alone (no padding, no mask), as a user calls encode on one string."""
    m, d = load_fixture(name), expected(name)
    for i, text in enumerate(texts_of(name)):
        got = m.encode(text, pooling="none")
        ref = d[f"single{i}_final_hidden"]
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.abs(got - ref).max() <= ATOL, f"text {i}"


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_batch_and_single_agree(name):
    m = load_fixture(name)
    texts = texts_of(name)
    batched = m.encode(texts, pooling="none", batch_size=len(texts))
    small = m.encode(texts, pooling="none", batch_size=2)
    for i, text in enumerate(texts):
        alone = m.encode(text, pooling="none")
        assert np.abs(batched[i] - alone).max() <= ATOL
        assert np.abs(small[i] - alone).max() <= ATOL
    means = m.encode(texts)
    for i, text in enumerate(texts):
        assert np.abs(means[i] - m.encode(text)).max() <= ATOL


def test_classifier_singles_and_pairs():
    name = "tiny-ufb-cls"
    m, d = load_fixture(name), expected(name)
    texts = texts_of(name)
    # head.weight has 2 rows although arch.num_labels says 3: the head's shape wins
    assert m.config.num_labels == d["single0_class_logits"].shape[0] == 2
    batch = m.classify(texts, batch_size=3)
    assert batch.dtype == np.float32
    for i, text in enumerate(texts):
        ref = d[f"single{i}_class_logits"]
        np.testing.assert_allclose(m.classify(text), ref, atol=ATOL)
        np.testing.assert_allclose(batch[i], ref, atol=ATOL)
    pairs = [k[:-len("_texts")] for k in d.files if k.startswith("pair") and k.endswith("_texts")]
    assert pairs
    items = [tuple(str(t) for t in d[f"{p}_texts"]) for p in pairs]
    together = m.classify(items)
    for p, item, row in zip(pairs, items, together):
        np.testing.assert_array_equal(m.tokenizer([item]).input_ids[0], d[f"{p}_input_ids"])
        np.testing.assert_allclose(m.classify(item), d[f"{p}_class_logits"], atol=ATOL)
        np.testing.assert_allclose(row, d[f"{p}_class_logits"], atol=ATOL)


def test_dense_masked_feedforward_matches_reference():
    """The published code's way (all nodes, masked) gives the same hidden states as the walk."""
    name = "tiny-ufb"
    d = expected(name)
    dense = load_fixture(name, ffn="dense-masked")
    real = d["attention_mask"].astype(bool)
    h = dense.hidden_states(d["input_ids"], d["attention_mask"])
    assert np.abs(h - d["final_hidden"])[real].max() <= ATOL


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_every_layer_matches_with_helpers_at_every_size(name, monkeypatch):
    """The fixtures are far below the sizes from which kernels (attention's included) are shared
    with helper threads: force it, with two threads, and check parity again."""
    from ufcpu import kernels, threads
    for kernel in list(kernels._SHARED):
        monkeypatch.setitem(kernels._SHARED, kernel, 1)
    with threads.calls(2):
        m, d, tr = _trace(name)
    real = d["attention_mask"].astype(bool)
    for layer in range(m.config.layers):
        diff = np.abs(tr["layer_out"][layer] - d["layer_out"][layer])[real].max()
        assert diff <= ATOL, f"layer {layer}: max abs diff {diff}"
    assert np.abs(tr["final_hidden"] - d["final_hidden"])[real].max() <= ATOL
