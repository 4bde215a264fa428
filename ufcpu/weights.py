"""Engine weights: memory-mapped from a converted folder, validated once at load.

The converted folder (written by `weights_convert.convert`) holds `engine.json` (format, version,
config) and `engine.safetensors` (the engine layout). Every array here is a zero-copy read-only
view into one memory map: loading is fast, and several processes share the same pages.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .config import Config, check_config, parse_json
from .errors import CheckpointError
from .safetensors_io import open_tensors

ENGINE_FORMAT = "ufcpu-engine"
ENGINE_VERSION = 1
ENGINE_CONFIG = "engine.json"
ENGINE_WEIGHTS = "engine.safetensors"


@dataclasses.dataclass(frozen=True)
class Layer:
    ln1_w: np.ndarray        # [H]
    ln1_b: np.ndarray        # [H]
    qkv: np.ndarray          # [3H, H]  rows: Q block | K block | V block, each head-major
    norm_factor: np.float32  # attention score scale (1/sqrt(head dim) in the published model)
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
    pooler_w: np.ndarray | None = None   # [head_dim, H]  classification only
    pooler_b: np.ndarray | None = None   # [head_dim]
    head_w: np.ndarray | None = None     # [C, head_dim or H]
    head_b: np.ndarray | None = None     # [C]
    decoder: object | None = None        # int8 precision: the MLM decoder, a quant.QLinear of word


def read_engine_config(folder: Path) -> Config:
    """engine.json -> Config, every value checked (the file may have been edited by hand)."""
    path = Path(folder) / ENGINE_CONFIG
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read engine config: {e.strerror or e}") from None
    meta = parse_json(text, path)
    if not isinstance(meta, dict) or meta.get("format") != ENGINE_FORMAT:
        raise CheckpointError(f"{path}: not a ufcpu engine config")
    if meta.get("version") != ENGINE_VERSION:
        raise CheckpointError(f"{path}: engine format version {meta.get('version')!r}, this ufcpu reads "
                              f"version {ENGINE_VERSION}: convert the checkpoint again")
    try:
        cfg = Config.from_json(meta["config"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: malformed engine config ({e})") from None
    check_config(cfg, str(path))
    return cfg


def load_weights(folder: Path, cfg: Config) -> Weights:
    """Map engine.safetensors and check every tensor against the shapes the config predicts."""
    from weights_convert.convert import engine_shapes

    path = folder / ENGINE_WEIGHTS
    t = open_tensors(path)
    want = engine_shapes(cfg)
    missing = sorted(want.keys() - t.keys())
    extra = sorted(t.keys() - want.keys())
    if missing or extra:
        raise CheckpointError(f"{path}: tensors do not match the config "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, shape in want.items():
        if t[name].dtype != np.float32 or t[name].shape != shape:
            raise CheckpointError(f"{path}: tensor {name!r} is {t[name].dtype}{list(t[name].shape)}, "
                                  f"expected float32{list(shape)}")
        if not t[name].flags.aligned:   # only a hand-made file can do this; ours pad the header to 8
            raise CheckpointError(f"{path}: tensor {name!r} is not aligned to 4 bytes: convert the "
                                  "checkpoint again")
    layers = tuple(
        Layer(ln1_w=t[f"layer.{i}.ln1.w"], ln1_b=t[f"layer.{i}.ln1.b"], qkv=t[f"layer.{i}.qkv"],
              norm_factor=np.float32(t[f"layer.{i}.norm_factor"][0]), attn_out=t[f"layer.{i}.attn_out"],
              ln2_w=t[f"layer.{i}.ln2.w"], ln2_b=t[f"layer.{i}.ln2.b"], w_in=t[f"layer.{i}.fff.w_in"],
              b_in=t[f"layer.{i}.fff.b_in"], w_out=t[f"layer.{i}.fff.w_out"])
        for i in range(cfg.layers))
    return Weights(word=t["embed.word"], pos_scale=np.float32(t["embed.pos_scale"][0]),
                   emb_ln_w=t["embed.norm.w"], emb_ln_b=t["embed.norm.b"], layers=layers,
                   final_ln_w=t["final.ln.w"], final_ln_b=t["final.ln.b"],
                   pooler_w=t.get("pooler.w"), pooler_b=t.get("pooler.b"),
                   head_w=t.get("head.w"), head_b=t.get("head.b"))


def check_finite(w: Weights, source: str) -> None:
    """Optional full scan (it reads every byte): NaN/inf weights are refused by tensor name.
    Chunked, so a scan of a memory-mapped 755 MB checkpoint needs no 755 MB temporary."""
    named: dict[str, np.ndarray] = {}
    for f in dataclasses.fields(Weights):
        value = getattr(w, f.name)
        if f.name == "layers" or value is None:
            continue
        named[f.name] = np.asarray(value)
    for i, layer in enumerate(w.layers):
        for f in dataclasses.fields(Layer):
            named[f"layers.{i}.{f.name}"] = np.asarray(getattr(layer, f.name))
    for name, a in named.items():
        flat = a.reshape(-1)
        for start in range(0, flat.size, 1 << 22):
            chunk = flat[start:start + (1 << 22)]
            if not np.isfinite(chunk).all():
                bad = start + int(np.flatnonzero(~np.isfinite(chunk))[0])
                raise CheckpointError(f"{source}: tensor {name} holds NaN or inf values "
                                      f"(first at flat index {bad}: {flat[bad]})")
