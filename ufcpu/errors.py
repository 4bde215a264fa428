"""Errors a user can act on. Each names the file or input and the problem, in one line.

Every class is a `UfcpuError`; the command line turns any of them into exit code 2 and one line
on stderr. `CheckpointError` and `InputError` are also `ValueError`s and `CacheError` an
`OSError`, so code written against the standard exceptions keeps working.
"""


class UfcpuError(Exception):
    """Base class of every error ufcpu raises on purpose."""


class CheckpointError(UfcpuError, ValueError):
    """A checkpoint (config, weights or tokenizer) is missing, malformed or unsupported."""


class UnsafePickleError(CheckpointError):
    """A torch pickle asked for something other than tensors and containers: refused, never run."""


class InputError(UfcpuError, ValueError):
    """Text or arguments that the engine cannot use (for example fill-mask without a mask)."""


class CacheError(UfcpuError, OSError):
    """The conversion cache (or a conversion's output folder) cannot be written."""
