"""The library surface: `ufcpu.load(...)` returns a `Model`.

A Model owns the config, the memory-mapped weights and the tokenizer. It checks inputs, batches
texts by length (sorted, so that texts of one length travel together), and calls the pure
forward pass in model.py, which runs a batch on its real tokens only.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Set
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import heads, hub, quant
from . import model as fwd
from . import threads as _threads
from .config import Config
from .errors import InputError, InputTypeError
from .textio import windows
from .tokenizer import Report, Summary, pad, token_budget_batches
from .weights import Checked, open_engine

log = logging.getLogger("ufcpu")
f32 = np.float32


def load(name_or_path: str | Path | None = None, revision: str | None = None,
         threads: int | None = None, check: bool = False, ffn: str = "fff",
         precision: str = "float32") -> "Model":
    """Load a checkpoint: a Hub id (default pbelcak/UltraFastBERT-1x11-long), a Hub-layout
    folder or a converted engine folder. The first load of a checkpoint converts it into the
    cache; later loads map the converted weights directly.

    threads: threads for both NumPy's BLAS and ufcpu's kernels (default: all cores).
    check: also scan every weight for NaN/inf (reads the whole file once).
    ffn: "fff" (the tree walk) or "dense-masked" (all nodes computed and masked, as the published
         code does: same results, for comparison only).
    precision: "float32" (exact parity with the reference) or "int8" (the attention projections
         and the heads' dense layers in int8; README, "Precision").
    """
    _check_precision(precision)
    found = hub.locate(name_or_path, revision, log=log.info)
    return Model(found.engine, source=found.source, threads=threads, check=check, ffn=ffn,
                 precision=precision, checked=found.checked)


def _check_precision(precision) -> None:
    if not isinstance(precision, str) or precision not in quant.PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(quant.PRECISIONS)}, got {precision!r}")


class Model:
    def __init__(self, engine_dir: str | Path, source: str | Path | None = None,
                 threads: int | None = None, check: bool = False, ffn: str = "fff",
                 precision: str = "float32", checked: Checked | None = None):
        if ffn not in fwd.FFN:
            raise InputError(f"ffn must be one of {', '.join(fwd.FFN)}, got {ffn!r}")
        _check_precision(precision)
        self.precision = precision
        self.ffn = fwd.FFN[ffn]
        self.path = Path(engine_dir)
        self.source = Path(source) if source is not None else self.path
        # checked: what the conversion in this load already checked; NaN/inf named in the user's file
        eng = open_engine(self.path, check=check, by_source=self.source != self.path, checked=checked)
        self.config: Config = eng.config
        self.weights = quant.PRECISIONS[precision](eng.weights, self.config, self.path)
        self.tokenizer = eng.tokenizer
        self.threads = _threads.resolve(threads)   # applied by every call (ufcpu/threads.py)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({str(self.source)!r}, layers={c.layers}, hidden={c.hidden}, depth={c.depth}, "
                f"task={c.task!r}, threads={self.threads}, precision={self.precision!r})")

    # --- tokens ------------------------------------------------------------------------------------

    def tokenize(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        """-> {"input_ids", "attention_mask"} int64 [B, S], padded with the pad id, truncated to max_seq."""
        batch = self.tokenizer(_as_list(texts))
        self._warn_truncated(batch.truncated)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}

    def _warn_truncated(self, idx: list[int]) -> None:
        Report(truncated=list(idx)).warn(self.config.max_seq)

    def _check_ids(self, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise InputError(f"input_ids must be a non-empty [batch, seq] array, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids must be integers, got {ids.dtype}")
        if ids.shape[1] > self.config.max_seq:
            raise InputError(f"sequence length {ids.shape[1]} exceeds the model's {self.config.max_seq} positions")
        if ids.min() < 0 or ids.max() >= self.config.vocab:
            raise InputError(f"input_ids must lie in [0, {self.config.vocab}), got {ids.min()}..{ids.max()}")
        if attention_mask is None:
            mask = np.ones(ids.shape, np.int64)
        else:
            mask = np.asarray(attention_mask)
            if mask.ndim == 1:
                mask = mask[None]
            if mask.shape != ids.shape:
                raise InputError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
            if not np.isin(mask, (0, 1)).all():
                raise InputError("attention_mask must hold only 0 and 1")
        return ids.astype(np.int64, copy=False), mask.astype(np.int64, copy=False)

    # --- raw outputs -------------------------------------------------------------------------------

    def hidden_states(self, input_ids, attention_mask=None) -> np.ndarray:
        """-> float32 [B, S, H]: the final LayerNorm's output. A right-padded batch (each mask row
        ones then zeros) runs packed, and its padded positions hold zeros."""
        ids, mask = self._check_ids(input_ids, attention_mask)
        return self._forward(ids, mask)

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with _threads.calls(self.threads):
            return fwd.encoder(ids, mask, self.weights, self.config, self.ffn)

    def mlm_logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """-> float32 [B, S, V] (MLM checkpoints)."""
        self._need("mlm", "mlm_logits")
        with _threads.calls(self.threads):
            return heads.mlm_logits(self.hidden_states(input_ids, attention_mask), self.weights)

    def _need(self, task: str, what: str) -> None:
        if self.config.task != task:
            raise InputError(f"{what} needs a {task} checkpoint; {self.source} is a {self.config.task} checkpoint")

    # --- batching ----------------------------------------------------------------------------------

    def _batches(self, items: list, batch_size: int, report: Report) -> Iterator[tuple[np.ndarray, dict]]:
        """Tokenize, sort by length, and yield (indices, padded batch) with little padding;
        `report` gets the items that were truncated or empty.

        A batch holds at most batch_size * max_seq padded tokens, so short texts travel in
        larger batches (bigger, more efficient GEMMs) while memory stays what batch_size
        full-length texts would take."""
        _check_positive("batch_size", batch_size)
        ids, tok_report = self.tokenizer.encode_ids(items)
        report.truncated, report.empty = tok_report.truncated, tok_report.empty
        lengths = np.array([len(x) for x in ids])
        order = np.argsort(lengths, kind="stable")
        for idx in token_budget_batches(lengths[order], batch_size * self.config.max_seq):
            idx = order[idx]
            yield idx, pad([ids[i] for i in idx], self.tokenizer.pad_id)

    def _hidden_batches(self, items: list, batch_size: int,
                        report: Report) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for idx, b in self._batches(items, batch_size, report):
            yield idx, self._forward(b.input_ids, b.attention_mask), b.attention_mask

    # --- sentence embeddings -----------------------------------------------------------------------

    def encode(self, texts: str | Sequence[str], pooling: str = "mean", normalize: bool = False,
               batch_size: int = 32, chunk_tokens: int | None = None, stride: int = 0):
        """-> float32 [n, H] ([H] for one str); pooling "mean" (real tokens), "first", or "none"
        (a list of [n_i, H] arrays, each text's real tokens). A text's vectors do not depend on
        what else is in the batch. Truncated, empty and NaN/inf items are warned about, once per call.
        chunk_tokens=N: long texts as overlapping windows of N tokens sharing `stride` tokens,
        averaged by token count (ufcpu/chunking.py)."""
        single = isinstance(texts, str)
        out, report = self.encode_report(_as_list(texts), pooling, normalize, batch_size, chunk_tokens, stride)
        report.warn(self.config.max_seq)
        return out[0] if single else out

    def encode_report(self, items: list, pooling: str = "mean", normalize: bool = False,
                      batch_size: int = 32, chunk_tokens: int | None = None,
                      stride: int = 0) -> tuple[np.ndarray | list, Report]:
        """encode() on a list, without warnings: -> (float32 [n, H], or a list of [n_i, H] for
        pooling "none"; the Report of which items were truncated, empty or not finite)."""
        if chunk_tokens is not None:   # windows over all of each text: nothing is truncated
            from . import chunking
            return chunking.encode(self, items, chunk_tokens, stride, pooling, normalize, batch_size), Report()
        pool = heads.POOLING[heads.pooling_name(pooling)]
        ragged = heads.pooling_name(pooling) in heads.RAGGED_POOLING
        _check_flag("normalize", normalize)
        report = Report()
        if not items:
            _check_positive("batch_size", batch_size)
            return ([] if ragged else np.zeros((0, self.config.hidden), f32)), report
        out: list = [None] * len(items)
        for idx, h, mask in self._hidden_batches(items, batch_size, report):
            with np.errstate(over="ignore", invalid="ignore"):   # overflow is reported below, per item
                rows = pool(h, mask)
                for j, i in enumerate(idx):
                    out[i] = heads.l2_normalize(rows[j]) if normalize else rows[j]
        report.nonfinite = [i for i, row in enumerate(out) if not np.isfinite(row).all()]
        if ragged:
            return out, report
        return np.stack(out).astype(f32, copy=False), report

    def encode_iter(self, texts: Iterable[str], pooling: str = "mean", normalize: bool = False,
                    batch_size: int = 32, window: int = 1024) -> Iterator[np.ndarray]:
        """Stream embeddings for an iterable of any length, in input order, in bounded memory:
        texts are read `window` at a time and sorted by length inside the window. Warnings name
        items by their position in the whole stream."""
        if isinstance(texts, (str, *_NOT_TEXTS)) or not isinstance(texts, Iterable):
            raise InputTypeError(f"encode_iter takes an iterable of strings, got {type(texts).__name__}"
                                 + (" (for one text use encode(text) or encode_iter([text]))" if isinstance(texts, str) else ""))
        _check_positive("window", window)
        heads.pooling_name(pooling)
        _check_flag("normalize", normalize)
        _check_positive("batch_size", batch_size)
        return self._encode_windows(windows(texts, window), pooling, normalize, batch_size)

    def _encode_windows(self, chunks: Iterable[list], pooling, normalize, batch_size) -> Iterator[np.ndarray]:
        start = 0
        for chunk in chunks:
            try:
                vecs, report = self.encode_report(chunk, pooling, normalize, batch_size)
            except InputError as e:
                raise e.at_offset(start) from None
            summary = Summary()
            summary.add(report, start)
            summary.warn(self.config.max_seq)
            start += len(chunk)
            yield from vecs

    # --- fill-mask ---------------------------------------------------------------------------------

    def fill_mask(self, text: str, top_k: int = 5):
        """-> [{"score", "token", "token_str", "sequence"}] per mask, best first, as the Hugging Face
        fill-mask pipeline returns (a list of such lists when the text holds several masks)."""
        self._need("mlm", "fill_mask")
        if not isinstance(text, str):
            raise InputError("fill_mask takes one string")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise InputError(f"top_k must be a positive integer, got {top_k!r}")
        tok = self.tokenizer
        text = tok.normalize_mask(text)
        b = tok([text])
        self._warn_truncated(b.truncated)
        ids = b.input_ids[0]
        where = np.flatnonzero(ids == tok.mask_id)
        if where.size == 0:
            raise InputError(f"no mask token in the text: write {tok.mask_token} (or [MASK]) where a word should be predicted")
        h = self.hidden_states(b.input_ids)[0]                  # [S, H]
        with _threads.calls(self.threads):
            probs = heads.softmax(heads.mlm_logits(h[where], self.weights))   # [M, V]
        k = min(top_k, probs.shape[1])
        # As the pipeline: token_str shows special tokens too, and with several masks `sequence`
        # keeps the special tokens, so the masks not being filled stay visible.
        keep_special = where.size > 1
        results = []
        for m, pos in enumerate(where):
            best = np.argsort(-probs[m], kind="stable")[:k]
            preds = []
            for t in best:
                filled = ids.copy()
                filled[pos] = t
                filled = filled[filled != tok.pad_id]      # the pipeline drops pad ids, a predicted one too
                preds.append({"score": float(probs[m, t]), "token": int(t),
                              "token_str": tok.decode([t], skip_special_tokens=False),
                              "sequence": tok.decode(filled, skip_special_tokens=not keep_special)})
            results.append(preds)
        return results[0] if len(results) == 1 else results

    # --- classification ----------------------------------------------------------------------------

    def classify(self, items, batch_size: int = 32) -> np.ndarray:
        """Strings or (text_a, text_b) pairs -> float32 logits [n, C] ([C] for one string)."""
        self._need("classification", "classify")
        single = isinstance(items, str) or (isinstance(items, tuple) and len(items) == 2
                                            and all(isinstance(p, str) for p in items))
        lst = [items] if single else _as_list(items)
        pool = heads.POOLING[heads.pooling_name(self.config.pooler, tuple(heads.POOLING))]
        if not lst:
            _check_positive("batch_size", batch_size)
            return np.zeros((0, self.config.num_labels), f32)
        out = np.empty((len(lst), self.config.num_labels), f32)
        report = Report()
        for idx, h, mask in self._hidden_batches(lst, batch_size, report):
            with _threads.calls(self.threads):
                out[idx] = heads.classify_pooled(pool(h, mask), self.weights, self.config)
        report.nonfinite = np.flatnonzero(~np.isfinite(out).all(axis=1)).tolist()
        report.warn(self.config.max_seq)
        return out[0] if single else out

    def predict(self, items, batch_size: int = 32) -> list[dict]:
        """-> [{"label", "score", "probabilities"}] per item. A one-output head is read as a
        binary score (sigmoid)."""
        logits = np.atleast_2d(self.classify(items, batch_size))
        probs = heads.probabilities(logits)
        names = self.config.id2label or tuple(f"LABEL_{i}" for i in range(logits.shape[1]))
        res = []
        for p in probs:
            if p.shape[0] == 1:
                best, score = int(p[0] > 0.5), float(p[0])
                label = names[0] if len(names) == 1 else str(best)
            else:
                best = int(p.argmax())
                label, score = names[best], float(p[best])
            res.append({"label": label, "score": score, "probabilities": [float(x) for x in p]})
        return res


def _check_positive(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise InputError(f"{name} must be a positive integer, got {v!r}")


def _check_flag(name: str, v) -> None:
    if not isinstance(v, (bool, np.bool_)):
        raise InputTypeError(f"{name} must be True or False, got {v!r}")


# Containers whose iteration is not a list of texts: bytes give ints, a dict its keys, a set no order.
_NOT_TEXTS = (bytes, bytearray, memoryview, Mapping, Set)


def _as_list(texts) -> list:
    if isinstance(texts, str):
        return [texts]
    if texts is None:
        raise InputError("no texts given")
    if isinstance(texts, _NOT_TEXTS) or not isinstance(texts, Iterable):
        raise InputTypeError(f"expected a string or a list of strings, got {type(texts).__name__}")
    return list(texts)
