"""The UltraFastBERT encoder with a dense feedforward as a small PyTorch module (CPU, eager).

Why not the reference code: it needs the crammedBERT package and computes the FFF densely with a
mask; this module is the plain encoder a PyTorch user would write for the same computation, on
ufcpu's converted weights: LayerNorm, fused QKV Linear, scaled_dot_product_attention with the
additive -10000 key mask, output Linear, dense GELU feedforward, final LayerNorm.

Only this file and bench/encoder.py import torch; it is an optional extra.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dense import DenseFF
from ufcpu import kernels
from ufcpu.model import sinusoidal_positions


def _t(a) -> torch.Tensor:
    """A float32 torch copy (weights may be read-only memory maps: never share their pages)."""
    return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))


class TorchEncoder(torch.nn.Module):
    def __init__(self, weights, cfg, dense: list[DenseFF]):
        super().__init__()
        self.heads, self.eps, self.hidden = cfg.heads, cfg.norm_eps, cfg.hidden
        self.word = _t(weights.word)                                                   # [V, H]
        self.pos = _t(weights.pos_scale * sinusoidal_positions(cfg.max_seq, cfg.hidden))  # [max_seq, H]
        self.emb_ln = (_t(weights.emb_ln_w), _t(weights.emb_ln_b))
        self.final_ln = (_t(weights.final_ln_w), _t(weights.final_ln_b))
        self.layers = [dict(ln1=(_t(ly.ln1_w), _t(ly.ln1_b)), qkv=_t(ly.qkv), scale=float(ly.norm_factor),
                            attn_out=_t(ly.attn_out), ln2=(_t(ly.ln2_w), _t(ly.ln2_b)),
                            w1=_t(ff.w1), b1=None if ff.b1 is None else _t(ff.b1), w2=_t(ff.w2))
                       for ly, ff in zip(weights.layers, dense)]

    def _ln(self, x, wb):
        return F.layer_norm(x, (self.hidden,), wb[0], wb[1], self.eps)

    def _attention(self, h, bias, ly):  # [B, S, H], [B, 1, 1, S] -> [B, S, H]
        b, s, hid = h.shape
        qkv = F.linear(h, ly["qkv"]).view(b, s, 3, self.heads, hid // self.heads).permute(2, 0, 3, 1, 4)
        ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias, scale=ly["scale"])
        return F.linear(ctx.transpose(1, 2).reshape(b, s, hid), ly["attn_out"])

    def _feedforward(self, h, ly):  # [B, S, H] -> [B, S, H]
        return F.linear(F.gelu(F.linear(h, ly["w1"], ly["b1"])), ly["w2"])

    def forward(self, ids, mask):  # [B, S] int64, [B, S] int64 -> [B, S, H]
        x = self._ln(self.word[ids] + self.pos[: ids.shape[1]], self.emb_ln)
        bias = ((1.0 - mask.to(torch.float32)) * float(kernels.MASK_BIAS))[:, None, None, :]
        for ly in self.layers:
            x = x + self._attention(self._ln(x, ly["ln1"]), bias, ly)
            x = x + self._feedforward(self._ln(x, ly["ln2"]), ly)
        return self._ln(x, self.final_ln)


def runner(weights, cfg, dense: list[DenseFF], threads: int):
    """-> run(ids, mask) -> np.ndarray [B, S, H], with `threads` intra-op threads."""
    torch.set_num_threads(threads)
    model = TorchEncoder(weights, cfg, dense).eval()

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    return run
