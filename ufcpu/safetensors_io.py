"""Read safetensors files as memory-mapped NumPy arrays, validating the header first.

The format: 8 bytes little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data,
offsets relative to the end of the header. We parse it ourselves (rather than through
`safetensors.numpy.load_file`) so that every tensor is a zero-copy view into one read-only
`np.memmap` (start-up costs no copy, and processes share the pages), and so that a corrupted
file is refused with a message before any kernel indexes into it.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from .errors import CheckpointError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
    "BOOL": np.bool_,
}
MAX_HEADER = 100 * 1024 * 1024   # the reference library's own limit


def read_header(path: str | Path) -> tuple[dict, int, int]:
    """-> (tensor entries without __metadata__, byte offset of the data, file size)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: safetensors header length {n} does not fit in a file of {size} bytes")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a safetensors file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + n
    _check_entries(path, header, size - start)
    return header, start, size


def _check_entries(path: Path, header: dict, data_len: int) -> None:
    """Every entry has a known dtype, a shape whose byte size matches its offsets, and the
    offsets tile the data area without overlap (the format forbids holes too)."""
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry")
        if e["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {e['dtype']!r}")
        shape, offs = e["shape"], e["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offs!r}")
        begin, end = offs
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(f"{path}: tensor {name!r} lies outside the file (offsets {begin}..{end}, "
                                  f"data area {data_len} bytes): truncated or corrupted")
        nbytes = math.prod(shape) * np.dtype(DTYPES[e["dtype"]]).itemsize
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} "
                                  f"of {e['dtype']} ({nbytes} expected)")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap")


def open_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """name -> read-only array view into one memory map of the file (no copy)."""
    header, start, size = read_header(path)
    if size == start:
        mm = np.zeros(0, np.uint8)
    else:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, e in header.items():
        begin, end = e["data_offsets"]
        buf = mm[start + begin:start + end]
        out[name] = buf.view(DTYPES[e["dtype"]]).reshape(e["shape"])
    return out


def tensor_specs(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype string, shape), from the header alone."""
    header, _, _ = read_header(path)
    return {k: (e["dtype"], tuple(e["shape"])) for k, e in header.items()}
