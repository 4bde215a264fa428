"""The UltraFastBERT forward pass, as small pure functions (see MODEL.md, "Forward pass").

Notation: B sequences, S tokens, H width, A heads of size d = H / A, N = 2^(D+1)-1 tree nodes.
Dense products go through NumPy (BLAS); the tree walk, LayerNorm and attention's scores, softmax
and context are Numba kernels (ufcpu/kernels.py). Everything is float32.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from . import kernels, quant, threads
from .config import Config
from .weights import Layer, Weights

f32 = np.float32


# --- embedding ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def sinusoidal_positions(s: int, h: int) -> np.ndarray:  # -> [S, H], read-only
    """pe[p, 2i] = sin(p * div_i), pe[p, 2i+1] = cos(p * div_i), interleaved. Computed in float32
    step by step, as the reference does, so the rounding matches it."""
    div = np.exp(np.arange(0, h, 2, dtype=f32) * f32(-math.log(10000.0) / h))  # [H/2]
    angle = np.arange(s, dtype=f32)[:, None] * div[None, :]                   # [S, H/2]
    pe = np.empty((s, h), f32)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle)
    pe.flags.writeable = False
    return pe


# From this many rows the activations the walk reads and writes start on a cache line: the aligned
# allocation costs about 1 us more, which a sentence's walk does not win back (bench/README.md).
ALIGNED_MIN_ROWS = 64


def empty_aligned(shape: tuple) -> np.ndarray:  # -> an uninitialised float32 array, its first element on a cache line
    """With rows of a multiple of 64 bytes (H = 768: 3072), every row starts on a cache line, so
    the walk's full-width loads of a row and of its weight rows (aligned in the engine file) split
    none. NumPy allocates (it asks the OS for huge pages for large arrays; a fresh 50 MB output
    faulted in 4 KB pages cost the walk half as much again)."""
    n = math.prod(shape)
    buf = np.empty(n + kernels.ALIGN // 4, f32)
    start = kernels.lanes_to_align(buf)
    return buf[start:start + n].reshape(shape)


def rows_like(x: np.ndarray) -> np.ndarray:  # [T, H] -> an uninitialised float32 [T, H]
    return np.empty(x.shape, f32) if x.shape[0] < ALIGNED_MIN_ROWS else empty_aligned(x.shape)


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:  # [..., H] -> [..., H]
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    out = rows_like(flat)
    threads.run(kernels.layer_norm, flat, w, b, f32(eps), out)
    return out.reshape(x.shape)


def add_layer_norm(x: np.ndarray, d: np.ndarray, w: np.ndarray, b: np.ndarray,
                   eps: float) -> tuple[np.ndarray, np.ndarray]:  # [..., H] x2 -> (x + d, LayerNorm(x + d))
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    s, out = rows_like(flat), rows_like(flat)
    threads.run(kernels.add_layer_norm, flat, np.ascontiguousarray(d, f32).reshape(flat.shape), w, b, f32(eps), s, out)
    return s.reshape(x.shape), out.reshape(x.shape)


def embed(ids: np.ndarray, w: Weights, cfg: Config) -> np.ndarray:  # [B, S] -> [B, S, H]
    x = w.word[ids] + w.pos_scale * sinusoidal_positions(ids.shape[1], cfg.hidden)
    return layer_norm(x, w.emb_ln_w, w.emb_ln_b, cfg.norm_eps)


# --- attention ------------------------------------------------------------------------------------

def key_bias(mask: np.ndarray) -> np.ndarray:  # [B, S] of 0/1 -> [B, S] additive score bias
    """The reference adds (1 - mask) * -10000 to every score of a padded key (not -inf)."""
    return (f32(1.0) - mask.astype(f32)) * kernels.MASK_BIAS


# Up to this many tokens a projection runs in kernels.matmul_nt, beyond it in OpenBLAS, which
# wins on large products; one token is a GEMV, where OpenBLAS wins too (bench/README.md,
# "Projections of a few tokens").
SMALL_PRODUCT_TOKENS = 128


def linear(x: np.ndarray, w) -> np.ndarray:  # [M, K], [N, K] (as torch's Linear) -> [M, N]
    """x @ w.T; w a float32 array, or a quant.QLinear (int8 precision)"""
    if isinstance(w, quant.QLinear):
        return quant.linear(x, w)
    if not 2 <= x.shape[0] <= SMALL_PRODUCT_TOKENS:
        return x @ w.T
    out = np.empty((x.shape[0], w.shape[0]), f32)
    threads.run(kernels.matmul_nt, np.ascontiguousarray(x), w, out)
    return out


def spans(lengths: np.ndarray, stride: int | None = None) -> np.ndarray:  # [n] -> [n, 2] int64
    """Each sequence's (first row, length) in the [T, ...] rows of a batch: one after another, or
    every `stride` rows (a padded batch)."""
    lengths = np.asarray(lengths, np.int64)
    first = (np.arange(len(lengths), dtype=np.int64) * stride if stride is not None
             else np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64))
    return np.stack([first, lengths], axis=1)


def self_attention(qkv: np.ndarray, seqs: np.ndarray, bias: np.ndarray, layer: Layer, cfg: Config) -> np.ndarray:
    """[T, 3H] Q | K | V, seqs [n, 2] (first row, length) of n sequences, [n, S] additive key bias
    -> context [T, H] (feature = head*d + i): scores, softmax and context in one kernel launch for
    every sequence, of any lengths."""
    ctx = np.empty((qkv.shape[0], cfg.hidden), f32)
    if ctx.size:
        threads.run(kernels.attention_heads, np.ascontiguousarray(qkv), seqs, np.ascontiguousarray(bias, f32),
                    layer.norm_factor, cfg.heads, ctx)
    return ctx


def attention(h: np.ndarray, seqs: np.ndarray, bias: np.ndarray, layer: Layer, cfg: Config) -> np.ndarray:
    """[..., H] (the rows of `seqs`' sequences) -> [..., H]"""
    x = h.reshape(-1, h.shape[-1])
    qkv = linear(x, layer.qkv)                                      # [T, 3H]
    ctx = self_attention(qkv, seqs, bias, layer, cfg)               # [T, H]
    return linear(ctx, layer.attn_out).reshape(h.shape)


# --- fast feedforward -----------------------------------------------------------------------------

def fff(y: np.ndarray, w_in: np.ndarray, b_in: np.ndarray, w_out: np.ndarray,
        depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[T, H] -> out [T, H], routes [T, D+1] (int32 node ids), logits [T, D+1] (z on the path)."""
    t = y.shape[0]
    out = rows_like(y)
    routes = np.empty((t, depth + 1), np.int32)
    logits = np.empty((t, depth + 1), f32)
    threads.run(kernels.fff_walk, y, w_in, b_in, w_out, depth, out, routes, logits)
    return out, routes, logits


def feedforward(h: np.ndarray, layer: Layer, cfg: Config) -> np.ndarray:  # [B, S, H] -> [B, S, H]
    out, _, _ = fff(h.reshape(-1, cfg.hidden), layer.w_in, layer.b_in, layer.w_out, cfg.depth)
    return out.reshape(h.shape)


def feedforward_dense_masked(h: np.ndarray, layer: Layer, cfg: Config) -> np.ndarray:  # [B, S, H] -> [B, S, H]
    """What the published Hub code does: all N node logits by GEMM, GELU on every node, the
    nodes off each token's path masked to zero, then a GEMM with all N output vectors. Same
    result as the walk, at the cost of a dense N-wide feedforward. Kept for the benchmark
    ("what Hub users get today") and as an independent check of the walk."""
    y = h.reshape(-1, cfg.hidden)
    z = y @ layer.w_in.T + layer.b_in                                  # [T, N]
    t = np.arange(y.shape[0])
    on_path = np.zeros(z.shape, bool)
    node = np.zeros(y.shape[0], np.int64)
    for _ in range(cfg.depth + 1):
        on_path[t, node] = True
        node = 2 * node + 1 + (z[t, node] > 0)
    g = np.where(on_path, z, f32(0.0))
    threads.run(kernels.gelu_, g)                                      # GELU(0) = 0 off the path
    return (g @ layer.w_out).reshape(h.shape)


FFN = {"fff": feedforward, "dense-masked": feedforward_dense_masked}


# --- the encoder ----------------------------------------------------------------------------------

def block(x: np.ndarray, h: np.ndarray, attend, layer: Layer, after: tuple, cfg: Config,
          ffn=feedforward) -> tuple[np.ndarray, np.ndarray]:
    """One pre-LN layer: x [..., H] and h = its first LayerNorm of x -> (the layer's output x',
    LayerNorm `after` = (weight, bias) of x': the next layer's first, or the final one). Each
    residual add runs with the LayerNorm that follows it. attend(h, layer, cfg) is the attention
    of h, padded ([B, S, H]) or packed ([T, H])."""
    x, h = add_layer_norm(x, attend(h, layer, cfg), layer.ln2_w, layer.ln2_b, cfg.norm_eps)
    return add_layer_norm(x, ffn(h, layer, cfg), *after, cfg.norm_eps)


def layers(x: np.ndarray, attend, w: Weights, cfg: Config, ffn, on_layer) -> np.ndarray:  # [..., H] -> [..., H]
    """The embedding's output through every layer -> the final LayerNorm's output; on_layer(x)
    sees each layer's output."""
    norms = [(layer.ln1_w, layer.ln1_b) for layer in w.layers] + [(w.final_ln_w, w.final_ln_b)]
    h = layer_norm(x, *norms[0], cfg.norm_eps)
    for layer, after in zip(w.layers, norms[1:]):
        x, h = block(x, h, attend, layer, after, cfg, ffn)
        if on_layer:
            on_layer(x)
    return h


# Packed batches. Every layer but attention works token by token, so a batch of right-padded
# sequences runs on its real tokens only, concatenated [T, H], and attention runs on each sequence's
# own rows (one launch for the batch, whatever its lengths). A padded key's score gets -10000 in the reference, whose
# exp is exactly 0 in float32: leaving padded keys out changes no result. Padding costs nothing
# then: 48 texts of 8-81 tokens batched by 32 were 37% padding.

def packed_lengths(mask: np.ndarray) -> np.ndarray | None:
    """[B, S] 0/1 mask -> each row's length, if every row is ones then zeros (right padding, as the
    tokenizer pads) and holds a token; else None (such a batch runs padded)."""
    m = mask.astype(bool)
    if m.size == 0 or not m[:, 0].all() or (m[:, 1:] & ~m[:, :-1]).any():
        return None
    return m.sum(axis=1)


def unpack(real: np.ndarray, tokens: np.ndarray) -> np.ndarray:  # [B, S] bool, [T, ...] -> [B, S, ...]
    """Per-token values of a packed batch back at their positions, zeros at padded ones."""
    full = np.zeros(real.shape + tokens.shape[1:], tokens.dtype)
    full[real] = tokens
    return full


def encoder(ids: np.ndarray, mask: np.ndarray, w: Weights, cfg: Config, ffn=feedforward) -> np.ndarray:
    """Final hidden states [B, S, H] from ids and mask [B, S]: embedding, the pre-LN layers, the
    final LayerNorm. `ffn(h, layer, cfg)` computes each layer's feedforward (FFN holds the choices).
    Right-padded batches run packed, and their padded positions hold zeros; other masks run padded."""
    return _encode(ids, mask, w, cfg, ffn)[0]


def _encode(ids, mask, w: Weights, cfg: Config, ffn, on_layer=None) -> tuple[np.ndarray, np.ndarray]:
    """-> (final hidden states [B, S, H], the embedding [B, S, H]); on_layer(x [B, S, H]) sees each
    layer's output."""
    emb = embed(ids, w, cfg)
    lengths = packed_lengths(mask)
    layers = _layers_padded if lengths is None else _layers_packed
    return layers(emb, mask, lengths, w, cfg, ffn, on_layer), emb


def _layers_padded(x, mask, _, w: Weights, cfg: Config, ffn, on_layer) -> np.ndarray:  # [B, S, H] -> [B, S, H]
    b, s, _ = x.shape
    seqs, bias = spans(np.full(b, s), stride=s), key_bias(mask)
    attend = lambda h, layer, cfg: attention(h, seqs, bias, layer, cfg)  # noqa: E731
    return layers(x, attend, w, cfg, ffn, on_layer)


def _layers_packed(x, mask, lengths, w: Weights, cfg: Config, ffn, on_layer) -> np.ndarray:  # [B, S, H] -> [B, S, H]
    real = mask.astype(bool)
    seqs, bias = spans(lengths), np.zeros((len(lengths), int(lengths.max())), f32)   # no padded key
    attend = lambda h, layer, cfg: attention(h, seqs, bias, layer, cfg)  # noqa: E731
    seen = (lambda x: on_layer(unpack(real, x))) if on_layer else None  # noqa: E731
    return unpack(real, layers(x[real], attend, w, cfg, ffn, seen))        # on [T, H]


def encoder_trace(ids: np.ndarray, mask: np.ndarray, w: Weights, cfg: Config) -> dict[str, np.ndarray]:
    """The same pass, keeping what the parity tests compare: the embedding, each layer's output
    [L, B, S, H], and each token's FFF route and path logits [L, B, S, D+1] (real positions; padded
    ones hold zeros when the batch runs packed)."""
    real = mask.astype(bool)
    packed = packed_lengths(mask) is not None
    rec: dict[str, list] = {"layer_out": [], "routes": [], "route_logits": []}

    def recording_fff(h, layer, cfg):
        out, routes, logits = fff(h.reshape(-1, cfg.hidden), layer.w_in, layer.b_in, layer.w_out, cfg.depth)
        for key, v in (("routes", routes), ("route_logits", logits)):
            rec[key].append((unpack(real, v) if packed else v).reshape(ids.shape + (-1,)))
        return out.reshape(h.shape)

    final, emb = _encode(ids, mask, w, cfg, recording_fff, on_layer=rec["layer_out"].append)
    return {"embedding_out": emb, "final_hidden": final, **{k: np.stack(v) for k, v in rec.items()}}
