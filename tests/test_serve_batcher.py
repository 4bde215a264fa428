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
        return await asyncio.gather(*tasks, return_exceptions=True)
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
