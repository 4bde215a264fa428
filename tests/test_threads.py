"""ufcpu/threads.py: the helper threads, the OpenBLAS gate and the thread counts."""
from __future__ import annotations

import logging
import sys
import threading

import pytest

from ufcpu import threads
from ufcpu.errors import InputError

WAIT = 30   # seconds an event may take on a loaded machine; a pass never waits this long


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    """wait_offer compiled before any helper starts: from a cold kernel cache a helper's first
    call compiles it (with every kernel it can serve from the box, tens of seconds), and the
    waits below are for the threads, not the compiler."""
    threads._check_seconds()


# --- helper threads ------------------------------------------------------------------------------

def test_offered_work_runs_on_helper_threads():
    done = threading.Event()
    seen = []

    def task(tag):
        seen.append((tag, threading.current_thread().name))
        done.set()

    threads.offer(task, ("a",), 1)
    assert done.wait(WAIT), "no helper thread ran the task"
    assert seen[0][0] == "a" and seen[0][1].startswith("ufcpu-helper-")
    assert threading.current_thread().name not in {name for _, name in seen}


def _until(condition, what: str) -> None:
    """Until condition() holds (at most WAIT seconds: else the test fails, saying `what`)."""
    for _ in range(WAIT * 1000):
        if condition():
            return
        threading.Event().wait(0.001)
    pytest.fail(what)


def _until_waiting(gate, n: int) -> None:
    """Until a caller needing n threads waits at the gate."""
    _until(lambda: gate.waiting[n], f"no caller of count {n} came to wait at the gate")


def _block_every_helper():
    """-> an Event that releases them, once every helper is inside a blocking task."""
    gate = threading.Event()
    inside = threading.Semaphore(0)

    def block():
        inside.release()
        gate.wait(WAIT)

    threads._ensure(1)
    for _ in range(threads.helper_count()):
        threads.offer(block, (), 1)
        assert inside.acquire(timeout=WAIT)
    return gate


def test_a_new_offer_is_not_hidden_by_stale_ones():
    """Offers made while every helper is busy (their calls long over) must not keep a new offer
    off the board: the regression behind a test that waited for a task never queued."""
    gate = _block_every_helper()
    for _ in range(3 * threads.helper_count()):
        threads.offer(lambda: None, (), 1)              # stale by the time a helper is free
    done = threading.Event()
    threads.offer(done.set, (), 1)
    gate.set()
    assert done.wait(WAIT), "the newest offer was dropped"


def test_backlog_is_bounded():
    """While helpers are busy, the offers kept and the wake-ups pending never outgrow the helpers."""
    gate = _block_every_helper()
    for _ in range(50):
        threads.offer(lambda: None, (), 1)
    assert len(threads._board) <= threads.helper_count()
    assert threads._wake.qsize() <= threads.helper_count()
    gate.set()


def test_helpers_spin_then_sleep_and_an_offer_wakes_them():
    """With no offers, every helper stops spinning and sleeps (none left running Python); an offer
    then wakes one, which runs it: no wake-up is lost between a helper's last look and its sleep."""
    threads._ensure(2)
    _until(lambda: threads._asleep == threads.helper_count() and threads._awake[0] == 0, "the helpers never slept")
    done = threading.Event()
    threads.offer(done.set, (), 1)
    assert done.wait(WAIT), "an offer did not wake a sleeping helper"
    _until(lambda: threads._asleep == threads.helper_count(), "the woken helper did not go back to sleep")


def test_a_helper_whose_spin_ends_as_a_call_begins_spins_again():
    """A call that begins while a helper is between its spin's end and its sleep finds it awake
    and wakes nobody: the helper must not sleep through that call (its kernels would then run
    on one thread). The rule a helper applies there, checked directly."""
    with threads._lock:
        seen = threads._calls             # what a helper reads before it spins
    with threads.calls(2):                # a call begins (waking the sleeping helpers it needs)
        pass
    assert threads._may_sleep(seen) is False
    with threads._lock:
        now = threads._calls
    assert threads._may_sleep(now) is True   # no call since: it may sleep (counted asleep)
    with threads._lock:
        threads._asleep -= 1              # (no thread really went to sleep here)


def test_a_shared_kernel_gets_a_fresh_state_that_spinning_helpers_watch():
    before = threads._ahead
    state = threads._post(lambda *a: None, (), 1, shared=True)
    assert state is before and threads._ahead is not before and not threads._ahead.any()


def test_no_helpers_for_a_count_of_zero():
    before = threads.helper_count()
    ran = []
    threads.offer(lambda: ran.append(1), (), 0)
    assert threads.helper_count() == before and ran == []


def test_a_failing_task_does_not_end_its_helper():
    done = threading.Event()
    failed = threading.Event()

    def bad():
        failed.set()
        raise RuntimeError("boom")

    threads.offer(bad, (), 1)
    assert failed.wait(WAIT)
    threads.offer(done.set, (), 1)
    assert done.wait(WAIT), "the helper died with the failing task"


# --- counts --------------------------------------------------------------------------------------

def test_resolve_caps_at_the_cores_and_says_so_once(caplog):
    top = threads.available()
    with caplog.at_level(logging.WARNING, logger="ufcpu"):
        assert threads.resolve(top + 997) == top
        assert threads.resolve(top + 997) == top
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"threads={top + 997} is more than the {top} cores available: using {top}"]
    assert threads.resolve(None) == top and threads.resolve(1) == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_resolve_refuses_what_is_not_a_count(bad):
    with pytest.raises(InputError, match="threads must be at least 1"):
        threads.resolve(bad)


def test_calls_nest_and_restore():
    assert threads.count() == threads.available()
    with threads.calls(1):
        assert threads.count() == 1
        with threads.calls(2):
            assert threads.count() == 2
        assert threads.count() == 1
    assert threads.count() == threads.available()


# --- the OpenBLAS gate ---------------------------------------------------------------------------

def test_gate_same_count_shares_other_count_waits(monkeypatch):
    """Two holders of one count at once; a third needing another count enters only when both have
    left, and OpenBLAS is set once per switch (the setter is recorded, not OpenBLAS itself)."""
    sets = []
    monkeypatch.setattr(threads, "_set_blas", sets.append)
    gate = threads._BlasGate()
    gate.acquire(2)
    gate.acquire(2)
    entered = threading.Event()

    def other():
        gate.acquire(1)
        entered.set()
        gate.release()

    t = threading.Thread(target=other)
    t.start()
    _until_waiting(gate, 1)                             # it is waiting, not racing
    assert not entered.is_set() and gate.users == 2
    gate.release()
    assert not entered.is_set() and gate.users == 1
    gate.release()
    assert entered.wait(WAIT)
    t.join(WAIT)
    assert sets == [2, 1] and gate.users == 0


def test_gate_lets_a_waiter_in_before_newer_calls_of_the_count_in_force(monkeypatch):
    monkeypatch.setattr(threads, "_set_blas", lambda n: None)
    gate = threads._BlasGate()
    gate.acquire(2)
    order = []

    def waiter():
        gate.acquire(1)
        order.append("1")
        gate.release()

    t = threading.Thread(target=waiter)
    t.start()
    _until_waiting(gate, 1)

    def newcomer():
        gate.acquire(2)                                 # count 2 is in force, but 1 waits first
        order.append("2")
        gate.release()

    u = threading.Thread(target=newcomer)
    u.start()
    _until_waiting(gate, 2)
    gate.release()
    t.join(WAIT)
    u.join(WAIT)
    assert order == ["1", "2"]


def test_switching_counts_inside_a_call_never_deadlocks():
    """Two threads each holding a count and switching to another one (as attention heads do)."""
    if threads.blas_threads() is None:
        pytest.skip("OpenBLAS not found among the loaded libraries")
    errors = []

    def worker(n):
        try:
            for _ in range(200):
                with threads.calls(n):
                    assert threads.blas_threads() == n
                    with threads._blas(1):
                        assert threads.blas_threads() == 1
                    assert threads.blas_threads() == n
        except BaseException as e:
            errors.append(repr(e))

    ts = [threading.Thread(target=worker, args=(n,)) for n in (2, 2, 3)]
    [t.start() for t in ts]
    [t.join(120) for t in ts]
    assert not any(t.is_alive() for t in ts) and errors == []


def test_the_command_line_says_when_threads_exceed_the_cores():
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import DATA
    root = Path(__file__).resolve().parent.parent
    top = threads.available()
    p = subprocess.run([sys.executable, "-m", "ufcpu.cli", "encode", "--threads", "1000", "-m", str(DATA / "tiny-ufb"),
                        "x"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert p.returncode == 0, p.stderr
    warned = [line for line in p.stderr.splitlines() if "cores" in line]
    assert warned == [f"ufcpu: threads=1000 is more than the {top} cores available: using {top}"], p.stderr


# --- how long helpers spin -----------------------------------------------------------------------

@pytest.mark.parametrize("raw,seconds", [("", 2e-3), ("0", 0.0), ("500", 5e-4), (" 3000 ", 3e-3)])
def test_spin_time_comes_from_the_environment(raw, seconds, monkeypatch):
    from ufcpu import settings
    monkeypatch.setenv("UFCPU_SPIN_US", raw)
    settings.helper_spin_seconds.cache_clear()
    try:
        assert settings.helper_spin_seconds() == pytest.approx(seconds)
        assert (threads._spin_checks() == 0) == (seconds == 0)
    finally:
        settings.helper_spin_seconds.cache_clear()


@pytest.mark.parametrize("raw", ["-1", "2ms", "1.5"])
def test_a_bad_spin_time_is_named_and_the_default_used(raw, monkeypatch, caplog):
    from ufcpu import settings
    monkeypatch.setenv("UFCPU_SPIN_US", raw)
    settings.helper_spin_seconds.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="ufcpu"):
            assert settings.helper_spin_seconds() == pytest.approx(2e-3)
        assert [r.getMessage() for r in caplog.records] == [
            f"UFCPU_SPIN_US={raw!r} is not a whole number of microseconds: using 2000"]
    finally:
        settings.helper_spin_seconds.cache_clear()


@pytest.mark.parametrize("raw,seconds", [("", 0.02), ("700", 7e-4)])
def test_a_process_default_spin_yields_to_the_environment(raw, seconds, monkeypatch):
    """`ufcpu serve` spins its helpers 20 ms between batches, unless UFCPU_SPIN_US says otherwise."""
    from ufcpu import settings
    app = pytest.importorskip("ufcpu.serve.app")   # the server extra
    monkeypatch.setenv("UFCPU_SPIN_US", raw)
    monkeypatch.setattr(sys, "setswitchinterval", lambda s: None)   # this process is not the server's
    try:
        app.tune_process()
        assert settings.helper_spin_seconds() == pytest.approx(seconds)
    finally:
        settings.use_helper_spin_default(settings.HELPER_SPIN_US)
    assert settings.helper_spin_seconds() == pytest.approx(2e-3 if raw == "" else seconds)


def test_helpers_that_never_spin_still_run_every_offer(monkeypatch):
    """UFCPU_SPIN_US=0: helpers sleep at once after each task, and every offer still wakes one."""
    from ufcpu import settings
    monkeypatch.setenv("UFCPU_SPIN_US", "0")
    settings.helper_spin_seconds.cache_clear()
    try:
        for i in range(20):
            done = threading.Event()
            threads.offer(done.set, (), 1)
            assert done.wait(WAIT), f"offer {i} was not run"
    finally:
        settings.helper_spin_seconds.cache_clear()
