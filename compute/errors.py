"""Errors raised by compute kernels for bad input (caught by the CLI as user errors)."""


class ComputeError(Exception):
    """A kernel was given input it cannot work with (wrong shape, NaNs, impossible sizes)."""


class BackendError(ComputeError):
    """The requested compute device cannot be used."""
