"""Concurrency and deployment: several Python threads calling one model, a model used in a forked
`multiprocessing` pool, a read-only package folder (JIT cache), a read-only conversion cache.

Everything runs in a subprocess: a threading layer that aborts, or a forked child that is
terminated, must fail the test, not take pytest down with it. Read-only folders are enforced for
root too (CI runs as root): the subprocess runs without the capabilities that bypass file
permissions (setpriv).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, load_fixture

ROOT = Path(__file__).resolve().parent.parent
TINY = DATA / "tiny-ufb"
NO_DAC = "-dac_override,-dac_read_search,-fowner"


def python(code: str, env: dict | None = None, unprivileged: bool = False, timeout: int = 600,
           drop_env: tuple = ()) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (this checkout's packages first on the path, started
    outside it so that the current folder does not shadow PYTHONPATH)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    for k in drop_env:
        full_env.pop(k, None)
    cmd = [sys.executable, "-c", code]
    if unprivileged:
        cmd = _unpriv(cmd)
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=tempfile.gettempdir())


def _unpriv(cmd: list[str]) -> list[str]:
    """cmd without the capabilities that let root ignore file permissions."""
    if os.geteuid() != 0:
        return cmd
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file permissions cannot be enforced")
    return [setpriv, f"--bounding-set={NO_DAC}", f"--inh-caps={NO_DAC}", *cmd]


def last_json(p: subprocess.CompletedProcess):
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def read_only(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def writable(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


@pytest.fixture
def cleanup_ro():
    paths: list[Path] = []
    yield paths
    for p in paths:
        if p.exists():
            writable(p)


# --- threads -------------------------------------------------------------------------------------

THREADS_CODE = r"""
import json, threading, numpy as np, ufcpu
model = ufcpu.load({model!r})
jobs = [([f"text {{k}} number {{i}} " * (1 + (i * 7 + k) % 11) for i in range(24)], 1 + k % 5) for k in range(20)]
serial = [model.encode(texts, batch_size=bs) for texts, bs in jobs]       # one thread first
serial_tokens = model.encode(jobs[0][0][:5], pooling="none")
got, errors = [None] * len(jobs), []
def worker(w):
    try:
        for j in range(w, len(jobs), 4):                                     # 4 threads x 5 calls
            got[j] = model.encode(jobs[j][0], batch_size=jobs[j][1])
        if w == 0:
            toks = model.encode(jobs[0][0][:5], pooling="none")
            if not all(np.array_equal(a, b) for a, b in zip(toks, serial_tokens)):
                errors.append("pooling=none differs")
    except BaseException as e:
        errors.append(repr(e))
threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
from ufcpu import threads as ufcpu_threads
print(json.dumps({{"errors": errors, "helpers": ufcpu_threads.helper_count(),
                  "equal": [bool(np.array_equal(a, b)) for a, b in zip(got, serial)]}}))
"""

EVERY_SIZE_SHARED = "from ufcpu import kernels; kernels._SHARED.update((k, 1) for k in kernels._SHARED)\n"


def test_encode_from_four_threads_equals_serial():
    """4 Python threads x 5 calls each on one model give exactly the serial results, with every
    kernel offered to the helper threads at any size (the tiny model is below every threshold)."""
    p = python(EVERY_SIZE_SHARED + THREADS_CODE.format(model=str(TINY)))
    res = last_json(p)
    assert res["errors"] == []
    assert res["helpers"] >= 1
    assert res["equal"] == [True] * 20, res


THREAD_COUNT_CODE = r"""
import json, threading, ufcpu
from ufcpu import kernels, threads
model = ufcpu.load({model!r}, threads=1)
seen = []
inner = threads.run
def spy(kernel, *args):
    if kernel is kernels.fff_walk:
        seen.append((threading.current_thread().name, threads.count()))
    return inner(kernel, *args)
threads.run = spy
model.encode("main thread")
t = threading.Thread(target=model.encode, args=("other thread",), name="worker"); t.start(); t.join()
print(json.dumps({{"seen": seen, "max": threads.available()}}))
"""


def test_thread_count_is_honoured_in_every_thread():
    """load(threads=1) must mean one thread in whichever Python thread calls the model (the
    kernels' thread setting is per Python thread)."""
    res = last_json(python(THREAD_COUNT_CODE.format(model=str(TINY))))
    counts = {name: n for name, n in res["seen"]}
    assert counts["MainThread"] == 1
    assert counts["worker"] == 1


TWO_MODELS_CODE = r"""
import json, threading, numpy as np, ufcpu
from ufcpu import heads, kernels, threads
from ufcpu import model as fwd
kernels._SHARED.update((k, 1) for k in kernels._SHARED)      # helpers at every size
models = {{1: ufcpu.load({model!r}, threads=1), 2: ufcpu.load({model!r}, threads=2)}}
texts = [f"text {{i}} number " * (1 + i % 9) for i in range(24)]
def call(n):
    m = models[n]
    return m.encode(texts, batch_size=32), m.encode(texts[:5], batch_size=2), m.mlm_logits(m.tokenize(texts[:3])["input_ids"])

tag = threading.local()                                       # which model this Python thread is calling
seen = []                                                     # (model's threads, what, kernel count, OpenBLAS count)
def spy(what, fn):
    def wrapped(*a, **k):
        seen.append((tag.n, what, threads.count(), threads.blas_threads()))
        out = fn(*a, **k)
        seen.append((tag.n, what, threads.count(), threads.blas_threads()))
        return out
    return wrapped
threads.run = spy("kernel", threads.run)
fwd.linear = spy("linear", fwd.linear)
heads.mlm_logits = spy("mlm_logits", heads.mlm_logits)

tag.n = None
serial = {{}}
for n in (1, 2, 1, 2):                                          # alternately, one Python thread
    tag.n = n
    serial.setdefault(n, []).append(call(n))
same_serial = all(np.array_equal(a, b) for n in (1, 2) for a, b in zip(*serial[n]))
got, errors = {{}}, []
def worker(first):
    tag.n = None
    try:
        for r in range(6):                                     # alternately and concurrently
            n = 1 + (first + r) % 2
            tag.n = n
            got.setdefault(n, []).append(call(n))
    except BaseException as e:
        errors.append(repr(e))
ts = [threading.Thread(target=worker, args=(f,)) for f in (0, 1)]
[t.start() for t in ts]; [t.join() for t in ts]
equal = [bool(np.array_equal(a, b)) for n in (1, 2) for res in got[n] for a, b in zip(res, serial[n][0])]
print(json.dumps({{"errors": errors, "same_serial": same_serial, "equal": equal, "seen": seen,
                  "blas_found": threads.blas_threads() is not None}}))
"""


def test_two_models_keep_their_own_thread_counts():
    """Models of threads=1 and threads=2, called alternately from one Python thread and then
    alternately and concurrently from two: every kernel launch (attention's included) uses its
    model's count, and OpenBLAS runs at its model's count around every projection, kernel and MLM
    head (OpenBLAS's own report, before and after each); the results equal the serial ones bit for bit."""
    res = last_json(python(TWO_MODELS_CODE.format(model=str(TINY))))
    assert res["errors"] == [] and res["same_serial"]
    assert res["equal"] and all(res["equal"]), res["equal"]
    seen = res["seen"]
    whats = {what for _, what, _, _ in seen}
    assert {"kernel", "linear", "mlm_logits"} <= whats, whats
    for n, what, kernel_count, blas in seen:
        assert kernel_count == n, (n, what, kernel_count)
        if res["blas_found"]:
            assert blas == n, (n, what, blas)
    assert len(seen) > 200


# --- fork ----------------------------------------------------------------------------------------

FORK_CODE = r"""
import json, multiprocessing as mp, numpy as np, ufcpu
model = ufcpu.load({model!r})
texts = ["hello world", "fast feedforward", "a", "the tree walk", "", "x y z"]
parent = [model.encode(t) for t in texts]          # the parent has run every kernel
def work(t):
    return model.encode(t)
if __name__ == "__main__":
    result = {{}}
    try:
        with mp.get_context("fork").Pool(2) as pool:
            got = pool.map_async(work, texts).get(timeout=60)
        result["close"] = [bool(np.allclose(a, b, atol=1e-6, rtol=0)) for a, b in zip(got, parent)]
    except mp.TimeoutError:
        result["error"] = "timeout: the pool's workers died"
    except Exception as e:
        result["error"] = f"{{type(e).__name__}}: {{e}}"
    print(json.dumps(result))
"""


def test_model_used_in_a_forked_pool():
    """A model loaded (and used, with helper threads) in the parent, then used by a 'fork'
    pool's workers, which start helpers of their own: the same results as in the parent, never
    a hang."""
    p = python(EVERY_SIZE_SHARED + FORK_CODE.format(model=str(TINY)))
    res = last_json(p)
    assert "error" not in res, (res, p.stderr[-2000:])
    assert res["close"] == [True] * 6, res


OMP_FORK_CODE = r"""
import json, multiprocessing as mp, ufcpu
model = ufcpu.load({model!r})
model.encode("parent")
if __name__ == "__main__":
    child = mp.get_context("fork").Process(target=model.encode, args=("child",))
    child.start(); child.join(60)
    print(json.dumps({{"exitcode": child.exitcode}}))
"""


def test_fork_whatever_numba_threading_layer_is_set():
    """ufcpu runs no Numba thread pool, so even NUMBA_THREADING_LAYER=omp (GNU OpenMP, which
    cannot survive a fork once used) leaves a forked child working."""
    p = python(EVERY_SIZE_SHARED + OMP_FORK_CODE.format(model=str(TINY)), env={"NUMBA_THREADING_LAYER": "omp"})
    res = last_json(p)
    assert res["exitcode"] == 0, p.stderr[-2000:]


# --- read-only package folder (Numba's JIT cache) ------------------------------------------------

RO_CODE = r"""
import json, os, ufcpu
from ufcpu import settings
model = ufcpu.load({model!r})
print(json.dumps({{"file": ufcpu.__file__, "numba_cache": settings.kernel_cache_dir(),
                  "numba_cache_env": os.environ.get("NUMBA_CACHE_DIR"),
                  "vec": model.encode("hello read-only world").tolist()}}))
"""


@pytest.fixture
def ro_package(tmp_path, cleanup_ro) -> Path:
    """The two packages copied to a folder nobody may write (no __pycache__, as a fresh install)."""
    pkg = tmp_path / "site"
    for name in ("ufcpu", "weights_convert"):
        shutil.copytree(ROOT / name, pkg / name, ignore=shutil.ignore_patterns("__pycache__", "*.nb[ic]"))
    read_only(pkg)
    cleanup_ro.append(pkg)
    return pkg


def test_read_only_package_caches_kernels_in_the_user_cache(ro_package, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"PYTHONPATH": str(ro_package), "HOME": str(home), "UFCPU_CACHE": str(tmp_path / "ufcpu-cache")}
    drop = ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")
    code = RO_CODE.format(model=str(TINY))
    first = last_json(python(code, env=env, unprivileged=True, drop_env=drop))
    assert first["file"].startswith(str(ro_package))
    assert first["numba_cache"] == str(home / ".cache" / "ufcpu" / "numba")
    assert first["numba_cache_env"] is None                      # nothing exported to child processes
    cached = list((home / ".cache" / "ufcpu" / "numba").rglob("*.nbi"))
    assert len(cached) >= 4, cached                              # the kernels were cached there
    second = last_json(python(code, env=env, unprivileged=True, drop_env=drop))   # from that cache
    np.testing.assert_array_equal(first["vec"], second["vec"])
    np.testing.assert_allclose(first["vec"], load_fixture("tiny-ufb").encode("hello read-only world"), atol=1e-6)
    assert not list(ro_package.rglob("*.nbi")) and not list(ro_package.rglob("__pycache__"))


def test_read_only_package_and_read_only_home(ro_package, tmp_path, cleanup_ro):
    """Nowhere to cache compiled kernels: import and inference still work (compiled each run)."""
    home = tmp_path / "home"
    home.mkdir()
    read_only(home)
    cleanup_ro.append(home)
    env = {"PYTHONPATH": str(ro_package), "HOME": str(home), "UFCPU_CACHE": str(tmp_path / "ufcpu-cache")}
    p = python(RO_CODE.format(model=str(TINY)), env=env, unprivileged=True,
               drop_env=("NUMBA_CACHE_DIR", "XDG_CACHE_HOME"))
    assert p.returncode == 0, p.stderr
    res = last_json(p)
    np.testing.assert_allclose(res["vec"], load_fixture("tiny-ufb").encode("hello read-only world"), atol=1e-6)


def test_read_only_numba_cache_dir(tmp_path, cleanup_ro):
    """NUMBA_CACHE_DIR set by the user to a folder that cannot be written."""
    ncache = tmp_path / "numba-cache"
    ncache.mkdir()
    read_only(ncache)
    cleanup_ro.append(ncache)
    p = python(RO_CODE.format(model=str(TINY)), unprivileged=True,
               env={"NUMBA_CACHE_DIR": str(ncache), "UFCPU_CACHE": str(tmp_path / "ufcpu-cache")})
    assert p.returncode == 0, p.stderr
    res = last_json(p)
    np.testing.assert_allclose(res["vec"], load_fixture("tiny-ufb").encode("hello read-only world"), atol=1e-6)


# --- read-only conversion cache ------------------------------------------------------------------

def test_read_only_cache_with_a_converted_model(tmp_path, cleanup_ro):
    cache = tmp_path / "ufcpu-cache"
    code = RO_CODE.format(model=str(TINY))
    env = {"UFCPU_CACHE": str(cache)}
    first = last_json(python(code, env=env))                  # converts into the cache
    read_only(cache)
    cleanup_ro.append(cache)
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    second = last_json(python(code, env=env, unprivileged=True))
    np.testing.assert_array_equal(first["vec"], second["vec"])
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before


@pytest.mark.parametrize("where", ["read-only", "under-a-read-only-folder"])
def test_read_only_cache_without_a_converted_model(tmp_path, cleanup_ro, where):
    base = tmp_path / "ro"
    base.mkdir()
    cache = base if where == "read-only" else base / "cache" / "ufcpu"
    read_only(base)
    cleanup_ro.append(base)
    env = {"UFCPU_CACHE": str(cache)}
    p = python("import ufcpu; ufcpu.load(%r)" % str(TINY), env=env, unprivileged=True)
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("ufcpu.errors.CacheError: the conversion cache "), last
    assert f"{cache} is not writable, so {TINY} cannot be converted" in last
    assert "Permission denied" in last and "Set UFCPU_CACHE to a writable folder" in last

    p = subprocess.run(_unpriv([sys.executable, "-m", "ufcpu.cli", "encode", "-m", str(TINY), "x"]),
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                       timeout=600, cwd=tempfile.gettempdir())
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith(f"ufcpu: error: the conversion cache {cache} is not writable"), lines[0]
    assert list(base.rglob("*")) == []                        # nothing was created

