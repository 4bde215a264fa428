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
    ("attention.sequence_op", "torch-softmax"),   # others (exp, relu, none) change the attention
    ("ffn_layer_frequency", 1),                    # a feedforward in every layer
    ("embedding.normalization", True),             # the embedding LayerNorm
)
_FEATURE_NAMES = {
    "intermed_type": "dense feedforward layers (this engine runs fast feedforward trees only)",
    "intermed_size": "several parallel trees per layer",
    "attention.rotary_embedding": "rotary embeddings",
    "attention.causal_attention": "causal attention",
    "embedding.pos_embedding": "this kind of position embedding",
}
TASKS = ("mlm", "classification")
MAX_DEPTH = 24


def read_hub_config(path: str | Path) -> dict[str, Any]:
    """Parse config.json, with errors that name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    cfg = parse_json(text, path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


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


def config_from_hub(cfg: dict[str, Any], source: str = "config.json") -> Config:
    """Build a Config from a Hub config.json dict; refuse unsupported variants by name."""
    model_type = cfg.get("model_type")
    if model_type != "crammedBERT":
        raise CheckpointError(f"{source}: model_type {_r(model_type)} is not supported (expected 'crammedBERT')")
    archs = cfg.get("architectures") or [ARCH_MLM]
    if not isinstance(archs, list) or archs[0] not in (ARCH_MLM, ARCH_CLS):
        raise CheckpointError(f"{source}: architecture {_r(archs)} is not supported "
                              f"(expected {ARCH_MLM} or {ARCH_CLS})")
    arch = cfg.get("arch")
    if not isinstance(arch, dict):
        raise CheckpointError(f"{source}: missing the 'arch' section")
    for key, want in _REQUIRED_VALUES:
        got = _get(arch, key, source, default=want)
        if got != want or type(got) is not type(want):
            what = f" ({_FEATURE_NAMES[key]})" if key in _FEATURE_NAMES else ""
            raise CheckpointError(f"{source}: arch.{key} = {_r(got)} is not supported{what}; "
                                  f"this engine implements {_r(want)}")

    def positive_int(key: str) -> int:
        v = _get(arch, key, source)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise CheckpointError(f"{source}: arch.{key} must be a positive integer, got {_r(v)}")
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
    if not _is_int(depth) or not 0 <= depth <= MAX_DEPTH:
        raise CheckpointError(f"{source}: arch.intermed_depth must be an integer in 0..{MAX_DEPTH}, got {_r(depth)}")
    eps = _get(arch, "norm_eps", source, default=1e-12)
    if not _is_number(eps) or not math.isfinite(eps) or eps < 0:
        raise CheckpointError(f"{source}: arch.norm_eps must be a non-negative number, got {_r(eps)}")

    task = "classification" if archs[0] == ARCH_CLS else "mlm"
    pooler, include_ff_layer, head_dim = "avg", True, 1024
    if task == "classification":   # the head options mean nothing to an MLM checkpoint: not read there
        head = arch.get("classification_head")
        if head is None:
            head = {}
        if not isinstance(head, dict):
            raise CheckpointError(f"{source}: arch.classification_head must be an object, got {_r(head)}")
        pooler = head.get("pooler", "avg")
        if pooler not in POOLERS:
            raise CheckpointError(f"{source}: classification_head.pooler {_r(pooler)} is not supported (one of {POOLERS})")
        if head.get("nonlin", "Tanh") != "Tanh":
            raise CheckpointError(f"{source}: classification_head.nonlin {_r(head.get('nonlin'))} is not supported "
                                  "(this engine implements 'Tanh')")
        include_ff_layer = head.get("include_ff_layer", True)
        if not isinstance(include_ff_layer, bool):
            raise CheckpointError(f"{source}: classification_head.include_ff_layer must be true or false, "
                                  f"got {_r(include_ff_layer)}")
        head_dim = head.get("head_dim", 1024)
        if not _is_int(head_dim) or head_dim <= 0:
            raise CheckpointError(f"{source}: classification_head.head_dim must be a positive integer, got {_r(head_dim)}")
    id2label = cfg.get("id2label")
    if isinstance(id2label, dict) and id2label:
        try:
            keys = sorted(id2label, key=int)
        except (ValueError, TypeError):
            raise CheckpointError(f"{source}: id2label keys must be integers") from None
        if [int(k) for k in keys] != list(range(len(keys))):
            raise CheckpointError(f"{source}: id2label keys must be 0..{len(keys) - 1}, got {keys[:5]}")
        id2label = tuple(str(id2label[k]) for k in keys)
    else:
        id2label = None
    out = Config(
        layers=positive_int("num_transformer_layers"),
        hidden=hidden,
        heads=heads,
        depth=depth,
        vocab=positive_int("embedding.vocab_size"),
        max_seq=positive_int("embedding.max_seq_length"),
        norm_eps=float(eps),
        task=task,
        pooler=pooler,
        include_ff_layer=include_ff_layer,
        head_dim=head_dim,
        num_labels=None,
        id2label=id2label,
    )
    check_config(out, source, need_labels=False)
    return out


def _r(v: Any) -> str:
    """repr for a one-line message, cut if long (a config value can be any JSON)."""
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_config(cfg: Config, source: str, need_labels: bool = True) -> None:
    """Refuse a Config whose values could make a kernel index out of bounds or mean nothing:
    every size a positive integer, the tree depth in range, the head split exact. A converted
    folder's engine.json is checked with this as well (it may have been edited by hand)."""
    for name in ("layers", "hidden", "heads", "vocab", "max_seq", "head_dim"):
        v = getattr(cfg, name)
        if not _is_int(v) or v <= 0:
            raise CheckpointError(f"{source}: {name} must be a positive integer, got {_r(v)}")
    if not _is_int(cfg.depth) or not 0 <= cfg.depth <= MAX_DEPTH:
        raise CheckpointError(f"{source}: depth must be an integer in 0..{MAX_DEPTH}, got {_r(cfg.depth)}")
    if cfg.hidden % 2 or cfg.hidden % cfg.heads or (cfg.hidden // cfg.heads) % 2:
        raise CheckpointError(f"{source}: hidden size {cfg.hidden} is not divisible into {cfg.heads} heads "
                              "of even size")
    if not _is_number(cfg.norm_eps) or not math.isfinite(cfg.norm_eps) or cfg.norm_eps < 0:
        raise CheckpointError(f"{source}: norm_eps must be a non-negative number, got {_r(cfg.norm_eps)}")
    if cfg.task not in TASKS:
        raise CheckpointError(f"{source}: task {_r(cfg.task)} is not supported (one of {TASKS})")
    if cfg.pooler not in POOLERS:
        raise CheckpointError(f"{source}: pooler {_r(cfg.pooler)} is not supported (one of {POOLERS})")
    if not isinstance(cfg.include_ff_layer, bool):
        raise CheckpointError(f"{source}: include_ff_layer must be true or false, got {_r(cfg.include_ff_layer)}")
    if cfg.task == "classification" and need_labels:
        if not _is_int(cfg.num_labels) or cfg.num_labels <= 0:
            raise CheckpointError(f"{source}: num_labels must be a positive integer, got {_r(cfg.num_labels)}")
    elif cfg.num_labels is not None and (not _is_int(cfg.num_labels) or cfg.num_labels <= 0):
        raise CheckpointError(f"{source}: num_labels must be a positive integer or null, got {_r(cfg.num_labels)}")
    if cfg.id2label is not None:
        if not all(isinstance(x, str) for x in cfg.id2label):
            raise CheckpointError(f"{source}: id2label must hold strings")
        if cfg.num_labels is not None and len(cfg.id2label) != cfg.num_labels:
            raise CheckpointError(f"{source}: id2label has {len(cfg.id2label)} labels, the head {cfg.num_labels}")
