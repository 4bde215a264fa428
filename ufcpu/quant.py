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
import hashlib
import logging
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

from . import kernels, layout, threads
from .config import Config
from .errors import CheckpointError, InputError
from .safetensors_io import open_tensors
from .weights import Weights

log = logging.getLogger("ufcpu")

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


def _run_rows(x, q: QLinear, out):
    x8, xs = quantize_activations(x, 0)
    threads.run(kernels.matmul_s8_rows, x8, xs, q.data, q.scale, out)


def _run_vnni(x, q: QLinear, out):  # quantized and multiplied in one launch
    x8 = np.empty((x.shape[0], padded(x.shape[1], kernels.INT8_K_ALIGN)), np.uint8)
    threads.run(kernels.linear_s8_vnni, x, x8, np.empty(x.shape[0], f32), q.data, q.scale, q.wsum, out)


@dataclasses.dataclass(frozen=True)
class Product:
    kernel: object     # the kernels.py function
    pack: object       # wq [N, Kp] int8 -> (data, wsum)
    run: object        # (x float32 [M, K], QLinear, out) -> None: out = the product, x quantized on the way
    max_k: int | None  # widest K it computes exactly, None: any
    zero: int          # the stored value of an activation 0: 0 for s8 activations, 128 for u8


# int8 product name -> kernel and layout, fastest first; `available()` keeps those this CPU runs
# (kernels.INT8_FEATURE). AMX would go first here: this engine has no AMX path yet.
PRODUCTS = {
    "avx512_vnni": Product(kernels.matmul_s8_vnni, pack_vnni, _run_vnni, None, int(kernels.U8_BIAS)),
    "portable": Product(kernels.matmul_s8_rows, pack_rows, _run_rows, kernels.S8_FLOAT_K, 0),
}


def available() -> list[str]:
    """-> the int8 products this CPU runs, fastest first."""
    runs = kernels.int8_kernels()
    return [name for name, p in PRODUCTS.items() if p.kernel in runs]


def quantize(w: np.ndarray, product: str | None = None) -> QLinear:  # [N, K] float32 -> QLinear
    runs = available()
    name = product or runs[0]
    if name not in runs:   # its instructions may not exist here: never compile or call it
        raise InputError(f"int8 product {name!r} does not run on this CPU; it runs {', '.join(runs)}")
    p = PRODUCTS[name]
    n, k = w.shape
    if p.max_k is not None and k > p.max_k:
        raise CheckpointError(f"int8 on this CPU ({name} product) takes at most {p.max_k} inputs per "
                              f"projection, this model has {k}: use precision='float32'")
    wq, scale = quantize_matrix(w)
    data, wsum = p.pack(wq)
    return QLinear(n=n, k=k, product=name, data=data, scale=scale, wsum=wsum)


ACTIVATIONS = {0: np.int8, int(kernels.U8_BIAS): np.uint8}   # zero -> the activations' dtype


def quantize_activations(x: np.ndarray, zero: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[M, K] -> xq [M, Kp] (int8, or uint8 = int8 + 128 for zero 128), scale [M]."""
    xq = np.empty((x.shape[0], padded(x.shape[1], kernels.INT8_K_ALIGN)), ACTIVATIONS[zero])
    scale = np.empty(x.shape[0], f32)
    threads.run(kernels.quantize_rows, x, xq, scale, zero)
    return xq, scale


def linear(x: np.ndarray, q: QLinear) -> np.ndarray:  # [M, K] float32, QLinear [N, K] -> [M, N] float32
    """x @ w.T with x quantized per token and w per output channel."""
    x = np.ascontiguousarray(x, f32)
    out = np.empty((x.shape[0], q.n), f32)
    if x.shape[0] == 0:
        return out
    PRODUCTS[q.product].run(x, q, out)
    return out


def dense(x: np.ndarray, w) -> np.ndarray:  # [M, K], [N, K] float32 or QLinear -> [M, N]
    """x @ w.T for the heads: OpenBLAS for a float32 matrix (as in float32 precision), else int8."""
    if isinstance(w, QLinear):
        return linear(x.reshape(-1, x.shape[-1]), w).reshape(x.shape[:-1] + (w.n,))
    return x @ w.T


# --- the int8 weight file -----------------------------------------------------------------------------
# Quantizing the full model takes 0.6-2 s here (bench/README.md), a load's budget: it is done once and
# kept as `engine-int8-<product>.safetensors` in the engine folder (else, if that is read-only, in
# the ufcpu cache), memory-mapped on later loads. Its `key` tensor holds the format version and the
# engine file's size and modification time: a file of another version or of an edited engine is
# quantized again. Written to a temporary sibling and renamed, so a reader never sees half a file.

INT8_VERSION = 2   # 2: VNNI columns packed in blocks of 48 (was 64)
INT8_KEY = "key"


def _projections(w: Weights, cfg: Config) -> dict[str, np.ndarray]:  # name -> float32 [N, K]
    named = {}
    for i, layer in enumerate(w.layers):
        named[f"layer.{i}.qkv"] = layer.qkv
        named[f"layer.{i}.attn_out"] = layer.attn_out
    if cfg.task == "mlm":
        named["decoder"] = w.word
    if w.pooler_w is not None:
        named["pooler_w"] = w.pooler_w
    return named


def _with(w: Weights, q: dict[str, QLinear]) -> Weights:
    layers = tuple(dataclasses.replace(layer, qkv=q[f"layer.{i}.qkv"], attn_out=q[f"layer.{i}.attn_out"])
                   for i, layer in enumerate(w.layers))
    extra = {k: q[k] for k in ("decoder", "pooler_w") if k in q}
    return dataclasses.replace(w, layers=layers, **extra)


def int8_weights(w: Weights, cfg: Config, product: str | None = None) -> Weights:
    """The same weights with every int8 projection quantized: each layer's qkv and attn_out, the
    MLM decoder (a quantized copy of the word embedding, which the embedding lookup keeps
    reading in float32) and the classifier's dense layer."""
    return _with(w, {name: quantize(a, product) for name, a in _projections(w, cfg).items()})


def _key(engine_file: Path) -> np.ndarray:
    st = engine_file.stat()
    return np.array([INT8_VERSION, st.st_size, st.st_mtime_ns], np.int64)


def int8_file(engine_dir: Path, product: str) -> Path:
    """Beside the engine if its folder is writable, else in the ufcpu cache (one folder per engine)."""
    name = layout.INT8_FILES[layout.INT8_PRODUCTS.index(product)]
    if os.access(engine_dir, os.W_OK):
        return engine_dir / name
    from .hub import cache_dir
    tag = hashlib.sha256(str(engine_dir.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "int8" / tag / name


def _read(path: Path, key: np.ndarray, w: Weights, cfg: Config, product: str) -> Weights | None:
    """The cached weights if the file is there, of this version and engine, and every tensor has
    the shape quantize() gives; else None."""
    try:
        t = open_tensors(path)
    except CheckpointError:
        return None
    if INT8_KEY not in t or t[INT8_KEY].dtype != np.int64 or not np.array_equal(t[INT8_KEY], key):
        return None
    q = {}
    for name, a in _projections(w, cfg).items():
        n, k = a.shape
        want = _layout(product, n, k)
        got = [t.get(f"{name}.{part}") for part in ("data", "scale", "wsum")]
        if any(g is None or (g.dtype, g.shape) != spec for g, spec in zip(got, want)):
            return None
        q[name] = QLinear(n=n, k=k, product=product, data=got[0], scale=got[1], wsum=got[2])
    return _with(w, q)


def _layout(product: str, n: int, k: int) -> list[tuple]:  # -> (dtype, shape) of data, scale, wsum
    kp = padded(k, kernels.INT8_K_ALIGN)
    if product == "avx512_vnni":
        data = (padded(max(n, 1), kernels.VNNI_COLS) // kernels.VNNI_GROUP, kp // 4, kernels.VNNI_GROUP, 4)
        return [(np.dtype(np.int8), data), (np.dtype(f32), (n,)), (np.dtype(np.int32), (n,))]
    return [(np.dtype(np.int8), (n, kp)), (np.dtype(f32), (n,)), (np.dtype(np.int32), (1,))]


def _write(path: Path, key: np.ndarray, quantized: dict[str, QLinear]) -> None:
    from safetensors.numpy import save_file
    tensors = {INT8_KEY: key}
    for name, q in quantized.items():
        tensors.update({f"{name}.data": q.data, f"{name}.scale": q.scale, f"{name}.wsum": q.wsum})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".partial-", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp and save_file make it 0600: honour the umask instead
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cached_int8_weights(w: Weights, cfg: Config, engine_dir: Path, product: str | None = None) -> Weights:
    """int8_weights, memory-mapped from the int8 file when it is current, else computed and written
    there (an unwritable place only costs the quantization at every load)."""
    product = product or available()[0]
    engine_dir = Path(engine_dir)
    key = _key(engine_dir / layout.WEIGHTS_FILE)
    path = int8_file(engine_dir, product)
    cached = _read(path, key, w, cfg, product)
    if cached is not None:
        return cached
    quantized = {name: quantize(a, product) for name, a in _projections(w, cfg).items()}
    try:
        _write(path, key, quantized)
    except OSError as e:
        log.warning("could not keep the int8 weights in %s (%s): they are quantized at every load", path, e)
        return _with(w, quantized)
    return _read(path, key, w, cfg, product) or _with(w, quantized)   # mapped, as the float32 weights are


PRECISIONS = {  # precision -> (float32 weights, config, engine folder) -> the weights it runs
    "float32": lambda w, cfg, engine_dir: w,
    "int8": cached_int8_weights,
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
