"""Read safetensors files as memory-mapped NumPy arrays, validating the header first.

The format: 8 bytes little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data,
offsets relative to the end of the header. We parse it ourselves (rather than through
`safetensors.numpy.load_file`) so that every tensor is a zero-copy view into one read-only
memory map (start-up costs no copy, and processes share the pages), and so that a corrupted
file is refused with a message before any kernel indexes into it.

Not checked here: what the numbers are (NaN/inf: `weights.check_finite`, on request), and files
that change while mapped (truncating a mapped file under a running process is a SIGBUS, as for
every memory-mapped reader).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from .errors import CheckpointError

# Little-endian, as the format specifies, whatever the machine's own byte order.
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
MAX_HEADER = 100 * 1024 * 1024   # the reference library's own limit
MAX_DIMS = 32                    # NumPy's limit is 64; no checkpoint tensor has more than a few
MAX_BYTES = 2 ** 62              # any extent past this is not a real tensor (and overflows NumPy)
MAX_NAME = 120                   # hostile names are cut in messages, so an error stays one line


def _name(value) -> str:
    """A name or value for a one-line message: repr (no raw newlines), cut if very long."""
    r = repr(value)
    return r if len(r) <= MAX_NAME else r[:MAX_NAME] + "..."


def _no_duplicates(pairs: list) -> dict:
    d = {}
    for k, v in pairs:
        if k in d:
            raise CheckpointError(f"safetensors header names {_name(k)} twice")
        d[k] = v
    return d


def read_header(path: str | Path) -> tuple[dict, int, int]:
    """-> (tensor entries without __metadata__, byte offset of the data, file size).

    Everything is checked here, before any byte of data is mapped: the header length against the
    file size, the JSON, every entry's dtype, shape and offsets, and that no two tensors overlap.
    Any failure is a CheckpointError whose message starts with the file name."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: safetensors header length {n} does not fit in a file of "
                                      f"{size} bytes: truncated or not a safetensors file")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a safetensors file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) != n:
        raise CheckpointError(f"{path}: file shrank while it was read")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):   # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + n
    _check_entries(path, header, size - start)
    return header, start, size


def _nbytes(shape: list, itemsize: int) -> int | None:
    """Byte size of a tensor, or None when the shape is not one NumPy could hold (its extent,
    zeros counted as ones, would overflow)."""
    extent = itemsize
    for d in shape:
        extent *= max(d, 1)
        if extent > MAX_BYTES:
            return None
    return math.prod(shape) * itemsize


def _check_entries(path: Path, header: dict, data_len: int) -> None:
    """Every entry has a known dtype, a shape whose byte size matches its offsets, and no two
    tensors overlap. (Gaps between tensors and trailing bytes are tolerated: they are never read.)"""
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise CheckpointError(f"{path}: tensor {_name(name)} has a malformed header entry")
        dtype = e["dtype"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {_name(name)} has unsupported dtype {_name(dtype)} "
                                  f"(supported: {', '.join(DTYPES)})")
        shape, offs = e["shape"], e["data_offsets"]
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise CheckpointError(f"{path}: tensor {_name(name)} has an invalid shape {_name(shape)}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise CheckpointError(f"{path}: tensor {_name(name)} has invalid data_offsets {_name(offs)}")
        begin, end = offs
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(f"{path}: tensor {_name(name)} lies outside the file (offsets {begin}..{end}, "
                                  f"data area {data_len} bytes): truncated or corrupted")
        nbytes = _nbytes(shape, DTYPES[dtype].itemsize)
        if nbytes is None:
            raise CheckpointError(f"{path}: tensor {_name(name)} has an impossible shape {shape}")
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {_name(name)} has {end - begin} bytes for shape {shape} "
                                  f"of {dtype} ({nbytes} expected)")
        if nbytes:
            spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {_name(n0)} and {_name(n1)} overlap")


def map_read_only(path: str | Path) -> np.ndarray:
    """The whole file as a read-only uint8 array over one shared memory map. Huge pages are
    asked for (MADV_HUGEPAGE, where the OS has it): when the file is first read through this
    map, Linux can then fill the page cache with 2 MB pages and map them whole, and a tree walk
    that touches rows all over 25 MB of weights per layer misses the TLB less. 128 tokens through
    16 layers: 0.53 against 0.56 ms per layer for the walk. Pages already cached stay as they are."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:   # a kernel without transparent huge pages for files: nothing lost
            pass
    return np.frombuffer(mm, np.uint8)


def open_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """name -> read-only array view into one memory map of the file (no copy)."""
    header, start, size = read_header(path)
    if size > start:
        try:
            mm = map_read_only(path)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot map the file: {e}") from None
        if mm.shape[0] != size:
            raise CheckpointError(f"{path}: file changed size while it was read")
    else:
        mm = np.zeros(start, np.uint8)   # no data: every tensor is empty
        mm.flags.writeable = False
    out = {}
    for name, e in header.items():
        begin, end = e["data_offsets"]
        buf = mm[start + begin:start + end]
        try:
            out[name] = buf.view(DTYPES[e["dtype"]]).reshape(e["shape"])
        except ValueError as err:   # not reachable after _check_entries; kept as a last guard
            raise CheckpointError(f"{path}: tensor {_name(name)}: {err}") from None
    return out


ALIGN = 64               # bytes: where the data and every tensor of a multiple of it start (a cache line)
DEFER_MAX = 1 << 20      # tensors of an odd size up to this are held back and written last


def placement(specs: list[tuple[str, tuple]]) -> tuple[dict[str, int], list[str]]:
    """-> (name -> data offset, names in file order) of float32 tensors [(name, shape)]. A tensor
    whose size is a multiple of ALIGN keeps its place in specs and starts on an ALIGN boundary,
    since every odd-sized one up to DEFER_MAX (biases of 4095, scalars) goes after them all; the
    data stays contiguous, as the format requires."""
    sizes = {name: math.prod(shape) * 4 for name, shape in specs}
    deferred = [n for n, _ in specs if sizes[n] % ALIGN and sizes[n] <= DEFER_MAX]
    held = set(deferred)
    order = [n for n, _ in specs if n not in held] + deferred
    offsets, at = {}, 0
    for name in order:
        offsets[name] = at
        at += sizes[name]
    return offsets, order


def write_tensors(path: str | Path, specs: list[tuple[str, tuple]], arrays, metadata: dict[str, str]) -> None:
    """A float32 safetensors file, written one tensor at a time from the iterable arrays in the
    order of specs [(name, shape)] (so a writer holds one large tensor at a time, and the small
    odd-sized ones `placement` puts last). Opened with open(), so it gets the umask's mode like
    every other file; the header is padded with spaces (as the safetensors library pads it to 8
    bytes) so that the data starts on an ALIGN boundary of the file, hence of its memory map."""
    offsets, order = placement(specs)
    header: dict = {"__metadata__": metadata}
    for name, shape in specs:
        n = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offsets[name], offsets[name] + n]}
    total = sum(math.prod(shape) * 4 for _, shape in specs)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    held: dict[str, np.ndarray] = {}
    written = 0
    with open(path, "xb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for (name, shape), a in zip(specs, arrays):
            a = np.ascontiguousarray(a, dtype=DTYPES["F32"])
            if a.shape != tuple(shape):
                raise ValueError(f"tensor {name!r} is {list(a.shape)}, its header entry says {list(shape)}")
            if offsets[name] != written:    # one that goes last: a copy, since the iterable may reuse its buffer
                held[name] = a.copy()
                continue
            f.write(memoryview(a).cast("B"))
            written += a.nbytes
        for name in order[len(order) - len(held):]:   # those held back are the end of the file order
            a = held.pop(name)
            f.write(memoryview(a).cast("B"))
            written += a.nbytes
    if written != total:
        raise ValueError(f"{path}: {written} bytes of tensors written, the header holds {total}")
