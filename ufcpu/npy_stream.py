"""Write a float32 [n, H] .npy file row by row, when n is not known in advance.

The header is written with a fixed size and rewritten with the final row count on close, so the
rows stream to disk (bounded memory) and the result is an ordinary .npy that `np.load(...,
mmap_mode="r")` maps. An interrupted file can be reopened to append (`resume=True`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

HEADER_BYTES = 128   # magic(6) + version(2) + length(2) + dict padded with spaces and a newline
MAGIC = b"\x93NUMPY\x01\x00"


def _header(rows: int, width: int) -> bytes:
    d = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % (rows, width)
    body = d.encode("latin1")
    pad = HEADER_BYTES - len(MAGIC) - 2 - len(body) - 1
    if pad < 0:
        raise ValueError("shape too large for the fixed .npy header")
    return MAGIC + (HEADER_BYTES - len(MAGIC) - 2).to_bytes(2, "little") + body + b" " * pad + b"\n"


class NpyRowWriter:
    def __init__(self, path: str | Path, width: int, resume: bool = False):
        self.path = Path(path)
        self.width = width
        self.rows = 0
        row_bytes = 4 * width
        if resume and self.path.exists() and self.path.stat().st_size >= HEADER_BYTES:
            self._f = open(self.path, "r+b")
            head = self._f.read(HEADER_BYTES)
            if not head.startswith(MAGIC) or f", {width}), ".encode() not in head:
                raise ValueError(f"{self.path}: not a float32 [n, {width}] file written by ufcpu; cannot resume")
            # Rows complete on disk: a partially written last row is dropped.
            self.rows = (self.path.stat().st_size - HEADER_BYTES) // row_bytes
            self._f.truncate(HEADER_BYTES + self.rows * row_bytes)
            self._f.seek(0, os.SEEK_END)
        else:
            self._f = open(self.path, "wb")
            self._f.write(_header(0, width))
            self._f.flush()       # on disk before any row: a run killed at any point leaves a valid .npy

    def write(self, rows: np.ndarray) -> None:  # [k, width] float32
        rows = np.ascontiguousarray(rows, dtype="<f4").reshape(-1, self.width)
        self._f.write(rows.tobytes())
        self.rows += rows.shape[0]

    def flush(self) -> None:
        """Make the file a valid .npy of the rows written so far (header rewritten)."""
        pos = self._f.tell()
        self._f.seek(0)
        self._f.write(_header(self.rows, self.width))
        self._f.seek(pos)
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self.flush()
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
