"""Long documents (ufcpu/chunking.py): overlapping windows, token-weighted mean, bounded pieces."""
from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from conftest import DATA, load_fixture
from ufcpu import chunking
from ufcpu.errors import InputError

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def long_text(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words)) + "."


def by_hand(model, text: str, chunk_tokens: int, stride: int) -> np.ndarray:
    """Tokenize the whole text untruncated, slice windows explicitly, encode each alone."""
    tok = HFTokenizer.from_file(str(model.tokenizer.path))
    tok.no_truncation()
    ids = tok.encode(text, add_special_tokens=False).ids
    sep = tok.token_to_id("<sep>")                     # the single-text template is `A <sep>`
    size, step = chunk_tokens - 1, chunk_tokens - 1 - stride
    starts = [0]
    while starts[-1] + size < len(ids):
        starts.append(starts[-1] + step)
    vecs, weights = [], []
    for s in starts:
        window = np.array(ids[s:s + size] + [sep])
        h = model.hidden_states(window[None])[0]        # [n, H]
        vecs.append(h.mean(axis=0))
        weights.append(len(window))
    assert len(starts) > 1 or len(ids) <= size
    return np.average(np.stack(vecs), axis=0, weights=np.array(weights, float))


@pytest.mark.parametrize("chunk_tokens,stride", [(128, 0), (128, 32), (40, 10), (17, 15)])
def test_matches_windows_encoded_by_hand(chunk_tokens, stride):
    model = load_fixture("tiny-ufb")
    text = long_text(300)
    got = model.encode(text, chunk_tokens=chunk_tokens, stride=stride)
    np.testing.assert_allclose(got, by_hand(model, text, chunk_tokens, stride), atol=1e-5)


def test_batch_of_documents_matches_one_at_a_time():
    model = load_fixture("tiny-ufb")
    docs = [long_text(n, seed=n) for n in (5, 400, 60, 1000)]
    together = model.encode(docs, chunk_tokens=64, stride=16, normalize=True, batch_size=2)
    assert together.shape == (4, model.config.hidden)
    for doc, vec in zip(docs, together):
        np.testing.assert_allclose(vec, model.encode(doc, chunk_tokens=64, stride=16, normalize=True), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1, atol=1e-5)


def test_short_text_is_plain_encode():
    model = load_fixture("tiny-ufb")
    texts = ["a short sentence.", "another one, also short"]
    np.testing.assert_allclose(model.encode(texts, chunk_tokens=128), model.encode(texts), atol=1e-5)
    np.testing.assert_allclose(model.encode(texts, chunk_tokens=128, pooling="first"),
                               model.encode(texts, pooling="first"), atol=1e-5)


def test_long_text_uses_all_of_it():
    model = load_fixture("tiny-ufb")
    head = long_text(200, seed=1)
    a = model.encode(head + " " + long_text(200, seed=2), chunk_tokens=128)
    b = model.encode(head + " " + long_text(200, seed=3), chunk_tokens=128)
    assert not np.allclose(a, b, atol=1e-4)            # differ only past the first 128 tokens
    np.testing.assert_array_equal(model.encode(head + " x"), model.encode(head + " y"))


def test_pieces_give_the_whole_texts_ids():
    model = load_fixture("tiny-ufb")
    tok = chunking.PieceTokenizer(model.tokenizer.path)
    whole = HFTokenizer.from_file(str(model.tokenizer.path))
    whole.no_truncation()
    text = long_text(2000) + "  tabs\tand\nnewlines ``quoted'' caf\u00e9 na\u00efve"
    pieces = list(tok.content_ids(text, piece_chars=200))
    assert len(pieces) > 10
    assert all(len(p) <= 200 for p in chunking.split_pieces(text, 200))
    assert "".join(chunking.split_pieces(text, 200)) == text
    np.testing.assert_array_equal(np.concatenate(pieces), whole.encode(text, add_special_tokens=False).ids)
    np.testing.assert_array_equal(tok.wrap(np.array([7, 8], np.int64)), [7, 8, whole.token_to_id("<sep>")])


def test_windows_cover_every_id_with_the_stride():
    ids = np.arange(23)
    got = list(chunking.windows([ids[:5], ids[5:]], size=8, stride=3))
    assert [w.tolist() for w in got] == [list(range(0, 8)), list(range(5, 13)), list(range(10, 18)),
                                         list(range(15, 23))]
    assert [w.tolist() for w in chunking.windows([ids[:8]], 8, 3)] == [list(range(8))]
    assert [w.tolist() for w in chunking.windows([], 8, 3)] == [[]]


def test_no_piece_without_whitespace_is_longer_than_the_limit():
    assert list(chunking.split_pieces("x" * 25, 10)) == ["x" * 10, "x" * 10, "x" * 5]


@pytest.mark.parametrize("kw,match", [
    (dict(chunk_tokens=1), "chunk_tokens must be an integer in 2..128"),
    (dict(chunk_tokens=129), "chunk_tokens must be"),
    (dict(chunk_tokens=True), "chunk_tokens must be"),
    (dict(chunk_tokens=64, stride=63), "stride must be an integer in 0..62"),
    (dict(chunk_tokens=64, stride=-1), "stride must be"),
    (dict(chunk_tokens=64, pooling="none"), "pooling must be one of mean, first"),
])
def test_bad_arguments_are_one_line_errors(kw, match):
    model = load_fixture("tiny-ufb")
    with pytest.raises(InputError, match=match):
        model.encode("some text", **kw)


def test_pairs_and_non_strings_are_refused():
    model = load_fixture("tiny-ufb")
    with pytest.raises(InputError, match="item 1: with chunk_tokens each item must be a string"):
        model.encode(["a", ("b", "c")], chunk_tokens=64)


def test_cli_chunk_flags(tmp_path):
    import json
    import subprocess
    import sys
    text = long_text(300)
    proc = subprocess.run([sys.executable, "-m", "ufcpu", "encode", "--model", str(DATA / "tiny-ufb"),
                           "--chunk-tokens", "64", "--stride", "16", text], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = np.array(json.loads(proc.stdout))
    model = load_fixture("tiny-ufb")
    np.testing.assert_allclose(got[0], model.encode(text, chunk_tokens=64, stride=16), atol=1e-5)
    assert "truncated" not in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "ufcpu", "encode", "--model", str(DATA / "tiny-ufb"),
                          "--stride", "16", "x"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--stride needs --chunk-tokens" in bad.stderr
