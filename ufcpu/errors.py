"""Errors a user can act on. Each names the file or input and the problem, in one line.

Every class is a `UfcpuError`; the command line turns any of them into exit code 2 and one line
on stderr. `CheckpointError` and `InputError` are also `ValueError`s and `CacheError` an
`OSError` (`InputTypeError` also a `TypeError`), so code written against the standard exceptions
keeps working.
"""
from __future__ import annotations


class UfcpuError(Exception):
    """Base class of every error ufcpu raises on purpose."""


class CheckpointError(UfcpuError, ValueError):
    """A checkpoint (config, weights or tokenizer) is missing, malformed or unsupported."""


class UnsafePickleError(CheckpointError):
    """A torch pickle asked for something other than tensors and containers: refused, never run."""


class InputError(UfcpuError, ValueError):
    """Text or arguments that the engine cannot use (for example fill-mask without a mask).

    `item` is the index (from 0) of the item of the call at fault, or None; the message is then
    "item N: " + `detail`, so a caller that feeds a stream in windows renumbers it from the two
    attributes (`at_offset`), never by parsing the message."""

    def __init__(self, detail: str = "", item: int | None = None):
        super().__init__(detail if item is None else f"item {item}: {detail}")
        self.detail = detail
        self.item = item

    def at_offset(self, offset: int) -> "InputError":
        """The same error about item offset + item (a window's item as the stream's)."""
        if self.item is None:
            return self
        return type(self)(self.detail, item=offset + self.item)

    def __reduce__(self):     # keep `item` through pickling (e.g. across Ray or multiprocessing)
        return type(self), (self.detail, self.item)


class InputTypeError(InputError, TypeError):
    """An argument of the wrong type (bytes or a dict where texts belong, a str for a flag)."""


class CacheError(UfcpuError, OSError):
    """The conversion cache (or a conversion's output folder) cannot be written."""
