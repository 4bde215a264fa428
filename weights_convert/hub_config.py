"""Hub config.json -> the engine's Config: the translation and the values this engine requires.

The Hub checkpoint keeps everything under `config["arch"]` (crammedBERT's hydra config). We read
only what changes the computation, and refuse what this engine does not implement instead of
computing something else silently. Only the converter reads a Hub config; the engine reads the
converted folder's engine.json.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ufcpu.config import MAX_DEPTH, MAX_SEQ, POOLERS, Config, is_int, is_number, parse_json, short_repr
from ufcpu.errors import CheckpointError

log = logging.getLogger("ufcpu")

ARCH_MLM = "ScriptableLMForPreTraining"
ARCH_CLS = "ScriptableLMForSequenceClassification"


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


def config_from_hub(cfg: dict[str, Any], source: str = "config.json") -> Config:
    """Build a Config from a Hub config.json dict; refuse unsupported variants by name."""
    model_type = cfg.get("model_type")
    if model_type != "crammedBERT":
        raise CheckpointError(f"{source}: model_type {short_repr(model_type)} is not supported (expected 'crammedBERT')")
    archs = cfg.get("architectures") or [ARCH_MLM]
    if not isinstance(archs, list) or archs[0] not in (ARCH_MLM, ARCH_CLS):
        raise CheckpointError(f"{source}: architecture {short_repr(archs)} is not supported "
                              f"(expected {ARCH_MLM} or {ARCH_CLS})")
    arch = cfg.get("arch")
    if not isinstance(arch, dict):
        raise CheckpointError(f"{source}: missing the 'arch' section")
    for key, want in _REQUIRED_VALUES:
        got = _get(arch, key, source, default=want)
        if got != want or type(got) is not type(want):
            what = f" ({_FEATURE_NAMES[key]})" if key in _FEATURE_NAMES else ""
            raise CheckpointError(f"{source}: arch.{key} = {short_repr(got)} is not supported{what}; "
                                  f"this engine implements {short_repr(want)}")

    def positive_int(key: str) -> int:
        v = _get(arch, key, source)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise CheckpointError(f"{source}: arch.{key} must be a positive integer, got {short_repr(v)}")
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
    if not is_int(depth) or not 0 <= depth <= MAX_DEPTH:
        raise CheckpointError(f"{source}: arch.intermed_depth must be an integer in 0..{MAX_DEPTH}, got {short_repr(depth)}")
    eps = _get(arch, "norm_eps", source, default=1e-12)
    if not is_number(eps) or not math.isfinite(eps) or eps < 0:
        raise CheckpointError(f"{source}: arch.norm_eps must be a non-negative number, got {short_repr(eps)}")

    max_seq = positive_int("embedding.max_seq_length")
    if max_seq > MAX_SEQ:   # the positions are sinusoidal, but attention is quadratic in the length
        raise CheckpointError(f"{source}: arch.embedding.max_seq_length = {max_seq} is more positions than this "
                              f"engine supports (at most {MAX_SEQ})")

    task = "classification" if archs[0] == ARCH_CLS else "mlm"
    pooler, include_ff_layer, dense_width = "avg", True, 1024
    if task == "classification":   # the head options mean nothing to an MLM checkpoint: not read there
        head = arch.get("classification_head")
        if head is None:
            head = {}
        if not isinstance(head, dict):
            raise CheckpointError(f"{source}: arch.classification_head must be an object, got {short_repr(head)}")
        pooler = head.get("pooler", "avg")
        if pooler not in POOLERS:
            raise CheckpointError(f"{source}: classification_head.pooler {short_repr(pooler)} is not supported (one of {POOLERS})")
        if head.get("nonlin", "Tanh") != "Tanh":
            raise CheckpointError(f"{source}: classification_head.nonlin {short_repr(head.get('nonlin'))} is not supported "
                                  "(this engine implements 'Tanh')")
        include_ff_layer = head.get("include_ff_layer", True)
        if not isinstance(include_ff_layer, bool):
            raise CheckpointError(f"{source}: classification_head.include_ff_layer must be true or false, "
                                  f"got {short_repr(include_ff_layer)}")
        dense_width = head.get("head_dim", 1024)
        if not is_int(dense_width) or dense_width <= 0:
            raise CheckpointError(f"{source}: classification_head.head_dim must be a positive integer, "
                                  f"got {short_repr(dense_width)}")
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
        max_seq=max_seq,
        norm_eps=float(eps),
        task=task,
        pooler=pooler,
        include_ff_layer=include_ff_layer,
        cls_dense_width=dense_width,
        num_labels=None,
        id2label=id2label,
    )
    return out


def with_label_count(cfg: Config, hub_cfg: dict[str, Any], head_shape: tuple, source: str,
                     weights_source: str) -> Config:
    """Fill in what only the tensors know: a classifier's label count C, from head.weight [C, width].
    A config.json that says otherwise (arch.num_labels, id2label) is warned about, with the numbers;
    an id2label of the wrong length is dropped (labels are then LABEL_0..)."""
    if cfg.task != "classification":
        return cfg
    if len(head_shape) != 2 or head_shape[0] < 1:
        raise CheckpointError(f"{weights_source}: tensor 'head.weight' has shape {list(head_shape)}, "
                              "expected [num_labels >= 1, width]")
    c = int(head_shape[0])
    arch = hub_cfg.get("arch") if isinstance(hub_cfg.get("arch"), dict) else {}
    # the reference saves arch.num_labels but builds its head from the HF config's own num_labels
    for key, declared in (("arch.num_labels", arch.get("num_labels")), ("num_labels", hub_cfg.get("num_labels"))):
        if declared is not None and declared != c:
            log.warning("%s: %s is %s but the head has %d outputs (head.weight): using %d", source, key,
                        short_repr(declared), c, c)
    id2label = cfg.id2label
    if id2label is not None and len(id2label) != c:
        log.warning("%s: id2label has %d labels but the head has %d outputs (head.weight): labels dropped (LABEL_0..)",
                    source, len(id2label), c)
        id2label = None
    return Config(**{**cfg.__dict__, "num_labels": c, "id2label": id2label})
