"""The helper threads behind shared kernels (ufcpu/workshare.py)."""
from __future__ import annotations

import threading

import pytest

from ufcpu import workshare


def test_offered_work_runs_on_helper_threads():
    done = threading.Event()
    seen = []

    def task(tag):
        seen.append((tag, threading.current_thread().name))
        done.set()

    workshare.offer(task, ("a",), 1)
    assert done.wait(10), "no helper thread ran the task"
    assert seen[0][0] == "a" and seen[0][1].startswith("ufcpu-helper-")
    assert threading.current_thread().name not in {name for _, name in seen}


def test_no_helpers_for_a_count_of_zero():
    before = workshare.helper_count()
    ran = []
    workshare.offer(lambda: ran.append(1), (), 0)
    assert workshare.helper_count() == before and ran == []


def test_a_failing_task_does_not_end_its_helper():
    done = threading.Event()
    failed = threading.Event()

    def bad():
        failed.set()
        raise RuntimeError("boom")

    workshare.offer(bad, (), 1)
    assert failed.wait(10)
    workshare.offer(done.set, (), 1)
    assert done.wait(10), "the helper died with the failing task"


def test_backlog_is_bounded():
    """While helpers are busy, at most `count` tasks wait: the queue never grows with calls."""
    gate = threading.Event()
    started = threading.Event()

    def block():
        started.set()
        gate.wait(10)

    workshare.offer(block, (), 1)
    assert started.wait(10)
    busy = workshare.helper_count()          # every helper could be blocked: fill their queue
    for _ in range(50):
        workshare.offer(lambda: None, (), 1)
    assert workshare._tasks.qsize() <= max(1, busy)
    gate.set()


def test_share_items_calls_each_item_once():
    seen = []
    lock = threading.Lock()

    def item(i):
        with lock:
            seen.append(i)

    for helpers in (0, 1, 3):
        seen.clear()
        workshare.share_items(item, 50, helpers)
        assert sorted(seen) == list(range(50))


def test_share_items_raises_what_an_item_raised():
    def item(i):
        if i == 7:
            raise ValueError("item 7")

    with pytest.raises(ValueError, match="item 7"):
        workshare.share_items(item, 20, 1)
