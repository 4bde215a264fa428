"""The model's shape and options, read once from a checkpoint's config.json.

The Hub checkpoint keeps everything under `config["arch"]` (crammedBERT's hydra config). We read
only what changes the computation, and refuse what this engine does not implement instead of
computing something else silently.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .errors import CheckpointError

ARCH_MLM = "ScriptableLMForPreTraining"
ARCH_CLS = "ScriptableLMForSequenceClassification"
POOLERS = ("zero_index", "avg", "max", "lse")


@dataclasses.dataclass(frozen=True)
class Config:
    layers: int                 # transformer layers (16 for 1x11-long)
    hidden: int                 # model width H (768)
    heads: int                  # attention heads (12); head dim = hidden // heads
    depth: int                  # FFF tree depth D: 2^(D+1)-1 nodes, D+1 visited per token (11)
    vocab: int                  # word-embedding rows (32768)
    max_seq: int = 128          # positions the model was trained with; longer input is truncated
    norm_eps: float = 1e-12     # every LayerNorm
    task: str = "mlm"           # "mlm" (pretraining head) or "classification"
    pooler: str = "avg"         # classification: how hidden states become one vector
    include_ff_layer: bool = True   # classification: dense+tanh after pooling
    head_dim: int = 1024        # classification: width of that dense layer
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
        d = dict(d)
        if d.get("id2label") is not None:
            d["id2label"] = tuple(d["id2label"])
        return cls(**d)


def _get(d: dict, path: str, source: str, default: Any = KeyError) -> Any:
    """d["a"]["b"] for path "a.b", with an error that names the missing key."""
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            if default is KeyError:
                raise CheckpointError(f"{source}: missing key 'arch.{path}'")
            return default
        cur = cur[part]
    return cur


# (key under arch, value this engine implements): anything else is refused by name.
_REQUIRED_VALUES = (
    ("intermed_type", "fff"),
    ("intermed_size", 1),
    ("norm", "LayerNorm"),
    ("norm_scheme", "pre"),
    ("nonlin", "GELU"),
    ("use_bias", False),
    ("decoder_bias", False),
    ("final_norm", True),
    ("skip_head_transform", True),
    ("embedding.pos_embedding", "scaled-sinusoidal"),
    ("attention.qkv_bias", False),
    ("attention.rotary_embedding", False),
    ("attention.causal_attention", False),
    ("attention.skip_output_projection", False),
    ("attention.type", "self-attention"),
)


def read_hub_config(path: str | Path) -> dict[str, Any]:
    """Parse config.json, with errors that name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return cfg


def config_from_hub(cfg: dict[str, Any], source: str = "config.json") -> Config:
    """Build a Config from a Hub config.json dict; refuse unsupported variants by name."""
    model_type = cfg.get("model_type")
    if model_type != "crammedBERT":
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported (expected 'crammedBERT')")
    archs = cfg.get("architectures") or [ARCH_MLM]
    if not isinstance(archs, list) or archs[0] not in (ARCH_MLM, ARCH_CLS):
        raise CheckpointError(f"{source}: architecture {archs!r} is not supported "
                              f"(expected {ARCH_MLM} or {ARCH_CLS})")
    arch = cfg.get("arch")
    if not isinstance(arch, dict):
        raise CheckpointError(f"{source}: missing the 'arch' section")
    for key, want in _REQUIRED_VALUES:
        got = _get(arch, key, source, default=want)
        if got != want:
            raise CheckpointError(f"{source}: arch.{key} = {got!r} is not supported (this engine implements {want!r})")

    def positive_int(key: str) -> int:
        v = _get(arch, key, source)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise CheckpointError(f"{source}: arch.{key} must be a positive integer, got {v!r}")
        return v

    hidden = positive_int("hidden_size")
    emb_dim = _get(arch, "embedding.embedding_dim", source, default=hidden)
    if emb_dim != hidden:
        raise CheckpointError(f"{source}: embedding_dim {emb_dim} != hidden_size {hidden} is not supported")
    heads = positive_int("attention.num_attention_heads")
    if hidden % heads or (hidden // heads) % 2:
        raise CheckpointError(f"{source}: hidden_size {hidden} is not divisible into {heads} heads")
    if hidden % 2:
        raise CheckpointError(f"{source}: hidden_size {hidden} must be even (sinusoidal positions)")
    depth = _get(arch, "intermed_depth", source)
    if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= 24:
        raise CheckpointError(f"{source}: arch.intermed_depth must be an integer in 0..24, got {depth!r}")
    eps = _get(arch, "norm_eps", source, default=1e-12)
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise CheckpointError(f"{source}: arch.norm_eps must be a non-negative number, got {eps!r}")

    task = "classification" if archs[0] == ARCH_CLS else "mlm"
    head = arch.get("classification_head") or {}
    pooler = head.get("pooler", "avg")
    if task == "classification" and pooler not in POOLERS:
        raise CheckpointError(f"{source}: classification_head.pooler {pooler!r} is not supported (one of {POOLERS})")
    if task == "classification" and head.get("nonlin", "Tanh") != "Tanh":
        raise CheckpointError(f"{source}: classification_head.nonlin {head.get('nonlin')!r} is not supported "
                              "(this engine implements 'Tanh')")
    id2label = cfg.get("id2label")
    if isinstance(id2label, dict):
        try:
            id2label = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
        except (ValueError, TypeError):
            raise CheckpointError(f"{source}: id2label keys must be integers") from None
    else:
        id2label = None
    return Config(
        layers=positive_int("num_transformer_layers"),
        hidden=hidden,
        heads=heads,
        depth=depth,
        vocab=positive_int("embedding.vocab_size"),
        max_seq=positive_int("embedding.max_seq_length"),
        norm_eps=float(eps),
        task=task,
        pooler=pooler,
        include_ff_layer=bool(head.get("include_ff_layer", True)),
        head_dim=int(head.get("head_dim", 1024)),
        num_labels=None,
        id2label=id2label,
    )
