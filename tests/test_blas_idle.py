"""ufcpu sets OPENBLAS_THREAD_TIMEOUT before NumPy loads OpenBLAS, so that OpenBLAS's idle workers
sleep instead of spinning on the cores the Numba kernels need next (ufcpu/settings.py)."""
import json
import os
import subprocess
import sys

import pytest

PROBE = r'''
import json, os, sys
{first}
import ufcpu
from ufcpu import settings
print(json.dumps({{"timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT"), "sleep": settings.blas_workers_sleep()}}))
'''


def probe(first: str = "", **env) -> dict:
    full = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], env=full, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_set_when_ufcpu_comes_first():
    assert probe() == {"timeout": "4", "sleep": True}


def test_reported_when_numpy_came_first():
    assert probe("import numpy") == {"timeout": "4", "sleep": False}


@pytest.mark.parametrize("first", ["", "import numpy"])
def test_the_users_value_is_kept(first):
    assert probe(first, OPENBLAS_THREAD_TIMEOUT="12") == {"timeout": "12", "sleep": True}
