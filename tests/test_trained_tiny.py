"""Parity on learned weights: tests/data/trained-tiny, a small UltraFastBERT trained with the
reference code (fixtures README, "trained-tiny"), and fill-mask as the Hugging Face pipeline.

The random fixtures pin down the arithmetic; these weights have learned structure, so the MLM
head's argmax and the masked-token accuracy mean something and must come out as the reference's.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import DATA, load_fixture
from ufcpu import model as fwd

NAME = "trained-tiny"
ATOL = 1e-5


@pytest.fixture(scope="module")
def ev():
    return np.load(DATA / NAME / "eval.npz")


@pytest.fixture(scope="module")
def model():
    return load_fixture(NAME)


@pytest.fixture(scope="module")
def logits(model, ev):  # [64, 128, V]: every held-out sequence, attention mask all ones
    return model.mlm_logits(ev["input_ids"])


def test_final_hidden_states(model, ev):
    ref = ev["final_hidden"]                                        # [8, 128, H]
    got = model.hidden_states(ev["input_ids"][:len(ref)])
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref).max() <= ATOL


def test_routes_are_the_trace_of_the_same_pass(model, ev):
    """encoder_trace (what the accuracy report reads routes from) gives the same hidden states."""
    ids = ev["input_ids"][:2]
    tr = fwd.encoder_trace(ids, np.ones_like(ids), model.weights, model.config)
    assert tr["routes"].shape == (model.config.layers, *ids.shape, model.config.depth + 1)
    assert np.abs(tr["final_hidden"] - ev["final_hidden"][:2]).max() <= ATOL


def test_masked_logits(logits, ev):
    ref = ev["masked_logits"]                                       # [n, V]
    got = logits[ev["masked_rows"], ev["masked_cols"]]
    assert got.shape == ref.shape and len(ref) > 0
    assert np.abs(got - ref).max() <= ATOL * np.abs(ref).max()


def test_argmax_everywhere(logits, ev):
    np.testing.assert_array_equal(logits.argmax(axis=-1), ev["ref_argmax"])


def test_masked_accuracy(logits, ev):
    """The same number of masked tokens right (the reference stored its fraction in float32)."""
    masked = ev["labels"] != -100
    n = int(masked.sum())
    right = int((logits.argmax(axis=-1)[masked] == ev["labels"][masked]).sum())
    ref_right = float(ev["masked_accuracy"]) * n
    assert n > 1000 and abs(ref_right - round(ref_right)) < 1e-3
    assert right == round(ref_right)


# --- fill-mask, as the Hugging Face FillMaskPipeline (top_k=5) on this checkpoint ------------------

HF = json.loads((DATA / NAME / "fill_mask_hf.json").read_text())


def _per_mask(result) -> list[list[dict]]:
    """The pipeline returns one list for one mask, a list of lists for several."""
    return [result] if isinstance(result[0], dict) else result


@pytest.mark.parametrize("text", list(HF))
def test_fill_mask_as_the_pipeline(model, text):
    want = HF[text]
    got = model.fill_mask(text, top_k=5)
    assert isinstance(got[0], dict) == isinstance(want[0], dict)     # same nesting
    for g_mask, w_mask in zip(_per_mask(got), _per_mask(want), strict=True):
        assert [p["token"] for p in g_mask] == [p["token"] for p in w_mask]
        assert [p["token_str"] for p in g_mask] == [p["token_str"] for p in w_mask]
        assert [p["sequence"] for p in g_mask] == [p["sequence"] for p in w_mask]
        np.testing.assert_allclose([p["score"] for p in g_mask], [p["score"] for p in w_mask], rtol=0, atol=1e-5)


def test_fill_mask_fixture_covers_several_masks():
    assert sum(not isinstance(v[0], dict) for v in HF.values()) >= 2


def test_fill_mask_bracket_alias(model):
    text = next(t for t, v in HF.items() if isinstance(v[0], dict))
    assert model.fill_mask(text.replace("<mask>", "[MASK]")) == model.fill_mask(text)


def test_fill_mask_special_token_str(model):
    """token_str of a special token is the token itself (the pipeline decodes it unskipped)."""
    tok = model.tokenizer
    assert tok.decode([tok.mask_id], skip_special_tokens=False) == "<mask>"
    preds = model.fill_mask("<mask>", top_k=model.config.vocab)
    by_token = {p["token"]: p for p in preds}
    assert by_token[tok.pad_id]["token_str"] == "<pad>"
    assert by_token[tok.mask_id]["token_str"] == "<mask>"


def test_fill_mask_drops_a_predicted_pad(model):
    """The pipeline removes pad ids before decoding, so a predicted pad leaves no trace; with
    several masks the other mask and the special tokens stay."""
    tok = model.tokenizer
    first, _ = model.fill_mask("<mask> and <mask>", top_k=model.config.vocab)
    pad = next(p for p in first if p["token"] == tok.pad_id)
    assert pad["token_str"] == "<pad>" and pad["sequence"] == "and <mask> <sep>"
    the = next(p for p in first if p["token_str"] == "the")
    assert the["sequence"] == "the and <mask> <sep>"
