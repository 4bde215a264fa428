"""Engine weights: memory-mapped from a converted folder, validated once at load.

A converted folder (its files and tensors are declared in `layout.py`) holds `engine.json`
(format, version, config, the source's file and tensor names) and `engine.safetensors`. Every
array here is a zero-copy read-only view into one memory map: loading is fast, and several
processes share the same pages.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from . import layout
from .config import Config, check_config, parse_json
from .errors import CheckpointError
from .safetensors_io import open_tensors
from .tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Layer:
    ln1_w: np.ndarray        # [H]
    ln1_b: np.ndarray        # [H]
    qkv: np.ndarray          # [3H, H]  rows: Q block | K block | V block, each head-major
    norm_factor: np.float32  # attention score scale (1/sqrt(head size) in the published model)
    attn_out: np.ndarray     # [H, H]
    ln2_w: np.ndarray        # [H]
    ln2_b: np.ndarray        # [H]
    w_in: np.ndarray         # [N, H]   node logits z = w_in[n] . y + b_in[n]
    b_in: np.ndarray         # [N]
    w_out: np.ndarray        # [N, H]   node-major: row n is node n's output vector


@dataclasses.dataclass(frozen=True)
class Weights:
    word: np.ndarray         # [V, H]   word embedding, also the (tied) MLM decoder
    pos_scale: np.float32    # learned scale of the sinusoidal positions
    emb_ln_w: np.ndarray     # [H]
    emb_ln_b: np.ndarray     # [H]
    layers: tuple[Layer, ...]
    final_ln_w: np.ndarray   # [H]
    final_ln_b: np.ndarray   # [H]
    pooler_w: np.ndarray | None = None   # [cls_dense_width, H]  classification only
    pooler_b: np.ndarray | None = None   # [cls_dense_width]
    head_w: np.ndarray | None = None     # [C, cls_dense_width or H]
    head_b: np.ndarray | None = None     # [C]
    decoder: object | None = None        # int8 precision: the MLM decoder, a quant.QLinear of word


@dataclasses.dataclass(frozen=True)
class Checked:
    """What a conversion in this process has already checked, so a load after it checks nothing twice."""
    config: Config
    tokenizer: Tokenizer


@dataclasses.dataclass(frozen=True)
class Engine:
    config: Config
    weights: Weights
    tokenizer: Tokenizer


def read_engine_meta(folder: Path) -> dict[str, Any]:
    """engine.json, its format and version checked (not its config: see read_engine_config)."""
    path = Path(folder) / layout.CONFIG_FILE
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read engine config: {e.strerror or e}") from None
    meta = parse_json(text, path)
    if not isinstance(meta, dict) or meta.get("format") != layout.FORMAT:
        raise CheckpointError(f"{path}: not a ufcpu engine config")
    if meta.get("version") != layout.VERSION:
        raise CheckpointError(f"{path}: engine format version {meta.get('version')!r}, this ufcpu reads "
                              f"version {layout.VERSION}: convert the checkpoint again")
    return meta


def read_engine_config(folder: Path, meta: dict[str, Any] | None = None) -> Config:
    """engine.json -> Config, every value checked (the file may have been edited by hand)."""
    path = Path(folder) / layout.CONFIG_FILE
    meta = read_engine_meta(folder) if meta is None else meta
    try:
        cfg = Config.from_json(meta["config"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: malformed engine config ({e})") from None
    check_config(cfg, str(path))
    return cfg


def open_tokenizer(path: Path, cfg: Config, vocab_key: str = "vocab") -> Tokenizer:
    """Load tokenizer.json and refuse it if it can produce an id past the embedding (which a
    kernel would index out of bounds with). vocab_key names the config value in the message."""
    tok = Tokenizer(path, cfg.max_seq)
    if tok.vocab_size > cfg.vocab:
        raise CheckpointError(f"{path}: the tokenizer produces ids up to {tok.vocab_size - 1}, the embedding "
                              f"has only {cfg.vocab} rows ({vocab_key})")
    return tok


def map_tensors(folder: Path, cfg: Config) -> dict[str, np.ndarray]:
    """Map engine.safetensors; every tensor the layout declares for this config, float32 of the
    declared shape and aligned, and nothing else. -> engine name -> read-only array."""
    path = Path(folder) / layout.WEIGHTS_FILE
    t = open_tensors(path)
    if cfg.layers > len(t):   # before listing per-layer names: the count may be absurd
        raise CheckpointError(f"{path}: the config has {cfg.layers} layers, the file holds only {len(t)} tensors")
    want = {e.name: e.shape for e in layout.entries(cfg)}
    missing = sorted(want.keys() - t.keys())
    extra = sorted(t.keys() - want.keys())
    if missing or extra:
        raise CheckpointError(f"{path}: tensors do not match the config "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, shape in want.items():
        if t[name].dtype != layout.DTYPE or t[name].shape != shape:
            raise CheckpointError(f"{path}: tensor {name!r} is {t[name].dtype}{list(t[name].shape)}, "
                                  f"expected float32{list(shape)}")
        if not t[name].flags.aligned:   # only a hand-made file can do this; ours pad the header to 8
            raise CheckpointError(f"{path}: tensor {name!r} is not aligned to 4 bytes: convert the "
                                  "checkpoint again")
    return t


def weights_from(t: dict[str, np.ndarray], cfg: Config) -> Weights:
    """Engine tensors -> Weights, each field filled as the layout declares."""
    top: dict[str, Any] = {}
    layers: list[dict[str, Any]] = [{} for _ in range(cfg.layers)]
    for e in layout.entries(cfg):
        value = np.float32(t[e.name][0]) if e.spec.scalar else t[e.name]
        (top if e.layer is None else layers[e.layer])[e.spec.field] = value
    return Weights(**top, layers=tuple(Layer(**f) for f in layers))


def check_finite(t: dict[str, np.ndarray], cfg: Config, folder: Path, meta: dict[str, Any],
                 by_source: bool) -> None:
    """Optional full scan (it reads every byte): NaN/inf weights are refused by tensor name and
    position. by_source: name the user's own checkpoint file and its tensor name (engine.json
    keeps both), else the engine file and its engine name. Chunked, so a scan of a memory-mapped
    755 MB checkpoint needs no 755 MB temporary."""
    for e in layout.entries(cfg):
        flat = t[e.name].reshape(-1)
        for start in range(0, flat.size, 1 << 22):
            chunk = flat[start:start + (1 << 22)]
            if not np.isfinite(chunk).all():
                bad = start + int(np.flatnonzero(~np.isfinite(chunk))[0])
                raise CheckpointError(_nonfinite_message(e, bad, flat[bad], cfg, folder, meta, by_source))


def _nonfinite_message(e: layout.Entry, bad: int, value, cfg: Config, folder: Path, meta: dict,
                       by_source: bool) -> str:
    names = meta.get("tensors") if isinstance(meta.get("tensors"), dict) else {}
    if by_source and isinstance(meta.get("source_weights"), str) and isinstance(names.get(e.name), str):
        where, name, index = meta["source_weights"], names[e.name], layout.source_index(bad, e, cfg)
    else:
        where, name, index = Path(folder) / layout.WEIGHTS_FILE, e.name, bad
    return f"{where}: tensor {name!r} holds NaN or inf values (first at flat index {index}: {value})"


def open_engine(folder: Path, check: bool = False, by_source: bool = False,
                checked: Checked | None = None) -> Engine:
    """A converted folder -> config, mapped weights and tokenizer, each checked once: `checked`
    carries the config and tokenizer a conversion in this process has just checked."""
    folder = Path(folder)
    meta = read_engine_meta(folder)
    if checked is None:
        cfg = read_engine_config(folder, meta)
        tok = open_tokenizer(folder / layout.TOKENIZER_FILE, cfg)
    else:
        cfg, tok = checked.config, checked.tokenizer
    t = map_tensors(folder, cfg)
    if check:
        check_finite(t, cfg, folder, meta, by_source)
    return Engine(config=cfg, weights=weights_from(t, cfg), tokenizer=tok)
