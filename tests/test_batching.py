"""Length-sorted batching under a padded-token budget."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import load_fixture
from ufcpu.tokenizer import token_budget_batches


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 128), min_size=0, max_size=300), st.integers(1, 4096))
def test_batches_cover_everything_within_budget(lengths, budget):
    lengths = np.sort(np.array(lengths, dtype=np.int64))
    slices = list(token_budget_batches(lengths, budget))
    covered = [i for s in slices for i in range(s.start, s.stop)]
    assert covered == list(range(len(lengths)))
    for s in slices:
        n, longest = s.stop - s.start, lengths[s.stop - 1]
        assert n >= 1
        assert n == 1 or n * longest <= budget


def test_short_texts_share_a_batch_and_keep_input_order():
    m = load_fixture("tiny-ufb")
    texts = ["a much longer text with many more words in it than the others"] + [f"w{i}" for i in range(40)]
    # 40 short texts of ~3 tokens fit the 2 x 128 budget of batch_size=2 together
    got = m.encode(texts, batch_size=2)
    one_by_one = np.stack([m.encode(t) for t in texts])
    np.testing.assert_allclose(got, one_by_one, atol=1e-5)
    ids, _ = m.tokenizer.encode_ids(texts)
    lengths = np.sort([len(x) for x in ids])
    assert len(list(token_budget_batches(lengths, 2 * m.config.max_seq))) < len(texts) / 2
