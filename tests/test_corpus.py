"""Corpus encoding (`ufcpu encode --input FILE -o FILE`, ufcpu/corpus.py): readers, writers,
resume, one-line errors, and a 100k-line file encoded in bounded memory by the real command."""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, load_fixture

from ufcpu import corpus, textio
from ufcpu.errors import InputError

MODEL = str(DATA / "tiny-ufb")
H = 128
# The CLI runs with one thread: the 2-core machine also runs pytest (and, on a developer's
# machine, other work); Numba's and OpenBLAS's pools degrade badly when oversubscribed.
ONE_THREAD = ("--threads", "1")

WORDS = ("the quick brown fox jumps over a lazy dog while fast feedforward networks walk "
         "their trees one token at a time and the encoder never waits").split()


@pytest.fixture(autouse=True)
def _converted():
    """Convert the fixture into the session's cache first, so no subprocess logs a conversion."""
    load_fixture("tiny-ufb")


def corpus_lines(n: int, blob: int = 0, seed: int = 0):
    """n texts of 3-20 words; with blob > 0 each also ends in an id of `blob` hex characters,
    which makes the line long in bytes but only a few tokens (a word over 100 characters is one
    <unk>): long lines for the memory test at the encoding cost of short ones."""
    rng = random.Random(seed)
    for i in range(n):
        text = f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))
        if blob:
            text += " id:" + "".join("%016x" % rng.getrandbits(64) for _ in range(blob // 16))
        yield text


def write_txt(path: Path, lines) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    return path


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


class Run:
    def __init__(self, code: int, out: str, err: str, peak_rss_mb: float, seconds: float, cpu_seconds: float):
        self.code, self.out, self.err = code, out, err
        self.peak_rss_mb, self.seconds, self.cpu_seconds = peak_rss_mb, seconds, cpu_seconds


def cli(*args, ok: bool = True, env: dict | None = None, timeout: float = 600) -> Run:
    """The real command in a subprocess -> exit code, stdout, stderr, and the peak RSS of that
    process alone: os.wait4 returns the rusage of the one child it reaps (RUSAGE_CHILDREN would
    report the largest of every child this pytest process ever waited for)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "ufcpu.cli", *args], stdin=subprocess.DEVNULL,
                             stdout=out, stderr=err, env=env)
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)
        finally:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        run = Run(p.returncode, out.read().decode(), err.read().decode(), usage.ru_maxrss / 1024, seconds,
                  usage.ru_utime + usage.ru_stime)
    if ok:
        assert run.code == 0, run.err
    return run


def assert_one_line_error(run: Run, *words: str) -> None:
    assert run.code == 2, run.err
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1, run.err
    assert "Traceback" not in run.err
    for w in words:
        assert w in lines[0], lines[0]


def npy_rows(path: Path) -> int:
    """Complete rows on disk (the header says 0 until the writer rewrites it)."""
    return (path.stat().st_size - 128) // (4 * H)


# --- the 100k-line file: bounded memory, row for row equal to Model.encode ------------------------

N_BIG = 100_000
BLOB = 320                 # hex characters per line: lines of ~400 bytes, ~20 tokens
BASELINE_LINES = 2048      # two full windows
MARGIN_MB = 24


def test_100k_lines_bounded_memory_matches_encode(tmp_path):
    src = tmp_path / "big.txt"
    base = tmp_path / "base.txt"
    text_bytes = 0          # what a list of every line would hold: sys.getsizeof of each str
    with open(src, "w") as f, open(base, "w") as b:
        for i, line in enumerate(corpus_lines(N_BIG, BLOB)):
            f.write(line + "\n")
            if i < BASELINE_LINES:
                b.write(line + "\n")
            text_bytes += sys.getsizeof(line)
    # The bound. The baseline is the same command on the file's first 2,048 lines: it holds the
    # model, the compiled kernels and one full window (1,024 texts, their tokens, batches and
    # vectors), which is all a streaming run ever holds. Over 100k lines a streaming run may add
    # only allocator noise (measured: 2-10 MB); MARGIN_MB leaves room for that.
    # An implementation that reads everything cannot stay under it: the list of 100k texts alone
    # is `text_bytes` (~44 MB: 100k x (49 B of str header + ~400 B)), and keeping every vector
    # instead of streaming them out is 100k x 128 x 4 B = 51 MB more.
    all_vectors_mb = N_BIG * H * 4 / 2**20
    assert text_bytes / 2**20 > 1.5 * MARGIN_MB and all_vectors_mb > 1.5 * MARGIN_MB

    baseline = cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(base), "-o", str(tmp_path / "base.npy"))
    dst = tmp_path / "big.npy"
    run = cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(dst))
    bound = baseline.peak_rss_mb + MARGIN_MB
    print(f"\n100k lines ({src.stat().st_size / 2**20:.0f} MB): {run.seconds:.1f} s ({run.cpu_seconds:.1f} s CPU), "
          f"{N_BIG / run.seconds:.0f} texts/s; peak RSS {run.peak_rss_mb:.0f} MB "
          f"(baseline {baseline.peak_rss_mb:.0f} MB, bound {bound:.0f} MB; "
          f"reading everything would add >= {text_bytes / 2**20:.0f} MB)")
    assert run.peak_rss_mb < bound, (run.peak_rss_mb, bound)
    assert "wrote 100000 rows" in run.err

    arr = np.load(dst, mmap_mode="r")
    assert arr.dtype == np.float32 and arr.shape == (N_BIG, H)
    rng = np.random.default_rng(0)
    sample = sorted({0, N_BIG - 1, *rng.choice(N_BIG, 200, replace=False).tolist()})
    wanted = set(sample)
    texts = [t for i, t in enumerate(corpus_lines(N_BIG, BLOB)) if i in wanted]
    ref = load_fixture("tiny-ufb").encode(texts)
    np.testing.assert_allclose(arr[sample], ref, atol=1e-5)


# --- resume ---------------------------------------------------------------------------------------

def _kill_when(p: subprocess.Popen, ready, timeout: float = 300) -> None:
    t = time.monotonic()
    while not ready():
        assert p.poll() is None, "the run finished before it could be interrupted"
        assert time.monotonic() - t < timeout, "the run made no progress"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ufcpu.cli", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_resume_npy_after_kill_equals_uninterrupted(tmp_path):
    src = write_txt(tmp_path / "in.txt", corpus_lines(4096))
    full = tmp_path / "full.npy"
    cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(full))

    killed = tmp_path / "killed.npy"
    p = _start("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(killed))
    _kill_when(p, lambda: killed.exists() and npy_rows(killed) >= 1024)
    rows = npy_rows(killed)
    assert 1024 <= rows < 4096
    assert np.load(killed).shape[0] <= rows       # a valid .npy of the rows flushed so far

    # The same interruption cut mid-row inside a window: the partial row is dropped, the window
    # it fell in is encoded again whole, and only its missing rows are appended.
    cut = tmp_path / "cut.npy"
    cut.write_bytes(killed.read_bytes()[:128 + (rows - 300) * 4 * H + 77])
    corpus.record_path(cut).write_bytes(corpus.record_path(killed).read_bytes())   # what made it

    for partial in (killed, cut):
        run = cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(partial), "--resume")
        assert "resuming" in run.err
        assert partial.read_bytes() == full.read_bytes()       # bit for bit, header included


def test_resume_jsonl_cut_mid_line_equals_uninterrupted(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ({"id": i, "body": t} for i, t in enumerate(corpus_lines(3000))))
    full = tmp_path / "full.jsonl"
    cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "--field", "body", "-o", str(full))
    lines = full.read_bytes().split(b"\n")
    assert len(lines) == 3001 and lines[-1] == b""
    part = tmp_path / "part.jsonl"
    part.write_bytes(b"\n".join(lines[:1500]) + b"\n" + lines[1500][:50])
    corpus.record_path(part).write_bytes(corpus.record_path(full).read_bytes())   # what made it
    cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "--field", "body", "-o", str(part), "--resume")
    assert part.read_bytes() == full.read_bytes()


def test_resume_parquet_after_kill_equals_uninterrupted(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    src = write_txt(tmp_path / "in.txt", corpus_lines(4500))
    full = tmp_path / "full.parquet"
    cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(full))
    assert not textio.parts_dir(full).exists()
    ref = pq.read_table(full)
    assert ref.column_names == ["text", "embedding"] and ref.num_rows == 4500

    out = tmp_path / "out.parquet"
    p = _start("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(out))
    _kill_when(p, lambda: (textio.parts_dir(out) / "part-000000.parquet").exists())
    assert not out.exists()
    run = cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(out), "--resume")
    assert "already has 4096 rows" in run.err
    assert pq.read_table(out).equals(ref)
    assert not textio.parts_dir(out).exists()

    # Resuming a finished output appends nothing and leaves the same table.
    cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(src), "-o", str(out), "--resume")
    assert pq.read_table(out).equals(ref)


def test_resume_refuses_another_input(tmp_path):
    a = write_txt(tmp_path / "a.txt", corpus_lines(50, seed=1))
    b = write_txt(tmp_path / "b.txt", corpus_lines(60, seed=2))
    out = tmp_path / "out.jsonl"
    cli("encode", "-m", MODEL, *ONE_THREAD, "--input", str(a), "-o", str(out))
    assert_one_line_error(cli("encode", "-m", MODEL, "--input", str(b), "-o", str(out), "--resume", ok=False),
                          "row 49", "not the same input")
    short = write_txt(tmp_path / "short.txt", corpus_lines(10, seed=1))
    assert_one_line_error(cli("encode", "-m", MODEL, "--input", str(short), "-o", str(out), "--resume", ok=False),
                          "already has 50 rows", "only 10 texts")


# --- errors: one line, exit code 2 ----------------------------------------------------------------

def _error_cases(tmp: Path):
    txt = write_txt(tmp / "in.txt", ["one", "two"])
    (tmp / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    write_jsonl(tmp / "nofield.jsonl", [{"text": "a"}, {"body": "b"}])
    write_jsonl(tmp / "number.jsonl", [{"text": "a"}, {"text": 3}])
    (tmp / "array.jsonl").write_text('["not", "an object"]\n')
    (tmp / "in.csv").write_text("text\na\n")
    return [
        (["--input", str(txt), "x"], ["not both"]),
        (["--input", str(txt)], ["--input needs -o"]),
        (["--input", str(txt), "-o", str(tmp / "o.csv")], ["o.csv", "unknown output type .csv"]),
        (["--input", str(tmp / "in.csv"), "-o", str(tmp / "o.npy")], ["in.csv", "unknown input type .csv", ".txt, .jsonl, .parquet"]),
        (["--input", str(tmp / "missing.txt"), "-o", str(tmp / "o.npy")], ["missing.txt", "no such file"]),
        (["--input", str(tmp / "bad.jsonl"), "-o", str(tmp / "o.npy")], ["bad.jsonl line 3", "bad JSON"]),
        (["--input", str(tmp / "nofield.jsonl"), "-o", str(tmp / "o.npy")], ["line 2", "no 'text' field", "--field"]),
        (["--input", str(tmp / "nofield.jsonl"), "--field", "body", "-o", str(tmp / "o.npy")], ["line 1", "no 'body' field"]),
        (["--input", str(tmp / "number.jsonl"), "-o", str(tmp / "o.npy")], ["line 2", "'text' is a number, not a string"]),
        (["--input", str(tmp / "array.jsonl"), "-o", str(tmp / "o.npy")], ["line 1", "JSON object", "an array"]),
        (["--input", str(txt), "--field", "body", "-o", str(tmp / "o.npy")], ["--field", ".txt"]),
        (["--input", str(txt), "-o", str(tmp / "o.npy"), "--pooling", "none"], ["one vector per text"]),
        (["--input", str(txt), "-o", str(tmp / "o.npy"), "--format", "jsonl"], ["--format jsonl", "suffix"]),
        (["--input", str(txt), "-o", str(tmp / "no" / "dir" / "o.npy")], ["o.npy"]),
        (["--resume", "x"], ["--input"]),
        (["--field", "body", "x"], ["--input"]),
    ]


def test_errors_are_one_line(tmp_path):
    for args, words in _error_cases(tmp_path):
        run = cli("encode", "-m", MODEL, *args, ok=False)
        assert_one_line_error(run, *words)


def test_parquet_errors_are_one_line(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["a", "b"], "n": [1, 2]}), tmp_path / "in.parquet")
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "nulls.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    cases = [
        (["--input", str(tmp_path / "in.parquet"), "-o", str(tmp_path / "o.npy")], ["no column 'text'", "'body'", "--field"]),
        (["--input", str(tmp_path / "in.parquet"), "--field", "n", "-o", str(tmp_path / "o.npy")], ["column 'n' holds int64, not strings"]),
        (["--input", str(tmp_path / "nulls.parquet"), "-o", str(tmp_path / "o.npy")], ["null at row 1"]),
        (["--input", str(tmp_path / "junk.parquet"), "-o", str(tmp_path / "o.npy")], ["junk.parquet", "not a readable parquet file"]),
    ]
    for args, words in cases:
        assert_one_line_error(cli("encode", "-m", MODEL, *args, ok=False), *words)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path):
    stub = tmp_path / "stub" / "pyarrow"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named pyarrow (test stub)')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(stub.parent), os.environ.get("PYTHONPATH")])))
    (tmp_path / "in.parquet").write_bytes(b"")
    txt = write_txt(tmp_path / "in.txt", ["a"])
    for args in (["--input", str(tmp_path / "in.parquet"), "-o", str(tmp_path / "o.npy")],
                 ["--input", str(txt), "-o", str(tmp_path / "o.parquet")]):
        run = cli("encode", "-m", MODEL, *args, ok=False, env=env)
        assert_one_line_error(run, "pyarrow", 'pip install "ufcpu[parquet]"')


# --- the library: readers, writers and the loop, in process ---------------------------------------

def test_txt_reader_lines(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"\xef\xbb\xbffirst\r\n\nthird \xff bytes\nlast")
    assert list(textio.read_txt(p, None)) == ["first", "", "third \ufffd bytes", "last"]
    assert textio.count_txt(p) == 4
    p.write_bytes(b"a\nb\n")
    assert list(textio.read_txt(p, None)) == ["a", "b"] and textio.count_txt(p) == 2


def test_jsonl_reader_skips_blank_lines_and_names_the_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "a", "x": 1}\n\n  \n{"text": "b"}\n{"text": null}\n')
    it = textio.read_jsonl(p, None)
    assert [next(it), next(it)] == ["a", "b"]
    with pytest.raises(InputError, match=r"line 5: field 'text' is null, not a string"):
        next(it)
    assert textio.count_jsonl(p) == 3


def test_parquet_reader_batches_and_dictionary_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"text {i}" for i in range(2500)]
    pq.write_table(pa.table({"t": pa.array(texts).dictionary_encode()}), tmp_path / "d.parquet", row_group_size=1000)
    assert list(textio.read_parquet(tmp_path / "d.parquet", "t")) == texts
    assert textio.count_parquet(tmp_path / "d.parquet") == 2500


@pytest.mark.parametrize("out_suffix", [".npy", ".jsonl", ".parquet"])
@pytest.mark.parametrize("in_suffix", [".txt", ".jsonl", ".parquet"])
def test_every_format_matches_encode(tmp_path, in_suffix, out_suffix, monkeypatch):
    if ".parquet" in (in_suffix, out_suffix):
        pytest.importorskip("pyarrow")
    model = load_fixture("tiny-ufb")
    texts = list(corpus_lines(23, seed=3)) + ["", "x " * 300]       # an empty text, a truncated one
    src = tmp_path / f"in{in_suffix}"
    if in_suffix == ".txt":
        write_txt(src, texts)
    elif in_suffix == ".jsonl":
        write_jsonl(src, ({"text": t} for t in texts))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": texts}), src, row_group_size=10)
    dst = tmp_path / f"out{out_suffix}"
    monkeypatch.setattr(textio, "PARQUET_PART_ROWS", 3)     # several parts per window, merged at the end
    n = corpus.encode_corpus(model, src, dst, normalize=True, batch_size=3, window=7)
    assert n == len(texts)
    ref = model.encode(texts, normalize=True)
    if out_suffix == ".npy":
        got, stored = np.load(dst), texts
    elif out_suffix == ".jsonl":
        rows = [json.loads(line) for line in dst.read_text().splitlines()]
        got, stored = np.array([r["embedding"] for r in rows], np.float32), [r["text"] for r in rows]
    else:
        import pyarrow.parquet as pq
        table = pq.read_table(dst)
        got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        stored = table.column("text").to_pylist()
        assert not textio.parts_dir(dst).exists()
    assert stored == texts
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_pooling_none_to_jsonl(tmp_path):
    model = load_fixture("tiny-ufb")
    src = write_txt(tmp_path / "in.txt", ["one two three", "four"])
    dst = tmp_path / "out.jsonl"
    corpus.encode_corpus(model, src, dst, pooling="none")
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    for row, ref in zip(rows, model.encode(["one two three", "four"], pooling="none")):
        np.testing.assert_allclose(np.array(row["embedding"]), ref, atol=1e-5)


def test_window_warnings_are_summed_once(tmp_path, caplog):
    model = load_fixture("tiny-ufb")
    texts = ["a", "", "b", "c", "d", "", "e", "f", "x " * 300, ""]
    src = write_txt(tmp_path / "in.txt", texts)
    with caplog.at_level(logging.WARNING, logger="ufcpu"):
        corpus.encode_corpus(model, src, tmp_path / "out.npy", window=3)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 2, msgs           # one line per kind, not one per window
    assert any(m.startswith("3 text(s)") and "#1" in m for m in msgs), msgs
    assert any(m.startswith("1 text(s)") and "truncated" in m and "#8" in m for m in msgs), msgs


def test_progress_bar_counts_texts(tmp_path, capsys):
    pytest.importorskip("tqdm")
    model = load_fixture("tiny-ufb")
    src = write_txt(tmp_path / "in.txt", corpus_lines(30))
    corpus.encode_corpus(model, src, tmp_path / "out.npy", progress=True, window=8)
    err = capsys.readouterr().err
    assert "30/30" in err and "text/s" in err


def test_output_must_differ_from_input(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n')
    with pytest.raises(InputError, match="is the input file"):
        corpus.check(src, src)
