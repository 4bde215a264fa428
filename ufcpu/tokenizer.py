"""The checkpoint's tokenizer (tokenizer.json, read with the `tokenizers` library).

Special-token ids differ between checkpoints, so every id is read from the file, never assumed.
Truncation to max_seq keeps the final `<sep>` (tokenizers truncates before the post-processor
adds the special tokens), exactly as the reference tokenizer with `truncation=True`.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

from .errors import CheckpointError, InputError

SPECIALS = ("<unk>", "<cls>", "<s>", "</s>", "<mask>", "<sep>", "<pad>")
REQUIRED_SPECIALS = ("<pad>", "<sep>", "<mask>")
MASK_ALIASES = ("[MASK]",)   # what users of other BERTs type; mapped to the checkpoint's <mask>
# Encoded once at load: exercises the normalizer, the unknown-token path (NUL is in no
# vocabulary) and the pair template, so a broken tokenizer.json fails at load, not mid-stream.
_PROBES = ("Hello, world! 123", "\x00 \u2603 unknownwordxyzzy", ("a", "b"), "", ("", ""))
log = logging.getLogger("ufcpu")


@dataclasses.dataclass
class Batch:
    input_ids: np.ndarray        # [B, S] int64, padded with the pad id
    attention_mask: np.ndarray   # [B, S] int64, 1 = real token
    truncated: list[int]         # indices of texts that were cut to max_seq tokens

    def __getitem__(self, key: str) -> np.ndarray:   # dict-style access: batch["input_ids"]
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}[key]

    def keys(self):
        return ("input_ids", "attention_mask")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Tokenizer:
    """tokenizer.json, checked at load: it parses, the special tokens the engine needs exist, it
    encodes probe texts, and `vocab_size` is one past the largest id it can ever produce (model
    vocabulary, added tokens and the ids its post-processor inserts), so that the engine can
    refuse a tokenizer whose ids would index past the embedding."""

    def __init__(self, path: str | Path, max_len: int):
        path = Path(path)
        self.path = path
        if path.is_dir():
            raise CheckpointError(f"{path}: is a directory, expected tokenizer.json")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None
        except Exception as e:  # the Rust side raises a generic Exception on malformed JSON
            if not path.exists():
                raise CheckpointError(f"{path}: file not found") from None
            raise CheckpointError(f"{path}: cannot read tokenizer: {_first_line(e)}") from None
        self._tok.no_padding()
        self._tok.no_truncation()   # probes below run untruncated; truncation is set after them
        self.max_len = max_len
        self.ids = {name: self._tok.token_to_id(name) for name in SPECIALS}
        for need in REQUIRED_SPECIALS:
            if self.ids[need] is None:
                raise CheckpointError(f"{path}: tokenizer has no {need} token (needed: {', '.join(REQUIRED_SPECIALS)})")
        self.pad_id = self.ids["<pad>"]
        self.mask_id = self.ids["<mask>"]
        self.mask_token = "<mask>"
        try:
            probes = self._tok.encode_batch(list(_PROBES))
        except Exception as e:
            raise CheckpointError(f"{path}: the tokenizer fails on a probe text: {_first_line(e)}") from None
        vocab_ids = self._tok.get_vocab(with_added_tokens=True).values()
        probe_ids = [i for enc in probes for i in enc.ids]
        self.vocab_size = 1 + max([*vocab_ids, *probe_ids, *(v for v in self.ids.values() if v is not None)])
        self._specials_single = len(probes[3].ids)   # what the post-processor adds to one text
        self._specials_pair = len(probes[4].ids)
        try:
            self._tok.enable_truncation(max_length=max_len)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot truncate to {max_len} tokens: {_first_line(e)}") from None

    # --- encoding -----------------------------------------------------------------------------
    def _encode(self, items: Sequence) -> list:
        """items: strings, or (text_a, text_b) pairs -> tokenizers Encodings (truncated)."""
        if not items:
            return []
        for i, it in enumerate(items):
            ok = isinstance(it, str) or (isinstance(it, (tuple, list)) and len(it) == 2
                                         and all(isinstance(p, str) for p in it))
            if not ok:
                raise InputError(f"item {i}: expected a string or a (text_a, text_b) pair, got {type(it).__name__}")
            for part in ((it,) if isinstance(it, str) else it):
                if not part.isascii():
                    _check_unicode(part, i)
        try:
            return self._tok.encode_batch([tuple(it) if not isinstance(it, str) else it for it in items])
        except Exception as e:   # tokenizers raises plain Exceptions (e.g. a pair too long to truncate)
            raise InputError(f"the tokenizer refused the input: {_first_line(e)}") from None

    def encode_ids(self, items: Sequence, warn_empty: bool = True) -> tuple[list[np.ndarray], list[int]]:
        """-> one int64 id array per item (unpadded), and the indices that were truncated.

        A text with no token left after normalization (empty, whitespace only, or only characters
        the normalizer drops: every non-ASCII one) is encoded, as the reference tokenizer does,
        as the post-processor's special tokens alone (`<sep>`); unless warn_empty is false, a
        warning says how many."""
        encs = self._encode(items)
        ids = [np.asarray(e.ids, np.int64) for e in encs]
        truncated = [i for i, e in enumerate(encs) if e.overflowing]
        if ids:
            top = int(np.concatenate(ids).max(initial=0))
            if top >= self.vocab_size:   # cannot happen after the checks at load; never index past them
                raise CheckpointError(f"{self.path}: the tokenizer produced id {top}, past its vocabulary "
                                      f"of {self.vocab_size}")
            empty = [i for i, (it, x) in enumerate(zip(items, ids))
                     if len(x) <= (self._specials_single if isinstance(it, str) else self._specials_pair)]
            if empty and warn_empty:
                log.warning("%d text(s) have no tokens after normalization (empty, whitespace only or only "
                            "non-ASCII characters; first: #%d): encoded as the end-of-sequence token alone",
                            len(empty), empty[0])
        return ids, truncated

    def __call__(self, items: Sequence) -> Batch:
        """Padded ids, as `Model.tokenize` returns them (no warning for empty texts: the ids say it)."""
        ids, truncated = self.encode_ids(items, warn_empty=False)
        return pad(ids, self.pad_id, truncated)

    # --- decoding -----------------------------------------------------------------------------
    def id_to_token(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def normalize_mask(self, text: str) -> str:
        for alias in MASK_ALIASES:
            text = text.replace(alias, self.mask_token)
        return text


def _check_unicode(text: str, item: int) -> None:
    """Lone surrogates (undecodable bytes smuggled in by `surrogateescape`, e.g. from a file name
    or the command line) cannot be passed to the tokenizer: refuse them by position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"item {item}: text is not valid Unicode (lone surrogate {text[e.start]!r} at "
                         f"character {e.start}; undecodable bytes? decode the input with "
                         "errors='replace')") from None


def pad(ids: list[np.ndarray], pad_id: int, truncated: list[int] | None = None) -> Batch:
    """Right-pad id arrays to the longest: -> input_ids, attention_mask [B, S] int64."""
    if not ids:
        raise InputError("no texts given")
    s = max(len(x) for x in ids)
    out = np.full((len(ids), s), pad_id, np.int64)
    mask = np.zeros((len(ids), s), np.int64)
    for i, x in enumerate(ids):
        out[i, :len(x)] = x
        mask[i, :len(x)] = 1
    return Batch(out, mask, list(truncated or []))
