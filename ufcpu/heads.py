"""What sits on top of the encoder's hidden states: pooling, the MLM head, the classifier head."""
from __future__ import annotations

import numpy as np

from . import quant
from .config import Config
from .weights import Weights

f32 = np.float32


# --- sentence embeddings (encode) ------------------------------------------------------------------

def mean_pool(h: np.ndarray, mask: np.ndarray) -> np.ndarray:  # [B, S, H], [B, S] -> [B, H]
    """Mean over real tokens only."""
    m = mask.astype(f32)[:, :, None]
    return (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), f32(1.0))


def first_pool(h: np.ndarray, mask: np.ndarray) -> np.ndarray:  # [B, S, H] -> [B, H]
    return h[:, 0].copy()


SENTENCE_POOLING = {"mean": mean_pool, "first": first_pool}


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

def _lse(h: np.ndarray) -> np.ndarray:  # [n, H] -> [H]
    m = h.max(axis=0)
    return m + np.log(np.exp(h - m).sum(axis=0))


CLASS_POOLERS = {
    "zero_index": lambda h: h[0],
    "avg": lambda h: h.mean(axis=0),
    "max": lambda h: h.max(axis=0),
    "lse": _lse,
}


def classify_pooled(pooled: np.ndarray, w: Weights, cfg: Config) -> np.ndarray:  # [B, H] -> [B, C]
    """pooled -> tanh(dense(pooled)) (dense only if the head has one) -> logits."""
    if cfg.include_ff_layer:
        pooled = quant.dense(pooled, w.pooler_w) + w.pooler_b
    return np.tanh(pooled) @ w.head_w.T + w.head_b


def pool_items(h: np.ndarray, mask: np.ndarray, pooler: str) -> np.ndarray:  # [B, S, H], [B, S] -> [B, H]
    fn = CLASS_POOLERS[pooler]
    return np.stack([fn(h[i, :int(mask[i].sum())]) for i in range(h.shape[0])]).astype(f32)


def probabilities(logits: np.ndarray) -> np.ndarray:  # [B, C] -> [B, C]
    """Softmax over labels; a single-output head is a binary (sigmoid) score."""
    if logits.shape[-1] == 1:
        return 1.0 / (1.0 + np.exp(-logits))
    return softmax(logits)
