"""Texts in, vectors out: the readers and writers shared by `ufcpu encode` (arguments, stdin and
--input FILE) and ufcpu.corpus. Nothing here knows about models.

- Lines: `utf8_lines` decodes one text per line (a first-line BOM dropped, undecodable bytes
  replaced with one warning); `stdin_texts` reads stdin and marks where the input pauses, and
  `windows` (the one windowing helper) ends a window there, so a program feeding ufcpu a line at
  a time gets each vector back at once.
- READERS: input suffix -> (reader, counter): .txt, .jsonl (the text in a field), .parquet (a
  string column, read in record batches).
- WRITERS: format -> writer class: npy (float32 [n, H]), jsonl ({"text", "embedding"} per line),
  json (one list, streamed), parquet (complete part files merged at the end). A writer is built
  with (path or None for stdout, width, resume); `rows` is what a previous run left complete
  and `last_text` the last of its texts where the format keeps them; write(texts, vecs)
  appends; close(complete) finishes (complete=False after an error: what is written stays resumable).
- `progress_bar`: tqdm on stderr with texts/s, or nothing.
"""
from __future__ import annotations

import json
import logging
import os
import re
import selectors
import stat
import sys
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import numpy as np

from .errors import InputError

log = logging.getLogger("ufcpu")

DEFAULT_FIELD = "text"
PARQUET_PART_ROWS = 4096       # rows per part file (and per row group of the merged file)
STDIN_PAUSE = 0.05             # seconds without input after which the texts read so far are encoded
_PARQUET_BATCH = 1024          # rows per record batch read from a parquet input
_SCAN_CHUNK = 1 << 20
_READ_CHUNK = 1 << 16


# --- lines ---------------------------------------------------------------------------------------

class _Utf8:
    """Decodes lines as UTF-8; undecodable bytes become U+FFFD, with one warning per source."""

    def __init__(self, where: Callable[[int], str]):
        self.where = where          # line number (from 1) -> "stdin" or "FILE line N"
        self.warned = False

    def __call__(self, raw: bytes, n: int) -> str:
        line = raw.rstrip(b"\r\n")
        if n == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            if not self.warned:
                log.warning("%s is not valid UTF-8: undecodable bytes were replaced by U+FFFD", self.where(n))
                self.warned = True
            return line.decode("utf-8", errors="replace")


def utf8_lines(f: BinaryIO, where: Callable[[int], str]) -> Iterator[str]:
    """One text per line of a binary stream (a final newline makes no extra empty text)."""
    decode = _Utf8(where)
    for n, raw in enumerate(f, 1):
        yield decode(raw, n)


PAUSE = object()     # in a stream of texts: the input paused, so the window read so far is ready


def windows(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of up to `size` items, in order; a PAUSE in the stream ends a window
    early. The one windowing helper (Model.encode_iter, the corpus loop, stdin)."""
    chunk: list = []
    for x in items:
        if x is PAUSE:
            if chunk:
                yield chunk
                chunk = []
            continue
        chunk.append(x)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _pipe_lines(fd: int, pause: float) -> Iterator[bytes | object]:
    """Raw lines of a pipe or terminal, and PAUSE whenever `pause` seconds pass with no input."""
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    pending: list[bytes] = []       # the start of a line not finished yet
    try:
        while True:
            if not sel.select(pause):
                yield PAUSE
                continue
            data = os.read(fd, _READ_CHUNK)
            if not data:
                break
            start = 0
            while (end := data.find(b"\n", start)) >= 0:
                pending.append(data[start:end + 1])
                yield b"".join(pending)
                pending = []
                start = end + 1
            if start < len(data):
                pending.append(data[start:])
        if pending:
            yield b"".join(pending)
    finally:
        sel.close()


def stdin_texts(pause: float = STDIN_PAUSE) -> Iterator[str | object]:
    """stdin, one text per line; from a pipe or a terminal also PAUSE whenever the input pauses
    for `pause` seconds, so that windows(stdin_texts(), n) gives a line in, a vector out."""
    fd = sys.stdin.fileno()
    mode = os.fstat(fd).st_mode
    decode = _Utf8(lambda n: "stdin")
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode):
        raw_lines = _pipe_lines(fd, pause)
    else:                           # a regular file never pauses (and epoll refuses one)
        raw_lines = iter(sys.stdin.buffer)
    n = 0
    for raw in raw_lines:
        if raw is PAUSE:
            yield PAUSE
            continue
        n += 1
        yield decode(raw, n)


# --- file readers: path -> iterator of texts ------------------------------------------------------
# Each reader checks what it can up front (before any output is written) and returns an iterator;
# problems found while reading (bad JSON on line N, a non-string value) raise InputError then.

def pyarrow():
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


def read_txt(path: Path, field: str | None) -> Iterator[str]:
    if field is not None:
        raise InputError(f"{path}: --field applies to .jsonl and .parquet input; a .txt file is one text per line")
    return _txt_lines(path)


def _txt_lines(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        yield from utf8_lines(f, lambda n: f"{path} line {n}")


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
    pa, pq = pyarrow()
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
    return pyarrow()[1].ParquetFile(path).metadata.num_rows


# suffix -> (reader, counter for the progress bar's total)
READERS: dict[str, tuple[Callable[[Path, str | None], Iterator[str]], Callable[[Path], int]]] = {
    ".txt": (read_txt, count_txt),
    ".jsonl": (read_jsonl, count_jsonl),
    ".parquet": (read_parquet, count_parquet),
}


# --- writers -------------------------------------------------------------------------------------

def jsonl_row(text, vec) -> bytes:
    """The one JSONL row format: {"text": ..., "embedding": [...]} and a newline."""
    return (json.dumps({"text": text, "embedding": np.asarray(vec).tolist()}) + "\n").encode("utf-8")


def _stdout() -> BinaryIO:
    return sys.stdout.buffer


class NpyOut:
    """float32 [n, H], streamed row by row; the header is rewritten after every window, so the
    file is a valid .npy (np.load(..., mmap_mode="r")) of the rows written so far at all times."""
    one_vector_per_text = True
    needs_file = True

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
    """One {"text", "embedding"} object per line."""
    one_vector_per_text = False     # pooling none: the embedding is a list of token vectors
    needs_file = False

    def __init__(self, path: Path | None, width: int, resume: bool):
        self.rows = 0
        self.last_text = None
        self._own = path is not None
        if path is None:
            self._f = _stdout()
        elif resume and path.exists():
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
        self._f.write(b"".join(jsonl_row(t, v) for t, v in zip(texts, vecs)))
        self._f.flush()
        self.rows += len(texts)

    def close(self, complete: bool) -> None:
        if self._own:
            self._f.close()


class JsonListOut:
    """One JSON list of embeddings, written item by item so a long stream never sits in memory
    whole; the closing bracket only when the stream is complete."""
    one_vector_per_text = False
    needs_file = False

    def __init__(self, path: Path | None, width: int, resume: bool):
        self.rows = 0
        self.last_text = None
        self._own = path is not None
        self._f = open(path, "wb") if path is not None else _stdout()
        self._f.write(b"[")

    def write(self, texts: list[str], vecs) -> None:
        self._f.write(b"".join((b"," if self.rows + k else b"") + json.dumps(np.asarray(v).tolist()).encode()
                               for k, v in enumerate(vecs)))
        self._f.flush()
        self.rows += len(texts)

    def close(self, complete: bool) -> None:
        if complete:
            self._f.write(b"]\n")
            self._f.flush()
        if self._own:
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
    needs_file = True

    def __init__(self, path: Path, width: int, resume: bool):
        self.pa, self.pq = pyarrow()
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


WRITERS: dict[str, type] = {"npy": NpyOut, "jsonl": JsonlOut, "json": JsonListOut, "parquet": ParquetOut}
SUFFIXES = {".npy": "npy", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}   # output suffix -> format


def suffix_format(path: str | Path) -> str | None:
    """The format an output's suffix names, or None for a suffix that names none."""
    return SUFFIXES.get(Path(path).suffix.lower())


# --- progress ------------------------------------------------------------------------------------

class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(progress: bool, total: Callable[[], int | None] = lambda: None, initial: int = 0):
    """tqdm on stderr with texts/s, only when asked (the CLI asks when stderr is a terminal)."""
    if not progress:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:     # tqdm comes with huggingface_hub; without it, no bar
        return _NoBar()
    return tqdm(total=total(), initial=initial, unit="text", file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)
