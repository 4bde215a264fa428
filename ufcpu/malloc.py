"""Keep freed activation memory in the process, so a forward pass does not fault it in again.

glibc's malloc serves large blocks with a fresh mmap() and unmaps them on free() (above a
threshold that starts at 128 KB), and trims the top of its heap when more than a few MB there are
free. A forward pass allocates and frees the same arrays (1-40 MB each) in every layer, so every
layer touched fresh pages: about 4,400 page faults per layer at 8 x 128 tokens, 12-17 ms of a
50 ms layer on this project's 2-core virtual machines (bench/README.md). Raising the mmap
threshold to glibc's ceiling (32 MB) and the trim threshold to 256 MB lets freed blocks be reused
in place: no faults, the same layer in 37 ms.

The cost: up to 256 MB of freed heap stays resident after a large batch, as it would with the
caching allocators of other inference engines. It is a process-wide glibc setting, made once when
a model is loaded; set UFCPU_MALLOC_TUNING=0 to leave malloc alone. On a C library without mallopt
(musl, macOS, Windows) nothing changes.
"""
from __future__ import annotations

import ctypes
import functools
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
SETTINGS = {M_MMAP_THRESHOLD: 32 << 20,    # glibc's ceiling on 64-bit (4 MiB * sizeof(long))
            M_TRIM_THRESHOLD: 256 << 20}


def enabled() -> bool:
    return os.environ.get("UFCPU_MALLOC_TUNING", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Apply SETTINGS through glibc's mallopt, once per process. -> True when they took effect."""
    if not enabled():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
