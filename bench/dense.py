"""Dense feedforward layers for the baselines, in NumPy (BLAS GEMMs) with ufcpu's own GELU.

Two dense widths are compared with the FFF tree:
- "equal": width N = 4095, the FFF's own parameters used densely: GELU(y @ w_in.T + b_in) @ w_out.
  Equal parameter count; the paper's baseline. (Unlike "dense-masked", nothing is masked: every
  node contributes, so the output differs from the FFF; only the cost is compared.)
- "crammed": width 4H = 3072 with random weights and no bias: the cost of the dense crammedBERT
  feedforward that UltraFastBERT replaces (a user's alternative model).

The same functions serve the FF-layer benchmark and, through `encoder_ffn`, the encoder benchmark,
where they plug into `ufcpu.model.encoder(..., ffn=...)`.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ufcpu import kernels, threads

f32 = np.float32
CRAMMED_SEED = 1234   # the 3072-wide random weights: every engine and worker regenerates the same ones


@dataclasses.dataclass(frozen=True)
class DenseFF:
    w1: np.ndarray              # [F, H]   y @ w1.T: Linear weight, as torch and the Hub store it
    b1: np.ndarray | None       # [F]      only the "equal" variant has one (the FFF's node bias)
    w2: np.ndarray              # [H, F]   Linear weight of the output projection

    @property
    def width(self) -> int:
        return self.w1.shape[0]


def dense_ff(y: np.ndarray, ff: DenseFF) -> np.ndarray:  # [T, H] -> [T, H]
    """GELU(y @ w1.T + b1) @ w2.T: two GEMMs and an exact (erf) GELU, as a dense FF layer runs."""
    g = y @ ff.w1.T                                  # [T, F]
    if ff.b1 is not None:
        g += ff.b1
    threads.run(kernels.gelu_, g)                    # with ufcpu's helper threads, as the engine's kernels
    return g @ ff.w2.T                               # [T, H]


def equal_params(w_in: np.ndarray, b_in: np.ndarray, w_out: np.ndarray) -> DenseFF:
    """The FFF layer's weights (engine layout: w_in [N, H], w_out node-major [N, H]) as a dense FF;
    no copy: w2 is a transposed view, so w2.T is w_out itself."""
    return DenseFF(w1=w_in, b1=b_in, w2=w_out.T)


def random_crammed(layers: int, hidden: int, width: int | None = None, seed: int = CRAMMED_SEED) -> list[DenseFF]:
    """crammedBERT-like dense FFs: width 4H, no bias, N(0, 1/fan_in) weights (the same init scale
    as the project's random checkpoints), one independent stream per layer."""
    width = width or 4 * hidden
    out = []
    for i in range(layers):
        rng = np.random.default_rng([seed, i])
        w1 = rng.standard_normal((width, hidden), dtype=f32) * f32(1 / math.sqrt(hidden))
        w2 = rng.standard_normal((hidden, width), dtype=f32) * f32(1 / math.sqrt(width))
        out.append(DenseFF(w1=w1, b1=None, w2=w2))
    return out


def dense_layers(weights, kind: str, seed: int = CRAMMED_SEED) -> list[DenseFF]:
    """One DenseFF per layer of a loaded ufcpu model's weights: kind "equal" or "crammed"."""
    if kind == "equal":
        return [equal_params(layer.w_in, layer.b_in, layer.w_out) for layer in weights.layers]
    if kind == "crammed":
        return random_crammed(len(weights.layers), weights.layers[0].w_in.shape[1], seed=seed)
    raise ValueError(f"dense kind must be 'equal' or 'crammed', got {kind!r}")


def encoder_ffn(weights, dense: list[DenseFF]):
    """An `ffn(h, layer, cfg)` for ufcpu.model.encoder that replaces each layer's FFF by the
    dense FF of the same index. Layers are matched by identity (Layer holds arrays, so it is
    neither hashable nor comparable by value)."""
    by_layer = {id(layer): ff for layer, ff in zip(weights.layers, dense)}

    def ffn(h: np.ndarray, layer, cfg) -> np.ndarray:  # [B, S, H] -> [B, S, H]
        return dense_ff(h.reshape(-1, h.shape[-1]), by_layer[id(layer)]).reshape(h.shape)
    return ffn
