"""int8 projections: quantized weights, the `QLinear` type and the int8 `linear`.

With `precision="int8"` the QKV and attention-output projections, the MLM decoder (the tied word
embedding) and the classifier's dense layer run as int8 products (kernels.py, "int8 projections"):
- weights: symmetric, per output channel: w[n, k] ~ wq[n, k] * w_scale[n], wq in [-127, 127],
  w_scale[n] = max_k |w[n, k]| / 127;
- activations: symmetric, per token, quantized at every call: x[m, k] ~ xq[m, k] * x_scale[m];
- out[m, n] = (sum_k xq[m, k] wq[n, k]) * x_scale[m] * w_scale[n], the sum exact in int32.
Everything else (embedding, LayerNorm, attention scores and context, softmax, the tree walk,
GELU) stays float32. The kernel is chosen by CPU feature (`PRODUCTS`); its weight layout with it.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import platform

import numpy as np

from . import kernels
from .config import Config
from .errors import CheckpointError
from .weights import Weights

f32 = np.float32


@dataclasses.dataclass(frozen=True)
class QLinear:
    """An int8 weight matrix of N outputs and K inputs (torch's Linear [N, K]), in the layout of
    the product that runs it."""
    n: int
    k: int
    product: str               # a key of PRODUCTS
    data: np.ndarray           # int8, the product's layout (K padded to kernels.INT8_K_ALIGN)
    scale: np.ndarray          # float32 [N]: w ~ wq * scale[:, None]
    wsum: np.ndarray           # int32 [N]: 128 * sum_k wq[n, k] (the u8 offset of VNNI), else [0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k


def padded(k: int, align: int) -> int:
    return -(-k // align) * align


def quantize_matrix(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # [N, K] float32 -> wq [N, Kp] int8, scale [N]
    """Symmetric per-row int8 (per output channel), the same kernel as the activations' per token:
    scale = max|w[n]| / 127, wq = rint(w / scale); K padded with zeros."""
    return quantize_activations(np.ascontiguousarray(w, f32))


def pack_rows(wq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # [N, Kp] -> itself, no offsets
    return wq, np.zeros(1, np.int32)


def pack_vnni(wq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, Kp] -> [Np/16, Kp/4, 16, 4] with N padded with zero rows to kernels.VNNI_COLS (one
    vpdpbusd reads 4 consecutive k of 16 consecutive columns), and 128 * sum_k wq[n, k] [N]."""
    n, kp = wq.shape
    np_ = padded(max(n, 1), kernels.VNNI_COLS)
    full = np.zeros((np_, kp), np.int8)
    full[:n] = wq
    g = kernels.VNNI_GROUP
    packed = np.ascontiguousarray(full.reshape(np_ // g, g, kp // 4, 4).transpose(0, 2, 1, 3))
    return packed, int(kernels.U8_BIAS) * wq.sum(axis=1, dtype=np.int32)


def _run_rows(x8, xs, q: QLinear, out):
    kernels.run(kernels.matmul_s8_rows, x8, xs, q.data, q.scale, out)


def _run_vnni(x8, xs, q: QLinear, out):
    kernels.run(kernels.matmul_s8_vnni, x8, xs, q.data, q.scale, q.wsum, out)


@dataclasses.dataclass(frozen=True)
class Product:
    kernel: object     # the kernels.py function
    pack: object       # wq [N, Kp] int8 -> (data, wsum)
    run: object        # (xq, x_scale, QLinear, out) -> None: out = the product
    max_k: int | None  # widest K it computes exactly, None: any


# int8 product name -> kernel and layout, fastest first; `available()` keeps those this CPU runs
# (kernels.INT8_FEATURE). AMX would go first here: this engine has no AMX path yet.
PRODUCTS = {
    "avx512_vnni": Product(kernels.matmul_s8_vnni, pack_vnni, _run_vnni, None),
    "portable": Product(kernels.matmul_s8_rows, pack_rows, _run_rows, kernels.S8_FLOAT_K),
}


def available() -> list[str]:
    """-> the int8 products this CPU runs, fastest first."""
    runs = kernels.int8_kernels()
    return [name for name, p in PRODUCTS.items() if p.kernel in runs]


def quantize(w: np.ndarray, product: str | None = None) -> QLinear:  # [N, K] float32 -> QLinear
    name = product or available()[0]
    p = PRODUCTS[name]
    n, k = w.shape
    if p.max_k is not None and k > p.max_k:
        raise CheckpointError(f"int8 on this CPU ({name} product) takes at most {p.max_k} inputs per "
                              f"projection, this model has {k}: use precision='float32'")
    wq, scale = quantize_matrix(w)
    data, wsum = p.pack(wq)
    return QLinear(n=n, k=k, product=name, data=data, scale=scale, wsum=wsum)


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # [M, K] -> xq [M, Kp] int8, scale [M]
    xq = np.empty((x.shape[0], padded(x.shape[1], kernels.INT8_K_ALIGN)), np.int8)
    scale = np.empty(x.shape[0], f32)
    kernels.run(kernels.quantize_rows, x, xq, scale)
    return xq, scale


def linear(x: np.ndarray, q: QLinear) -> np.ndarray:  # [M, K] float32, QLinear [N, K] -> [M, N] float32
    """x @ w.T with x quantized per token and w per output channel."""
    x = np.ascontiguousarray(x, f32)
    out = np.empty((x.shape[0], q.n), f32)
    if x.shape[0] == 0:
        return out
    x8, xs = quantize_activations(x)
    PRODUCTS[q.product].run(x8, xs, q, out)
    return out


def dense(x: np.ndarray, w) -> np.ndarray:  # [M, K], [N, K] float32 or QLinear -> [M, N]
    """x @ w.T for the heads: OpenBLAS for a float32 matrix (as in float32 precision), else int8."""
    if isinstance(w, QLinear):
        return linear(x.reshape(-1, x.shape[-1]), w).reshape(x.shape[:-1] + (w.n,))
    return x @ w.T


# --- whole models -----------------------------------------------------------------------------------

def int8_weights(w: Weights, cfg: Config, product: str | None = None) -> Weights:
    """The same weights with every int8 projection quantized: each layer's qkv and attn_out, the
    MLM decoder (a quantized copy of the word embedding, which the embedding lookup keeps
    reading in float32) and the classifier's dense layer."""
    layers = tuple(dataclasses.replace(layer, qkv=quantize(layer.qkv, product),
                                       attn_out=quantize(layer.attn_out, product)) for layer in w.layers)
    extra = {}
    if cfg.task == "mlm":
        extra["decoder"] = quantize(w.word, product)
    if w.pooler_w is not None:
        extra["pooler_w"] = quantize(w.pooler_w, product)
    return dataclasses.replace(w, layers=layers, **extra)


PRECISIONS = {  # precision -> how the loaded float32 weights become the ones it runs
    "float32": lambda w, cfg: w,
    "int8": int8_weights,
}


# --- what this CPU offers ---------------------------------------------------------------------------

def cpu_flags() -> frozenset:
    """The kernel's CPU flags (/proc/cpuinfo), empty where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


ARCH_REQ_XCOMP_PERM = 0x1023   # Linux: ask for permission to use an XSAVE feature
XFEATURE_XTILEDATA = 18        # AMX tile data
SYS_ARCH_PRCTL = 158           # x86_64


def amx_status(flags: frozenset | None = None) -> str:
    """Whether AMX int8 tiles could run here: the CPU must expose amx_tile and amx_int8, and
    Linux must grant the tile state to this process (arch_prctl)."""
    flags = cpu_flags() if flags is None else flags
    if not {"amx_tile", "amx_int8"} <= flags:
        return "not exposed by this CPU"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return "exposed, but permission is only requested on Linux x86_64"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0:
        return f"exposed, but Linux refused the tile state ({os.strerror(ctypes.get_errno())})"
    return "exposed and granted (no AMX kernel in this engine yet)"


def describe() -> dict:
    """For `ufcpu info`: the int8 products this CPU runs (the first is used) and AMX's status."""
    return {"products": available(), "amx": amx_status()}
