"""Shared fixtures: the reference checkpoints under tests/data and models loaded from them.

Every test session converts into its own temporary cache (UFCPU_CACHE), so the tests never
read or write the user's cache.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
BENCH = Path(__file__).resolve().parent.parent / "bench"
MLM_FIXTURES = ("tiny-ufb", "mini-ufb")
ALL_FIXTURES = MLM_FIXTURES + ("tiny-ufb-cls",)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    old = os.environ.get("UFCPU_CACHE")
    os.environ["UFCPU_CACHE"] = str(tmp_path_factory.mktemp("ufcpu-cache"))
    yield
    if old is None:
        os.environ.pop("UFCPU_CACHE", None)
    else:
        os.environ["UFCPU_CACHE"] = old


_models: dict = {}


def load_fixture(name: str, **kw):
    import ufcpu
    key = (name, tuple(sorted(kw.items())))
    if key not in _models:
        _models[key] = ufcpu.load(DATA / name, **kw)
    return _models[key]


def expected(name: str):
    return np.load(DATA / name / "expected.npz")


def texts_of(name: str) -> list[str]:
    return [str(t) for t in expected(name)["texts"]]


def bench_module(name: str):
    """bench/<name>.py as a module (its folder on the path while it loads, as when it runs)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up while it runs
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod
