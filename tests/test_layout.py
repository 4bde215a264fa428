"""The engine layout is declared once (ufcpu/layout.py): the loader fills every field from it, the
converter writes exactly its entries, and every check runs once per load or conversion."""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import ufcpu
from conftest import DATA
from ufcpu import hub, layout
from ufcpu.config import Config
from ufcpu.weights import Layer, Weights
from weights_convert import convert as conv
from weights_convert.random_checkpoint import write_random_checkpoint

DIMS = dict(layers=2, hidden=16, heads=2, depth=2, vocab=256, max_seq=16)


def configs() -> list[Config]:
    base = dict(layers=3, hidden=16, heads=2, depth=2, vocab=256)
    return [Config(**base), Config(**base, task="classification", num_labels=3, cls_dense_width=8),
            Config(**base, task="classification", num_labels=1, include_ff_layer=False)]


@pytest.mark.parametrize("cfg", configs(), ids=["mlm", "cls", "cls-no-dense"])
def test_every_field_is_filled_exactly_once(cfg):
    entries = layout.entries(cfg)
    assert len(entries) == layout.tensor_count(cfg) == len({e.name for e in entries})
    top = [e.spec.field for e in entries if e.layer is None]
    per_layer = [[e.spec.field for e in entries if e.layer == i] for i in range(cfg.layers)]
    weight_fields = {f.name for f in dataclasses.fields(Weights)} - {"layers"}
    optional = {f.name for f in dataclasses.fields(Weights) if f.default is None}
    assert len(top) == len(set(top)) and weight_fields - optional <= set(top) <= weight_fields
    for fields in per_layer:
        assert sorted(fields) == sorted(f.name for f in dataclasses.fields(Layer))


@pytest.mark.parametrize("cfg", configs(), ids=["mlm", "cls", "cls-no-dense"])
def test_the_converter_maps_every_declared_tensor_and_nothing_else(cfg):
    specs = {s.name for s in layout.EMBEDDING + layout.LAYER + layout.FINAL + layout.CLS_POOLER + layout.CLS_HEAD}
    assert specs == conv.HUB_NAMES.keys()
    rows = conv.plan(cfg)
    assert [e for _, e, _ in rows] == layout.entries(cfg)
    assert len({h for h, _, _ in rows}) == len(rows)
    for hub_name, e, hub_shape in rows:   # each reordering turns the Hub shape into the declared one
        a = np.arange(int(np.prod(hub_shape)), dtype=np.float32).reshape(hub_shape)
        assert layout.to_engine(a, e.spec, cfg).shape == e.shape, hub_name


def test_source_index_inverts_each_reordering():
    cfg = configs()[0]
    for e in layout.entries(cfg)[:len(layout.EMBEDDING) + len(layout.LAYER)]:
        src_shape = layout.REORDER[e.spec.reorder].source_shape(e.shape)
        src = np.random.default_rng(0).standard_normal(src_shape).astype(np.float32)
        out = layout.to_engine(src, e.spec, cfg).reshape(-1)
        for flat in (0, out.size // 3, out.size - 1):
            assert src.reshape(-1)[layout.source_index(flat, e, cfg)] == out[flat], e.name


def test_engine_file_is_what_the_layout_declares_and_safetensors_reads_it(tmp_path):
    from safetensors.numpy import load_file

    ckpt = write_random_checkpoint(tmp_path / "ckpt", **DIMS)
    engine = conv.convert(ckpt, tmp_path / "engine")
    cfg = ufcpu.load(engine).config
    theirs = load_file(str(engine / layout.WEIGHTS_FILE))
    header_names = list(json.loads((engine / layout.WEIGHTS_FILE).read_bytes()[8:][
        :int.from_bytes((engine / layout.WEIGHTS_FILE).read_bytes()[:8], "little")]))
    assert header_names[1:] == [e.name for e in layout.entries(cfg)]   # after __metadata__, in declared order
    src = ufcpu.safetensors_io.open_tensors(ckpt / "model.safetensors")
    for hub_name, e, _ in conv.plan(cfg):
        np.testing.assert_array_equal(theirs[e.name], layout.to_engine(src[hub_name], e.spec, cfg))
    meta = json.loads((engine / layout.CONFIG_FILE).read_text())
    assert meta["version"] == layout.VERSION and meta["source_weights"] == str(ckpt / "model.safetensors")
    assert meta["tensors"]["layer.1.qkv"] == "encoder.layers.1.attn.self_attention.query_key_value.weight"
    assert sorted(p.name for p in engine.iterdir()) == sorted(
        n for n in layout.WRITTEN_FILES if (ckpt / n).is_file() or n in (layout.WEIGHTS_FILE, layout.CONFIG_FILE))


def test_engine_tensors_start_on_cache_lines_and_the_data_stays_contiguous(tmp_path):
    """Every tensor of a multiple of 64 bytes (all the [*, 768] ones of the real model) starts on
    a 64-byte boundary of the file; the odd-sized ones follow them all, with no gap anywhere."""
    from ufcpu import safetensors_io as st

    ckpt = write_random_checkpoint(tmp_path / "ckpt", **DIMS)
    engine = conv.convert(ckpt, tmp_path / "engine")
    header, data_start, size = st.read_header(engine / layout.WEIGHTS_FILE)
    assert data_start % st.ALIGN == 0
    spans = sorted(e["data_offsets"] for e in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == size - data_start
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    aligned = [n for n, e in header.items() if (e["data_offsets"][1] - e["data_offsets"][0]) % st.ALIGN == 0]
    odd = header.keys() - set(aligned)
    assert aligned and odd   # the tiny model has both kinds
    assert all(header[n]["data_offsets"][0] % st.ALIGN == 0 for n in aligned)
    assert max(header[n]["data_offsets"][0] for n in aligned) < min(header[n]["data_offsets"][0] for n in odd)
    for name, a in st.open_tensors(engine / layout.WEIGHTS_FILE).items():
        assert a.ctypes.data % st.ALIGN == 0 or name in odd


def test_placement_keeps_large_odd_tensors_in_order():
    from ufcpu import safetensors_io as st

    big_odd = (st.DEFER_MAX // 4 + 1,)
    offsets, order = st.placement([("a", (16,)), ("b", (3,)), ("c", big_odd), ("d", (32, 2)), ("e", (1,))])
    assert order == ["a", "c", "d", "b", "e"]
    assert offsets == {"a": 0, "c": 64, "d": 64 + 4 * big_odd[0], "b": 64 + 4 * big_odd[0] + 256,
                       "e": 64 + 4 * big_odd[0] + 268}


def test_an_older_cache_entry_is_converted_again_never_misread(tmp_path, monkeypatch):
    """A conversion written under another format version, at the key this checkpoint maps to (as a
    cache filled by an older ufcpu whose key this version would still compute): converted again."""
    monkeypatch.setenv("UFCPU_CACHE", str(tmp_path / "cache"))
    src = Path(shutil.copytree(DATA / "tiny-ufb", tmp_path / "ckpt"))
    engine, converted = hub.ensure_converted(src)
    assert converted
    want = ufcpu.load(src).encode("hello")
    meta = json.loads((engine / layout.CONFIG_FILE).read_text())
    (engine / layout.CONFIG_FILE).write_text(json.dumps({**meta, "version": layout.VERSION - 1}))
    (engine / layout.WEIGHTS_FILE).write_bytes(b"\0" * 16)     # whatever an older layout held
    again, converted = hub.ensure_converted(src)
    assert again == engine and converted
    assert json.loads((engine / layout.CONFIG_FILE).read_text())["version"] == layout.VERSION
    np.testing.assert_array_equal(ufcpu.load(src).encode("hello"), want)
    assert sorted(p.name for p in engine.parent.iterdir()) == [engine.name]   # the old one is gone


def test_the_fingerprint_covers_the_format_version(tmp_path, monkeypatch):
    monkeypatch.setenv("UFCPU_CACHE", str(tmp_path / "cache"))
    before = hub.converted_path(DATA / "tiny-ufb")
    monkeypatch.setattr(layout, "VERSION", layout.VERSION + 1)
    assert hub.converted_path(DATA / "tiny-ufb") != before


# --- every check once ---------------------------------------------------------------------------

def count_calls(monkeypatch, module, name: str) -> list:
    """Replace module.name, in every ufcpu / weights_convert module that imported it, by a wrapper
    that records each call. -> the list of calls (one entry per call)."""
    original = getattr(module, name)
    calls: list = []

    def wrapper(*a, **kw):
        calls.append(a)
        return original(*a, **kw)

    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith(("ufcpu", "weights_convert")) and getattr(mod, name, None) is original:
            monkeypatch.setattr(mod, name, wrapper)
    return calls


@pytest.fixture
def counted(monkeypatch):
    import ufcpu.config
    import ufcpu.tokenizer
    import weights_convert.hub_config
    return {
        "check_config": count_calls(monkeypatch, ufcpu.config, "check_config"),
        "config_from_hub": count_calls(monkeypatch, weights_convert.hub_config, "config_from_hub"),
        "check_hub_tensors": count_calls(monkeypatch, conv, "check_hub_tensors"),
        "tied_decoder_compare": count_calls(monkeypatch, conv, "check_tied_decoder"),
        "tokenizer": count_calls(monkeypatch, ufcpu.tokenizer, "Tokenizer"),
    }


def _counts(counted) -> dict:
    out = {k: len(v) for k, v in counted.items()}
    for v in counted.values():
        v.clear()
    return out


def test_each_check_runs_once_per_load(tmp_path, monkeypatch, counted):
    monkeypatch.setenv("UFCPU_CACHE", str(tmp_path / "cache"))
    src = Path(shutil.copytree(DATA / "tiny-ufb", tmp_path / "ckpt"))

    ufcpu.load(src)                   # converts, then maps
    assert _counts(counted) == {"check_config": 1, "config_from_hub": 1, "check_hub_tensors": 1,
                                "tied_decoder_compare": 1, "tokenizer": 1}
    ufcpu.load(src)                   # maps the cached conversion
    assert _counts(counted) == {"check_config": 1, "config_from_hub": 0, "check_hub_tensors": 0,
                                "tied_decoder_compare": 0, "tokenizer": 1}
    engine = conv.convert(src, tmp_path / "engine")
    assert _counts(counted) == {"check_config": 1, "config_from_hub": 1, "check_hub_tensors": 1,
                                "tied_decoder_compare": 1, "tokenizer": 1}
    ufcpu.load(engine)                # an engine folder as it is
    assert _counts(counted) == {"check_config": 1, "config_from_hub": 0, "check_hub_tensors": 0,
                                "tied_decoder_compare": 0, "tokenizer": 1}
