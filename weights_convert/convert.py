"""Hub checkpoint -> engine layout, in one place.

The engine layout (files, tensor names, fields, shapes, reorderings) is declared in
`ufcpu/layout.py`; this module maps the Hub's tensor names onto it and writes exactly what it
declares. Every source tensor must be consumed, every engine tensor is produced with the
declared shape, and anything else is an error that names the user's file and the tensor in it.
`decoder.weight` (MLM) is a stored copy of the word embedding (tied weights): checked equal, dropped.

Every check runs once, before anything is written: config, tensor names, shapes and dtypes, the
tied decoder, the tokenizer. The result carries the checked config and tokenizer, so the load
that follows a conversion checks neither again.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ufcpu import folders, layout
from ufcpu.config import Config, check_config
from ufcpu.errors import CacheError, CheckpointError
from ufcpu.safetensors_io import open_tensors, write_tensors
from ufcpu.weights import Checked, open_tokenizer
from weights_convert.hub_config import config_from_hub, read_hub_config, with_label_count

Shape = Callable[[Config], tuple]

# engine name (as declared in ufcpu/layout.py) -> (Hub name, Hub shape). "{i}" = layer index.
HUB_NAMES: dict[str, tuple[str, Shape]] = {
    "embed.word": ("encoder.embedding.word_embedding.weight", lambda c: (c.vocab, c.hidden)),
    "embed.pos_scale": ("encoder.embedding.pos_embedding.scale_factor", lambda c: (1,)),
    "embed.norm.w": ("encoder.embedding.norm.weight", lambda c: (c.hidden,)),
    "embed.norm.b": ("encoder.embedding.norm.bias", lambda c: (c.hidden,)),
    "layer.{i}.ln1.w": ("encoder.layers.{i}.norm1.weight", lambda c: (c.hidden,)),
    "layer.{i}.ln1.b": ("encoder.layers.{i}.norm1.bias", lambda c: (c.hidden,)),
    "layer.{i}.qkv": ("encoder.layers.{i}.attn.self_attention.query_key_value.weight",
                      lambda c: (3 * c.hidden, c.hidden)),
    "layer.{i}.norm_factor": ("encoder.layers.{i}.attn.self_attention.norm_factor", lambda c: ()),
    "layer.{i}.attn_out": ("encoder.layers.{i}.attn.dense.weight", lambda c: (c.hidden, c.hidden)),
    "layer.{i}.ln2.w": ("encoder.layers.{i}.norm2.weight", lambda c: (c.hidden,)),
    "layer.{i}.ln2.b": ("encoder.layers.{i}.norm2.bias", lambda c: (c.hidden,)),
    "layer.{i}.fff.w_in": ("encoder.layers.{i}.ffn.linear_in.weight", lambda c: (c.nodes, c.hidden)),
    "layer.{i}.fff.b_in": ("encoder.layers.{i}.ffn.linear_in.bias", lambda c: (c.nodes,)),
    "layer.{i}.fff.w_out": ("encoder.layers.{i}.ffn.linear_out.weight", lambda c: (c.hidden, c.nodes)),
    "final.ln.w": ("encoder.final_norm.weight", lambda c: (c.hidden,)),
    "final.ln.b": ("encoder.final_norm.bias", lambda c: (c.hidden,)),
    "pooler.w": ("pooler.dense.weight", lambda c: (c.cls_dense_width, c.hidden)),
    "pooler.b": ("pooler.dense.bias", lambda c: (c.cls_dense_width,)),
    "head.w": ("head.weight", lambda c: (c.num_labels, c.cls_dense_width if c.include_ff_layer else c.hidden)),
    "head.b": ("head.bias", lambda c: (c.num_labels,)),
}
TIED_DECODER = "decoder.weight"   # MLM: equal to the word embedding; checked, then dropped
HEAD_WEIGHT = "head.weight"       # classification: its rows are the label count


def plan(cfg: Config) -> list[tuple[str, layout.Entry, tuple]]:
    """Every (Hub name, engine entry, expected Hub shape) of this config, in engine file order."""
    out = []
    for e in layout.entries(cfg):
        hub, shape = HUB_NAMES[e.spec.name]
        out.append((hub.format(i=e.layer) if e.layer is not None else hub, e, shape(cfg)))
    return out


def read_hub_tensors(folder: Path) -> tuple[dict[str, np.ndarray], str]:
    """The checkpoint's tensors (safetensors preferred, else a torch pickle read without torch)."""
    for name in layout.SOURCE_WEIGHTS:
        path = folder / name
        if path.is_file():
            if name.endswith(".safetensors"):
                return open_tensors(path), str(path)
            from weights_convert.torch_pickle import load_torch_checkpoint
            return load_torch_checkpoint(path), str(path)
    raise CheckpointError(f"{folder}: no weights found (expected one of {', '.join(layout.SOURCE_WEIGHTS)})")


def check_layer_count(cfg: Config, tensors: dict, source: str, config_source: str) -> None:
    """Before any per-layer work: a layer count the file cannot hold is refused by the numbers."""
    if cfg.layers > len(tensors):
        raise CheckpointError(f"{config_source}: arch.num_transformer_layers = {cfg.layers}, but {source} "
                              f"holds only {len(tensors)} tensors")


def check_hub_tensors(cfg: Config, tensors: dict[str, np.ndarray], source: str) -> None:
    """The Hub tensors against the config, without converting anything: every expected name
    present and nothing else, every shape as the config predicts, float dtypes, and the tied
    decoder equal to the word embedding (a full read of both: done once per conversion)."""
    rows = plan(cfg)
    expected = {h for h, _, _ in rows} | ({TIED_DECODER} if cfg.task == "mlm" else set())
    missing = sorted(expected - tensors.keys())
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}")
    extra = sorted(tensors.keys() - expected)
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor(s) {', '.join(extra[:5])}"
                              f"{' ...' if len(extra) > 5 else ''} (not part of a {cfg.layers}-layer checkpoint)")
    for hub, _, shape in rows:
        a = tensors[hub]
        if tuple(a.shape) != shape:
            raise CheckpointError(f"{source}: tensor {hub!r} has shape {list(a.shape)}, "
                                  f"the config predicts {list(shape)}")
        if a.dtype not in (np.float32, np.float16, np.float64):
            raise CheckpointError(f"{source}: tensor {hub!r} has dtype {a.dtype}, expected a float type")
    if cfg.task == "mlm":
        check_tied_decoder(tensors[TIED_DECODER], tensors[HUB_NAMES["embed.word"][0]], source)


def check_tied_decoder(dec: np.ndarray, word: np.ndarray, source: str) -> None:
    """The MLM decoder must be the word embedding (the engine keeps one copy): reads both in full."""
    if dec.shape != word.shape or not np.array_equal(np.asarray(dec, np.float32), np.asarray(word, np.float32)):
        raise CheckpointError(f"{source}: {TIED_DECODER!r} differs from the word embedding; "
                              "untied decoders are not supported")


def engine_tensors(cfg: Config, tensors: dict[str, np.ndarray], source: str) -> Iterator[np.ndarray]:
    """The engine tensors in file order, one at a time (so a conversion holds one tensor's copy),
    each checked against its declared shape."""
    for hub, e, _ in plan(cfg):
        out = layout.to_engine(tensors[hub], e.spec, cfg)
        if out.shape != e.shape:   # a reordering that disagrees with the layout's declared shape
            raise CheckpointError(f"{source}: tensor {hub!r} became {list(out.shape)} for {e.name!r}, "
                                  f"the layout declares {list(e.shape)}")
        yield out


def check_source(src: Path) -> tuple[Checked, dict[str, np.ndarray], str]:
    """Read and check everything about a Hub-layout folder, each check once.
    -> (the checked config and tokenizer, the source tensors, the weights file's path)."""
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a folder")
    cfg_path = src / layout.SOURCE_CONFIG
    hub_cfg = read_hub_config(cfg_path)
    cfg = config_from_hub(hub_cfg, str(cfg_path))
    tok_path = src / layout.TOKENIZER_FILE
    if not tok_path.is_file():
        raise CheckpointError(f"{src}: missing {layout.TOKENIZER_FILE}")
    tok = open_tokenizer(tok_path, cfg, vocab_key="arch.embedding.vocab_size")
    tensors, wsource = read_hub_tensors(src)
    check_layer_count(cfg, tensors, wsource, str(cfg_path))
    if cfg.task == "classification":
        if HEAD_WEIGHT not in tensors:
            raise CheckpointError(f"{wsource}: classification checkpoint has no {HEAD_WEIGHT!r}")
        cfg = with_label_count(cfg, hub_cfg, tuple(tensors[HEAD_WEIGHT].shape), str(cfg_path), wsource)
    check_config(cfg, str(cfg_path))
    check_hub_tensors(cfg, tensors, wsource)
    return Checked(config=cfg, tokenizer=tok), tensors, wsource


def convert(src: str | Path, dst: str | Path, log=None) -> Path:
    """Convert a Hub-layout folder to an engine folder -> dst. See convert_checked."""
    return convert_checked(src, dst, log=log)[0]


def convert_checked(src: str | Path, dst: str | Path, log=None, replace: bool = True) -> tuple[Path, Checked]:
    """Convert a Hub-layout folder to an engine folder. Writes to a temporary sibling first and
    renames, so an interrupted conversion never leaves a folder that looks complete.

    Everything about the source is validated before anything is written or logged, so a broken
    checkpoint is one error line. `log(message)` is told once the slow part starts. An existing
    dst is replaced only if it is an engine folder holding nothing but what a conversion writes
    (replace=False: an engine folder already there is kept, as when another process converted
    the same checkpoint first). -> (dst, the checked config and tokenizer).

    Errors: CheckpointError for anything wrong with the source (named by file), CacheError
    (an OSError) when dst cannot be written or must not be replaced."""
    src, dst = Path(src), Path(dst)
    checked, tensors, wsource = check_source(src)
    folders.refuse_foreign_destination(src, dst)
    try:
        return _write_engine(src, dst, checked.config, tensors, wsource, log, replace), checked
    except OSError as e:
        if isinstance(e, CacheError):
            raise
        err = CacheError(f"cannot write the converted checkpoint to {dst}: {e.strerror or e}"
                         f"{f' ({e.filename})' if e.filename else ''}")
        err.errno = e.errno   # so a caller can tell a read-only folder from a full disk
        raise err from None


def _write_engine(src: Path, dst: Path, cfg: Config, tensors: dict[str, np.ndarray], wsource: str, log,
                  replace: bool) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    folders.clean_stale_partials(dst.parent)
    # A private temporary sibling, renamed into place at the end: an interrupted conversion leaves
    # no folder that looks complete, and two processes converting the same checkpoint at once
    # (e.g. pool workers loading on first use) never touch each other's files.
    with folders.partial_folder(dst) as tmp:
        if log:
            log(f"converting {src} -> {dst} (once)")
        rows = plan(cfg)
        write_tensors(tmp / layout.WEIGHTS_FILE, [(e.name, e.shape) for _, e, _ in rows],
                      engine_tensors(cfg, tensors, wsource), {"format": layout.FORMAT, "version": str(layout.VERSION)})
        for name in layout.SOURCE_COPIED:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        meta = {"format": layout.FORMAT, "version": layout.VERSION, "config": cfg.to_json(),
                "source": str(src), "source_weights": wsource,
                "tensors": {e.name: hub for hub, e, _ in rows}}
        # engine.json last: a folder is an engine folder only once everything else is in it
        (tmp / layout.CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        folders.move_into_place(tmp, dst, replace)
    return dst


