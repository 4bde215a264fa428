"""Errors a user can act on. Each names the file or input and the problem."""


class UfcpuError(Exception):
    """Base class of every error ufcpu raises on purpose."""


class CheckpointError(UfcpuError, ValueError):
    """A checkpoint (config, weights or tokenizer) is missing, malformed or unsupported."""


class UnsafePickleError(CheckpointError):
    """A torch pickle asked for something other than tensors and containers: refused, never run."""


class InputError(UfcpuError, ValueError):
    """Text or arguments that the engine cannot use (for example fill-mask without a mask)."""
