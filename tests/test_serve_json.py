"""The server's float32 -> JSON writer (ufcpu/serve/jsonfloat.py) against json.dumps of tolist():
the same numbers bit for bit in float32, floats stay floats, NaN/inf refused as json.dumps does."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("starlette")      # ufcpu.serve needs the server extra
pytest.importorskip("uvicorn")

from ufcpu.serve import jsonfloat  # noqa: E402


def test_every_float32_reads_back_bit_for_bit():
    rng = np.random.default_rng(0)
    m = (rng.standard_normal((5, 768)) * 10.0 ** rng.integers(-30, 30, (5, 768))).astype(np.float32)
    m[0, :6] = [1.0, -0.0, 0.0, 3e7, np.finfo(np.float32).tiny, np.finfo(np.float32).max]
    got = json.loads(jsonfloat.matrix(m))
    assert np.array_equal(np.array(got, np.float32).view(np.int32), m.view(np.int32))   # -0.0 included
    assert all(isinstance(x, float) for row in got for x in row)
    one = np.array(json.loads(jsonfloat.vector(m[1])), np.float32)
    assert np.array_equal(one, np.array(json.loads(json.dumps(m[1].tolist())), np.float32))


def test_shapes_match_json_dumps():
    ms = [np.arange(6, dtype=np.float32).reshape(3, 2) / 8, np.zeros((0, 2), np.float32), np.ones((1, 2), np.float32)]
    assert json.loads(jsonfloat.matrices(ms)) == [m.tolist() for m in ms]
    assert json.loads(jsonfloat.matrix(np.zeros((2, 0), np.float32))) == [[], []]
    assert json.loads(jsonfloat.vector(np.zeros(0, np.float32))) == []


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_as_json_dumps_refuses_them(bad):
    with pytest.raises(ValueError, match="not JSON compliant"):
        jsonfloat.matrix(np.array([[0.5, bad]], np.float32))
