"""ufcpu.settings.tune_malloc: freed activation memory is reused instead of being faulted in again;
the command line tunes malloc, a library user opts in."""
import os
import subprocess
import sys

import pytest

from ufcpu import settings

# A layer's worth of allocations (3 MB and 9 MB activations, a GEMM), freed and made again: the
# minor page faults per repeat are counted in a fresh process.
FAULTS = r'''
import os, resource, numpy as np
from ufcpu import settings
applied = settings.tune_malloc() if os.environ.get("TUNE") == "1" else False
def step():
    a = np.ones((1024, 768), np.float32)
    b = np.ones((1024, 2304), np.float32)
    return float((a @ np.ones((768, 768), np.float32))[0, 0] + b[0, 0])
step()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 20)
'''

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                           reason="mallopt is glibc's")


def faults_per_step(tune: str) -> tuple[bool, float]:
    env = {**os.environ, "TUNE": tune}
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", float(faults)


@glibc
def test_reused_blocks_fault_no_pages():
    applied, faults = faults_per_step("1")
    assert applied
    assert faults <= 2, f"{faults} page faults per repeated step: freed blocks were returned to the kernel"


@glibc
def test_without_tuning_blocks_fault_again():
    """What the tuning saves: without it the same steps fault pages in (so the test above can fail)."""
    applied, faults = faults_per_step("0")
    assert not applied
    assert faults > 100, faults


@pytest.mark.parametrize("value, on", [("1", True), ("", True), ("0", False), ("off", False), ("False", False)])
def test_switch(monkeypatch, value, on):
    monkeypatch.setenv("UFCPU_MALLOC_TUNING", value)
    assert settings.malloc_tuning_wanted() is on


def test_loading_a_model_leaves_malloc_alone(monkeypatch):
    import ufcpu
    from conftest import DATA
    calls = []
    monkeypatch.setattr(settings, "tune_malloc", lambda: calls.append(1) or True)
    ufcpu.load(DATA / "tiny-ufb")
    assert calls == []


@pytest.mark.parametrize("value, calls", [(None, [1]), ("0", [])])
def test_the_command_line_tunes_malloc_unless_told_not_to(monkeypatch, value, calls):
    from ufcpu import cli
    from conftest import DATA
    seen = []
    monkeypatch.setattr(settings, "tune_malloc", lambda: seen.append(1) or True)
    if value is None:
        monkeypatch.delenv("UFCPU_MALLOC_TUNING", raising=False)
    else:
        monkeypatch.setenv("UFCPU_MALLOC_TUNING", value)
    assert cli.main(["encode", "--model", str(DATA / "tiny-ufb"), "x"]) == 0
    assert seen == calls
