"""What both benchmarks share: optional extras, wall-clock timing, the machine description that goes
into every result file, a streaming-bandwidth probe, peak memory, and writing JSON/markdown.

Why a shared module: the two scripts must describe the machine, time things and report in the same
way, or their numbers cannot be read side by side. Everything here is stdlib + NumPy (+ Numba for
the bandwidth probe, which ufcpu needs anyway); the `[bench]` extras are imported through
`optional()` so that a missing one skips a row or a plot instead of failing the run.
"""
from __future__ import annotations

import ctypes
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

# The smoke test sets this (comma-separated module names) to check that missing extras are
# skipped cleanly even on a machine where they are installed.
WITHOUT_ENV = "UFCPU_BENCH_WITHOUT"

# Environment variables that change what a benchmark measures: recorded, never changed.
ENV_KEYS = ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "NUMBA_CACHE_DIR", "UFCPU_CACHE",
            "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

PACKAGES = ("ufcpu", "numpy", "numba", "llvmlite", "tokenizers", "safetensors", "huggingface-hub",
            "onnx", "onnxruntime", "openvino", "torch", "matplotlib")

# CPU flags that decide which kernels BLAS, Numba, ONNX Runtime and PyTorch can use.
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


# --- optional extras ------------------------------------------------------------------------------

def optional(name: str):
    """Import an optional extra, or None when it is missing (or hidden via UFCPU_BENCH_WITHOUT)."""
    hidden = {m.strip() for m in os.environ.get(WITHOUT_ENV, "").split(",") if m.strip()}
    if name.split(".")[0] in hidden:
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def have(*names: str) -> bool:
    return all(optional(n) is not None for n in names)


# --- timing ---------------------------------------------------------------------------------------

def repeat(fn: Callable[[], object], min_repeats: int, max_repeats: int, budget_s: float,
           enough_s: float = math.inf) -> list[float]:
    """Wall-clock seconds of `fn()` calls: at least min_repeats, then more while the time budget
    lasts (noisy shared machines need several samples for a median that means something). A first
    call longer than `enough_s` is kept alone: it already averages over thousands of tokens, and
    repeating it would blow the run's time budget."""
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
        if len(samples) == 1 and samples[0] > enough_s:
            break
    return samples


def as_engine(a: np.ndarray) -> np.ndarray:  # [R, C] float32 -> a copy that starts on a cache line
    """Rows placed as the engine places them (weights from its file, activations from
    `model.rows_like`): 64-byte aligned, so a bench's walk reads what the engine's reads."""
    from ufcpu import model
    out = model.empty_aligned(a.shape)
    out[...] = a
    out.flags.writeable = a.flags.writeable
    return out


def stats(samples: list[float]) -> dict:
    a = np.asarray(samples, float)
    return {"median_s": float(np.median(a)), "min_s": float(a.min()), "max_s": float(a.max()),
            "p95_s": float(np.percentile(a, 95)), "repeats": int(a.size)}


# --- memory ---------------------------------------------------------------------------------------

def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, so a later peak excludes
    set-up transients (building a graph, copying weights). Linux >= 4.0; False if unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (since the last reset_peak_rss)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


# --- streaming bandwidth --------------------------------------------------------------------------

_sum_kernel = None


def _stream_sum():
    """A parallel read-only sum, compiled on first use (cached in bench/__pycache__, git-ignored)."""
    global _sum_kernel
    if _sum_kernel is None:
        from numba import njit, prange

        @njit(parallel=True, fastmath=True, cache=True)
        def _sum(a):  # [n] float32 -> float32, every element read once
            s = np.float32(0.0)
            for i in prange(a.shape[0]):
                s += a[i]
            return s
        _sum_kernel = _sum
    return _sum_kernel


def stream_bandwidth(nbytes: int, passes: int = 5) -> float:
    """Best observed read bandwidth in GB/s over an array of `nbytes` (as many threads as
    ufcpu's setting in this thread). A working set larger than the last-level cache measures DRAM
    streaming; one the size of a layer's weights measures the cache the hot case runs from. The
    best pass is taken because the result is used as a floor: an optimistic bandwidth makes a
    conservative floor."""
    import numba
    from ufcpu import threads
    numba.set_num_threads(min(threads.count(), numba.config.NUMBA_NUM_THREADS))   # ufcpu's setting
    a = np.ones(max(1, nbytes // 4), np.float32)
    kernel = _stream_sum()
    kernel(a[:1024])
    reps = max(1, int(128e6 // a.nbytes))  # small arrays: several sweeps per timing
    best = math.inf
    for _ in range(passes):
        t = time.perf_counter()
        for _ in range(reps):
            kernel(a)
        best = min(best, (time.perf_counter() - t) / reps)
    return a.nbytes / best / 1e9


# --- machine description --------------------------------------------------------------------------

def _cpuinfo() -> dict:
    info: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = (s.strip() for s in line.split(":", 1))
                    info.setdefault(k, v)
    except OSError:
        pass
    return info


def _caches() -> list[dict]:
    out = []
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for d in sorted(base.glob("index*")):
        try:
            out.append({k: (d / k).read_text().strip() for k in ("level", "type", "size")})
        except OSError:
            pass
    return out


def _meminfo_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            kb = float(f.readline().split()[1])
        return round(kb / 1024 ** 2, 1)
    except (OSError, ValueError, IndexError):
        return None


def openblas_corename() -> str | None:
    """The kernel set OpenBLAS picked at run time (what OPENBLAS_CORETYPE overrides)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                     "openblas_get_corename64_", "openblas_get_corename"):
            if hasattr(lib, name):
                fn = getattr(lib, name)
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_head() -> str | None:
    """The ufcpu commit measured (read-only; the working tree may hold uncommitted changes)."""
    try:
        r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def source_digest() -> str:
    """sha256 of ufcpu's sources (the working tree may differ from HEAD: this names what ran)."""
    import hashlib
    h = hashlib.sha256()
    for path in sorted((REPO / "ufcpu").rglob("*.py")):
        h.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _llvm_cpu() -> dict:
    """The CPU name and features LLVM tunes Numba's code for (a VM may report a generic name,
    which changes the tuning), and Numba's overrides of them."""
    try:
        import llvmlite.binding as ll
        import numba
    except ImportError:
        return {}
    return {"llvm_host_cpu": ll.get_host_cpu_name(),
            "llvm_host_features": sorted(f for f in ll.get_host_cpu_features().flatten().split(",")
                                         if f.startswith("+")),
            "numba_cpu_name": numba.config.CPU_NAME, "numba_cpu_features": numba.config.CPU_FEATURES}


def cpu_slug(info: dict) -> str:
    """A file-name suffix naming the CPU of a result: LLVM's name for it (e.g. icelake-server,
    znver4), else the model name's letters."""
    name = info.get("llvm_host_cpu") or info.get("cpu_model") or "cpu"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "cpu"


def machine_info() -> dict:
    """Everything needed to read the numbers later: CPU, flags, caches, memory, load, versions,
    BLAS build and its run-time kernel choice, and thread-related environment variables."""
    cpu = _cpuinfo()
    flags = cpu.get("flags", "").split()
    blas = None
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:  # older NumPy: no dict mode
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_model": cpu.get("model name"),
        "cpu_vendor": cpu.get("vendor_id"),
        "cpu_family_model_stepping": [cpu.get("cpu family"), cpu.get("model"), cpu.get("stepping")],
        **_llvm_cpu(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "simd_flags": [f for f in SIMD_FLAGS if f in flags],
        "cpu_flags": flags,
        "caches": _caches(),
        "memory_gb": _meminfo_gb(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "env": {k: os.environ.get(k) for k in ENV_KEYS},
        "blas": {"build": blas, "openblas_corename": openblas_corename()},
        "versions": versions(),
        "ufcpu_git_head": git_head(),
        "ufcpu_source_sha256": source_digest(),
    }


def ufcpu_threads() -> dict:
    """ufcpu's thread setting in this Python thread, and the helper threads started so far."""
    from ufcpu import threads
    return {"max_threads": threads.available(), "current_threads": threads.count(),
            "helper_threads_started": threads.helper_count()}


def _cpu_times() -> tuple[float, float] | None:
    try:
        with open("/proc/stat") as f:
            vals = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return vals[3] + vals[4], sum(vals[:8])       # (idle + iowait, total) jiffies


def cpu_idle(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs idle over the next `seconds` (1.0: nothing else is running). Unlike
    the load average, it is not inflated by the benchmark's own previous minute."""
    a = _cpu_times()
    time.sleep(seconds)
    b = _cpu_times()
    if a is None or b is None or b[1] <= a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1])


def wait_for_idle(min_idle: float, timeout_s: float) -> dict:
    """On a shared machine, wait (at most timeout_s) until other processes leave the CPUs at
    least `min_idle` idle. -> {"idle", "waited_s"}, recorded next to the numbers it precedes."""
    start = time.perf_counter()
    idle = cpu_idle()
    while idle is not None and idle < min_idle and time.perf_counter() - start < timeout_s:
        idle = cpu_idle(5.0)
    return {"idle": idle, "waited_s": round(time.perf_counter() - start, 1)}


class OthersCpu:
    """Context manager: how many CPUs other processes kept busy while the block ran, i.e. the
    machine's busy time minus this process's and its waited-for children's CPU time. Recorded next
    to every measurement, it says how much a number was disturbed on a shared machine."""

    def __enter__(self):
        self.cores: float | None = None
        self._machine, self._own = _cpu_times(), self._own_cpu()
        return self

    @staticmethod
    def _own_cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __exit__(self, *exc):
        end = _cpu_times()
        if self._machine is None or end is None:
            return False
        hz = os.sysconf("SC_CLK_TCK")
        idle, total = (end[0] - self._machine[0]) / hz, (end[1] - self._machine[1]) / hz
        ncpu = os.cpu_count() or 1
        if total > 0:
            others = (total - idle) - (self._own_cpu() - self._own)      # CPU-seconds
            self.cores = round(max(0.0, others / (total / ncpu)), 3)   # the clock ticks are 10 ms: no more digits
        return False


def loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# --- the benchmarks' checkpoint ------------------------------------------------------------------

SMOKE_CHECKPOINT = dict(layers=2, hidden=64, heads=4, depth=3, vocab=512)   # --smoke runs' random model


def random_checkpoint(folder: Path, dims: dict | None) -> Path:
    """The project's random checkpoint in the Hub layout (full size: 755 MB, ~5 s), written once:
    into a temporary folder renamed when complete, so a half-written one is never reused."""
    if (folder / "model.safetensors").is_file():
        return folder
    from weights_convert.random_checkpoint import write_random_checkpoint
    log(f"writing a random checkpoint to {folder} (once)")
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write_random_checkpoint(tmp, **(dims or {}))
    tmp.rename(folder)
    return folder


def bench_checkpoint(smoke: bool, dims: dict | None = None) -> Path:
    """The random checkpoint every benchmark runs by default, cached in ufcpu's cache folder:
    the full-size model (seed 0), or for --smoke a tiny one (dims, default SMOKE_CHECKPOINT)."""
    from ufcpu import hub
    cache = hub.cache_dir() / "bench"
    if smoke:
        return random_checkpoint(cache / "random-smoke", dims or SMOKE_CHECKPOINT)
    return random_checkpoint(cache / "random-full-seed0", None)


# --- output ---------------------------------------------------------------------------------------

def md_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt(x: float | None, digits: int = 3) -> str:
    """Numbers for tables: 3 significant digits, no scientific notation for the usual ranges."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    return f"{x:.{max(0, digits - 1 - mag)}f}"


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is missing."""
    mpl = optional("matplotlib")
    if mpl is None:
        return None
    mpl.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def parse_ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def positive_int(s: str) -> int:
    """argparse type: a whole number >= 1."""
    import argparse
    try:
        n = int(s)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {s!r}")
    return n


def log(msg: str) -> None:
    """Progress on stderr, so stdout stays the summary."""
    print(msg, file=sys.stderr, flush=True)


def run_main(main: Callable[[], int]) -> int:
    """A benchmark's exit code: a checkpoint that cannot be loaded (a bad --model) is one line on
    stderr and exit code 2, as in the `ufcpu` command, not a traceback."""
    from ufcpu.errors import UfcpuError
    try:
        return main()
    except UfcpuError as e:
        print(f"{Path(sys.argv[0]).name}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
