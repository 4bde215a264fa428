"""The model thread and its one queue.

The event loop never runs model code: requests put jobs on a queue and await a future; one
thread loads the model, warms it up, and then takes jobs. Embedding jobs that arrive together
(or within `max_wait_s` of the first, when the queue was empty) form one batch of at most
`max_batch_tokens` real tokens; the batch is sorted by length and run in token-budget slices, so
many concurrent one-sentence requests run as one forward pass. A text's vector does not depend
on what else is in its batch (the engine runs each batch packed and per length group).
Other work (predict, fill-mask, long documents) runs on the same thread, one job at a time.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
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


class Worker:
    def __init__(self, load: Callable[[], Any], max_batch_tokens: int, metrics, max_wait_s: float = 0.002):
        self._load = load
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self.model = None
        self.ready = threading.Event()
        self.failed: str | None = None              # why the model could not be loaded
        self.on_failure: Callable[[str], None] = lambda msg: None
        self.in_flight: Callable[[], int] = lambda: 1 << 30   # requests that may still submit work
        self._q: queue.Queue = queue.Queue()
        self._carry: deque = deque()                # jobs taken from the queue but left for the next batch
        self._thread = threading.Thread(target=self._run, name="ufcpu-model", daemon=True)

    # --- event-loop side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish every queued job, then end the thread."""
        self._q.put(_STOP)
        self._thread.join()

    def depth(self) -> int:
        return self._q.qsize() + len(self._carry)

    async def embed(self, ids: list[np.ndarray], pooling: str) -> Done:
        return await self._submit(ids=ids, pooling=pooling)

    async def call(self, fn: Callable[[Any], Any]) -> Done:
        return await self._submit(call=fn)

    async def _submit(self, **kw) -> Done:
        loop = asyncio.get_running_loop()
        job = Job(loop, loop.create_future(), **kw)
        self._q.put(job)
        self.metrics.set("ufcpu_queue_depth", self.depth())
        return await job.future

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
            first = self._carry.popleft() if self._carry else self._q.get()
            if first is _STOP:
                return
            if first.call is not None:
                self._run_call(first)
            else:
                self._run_batch(self._gather(first))

    def _gather(self, first: Job) -> list[Job]:
        """first, then whatever fits the token budget: what is queued now, and for up to max_wait_s
        more what arrives, if the queue was empty and other requests are in flight. Other kinds of
        job wait for the next turn."""
        jobs, tokens = [first], first.tokens
        deadline = time.perf_counter() + self.max_wait_s
        while tokens < self.max_batch_tokens:
            try:
                nxt = self._q.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self.in_flight() <= len(jobs):   # nobody else is coming
                    break
                try:
                    nxt = self._q.get(timeout=remaining)
                except queue.Empty:
                    break
            if nxt is _STOP or nxt.call is not None or tokens + nxt.tokens > self.max_batch_tokens:
                self._carry.append(nxt)
                break
            jobs.append(nxt)
            tokens += nxt.tokens
        return jobs

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
            job = self._q.get()
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
