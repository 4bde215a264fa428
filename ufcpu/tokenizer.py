"""The checkpoint's tokenizer (tokenizer.json, read with the `tokenizers` library).

Special-token ids differ between checkpoints, so every id is read from the file, never assumed.
Truncation to max_seq keeps the final `<sep>` (tokenizers truncates before the post-processor
adds the special tokens), exactly as the reference tokenizer with `truncation=True`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

from .errors import CheckpointError, InputError

SPECIALS = ("<unk>", "<cls>", "<s>", "</s>", "<mask>", "<sep>", "<pad>")
MASK_ALIASES = ("[MASK]",)   # what users of other BERTs type; mapped to the checkpoint's <mask>


@dataclasses.dataclass
class Batch:
    input_ids: np.ndarray        # [B, S] int64, padded with the pad id
    attention_mask: np.ndarray   # [B, S] int64, 1 = real token
    truncated: list[int]         # indices of texts that were cut to max_seq tokens

    def __getitem__(self, key: str) -> np.ndarray:   # dict-style access: batch["input_ids"]
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}[key]

    def keys(self):
        return ("input_ids", "attention_mask")


class Tokenizer:
    def __init__(self, path: str | Path, max_len: int):
        path = Path(path)
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None
        except Exception as e:  # the Rust side raises a generic Exception on malformed JSON
            raise CheckpointError(f"{path}: cannot read tokenizer: {str(e).splitlines()[0]}") from None
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_len)
        self.max_len = max_len
        self.ids = {name: self._tok.token_to_id(name) for name in SPECIALS}
        for need in ("<pad>", "<sep>", "<mask>"):
            if self.ids[need] is None:
                raise CheckpointError(f"{path}: tokenizer has no {need} token")
        self.pad_id = self.ids["<pad>"]
        self.mask_id = self.ids["<mask>"]
        self.mask_token = "<mask>"
        self.vocab_size = self._tok.get_vocab_size()

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
        return self._tok.encode_batch([tuple(it) if not isinstance(it, str) else it for it in items])

    def encode_ids(self, items: Sequence) -> tuple[list[np.ndarray], list[int]]:
        """-> one int64 id array per item (unpadded), and the indices that were truncated."""
        encs = self._encode(items)
        ids = [np.asarray(e.ids, np.int64) for e in encs]
        truncated = [i for i, e in enumerate(encs) if e.overflowing]
        return ids, truncated

    def __call__(self, items: Sequence) -> Batch:
        ids, truncated = self.encode_ids(items)
        return pad(ids, self.pad_id, truncated)

    # --- decoding -----------------------------------------------------------------------------
    def id_to_token(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def normalize_mask(self, text: str) -> str:
        for alias in MASK_ALIASES:
            text = text.replace(alias, self.mask_token)
        return text


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
