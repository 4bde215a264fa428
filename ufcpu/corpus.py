"""Encode a corpus file into an embeddings file: streamed, in bounded memory, resumable.

    encode_corpus(model, "texts.jsonl", "vectors.npy", field="text")

Three small tables and one loop:

- READERS: input suffix -> an iterator of texts (.txt: one text per line; .jsonl: one JSON object
  per line, the text in `field`; .parquet: the string column `field`, read in record batches).
- WRITERS: output suffix -> a writer that appends rows and knows how many rows a previous run
  left complete (.npy: float32 [n, H] through NpyRowWriter; .jsonl: {"text", "embedding"} per
  line; .parquet: columns text and embedding, written as part files and merged at the end).
- encode_corpus(): reads `window` texts at a time, encodes them with Model.encode (which sorts
  them by length into batches, so a batch pads only to its own longest text) and appends the
  vectors in input order. Memory holds one window, whatever the size of the input.

Resuming: the writer counts the rows already complete in the output (a partial last row or line
is cut off) and the loop skips that many texts. Windows are aligned to absolute row numbers: a
resumed run re-reads the window it stopped in, encodes that whole window and writes only the
missing rows, so every text is batched with exactly the same neighbours as in an uninterrupted
run and the output is bit-for-bit the same (given the same window, batch size, model and threads).

Parquet files cannot be appended to, so a .parquet output is written as part files of
PARQUET_PART_ROWS rows in `<output>.parts/` (each part is written to a temporary name and renamed,
so a part on disk is always complete) and merged into `<output>` row group by row group at the end;
`--resume` continues from the complete parts.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import InputError

log = logging.getLogger("ufcpu")

DEFAULT_FIELD = "text"
DEFAULT_WINDOW = 1024
PARQUET_PART_ROWS = 4096       # rows per part file (and per row group of the merged file)
_PARQUET_BATCH = 1024          # rows per record batch read from a parquet input
_SCAN_CHUNK = 1 << 20


# --- optional dependency -------------------------------------------------------------------------

def _pyarrow():
    """-> (pyarrow, pyarrow.parquet), or a one-line error saying how to install them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError('.parquet files need pyarrow: pip install "ufcpu[parquet]"') from None
    return pa, pq


def _json_type(v) -> str:
    return {dict: "an object", list: "an array", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


# --- readers: path -> iterator of texts ----------------------------------------------------------
# Each reader checks what it can up front (before any output is written) and returns an iterator;
# problems found while reading (bad JSON on line N, a non-string value) raise InputError then.

def read_txt(path: Path, field: str | None) -> Iterator[str]:
    if field is not None:
        raise InputError(f"{path}: --field applies to .jsonl and .parquet input; a .txt file is one text per line")
    return _txt_lines(path)


def _txt_lines(path: Path) -> Iterator[str]:
    """One text per line (a final newline does not make an extra empty text); undecodable bytes
    are replaced, with one warning, as for stdin."""
    warned = False
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = raw.rstrip(b"\r\n")
            if n == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                text = line.decode("utf-8", errors="replace")
                if not warned:
                    log.warning("%s line %d is not valid UTF-8: undecodable bytes were replaced by U+FFFD", path, n)
                    warned = True
            yield text


def count_txt(path: Path) -> int:
    n = 0
    last = b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(_SCAN_CHUNK):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def read_jsonl(path: Path, field: str | None) -> Iterator[str]:
    return _jsonl_texts(path, field or DEFAULT_FIELD)


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    """One JSON object per line, the text in `field`. Blank lines are skipped (they hold no record)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError:
                raise InputError(f"{path} line {n}: not valid UTF-8") from None
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {n}: bad JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path} line {n}: expected a JSON object with a {field!r} field, got {_json_type(obj)}")
            if field not in obj:
                have = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
                raise InputError(f"{path} line {n}: no {field!r} field (fields: {have}; choose one with --field)")
            text = obj[field]
            if not isinstance(text, str):
                raise InputError(f"{path} line {n}: field {field!r} is {_json_type(text)}, not a string")
            yield text


def count_jsonl(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip())


def read_parquet(path: Path, field: str | None) -> Iterator[str]:
    pa, pq = _pyarrow()
    field = field or DEFAULT_FIELD
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        have = ", ".join(repr(k) for k in schema.names[:8]) or "none"
        raise InputError(f"{path}: no column {field!r} (columns: {have}; choose one with --field)")
    t = schema.field(field).type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)
            or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))):
        raise InputError(f"{path}: column {field!r} holds {t}, not strings")
    return _parquet_texts(pf, path, field)


def _parquet_texts(pf, path: Path, field: str) -> Iterator[str]:
    """The column in record batches: memory holds one batch (and one row group's column chunk)."""
    row = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=[field]):
        col = batch.column(0)
        if col.null_count:
            first = next(i for i, v in enumerate(col.is_valid().to_pylist()) if not v)
            raise InputError(f"{path}: column {field!r} is null at row {row + first} (counting from 0), not a string")
        yield from col.to_pylist()
        row += len(col)


def count_parquet(path: Path) -> int:
    return _pyarrow()[1].ParquetFile(path).metadata.num_rows


# suffix -> (reader, counter for the progress bar's total)
READERS: dict[str, tuple[Callable[[Path, str | None], Iterator[str]], Callable[[Path], int]]] = {
    ".txt": (read_txt, count_txt),
    ".jsonl": (read_jsonl, count_jsonl),
    ".parquet": (read_parquet, count_parquet),
}


# --- writers: rows out, and the rows a previous run left complete ---------------------------------
# A writer is built with (path, width, resume). After construction `rows` is the number of rows
# already complete (0 unless resuming) and `last_text` the text of the last of them where the
# format stores texts (used to check that a resumed run reads the same input). write(texts,
# vectors) appends rows; close(complete) finishes the file (complete=False after an error or an
# interrupt: what was written stays resumable).

class NpyOut:
    """float32 [n, H], streamed row by row; the header is rewritten after every window, so the
    file is a valid .npy (np.load(..., mmap_mode="r")) of the rows written so far at all times."""
    one_vector_per_text = True

    def __init__(self, path: Path, width: int, resume: bool):
        from .npy_stream import NpyRowWriter
        self._w = NpyRowWriter(path, width, resume=resume)
        self.rows = self._w.rows
        self.last_text = None

    def write(self, texts: list[str], vecs) -> None:
        self._w.write(np.asarray(vecs, np.float32))
        self._w.flush()
        self.rows = self._w.rows

    def close(self, complete: bool) -> None:
        self._w.close()


class JsonlOut:
    """One {"text", "embedding"} object per line (as `ufcpu encode --format jsonl`)."""
    one_vector_per_text = False     # pooling none: the embedding is a list of token vectors

    def __init__(self, path: Path, width: int, resume: bool):
        self.rows = 0
        self.last_text = None
        if resume and path.exists():
            self._f = open(path, "r+b")
            self.rows, end, last_start = _complete_lines(self._f)
            self._f.truncate(end)        # a partial last line (an interrupted write) is cut off
            if self.rows:
                self._f.seek(last_start)
                self.last_text = _stored_text(self._f.read(end - last_start), path, self.rows)
            self._f.seek(end)
        else:
            self._f = open(path, "wb")

    def write(self, texts: list[str], vecs) -> None:
        self._f.write("".join(json.dumps({"text": t, "embedding": np.asarray(v).tolist()}) + "\n"
                              for t, v in zip(texts, vecs)).encode("utf-8"))
        self._f.flush()
        self.rows += len(texts)

    def close(self, complete: bool) -> None:
        self._f.close()


def _complete_lines(f) -> tuple[int, int, int]:
    """-> (complete lines, offset just past the last newline, offset where the last complete line starts)."""
    count, last, prev, pos = 0, -1, -1, 0
    f.seek(0)
    while chunk := f.read(_SCAN_CHUNK):
        c = chunk.count(b"\n")
        if c:
            j = chunk.rfind(b"\n")
            prev = pos + chunk.rfind(b"\n", 0, j) if c >= 2 else last
            last = pos + j
            count += c
        pos += len(chunk)
    return count, last + 1, prev + 1


def _stored_text(line: bytes, path: Path, rows: int) -> str:
    try:
        obj = json.loads(line)
        return obj["text"]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{path}: line {rows} is not a row written by ufcpu encode; cannot resume "
                         f"(remove the file or drop --resume)") from None


class ParquetOut:
    """Columns text (string) and embedding (fixed_size_list<float32>[H]). Written as complete part
    files in `<path>.parts/` (temporary name, then rename) and merged into `path` at the end."""
    one_vector_per_text = True

    def __init__(self, path: Path, width: int, resume: bool):
        self.pa, self.pq = _pyarrow()
        pa = self.pa
        self.path = path
        self.parts = parts_dir(path)
        self.schema = pa.schema([("text", pa.string()), ("embedding", pa.list_(pa.float32(), width))])
        self.width = width
        self._texts: list[str] = []
        self._vecs: list[np.ndarray] = []
        self.rows = 0
        self.last_text = None
        if not resume:
            _remove_parts(self.parts)
            path.unlink(missing_ok=True)
            self.parts.mkdir()
            self._n_parts = 0
            return
        if not self.parts.is_dir():
            if path.exists():    # a finished output: it becomes the first part, and we append after it
                self._check_schema(path)
                self.parts.mkdir()
                os.replace(path, self._part(0))
            else:
                self.parts.mkdir()
        for tmp in self.parts.glob(".part-*.tmp"):
            tmp.unlink()         # a part being written when the run stopped
        names = _part_files(self.parts)
        for p in names:
            self._check_schema(p)
            self.rows += self.pq.ParquetFile(p).metadata.num_rows
        self._n_parts = len(names)
        if names and self.rows:
            last = self.pq.ParquetFile(names[-1])
            self.last_text = last.read_row_group(last.num_row_groups - 1, columns=["text"]).column(0)[-1].as_py()

    def _part(self, i: int) -> Path:
        return self.parts / f"part-{i:06d}.parquet"

    def _check_schema(self, p: Path) -> None:
        try:
            ok = self.pq.ParquetFile(p).schema_arrow.equals(self.schema)
        except (self.pa.ArrowException, OSError) as e:
            raise InputError(f"{p}: not a readable parquet file ({str(e).splitlines()[0]}); cannot resume") from None
        if not ok:
            raise InputError(f"{p}: not written by ufcpu encode with this model (columns text, "
                             f"embedding[{self.width}]); cannot resume")

    def write(self, texts: list[str], vecs) -> None:
        self._texts.extend(texts)
        self._vecs.append(np.asarray(vecs, np.float32).reshape(-1, self.width))
        while len(self._texts) >= PARQUET_PART_ROWS:
            self._flush(PARQUET_PART_ROWS)

    def _flush(self, n: int | None = None) -> None:
        """Write the first n buffered rows (all if None) as one complete part file."""
        vecs = np.concatenate(self._vecs) if self._vecs else np.zeros((0, self.width), np.float32)
        n = len(self._texts) if n is None else n
        if n == 0:
            return
        table = self._table(self._texts[:n], vecs[:n])
        part = self._part(self._n_parts)
        tmp = part.with_name("." + part.stem + ".tmp")
        self.pq.write_table(table, tmp, row_group_size=max(n, 1))
        os.replace(tmp, part)
        self._n_parts += 1
        self.rows += n
        self._texts = self._texts[n:]
        self._vecs = [vecs[n:]] if len(vecs) > n else []

    def _table(self, texts: list[str], vecs: np.ndarray):
        pa = self.pa
        emb = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(vecs).reshape(-1)), self.width)
        return pa.Table.from_arrays([pa.array(texts, pa.string()), emb], schema=self.schema)

    def close(self, complete: bool) -> None:
        self._flush()
        if not complete:
            return
        tmp = self.path.with_name("." + self.path.name + ".tmp")
        with self.pq.ParquetWriter(tmp, self.schema) as w:
            names = _part_files(self.parts)
            if not names:
                w.write_table(self._table([], np.zeros((0, self.width), np.float32)))
            for p in names:            # row group by row group: memory holds one part's group
                pf = self.pq.ParquetFile(p)
                for g in range(pf.num_row_groups):
                    w.write_table(pf.read_row_group(g))
        os.replace(tmp, self.path)
        _remove_parts(self.parts)


def parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def _part_files(parts: Path) -> list[Path]:
    return sorted(p for p in parts.glob("part-*.parquet") if re.fullmatch(r"part-\d+\.parquet", p.name))


def _remove_parts(parts: Path) -> None:
    """Delete a parts folder this module wrote, and nothing else."""
    if not parts.exists():
        return
    ours = re.compile(r"part-\d+\.parquet|\.part-\d+\.tmp")
    others = [p.name for p in parts.iterdir() if not ours.fullmatch(p.name)]
    if others:
        raise InputError(f"{parts}: holds files ufcpu did not write ({others[0]}); not touching it")
    for p in parts.iterdir():
        p.unlink()
    parts.rmdir()


WRITERS: dict[str, type] = {".npy": NpyOut, ".jsonl": JsonlOut, ".parquet": ParquetOut}


# --- the loop ------------------------------------------------------------------------------------

def _suffix(path: Path, table: dict, what: str) -> str:
    s = path.suffix.lower()
    if s not in table:
        known = ", ".join(table)
        raise InputError(f"{path}: unknown {what} type {s or '(no suffix)'}; expected {known}")
    return s


def output_format(output: str | Path) -> str:
    """The format an output path selects: "npy", "jsonl" or "parquet"."""
    return _suffix(Path(output), WRITERS, "output")[1:]


def check(input: str | Path, output: str | Path, field: str | None = None, pooling: str = "mean") -> None:
    """Everything that can be checked before loading a model: suffixes, paths, options, pyarrow."""
    input, output = Path(input), Path(output)
    rs = _suffix(input, READERS, "input")
    ws = _suffix(output, WRITERS, "output")
    if pooling not in ("mean", "first", "none"):
        raise InputError(f"pooling must be one of mean, first, none; got {pooling!r}")
    if pooling == "none" and WRITERS[ws].one_vector_per_text:
        raise InputError(f"{output}: {ws} output needs one vector per text: use --pooling mean or first "
                         f"(or write .jsonl)")
    if rs == ".txt" and field is not None:
        raise InputError(f"{input}: --field applies to .jsonl and .parquet input; a .txt file is one text per line")
    if not input.exists():
        raise InputError(f"{input}: no such file")
    if not input.is_file():
        raise InputError(f"{input}: not a file")
    if output.exists() and input.resolve() == output.resolve():
        raise InputError(f"{output}: is the input file; choose another output")
    if ".parquet" in (rs, ws):
        _pyarrow()


def _windows(texts: Iterator[str], window: int) -> Iterator[list[str]]:
    while chunk := list(itertools.islice(texts, window)):
        yield chunk


_SPEC = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa]")


class _WarningSummary(logging.Filter):
    """Model.encode warns once per call, so once per window, about texts it truncated or found
    empty ("%d text(s) ... (first: #%d)"); over a corpus that is a flood. This holds them back and
    adds them up, for one line per kind at the end, its "#N" then a row of the whole input."""

    def __init__(self):
        super().__init__()
        self.offset = 0          # row of the window's first text
        self.seen: dict[str, list] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        msg, args = record.msg, record.args
        if not (record.levelno == logging.WARNING and isinstance(msg, str) and msg.startswith("%d text(s)")
                and "#%d" in msg and isinstance(args, tuple)):
            return True
        specs = [m.start() for m in _SPEC.finditer(msg)]
        at = msg.index("#%d") + 1
        if len(specs) != len(args) or at not in specs:
            return True
        k = specs.index(at)
        entry = self.seen.setdefault(msg, [0, None, args, k])
        entry[0] += int(args[0])
        if entry[1] is None:
            entry[1] = self.offset + int(args[k])
        return False

    def emit_summary(self) -> None:
        for msg, (count, first, args, k) in self.seen.items():
            args = list(args)
            args[0], args[k] = count, first
            log.warning(msg, *args)


@contextlib.contextmanager
def _summarized_warnings():
    summary = _WarningSummary()
    log.addFilter(summary)
    try:
        yield summary
    finally:
        log.removeFilter(summary)


def _encode_window(model, chunk: list[str], first_row: int, input: Path, pooling, normalize, batch_size):
    """Model.encode on one window; an error naming "item k" is made to name the input's row."""
    try:
        return model.encode(chunk, pooling, normalize, batch_size)
    except InputError as e:
        msg = str(e)
        m = re.match(r"item (\d+): ", msg)
        if m:
            raise InputError(f"{input} row {first_row + int(m.group(1))} (counting from 0): {msg[m.end():]}") from None
        raise InputError(f"{input}, rows {first_row}..{first_row + len(chunk) - 1}: {msg}") from None


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: bool, total: Callable[[], int], initial: int):
    """tqdm on stderr with texts/s, only when asked (the CLI asks when stderr is a terminal)."""
    if not progress:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:     # tqdm comes with huggingface_hub; without it, no bar
        return _NoBar()
    return tqdm(total=total(), initial=initial, unit="text", file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def _same_text(writer, text: str | None, done: int, input: Path, output: Path) -> None:
    """A resumed run must read the input the output came from: the last row's stored text (where
    the format keeps texts) must equal the input's text at that row."""
    if done and writer.last_text is not None and text != writer.last_text:
        raise InputError(f"{output}: row {done - 1} was encoded from another text than {input} has there; "
                         f"not the same input? (remove the output or drop --resume)")


def _announce(done: int, output: Path) -> None:
    if done:
        log.info("resuming: %s already has %d rows", output, done)


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
    reader, counter = READERS[input.suffix.lower()]
    texts = reader(input, field)
    writer = WRITERS[output.suffix.lower()](output, model.config.hidden, resume)
    done = writer.rows
    complete = False
    bar = _NoBar()
    try:
        with _summarized_warnings() as warnings:
            it = iter(texts)
            # Skip whole windows already written; the window we stopped in is encoded again whole
            # (so its batches are the same as in an uninterrupted run) and only its missing rows kept.
            start = done - done % window
            skipped, last = 0, None
            for last in itertools.islice(it, start):
                skipped += 1
            if skipped < start:
                raise InputError(f"{output} already has {done} rows but {input} has only {skipped} texts; "
                                 f"not the same input? (remove the output or drop --resume)")
            if done == start:
                _same_text(writer, last, done, input, output)
                _announce(done, output)
            bar = _bar(progress, lambda: counter(input), done)
            n = start
            for chunk in _windows(it, window):
                warnings.offset = n
                keep = max(done - n, 0)
                if keep > len(chunk):
                    raise InputError(f"{output} already has {done} rows but {input} has only "
                                     f"{n + len(chunk)} texts; not the same input? (remove the output or drop --resume)")
                if keep:
                    _same_text(writer, chunk[keep - 1], done, input, output)
                    _announce(done, output)
                vecs = _encode_window(model, chunk, n, input, pooling, normalize, batch_size)
                if keep < len(chunk):
                    writer.write(chunk[keep:], vecs[keep:])
                    bar.update(len(chunk) - keep)
                n += len(chunk)
            if n < done:
                raise InputError(f"{output} already has {done} rows but {input} has only {n} texts; "
                                 f"not the same input? (remove the output or drop --resume)")
            complete = True
        warnings.emit_summary()
    finally:
        bar.close()
        writer.close(complete)
    return writer.rows
