"""The engine layout, declared once: the files of a converted folder, the format name and version,
and every engine tensor with the `Weights`/`Layer` field it fills and its shape as a function of
the config.

The loader (`weights.py`) reads this declaration and the converter (`weights_convert/convert.py`)
writes exactly what it declares. How a published tensor becomes an engine tensor is declared here
too (`REORDER`), because it defines what the engine's bytes mean:

- attention's fused QKV weight is stored per head interleaved (head j owns 3 x head_size rows: Q,
  then K, then V); the engine groups the rows Q-block | K-block | V-block, each head-major, so one
  GEMM gives [S, 3H] whose thirds reshape straight to [S, heads, head_size].
- the FFF output weight is [H, N] (column n = node n's output vector); the engine stores it
  node-major [N, H], so a visited node's vector is one contiguous row.
- scalars are stored as [1] arrays and read back as float32 scalars.

Change anything here and bump VERSION: folders written under another version are converted again.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from .config import Config

FORMAT = "ufcpu-engine"
VERSION = 3                        # 3: data and every tensor of a multiple of 64 bytes 64-byte aligned; 2: engine.json maps names to the source
CONFIG_FILE = "engine.json"        # format, version, config, source file and tensor names; written last
WEIGHTS_FILE = "engine.safetensors"
TOKENIZER_FILE = "tokenizer.json"

# The published checkpoint's files that a conversion reads (weights: the first one present).
SOURCE_CONFIG = "config.json"
SOURCE_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.pth", "pytorch_model.pth")
SOURCE_COPIED = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", SOURCE_CONFIG)
# Written beside the engine on its first int8 load (ufcpu/quant.py), one per int8 product.
INT8_PRODUCTS = ("avx512_vnni", "portable")
INT8_FILES = tuple(f"engine-int8-{p}.safetensors" for p in INT8_PRODUCTS)
# What ufcpu writes into an engine folder: nothing else in it is ufcpu's to replace.
WRITTEN_FILES = (WEIGHTS_FILE, *SOURCE_COPIED, CONFIG_FILE, *INT8_FILES)

Shape = Callable[[Config], tuple]


def _qkv_grouped(a: np.ndarray, c: Config) -> np.ndarray:  # [3H, H] per-head interleaved -> grouped
    return a.reshape(c.heads, 3, c.head_size, c.hidden).transpose(1, 0, 2, 3).reshape(3 * c.hidden, c.hidden)


@dataclasses.dataclass(frozen=True)
class Reorder:
    forward: Callable[[np.ndarray, Config], np.ndarray]   # source tensor -> engine tensor (same elements)
    source_shape: Callable[[tuple], tuple]                 # engine shape -> the source's shape


REORDER = {
    "same": Reorder(lambda a, c: a, lambda s: s),
    "scalar": Reorder(lambda a, c: a.reshape(1), lambda s: (1,)),        # [] or [1] -> [1]
    "qkv_grouped": Reorder(_qkv_grouped, lambda s: s),
    "node_major": Reorder(lambda a, c: a.T, lambda s: s[::-1]),          # [H, N] -> [N, H]
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str            # engine tensor name; "{i}" is the layer index
    field: str           # the Weights field (or Layer field, for per-layer tensors) it fills
    shape: Shape         # engine shape, from the config
    reorder: str = "same"

    @property
    def scalar(self) -> bool:   # stored [1], the field holds an np.float32
        return self.reorder == "scalar"


DTYPE = np.dtype("<f4")   # every engine tensor

EMBEDDING = (
    TensorSpec("embed.word", "word", lambda c: (c.vocab, c.hidden)),
    TensorSpec("embed.pos_scale", "pos_scale", lambda c: (1,), "scalar"),
    TensorSpec("embed.norm.w", "emb_ln_w", lambda c: (c.hidden,)),
    TensorSpec("embed.norm.b", "emb_ln_b", lambda c: (c.hidden,)),
)
LAYER = (
    TensorSpec("layer.{i}.ln1.w", "ln1_w", lambda c: (c.hidden,)),
    TensorSpec("layer.{i}.ln1.b", "ln1_b", lambda c: (c.hidden,)),
    TensorSpec("layer.{i}.qkv", "qkv", lambda c: (3 * c.hidden, c.hidden), "qkv_grouped"),
    TensorSpec("layer.{i}.norm_factor", "norm_factor", lambda c: (1,), "scalar"),
    TensorSpec("layer.{i}.attn_out", "attn_out", lambda c: (c.hidden, c.hidden)),
    TensorSpec("layer.{i}.ln2.w", "ln2_w", lambda c: (c.hidden,)),
    TensorSpec("layer.{i}.ln2.b", "ln2_b", lambda c: (c.hidden,)),
    TensorSpec("layer.{i}.fff.w_in", "w_in", lambda c: (c.nodes, c.hidden)),
    TensorSpec("layer.{i}.fff.b_in", "b_in", lambda c: (c.nodes,)),
    TensorSpec("layer.{i}.fff.w_out", "w_out", lambda c: (c.nodes, c.hidden), "node_major"),
)
FINAL = (
    TensorSpec("final.ln.w", "final_ln_w", lambda c: (c.hidden,)),
    TensorSpec("final.ln.b", "final_ln_b", lambda c: (c.hidden,)),
)
CLS_POOLER = (   # classification with include_ff_layer only
    TensorSpec("pooler.w", "pooler_w", lambda c: (c.cls_dense_width, c.hidden)),
    TensorSpec("pooler.b", "pooler_b", lambda c: (c.cls_dense_width,)),
)
CLS_HEAD = (     # classification: C = num_labels, taken from the head's own shape at conversion
    TensorSpec("head.w", "head_w", lambda c: (c.num_labels, c.cls_dense_width if c.include_ff_layer else c.hidden)),
    TensorSpec("head.b", "head_b", lambda c: (c.num_labels,)),
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One engine tensor of one config: its name in engine.safetensors and where it goes."""
    name: str
    spec: TensorSpec
    layer: int | None    # None: a Weights field; else the index of the Layer it belongs to
    shape: tuple


def top_specs(cfg: Config) -> tuple[TensorSpec, ...]:
    """The non-layer tensors of this config, in file order (layers come between EMBEDDING and FINAL)."""
    head = ()
    if cfg.task == "classification":
        head = (CLS_POOLER if cfg.include_ff_layer else ()) + CLS_HEAD
    return EMBEDDING + FINAL + head


def tensor_count(cfg: Config) -> int:
    """How many tensors this config's engine file holds, without listing them (the layer count may
    be absurd: compare this with a file's count before any per-layer work)."""
    return len(top_specs(cfg)) + cfg.layers * len(LAYER)


def entries(cfg: Config) -> list[Entry]:
    """Every engine tensor of this config, in the order the converter writes them."""
    out = [Entry(s.name, s, None, s.shape(cfg)) for s in EMBEDDING]
    for i in range(cfg.layers):
        out += [Entry(s.name.format(i=i), s, i, s.shape(cfg)) for s in LAYER]
    out += [Entry(s.name, s, None, s.shape(cfg)) for s in top_specs(cfg)[len(EMBEDDING):]]
    return out


def to_engine(a: np.ndarray, spec: TensorSpec, cfg: Config) -> np.ndarray:
    """A source tensor (any float dtype, published layout) -> the engine tensor: float32, C-contiguous."""
    return np.ascontiguousarray(REORDER[spec.reorder].forward(np.asarray(a, dtype=DTYPE), cfg))


def source_index(flat: int, entry: Entry, cfg: Config) -> int:
    """The flat index in the source tensor of the engine tensor's element `flat`, to name a
    position in the user's file. Builds an index array: for error messages only."""
    r = REORDER[entry.spec.reorder]
    idx = np.arange(int(np.prod(entry.shape, dtype=np.int64)), dtype=np.int64).reshape(r.source_shape(entry.shape))
    return int(np.ascontiguousarray(r.forward(idx, cfg)).reshape(-1)[flat])
