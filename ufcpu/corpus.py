"""Encode a corpus file into an embeddings file: streamed, in bounded memory, resumable.

    encode_corpus(model, "texts.jsonl", "vectors.npy", field="text")

The readers and writers are in ufcpu.textio; this module holds the loops that join them to a model:

- encode_stream(): windows of texts -> Model.encode_report (which sorts a window by length into
  batches, so a batch pads only to its own longest text) -> a writer, in input order; the
  reports of the windows (truncated, empty, NaN/inf texts) are added up and warned about once at
  the end, numbered from the stream's start. The command line's arguments and stdin use it.
- encode_corpus(): the same for an input file, plus resuming, the output's lock and its record.

Resuming: the writer counts the rows already complete in the output (a partial last row or line
is cut off) and the loop skips that many texts. Windows are aligned to absolute row numbers: a
resumed run re-reads the window it stopped in, encodes that whole window and writes only the
missing rows, so every text is batched with exactly the same neighbours as in an uninterrupted
run and the output is bit-for-bit the same (given the same window, batch size, model and threads).

Every output has a record next to it, `OUTPUT.ufcpu.json`: what made it (a fingerprint of the
model's files, pooling, normalize, field, width, precision). A run holds an exclusive lock on the
record while it writes, so a second run on the same output refuses at once, and `--resume`
refuses an output whose record disagrees with the run that would continue it.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

from . import heads, textio
from .errors import InputError
from .textio import windows
from .tokenizer import Summary

log = logging.getLogger("ufcpu")

DEFAULT_WINDOW = 1024
CORPUS_OUTPUTS = ("npy", "jsonl", "parquet")      # formats an --input run can write (and resume)
RECORD_SUFFIX = ".ufcpu.json"
_SAMPLES = 16                                      # chunks of each model file hashed for its fingerprint
_SAMPLE_BYTES = 1 << 16


# --- checks before anything is written -------------------------------------------------------------

def _suffix(path: Path, names: Iterable[str], what: str) -> str:
    s = path.suffix.lower()
    if s not in names:
        raise InputError(f"{path}: unknown {what} type {s or '(no suffix)'}; expected {', '.join(names)}")
    return s


def output_format(output: str | Path) -> str:
    """The format an --input run's output path selects: "npy", "jsonl" or "parquet"."""
    return textio.SUFFIXES[_suffix(Path(output), ["." + f for f in CORPUS_OUTPUTS], "output")]


def check(input: str | Path, output: str | Path, field: str | None = None, pooling: str = "mean") -> None:
    """Everything that can be checked before loading a model: suffixes, paths, options, pyarrow."""
    input, output = Path(input), Path(output)
    rs = _suffix(input, textio.READERS, "input")
    fmt = output_format(output)
    pooling = heads.pooling_name(pooling)
    if pooling in heads.RAGGED_POOLING and textio.WRITERS[fmt].one_vector_per_text:
        raise InputError(f"{output}: .{fmt} output needs one vector per text: use --pooling mean or first "
                         f"(or write .jsonl)")
    if rs == ".txt" and field is not None:
        raise InputError(f"{input}: --field applies to .jsonl and .parquet input; a .txt file is one text per line")
    if not input.exists():
        raise InputError(f"{input}: no such file")
    if not input.is_file():
        raise InputError(f"{input}: not a file")
    for p in (output, record_path(output)):     # the same file under another name (hard or symbolic link)
        if p.exists() and os.path.samefile(input, p):
            raise InputError(f"{p}: is the input file{'' if p == input else f' {input}'}; choose another output")
    if "parquet" in (rs[1:], fmt):
        textio.pyarrow()


# --- the record of what made an output, and the lock while writing it ------------------------------

def record_path(output: Path) -> Path:
    return output.with_name(output.name + RECORD_SUFFIX)


def model_fingerprint(model) -> str:
    """The engine's files (engine.*, tokenizer.json) by name, size and sampled content: the same
    checkpoint converted again has the same fingerprint; other weights, config or tokenizer do not."""
    h = hashlib.sha256()
    folder = Path(model.path)
    for p in sorted(folder.iterdir()):
        if not (p.is_file() and (p.name.startswith("engine.") or p.name == "tokenizer.json")):
            continue
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            for k in range(_SAMPLES):
                f.seek(size * k // _SAMPLES)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:16]


def made_by(model, pooling: str, normalize: bool, field: str | None) -> dict:
    """What decides an output's rows, as its record stores it."""
    rec = {"model": model_fingerprint(model), "model_source": str(model.source), "width": model.config.hidden,
           "pooling": heads.pooling_name(pooling), "normalize": bool(normalize),
           "field": field or textio.DEFAULT_FIELD}
    precision = getattr(model, "precision", None)
    if precision is not None:
        rec["precision"] = str(precision)
    return rec


_COMPARED = ("model", "width", "precision", "pooling", "normalize", "field")


@contextlib.contextmanager
def _locked_record(output: Path):
    """Open (creating) OUTPUT.ufcpu.json and hold an exclusive lock on it: -> its file descriptor."""
    import fcntl
    path = record_path(output)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise InputError(f"{path}: cannot write the output's record ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{output}: another ufcpu encode is writing it (lock held on {path}); "
                             f"wait for it to finish or choose another output") from None
        yield fd
    finally:
        os.close(fd)


def _read_record(fd: int, path: Path) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 1 << 16):
        data += chunk
    if not data.strip():
        return None
    try:
        rec = json.loads(data)
    except ValueError:
        rec = None
    if not isinstance(rec, dict):
        raise InputError(f"{path}: not a record written by ufcpu encode; cannot resume "
                         f"(remove the output and its record, or drop --resume)")
    return rec


def _write_record(fd: int, rec: dict) -> None:
    data = (json.dumps(rec, indent=1) + "\n").encode()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)


def _check_resumable(output: Path, old: dict | None, new: dict) -> None:
    """A resume must continue an output made by the same model and options."""
    if old is None:
        raise InputError(f"{output}: no record of what wrote it ({record_path(output).name} is missing), so "
                         f"--resume cannot check the model and options; remove the output or drop --resume")
    def show(rec: dict, k: str) -> str:
        return f"{rec.get(k)!r} ({rec.get('model_source')})" if k == "model" else repr(rec.get(k))
    diff = [f"{k} {show(old, k)}, now {show(new, k)}" for k in _COMPARED if old.get(k) != new.get(k)]
    if diff:
        raise InputError(f"{output}: was written with another {'; '.join(diff)}; cannot resume "
                         f"(remove the output or drop --resume)")


def _has_rows(output: Path) -> bool:
    return output.exists() or textio.parts_dir(output).exists()


# --- the loops -------------------------------------------------------------------------------------

def _window_error(e: InputError, where: str | None, first_row: int, n: int) -> InputError:
    """An error of Model.encode_report on a window, numbered as a row of the whole input."""
    if where is None:
        return e.at_offset(first_row)
    if e.item is not None:
        return InputError(f"{where} row {first_row + e.item} (counting from 0): {e.detail}")
    return InputError(f"{where}, rows {first_row}..{first_row + n - 1}: {e}")


def _encode_window(model, chunk: list[str], first_row: int, where: str | None, summary: Summary,
                   pooling: str, normalize: bool, batch_size: int, chunk_tokens: int | None = None,
                   stride: int = 0):
    try:
        vecs, report = model.encode_report(chunk, pooling, normalize, batch_size, chunk_tokens, stride)
    except InputError as e:
        raise _window_error(e, where, first_row, len(chunk)) from None
    summary.add(report, first_row)
    return vecs


def encode_stream(model, chunks: Iterable[list[str]], writer, pooling: str = "mean", normalize: bool = False,
                  batch_size: int = 32, progress: bool = False, where: str | None = None,
                  chunk_tokens: int | None = None, stride: int = 0) -> int:
    """Encode windows of texts into a textio writer, in order; warn once at the end about truncated,
    empty or NaN/inf texts. `where` names the input in errors ("stdin"; None: items of a list);
    chunk_tokens, stride: long texts as windows of tokens (Model.encode). -> rows written. The
    writer is closed (complete only if every window was written)."""
    summary = Summary()
    bar = textio.progress_bar(progress)
    complete = False
    n = 0
    try:
        for chunk in chunks:
            vecs = _encode_window(model, chunk, n, where, summary, pooling, normalize, batch_size,
                                  chunk_tokens, stride)
            writer.write(chunk, vecs)
            bar.update(len(chunk))
            n += len(chunk)
        complete = True
    finally:
        bar.close()
        writer.close(complete)
    summary.warn(model.config.max_seq)
    return n


def _same_text(writer, text: str | None, done: int, input: Path, output: Path) -> None:
    """A resumed run must read the input the output came from: the last row's stored text (where
    the format keeps texts) must equal the input's text at that row."""
    if done and writer.last_text is not None and text != writer.last_text:
        raise InputError(f"{output}: row {done - 1} was encoded from another text than {input} has there; "
                         f"not the same input? (remove the output or drop --resume)")


def _announce(done: int, output: Path) -> None:
    if done:
        log.info("resuming: %s already has %d rows", output, done)


def _too_short(output: Path, done: int, input: Path, have: int) -> InputError:
    return InputError(f"{output} already has {done} rows but {input} has only {have} texts; "
                      f"not the same input? (remove the output or drop --resume)")


def encode_corpus(model, input: str | Path, output: str | Path, field: str | None = None,
                  pooling: str = "mean", normalize: bool = False, batch_size: int = 32,
                  resume: bool = False, progress: bool = False, window: int = DEFAULT_WINDOW) -> int:
    """Encode every text of `input` (.txt, .jsonl, .parquet) into `output` (.npy, .jsonl,
    .parquet), in input order, holding one window of texts in memory. -> the number of rows in
    the output (those a resumed run found already there included)."""
    input, output = Path(input), Path(output)
    check(input, output, field, pooling)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise InputError(f"window must be a positive integer, got {window!r}")
    reader, counter = textio.READERS[input.suffix.lower()]
    texts = reader(input, field)
    rec = made_by(model, pooling, normalize, field)
    with _locked_record(output) as fd:
        if resume and _has_rows(output):
            _check_resumable(output, _read_record(fd, record_path(output)), rec)
        elif output.is_file():
            output.unlink()      # never old rows under a new record, whenever the run is killed
        _write_record(fd, rec)   # before the output exists: no output without its record
        writer = textio.WRITERS[output_format(output)](output, model.config.hidden, resume)
        return _resume_loop(model, iter(texts), writer, input, output, counter, pooling, normalize,
                            batch_size, progress, window)


@contextlib.contextmanager
def claimed_output(model, output: Path, pooling: str, normalize: bool):
    """For a stream written to a file: hold the output's lock (a second run refuses at once) and
    write its record, as encode_corpus does; an old output is replaced."""
    with _locked_record(output) as fd:
        if output.is_file():
            output.unlink()
        _write_record(fd, made_by(model, pooling, normalize, None))
        yield


def _resume_loop(model, it: Iterator[str], writer, input: Path, output: Path, counter: Callable[[Path], int],
                 pooling, normalize, batch_size, progress, window) -> int:
    done = writer.rows
    complete = False
    bar = textio.progress_bar(False)
    summary = Summary()
    try:
        # Skip whole windows already written; the window we stopped in is encoded again whole
        # (so its batches are the same as in an uninterrupted run) and only its missing rows kept.
        start = done - done % window
        skipped, last = 0, None
        for last in itertools.islice(it, start):
            skipped += 1
        if skipped < start:
            raise _too_short(output, done, input, skipped)
        if done == start:
            _same_text(writer, last, done, input, output)
            _announce(done, output)
        bar = textio.progress_bar(progress, lambda: counter(input), done)
        n = start
        for chunk in windows(it, window):
            keep = max(done - n, 0)
            if keep > len(chunk):
                raise _too_short(output, done, input, n + len(chunk))
            if keep:
                _same_text(writer, chunk[keep - 1], done, input, output)
                _announce(done, output)
            vecs = _encode_window(model, chunk, n, str(input), summary, pooling, normalize, batch_size)
            if keep < len(chunk):
                writer.write(chunk[keep:], vecs[keep:])
                bar.update(len(chunk) - keep)
            n += len(chunk)
        if n < done:
            raise _too_short(output, done, input, n)
        complete = True
        summary.warn(model.config.max_seq)
    finally:
        bar.close()
        writer.close(complete)
    return writer.rows
