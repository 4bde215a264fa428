"""The server's model thread (ufcpu/serve/batcher.py), in process: jobs queued together run as one
batch within the token budget, and each text's vector is what model.encode gives it."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("starlette")      # ufcpu.serve needs the server extra
pytest.importorskip("uvicorn")

from conftest import load_fixture  # noqa: E402
from ufcpu.errors import InputError  # noqa: E402
from ufcpu.serve.batcher import Worker  # noqa: E402
from ufcpu.serve.metrics import Metrics  # noqa: E402

TEXTS = ["one", "two words", "a sentence of several words", "x y z", "the capital of France is Paris", "b"]


def run_queued(worker: Worker, jobs: list) -> list:
    """Queue every job, then start the worker: the queue holds them all when it takes the first."""
    async def main():
        tasks = [asyncio.ensure_future(job(worker)) for job in jobs]
        await asyncio.sleep(0)                    # each task has put its job on the queue
        worker.start()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)   # a hang fails
    try:
        return asyncio.run(main())
    finally:
        worker.stop()


def test_queued_requests_run_as_one_batch():
    m = load_fixture("tiny-ufb")
    ids = m.tokenizer.encode_ids(TEXTS)[0]
    metrics = Metrics()
    done = run_queued(Worker(lambda: m, 4096, metrics), [lambda w, x=x: w.embed([x], "mean") for x in ids])
    assert [d.batch_inputs for d in done] == [len(TEXTS)] * len(TEXTS)
    np.testing.assert_allclose(np.stack([d.value[0] for d in done]), m.encode(TEXTS), atol=1e-5)
    assert 'ufcpu_batch_inputs_bucket{le="8"} 1' in metrics.render()


def test_token_budget_splits_batches_and_pooling_is_per_job():
    m = load_fixture("tiny-ufb")
    ids = m.tokenizer.encode_ids(TEXTS)[0]
    budget = 12
    jobs = [lambda w, x=x: w.embed([x], "mean") for x in ids] + [lambda w: w.embed(list(ids[:2]), "none")]
    done = run_queued(Worker(lambda: m, budget, Metrics()), jobs)
    assert all(d.batch_inputs < len(TEXTS) for d in done)
    np.testing.assert_allclose(np.stack([d.value[0] for d in done[:-1]]), m.encode(TEXTS), atol=1e-5)
    for got, want in zip(done[-1].value, m.encode(TEXTS[:2], pooling="none")):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_calls_and_errors_reach_their_request():
    m = load_fixture("tiny-ufb")

    def bad(model):
        raise InputError("no mask token in the text")
    done = run_queued(Worker(lambda: m, 4096, Metrics()), [lambda w: w.call(lambda model: model.fill_mask("a <mask>")),
                                                           lambda w: w.call(bad)])
    assert done[0].value == m.fill_mask("a <mask>")
    assert isinstance(done[1], InputError)


def test_a_model_that_cannot_load_fails_every_job():
    failures = []

    def load():
        raise InputError("cannot read /nowhere")
    w = Worker(load, 4096, Metrics())
    w.on_failure = failures.append
    done = run_queued(w, [lambda w: w.embed([np.array([4])], "mean")])
    assert failures == ["cannot read /nowhere"] and isinstance(done[0], RuntimeError)
    assert not w.ready.is_set()


class CountingModel:
    """A stand-in model that records the texts of each forward and returns each token's id as its
    vector: enough to see which jobs the worker batched together, with no kernels."""
    class tokenizer:
        pad_id = 0

    def __init__(self):
        self.batches: list[int] = []

    def encode(self, texts):      # the worker's warm-up
        return None

    def hidden_states(self, ids, mask):   # [B, S] -> [B, S, 1]
        self.batches.append(len(ids))
        return ids[..., None].astype(np.float32)


def ids_of(length: int, value: int) -> np.ndarray:
    return np.full(length, value, np.int64)


def test_a_batch_takes_every_queued_job_up_to_the_token_budget():
    m = CountingModel()
    jobs = [lambda w, i=i: w.embed([ids_of(4, i + 1)], "mean") for i in range(10)]   # 4 tokens each
    done = run_queued(Worker(lambda: m, 4 * 7, Metrics(), max_wait_s=3600.0), jobs)
    assert m.batches == [7, 3] and [d.batch_inputs for d in done] == [7] * 7 + [3] * 3
    assert [float(d.value[0][0]) for d in done] == [i + 1 for i in range(10)]   # each job got its own row


def test_a_lone_request_never_waits_for_others():
    """Nothing is arriving, so the batch starts at once: with an hour of max_wait, a wait would hang."""
    m = CountingModel()
    done = run_queued(Worker(lambda: m, 4096, Metrics(), max_wait_s=3600.0), [lambda w: w.embed([ids_of(3, 1)], "mean")])
    assert done[0].batch_inputs == 1 and m.batches == [1]


def run_with_arrivals(steps, return_wait_s: float = 0.0, return_share: float = 0.25) -> tuple[list, CountingModel]:
    """Start a worker (max_wait of an hour, so only the arriving count can end its wait), then run
    `steps(worker)` on the event loop."""
    m = CountingModel()
    w = Worker(lambda: m, 4096, Metrics(), max_wait_s=3600.0, return_wait_s=return_wait_s)
    w.return_share = return_share

    async def main():
        w.start()
        await asyncio.get_running_loop().run_in_executor(None, w.ready.wait)
        return await steps(w)
    try:
        return asyncio.run(asyncio.wait_for(main(), 120)), m
    finally:
        w.stop()


def test_the_batch_waits_for_a_request_being_read_and_takes_it():
    async def steps(w):
        w.arriving(+1)                                       # b is being read
        a = asyncio.ensure_future(w.embed([ids_of(3, 1)], "mean"))
        await asyncio.sleep(0)                               # a is queued; the model thread waits for b
        b = asyncio.ensure_future(w.embed([ids_of(5, 2)], "mean", arrived=True))
        return await asyncio.gather(a, b)
    done, m = run_with_arrivals(steps)
    assert m.batches == [2] and [d.batch_inputs for d in done] == [2, 2]


def test_a_request_that_leaves_without_a_job_ends_the_wait():
    async def steps(w):
        w.arriving(+1)                                       # b is being read ...
        a = asyncio.ensure_future(w.embed([ids_of(3, 1)], "mean"))
        await asyncio.sleep(0)
        w.arriving(-1)                                       # ... and turns out invalid (a 422)
        return [await a]
    done, m = run_with_arrivals(steps)
    assert m.batches == [1] and done[0].batch_inputs == 1


async def batch_of_two(w, peers=("a", "b")):
    """One batch of two jobs, from these peers (the first waits for the second, being read)."""
    w.arriving(+1)
    a = asyncio.ensure_future(w.embed([ids_of(3, 1)], "mean", peer=peers[0]))
    await asyncio.sleep(0)
    b = asyncio.ensure_future(w.embed([ids_of(3, 2)], "mean", arrived=True, peer=peers[1]))
    return await asyncio.gather(a, b)


async def taken(w):
    """Until the model thread has taken every queued job."""
    while w.depth():
        await asyncio.sleep(0.001)


def test_the_next_batch_waits_for_the_clients_the_last_one_answered():
    """Closed-loop clients: c, queued while a and b were being answered, waits for their next requests."""
    async def steps(w):
        first = await batch_of_two(w)
        c = asyncio.ensure_future(w.embed([ids_of(4, 3)], "mean", peer="c"))
        await asyncio.sleep(0)
        await taken(w)                   # the model thread holds c, and waits for a and b
        again = [asyncio.ensure_future(w.embed([ids_of(5, v)], "mean", peer=p)) for v, p in ((4, "a"), (5, "b"))]
        return first + await asyncio.gather(c, *again)
    done, m = run_with_arrivals(steps, return_wait_s=3600.0, return_share=float("inf"))
    assert m.batches == [2, 3] and [d.batch_inputs for d in done] == [2, 2, 3, 3, 3]
    assert [float(d.value[0][0]) for d in done] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("case", ["one client", "unknown peers", "no return wait", "short last batch"])
def test_a_request_does_not_wait_for_clients_that_are_not_coming(case):
    """Each case would hang (and time out) if the batch waited: an hour's return wait, but nobody
    to wait for (the one client is back; peers unknown), or no wait allowed (0 ms; a quarter of
    the last batch's compute, microseconds here)."""
    peers, wait, share = {"one client": (("a", "a"), 3600.0, float("inf")),
                          "unknown peers": ((None, None), 3600.0, float("inf")),
                          "no return wait": (("a", "b"), 0.0, float("inf")),
                          "short last batch": (("a", "b"), 3600.0, 0.25)}[case]

    async def steps(w):
        first = await batch_of_two(w, peers)
        return first + [await w.embed([ids_of(4, 3)], "mean", peer=peers[0])]
    done, m = run_with_arrivals(steps, return_wait_s=wait, return_share=share)
    assert m.batches == [2, 1] and done[-1].batch_inputs == 1
