"""Compiled kernels' cache (ufcpu/settings.py): only in a folder nobody else can write, since Numba
unpickles what it finds there; damaged files compiled again; the first compile announced once.

Subprocesses, each with a private cache folder: a kernel cache is per process, once loaded.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, load_fixture
from ufcpu import settings

ROOT = Path(__file__).resolve().parent.parent
TINY = DATA / "tiny-ufb"
COMPILING = "ufcpu: compiling kernels (once, a few seconds)..."
NO_DAC = "-dac_override,-dac_read_search,-fowner"


# --- which folders qualify -------------------------------------------------------------------------

def test_a_private_folder_qualifies(tmp_path):
    folder = tmp_path / "k"
    folder.mkdir(mode=0o700)
    assert settings.cache_folder_problem(str(folder)) is None
    folder.chmod(0o755)                                       # others may read, not write
    assert settings.cache_folder_problem(str(folder)) is None


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o707, 0o720, 0o702])
def test_a_folder_others_can_write_is_refused(tmp_path, mode):
    folder = tmp_path / "k"
    folder.mkdir()
    folder.chmod(mode)
    assert settings.cache_folder_problem(str(folder)) == f"can be written by other users (mode {mode:04o})"


def test_a_folder_of_another_user_is_refused(tmp_path):
    folder = tmp_path / "k"
    folder.mkdir(mode=0o700)
    me = os.getuid()
    assert settings.cache_folder_problem(str(folder), uid=me + 1) == f"is owned by uid {me}, not by uid {me + 1}"
    if me == 0:                                               # as root: really owned by someone else
        os.chown(folder, 12345, -1)
        assert settings.cache_folder_problem(str(folder)) == "is owned by uid 12345, not by uid 0"


def test_a_symlink_is_refused_even_to_a_good_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert settings.cache_folder_problem(str(link)) == "is a symbolic link"
    (tmp_path / "file").write_text("x")
    assert settings.cache_folder_problem(str(tmp_path / "file")) == "is not a folder"


# --- end to end ------------------------------------------------------------------------------------

PROBE = r"""
import json, os, ufcpu
from ufcpu import settings
vec = ufcpu.load({model!r}).encode("hello kernel cache")
print(json.dumps({{"cache": settings.kernel_cache_dir(), "env": os.environ.get("NUMBA_CACHE_DIR"),
                  "vec": vec.tolist()}}))
"""


def run(env: dict, drop: tuple = (), unprivileged: bool = False, code: str = PROBE) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    for k in drop:
        full.pop(k, None)
    cmd = [sys.executable, "-c", "import logging, sys; logging.basicConfig(level=logging.INFO, "
           "format='ufcpu: %(message)s', stream=sys.stderr)\n" + code.format(model=str(TINY))]
    if unprivileged and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: file permissions cannot be enforced")
        cmd = [setpriv, f"--bounding-set={NO_DAC}", f"--inh-caps={NO_DAC}", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=900, cwd=tempfile.gettempdir())


def result(p: subprocess.CompletedProcess) -> dict:
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(res["vec"], load_fixture("tiny-ufb").encode("hello kernel cache"), atol=1e-6)
    return res


def cache_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".nbi", ".nbc"))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A private kernel cache filled by one run -> (folder, that run)."""
    folder = tmp_path_factory.mktemp("kernels") / "cache"
    p = run({"NUMBA_CACHE_DIR": str(folder)})
    return folder, p


def test_first_run_says_once_that_it_compiles(compiled):
    folder, p = compiled
    res = result(p)
    assert res["cache"] == str(folder) and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert p.stderr.splitlines().count(COMPILING) == 1, p.stderr
    assert len(cache_files(folder)) >= 8


def test_a_cached_run_is_silent(compiled):
    folder, _ = compiled
    p = run({"NUMBA_CACHE_DIR": str(folder)})
    result(p)
    assert p.stderr.strip() == "", p.stderr


def test_damaged_cache_files_are_compiled_again(compiled, tmp_path):
    """20 random bytes over every index and data file: one line, the right answer, and the
    next run finds a sound cache again."""
    folder = tmp_path / "cache"
    shutil.copytree(compiled[0], folder)
    rng = random.Random(14)
    files = cache_files(folder)
    for f in files:
        data = bytearray(f.read_bytes())
        at = rng.randrange(0, max(1, len(data) - 20))
        data[at:at + 20] = bytes(rng.randrange(256) for _ in range(20))
        f.write_bytes(bytes(data))
    p = run({"NUMBA_CACHE_DIR": str(folder)})
    result(p)
    lines = p.stderr.strip().splitlines()
    assert lines[0] == f"ufcpu: compiled kernels in {folder / os.listdir(folder)[0]} were unreadable " \
                       "(damaged files): compiling them again", lines
    assert lines[1:] == [COMPILING], lines
    again = run({"NUMBA_CACHE_DIR": str(folder)})
    result(again)
    assert again.stderr.strip() == "", again.stderr


def test_numba_cache_dir_others_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    home = tmp_path / "home"
    home.mkdir()
    p = run({"NUMBA_CACHE_DIR": str(shared), "HOME": str(home)}, drop=("XDG_CACHE_HOME",))
    res = result(p)
    assert f"ufcpu: not caching compiled kernels in {shared} (NUMBA_CACHE_DIR): it can be written by " \
           "other users (mode 0777)" in p.stderr.splitlines(), p.stderr
    assert res["cache"] != str(shared) and res["env"] == str(shared)
    assert cache_files(shared) == []


def test_a_temporary_folder_made_by_someone_else_is_not_used(tmp_path):
    """The package and ~/.cache not writable: the per-user temporary folder is the last choice,
    and one that already exists with the wrong mode (made first by another user) is refused."""
    pkg = tmp_path / "site"
    for name in ("ufcpu", "weights_convert"):
        shutil.copytree(ROOT / name, pkg / name, ignore=shutil.ignore_patterns("__pycache__", "*.nb[ic]"))
    home = tmp_path / "home"
    home.mkdir()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    trap = tmp / f"ufcpu-numba-{os.getuid()}"
    trap.mkdir()
    trap.chmod(0o777)
    for p in [pkg, *pkg.rglob("*"), home]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        p = run({"PYTHONPATH": str(pkg), "HOME": str(home), "TMPDIR": str(tmp),
                 "UFCPU_CACHE": str(tmp_path / "ufcpu-cache")}, drop=("NUMBA_CACHE_DIR", "XDG_CACHE_HOME"),
                unprivileged=True)
        res = result(p)
        assert res["cache"] is None
        assert f"ufcpu: not caching compiled kernels in {trap} (temporary folder): it can be written by " \
               "other users (mode 0777)" in p.stderr.splitlines(), p.stderr
        assert p.stderr.splitlines().count(COMPILING) == 1
        assert cache_files(trap) == [] and cache_files(pkg) == []

        trap.rmdir()                                          # no one got there first: made 0700, used
        p = run({"PYTHONPATH": str(pkg), "HOME": str(home), "TMPDIR": str(tmp),
                 "UFCPU_CACHE": str(tmp_path / "ufcpu-cache")}, drop=("NUMBA_CACHE_DIR", "XDG_CACHE_HOME"),
                unprivileged=True)
        assert result(p)["cache"] == str(trap)
        assert stat.S_IMODE(trap.stat().st_mode) == 0o700 and cache_files(trap)
    finally:
        for p in [pkg, *pkg.rglob("*"), home]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_numbas_subfolder_is_private_whatever_the_umask(tmp_path):
    """Numba makes a subfolder per source folder inside the cache folder, with the umask's mode:
    with umask 002 that would be group-writable. It is made 0700 first."""
    folder = tmp_path / "cache"
    p = run({"NUMBA_CACHE_DIR": str(folder)}, code="import os; os.umask(0o002)\n" + PROBE)
    assert result(p)["cache"] == str(folder)
    subs = [d for d in folder.iterdir() if d.is_dir()]
    assert subs and all(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in subs), subs
    assert "not caching" not in p.stderr


def test_a_subfolder_others_can_write_is_not_used(compiled, tmp_path):
    folder = tmp_path / "cache"
    shutil.copytree(compiled[0], folder)
    sub = next(d for d in folder.iterdir() if d.is_dir())
    sub.chmod(0o777)
    p = run({"NUMBA_CACHE_DIR": str(folder)})
    result(p)
    assert f"ufcpu: not caching compiled kernels: {sub} can be written by other users (mode 0777)" \
        in p.stderr.splitlines(), p.stderr
    assert p.stderr.splitlines().count(COMPILING) == 1         # compiled, the files there not loaded
