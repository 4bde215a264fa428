"""The checkpoint's tokenizer (tokenizer.json, read with the `tokenizers` library).

Special-token ids differ between checkpoints, so every id is read from the file, never assumed.
Truncation to max_seq keeps the final `<sep>` (tokenizers truncates before the post-processor
adds the special tokens), exactly as the reference tokenizer with `truncation=True`.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

from .errors import CheckpointError, InputError, InputTypeError

SPECIALS = ("<unk>", "<cls>", "<s>", "</s>", "<mask>", "<sep>", "<pad>")
REQUIRED_SPECIALS = ("<pad>", "<sep>", "<mask>")
MASK_ALIASES = ("[MASK]",)   # what users of other BERTs type; mapped to the checkpoint's <mask>
# Encoded once at load: exercises the normalizer, the unknown-token path (NUL is in no
# vocabulary) and the pair template, so a broken tokenizer.json fails at load, not mid-stream.
_PROBES = ("Hello, world! 123", "\x00 \u2603 unknownwordxyzzy", ("a", "b"), "", ("", ""))
CHARS_PER_TOKEN = 64         # first prefix tried per token of max_len before a long text is tokenized
PREFIX_GROWTH = 8            # a prefix too short is grown this many times: the tries cost < 1/7 of the text
log = logging.getLogger("ufcpu")

# What the report's kinds say, one warning each: {n} items, {first} the first (from 0).
REPORT_WARNINGS = {
    "truncated": "{n} text(s) longer than {max_len} tokens were truncated (first: #{first})",
    "empty": ("{n} text(s) have no tokens after normalization (empty, whitespace only or only "
              "non-ASCII characters; first: #{first}): encoded as the end-of-sequence token alone"),
    "nonfinite": ("{n} text(s) gave NaN or infinite values: the model's outputs overflow (first: #{first}); "
                  "JSON cannot hold them (written as NaN/Infinity)"),
}


@dataclasses.dataclass
class Report:
    """Which items of one encoding (indices from 0) were cut to max_len tokens, had no token left
    after normalization, or gave NaN/inf vectors: data, not log lines, so that a caller feeding a
    stream in windows adds them up (Summary) instead of parsing warnings."""
    truncated: list[int] = dataclasses.field(default_factory=list)
    empty: list[int] = dataclasses.field(default_factory=list)
    nonfinite: list[int] = dataclasses.field(default_factory=list)

    def warn(self, max_len: int) -> None:
        summary = Summary()
        summary.add(self)
        summary.warn(max_len)


class Summary:
    """Reports added up over a stream: per kind, how many and the first (in constant memory)."""

    def __init__(self):
        self.seen: dict[str, list[int]] = {}     # kind -> [count, first index]

    def add(self, report: Report, offset: int = 0) -> None:
        for kind in REPORT_WARNINGS:
            idx = getattr(report, kind)
            if idx:
                entry = self.seen.setdefault(kind, [0, offset + idx[0]])
                entry[0] += len(idx)

    def warn(self, max_len: int) -> None:
        """One warning per kind that happened."""
        for kind, (n, first) in self.seen.items():
            log.warning(REPORT_WARNINGS[kind].format(n=n, first=first, max_len=max_len))


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
        self._untruncated = _HFTokenizer.from_str(self._tok.to_str())   # for _cut's look at a prefix
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
                raise InputTypeError(f"expected a string or a (text_a, text_b) pair, got {type(it).__name__}", item=i)
            for part in ((it,) if isinstance(it, str) else it):
                if not part.isascii():
                    _check_unicode(part, i)
        cut = [self._cut(it) if isinstance(it, str) else self._cut_pair(*it) for it in items]
        try:
            return self._tok.encode_batch(cut)
        except Exception as e:   # tokenizers raises plain Exceptions (e.g. a pair too long to truncate)
            raise InputError(f"the tokenizer refused the input: {_first_line(e)}") from None

    def _cut(self, text: str) -> str:
        """A prefix of `text` whose truncation gives exactly the ids of the whole text, so a huge
        text is never tokenized whole: the prefix (CHARS_PER_TOKEN chars per token, grown
        PREFIX_GROWTH times until it suffices) must hold max_len tokens, all from words that end
        before the cut. A text with fewer tokens than that is tokenized whole."""
        return self._prefix(text, self.max_len)

    def _prefix(self, text: str, need: int) -> str:
        """The shortest prefix tried whose first `need` tokens come from words before the cut."""
        n = self.max_len * CHARS_PER_TOKEN
        while n < len(text):
            words = self._untruncated.encode(text[:n], add_special_tokens=False).word_ids   # [tokens]
            if len(words) > need and words[need - 1] < words[-1]:
                return text[:n]
            n *= PREFIX_GROWTH
        return text

    def _cut_pair(self, a: str, b: str) -> tuple[str, str]:
        """A pair is truncated longest-first, which depends on which part is longer: only a long
        part next to a short one is cut, and kept longer than the short one (two long parts are
        tokenized whole)."""
        long = self.max_len * CHARS_PER_TOKEN
        if (len(a) > long) == (len(b) > long):
            return a, b
        short = b if len(a) > long else a
        need = max(self.max_len, len(self._untruncated.encode(short, add_special_tokens=False).ids) + 1)
        return (self._prefix(a, need), b) if len(a) > long else (a, self._prefix(b, need))

    def encode_ids(self, items: Sequence) -> tuple[list[np.ndarray], "Report"]:
        """-> one int64 id array per item (unpadded), and a Report of the items that were
        truncated or had no token.

        A text with no token left after normalization (empty, whitespace only, or only characters
        the normalizer drops: every non-ASCII one) is encoded, as the reference tokenizer does,
        as the post-processor's special tokens alone (`<sep>`)."""
        encs = self._encode(items)
        ids = [np.asarray(e.ids, np.int64) for e in encs]
        report = Report(truncated=[i for i, e in enumerate(encs) if e.overflowing])
        if ids:
            top = int(np.concatenate(ids).max(initial=0))
            if top >= self.vocab_size:   # cannot happen after the checks at load; never index past them
                raise CheckpointError(f"{self.path}: the tokenizer produced id {top}, past its vocabulary "
                                      f"of {self.vocab_size}")
            report.empty = [i for i, (it, x) in enumerate(zip(items, ids))
                            if len(x) <= (self._specials_single if isinstance(it, str) else self._specials_pair)]
        return ids, report

    def __call__(self, items: Sequence) -> Batch:
        """Padded ids, as `Model.tokenize` returns them (no warning for empty texts: the ids say it)."""
        ids, report = self.encode_ids(items)
        return pad(ids, self.pad_id, report.truncated)

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
        raise InputError(f"text is not valid Unicode (lone surrogate {text[e.start]!r} at "
                         f"character {e.start}; undecodable bytes? decode the input with "
                         "errors='replace')", item=item) from None


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


def token_budget_batches(sorted_lengths: np.ndarray, budget: int) -> Iterator[slice]:
    """Cut ascending lengths into consecutive slices whose padded size (count x longest) stays
    within budget tokens; each slice holds at least one item."""
    start = 0
    n = len(sorted_lengths)
    while start < n:
        end = start + 1
        while end < n and (end + 1 - start) * sorted_lengths[end] <= budget:
            end += 1
        yield slice(start, end)
        start = end
