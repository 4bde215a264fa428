"""Property-based tests of the safetensors reader (ufcpu.safetensors_io), at a CI budget.

Whatever the bytes, `open_tensors` either returns arrays that lie inside the file and do not
overlap, or raises CheckpointError with a one-line message naming the file; nothing else ever
escapes. Where the reference implementation (the `safetensors` package) accepts a file of dtypes
we read, we return the same arrays. The budget is small (UFCPU_FUZZ_EXAMPLES examples per
property, default 75, derandomized: the same inputs on every CI run); the long run is
fuzz/fuzz_safetensors.py (see README).
"""
from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ufcpu.errors import CheckpointError
from ufcpu.safetensors_io import DTYPES, open_tensors, read_header

SETTINGS = settings(max_examples=int(os.environ.get("UFCPU_FUZZ_EXAMPLES", "75")), deadline=None,
                    suppress_health_check=list(HealthCheck), derandomize=True)
_DIR = Path(tempfile.mkdtemp(prefix="ufcpu-fuzz-st-"))
PATH = _DIR / "f.safetensors"
atexit.register(shutil.rmtree, _DIR, True)

# --- building files ------------------------------------------------------------------------------


def st_file(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return (len(h) if length is None else length).to_bytes(8, "little") + h + data


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3)
dtype_names = st.sampled_from(sorted(DTYPES))


@st.composite
def valid_files(draw) -> tuple[bytes, dict[str, np.ndarray]]:
    """A well-formed file (tensors packed in order) and the arrays it holds."""
    names = draw(st.lists(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8),
                          unique=True, max_size=5))
    header: dict = {}
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    arrays, chunks, off = {}, [], 0
    for name in names:
        dt, shape = draw(dtype_names), draw(shapes)
        n = math.prod(shape)
        raw = draw(st.binary(min_size=n * DTYPES[dt].itemsize, max_size=n * DTYPES[dt].itemsize))
        if dt == "BOOL":
            raw = bytes(b & 1 for b in raw)
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        arrays[name] = np.frombuffer(raw, DTYPES[dt]).reshape(shape)
        chunks.append(raw)
        off += len(raw)
    return st_file(header, b"".join(chunks)), arrays


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


# --- the property --------------------------------------------------------------------------------

def check(raw: bytes) -> dict[str, np.ndarray] | None:
    """Write raw, open it: -> arrays, or None after a well-formed CheckpointError."""
    PATH.write_bytes(raw)
    try:
        arrays = open_tensors(PATH)
    except CheckpointError as e:
        msg = str(e)
        assert msg.startswith(str(PATH) + ": "), msg
        assert "\n" not in msg and len(msg) < 1000, msg
        return None
    header, start, size = read_header(PATH)
    spans = []
    for name, a in arrays.items():
        b, e = header[name]["data_offsets"]
        assert start <= start + b <= start + e <= size
        assert a.nbytes == e - b and not a.flags.writeable
        if a.nbytes:
            spans.append((b, e))
    spans.sort()
    assert all(e0 <= b1 for (_, e0), (b1, _) in zip(spans, spans[1:]))
    return arrays


def reference(raw: bytes):
    """What the safetensors package reads from the same bytes (None if it refuses them)."""
    from safetensors.numpy import load
    try:
        return load(raw)
    except Exception:
        return None


@SETTINGS
@given(st.binary(max_size=200))
def test_arbitrary_bytes(raw):
    check(raw)


@SETTINGS
@given(st.binary(max_size=64), st.integers(0, 2 ** 64 - 1))
def test_arbitrary_length_field(body, n):
    check(n.to_bytes(8, "little") + body)


@SETTINGS
@given(json_values, st.binary(max_size=64))
def test_arbitrary_json_header(header, data):
    check(st_file(json.dumps(header).encode(), data))


@SETTINGS
@given(st.dictionaries(st.text(max_size=4), st.fixed_dictionaries(
    {"dtype": dtype_names | json_values, "shape": st.lists(st.integers(-2, 2 ** 64), max_size=4) | json_values,
     "data_offsets": st.lists(st.integers(-8, 80), min_size=0, max_size=3) | json_values}), max_size=4),
    st.binary(max_size=80))
def test_entries_of_the_right_form_with_wrong_values(header, data):
    check(st_file(header, data))


@SETTINGS
@given(valid_files())
def test_valid_files_round_trip_and_match_the_reference(file):
    raw, arrays = file
    got = check(raw)
    assert got is not None
    assert got.keys() == arrays.keys()
    ref = reference(raw)
    assert ref is not None
    for name, a in arrays.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape
        assert got[name].tobytes() == a.tobytes() == np.ascontiguousarray(ref[name]).tobytes()


@SETTINGS
@given(valid_files(), st.data())
def test_mutated_valid_files(file, data):
    """Byte flips, truncation and extension of a valid file; if the reference reads the result
    (and all its dtypes are ours), we read the same arrays."""
    raw, _ = file
    assume(len(raw) > 8)
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "extend", "length"]))
        if op == "flip" and buf:
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del buf[data.draw(st.integers(0, len(buf))):]
        elif op == "extend":
            buf += data.draw(st.binary(max_size=16))
        elif op == "length" and len(buf) >= 8:
            n = (int.from_bytes(buf[:8], "little") + data.draw(st.integers(-16, 16))) % 2 ** 64
            buf[:8] = n.to_bytes(8, "little")
    got = check(bytes(buf))
    ref = reference(bytes(buf))
    if ref is not None and got is None:
        header = json.loads(bytes(buf)[8:8 + int.from_bytes(buf[:8], "little")])
        header.pop("__metadata__", None)
        # the only files the reference reads and we refuse use dtypes the engine has no use for
        assert any(e["dtype"] not in DTYPES for e in header.values())
    if ref is not None and got is not None:
        for name in got:
            assert got[name].tobytes() == np.ascontiguousarray(ref[name]).tobytes()


def test_messages_name_the_problem():
    """A few fixed inputs, with the exact message."""
    assert check(b"") is None
    with pytest.raises(CheckpointError, match=r"not a safetensors file \(shorter than 8 bytes\)"):
        read_header(PATH)
    PATH.write_bytes(st_file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4))
    with pytest.raises(CheckpointError, match=r"tensor 't' lies outside the file \(offsets 0\.\.8, data area 4 bytes\)"):
        read_header(PATH)
