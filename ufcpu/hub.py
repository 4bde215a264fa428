"""Name or path -> a converted engine folder, downloading and converting at most once.

- An engine folder (holds engine.json) is used as it is.
- A folder in the Hub layout (config.json + model.safetensors or a torch pickle) is converted
  once into the cache; the cache key covers the config and the weight files' names, sizes and
  modification times, so an edited checkpoint is converted again and an unchanged one never is.
- Anything else is a Hub id, fetched with huggingface_hub (its cache, its progress bar, its
  offline mode: HF_HUB_OFFLINE=1), then converted as above.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from .errors import CacheError, CheckpointError
from .weights import ENGINE_CONFIG, ENGINE_VERSION

DEFAULT_MODEL = "pbelcak/UltraFastBERT-1x11-long"
HUB_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json"]


def cache_dir() -> Path:
    """Where converted checkpoints live: $UFCPU_CACHE, else $XDG_CACHE_HOME/ufcpu, else ~/.cache/ufcpu."""
    if os.environ.get("UFCPU_CACHE"):
        return Path(os.environ["UFCPU_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ufcpu"


def is_engine_folder(p: Path) -> bool:
    return (p / ENGINE_CONFIG).is_file()


def is_hub_folder(p: Path) -> bool:
    return (p / "config.json").is_file()


def _fingerprint(folder: Path) -> str:
    """Identifies a Hub-layout folder's content cheaply (no full read of 755 MB)."""
    h = hashlib.sha256(f"engine-v{ENGINE_VERSION}".encode())
    try:
        for name in sorted(os.listdir(folder)):
            p = folder / name
            if p.is_file() and not name.endswith(".npz"):
                st = p.stat()
                h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
                if name == "config.json":
                    h.update(p.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{e.filename or folder}: cannot read: {e.strerror or e}") from None
    return h.hexdigest()[:16]


def converted_path(folder: Path) -> Path:
    folder = folder.resolve()
    return cache_dir() / "converted" / f"{folder.name}-{_fingerprint(folder)}"


def ensure_converted(folder: Path, log=None) -> tuple[Path, bool]:
    """Hub-layout folder -> (engine folder in the cache, whether this call converted it)."""
    from weights_convert.convert import convert

    dst = converted_path(folder)
    if is_engine_folder(dst):
        return dst, False
    try:
        return convert(folder, dst, log=log), True
    except CacheError as e:
        raise CacheError(f"the conversion cache {cache_dir()} is not writable, so {folder} cannot be converted "
                         f"({str(e).splitlines()[0]}). Set UFCPU_CACHE to a writable folder, or convert once "
                         f"with `ufcpu convert {folder} DST` and load DST") from None


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


def resolve(name_or_path: str | os.PathLike | None, revision: str | None = None,
            log=None) -> tuple[Path, Path]:
    """-> (engine folder, the folder the user meant: local path or Hub snapshot)."""
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{local}: expected a checkpoint folder, got a file")
        if is_engine_folder(local):
            return local, local
        if is_hub_folder(local):
            return ensure_converted(local, log)[0], local
        raise CheckpointError(f"{local}: neither a Hub-layout checkpoint (config.json) nor a "
                              f"converted engine folder ({ENGINE_CONFIG})")
    if not looks_like_repo_id(name):
        raise CheckpointError(f"{name}: no such folder, and not a Hub id of the form 'owner/name'")
    snap = download(name, revision)
    if not is_hub_folder(snap):
        raise CheckpointError(f"{name}: the downloaded snapshot has no config.json")
    return ensure_converted(snap, log)[0], snap


def stderr_log(msg: str) -> None:
    print(f"ufcpu: {msg}", file=sys.stderr)
