"""ufcpu.malloc: freed activation memory is reused instead of being faulted in again."""
import os
import subprocess
import sys

import pytest

from ufcpu import malloc

# A layer's worth of allocations (3 MB and 9 MB activations, a GEMM), freed and made again: the
# minor page faults per repeat are counted in a fresh process.
FAULTS = r'''
import resource, numpy as np
from ufcpu import malloc
applied = malloc.keep_freed_memory()
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


def faults_per_step(tuning: str) -> tuple[bool, float]:
    env = {**os.environ, "UFCPU_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", float(faults)


@glibc
def test_reused_blocks_fault_no_pages():
    applied, faults = faults_per_step("1")
    assert applied
    assert faults <= 2, f"{faults} page faults per repeated step: freed blocks were returned to the kernel"


@glibc
def test_opt_out_leaves_malloc_alone():
    applied, _ = faults_per_step("0")
    assert not applied


@pytest.mark.parametrize("value, on", [("1", True), ("", True), ("0", False), ("off", False), ("False", False)])
def test_switch(monkeypatch, value, on):
    monkeypatch.setenv("UFCPU_MALLOC_TUNING", value)
    assert malloc.enabled() is on


def test_loading_a_model_applies_it(monkeypatch):
    import ufcpu
    from conftest import DATA
    calls = []
    monkeypatch.setattr(malloc, "keep_freed_memory", lambda: calls.append(1) or True)
    ufcpu.load(DATA / "tiny-ufb")
    assert calls == [1]
