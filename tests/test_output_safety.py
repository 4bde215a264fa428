"""Output safety of `ufcpu encode` (issue 14): nothing lost or mixed, nothing silent, nothing that
lies about its format; and the library's input types. Every command-line case asserts the exit
code, the one line on stderr, and that no data was lost or mixed."""
from __future__ import annotations

import fcntl
import functools
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import DATA, load_fixture
from test_corpus import ONE_THREAD, assert_one_line_error, cli, corpus_lines, write_jsonl, write_txt

from ufcpu import InputError, corpus, heads
from ufcpu.errors import InputTypeError

MODEL = str(DATA / "tiny-ufb")
H = 128


@pytest.fixture(scope="module")
def model():
    return load_fixture("tiny-ufb")


def popen(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ufcpu.cli", *args], **kw)


# --- the output is the input under another name ---------------------------------------------------

@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_output_linked_to_the_input_is_refused_and_the_input_kept(tmp_path, link):
    src = write_jsonl(tmp_path / "docs.jsonl", ({"text": t} for t in corpus_lines(20)))
    before = src.read_bytes()
    out = tmp_path / "out.jsonl"
    (os.link if link == "hard" else os.symlink)(src, out)
    run = cli("encode", "-m", MODEL, "--input", str(src), "-o", str(out), ok=False)
    assert_one_line_error(run, "out.jsonl", "is the input file", "choose another output")
    assert src.read_bytes() == before


# --- two runs on one output ------------------------------------------------------------------------

def test_a_second_run_on_a_locked_output_refuses_and_touches_nothing(tmp_path):
    src = write_txt(tmp_path / "in.txt", corpus_lines(30))
    out = tmp_path / "out.npy"
    cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(out))
    before = out.read_bytes()
    other = write_txt(tmp_path / "other.txt", corpus_lines(40, seed=9))
    # The lock a running `ufcpu encode` holds on OUTPUT.ufcpu.json, held here instead.
    with open(corpus.record_path(out), "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        for extra in ((), ("--resume",)):
            run = cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(other), "-o", str(out), *extra, ok=False)
            assert_one_line_error(run, "out.npy", "another ufcpu encode is writing it")
    assert out.read_bytes() == before


@pytest.mark.parametrize("fmt", ["npy", "jsonl"])
def test_a_stream_to_a_locked_output_refuses_and_touches_nothing(tmp_path, fmt):
    """Texts from arguments or stdin with -o take the same lock (and leave the same record)."""
    out = tmp_path / f"out.{fmt}"
    cli("encode", "-m", MODEL, *ONE_THREAD, "-o", str(out), "one", "two")
    assert json.loads(corpus.record_path(out).read_text())["pooling"] == "mean"
    before = out.read_bytes()
    with open(corpus.record_path(out), "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        run = cli("encode", "-m", MODEL, *ONE_THREAD, "-o", str(out), "three", ok=False)
        assert_one_line_error(run, f"out.{fmt}", "another ufcpu encode is writing it")
    assert out.read_bytes() == before


def test_two_processes_on_one_output_one_refuses(tmp_path):
    src = write_txt(tmp_path / "in.txt", corpus_lines(6000))
    out = tmp_path / "out.jsonl"
    first = popen("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(out),
                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (out.exists() and out.stat().st_size > 0):    # the first holds the lock from before its first row
        assert first.poll() is None, first.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    second = cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(write_txt(tmp_path / "b.txt", ["x"] * 10)),
                 "-o", str(out), ok=False)
    assert_one_line_error(second, "another ufcpu encode is writing it")
    assert first.wait(timeout=600) == 0, first.stderr.read().decode()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == list(corpus_lines(6000))      # all of the first run, nothing of the second


# --- --resume checks what made the output ---------------------------------------------------------

@pytest.mark.parametrize("change,words", [
    (("--pooling", "first"), ["pooling 'mean', now 'first'"]),
    (("--normalize",), ["normalize False, now True"]),
    (("-m", str(DATA / "mini-ufb")), ["model", "tiny-ufb), now", "mini-ufb)", "width 128, now 96"]),
])
def test_resume_refuses_another_model_or_options(tmp_path, change, words):
    load_fixture("mini-ufb")          # converted here, so the run logs no conversion
    src = write_jsonl(tmp_path / "in.jsonl", ({"text": t} for t in corpus_lines(40)))
    out = tmp_path / "out.jsonl"
    cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(out))
    lines = out.read_bytes().split(b"\n")
    out.write_bytes(b"\n".join(lines[:20]) + b"\n")           # an interrupted run
    before = out.read_bytes()
    args = ["encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(out), "--resume"]
    if change[0] == "-m":
        args[1:3] = []
    run = cli(*args, *change, ok=False)
    assert_one_line_error(run, "out.jsonl", "was written with another", "cannot resume", *words)
    assert out.read_bytes() == before


def test_resume_refuses_another_field_and_an_output_without_record(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ({"text": t, "body": t.upper()} for t in corpus_lines(30)))
    out = tmp_path / "out.jsonl"
    cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(out))
    before = out.read_bytes()
    run = cli("encode", "-m", MODEL, "--input", str(src), "--field", "body", "-o", str(out), "--resume", ok=False)
    assert_one_line_error(run, "field 'text', now 'body'")
    corpus.record_path(out).unlink()
    run = cli("encode", "-m", MODEL, "--input", str(src), "-o", str(out), "--resume", ok=False)
    assert_one_line_error(run, "no record of what wrote it", "out.jsonl.ufcpu.json")
    assert out.read_bytes() == before


def test_resume_with_the_same_model_and_options_continues(tmp_path):
    src = write_txt(tmp_path / "in.txt", corpus_lines(50))
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(full), "--normalize")
    cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(part), "--normalize")
    part.write_bytes(b"\n".join(part.read_bytes().split(b"\n")[:10]) + b"\n")
    cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(part), "--normalize", "--resume")
    assert part.read_bytes() == full.read_bytes()
    rec = json.loads(corpus.record_path(part).read_text())
    assert rec["pooling"] == "mean" and rec["normalize"] is True and rec["width"] == H


def test_model_fingerprint_follows_the_weights(tmp_path, model):
    copy = tmp_path / "engine"
    shutil.copytree(model.path, copy)

    class Same:
        path = copy
    assert corpus.model_fingerprint(Same) == corpus.model_fingerprint(model)   # same files elsewhere
    other = load_fixture("mini-ufb")
    assert corpus.model_fingerprint(other) != corpus.model_fingerprint(model)


# --- signals: the .npy stays valid ----------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGHUP])
def test_a_signal_during_the_first_window_leaves_a_valid_npy(tmp_path, sig):
    src = write_txt(tmp_path / "in.txt", corpus_lines(3000))
    out = tmp_path / "out.npy"
    p = popen("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(out),
              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not out.exists():                       # the file appears before the first window is encoded
        assert p.poll() is None, p.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    p.send_signal(sig)
    code = p.wait(timeout=300)
    err = p.stderr.read().decode()
    assert code in (-sig, 128 + sig), (code, err)
    if sig != signal.SIGKILL:
        assert code == 128 + sig
        assert err.strip().splitlines()[-1] == f"ufcpu: interrupted ({sig.name})", err
        assert "Traceback" not in err
    arr = np.load(out)                            # a valid .npy whatever the moment
    assert arr.dtype == np.float32 and arr.shape[1] == H and arr.shape[0] <= 3000
    run = cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(out), "--resume")
    assert "wrote 3000 rows" in run.err
    full = tmp_path / "full.npy"
    cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(full))
    assert out.read_bytes() == full.read_bytes()


# --- output that lies ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    """tiny-ufb with a final LayerNorm weight of 1e38: every output overflows to inf, pooled to NaN/inf."""
    from safetensors.numpy import load_file, save_file
    d = tmp_path_factory.mktemp("overflow") / "ckpt"
    shutil.copytree(DATA / "tiny-ufb", d)
    w = load_file(d / "model.safetensors")
    w["encoder.final_norm.weight"] = np.full_like(w["encoder.final_norm.weight"], 1e38)
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_nan_output_is_never_silent(overflowing, fmt):
    p = subprocess.run([sys.executable, "-m", "ufcpu.cli", "encode", "-m", str(overflowing), "--format", fmt,
                        "a", "b c", "d"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stderr.splitlines() if "NaN" in line]
    assert lines == ["ufcpu: 3 text(s) gave NaN or infinite values: the model's outputs overflow (first: #0); "
                     "JSON cannot hold them (written as NaN/Infinity)"], p.stderr


def test_nan_rows_of_a_corpus_are_counted_once(overflowing, tmp_path, caplog):
    import logging
    import ufcpu
    m = ufcpu.load(overflowing)
    src = write_txt(tmp_path / "in.txt", corpus_lines(10))
    with caplog.at_level(logging.WARNING, logger="ufcpu"):
        corpus.encode_corpus(m, src, tmp_path / "out.npy", window=3)
    msgs = [r.getMessage() for r in caplog.records if "NaN" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].startswith("10 text(s) gave NaN") and "(first: #0)" in msgs[0]
    _, report = m.encode_report(["a", "b"])
    assert report.nonfinite == [0, 1]


def test_output_suffix_sets_the_format(tmp_path, model):
    texts = ["a b", "c"]
    npy, jsonl = tmp_path / "x.npy", tmp_path / "x.jsonl"
    cli("encode", "-m", MODEL, "-o", str(npy), *texts)
    np.testing.assert_allclose(np.load(npy), model.encode(texts), atol=1e-6)
    cli("encode", "-m", MODEL, "-o", str(jsonl), *texts)
    assert [json.loads(line)["text"] for line in jsonl.read_text().splitlines()] == texts
    npy.write_bytes(b"keep")
    run = cli("encode", "-m", MODEL, "--format", "json", "-o", str(npy), *texts, ok=False)
    assert_one_line_error(run, "--format json disagrees with -o", "x.npy")
    assert npy.read_bytes() == b"keep"


def test_closed_pipe_exits_quietly():
    p = popen("encode", "-m", MODEL, "--format", "jsonl", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
              stderr=subprocess.PIPE)
    lines = "".join(f"{t}\n" for t in corpus_lines(3000)).encode()
    import threading
    feeder = threading.Thread(target=lambda: (p.stdin.write(lines), p.stdin.close()), daemon=True)
    feeder.start()
    first = p.stdout.readline()
    assert json.loads(first)["text"] == next(corpus_lines(1))
    p.stdout.close()                              # as `| head -1` does
    code = p.wait(timeout=300)
    err = p.stderr.read().decode()
    assert code == 0, err
    assert "Broken pipe" not in err and "Traceback" not in err and "error" not in err, err


def test_stdin_warnings_once_at_the_end_numbered_from_the_start():
    texts = ["a", "", "b"] * 3 + ["x " * 300] + ["c"] * 5 + ["y " * 300]
    p = subprocess.run([sys.executable, "-m", "ufcpu.cli", "encode", "-m", MODEL, "--window", "3"],
                       input="\n".join(texts).encode() + b"\n", capture_output=True, timeout=300)
    assert p.returncode == 0
    assert len(json.loads(p.stdout)) == len(texts)
    warnings = p.stderr.decode().splitlines()
    assert [w for w in warnings if "truncated" in w] == ["ufcpu: 2 text(s) longer than 128 tokens were truncated (first: #9)"]
    assert [w for w in warnings if "no tokens" in w and w.startswith("ufcpu: 3 text(s)") and "first: #1)" in w]
    assert len(warnings) == 2, warnings


def _read_line(stream, timeout: float = 300) -> bytes:
    """One line of a pipe, failing (rather than hanging) if none comes within `timeout`."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "no output for a line of input"
    return stream.readline()


def test_interactive_stdin_gets_a_vector_per_line(model):
    p = popen("encode", "-m", MODEL, "--format", "jsonl", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
              stderr=subprocess.PIPE)
    try:
        for text in ("first line", "second one", "third"):
            p.stdin.write(text.encode() + b"\n")
            p.stdin.flush()                       # and keep stdin open: the program waits for the answer
            row = json.loads(_read_line(p.stdout))
            assert row["text"] == text
            np.testing.assert_allclose(row["embedding"], model.encode(text), atol=1e-5)
        p.stdin.close()
        assert p.wait(timeout=300) == 0
    finally:
        p.kill()


def test_pair_errors_count_from_zero():
    load_fixture("tiny-ufb-cls")      # converted here, so the run logs no conversion
    p = subprocess.run([sys.executable, "-m", "ufcpu.cli", "classify", "-m", str(DATA / "tiny-ufb-cls"), "--pair",
                        "a\tb", "no tab"], capture_output=True, text=True, timeout=300)
    assert_one_line_error_text(p, "--pair: text 1 (counting from 0) has 0 tabs")


def assert_one_line_error_text(p, *words):
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in lines[0], lines[0]


# --- errors carry their item; windows renumber it -----------------------------------------------

def test_input_errors_carry_their_item(model):
    with pytest.raises(InputError) as info:
        model.encode(["ok", "fine", "bad \ud800"])
    assert info.value.item == 2 and str(info.value).startswith("item 2: text is not valid Unicode")
    with pytest.raises(InputError) as info:
        list(model.encode_iter(["ok"] * 5 + ["bad \udfff"], window=2))
    assert info.value.item == 5 and str(info.value).startswith("item 5: text is not valid Unicode")


def test_corpus_errors_name_the_row_of_the_file(tmp_path, model):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a"] * 7) + '{"text": "bad \\ud800"}\n')
    with pytest.raises(InputError, match=r"in.jsonl row 7 \(counting from 0\): text is not valid Unicode"):
        corpus.encode_corpus(model, src, tmp_path / "out.npy", window=3)


def test_encode_report_is_data(model):
    vecs, report = model.encode_report(["a", "", "x " * 300, "b", "   "])
    assert vecs.shape == (5, H)
    assert report.truncated == [2] and report.empty == [1, 4] and report.nonfinite == []


# --- one pooling table ----------------------------------------------------------------------------

def test_pooling_aliases_and_the_one_table(model, tmp_path):
    texts = ["one two", "three"]
    np.testing.assert_array_equal(model.encode(texts, pooling="avg"), model.encode(texts, pooling="mean"))
    np.testing.assert_array_equal(model.encode(texts, pooling="zero_index"), model.encode(texts, pooling="first"))
    assert heads.pooling_name("avg") == "mean" and heads.pooling_name("zero_index") == "first"
    for name in ("max", "lse", "bogus", None):
        with pytest.raises(InputError, match="pooling must be one of mean, first, none"):
            heads.pooling_name(name)
    assert heads.pooling_name("lse", tuple(heads.POOLING)) == "lse"
    with pytest.raises(InputError, match="pooling must be one of mean, first, none; got 'max'"):
        corpus.check(write_txt(tmp_path / "in.txt", ["a"]), tmp_path / "out.npy", None, "max")
    from ufcpu.cli import build_parser
    encode = build_parser()._subparsers._group_actions[0].choices["encode"]
    assert next(a for a in encode._actions if a.dest == "pooling").choices == heads.ENCODE_POOLING


def test_classifier_poolers_come_from_the_table():
    m = load_fixture("tiny-ufb-cls")
    h = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = heads.POOLING[heads.pooling_name(m.config.pooler, tuple(heads.POOLING))](h, mask)
    np.testing.assert_allclose(pooled, np.stack([h[0, :3].mean(0), h[1].mean(0)]), rtol=1e-6)
    np.testing.assert_allclose(heads.POOLING["max"](h, mask), np.stack([h[0, :3].max(0), h[1].max(0)]))
    lse = np.log(np.exp(h[0, :3].astype(np.float64)).sum(0))
    np.testing.assert_allclose(heads.POOLING["lse"](h, mask)[0], lse, rtol=1e-5)


# --- library input types --------------------------------------------------------------------------

@pytest.mark.parametrize("call,words", [
    (lambda m: m.encode(b"abc"), "expected a string or a list of strings, got bytes"),
    (lambda m: m.encode(bytearray(b"abc")), "got bytearray"),
    (lambda m: m.encode({"a": 1}), "got dict"),
    (lambda m: m.encode({"a", "b"}), "got set"),
    (lambda m: m.encode(5), "got int"),
    (lambda m: m.encode_iter("abc"), "encode_iter takes an iterable of strings, got str"),
    (lambda m: m.encode_iter(b"abc"), "got bytes"),
    (lambda m: m.encode_iter({"a": 1}), "got dict"),
    (lambda m: m.encode("a", normalize="no"), "normalize must be True or False, got 'no'"),
    (lambda m: m.encode("a", normalize=1), "normalize must be True or False, got 1"),
    (lambda m: m.encode_iter(["a"], normalize="yes"), "normalize must be True or False"),
    (lambda m: m.classify({"a": 1}), "got dict"),
])
def test_wrong_types_are_type_errors(model, call, words):
    m = load_fixture("tiny-ufb-cls") if "classify" in call.__code__.co_names else model
    with pytest.raises(InputTypeError) as info:
        call(m)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    assert words in str(info.value)


@pytest.mark.parametrize("window", [0, -1, True, 2.5, "8", None])
def test_encode_iter_window_must_be_positive(model, window):
    with pytest.raises(InputError, match=rf"window must be a positive integer, got {window!r}"):
        model.encode_iter(["a"], window=window)


def test_numpy_flags_and_string_arrays_are_accepted(model):
    texts = np.array(["one", "two"])
    np.testing.assert_array_equal(model.encode(list(texts), normalize=np.bool_(True)),
                                  model.encode(["one", "two"], normalize=True))


# --- long texts are cut before they are tokenized -------------------------------------------------

@functools.lru_cache(maxsize=None)
def _whole_text_tokenizer(path: str, max_len: int):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(path)
    tok.enable_truncation(max_len)
    return tok


def _reference_ids(model, text):
    """The ids of the whole text tokenized, then truncated (what the tokenizer did before the cut)."""
    return _whole_text_tokenizer(str(model.path / "tokenizer.json"), model.config.max_seq).encode(text).ids


def _texts_around_the_cut(seed: int):
    """Texts whose 128th token falls near a prefix length the cut tries (8192 and 65536 characters),
    made of words wordpiece splits, one-token words, words over 100 characters (one <unk>), accents,
    combining marks, the normalizer's `` and '' and punctuation runs."""
    rng = random.Random(seed)
    pieces = ["word", "a", "``", "''", "é", "e\u0301", "日本", "!!", "-", "hello,", "Über", "can't", "x" * 99, "y" * 101]
    for L in (62, 63, 64, 65, 505, 510, 511, 512, 515):       # (L + 1) x 128 is about 8192 or 65536
        for lead in (0, 1, 5, 31, 63, 64, 65):
            yield "q" * lead + " " + " ".join(["z" * L] * 140)
    for L in (30, 31, 32, 33):                                # two tokens per word: the cut falls mid-word
        for lead in (0, 3, 17):
            yield "q" * lead + " " + " ".join(["ab" * (L // 2)] * 400)
    for _ in range(60):
        target = rng.choice((8192, 65536)) + rng.randint(-300, 300)
        out, n = [], 0
        while n < target + 400:
            p = rng.choice(pieces) + rng.choice([" ", "", " ", "\t"])
            out.append(p)
            n += len(p)
        yield "".join(out)[:target + rng.randint(0, 400)]


def test_cut_texts_give_the_ids_of_the_whole_text(model):
    n = 0
    for text in _texts_around_the_cut(0):
        assert model.tokenize(text)["input_ids"][0].tolist() == _reference_ids(model, text), text[:80]
        n += 1
    assert n > 100


def test_cut_pairs_give_the_ids_of_the_whole_pair():
    m = load_fixture("tiny-ufb-cls")
    tok = _whole_text_tokenizer(str(m.path / "tokenizer.json"), m.config.max_seq)
    texts = list(_texts_around_the_cut(1))[:40]
    for a, b in zip(texts, ["short b", "", texts[5]] * 14):
        for pair in ((a, b), (b, a)):
            ids, _ = m.tokenizer.encode_ids([pair])
            assert ids[0].tolist() == tok.encode(*pair).ids


def test_twenty_megabyte_line_is_cut_before_tokenizing():
    """Tokenizing 20 MB of words whole took a minute and 3 GB; the cut keeps the peak memory of
    the process within 64 MB of its baseline (the 20 MB string, its UTF-8 copy and the model)."""
    code = ("import resource, ufcpu\n"
            f"m = ufcpu.load({MODEL!r})\n"
            "m.encode('warm up')\n"
            "text = 'word ' * (4 << 20)\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "v = m.encode(text)\n"
            "print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    base, peak = map(int, p.stdout.split())
    assert peak - base < 64 * 1024, (base, peak)
    assert "1 text(s) longer than 128 tokens were truncated" in p.stderr


# --- a new user: offline, and info without a model -------------------------------------------------

def _no_hub_env(tmp_path, offline: str) -> dict:
    return {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
            "HF_HUB_OFFLINE": offline, "HF_ENDPOINT": "http://127.0.0.1:9"}     # nothing listens there


@pytest.mark.parametrize("offline", ["1", "0"])
def test_default_model_unreachable_says_what_to_do(tmp_path, offline):
    p = subprocess.run([sys.executable, "-m", "ufcpu.cli", "encode", "x"], capture_output=True, text=True,
                       env=_no_hub_env(tmp_path, offline), timeout=300)
    assert_one_line_error_text(p, "pbelcak/UltraFastBERT-1x11-long", "local folder",
                               "python -m weights_convert.random_checkpoint DIR")
    assert "HF_HUB_OFFLINE=0" not in p.stderr and "Set HF_HUB_OFFLINE=1" not in p.stderr
    if offline == "1":
        assert "unset HF_HUB_OFFLINE" in p.stderr


def test_info_without_a_model(tmp_path):
    p = subprocess.run([sys.executable, "-m", "ufcpu.cli", "info"], capture_output=True, text=True,
                       env=_no_hub_env(tmp_path, "1"), timeout=300)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert "config" not in info and "none loaded" in info["model"]
    assert info["versions"]["numpy"] == np.__version__ and info["threads"]["cores"] >= 1
    assert isinstance(info["cpu"]["features"], list) and info["cache_dir"]
    p = subprocess.run([sys.executable, "-m", "ufcpu.cli", "info", "-m", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=300)
    assert_one_line_error_text(p, "missing")
    info = json.loads(p.stdout)
    assert "cannot be loaded" in info["model"] and info["versions"]["python"]


def test_cpu_features_from_cpuinfo(tmp_path):
    from ufcpu.cli import cpu_info
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse4_2 avx2 avx512f amx_int8 other\n")
    assert cpu_info(str(f)) == {"model": "Some CPU", "features": ["sse4_2", "avx2", "avx512f", "amx_int8"]}
    assert cpu_info(str(tmp_path / "none")) == {"model": None, "features": []}
