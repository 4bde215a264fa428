"""What sits on top of the encoder's hidden states: pooling, the MLM head, the classifier head."""
from __future__ import annotations

import numpy as np

from . import quant
from .config import Config
from .errors import InputError
from .weights import Weights

f32 = np.float32


# --- pooling: one table for encode, the command line, corpora, Ray and the classifier ---------------
# Every pooler maps hidden states [B, S, H] and their mask [B, S] to one row per item, computed on
# that item's real tokens only (so a text's result never depends on its batch's padding).

def mean_pool(h: np.ndarray, mask: np.ndarray) -> np.ndarray:  # [B, S, H], [B, S] -> [B, H]
    """Mean over real tokens only."""
    m = mask.astype(f32)[:, :, None]
    return (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), f32(1.0))


def first_pool(h: np.ndarray, mask: np.ndarray) -> np.ndarray:  # [B, S, H] -> [B, H]
    return h[:, 0].copy()


def token_rows(h: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:  # [B, S, H] -> B x [n_i, H]
    """No pooling: each item's real token vectors."""
    return [h[i, :int(mask[i].sum())].copy() for i in range(h.shape[0])]


def _lse(h: np.ndarray) -> np.ndarray:  # [n, H] -> [H]
    m = h.max(axis=0)
    return m + np.log(np.exp(h - m).sum(axis=0))


def _per_item(fn):
    """A pooler over one item's real tokens [n, H] -> [H], lifted to a batch."""
    return lambda h, mask: np.stack([fn(x) for x in token_rows(h, mask)]).astype(f32)


POOLING = {
    "mean": mean_pool,
    "first": first_pool,
    "none": token_rows,
    "max": _per_item(lambda x: x.max(axis=0)),
    "lse": _per_item(_lse),
}
POOLING_ALIASES = {"avg": "mean", "zero_index": "first"}   # the classifier configs' names
ENCODE_POOLING = ("mean", "first", "none")                  # what encode, the CLI and corpora offer
RAGGED_POOLING = ("none",)                                  # a list of [n_i, H] per text, not one vector


def pooling_name(name, offered: tuple[str, ...] = ENCODE_POOLING) -> str:
    """A pooling name or alias -> its name in POOLING, or an InputError listing the offered ones."""
    key = POOLING_ALIASES.get(name, name) if isinstance(name, str) else None
    if key not in offered:
        raise InputError(f"pooling must be one of {', '.join(offered)}; got {name!r}")
    return key


def l2_normalize(x: np.ndarray) -> np.ndarray:  # [..., H] -> [..., H]
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, f32(1e-12))


# --- masked language modelling ----------------------------------------------------------------------

def mlm_logits(h: np.ndarray, w: Weights) -> np.ndarray:  # [..., H] -> [..., V]
    """The decoder is tied to the word embedding, no transform, no bias (int8: its quantized copy)."""
    return quant.dense(h, w.word if w.decoder is None else w.decoder)


def softmax(x: np.ndarray) -> np.ndarray:  # [..., K] -> [..., K]
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --- sequence classification -------------------------------------------------------------------------
# The reference pools over all S positions of a padded batch (so its results move with padding);
# we pool one item's real positions, which is what the reference gives for that item alone.

def classify_pooled(pooled: np.ndarray, w: Weights, cfg: Config) -> np.ndarray:  # [B, H] -> [B, C]
    """pooled -> tanh(dense(pooled)) (dense only if the head has one) -> logits."""
    if cfg.include_ff_layer:
        pooled = quant.dense(pooled, w.pooler_w) + w.pooler_b
    return np.tanh(pooled) @ w.head_w.T + w.head_b


def probabilities(logits: np.ndarray) -> np.ndarray:  # [B, C] -> [B, C]
    """Softmax over labels; a single-output head is a binary (sigmoid) score."""
    if logits.shape[-1] == 1:
        return 1.0 / (1.0 + np.exp(-logits))
    return softmax(logits)
