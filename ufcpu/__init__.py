"""ufcpu: torch-free CPU inference for UltraFastBERT, running the fast feedforward tree walk.

    import ufcpu
    model = ufcpu.load()                     # pbelcak/UltraFastBERT-1x11-long, or a local folder
    vecs = model.encode(["a sentence", "another one"])   # float32 [2, 768]
    model.fill_mask("The capital of France is <mask>.")
"""
from __future__ import annotations

# First, before NumPy loads OpenBLAS: ufcpu/settings.py sets what OpenBLAS reads only then.
from . import settings  # noqa: E402,F401  (isort: skip)

import numpy as np  # noqa: E402

from .engine import Model, load  # noqa: E402
from .errors import CacheError, CheckpointError, InputError, UfcpuError, UnsafePickleError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "Model", "fff_forward", "CacheError", "CheckpointError", "InputError", "UfcpuError",
           "UnsafePickleError", "__version__"]


def fff_forward(x, w_in, b_in, w_out) -> np.ndarray:
    """One fast-feedforward layer: x [T, H], w_in [N, H], b_in [N], w_out [N, H] (row n is node
    n's output vector), one tree of depth log2(N+1)-1, routing right only when z > 0, exact GELU.
    -> [T, H] float32. Only the D+1 visited nodes of each token are read."""
    from . import model

    x, w_in, b_in, w_out = (np.ascontiguousarray(a, dtype=np.float32) for a in (x, w_in, b_in, w_out))
    if x.ndim != 2 or w_in.ndim != 2 or b_in.ndim != 1 or w_out.ndim != 2:
        raise InputError("fff_forward expects x [T, H], w_in [N, H], b_in [N], w_out [N, H]")
    t, h = x.shape
    n = w_in.shape[0]
    if w_in.shape != (n, h) or b_in.shape != (n,) or w_out.shape != (n, h):
        raise InputError(f"fff_forward shapes disagree: x {x.shape}, w_in {w_in.shape}, "
                         f"b_in {b_in.shape}, w_out {w_out.shape}")
    depth = (n + 1).bit_length() - 2
    if n < 1 or 2 ** (depth + 1) - 1 != n:
        raise InputError(f"fff_forward needs N = 2^(D+1)-1 nodes (a full binary tree), got N = {n}")
    return model.fff(x, w_in, b_in, w_out, depth)[0]
