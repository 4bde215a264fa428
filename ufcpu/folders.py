"""Engine folders on disk: written privately, moved into place, removed file by file.

A conversion writes into `DST.partial-XXXX` (locked with an flock while it writes, so a process
that dies, even by SIGKILL, leaves a folder any later conversion can recognise as stale) and
renames it to DST when complete. Removal deletes only the files a conversion writes
(`layout.WRITTEN_FILES`): a folder holding anything else is never ufcpu's to delete.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import time
from pathlib import Path
from typing import Iterator

from . import layout
from .errors import CacheError

STALE_PARTIAL_SECONDS = 600       # a partial folder older than this whose lock nobody holds is removed
PARTIAL = ".partial-"
LOCK_FILE = ".partial.lock"


def refuse_foreign_destination(src: Path, dst: Path) -> None:
    """dst must not be the source, and may hold only what a conversion writes: a conversion never
    deletes a file it did not create."""
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise CacheError(f"{dst}: is the checkpoint being converted; choose another folder")
    if not dst.exists():
        return
    if not dst.is_dir():
        raise CacheError(f"{dst}: exists and is not an engine folder; refusing to replace it")
    names = sorted(os.listdir(dst))
    if not names:
        return
    if not (dst / layout.CONFIG_FILE).is_file():
        raise CacheError(f"{dst}: exists and is not an engine folder; refusing to replace it")
    foreign = [n for n in names if n not in layout.WRITTEN_FILES or not (dst / n).is_file()]
    if foreign:
        raise CacheError(f"{dst}: holds files a conversion did not write ({', '.join(foreign[:3])}); "
                         "refusing to replace it")


@contextlib.contextmanager
def partial_folder(dst: Path) -> Iterator[Path]:
    """A new `dst.partial-XXXX` folder (mode from the umask), locked while this process writes it
    (an flock: released when the process dies, however it dies), removed if still there at the end."""
    while True:
        tmp = dst.parent / f"{dst.name}{PARTIAL}{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp)
            break
        except FileExistsError:
            continue
    lock = open(tmp / LOCK_FILE, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield tmp
    finally:
        lock.close()
        if tmp.exists():
            remove_written(tmp, extra=(LOCK_FILE,))


def move_into_place(tmp: Path, dst: Path, replace: bool) -> None:
    """A complete partial folder -> dst (replace: an engine folder already at dst is replaced,
    else kept). The lock file is dropped first: it is not part of an engine folder."""
    (tmp / LOCK_FILE).unlink()
    if (dst / layout.CONFIG_FILE).is_file():
        if not replace:
            return   # another process finished the same conversion first: theirs is as good
        aside = dst.parent / f"{dst.name}.old-{secrets.token_hex(4)}"
        os.rename(dst, aside)
        os.rename(tmp, dst)
        remove_written(aside)
        return
    if dst.is_dir():
        dst.rmdir()   # empty (refuse_foreign_destination checked), so rename can replace it
    try:
        os.rename(tmp, dst)
    except OSError:
        if not (dst / layout.CONFIG_FILE).is_file():   # else another process finished first
            raise


def remove_written(folder: Path, extra: tuple[str, ...] = ()) -> None:
    """Delete the files a conversion writes, then the folder if that left it empty: never a file
    ufcpu did not create."""
    for name in (*layout.WRITTEN_FILES, *extra):
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def stale_partials(parent: Path, min_age: float = STALE_PARTIAL_SECONDS) -> list[Path]:
    """`*.partial-*` folders under parent left by conversions that died (their lock is free and
    they are older than min_age seconds: a conversion that just made its folder is not yet locked)."""
    out = []
    try:
        candidates = [p for p in parent.iterdir() if PARTIAL in p.name and (p / LOCK_FILE).is_file()]
    except OSError:
        return out
    now = time.time()
    for p in candidates:
        try:
            if now - (p / LOCK_FILE).stat().st_mtime < min_age:
                continue
            with open(p / LOCK_FILE, "r+") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)   # held by a live conversion: skipped
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.ENOENT, errno.EPERM):
                raise
            continue
        out.append(p)
    return out


def clean_stale_partials(parent: Path, min_age: float = STALE_PARTIAL_SECONDS) -> list[Path]:
    """Remove what stale_partials finds (only the files a conversion writes). -> the folders removed."""
    removed = []
    for p in stale_partials(parent, min_age):
        remove_written(p, extra=(LOCK_FILE,))
        if not p.exists():
            removed.append(p)
    return removed
