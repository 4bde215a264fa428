"""Everything ufcpu changes outside its own code, in one place.

- OpenBLAS's idle-worker timeout: set in the environment when this module is imported (by
  `import ufcpu`, before NumPy), because OpenBLAS reads it only once, when NumPy loads it.
- Numba's cache folder for the compiled kernels: `numba.config.CACHE_DIR`, chosen by
  `kernel_cache_dir()` among folders that only the current user can write (Numba unpickles what it
  finds there), never exported to child processes; cache files carry a checksum and a file that
  fails it is recompiled (`guard_kernel_caches`).
- glibc malloc's thresholds: only when asked, `tune_malloc()` (the `ufcpu` command asks).
- How long helper threads spin between kernels: `helper_spin_seconds()`, from UFCPU_SPIN_US.

Thread counts (OpenBLAS's and ufcpu's own) are ufcpu/threads.py's.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import inspect
import logging
import os
import stat
import sys
import tempfile

log = logging.getLogger("ufcpu")

# --- OpenBLAS: at import, because OpenBLAS reads it once, when NumPy loads it ----------------------
# Idle OpenBLAS workers spin after every product on the cores ufcpu's kernels need next; with a
# timeout of 2^4 cycles they sleep at once (bench/README.md, "Threads"). A value of the user's is kept.
BLAS_TIMEOUT_TAKES_EFFECT = "numpy" not in sys.modules or "OPENBLAS_THREAD_TIMEOUT" in os.environ
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def blas_workers_sleep() -> bool:
    """Whether OpenBLAS was loaded after OPENBLAS_THREAD_TIMEOUT was set (by ufcpu or the user)."""
    return BLAS_TIMEOUT_TAKES_EFFECT


# --- Numba's cache folder ---------------------------------------------------------------------------

def cache_folder_problem(folder: str, uid: int | None = None) -> str | None:
    """-> why `folder` must not hold compiled kernels (Numba unpickles its index files), or None
    when it is a real folder owned by `uid` (default: the current user) that nobody else can write."""
    try:
        st = os.lstat(folder)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if uid is None and hasattr(os, "getuid"):
        uid = os.getuid()
    if uid is not None and st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by uid {uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"can be written by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _writable(folder: str) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _make(folder: str) -> None:
    """Create folder (mode 0700) and its missing parents, if it does not exist."""
    try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        os.mkdir(folder, 0o700)
    except OSError:
        pass                               # exists, or cannot be made: cache_folder_problem says which


def _candidates() -> list[tuple[str, str]]:
    """(origin, folder) in the order they are tried."""
    here = os.path.dirname(os.path.abspath(__file__))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    user = os.environ.get("NUMBA_CACHE_DIR")
    return ([("NUMBA_CACHE_DIR", user)] if user else []) + [
        ("package", os.path.join(here, "__pycache__")),
        ("user cache", os.path.join(base, "ufcpu", "numba")),
        ("temporary folder", os.path.join(tempfile.gettempdir(), f"ufcpu-numba-{uid}"))]


def _numba_subfolder(folder: str, source: str = __file__) -> str:
    """The folder inside `folder` where Numba keeps the kernels of source's folder."""
    from numba.core.caching import UserProvidedCacheLocator
    return os.path.join(folder, UserProvidedCacheLocator.get_suitable_cache_subpath(source))


@functools.lru_cache(maxsize=1)
def kernel_cache_dir() -> str | None:
    """The first safe, writable folder of: NUMBA_CACHE_DIR, the package's __pycache__,
    ~/.cache/ufcpu/numba ($XDG_CACHE_HOME), $TMPDIR/ufcpu-numba-<uid>; set as Numba's CACHE_DIR.
    A folder others could have written is refused with a warning. -> None when none qualifies
    (the kernels then compile in every process)."""
    import numba
    for origin, folder in _candidates():
        _make(folder)
        problem = cache_folder_problem(folder)
        if problem is None and _writable(folder):
            numba.config.CACHE_DIR = folder
            _make(_numba_subfolder(folder))   # before Numba makes it with the umask's mode
            return folder
        if problem is not None and origin != "package" and os.path.lexists(folder):
            log.warning("not caching compiled kernels in %s (%s): it %s", folder, origin, problem)
    numba.config.CACHE_DIR = ""
    return None


# --- Compiled kernel files: checked before Numba unpickles them --------------------------------------

_MAGIC = b"ufcpu-kernel-cache-sha256\n"
_announced = False


def _announce_compile() -> None:
    global _announced
    if not _announced:
        _announced = True
        log.info("compiling kernels (once, a few seconds)...")


_unreadable_warned: set = set()


def _warn_unreadable(folder: str) -> None:
    if folder not in _unreadable_warned:
        _unreadable_warned.add(folder)
        log.warning("compiled kernels in %s were unreadable (damaged files): compiling them again", folder)


def _sealed(payload: bytes) -> bytes:
    return _MAGIC + hashlib.sha256(payload).digest() + payload


def _unsealed(blob: bytes, path: str) -> bytes:
    head = len(_MAGIC) + 32
    payload = blob[head:]
    if not blob.startswith(_MAGIC) or hashlib.sha256(payload).digest() != blob[len(_MAGIC):head]:
        raise _Unreadable(path)
    return payload


class _Unusable(Exception):
    """A kernel's cache subfolder that fails cache_folder_problem."""


class _Unreadable(Exception):
    """A kernel cache file that is not what ufcpu wrote (damaged, or from another writer)."""


@functools.lru_cache(maxsize=1)
def _cache_classes():
    import pickle

    from numba.core import caching

    class CheckedFile(caching.IndexDataCacheFile):
        """Numba's index and data files, each with a SHA-256 of its bytes checked before unpickling."""

        def _load_index(self):
            try:
                with open(self._index_path, "rb") as f:
                    blob = f.read()
            except FileNotFoundError:
                return {}
            version, stamp, overloads = pickle.loads(_unsealed(blob, self._index_path))  # checked first
            fresh = version == self._version and stamp == self._source_stamp
            return overloads if fresh else {}

        def _save_index(self, overloads):
            blob = _sealed(self._dump((self._version, self._source_stamp, overloads)))
            with self._open_for_write(self._index_path) as f:
                f.write(blob)

        def _load_data(self, name):
            path = self._data_path(name)
            with open(path, "rb") as f:
                return pickle.loads(_unsealed(f.read(), path))

        def _save_data(self, name, data):
            with self._open_for_write(self._data_path(name)) as f:
                f.write(_sealed(self._dump(data)))

    class OnlyCacheDir(caching.CompileResultCacheImpl):
        _locator_classes = [caching.UserProvidedCacheLocator]   # never Numba's unchecked fallbacks

    class CheckedCache(caching.FunctionCache):
        """A kernel's cache in kernel_cache_dir(): a file that fails its checksum or cannot be
        unpickled is reported in one line and compiled again (and rewritten)."""
        _impl_class = OnlyCacheDir

        def __init__(self, py_func):
            sub = _numba_subfolder(kernel_cache_dir(), inspect.getfile(py_func))
            _make(sub)
            problem = cache_folder_problem(sub)
            if problem is not None:
                raise _Unusable(f"{sub} {problem}")
            super().__init__(py_func)
            self._cache_file = CheckedFile(self._cache_path, self._impl.filename_base,
                                           self._impl.locator.get_source_stamp())

        def load_overload(self, sig, target_context):
            try:
                found = super().load_overload(sig, target_context)
            except Exception:  # a damaged file fails its checksum or its unpickling: start afresh
                _warn_unreadable(self._cache_path)
                with contextlib.suppress(OSError):
                    os.unlink(self._cache_file._index_path)   # in a folder only this user can write
                found = None
            if found is None:
                _announce_compile()
            return found

    class AnnouncedNullCache(caching.NullCache):
        def load_overload(self, sig, target_context):
            _announce_compile()

    return CheckedCache, AnnouncedNullCache


def guard_kernel_caches(dispatchers) -> None:
    """Give each Numba dispatcher a cache that checks its files (or, uncached, one that says when
    it compiles). Called by ufcpu/kernels.py on its own kernels, before any is compiled."""
    checked, uncached = _cache_classes()
    warned = False
    for d in dispatchers:
        try:
            d._cache = checked(d.py_func) if kernel_cache_dir() else uncached()
        except (_Unusable, RuntimeError) as e:   # RuntimeError: no locator, the folder vanished
            if not warned:
                warned = True
                log.warning("not caching compiled kernels: %s", e)
            d._cache = uncached()


# --- glibc malloc ------------------------------------------------------------------------------------
# A forward pass frees and allocates the same 1-40 MB arrays in every layer; with glibc's defaults
# each is a fresh mmap whose pages fault in again (bench/README.md, "Memory"). Raising the mmap
# threshold to glibc's ceiling and the trim threshold to 256 MB lets freed blocks be reused in place,
# at the cost of up to 256 MB of freed heap kept by the process after a large batch.

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MALLOC_SETTINGS = {M_MMAP_THRESHOLD: 32 << 20,    # glibc's ceiling on 64-bit (4 MiB * sizeof(long))
                   M_TRIM_THRESHOLD: 256 << 20}


def malloc_tuning_wanted() -> bool:
    """The `ufcpu` command tunes malloc unless UFCPU_MALLOC_TUNING is 0 (or false, no, off)."""
    return os.environ.get("UFCPU_MALLOC_TUNING", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.lru_cache(maxsize=1)
def tune_malloc() -> bool:
    """Apply MALLOC_SETTINGS through glibc's mallopt, once per process (process-wide, opt-in for
    library users). -> True when they took effect; False on a C library without mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS.items())


# --- helper threads' spin ----------------------------------------------------------------------------
HELPER_SPIN_US = 2000   # long enough to span the gaps between one call's kernels (bench/README.md, "Threads")
_spin_default_us = HELPER_SPIN_US


def use_helper_spin_default(us: int) -> None:
    """This process's spin when UFCPU_SPIN_US is not set (a process that knows its calls come in
    a steady stream a few ms apart, as `ufcpu serve`'s batches do)."""
    global _spin_default_us
    _spin_default_us = int(us)
    helper_spin_seconds.cache_clear()


@functools.lru_cache(maxsize=1)
def helper_spin_seconds() -> float:
    """How long an idle helper thread spins for the next kernel before it sleeps: UFCPU_SPIN_US
    microseconds (0: sleep at once, for machines where an idle core is worth more), else 2 ms
    (or the process's own default). A value that is not a whole number of microseconds is
    reported once and the default used."""
    raw = os.environ.get("UFCPU_SPIN_US", "").strip()
    if not raw:
        return _spin_default_us * 1e-6
    try:
        us = int(raw)
        if us < 0:
            raise ValueError
    except ValueError:
        log.warning("UFCPU_SPIN_US=%r is not a whole number of microseconds: using %d", raw, _spin_default_us)
        us = _spin_default_us
    return us * 1e-6
