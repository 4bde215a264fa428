"""Text the engine cannot trust: empty, whitespace only, only characters the normalizer drops,
NUL bytes, lone surrogates, 1 MB strings, invalid UTF-8 and long streams on stdin, fill-mask
without a mask, and bad sizes. Each case is either an exact output or an InputError (a
ValueError) naming the input; through the CLI, exit code 2 and one line on stderr.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import ufcpu
from ufcpu import InputError

from conftest import DATA, load_fixture
from test_cli import MODEL, assert_one_line_error, run

MB = 1 << 20


@pytest.fixture(scope="module")
def model():
    return load_fixture("tiny-ufb")


def ids_of(model, text: str) -> list[int]:
    return model.tokenize(text)["input_ids"][0].tolist()


def direct_mean(model, ids: list[int]) -> np.ndarray:
    """The mean-pooled embedding computed straight from ids (no tokenizer, no batching)."""
    h = model.hidden_states(np.array([ids]))[0]
    return h.mean(axis=0)


# --- nothing left after normalization --------------------------------------------------------------

NOTHING = ["", " ", "   \t\t  ", "\n", "\u00a0\u3000", "日本語", "☃ ✓ ∞", "\u200b\u200d"]


@pytest.mark.parametrize("text", NOTHING, ids=["empty", "space", "spaces-tabs", "newline", "unicode-spaces",
                                               "cjk", "symbols", "zero-width"])
def test_text_with_no_tokens_is_the_end_token_alone(model, text, caplog):
    """As the reference tokenizer does: `$A <sep>` with nothing in $A is [<sep>]; a warning says so."""
    sep = model.tokenizer.ids["<sep>"]
    assert ids_of(model, text) == [sep]
    with caplog.at_level(logging.WARNING, logger="ufcpu"):
        vec = model.encode(text)
    assert "1 text(s) have no tokens after normalization" in caplog.text
    np.testing.assert_array_equal(vec, direct_mean(model, [sep]))
    assert np.isfinite(vec).all()


def test_empty_texts_in_a_batch_do_not_disturb_the_others(model):
    texts = ["hello world", "", "fast feedforward", "   ", "日本"]
    batch = model.encode(texts)
    assert batch.shape == (5, 128)
    np.testing.assert_allclose(batch[0], model.encode("hello world"), atol=1e-6)
    np.testing.assert_array_equal(batch[1], batch[3])
    np.testing.assert_array_equal(batch[1], batch[4])
    tokens = model.encode(texts, pooling="none")
    assert [t.shape[0] for t in tokens] == [len(ids_of(model, t)) for t in texts]


def test_no_texts(model):
    assert model.encode([]).shape == (0, 128)
    assert model.encode([], pooling="none") == []
    assert list(model.encode_iter([])) == []


# --- odd characters --------------------------------------------------------------------------------

def test_nul_bytes_are_unknown_tokens(model):
    unk, sep = model.tokenizer.ids["<unk>"], model.tokenizer.ids["<sep>"]
    a, b = ids_of(model, "a")[0], ids_of(model, "b")[0]
    assert ids_of(model, "a\x00b") == [a, unk, b, sep]
    assert ids_of(model, "\x00") == [unk, sep]
    np.testing.assert_array_equal(model.encode("a\x00b"), direct_mean(model, [a, unk, b, sep]))


def test_control_characters(model):
    vec = model.encode("tab\there\x1b[31mred\x7f\r")
    assert vec.shape == (128,) and np.isfinite(vec).all()


@pytest.mark.parametrize("fixture,texts,item,char", [
    ("tiny-ufb", ["ok", "bad \udcff"], 1, 4),
    ("tiny-ufb", "\ud800", 0, 0),
    ("tiny-ufb-cls", [("fine", "x\udfffy")], 0, 1),
])
def test_lone_surrogates_are_refused_by_position(fixture, texts, item, char):
    m = load_fixture(fixture)
    fn = m.encode if m.config.task == "mlm" else m.classify
    with pytest.raises(InputError, match=rf"item {item}: text is not valid Unicode \(lone surrogate '\\ud[0-9a-f]+' "
                                         rf"at character {char}; undecodable bytes\?"):
        fn(texts)


@pytest.mark.parametrize("bad,words", [
    (None, "no texts given"),
    (5, "expected a string or a list of strings, got int"),
    ([b"bytes"], "item 0: expected a string or a (text_a, text_b) pair, got bytes"),
    (["ok", None], "item 1: expected a string or a (text_a, text_b) pair, got NoneType"),
    (["ok", 3.5], "item 1: expected a string"),
])
def test_not_text(model, bad, words):
    with pytest.raises(InputError) as info:
        model.encode(bad)
    assert words in str(info.value)


# --- very long text --------------------------------------------------------------------------------

def test_one_megabyte_of_words_is_truncated(model, caplog):
    text = "word " * (MB // 5)
    assert len(text) >= MB - 5
    word, sep = ids_of(model, "word")[0], model.tokenizer.ids["<sep>"]
    t = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="ufcpu"):
        vec = model.encode(text)
    seconds = time.perf_counter() - t
    assert "1 text(s) longer than 128 tokens were truncated" in caplog.text
    assert ids_of(model, text) == [word] * 127 + [sep]            # the final <sep> is kept
    np.testing.assert_array_equal(vec, direct_mean(model, [word] * 127 + [sep]))
    assert seconds < 30, seconds


def test_one_megabyte_word_is_unknown(model):
    unk, sep = model.tokenizer.ids["<unk>"], model.tokenizer.ids["<sep>"]
    assert ids_of(model, "a" * MB) == [unk, sep]        # WordPiece: words over 100 characters are <unk>


def test_one_megabyte_of_non_ascii_is_empty(model):
    assert ids_of(model, "日" * MB) == [model.tokenizer.ids["<sep>"]]


def test_many_texts_stream_in_order(model):
    texts = (f"text {i}" if i % 7 else "" for i in range(3000))
    got = np.stack(list(model.encode_iter(texts, window=256)))
    assert got.shape == (3000, 128)
    np.testing.assert_allclose(got[7], got[0 + 14], atol=0)        # two empty texts
    np.testing.assert_allclose(got[1], model.encode("text 1"), atol=1e-6)


# --- fill-mask and sizes ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "no mask here", "<MASK> is not the token", "[mask] lowercase"])
def test_fill_mask_without_mask(model, text):
    with pytest.raises(InputError, match=r"no mask token in the text: write <mask> \(or \[MASK\]\)"):
        model.fill_mask(text)


def test_fill_mask_not_a_string(model):
    with pytest.raises(InputError, match="fill_mask takes one string"):
        model.fill_mask(["a <mask>"])


@pytest.mark.parametrize("k", [0, -1, True, 2.5, "3", None])
def test_top_k_must_be_positive(model, k):
    with pytest.raises(InputError, match=rf"top_k must be a positive integer, got {k!r}"):
        model.fill_mask("a <mask>", top_k=k)


def test_top_k_larger_than_vocabulary(model):
    preds = model.fill_mask("a <mask>", top_k=10 ** 9)
    assert len(preds) == model.config.vocab


@pytest.mark.parametrize("n", [0, -3, True, 1.5, "8", None])
def test_batch_size_must_be_positive(model, n):
    with pytest.raises(InputError, match=rf"batch_size must be a positive integer, got {n!r}"):
        model.encode(["a", "b"], batch_size=n)


def test_pooling_must_be_known(model):
    with pytest.raises(InputError, match="pooling must be one of mean, first, none; got 'max'"):
        model.encode("a", pooling="max")


@pytest.mark.parametrize("n", [0, -2])
def test_threads_must_be_positive(n):
    with pytest.raises(ValueError, match=f"threads must be at least 1, got {n}"):
        ufcpu.load(DATA / "tiny-ufb", threads=n)


@pytest.mark.parametrize("ids,mask,words", [
    ([[1, 2, 99999]], None, "input_ids must lie in [0, 2048), got 1..99999"),
    ([[-1, 2]], None, "input_ids must lie in [0, 2048), got -1..2"),
    ([[0.5, 1.0]], None, "input_ids must be integers, got float64"),
    ([[]], None, "input_ids must be a non-empty [batch, seq] array"),
    ([[1] * 129], None, "sequence length 129 exceeds the model's 128 positions"),
    ([[1, 2]], [[1, 2]], "attention_mask must hold only 0 and 1"),
    ([[1, 2]], [[1, 1, 1]], "attention_mask shape (1, 3) differs from input_ids shape (1, 2)"),
])
def test_raw_ids_are_checked_before_any_kernel(model, ids, mask, words):
    with pytest.raises(InputError) as info:
        model.hidden_states(np.array(ids), None if mask is None else np.array(mask))
    assert words in str(info.value)


# --- the command line ------------------------------------------------------------------------------

def cli_vectors(out: str) -> np.ndarray:
    return np.array(json.loads(out), np.float32)


def test_cli_empty_argument(model):
    out, err, _ = run("encode", "-m", MODEL, "")
    np.testing.assert_allclose(cli_vectors(out)[0], model.encode(""), atol=1e-6)
    assert "no tokens after normalization" in err


def test_cli_empty_stdin(tmp_path):
    out, _, _ = run("encode", "-m", MODEL, stdin=b"")
    assert json.loads(out) == []
    dst = tmp_path / "e.npy"
    run("encode", "-m", MODEL, "--format", "npy", "-o", str(dst), stdin=b"")
    assert np.load(dst).shape == (0, 128)


def test_cli_blank_and_odd_lines_on_stdin(model):
    lines = [b"", b"   ", b"\t", b"a\x00b", "日本".encode(), b"hello world", b"x\r"]
    out, err, _ = run("encode", "-m", MODEL, stdin=b"\n".join(lines) + b"\n")
    got = cli_vectors(out)
    assert got.shape == (7, 128)
    ref = model.encode(["", "   ", "\t", "a\x00b", "日本", "hello world", "x"])
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert "4 text(s) have no tokens after normalization" in err


def test_cli_invalid_utf8_on_stdin_is_replaced_and_said(model):
    out, err, _ = run("encode", "-m", MODEL, "--format", "jsonl", stdin=b"ok\nbad \xff\xfe bytes\n\xc3\n")
    rows = [json.loads(l) for l in out.splitlines()]
    assert [r["text"] for r in rows] == ["ok", "bad \ufffd\ufffd bytes", "\ufffd"]
    np.testing.assert_allclose(rows[1]["embedding"], model.encode("bad \ufffd\ufffd bytes"), atol=1e-6)
    warnings = [l for l in err.splitlines() if "not valid UTF-8" in l]
    assert warnings == ["ufcpu: stdin is not valid UTF-8: undecodable bytes were replaced by U+FFFD"]


def test_cli_invalid_utf8_argument_is_one_line():
    p = subprocess.run([sys.executable, "-m", "ufcpu.cli", "encode", "-m", MODEL, b"caf\xe9"],
                       capture_output=True, timeout=300)
    assert_one_line_error(p.stderr.decode(), p.returncode, "item 0: text is not valid Unicode",
                          "lone surrogate '\\udce9' at character 3")


def test_cli_one_megabyte_line(model, tmp_path):
    text = "word " * (MB // 5)
    dst = tmp_path / "big.npy"
    _, err, _ = run("encode", "-m", MODEL, "--format", "npy", "-o", str(dst), stdin=text.encode() + b"\nshort\n")
    got = np.load(dst)
    assert got.shape == (2, 128)
    np.testing.assert_allclose(got[0], model.encode(text), atol=1e-6)
    assert "1 text(s) longer than 128 tokens were truncated" in err


@pytest.mark.parametrize("args,words", [
    (["encode", "--batch-size", "-1", "x"], ["--batch-size", "expected a positive integer, got -1"]),
    (["encode", "--batch-size", "0", "x"], ["--batch-size", "expected a positive integer, got 0"]),
    (["encode", "--batch-size", "many", "x"], ["--batch-size", "expected a positive integer, got 'many'"]),
    (["encode", "--threads", "0", "x"], ["--threads", "expected a positive integer, got 0"]),
    (["encode", "--threads", "-4", "x"], ["--threads", "expected a positive integer, got -4"]),
    (["fill-mask", "--top-k", "0", "a <mask>"], ["--top-k", "expected a positive integer, got 0"]),
    (["fill-mask", "--top-k", "-5", "a <mask>"], ["--top-k", "expected a positive integer, got -5"]),
    (["fill-mask", ""], ["no mask token in the text"]),
    (["fill-mask", "nothing to fill"], ["no mask token in the text"]),
    (["classify", "--batch-size", "-2", "x"], ["--batch-size"]),
])
def test_cli_bad_values_are_one_line(args, words):
    _, err, code = run(*args[:1], "-m", MODEL, *args[1:], ok=False)
    assert_one_line_error(err, code, *words)


# --- a million lines on stdin --------------------------------------------------------------------

MILLION = 1_000_000


@pytest.mark.skipif(not os.environ.get("UFCPU_SLOW_TESTS"),
                    reason="a million lines takes minutes: set UFCPU_SLOW_TESTS=1 to run it")
def test_cli_million_lines_streamed_in_bounded_memory(tmp_path):
    """1M short lines through `ufcpu encode --format npy`: every row written, and the peak memory
    the same as for 20k lines (the stream is never read whole)."""
    def encode_stream(n: int) -> tuple[int, float]:
        src = tmp_path / f"lines-{n}.txt"
        with open(src, "w") as f:
            for i in range(n):
                f.write(f"line {i} of the stream\n")
        dst = tmp_path / f"out-{n}.npy"
        code = ("import resource, sys\nfrom ufcpu.cli import main\nrc = main(sys.argv[1:])\n"
                "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
                "sys.exit(rc)\n")
        t = time.perf_counter()
        with open(src, "rb") as stdin:
            p = subprocess.run([sys.executable, "-c", code, "encode", "-m", MODEL, "--format", "npy",
                                "-o", str(dst)], stdin=stdin, capture_output=True, timeout=3600)
        seconds = time.perf_counter() - t
        assert p.returncode == 0, p.stderr.decode()[-2000:]
        arr = np.load(dst, mmap_mode="r")
        assert arr.shape == (n, 128)
        assert np.isfinite(arr[-1]).all()
        rss = int(p.stderr.decode().rsplit("maxrss_kb", 1)[1].split()[0])
        src.unlink()
        dst.unlink()
        print(f"{n} lines: {seconds:.0f} s, peak RSS {rss / 1024:.0f} MB")
        return rss, seconds

    small_rss, _ = encode_stream(20_000)
    big_rss, _ = encode_stream(MILLION)
    # 1M lines of text alone would be ~25 MB as bytes and ~80 MB as Python strings
    assert big_rss < small_rss + 40 * 1024, (small_rss, big_rss)


@pytest.mark.parametrize("n", [2.5, True, "2"])
def test_threads_must_be_a_whole_number(n):
    with pytest.raises(InputError, match="threads must be at least 1"):
        ufcpu.load(DATA / "tiny-ufb", threads=n)
