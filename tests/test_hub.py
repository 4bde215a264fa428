"""Resolving a name to an engine folder: Hub ids through a local fake Hub cache (the real Hub
cannot be reached from CI), Hub-layout folders converted once, converted folders used as they are."""
from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, load_fixture
import ufcpu
from ufcpu import hub

REPO = "pbelcak/UltraFastBERT-1x11-long"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root: Path, src: Path, repo: str = REPO) -> Path:
    """The layout huggingface_hub writes: blobs, refs/main -> commit, snapshots/<commit>/<file> links."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / COMMIT
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    snap.mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    for f in src.iterdir():
        if f.name == "expected.npz":
            continue
        blob = repo_dir / "blobs" / f"blob-{f.name}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


def run_python(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def hub_env(tmp_path):
    hub_cache = tmp_path / "hf" / "hub"
    fake_hub_cache(hub_cache, DATA / "tiny-ufb")
    return {"HF_HUB_CACHE": str(hub_cache), "HF_HOME": str(tmp_path / "hf"),
            "UFCPU_CACHE": str(tmp_path / "ufcpu"),
            # nothing listens there: any attempt to reach the network fails at once
            "HF_ENDPOINT": "http://127.0.0.1:9"}


CODE = """
import json, numpy as np, ufcpu
m = ufcpu.load({name!r})
print(json.dumps({{"source": str(m.source), "engine": str(m.path), "vec": m.encode("hello").tolist()}}))
"""


@pytest.mark.parametrize("offline", ["1", "0"])
def test_default_hub_id_from_local_cache(hub_env, offline):
    """The default model id resolves through huggingface_hub's cache, offline or with the network down."""
    p = run_python(CODE.format(name=None), {**hub_env, "HF_HUB_OFFLINE": offline})
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert COMMIT in res["source"]
    assert res["engine"].startswith(hub_env["UFCPU_CACHE"])
    np.testing.assert_allclose(res["vec"], load_fixture("tiny-ufb").encode("hello"), atol=1e-6)


def test_unknown_hub_id_offline_is_a_clear_error(hub_env):
    p = run_python("import ufcpu; ufcpu.load('someone/not-cached')", {**hub_env, "HF_HUB_OFFLINE": "1"})
    assert p.returncode != 0
    assert "ufcpu.errors.CheckpointError" in p.stderr and "someone/not-cached" in p.stderr
    p = subprocess.run(["ufcpu", "encode", "-m", "someone/not-cached", "x"], capture_output=True, text=True,
                       env={**os.environ, **hub_env, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "HF_HUB_OFFLINE" in p.stderr


def test_local_folder_converts_once(tmp_path, monkeypatch):
    monkeypatch.setenv("UFCPU_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "ckpt"
    shutil.copytree(DATA / "mini-ufb", src)
    engine, converted = hub.ensure_converted(src)
    assert converted and (engine / "engine.safetensors").is_file()
    stamp = (engine / "engine.safetensors").stat().st_mtime_ns
    again, converted_again = hub.ensure_converted(src)
    assert again == engine and not converted_again
    assert (engine / "engine.safetensors").stat().st_mtime_ns == stamp
    m = ufcpu.load(src)
    assert m.path == engine
    # editing the checkpoint invalidates the cached conversion
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg, indent=1))
    assert hub.ensure_converted(src)[0] != engine


def test_converted_folder_is_used_as_is(tmp_path, monkeypatch):
    from weights_convert.convert import convert
    monkeypatch.setenv("UFCPU_CACHE", str(tmp_path / "cache"))
    dst = convert(DATA / "tiny-ufb", tmp_path / "engine")
    m = ufcpu.load(dst)
    assert m.path == dst
    assert not (tmp_path / "cache").exists()
    np.testing.assert_allclose(m.encode("hello"), load_fixture("tiny-ufb").encode("hello"), atol=1e-6)


def test_weights_are_memory_mapped_read_only():
    m = load_fixture("tiny-ufb")
    w = m.weights.layers[0].w_in
    assert not w.flags.writeable
    base = w
    while getattr(base, "base", None) is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    assert isinstance(base, mmap.mmap), type(base)


def test_weights_map_where_huge_pages_cannot_be_asked_for(monkeypatch):
    """MADV_HUGEPAGE is Linux-only: without it the file is mapped all the same."""
    monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)
    m = ufcpu.load(DATA / "tiny-ufb")
    np.testing.assert_allclose(m.encode("hello"), load_fixture("tiny-ufb").encode("hello"), atol=0)


@pytest.mark.parametrize("name,words", [
    ("not a hub id at all", "not a Hub id"),
    (str(DATA / "tiny-ufb" / "config.json"), "got a file"),
])
def test_bad_names(name, words):
    with pytest.raises(ufcpu.CheckpointError, match=words):
        ufcpu.load(name)
