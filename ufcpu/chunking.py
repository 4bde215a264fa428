"""Long documents: a text past the model's 128 positions becomes overlapping windows of token
ids, each window is encoded, and the document's vector is the token-weighted mean of the windows'
vectors (so every token of the document counts).

Memory stays bounded for any length: a text is tokenized `PIECE_CHARS` characters at a time, cut
at whitespace (the tokenizer's pre-tokenizer never joins tokens across whitespace, so the pieces'
ids are the whole text's ids), and windows are encoded as they fill, a few batches at a time.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

from . import heads
from .errors import InputError
from .tokenizer import pad, token_budget_batches

f32 = np.float32
PIECE_CHARS = 1 << 16            # characters tokenized at a time
_SPACES = (" ", "\n", "\t", "\r", "\f", "\v")
WINDOWS_PER_FLUSH = 8            # batches of windows held before they are encoded


class PieceTokenizer:
    """The checkpoint's tokenizer.json, without truncation and without special tokens: a text's
    content ids of any length, piece by piece; `wrap` adds the special tokens the checkpoint's
    post-processor adds to one text (`<cls>?` before, `<sep>` after)."""

    def __init__(self, path: str | Path):
        self._tok = _HFTokenizer.from_file(str(path))
        self._tok.no_truncation()
        self._tok.no_padding()
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a").ids
        k = next(i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain)
        self.prefix = np.asarray(full[:k], np.int64)
        self.suffix = np.asarray(full[k + len(plain):], np.int64)
        self.n_special = len(self.prefix) + len(self.suffix)

    def content_ids(self, text: str, piece_chars: int = PIECE_CHARS) -> Iterator[np.ndarray]:
        """-> int64 id arrays of successive pieces of text (no special tokens); concatenated, the
        ids of the whole text. A piece without whitespace longer than piece_chars is cut there."""
        if not isinstance(text, str):
            raise InputError(f"expected a string, got {type(text).__name__}")
        for piece in split_pieces(text, piece_chars):
            try:
                ids = self._tok.encode(piece, add_special_tokens=False).ids
            except Exception as e:   # tokenizers raises plain Exceptions (e.g. on lone surrogates)
                raise InputError(f"the tokenizer refused the text: {str(e).splitlines()[0]}") from None
            yield np.asarray(ids, np.int64)

    def wrap(self, content: np.ndarray) -> np.ndarray:  # [n] -> [n + n_special]
        return np.concatenate([self.prefix, content, self.suffix])

    def encode_detail(self, text: str, max_len: int, add_special_tokens: bool = True) -> list[dict]:
        """-> [{"id", "text", "special", "start", "stop"}] for one text, cut to max_len tokens
        (keeping the final special tokens), with character offsets into the text."""
        try:   # truncated before the special tokens are added; the shared tokenizer is never reconfigured
            enc = self._tok.encode(text, add_special_tokens=False)
            enc.truncate(max_len - (self.n_special if add_special_tokens else 0))
            enc = self._tok.post_process(enc, add_special_tokens=add_special_tokens)
        except Exception as e:
            raise InputError(f"the tokenizer refused the text: {str(e).splitlines()[0]}") from None
        return [{"id": i, "text": t, "special": bool(s), "start": a, "stop": b}
                for i, t, s, (a, b) in zip(enc.ids, enc.tokens, enc.special_tokens_mask, enc.offsets)]


    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def split_pieces(text: str, piece_chars: int) -> Iterator[str]:
    """Consecutive pieces of at most piece_chars characters, each ending at whitespace when the
    piece holds any; their concatenation is the text."""
    start, n = 0, len(text)
    while start < n:
        end = min(start + piece_chars, n)
        if end < n:
            cut = max(text.rfind(c, start, end) for c in _SPACES)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def windows(pieces: Iterable[np.ndarray], size: int, stride: int) -> Iterator[np.ndarray]:
    """Content ids (in pieces) -> windows of at most `size` ids, consecutive windows sharing
    `stride` ids; the last window ends at the last id. No ids: one empty window."""
    step = size - stride
    buf = np.zeros(0, np.int64)
    for piece in pieces:
        buf = np.concatenate([buf, piece])
        while len(buf) > size:          # more ids follow this window
            yield buf[:size]
            buf = buf[step:]
    yield buf


def check_args(chunk_tokens, stride, n_special: int, max_seq: int) -> None:
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    lo = n_special + 1
    if not is_int(chunk_tokens) or not lo <= chunk_tokens <= max_seq:
        raise InputError(f"chunk_tokens must be an integer in {lo}..{max_seq} (tokens per window, "
                         f"{n_special} of them special), got {chunk_tokens!r}")
    if not is_int(stride) or not 0 <= stride < chunk_tokens - n_special:
        raise InputError(f"stride must be an integer in 0..{chunk_tokens - n_special - 1} (tokens a window "
                         f"shares with the one before), got {stride!r}")


@functools.lru_cache(maxsize=8)
def piece_tokenizer(path: str) -> PieceTokenizer:
    return PieceTokenizer(path)


CHUNK_POOLING = ("mean", "first")   # one vector per window, averaged


def encode(model, texts: str | Sequence[str], chunk_tokens: int, stride: int = 0, pooling: str = "mean",
           normalize: bool = False, batch_size: int = 32) -> np.ndarray:
    """Model.encode(..., chunk_tokens=N, stride=M): -> float32 [n, H] ([H] for one str). Each text
    is cut into windows of N tokens (special tokens included) sharing M tokens with the one
    before; its vector is the mean of its windows' vectors weighted by their token counts. A text
    that fits in one window gets the vector `encode` gives it."""
    pooling = heads.pooling_name(pooling, CHUNK_POOLING)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    tok = piece_tokenizer(str(model.tokenizer.path))
    check_args(chunk_tokens, stride, tok.n_special, model.config.max_seq)
    single = isinstance(texts, str)
    items = [texts] if single else list(texts)
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise InputError(f"with chunk_tokens each item must be a string, got {type(t).__name__}", item=i)
    acc = np.zeros((len(items), model.config.hidden), np.float64)   # sum of token-weighted window vectors
    weight = np.zeros(len(items), np.float64)                        # tokens encoded per text
    pending: list[tuple[int, np.ndarray]] = []
    flush_at = batch_size * WINDOWS_PER_FLUSH
    for i, text in enumerate(items):
        for w in windows(tok.content_ids(text), chunk_tokens - tok.n_special, stride):
            pending.append((i, tok.wrap(w)))
            if len(pending) >= flush_at:
                _encode_windows(model, pending, pooling, batch_size, acc, weight)
                pending = []
    if pending:
        _encode_windows(model, pending, pooling, batch_size, acc, weight)
    out = (acc / weight[:, None]).astype(f32)
    if normalize:
        out = heads.l2_normalize(out)
    return out[0] if single else out


def _encode_windows(model, pending: list[tuple[int, np.ndarray]], pooling: str, batch_size: int,
                    acc: np.ndarray, weight: np.ndarray) -> None:
    """Encode (text index, window ids) pairs, sorted by length into token-budget batches, and add
    each window's vector times its token count to its text's sum."""
    lengths = np.array([len(ids) for _, ids in pending])
    order = np.argsort(lengths, kind="stable")
    for sl in token_budget_batches(lengths[order], batch_size * model.config.max_seq):
        idx = order[sl]
        b = pad([pending[j][1] for j in idx], model.tokenizer.pad_id)
        h = model.hidden_states(b.input_ids, b.attention_mask)          # [B, S, H]
        vecs = heads.POOLING[pooling](h, b.attention_mask)     # [B, H]
        for row, j in enumerate(idx):
            doc, n = pending[j][0], lengths[j]
            acc[doc] += n * vecs[row].astype(np.float64)
            weight[doc] += n
