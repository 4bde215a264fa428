"""Packed batches: right-padded sequences run on their real tokens only (model.py, "Packed
batches"), with the same results as the padded computation."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import expected, load_fixture
from ufcpu import model as fwd

ATOL = 1e-5


@pytest.mark.parametrize("mask, lengths", [
    ([[1, 1, 1], [1, 1, 0], [1, 0, 0]], [3, 2, 1]),
    ([[1, 1]], [2]),
    ([[1, 1, 0, 0], [1, 1, 1, 1]], [2, 4]),
])
def test_right_padding_packs(mask, lengths):
    assert fwd.packed_lengths(np.array(mask)).tolist() == lengths


@pytest.mark.parametrize("mask", [
    [[0, 1, 1]],                 # left padding
    [[1, 0, 1]],                 # a hole
    [[1, 1], [0, 0]],            # a sequence with no token
    np.zeros((0, 4), int),       # no sequence
])
def test_other_masks_run_padded(mask):
    assert fwd.packed_lengths(np.array(mask)) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=20))
def test_spans_cover_the_tokens_in_order(lengths):
    seqs = fwd.spans(np.array(lengths))
    assert seqs.dtype == np.int64 and seqs[:, 1].tolist() == lengths
    assert seqs[:, 0].tolist() == [sum(lengths[:i]) for i in range(len(lengths))]
    padded = fwd.spans(np.full(len(lengths), 7), stride=7)
    assert padded[:, 0].tolist() == [7 * i for i in range(len(lengths))] and (padded[:, 1] == 7).all()


def padded(monkeypatch, fn, *args):
    """fn(*args) with packing switched off: every batch runs padded, as before packing existed."""
    with monkeypatch.context() as m:
        m.setattr(fwd, "packed_lengths", lambda mask: None)
        return fn(*args)


@pytest.mark.parametrize("name", ["tiny-ufb", "mini-ufb"])
def test_packed_equals_padded_on_real_tokens(monkeypatch, name):
    m = load_fixture(name)
    d = expected(name)
    ids, mask = d["input_ids"], d["attention_mask"]
    assert fwd.packed_lengths(mask) is not None and (mask == 0).any()   # a padded fixture batch
    packed = fwd.encoder(ids, mask, m.weights, m.config)
    full = padded(monkeypatch, fwd.encoder, ids, mask, m.weights, m.config)
    real = mask.astype(bool)
    assert np.abs(packed - full)[real].max() <= ATOL
    assert not packed[~real].any()          # padded positions hold zeros


def test_left_padding_gives_the_same_hidden_states(monkeypatch):
    """A mask the tokenizer never makes still runs (padded) and agrees with the right-padded batch."""
    m = load_fixture("tiny-ufb")
    d = expected("tiny-ufb")
    ids, mask = d["input_ids"], d["attention_mask"]
    right = m.hidden_states(ids, mask)
    lengths = mask.sum(axis=1)
    s = ids.shape[1]
    left_ids = np.zeros_like(ids)
    left_mask = np.zeros_like(mask)
    for b, n in enumerate(lengths):
        left_ids[b, s - n:] = ids[b, :n]
        left_mask[b, s - n:] = 1
    assert fwd.packed_lengths(left_mask) is None
    left = m.hidden_states(left_ids, left_mask)
    # positions differ (the embedding counts from the first column), so compare full-length rows only
    full_rows = lengths == s
    assert full_rows.any()
    assert np.abs(left[full_rows] - right[full_rows]).max() <= ATOL
