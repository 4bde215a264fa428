"""Conversion hardening: files get the umask's mode, nothing ufcpu did not write is deleted, a killed
conversion's partial folder is cleaned, the cache key ignores files a user drops in a folder,
`ufcpu cache` lists and prunes, absurd sizes are refused before any per-layer work, a full disk
is one line, and config values that are ignored are warned about."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ufcpu
from conftest import DATA
from test_cli import assert_one_line_error
from ufcpu import CheckpointError, folders, hub, layout
from ufcpu.errors import CacheError
from weights_convert import convert as conv
from weights_convert.random_checkpoint import write_random_checkpoint

DIMS = dict(layers=1, hidden=16, heads=2, depth=2, vocab=256, max_seq=16)


def run(*args, ok: bool = True, env: dict | None = None):
    """The CLI as a subprocess -> (stdout, stderr, returncode)."""
    p = subprocess.run([sys.executable, "-m", "ufcpu.cli", *args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=300)
    if ok:
        assert p.returncode == 0, p.stderr
    return p.stdout, p.stderr, p.returncode


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return Path(shutil.copytree(DATA / "tiny-ufb", tmp_path / "ckpt"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("UFCPU_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


# --- file modes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_every_written_file_honours_the_umask(ckpt, tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        engine = conv.convert(ckpt, tmp_path / "engine")
    finally:
        os.umask(old)
    assert engine.stat().st_mode & 0o777 == dir_mode
    modes = {p.name: p.stat().st_mode & 0o777 for p in engine.iterdir()}
    assert modes == {name: file_mode for name in modes} and layout.WEIGHTS_FILE in modes


# --- never delete what ufcpu did not write -------------------------------------------------------

def test_convert_into_the_checkpoint_itself_is_refused(ckpt):
    (ckpt / layout.CONFIG_FILE).write_text("{}")    # even when it looks like an engine folder
    before = snapshot(ckpt)
    _, err, code = run("convert", str(ckpt), str(ckpt), ok=False)
    assert_one_line_error(err, code, f"{ckpt}: is the checkpoint being converted")
    assert snapshot(ckpt) == before


def test_convert_refuses_an_engine_folder_holding_the_users_files(ckpt, tmp_path):
    dst = conv.convert(ckpt, tmp_path / "engine")
    (dst / "NOTES.txt").write_text("mine")
    before = snapshot(dst)
    _, err, code = run("convert", str(ckpt), str(dst), ok=False)
    assert_one_line_error(err, code, f"{dst}: holds files a conversion did not write (NOTES.txt)")
    assert snapshot(dst) == before
    (dst / "NOTES.txt").unlink()
    out, _, _ = run("convert", str(ckpt), str(dst))        # only ufcpu's files: replaced
    assert out.strip() == str(dst) and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "engine"]


def test_a_subfolder_in_an_engine_folder_is_not_deleted(ckpt, tmp_path):
    dst = conv.convert(ckpt, tmp_path / "engine")
    (dst / "runs").mkdir()
    with pytest.raises(CacheError, match="holds files a conversion did not write \\(runs\\)"):
        conv.convert(ckpt, dst)
    assert (dst / "runs").is_dir()


# --- partial folders of killed conversions ----------------------------------------------------------

KILLED = """
import sys, time
from weights_convert import convert as conv
real = conv.engine_tensors
def slow(*a, **kw):
    for i, t in enumerate(real(*a, **kw)):
        yield t
        if i == 2:
            print("writing", flush=True)
            time.sleep(300)
conv.engine_tensors = slow
conv.convert(sys.argv[1], sys.argv[2])
"""


def _age(p: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(p / folders.LOCK_FILE, (t, t))


def test_a_conversion_killed_by_sigkill_leaves_a_partial_the_next_one_removes(ckpt, tmp_path):
    dst = tmp_path / "out" / "engine"
    p = subprocess.Popen([sys.executable, "-c", KILLED, str(ckpt), str(dst)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        partial = next((tmp_path / "out").glob("engine.partial-*"))
        _age(partial, 3600)
        assert folders.stale_partials(tmp_path / "out") == []      # its writer is alive: its lock is held
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert partial.is_dir() and (partial / layout.WEIGHTS_FILE).stat().st_size > 0
    fresh = tmp_path / "out" / "other.partial-0000"                  # a live conversion that just started
    fresh.mkdir()
    (fresh / folders.LOCK_FILE).write_text("")
    foreign = tmp_path / "out" / "mine.partial-notes"                 # not a conversion's folder
    foreign.mkdir()
    conv.convert(ckpt, dst)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["engine", "mine.partial-notes", "other.partial-0000"]


def test_cache_prune_removes_stale_partials(ckpt, cache):
    hub.ensure_converted(ckpt)
    root = cache / hub.CONVERTED
    stale = root / "x.partial-dead"
    stale.mkdir()
    (stale / layout.WEIGHTS_FILE).write_bytes(b"\0" * 100)
    (stale / folders.LOCK_FILE).write_text("12345\n")
    _age(stale, 3600)
    out, _, _ = run("cache", "prune")
    assert out.split() == [str(stale)] and not stale.exists()
    assert len(hub.cache_entries()) == 1     # nothing else pruned without --older-than / --all


# --- the cache key and `ufcpu cache` ----------------------------------------------------------------

def test_the_cache_key_ignores_files_a_user_adds(ckpt, cache):
    key = hub.converted_path(ckpt)
    (ckpt / "NOTES.txt").write_text("notes")
    (ckpt / "expected.npz").touch()
    assert hub.converted_path(ckpt) == key
    for name in ("tokenizer.json", "model.safetensors"):   # size and mtime: no full read of the weights
        t = time.time() + 10
        os.utime(ckpt / name, (t, t))
        assert hub.converted_path(ckpt) != key, name
        key = hub.converted_path(ckpt)
    t = time.time() + 20
    os.utime(ckpt / "config.json", (t, t))
    assert hub.converted_path(ckpt) == key                   # config.json: its content
    edit_json(ckpt / "config.json", lambda c: c.update(note=1))
    assert hub.converted_path(ckpt) != key


def test_an_empty_cache_says_so(cache):
    out, err, _ = run("cache")
    assert out == "" and err.strip() == f"ufcpu: no converted checkpoints in {cache}"


def test_cache_lists_and_prunes(ckpt, tmp_path, cache):
    other = Path(shutil.copytree(DATA / "mini-ufb", tmp_path / "other"))
    a, _ = hub.ensure_converted(ckpt)
    b, _ = hub.ensure_converted(other)
    old = time.time() - 3 * 86400
    os.utime(b, (old, old))
    out, _, _ = run("cache")
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith(f"{a.name}  <- {ckpt}") and lines[1].endswith(f"{b.name}  <- {other}")
    size = sum(p.stat().st_size for p in a.iterdir()) / 2 ** 20
    assert lines[0].split()[0] == f"{size:.1f}" and "MB  last used" in lines[0]
    ufcpu.load(other)                        # a use makes it recent again
    out, _, _ = run("cache", "prune", "--older-than", "1")
    assert out.strip() == ""
    os.utime(b, (old, old))
    out, _, _ = run("cache", "prune", "--older-than", "1")
    assert out.split() == [str(b)] and not b.exists() and a.is_dir()
    (a / "NOTES.txt").write_text("mine")     # a file ufcpu did not write is never deleted
    out, err, _ = run("cache", "prune", "--all")
    assert out.strip() == "" and "kept, it holds files a conversion did not write" in err
    assert sorted(p.name for p in a.iterdir()) == ["NOTES.txt"]
    _, err, code = run("cache", "--all", ok=False)
    assert_one_line_error(err, code, "--older-than and --all go with `ufcpu cache prune`")


# --- sizes bounded before any per-layer work ----------------------------------------------------------

def test_an_absurd_layer_count_is_refused_at_once(ckpt):
    edit_json(ckpt / "config.json", lambda c: c["arch"].update(num_transformer_layers=1_000_000_000))
    p = subprocess.run([sys.executable, "-c", f"import ufcpu; ufcpu.load({str(ckpt)!r})"],
                       capture_output=True, text=True, timeout=120)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and last.startswith("ufcpu.errors.CheckpointError: "), p.stderr
    assert "arch.num_transformer_layers = 1000000000, but" in last and f"{ckpt / 'model.safetensors'} holds only 27 tensors" in last


def test_an_absurd_layer_count_in_engine_json_is_refused_at_once(ckpt, tmp_path):
    engine = conv.convert(ckpt, tmp_path / "engine")
    edit_json(engine / layout.CONFIG_FILE, lambda m: m["config"].update(layers=1_000_000_000))
    with pytest.raises(CheckpointError, match="the config has 1000000000 layers, the file holds only 26 tensors"):
        ufcpu.load(engine)


def test_max_seq_length_is_bounded(ckpt, tmp_path):
    engine = conv.convert(ckpt, tmp_path / "engine")
    edit_json(ckpt / "config.json", lambda c: c["arch"]["embedding"].update(max_seq_length=1_000_000_000))
    with pytest.raises(CheckpointError, match="arch.embedding.max_seq_length = 1000000000 is more positions "
                                              "than this engine supports \\(at most 8192\\)"):
        ufcpu.load(ckpt)
    edit_json(engine / layout.CONFIG_FILE, lambda m: m["config"].update(max_seq=8193))
    with pytest.raises(CheckpointError, match="max_seq 8193 is more positions than this engine supports"):
        ufcpu.load(engine)


def test_max_seq_length_up_to_the_bound_is_accepted(tmp_path):
    src = write_random_checkpoint(tmp_path / "long", **{**DIMS, "max_seq": 8192})
    assert ufcpu.load(src).config.max_seq == 8192


# --- a full disk --------------------------------------------------------------------------------------

def _enospc(*a, **kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_converting_is_one_line(ckpt, tmp_path, monkeypatch, cache):
    monkeypatch.setattr(conv, "write_tensors", _enospc)
    dst = tmp_path / "out"
    with pytest.raises(CacheError) as e:
        conv.convert(ckpt, dst)
    assert str(e.value) == f"cannot write the converted checkpoint to {dst}: No space left on device"
    assert not dst.exists() and list(tmp_path.glob("out.partial-*")) == []
    with pytest.raises(CacheError) as e:
        ufcpu.load(ckpt)
    assert str(e.value).startswith(f"cannot convert {ckpt} into the conversion cache {cache} (cannot write")
    assert "No space left on device" in str(e.value) and "\n" not in str(e.value)
    assert list((cache / hub.CONVERTED).iterdir()) == []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_on_a_real_filesystem(ckpt, tiny_tmpfs):
    """tiny-ufb's engine file is 3 MB: a 1 MB tmpfs fills up mid-write."""
    _, err, code = run("convert", str(ckpt), str(tiny_tmpfs / "engine"), ok=False)
    assert_one_line_error(err, code, f"cannot write the converted checkpoint to {tiny_tmpfs / 'engine'}: "
                                     "No space left on device")
    assert list(tiny_tmpfs.iterdir()) == []
    _, err, code = run("encode", "-m", str(ckpt), "x", ok=False, env={"UFCPU_CACHE": str(tiny_tmpfs)})
    progress, error = err.strip().splitlines()          # the log line that the conversion started, and one error
    assert progress.startswith(f"ufcpu: converting {ckpt} -> {tiny_tmpfs}") and progress.endswith("(once)")
    assert_one_line_error(error, code, f"cannot convert {ckpt} into the conversion cache {tiny_tmpfs}",
                          "No space left on device", "ufcpu cache prune")
    assert list((tiny_tmpfs / hub.CONVERTED).iterdir()) == []


# --- values that are ignored are said so --------------------------------------------------------------

def test_a_classifier_whose_labels_disagree_with_its_head_is_warned_about(tmp_path, caplog):
    src = write_random_checkpoint(tmp_path / "cls", **DIMS, task="classification", num_labels=3, head_dim=8)
    edit_json(src / "config.json", lambda c: (c["arch"].update(num_labels=5),
                                              c.update(id2label={"0": "a", "1": "b"})))
    with caplog.at_level(logging.WARNING, logger="ufcpu"):
        m = ufcpu.load(src)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "ufcpu")
    assert f"{src / 'config.json'}: arch.num_labels is 5 but the head has 3 outputs (head.weight): using 3" in text
    assert "id2label has 2 labels but the head has 3 outputs (head.weight): labels dropped (LABEL_0..)" in text
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 2
    assert m.config.num_labels == 3 and m.config.id2label is None
    assert m.predict(["x"])[0]["label"].startswith("LABEL_")


def test_a_classifier_whose_labels_agree_is_not_warned_about(tmp_path, caplog):
    src = write_random_checkpoint(tmp_path / "cls", **DIMS, task="classification", num_labels=2, head_dim=8)
    edit_json(src / "config.json", lambda c: c.update(id2label={"0": "neg", "1": "pos"}))
    with caplog.at_level(logging.WARNING, logger="ufcpu"):
        m = ufcpu.load(src)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert m.config.id2label == ("neg", "pos")


def test_revision_with_a_local_folder_is_warned_about(ckpt, cache, caplog):
    with caplog.at_level(logging.WARNING, logger="ufcpu"):
        ufcpu.load(ckpt, revision="v2")
    assert f"--revision v2 is ignored: {ckpt} is a local folder, not a Hub id" in caplog.text
    _, err, _ = run("encode", "-m", str(ckpt), "--revision", "v2", "x")
    assert "--revision v2 is ignored" in err
