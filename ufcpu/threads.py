"""One `threads` setting for both kinds of threads: NumPy's BLAS (OpenBLAS) and ufcpu's own, the
caller plus helper threads that join the Numba kernels (kernels.set_threads, ufcpu/workshare.py).

The two never run at the same time in the forward pass (GEMM, then a kernel, then GEMM), but both
must be told the same limit, or `--threads 1` would still use every core in the GEMMs. OpenBLAS
is found among the loaded shared libraries (as threadpoolctl does, without depending on it); if
it cannot be found (another BLAS), only ufcpu's setting applies and `blas_threads()` says None.

OpenBLAS's idle workers spin for about 0.1 s after every product, on the cores a Numba kernel
launched next needs: after a GEMM, a 2-thread FFF walk of 16384 tokens took 58 ms instead of 33.
ufcpu/__init__.py sets OPENBLAS_THREAD_TIMEOUT=4 (sleep at once) before NumPy loads OpenBLAS;
this works when ufcpu is imported first, and `blas_workers_sleep()` says whether it did.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import numpy as np  # (also loads the BLAS library this module looks for)

from . import kernels
from .errors import InputError

# OpenBLAS builds name their setters differently: NumPy's wheels use the scipy_openblas prefix.
_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_", "openblas_set_num_threads")
_GETTERS = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
            "openblas_get_num_threads64_", "openblas_get_num_threads")


@functools.lru_cache(maxsize=1)
def _openblas():
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        setter = next((getattr(lib, s) for s in _SETTERS if hasattr(lib, s)), None)
        getter = next((getattr(lib, s) for s in _GETTERS if hasattr(lib, s)), None)
        if setter is not None and getter is not None:
            return setter, getter
    return None


def blas_threads() -> int | None:
    lib = _openblas()
    return int(lib[1]()) if lib else None


def available() -> int:
    return kernels.max_threads()


def set_threads(n: int | None) -> int:
    """Use n threads for OpenBLAS and the kernels (None: every core, or NUMBA_NUM_THREADS).
    -> the number set."""
    top = available()
    if n is None:
        n = top
    elif isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"threads must be at least 1, got {n!r} (a whole number of threads)")
    n = min(int(n), top)
    kernels.set_threads(n)
    lib = _openblas()
    if lib:
        lib[0](n)
    return n


@contextlib.contextmanager
def blas_single_threaded():
    """OpenBLAS on one thread inside the block, for small products that ufcpu's own threads run
    side by side; afterwards the calling thread's setting (`kernels.threads()`), which is what
    `set_threads` gave OpenBLAS. OpenBLAS's count is process-wide: a product another Python
    thread runs meanwhile may run on one thread too (the same result, later)."""
    lib = _openblas()
    if lib is None:
        yield
        return
    lib[0](1)
    try:
        yield
    finally:
        lib[0](kernels.threads())


def blas_workers_sleep() -> bool:
    """Whether OpenBLAS was loaded after ufcpu set OPENBLAS_THREAD_TIMEOUT (or the user set it):
    then its idle workers sleep at once instead of spinning next to ufcpu's (ufcpu/__init__.py)."""
    import ufcpu
    return ufcpu.BLAS_SPIN_SETTLED


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
