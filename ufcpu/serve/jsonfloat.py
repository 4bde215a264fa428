"""float32 vectors -> JSON text with printf's `%.9g`.

Nine significant digits give back every float32 bit for bit, so the answer is exact; json.dumps of
`tolist()` writes the 17 digits of each float64 instead: three times slower and 60% more bytes
(bench/README.md, "Serving"), on the event loop that every request shares.
"""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=64)
def _spec(rows: int, width: int) -> str:
    """The printf template of `rows` JSON lists of `width` numbers each, comma-separated."""
    return ",".join(["[" + ",".join(["%.9g"] * width) + "]"] * rows)


def _text(m: np.ndarray) -> str:  # [n, H] -> "[..],[..]"
    if not np.isfinite(m).all():   # as json.dumps(allow_nan=False): NaN and inf are not JSON
        raise ValueError("Out of range float values are not JSON compliant")
    whole = m == np.trunc(m)   # %.9g writes 1.0 as "1" (an integer to JSON readers) and -0.0 as "-0"
    if whole.any():
        spec = ",".join("[" + ",".join(row) + "]" for row in np.where(whole, "%.1f", "%.9g").tolist())
    else:
        spec = _spec(*m.shape)
    return spec % tuple(m.ravel().tolist())


def vector(v: np.ndarray) -> str:
    """[H] -> "[x, ...]" """
    return _text(np.asarray(v, np.float32).reshape(1, -1)) if len(v) else "[]"


def matrix(m: np.ndarray) -> str:
    """[n, H] -> "[[x, ...], ...]" """
    m = np.asarray(m, np.float32)
    return "[" + (_text(m) if m.size else ",".join(["[]"] * len(m))) + "]"


def matrices(ms: list[np.ndarray]) -> str:
    """[[n_i, H], ...] -> "[[[x, ...], ...], ...]" """
    return "[" + ",".join(map(matrix, ms)) + "]"
