"""Who runs what, on how many threads: the one owner of ufcpu's thread counts.

Two kinds of threads share the cores: OpenBLAS's pool (the GEMMs) and ufcpu's own, the calling
thread plus helper threads that join a Numba kernel it has started (ufcpu/kernels.py, "Shared
kernels"). A model's `threads` governs both, on every call of that model:

- `calls(n)` is one model call: the calling Python thread's kernels use n threads (`count()`), and
  OpenBLAS runs on n threads until the call ends. OpenBLAS's count is process-wide, so the
  calls in force share one count: a call that needs another waits until they end (calls of the
  same count run at once, and a waiting call is let in before newer calls of the count in force).
- `run(kernel, *args)` launches a shared kernel: on the calling thread, with `count() - 1`
  helpers offered a share when the input is large enough (`kernels._SHARED`). The int8
  projection, the walk, attention and the fused add and LayerNorm go through the box instead
  when a helper spins (`kernels.BOXED`, from `kernels.BOX_MIN_ROWS` rows): the helpers join from
  their spin, without the GIL. Each model
  call wakes its sleeping helpers first, so that they spin when its first kernel comes.
- The helpers are plain daemon Python threads, started on first use. Between kernels they spin
  for a new offer (in a Numba loop, without the GIL) for about 2 ms, then sleep on a queue; each
  offer goes to the newest slots of a bounded board, so a stale offer never hides a new one.
  A helper that wakes late finds fewer blocks or none: nobody waits for a thread to wake up. After
  a fork the child starts with no helpers and makes its own.

OpenBLAS is found among the loaded shared libraries (as threadpoolctl does, without depending on
it); with another BLAS only ufcpu's own count applies and `blas_threads()` is None.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import logging
import os
import queue
import threading

import numba
import numpy as np  # (also loads the BLAS library this module looks for)

from . import kernels, settings
from .errors import InputError

log = logging.getLogger("ufcpu")

# --- how many ------------------------------------------------------------------------------------

def available() -> int:
    """NUMBA_NUM_THREADS if set, else the machine's CPU count (Numba's reading of both)."""
    return numba.config.NUMBA_NUM_THREADS


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_capped: set = set()


def resolve(n: int | None) -> int:
    """A `threads=` argument -> the thread count used: None is every core; more than the cores is
    capped at them, with a one-time warning naming both numbers."""
    top = available()
    if n is None:
        return top
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"threads must be at least 1, got {n!r} (a whole number of threads)")
    if n > top and n not in _capped:
        _capped.add(n)
        log.warning("threads=%d is more than the %d cores available: using %d", n, top, top)
    return min(int(n), top)


_local = threading.local()    # .count: this Python thread's kernel threads; .held: its OpenBLAS hold


def count() -> int:
    """Threads (the caller and count() - 1 helpers) for kernels run from this Python thread."""
    return getattr(_local, "count", None) or available()


def set_threads(n: int | None) -> int:
    """For code that calls ufcpu.model's functions directly: n threads for this Python thread's
    kernels, and OpenBLAS set to n now (a model call sets both for its own duration). -> n used."""
    n = resolve(n)
    _local.count = n
    with _blas(n):
        pass
    return n


# --- OpenBLAS ------------------------------------------------------------------------------------

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
    """OpenBLAS's thread count now, as OpenBLAS reports it (None: OpenBLAS not found)."""
    lib = _openblas()
    return int(lib[1]()) if lib else None


def _set_blas(n: int) -> None:
    """The only place that sets OpenBLAS's count; called by the gate with its lock held."""
    lib = _openblas()
    if lib:
        lib[0](n)


class _BlasGate:
    """Holders of one OpenBLAS count: any number at once, all of the same count."""

    def __init__(self, users: int = 0):
        self.cond = threading.Condition(threading.Lock())
        self.count: int | None = None       # what the gate last set OpenBLAS to
        self.users = users
        self.waiting: collections.Counter = collections.Counter()   # count -> callers waiting for it
        self.let_in = 0                     # waiters of the count just switched to, still to enter
        self.queue: collections.deque = collections.deque()   # the waiting callers' counts, oldest first

    def _others_wait(self, n: int) -> bool:
        return any(c != n and k for c, k in self.waiting.items())

    def acquire(self, n: int) -> None:
        with self.cond:
            if (self.users == 0 or self.count == n) and not self._others_wait(n):
                return self._enter(n)
            self.waiting[n] += 1
            self.queue.append(n)
            try:
                while True:
                    # A free gate switches to the count its oldest waiter needs, whoever wakes first.
                    if self.users == 0 and self.queue[0] == n:
                        self.let_in = self.waiting[n] - 1   # and lets in who waited for n with it
                        self.cond.notify_all()
                        return self._enter(n)
                    if self.users and self.count == n and (self.let_in > 0 or not self._others_wait(n)):
                        self.let_in = max(0, self.let_in - 1)
                        return self._enter(n)
                    self.cond.wait(0.5)                     # (a timeout only re-checks)
            finally:
                self.waiting[n] -= 1
                self.queue.remove(n)                        # callers of one count are interchangeable

    def _enter(self, n: int) -> None:
        if self.count != n:
            _set_blas(n)
            self.count = n
        self.users += 1

    def release(self) -> None:
        with self.cond:
            self.users = max(0, self.users - 1)
            if self.users == 0:
                self.let_in = 0
                self.cond.notify_all()


_gate = _BlasGate()


@contextlib.contextmanager
def _blas(n: int):
    """OpenBLAS on n threads inside the block, for this thread (switching from the count it holds,
    if any, and back after; a thread holds one count at a time, so no two wait on each other)."""
    held = getattr(_local, "held", None)
    if held == n or _openblas() is None:
        yield
        return
    if held is not None:
        _gate.release()
    _gate.acquire(n)
    _local.held = n
    try:
        yield
    finally:
        _gate.release()
        _local.held = held
        if held is not None:
            _gate.acquire(held)


@contextlib.contextmanager
def calls(n: int):
    """One call of a model with n threads: this Python thread's kernels use n, and OpenBLAS runs
    on n threads until the block ends (waiting, first, for calls that need another count)."""
    before = getattr(_local, "count", None)
    _local.count = n
    if n > 1:
        _rouse(n - 1)
    try:
        with _blas(n):
            yield
    finally:
        _local.count = before


# --- helper threads ------------------------------------------------------------------------------

_board: collections.deque = collections.deque(maxlen=1)   # the newest offers, one per helper at most
_posted = np.zeros(1, np.int64)                            # [0]: offers made so far (spinning helpers watch it)
_ahead = np.zeros(kernels.SHARED_SLOTS, np.int64)          # the state of the next shared kernel offered
_awake = np.zeros(1, np.int64)                             # [0]: helpers running Python (changed atomically)
_box = np.zeros(kernels.BOX_SLOTS, np.int64)               # the box (kernels.py), served by spinning helpers
_wake: queue.SimpleQueue = queue.SimpleQueue()             # one token per sleeping helper woken
_asleep = 0                                                # helpers asleep on _wake, no token yet
_calls = 0                                                 # model calls begun with helpers (_rouse)
_lock = threading.Lock()                                   # guards the board's appends, _posted, _ahead, _asleep, _calls
_helpers: list[threading.Thread] = []
_grow = threading.Lock()

@functools.lru_cache(maxsize=1)
def _check_seconds() -> float:
    """-> how long one check of kernels.wait_offer takes on this CPU (a pause lasts 10-140 cycles,
    by CPU): the fastest of a few timed runs of 1024 checks."""
    import time
    idle, ahead = np.zeros(1, np.int64), np.zeros(kernels.SHARED_SLOTS, np.int64)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        kernels.wait_offer(idle, 0, ahead, 1024, np.ones(1, np.int64), np.zeros(kernels.BOX_SLOTS, np.int64))
        best = min(best, time.perf_counter() - t)
    return max(best, 1e-9) / 1024


def _spin_checks() -> int:
    """-> the checks a helper spins for a new offer before it sleeps: long enough to span the gaps
    between one call's kernels and between back-to-back calls, short enough that an idle model
    gives its cores back at once (settings.helper_spin_seconds, 2 ms unless set)."""
    return int(settings.helper_spin_seconds() / _check_seconds())


def _next_offer():
    """-> the next (kernel, args) from the board: spinning (without the GIL) while offers may come
    soon, then asleep until an offer wakes this helper."""
    checks = _spin_checks()
    while True:
        with _lock:     # read before the board: an offer made after them changes _posted and uses ahead
            seen, ahead, calls = int(_posted[0]), _ahead, _calls
        try:
            return _board.popleft()
        except IndexError:
            pass
        if kernels.wait_offer(_posted, seen, ahead, checks, _awake, _box) or not _may_sleep(calls):
            continue
        kernels.count_add(_awake, -1)
        _wake.get()
        kernels.count_add(_awake, 1)


def _may_sleep(calls: int) -> bool:
    """A helper whose spin ended: count it asleep -> True, unless an offer is on the board or a
    call began since `calls` (read before the spin). Such a call found this helper awake, so did
    not wake it, maybe while it waited for the GIL to get here: it spins again for its kernels."""
    global _asleep
    with _lock:
        if _board or _calls != calls:
            return False
        _asleep += 1
        return True


def _serve() -> None:
    while True:
        kernel, args = _next_offer()
        try:
            kernel(*args)
        except Exception:  # a kernel only does arithmetic; the caller has done every block anyway
            log.debug("a helper thread's share of %s failed", getattr(kernel, "__name__", kernel), exc_info=True)


def _ensure(n: int) -> None:
    global _board
    with _grow:
        if len(_helpers) >= n:
            return
        while len(_helpers) < n:
            t = threading.Thread(target=_serve, name=f"ufcpu-helper-{len(_helpers)}", daemon=True)
            kernels.count_add(_awake, 1)
            t.start()
            _helpers.append(t)
        with _lock:
            _board = collections.deque(_board, maxlen=len(_helpers))


def _post(kernel, args: tuple, n: int, shared: bool):
    """Put kernel(*args) (with a fresh state appended when `shared`) on the board for up to n
    helpers and wake the sleeping ones it needs -> the state, or None."""
    global _ahead
    _ensure(n)
    with _lock:
        state = None
        if shared:
            state, _ahead = _ahead, np.zeros(kernels.SHARED_SLOTS, np.int64)
            args = args + (state,)
        for _ in range(n):
            _board.append((kernel, args))
        _posted[0] += 1
        woken = _sleepers_to_wake(n)
    _wake_up(woken)
    return state


def _sleepers_to_wake(n: int) -> int:
    """-> how many sleeping helpers (up to n) to wake, counted awake from now; _lock held."""
    global _asleep
    woken = min(n, _asleep)
    _asleep -= woken
    return woken


def _wake_up(woken: int) -> None:
    for _ in range(woken):
        _wake.put(None)


def _rouse(n: int) -> None:
    """Before a call's kernels: n helpers started, and the sleeping ones among them woken, so that
    they spin when its first kernel comes (kernels.py, "The box"); a call whose kernels are all
    too small for the board would otherwise never wake them."""
    global _calls
    _ensure(n)
    with _lock:
        _calls += 1
        woken = _sleepers_to_wake(n)
    _wake_up(woken)


def offer(kernel, args: tuple, n: int) -> None:
    """Let up to n helper threads run kernel(*args) too, and return at once. The board keeps only
    the newest offers (one per helper): an older one, whose call has likely ended, is dropped.
    Spinning helpers take it at once; sleeping ones are woken, as many as it has shares."""
    if n >= 1:
        _post(kernel, args, n, shared=False)


def helper_count() -> int:
    return len(_helpers)


# --- launching -----------------------------------------------------------------------------------

_SPINS = 1 << 12   # checks between yields while a helper finishes its last block
SETTLE_SECONDS = 50e-6   # at most this long for helpers to get back to waiting after a kernel


@functools.lru_cache(maxsize=1)
def _settle_checks() -> int:
    return max(1, int(SETTLE_SECONDS / _check_seconds()))


def run(kernel, *args):
    """kernel(*args) on this thread, with count() - 1 helper threads: through its box when it has
    one (kernels.BOXED) and a helper spins, else offered a share on the board when the input (its
    first argument) is at least kernels._SHARED[kernel] elements."""
    n = count()
    if n == 1:
        return run_here(kernel, *args)
    boxed = kernels.BOXED.get(kernel)
    state = np.zeros(kernels.SHARED_SLOTS, np.int64)   # (a boxed launch that declines leaves it untouched)
    if boxed is not None and args[0].shape[0] >= kernels.BOX_MIN_ROWS.get(kernel, 1) \
            and boxed(_box, n - 1, *args, state):
        return None
    if args[0].size < kernels._SHARED[kernel]:
        return kernel(*args, state)
    state = _post(kernel, args, n - 1, shared=True)
    kernel(*args, state)
    while not kernels.helpers_done(state, _SPINS):
        os.sched_yield()
    # A helper just out of the kernel holds the GIL for a few microseconds on its way back to
    # waiting; taking it from a helper would put this thread to sleep, and waking takes longer.
    kernels.wait_zero(_awake, 0, _settle_checks())
    return None


def run_here(kernel, *args):
    """kernel(*args) on the calling thread alone (work already split among threads)."""
    return kernel(*args, np.zeros(kernels.SHARED_SLOTS, np.int64))


# --- fork ----------------------------------------------------------------------------------------

def _after_fork_in_child() -> None:
    global _board, _ahead, _awake, _box, _wake, _asleep, _calls, _lock, _grow, _gate
    _board = collections.deque(maxlen=1)
    _ahead = np.zeros(kernels.SHARED_SLOTS, np.int64)
    _awake = np.zeros(1, np.int64)
    _box = np.zeros(kernels.BOX_SLOTS, np.int64)
    _wake = queue.SimpleQueue()
    _asleep = _calls = 0
    _lock = threading.Lock()
    _grow = threading.Lock()
    _helpers.clear()
    gate = _BlasGate(users=1 if getattr(_local, "held", None) is not None else 0)
    gate.count = _gate.count
    _gate = gate


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
