"""Name or path -> a converted engine folder, downloading and converting at most once.

- An engine folder (holds engine.json) is used as it is.
- A folder in the Hub layout (config.json + model.safetensors or a torch pickle) is converted
  once into the cache; the cache key covers what the conversion reads (config.json's bytes, the
  weight file's and tokenizer.json's names, sizes and modification times, the engine format's
  version), so an edited checkpoint is converted again and an unchanged one never is.
- Anything else is a Hub id, fetched with huggingface_hub (its cache, its progress bar, its
  offline mode: HF_HUB_OFFLINE=1), then converted as above.

This module is the one place where ufcpu calls the converter (`convert_folder`).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from . import folders, layout
from .errors import CacheError, CheckpointError
from .weights import Checked

DEFAULT_MODEL = "pbelcak/UltraFastBERT-1x11-long"
HUB_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json"]
CONVERTED = "converted"   # under cache_dir(): one engine folder per converted checkpoint
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)

log = logging.getLogger("ufcpu")


def cache_dir() -> Path:
    """Where converted checkpoints live: $UFCPU_CACHE, else $XDG_CACHE_HOME/ufcpu, else ~/.cache/ufcpu."""
    if os.environ.get("UFCPU_CACHE"):
        return Path(os.environ["UFCPU_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ufcpu"


def is_engine_folder(p: Path) -> bool:
    return (p / layout.CONFIG_FILE).is_file()


def is_hub_folder(p: Path) -> bool:
    return (p / layout.SOURCE_CONFIG).is_file()


def _fingerprint(folder: Path) -> str:
    """Identifies what a conversion of a Hub-layout folder reads, cheaply (no full read of 755 MB):
    files a user adds to the folder (notes, other checkpoints' files) do not change it."""
    h = hashlib.sha256(f"{layout.FORMAT}-v{layout.VERSION}".encode())
    weights = next((n for n in layout.SOURCE_WEIGHTS if (folder / n).is_file()), None)
    try:
        h.update((folder / layout.SOURCE_CONFIG).read_bytes())
        for name in (weights, layout.TOKENIZER_FILE):
            if name is not None and (folder / name).is_file():
                st = (folder / name).stat()
                h.update(f"\0{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    except OSError as e:
        raise CheckpointError(f"{e.filename or folder}: cannot read: {e.strerror or e}") from None
    return h.hexdigest()[:16]


def converted_path(folder: Path) -> Path:
    folder = folder.resolve()
    return cache_dir() / CONVERTED / f"{folder.name}-{_fingerprint(folder)}"


def convert_folder(src: Path, dst: Path, log=None, replace: bool = True) -> tuple[Path, Checked]:
    """The one call from ufcpu into the converter: Hub-layout src -> engine folder dst."""
    from weights_convert.convert import convert_checked

    return convert_checked(src, dst, log=log, replace=replace)


def _current(engine: Path) -> bool:
    """An engine folder of this ufcpu's format version (an older cache entry is converted again)."""
    try:
        meta = json.loads((engine / layout.CONFIG_FILE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("format") == layout.FORMAT and meta.get("version") == layout.VERSION


def _touch(engine: Path) -> None:
    """Record a use of a cached conversion (the folder's mtime: `ufcpu cache` shows it)."""
    try:
        os.utime(engine)
    except OSError:   # a read-only cache: nothing to record
        pass


def convert_into_cache(folder: Path, log=None) -> tuple[Path, Checked | None]:
    """Hub-layout folder -> (engine folder in the cache, what this call's conversion checked, or
    None when the cached conversion was used as it is)."""
    dst = converted_path(folder)
    if is_engine_folder(dst) and _current(dst):
        _touch(dst)
        return dst, None
    try:
        return convert_folder(folder, dst, log=log, replace=is_engine_folder(dst))
    except CacheError as e:
        reason = str(e).splitlines()[0]
        if e.errno in _NOT_WRITABLE:
            raise CacheError(f"the conversion cache {cache_dir()} is not writable, so {folder} cannot be converted "
                             f"({reason}). Set UFCPU_CACHE to a writable folder, or convert once "
                             f"with `ufcpu convert {folder} DST` and load DST") from None
        raise CacheError(f"cannot convert {folder} into the conversion cache {cache_dir()} ({reason}). "
                         f"Free some space (`ufcpu cache prune`) or set UFCPU_CACHE to another folder") from None


def ensure_converted(folder: Path, log=None) -> tuple[Path, bool]:
    """Hub-layout folder -> (engine folder in the cache, whether this call converted it)."""
    engine, checked = convert_into_cache(folder, log)
    return engine, checked is not None


def download(repo_id: str, revision: str | None = None) -> Path:
    """Hub id -> snapshot folder. A snapshot already in huggingface_hub's cache is used without
    asking the Hub (fast start-up, works offline); otherwise the files are downloaded, with
    huggingface_hub's progress bar. Pass a revision (branch, tag or commit) to fetch another one."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - it is a hard dependency
        raise CheckpointError("huggingface_hub is not installed: pass a local folder instead") from None
    patterns = HUB_FILES + ["pytorch_model.bin", "*.pth"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass   # not cached yet: download below
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as e:
        raise CheckpointError(_download_error(repo_id, e)) from None
    return Path(path)


def _download_error(repo_id: str, e: Exception) -> str:
    """One line: why the Hub gave nothing, and the ways to run without it."""
    without = ("pass a local folder instead (--model DIR / ufcpu.load(DIR): a Hub-layout checkpoint or one "
               "written by `ufcpu convert`), or make a random checkpoint of the same shape to try ufcpu with "
               "`python -m weights_convert.random_checkpoint DIR`")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return (f"cannot get '{repo_id}': HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache; "
                f"unset HF_HUB_OFFLINE to download it, or {without}")
    kind = type(e).__name__
    msg = str(e).strip().splitlines()[0] if str(e).strip() else kind
    detail = kind if "HF_HUB_OFFLINE" in msg else f"{kind}: {msg}"   # its own advice would contradict ours
    return f"cannot get '{repo_id}' from the Hugging Face Hub ({detail}); offline? {without}"


def looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


@dataclasses.dataclass(frozen=True)
class Located:
    engine: Path              # the engine folder to map
    source: Path              # the folder the user meant: local path or Hub snapshot
    checked: Checked | None   # config and tokenizer, when this call converted (already checked)


def _local(name: str, revision: str | None) -> Path | None:
    local = Path(name).expanduser()
    if not local.exists():
        return None
    if revision is not None:
        log.warning("--revision %s is ignored: %s is a local folder, not a Hub id", revision, local)
    if not local.is_dir():
        raise CheckpointError(f"{local}: expected a checkpoint folder, got a file")
    return local


def locate(name_or_path: str | os.PathLike | None, revision: str | None = None, log=None) -> Located:
    """Name or path -> where its engine folder is, converting it first if needed."""
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    local = _local(name, revision)
    if local is not None:
        if is_engine_folder(local):
            return Located(local, local, None)
        if is_hub_folder(local):
            engine, checked = convert_into_cache(local, log)
            return Located(engine, local, checked)
        raise CheckpointError(f"{local}: neither a Hub-layout checkpoint ({layout.SOURCE_CONFIG}) nor a "
                              f"converted engine folder ({layout.CONFIG_FILE})")
    if not looks_like_repo_id(name):
        raise CheckpointError(f"{name}: no such folder, and not a Hub id of the form 'owner/name'")
    snap = download(name, revision)
    if not is_hub_folder(snap):
        raise CheckpointError(f"{name}: the downloaded snapshot has no config.json")
    engine, checked = convert_into_cache(snap, log)
    return Located(engine, snap, checked)


def resolve(name_or_path: str | os.PathLike | None, revision: str | None = None,
            log=None) -> tuple[Path, Path]:
    """-> (engine folder, the folder the user meant: local path or Hub snapshot)."""
    found = locate(name_or_path, revision, log)
    return found.engine, found.source


def source_folder(name: str, revision: str | None = None) -> Path:
    """A Hub id or a local Hub-layout folder -> the folder to convert (`ufcpu convert`)."""
    local = _local(name, revision)
    src = local if local is not None else (download(name, revision) if looks_like_repo_id(name) else None)
    if src is None:
        raise CheckpointError(f"{name}: no such folder, and not a Hub id")
    if not is_hub_folder(src):
        raise CheckpointError(f"{src}: not a Hub-layout checkpoint (no {layout.SOURCE_CONFIG})")
    return src


# --- the cache: `ufcpu cache` ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CacheEntry:
    path: Path
    bytes: int
    source: str         # the folder it was converted from ("?" when engine.json is unreadable)
    last_used: float    # seconds since the epoch


def _entry(p: Path) -> CacheEntry:
    size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
    try:
        source = str(json.loads((p / layout.CONFIG_FILE).read_bytes()).get("source", "?"))
    except (OSError, ValueError, AttributeError, RecursionError):
        source = "?"
    return CacheEntry(p, size, source, p.stat().st_mtime)


def cache_entries() -> list[CacheEntry]:
    """Every converted checkpoint in the cache, most recently used first."""
    root = cache_dir() / CONVERTED
    if not root.is_dir():
        return []
    found = [_entry(p) for p in root.iterdir() if p.is_dir() and folders.PARTIAL not in p.name
             and is_engine_folder(p)]
    return sorted(found, key=lambda e: -e.last_used)


def prune_cache(older_than_days: float | None = None, everything: bool = False) -> list[Path]:
    """Remove converted checkpoints not used for older_than_days (or all of them), and the
    partial folders of conversions that died. Only files a conversion writes are deleted.
    -> the folders removed."""
    root = cache_dir() / CONVERTED
    if not root.is_dir():
        return []
    removed = folders.clean_stale_partials(root)
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    for e in cache_entries():
        if everything or (cutoff is not None and e.last_used < cutoff):
            folders.remove_written(e.path)
            if not e.path.exists():
                removed.append(e.path)
            else:
                log.warning("%s: kept, it holds files a conversion did not write", e.path)
    return removed
