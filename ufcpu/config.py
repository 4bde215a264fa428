"""The engine's config: the model's shape and options, and the checks every engine config passes.

A converted folder's engine.json holds one (`Config.to_json`); the conversion builds it from the
Hub's config.json (`weights_convert/hub_config.py`). `check_config` runs once per load or
conversion, so that no kernel sees a size it could index out of bounds with.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .errors import CheckpointError

POOLERS = ("zero_index", "avg", "max", "lse")
TASKS = ("mlm", "classification")
MAX_DEPTH = 24
# The positions are sinusoidal, so any length could be computed, but attention is quadratic in it:
# a longer setting is refused rather than allocating gigabytes of scores for one text.
MAX_SEQ = 8192


@dataclasses.dataclass(frozen=True)
class Config:
    layers: int                 # transformer layers (16 for 1x11-long)
    hidden: int                 # model width H (768)
    heads: int                  # attention heads (12); head_size = hidden // heads
    depth: int                  # FFF tree depth D: 2^(D+1)-1 nodes, D+1 visited per token (11)
    vocab: int                  # word-embedding rows (32768)
    max_seq: int = 128          # positions the model was trained with (at most MAX_SEQ); longer input is truncated
    norm_eps: float = 1e-12     # every LayerNorm
    task: str = "mlm"           # "mlm" (pretraining head) or "classification"
    pooler: str = "avg"         # classification: how hidden states become one vector
    include_ff_layer: bool = True   # classification: dense+tanh after pooling
    cls_dense_width: int = 1024     # classification: width of that dense layer (Hub: classification_head.head_dim)
    num_labels: int | None = None   # classification: taken from head.weight's shape, not arch
    id2label: tuple[str, ...] | None = None

    @property
    def nodes(self) -> int:
        return 2 ** (self.depth + 1) - 1

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["id2label"] = list(self.id2label) if self.id2label is not None else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Config":
        """Inverse of to_json. Raises TypeError on unknown or missing keys; values are checked by
        check_config, not here."""
        if not isinstance(d, dict):
            raise TypeError(f"expected an object, got {type(d).__name__}")
        d = dict(d)
        if d.get("id2label") is not None:
            if not isinstance(d["id2label"], list):
                raise TypeError(f"id2label must be a list, got {type(d['id2label']).__name__}")
            d["id2label"] = tuple(d["id2label"])
        return cls(**d)


def parse_json(text: str | bytes, path: str | Path) -> Any:
    """json.loads with every way it can fail turned into a CheckpointError naming the file:
    syntax errors, integers longer than Python allows, nesting deeper than the recursion limit."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except ValueError as e:   # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise CheckpointError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None


def short_repr(v: Any) -> str:
    """repr for a one-line message, cut if long (a config value can be any JSON)."""
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_config(cfg: Config, source: str) -> None:
    """Refuse a Config whose values could make a kernel index out of bounds or mean nothing:
    every size a positive integer, the tree depth and positions in range, the head split exact.
    A converted folder's engine.json is checked with this as well (it may have been edited by hand)."""
    for name in ("layers", "hidden", "heads", "vocab", "max_seq", "cls_dense_width"):
        v = getattr(cfg, name)
        if not is_int(v) or v <= 0:
            raise CheckpointError(f"{source}: {name} must be a positive integer, got {short_repr(v)}")
    if cfg.max_seq > MAX_SEQ:
        raise CheckpointError(f"{source}: max_seq {cfg.max_seq} is more positions than this engine "
                              f"supports ({MAX_SEQ})")
    if not is_int(cfg.depth) or not 0 <= cfg.depth <= MAX_DEPTH:
        raise CheckpointError(f"{source}: depth must be an integer in 0..{MAX_DEPTH}, got {short_repr(cfg.depth)}")
    if cfg.hidden % 2 or cfg.hidden % cfg.heads or (cfg.hidden // cfg.heads) % 2:
        raise CheckpointError(f"{source}: hidden size {cfg.hidden} is not divisible into {cfg.heads} heads "
                              "of even size")
    if not is_number(cfg.norm_eps) or not math.isfinite(cfg.norm_eps) or cfg.norm_eps < 0:
        raise CheckpointError(f"{source}: norm_eps must be a non-negative number, got {short_repr(cfg.norm_eps)}")
    if cfg.task not in TASKS:
        raise CheckpointError(f"{source}: task {short_repr(cfg.task)} is not supported (one of {TASKS})")
    if cfg.pooler not in POOLERS:
        raise CheckpointError(f"{source}: pooler {short_repr(cfg.pooler)} is not supported (one of {POOLERS})")
    if not isinstance(cfg.include_ff_layer, bool):
        raise CheckpointError(f"{source}: include_ff_layer must be true or false, got {short_repr(cfg.include_ff_layer)}")
    if cfg.task == "classification":
        if not is_int(cfg.num_labels) or cfg.num_labels <= 0:
            raise CheckpointError(f"{source}: num_labels must be a positive integer, got {short_repr(cfg.num_labels)}")
    elif cfg.num_labels is not None and (not is_int(cfg.num_labels) or cfg.num_labels <= 0):
        raise CheckpointError(f"{source}: num_labels must be a positive integer or null, got {short_repr(cfg.num_labels)}")
    if cfg.id2label is not None:
        if not all(isinstance(x, str) for x in cfg.id2label):
            raise CheckpointError(f"{source}: id2label must hold strings")
        if cfg.num_labels is not None and len(cfg.id2label) != cfg.num_labels:
            raise CheckpointError(f"{source}: id2label has {len(cfg.id2label)} labels, the head {cfg.num_labels}")
