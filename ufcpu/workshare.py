"""Helper threads that join work the calling thread has already started.

- A shared kernel (ufcpu/kernels.py, "Shared kernels") splits its work into blocks that any
  thread running it claims from one atomic counter. `offer` hands the call to up to `count`
  helper threads and returns at once; the caller then runs the kernel itself.
- `share_items` does the same for Python work made of independent items (the heads of an
  attention: NumPy products and a Numba kernel each, which release the GIL).

A helper that wakes late finds fewer blocks or items, or none, and returns: nobody ever waits for
a thread to wake up, only for work a helper has already taken.

The helpers are plain Python threads blocked on a queue. After a fork the child starts with no
helpers (a forked process has only the thread that forked) and creates its own when first asked.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import threading

log = logging.getLogger("ufcpu")

_tasks: queue.SimpleQueue = queue.SimpleQueue()
_helpers: list[threading.Thread] = []
_grow = threading.Lock()


def _serve() -> None:
    while True:
        kernel, args = _tasks.get()
        try:
            kernel(*args)
        except Exception:  # a kernel only does arithmetic; the caller has done every block anyway
            log.debug("a helper thread's share of %s failed", getattr(kernel, "__name__", kernel), exc_info=True)


def _ensure(count: int) -> None:
    with _grow:
        while len(_helpers) < count:
            t = threading.Thread(target=_serve, name=f"ufcpu-helper-{len(_helpers)}", daemon=True)
            t.start()
            _helpers.append(t)


def offer(kernel, args: tuple, count: int) -> None:
    """Let up to `count` helper threads run kernel(*args) too. If helpers are still busy with
    earlier calls, at most `count` tasks wait for them (a task whose call has ended costs its
    helper a counter read)."""
    if count < 1:
        return
    _ensure(count)
    for _ in range(min(count, count - _tasks.qsize())):
        _tasks.put((kernel, args))


class _Items:
    """fn(0) .. fn(count - 1), each called once by whichever thread takes it next."""

    def __init__(self, fn, count: int):
        self.fn, self.count = fn, count
        self.next = itertools.count()   # next() is atomic under the GIL
        self.inside = 0
        self.error: BaseException | None = None
        self.idle = threading.Condition()

    def work(self) -> None:
        with self.idle:
            self.inside += 1
        try:
            while self.error is None and (i := next(self.next)) < self.count:
                self.fn(i)
        except BaseException as e:       # re-raised on the calling thread by `wait`
            self.error = self.error or e
        finally:
            with self.idle:
                self.inside -= 1
                self.idle.notify_all()

    def wait(self) -> None:
        """Until no thread is inside `work` (a helper entering later finds nothing left)."""
        with self.idle:
            while self.inside:
                self.idle.wait()
        if self.error is not None:
            raise self.error


def share_items(fn, count: int, helpers: int) -> None:
    """fn(i) for i in range(count), on the calling thread and up to `helpers` helper threads
    joining it, for Python work that releases the GIL most of the time (NumPy products, Numba
    kernels). Returns when every call has returned; an exception in any call is raised here."""
    items = _Items(fn, count)
    offer(items.work, (), helpers)
    items.work()
    items.wait()


def helper_count() -> int:
    return len(_helpers)


def _after_fork_in_child() -> None:
    global _tasks, _grow
    _tasks = queue.SimpleQueue()
    _grow = threading.Lock()
    _helpers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
