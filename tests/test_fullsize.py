"""The full-size model (16 x 768, depth 11, vocab 32768: 167 tensors, ~755 MB) in the exact Hub
layout, written by the project's own writer since the real weights cannot be downloaded here:
it converts once, loads, and encodes; a second load maps the converted weights without converting."""
from __future__ import annotations

import numpy as np
import pytest

import ufcpu
from ufcpu import hub
from weights_convert.random_checkpoint import write_random_checkpoint


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("full") / "UltraFastBERT-1x11-long-random")


def test_full_size_converts_once_and_encodes(full_checkpoint, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("UFCPU_CACHE", str(tmp_path / "cache"))
    caplog.set_level("INFO", logger="ufcpu")
    model = ufcpu.load(full_checkpoint)
    assert any("converting" in r.message for r in caplog.records)
    c = model.config
    assert (c.layers, c.hidden, c.heads, c.depth, c.vocab, c.nodes) == (16, 768, 12, 11, 32768, 4095)
    assert model.weights.layers[15].w_out.shape == (4095, 768)

    vecs = model.encode(["UltraFastBERT uses 12 of 4095 neurons.", "A second, longer sentence " * 20])
    assert vecs.shape == (2, 768) and vecs.dtype == np.float32 and np.isfinite(vecs).all()
    logits = model.mlm_logits(model.tokenize("hello <mask>")["input_ids"])
    assert logits.shape[-1] == 32768 and logits.dtype == np.float32

    caplog.clear()
    again = ufcpu.load(full_checkpoint)
    assert again.path == model.path
    assert not any("converting" in r.message for r in caplog.records)
    assert hub.ensure_converted(full_checkpoint)[1] is False
    # alone vs. in a batch of two: GEMM shapes differ, so summation order does (same 1e-5 as parity)
    np.testing.assert_allclose(again.encode("UltraFastBERT uses 12 of 4095 neurons."), vecs[0], atol=1e-5)
