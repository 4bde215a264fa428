"""The model thread and its one queue.

The event loop never runs model code: requests put jobs on a queue and await a future; one
thread loads the model, warms it up, and then takes jobs. Continuous batching: while a batch
runs, jobs pile up in the queue, and the next batch takes every one of them that fits
`max_batch_tokens` real tokens. A batch waits for two kinds of requests only: those already read
and not yet queued (the event loop is parsing them), never past `max_wait_s` after the first job
was queued; and the next requests of the clients the last batch answered, on the connections it
answered them on, never past `return_wait_s` (nor a quarter of that batch's compute) after it
ended. Closed-loop clients would otherwise split into two cohorts that take turns: the first
client back starts a batch of its own, and the others queue behind it. A lone request, or one
from a client that was not just answered, starts at once. The batch is sorted by length and run in token-budget slices, so
many concurrent one-sentence requests run as one forward pass. A text's vector does not depend
on what else is in its batch (the engine runs each batch packed and per length group).
Other work (predict, fill-mask, long documents) runs on the same thread, one job at a time.
The model thread sleeps on one condition, woken by each job and by each request that leaves
without one; nothing polls.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from .. import heads
from ..tokenizer import token_budget_batches
from ..tokenizer import pad

log = logging.getLogger("ufcpu.serve")
_STOP = object()


@dataclasses.dataclass
class Job:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    ids: list[np.ndarray] | None = None        # embedding job: one id array per input
    pooling: str = "mean"                       # "mean", "first" or "none" (per-token vectors)
    call: Callable[[Any], Any] | None = None    # other job: call(model) -> result
    peer: Any = None                            # the connection it came on (host, port), if known
    enqueued: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.ids) if self.ids is not None else 0


@dataclasses.dataclass
class Done:
    value: Any          # embedding jobs: one row per input ([H], or [n_i, H] for "none")
    queue_s: float
    compute_s: float
    batch_inputs: int
    end: float = 0.0    # perf_counter() when the model thread finished the job's batch


RETURN_SHARE = 0.25   # of the last batch's compute time: the most its clients' return may idle the model


class Worker:
    def __init__(self, load: Callable[[], Any], max_batch_tokens: int, metrics, max_wait_s: float = 0.002,
                 return_wait_s: float = 0.05):
        self._load = load
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.return_wait_s = return_wait_s
        self.return_share = RETURN_SHARE
        self.metrics = metrics
        self.model = None
        self.ready = threading.Event()
        self.failed: str | None = None              # why the model could not be loaded
        self.on_failure: Callable[[str], None] = lambda msg: None
        self._q: deque = deque()                    # jobs, oldest first; _STOP last
        self._arriving = 0                          # requests read by the event loop, their job not queued yet
        self._answered: frozenset = frozenset()     # peers the last batch answered
        self._back_by = 0.0                         # until when the next batch may wait for them
        self._cv = threading.Condition(threading.Lock())   # guards both; the model thread sleeps on it
        self._thread = threading.Thread(target=self._run, name="ufcpu-model", daemon=True)

    # --- event-loop side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish every queued job, then end the thread."""
        self._put(_STOP)
        self._thread.join()

    def depth(self) -> int:
        return len(self._q)

    def arriving(self, delta: int) -> None:
        """+1: a request that may queue a job is being read; -1: it left without queueing one."""
        with self._cv:
            self._arriving += delta
            self._cv.notify()

    async def embed(self, ids: list[np.ndarray], pooling: str, arrived: bool = False, peer: Any = None) -> Done:
        """arrived: this request was counted by `arriving(+1)`, and its job settles that. peer: the
        client's connection (hashable), which lets the next batch wait for that client's next request."""
        return await self._submit(arrived, ids=ids, pooling=pooling, peer=peer)

    async def call(self, fn: Callable[[Any], Any], arrived: bool = False) -> Done:
        return await self._submit(arrived, call=fn)

    async def _submit(self, arrived: bool, **kw) -> Done:
        loop = asyncio.get_running_loop()
        job = Job(loop, loop.create_future(), **kw)
        self._put(job, -1 if arrived else 0)
        self.metrics.set("ufcpu_queue_depth", self.depth())
        return await job.future

    def _put(self, job, arriving: int = 0) -> None:
        with self._cv:
            self._q.append(job)
            self._arriving += arriving
            self._cv.notify()

    # --- model thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self.model = self._load()
            self.model.encode(["warm up the kernels"])
        except Exception as e:   # a bad checkpoint: one line, and the server stops
            self.failed = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.on_failure(self.failed)
            self._drain_after_failure()
            return
        log.info("model ready in %.1f s", time.perf_counter() - t0)
        self.ready.set()
        while True:
            first = self._take()
            if first is _STOP:
                return
            if first.call is not None:
                self._run_call(first)
            else:
                self._run_batch(self._gather(first))

    def _take(self):
        """The oldest job (or _STOP), once there is one."""
        with self._cv:
            while not self._q:
                self._cv.wait()
            return self._q.popleft()

    def _gather(self, first: Job) -> list[Job]:
        """first, then every queued embedding job that fits the token budget, in queue order; while
        the queue is empty, the jobs of requests being read (until max_wait_s after first was
        queued) and of the peers the last batch answered (until _back_by). A job that does not fit,
        or of another kind, heads the next turn."""
        jobs, tokens = [first], first.tokens
        soon = first.enqueued + self.max_wait_s
        with self._cv:
            missing = set(self._answered) - {first.peer}
            while tokens < self.max_batch_tokens:
                if not self._q:
                    until = max(soon if self._arriving > 0 else 0.0, self._back_by if missing else 0.0)
                    remaining = until - time.perf_counter()
                    if remaining <= 0:   # nobody else is coming in time
                        break
                    self._cv.wait(remaining)
                    continue
                nxt = self._q[0]
                if nxt is _STOP or nxt.call is not None or tokens + nxt.tokens > self.max_batch_tokens:
                    break
                jobs.append(self._q.popleft())
                tokens += nxt.tokens
                missing.discard(nxt.peer)
        return jobs

    def _answer(self, jobs: list[Job], compute_s: float, end: float) -> None:
        """Before the answers go out: the next batch may wait for these clients to come back."""
        with self._cv:
            self._answered = frozenset(j.peer for j in jobs if j.peer is not None)
            self._back_by = end + min(self.return_wait_s, self.return_share * compute_s)

    def _run_batch(self, jobs: list[Job]) -> None:
        start = time.perf_counter()
        self.metrics.set("ufcpu_queue_depth", self.depth())
        items = [(j, k) for j, job in enumerate(jobs) for k in range(len(job.ids))]
        rows: list[list] = [[None] * len(job.ids) for job in jobs]
        lengths = np.array([len(jobs[j].ids[k]) for j, k in items])
        order = np.argsort(lengths, kind="stable")
        try:
            for sl in token_budget_batches(lengths[order], self.max_batch_tokens):
                idx = order[sl]
                b = pad([jobs[items[i][0]].ids[items[i][1]] for i in idx], self.model.tokenizer.pad_id)
                h = self.model.hidden_states(b.input_ids, b.attention_mask)     # [B, S, H]
                pooled = {p: heads.POOLING[p](h, b.attention_mask)     # [B, H]
                          for p in {jobs[items[i][0]].pooling for i in idx} if p != "none"}
                for r, i in enumerate(idx):
                    j, k = items[i]
                    p = jobs[j].pooling
                    rows[j][k] = h[r, :lengths[i]].copy() if p == "none" else pooled[p][r]
                self.metrics.observe("ufcpu_batch_inputs", len(idx))
                self.metrics.observe("ufcpu_batch_tokens", int(lengths[idx].sum()))
        except Exception as e:
            for job in jobs:
                _resolve(job, e)
            return
        self.metrics.inc("ufcpu_tokens_total", int(lengths.sum()))
        end = time.perf_counter()
        self._answer(jobs, end - start, end)
        for job, r in zip(jobs, rows):
            _resolve(job, Done(r, start - job.enqueued, end - start, len(items), end))

    def _run_call(self, job: Job) -> None:
        start = time.perf_counter()
        try:
            value = job.call(self.model)
        except Exception as e:
            _resolve(job, e)
            return
        end = time.perf_counter()
        _resolve(job, Done(value, start - job.enqueued, end - start, 1, end))

    def _drain_after_failure(self) -> None:
        while True:
            job = self._take()
            if job is _STOP:
                return
            _resolve(job, RuntimeError(self.failed))


def _resolve(job: Job, value: Any) -> None:
    """Hand a result (or an exception) to the job's event loop; a cancelled request is skipped."""
    def set_it():
        if job.future.done():
            return
        if isinstance(value, BaseException):
            job.future.set_exception(value)
        else:
            job.future.set_result(value)
    try:
        job.loop.call_soon_threadsafe(set_it)
    except RuntimeError:   # the loop has closed: nobody is waiting
        pass
