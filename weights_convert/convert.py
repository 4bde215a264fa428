"""Hub checkpoint -> engine layout, in one place.

Every layout change the engine wants is done here, once, with the reason next to it:

- attention's fused QKV weight is stored per head interleaved (head j owns rows 192j..192j+191:
  64 of Q, then 64 of K, then 64 of V). We regroup the rows to Q-block | K-block | V-block, each
  head-major, so that one GEMM gives [S, 3H] whose three thirds reshape straight to [S, heads, 64].
- the FFF output weight is [H, N] (column n = node n's output vector); we store it node-major
  [N, H] so a visited node's vector is one contiguous 3 KB row.
- `decoder.weight` is a stored copy of the word embedding (tied weights): checked equal, dropped.
- 0-dim scalars become [1] arrays.

The mapping is a table: every source tensor must be consumed, every engine tensor produced with
the shape the config predicts, and anything else is an error that names the tensor.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ufcpu.config import Config, check_config, config_from_hub, read_hub_config
from ufcpu.errors import CacheError, CheckpointError
from ufcpu.weights import ENGINE_CONFIG, ENGINE_FORMAT, ENGINE_VERSION, ENGINE_WEIGHTS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "pytorch_model.pth")


# --- transforms: (array, config) -> array --------------------------------------------------------

def _same(a: np.ndarray, cfg: Config) -> np.ndarray:
    return a


def _scalar(a: np.ndarray, cfg: Config) -> np.ndarray:  # [] or [1] -> [1]
    return a.reshape(1)


def _qkv_regroup(a: np.ndarray, cfg: Config) -> np.ndarray:  # [3H, H] interleaved -> [3H, H] grouped
    heads, hd, h = cfg.heads, cfg.head_size, cfg.hidden
    return a.reshape(heads, 3, hd, h).transpose(1, 0, 2, 3).reshape(3 * h, h)


def _node_major(a: np.ndarray, cfg: Config) -> np.ndarray:  # [H, N] -> [N, H]
    return a.T


# --- the table ---------------------------------------------------------------------------------
# (hub name, engine name, transform, hub shape as a function of the config). "{i}" = layer index.
Shape = Callable[[Config], tuple]

EMBEDDING: list[tuple[str, str, Callable, Shape]] = [
    ("encoder.embedding.word_embedding.weight", "embed.word", _same, lambda c: (c.vocab, c.hidden)),
    ("encoder.embedding.pos_embedding.scale_factor", "embed.pos_scale", _scalar, lambda c: (1,)),
    ("encoder.embedding.norm.weight", "embed.norm.w", _same, lambda c: (c.hidden,)),
    ("encoder.embedding.norm.bias", "embed.norm.b", _same, lambda c: (c.hidden,)),
]
LAYER = [
    ("encoder.layers.{i}.norm1.weight", "layer.{i}.ln1.w", _same, lambda c: (c.hidden,)),
    ("encoder.layers.{i}.norm1.bias", "layer.{i}.ln1.b", _same, lambda c: (c.hidden,)),
    ("encoder.layers.{i}.attn.self_attention.query_key_value.weight", "layer.{i}.qkv", _qkv_regroup,
     lambda c: (3 * c.hidden, c.hidden)),
    ("encoder.layers.{i}.attn.self_attention.norm_factor", "layer.{i}.norm_factor", _scalar, lambda c: ()),
    ("encoder.layers.{i}.attn.dense.weight", "layer.{i}.attn_out", _same, lambda c: (c.hidden, c.hidden)),
    ("encoder.layers.{i}.norm2.weight", "layer.{i}.ln2.w", _same, lambda c: (c.hidden,)),
    ("encoder.layers.{i}.norm2.bias", "layer.{i}.ln2.b", _same, lambda c: (c.hidden,)),
    ("encoder.layers.{i}.ffn.linear_in.weight", "layer.{i}.fff.w_in", _same, lambda c: (c.nodes, c.hidden)),
    ("encoder.layers.{i}.ffn.linear_in.bias", "layer.{i}.fff.b_in", _same, lambda c: (c.nodes,)),
    ("encoder.layers.{i}.ffn.linear_out.weight", "layer.{i}.fff.w_out", _node_major, lambda c: (c.hidden, c.nodes)),
]
FINAL = [
    ("encoder.final_norm.weight", "final.ln.w", _same, lambda c: (c.hidden,)),
    ("encoder.final_norm.bias", "final.ln.b", _same, lambda c: (c.hidden,)),
]
# Sequence classification: label count C comes from head.weight itself (MODEL.md section 7).
CLS_POOLER = [
    ("pooler.dense.weight", "pooler.w", _same, lambda c: (c.head_dim, c.hidden)),
    ("pooler.dense.bias", "pooler.b", _same, lambda c: (c.head_dim,)),
]
CLS_HEAD = [
    ("head.weight", "head.w", _same, lambda c: (c.num_labels, c.head_dim if c.include_ff_layer else c.hidden)),
    ("head.bias", "head.b", _same, lambda c: (c.num_labels,)),
]
TIED_DECODER = "decoder.weight"   # MLM: equal to the word embedding; checked, then dropped


def mapping(cfg: Config) -> list[tuple[str, str, Callable, tuple]]:
    """Every (hub name, engine name, transform, expected hub shape) for this config."""
    rows = list(EMBEDDING)
    for i in range(cfg.layers):
        rows += [(h.format(i=i), e.format(i=i), f, s) for h, e, f, s in LAYER]
    rows += FINAL
    if cfg.task == "classification":
        rows += (CLS_POOLER if cfg.include_ff_layer else []) + CLS_HEAD
    return [(h, e, f, s(cfg)) for h, e, f, s in rows]


def engine_shapes(cfg: Config) -> dict[str, tuple]:
    """Engine tensor name -> shape, predicted from the config alone (used to validate a load)."""
    dummy = {}
    for hub, eng, f, shape in mapping(cfg):
        probe = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=shape, strides=(0,) * len(shape))
        dummy[eng] = f(probe, cfg).shape
    return dummy


def _finish_config(cfg: Config, tensors: dict[str, np.ndarray], source: str) -> Config:
    """Fill in what only the tensors know: the label count of a classifier."""
    if cfg.task != "classification":
        return cfg
    if "head.weight" not in tensors:
        raise CheckpointError(f"{source}: classification checkpoint has no 'head.weight'")
    if tensors["head.weight"].ndim != 2 or tensors["head.weight"].shape[0] < 1:
        raise CheckpointError(f"{source}: tensor 'head.weight' has shape {list(tensors['head.weight'].shape)}, "
                              "expected [num_labels >= 1, width]")
    c = int(tensors["head.weight"].shape[0])
    if cfg.id2label is not None and len(cfg.id2label) != c:
        cfg = Config(**{**cfg.__dict__, "id2label": None})
    return Config(**{**cfg.__dict__, "num_labels": c})


def check_hub_tensors(cfg: Config, tensors: dict[str, np.ndarray], source: str) -> Config:
    """Validate the Hub tensors against the config without converting anything: every expected
    name present and nothing else, every shape as the config predicts, float dtypes, and the tied
    decoder equal to the word embedding. -> the config completed with the label count."""
    cfg = _finish_config(cfg, tensors, source)
    rows = mapping(cfg)
    expected = {h for h, _, _, _ in rows}
    if cfg.task == "mlm":
        expected.add(TIED_DECODER)
    missing = sorted(expected - tensors.keys())
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}")
    extra = sorted(tensors.keys() - expected)
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor(s) {', '.join(extra[:5])}"
                              f"{' ...' if len(extra) > 5 else ''} (not part of a {cfg.layers}-layer checkpoint)")
    for hub, _, _, shape in rows:
        a = tensors[hub]
        if tuple(a.shape) != shape:
            raise CheckpointError(f"{source}: tensor {hub!r} has shape {list(a.shape)}, "
                                  f"the config predicts {list(shape)}")
        if a.dtype not in (np.float32, np.float16, np.float64):
            raise CheckpointError(f"{source}: tensor {hub!r} has dtype {a.dtype}, expected a float type")
    if cfg.task == "mlm":
        dec, word = tensors[TIED_DECODER], tensors[EMBEDDING[0][0]]
        if tuple(dec.shape) != (cfg.vocab, cfg.hidden) or not np.array_equal(
                np.asarray(dec, np.float32), np.asarray(word, np.float32)):
            raise CheckpointError(f"{source}: 'decoder.weight' differs from the word embedding; "
                                  "untied decoders are not supported")
    return cfg


def hub_to_engine(cfg: Config, tensors: dict[str, np.ndarray], source: str) -> tuple[Config, dict[str, np.ndarray]]:
    """Map Hub tensors to engine tensors (float32, C-contiguous), validating names and shapes."""
    cfg = check_hub_tensors(cfg, tensors, source)
    out = {}
    for hub, eng, f, _ in mapping(cfg):
        out[eng] = np.ascontiguousarray(f(np.asarray(tensors[hub], dtype=np.float32), cfg))
    return cfg, out


def read_hub_tensors(folder: Path) -> tuple[dict[str, np.ndarray], str]:
    """The checkpoint's tensors (safetensors preferred, else a torch pickle read without torch)."""
    from ufcpu.safetensors_io import open_tensors

    for name in HUB_WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if name.endswith(".safetensors"):
                return open_tensors(path), str(path)
            from weights_convert.torch_pickle import load_torch_checkpoint
            return load_torch_checkpoint(path), str(path)
    raise CheckpointError(f"{folder}: no weights found (expected one of {', '.join(HUB_WEIGHT_FILES)})")


def convert(src: str | Path, dst: str | Path, log=None) -> Path:
    """Convert a Hub-layout folder to an engine folder. Writes to a temporary sibling first and
    renames, so an interrupted conversion never leaves a folder that looks complete.

    Everything about the source is validated before anything is written or logged (config,
    tokenizer, safetensors header, tensor names, shapes and dtypes, the tied decoder), so a broken
    checkpoint is one error line. `log(message)` is told once the slow part starts.

    Errors: CheckpointError for anything wrong with the source (named by file), CacheError
    (an OSError) when `dst` cannot be written."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a folder")
    hub_cfg = read_hub_config(src / "config.json")
    cfg = config_from_hub(hub_cfg, str(src / "config.json"))
    for name in TOKENIZER_FILES[:1]:
        if not (src / name).is_file():
            raise CheckpointError(f"{src}: missing {name}")
    check_tokenizer(src / "tokenizer.json", cfg)
    tensors, wsource = read_hub_tensors(src)
    cfg = check_hub_tensors(cfg, tensors, wsource)
    check_config(cfg, wsource)

    if dst.exists() and not (dst / ENGINE_CONFIG).is_file() and (not dst.is_dir() or any(dst.iterdir())):
        raise CacheError(f"{dst}: exists and is not an engine folder; refusing to replace it")
    try:
        return _write_engine(src, dst, cfg, tensors, wsource, log)
    except OSError as e:
        if isinstance(e, CacheError):
            raise
        where = e.filename or dst
        raise CacheError(f"cannot write the converted checkpoint to {dst}: {e.strerror or e} ({where})") from None


def _write_engine(src: Path, dst: Path, cfg: Config, tensors: dict[str, np.ndarray], wsource: str, log) -> Path:
    from safetensors.numpy import save_file

    # A private temporary sibling, renamed into place at the end: an interrupted conversion leaves
    # no folder that looks complete, and two processes converting the same checkpoint at once
    # (e.g. pool workers loading on first use) never touch each other's files.
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dst.name + ".partial-", dir=dst.parent))
    try:
        if log:
            log(f"converting {src} -> {dst} (once)")
        cfg, engine = hub_to_engine(cfg, tensors, wsource)
        save_file(engine, str(tmp / ENGINE_WEIGHTS))
        del engine
        meta = {"format": ENGINE_FORMAT, "version": ENGINE_VERSION, "config": cfg.to_json(),
                "source": str(src)}
        for name in TOKENIZER_FILES + ("config.json",):
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        # engine.json last: a folder is an engine folder only once everything else is in it
        (tmp / ENGINE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o755)   # mkdtemp makes it 0700; the cache may be shared read-only later
        if dst.exists() and (dst / ENGINE_CONFIG).is_file():
            shutil.rmtree(dst)
        try:
            os.rename(tmp, dst)
        except OSError:
            if (dst / ENGINE_CONFIG).is_file():   # another process finished the same conversion first
                return dst
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def check_tokenizer(path: Path, cfg: Config) -> None:
    """Load the tokenizer as the engine will, so a broken tokenizer.json is refused at conversion,
    naming the checkpoint's own file (not its copy in the cache); its ids must fit the embedding."""
    from ufcpu.tokenizer import Tokenizer

    tok = Tokenizer(path, cfg.max_seq)
    if tok.vocab_size > cfg.vocab:
        raise CheckpointError(f"{path}: the tokenizer produces ids up to {tok.vocab_size - 1}, the embedding "
                              f"has only {cfg.vocab} rows (arch.embedding.vocab_size)")
