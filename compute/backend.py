"""The one place that knows CuPy exists.

Kernels ask their inputs which array module they belong to (:func:`xp_of`)
and return arrays of the same kind, so the same code runs on NumPy or CuPy.
Which device new work goes to is decided here, lazily (never at import), from
``SCOPESIDE_DEVICE`` (``auto`` | ``cpu`` | ``gpu``) or an explicit argument.

The FFT facade dispatches to ``scipy.fft`` with ``workers=`` on the CPU and to
``cupy.fft`` on the GPU.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numpy as np
import scipy.fft as _sfft

from compute.errors import BackendError

log = logging.getLogger(__name__)

DEVICE_ENV = "SCOPESIDE_DEVICE"
THREADS_ENV = "SCOPESIDE_THREADS"
_VALID = ("auto", "cpu", "gpu")

_lock = threading.Lock()
_cupy: ModuleType | None = None
_cupy_checked = False
_gpu_ok: bool | None = None
_chosen: dict[str, str] = {}  # requested -> chosen, to log each choice once
_workers: int | None = None


def _import_cupy() -> ModuleType | None:
    """Import cupy on first need; ``None`` if it is not installed or broken."""
    global _cupy, _cupy_checked
    with _lock:
        if not _cupy_checked:
            _cupy_checked = True
            try:
                import cupy  # noqa: PLC0415  (deliberately lazy)

                _cupy = cupy
            except Exception as exc:  # ImportError, or a CUDA library load failure
                log.debug("cupy not usable: %s", exc)
                _cupy = None
    return _cupy


def gpu_available() -> bool:
    """True when CuPy is installed and at least one CUDA device answers."""
    global _gpu_ok
    if _gpu_ok is None:
        cp = _import_cupy()
        ok = False
        if cp is not None:
            try:
                ok = bool(cp.cuda.is_available()) and cp.cuda.runtime.getDeviceCount() > 0
            except Exception as exc:  # getDeviceCount raises without a driver
                log.debug("no CUDA device: %s", exc)
                ok = False
        _gpu_ok = ok
    return _gpu_ok


def requested_device(device: str | None = None) -> str:
    """The device asked for, from the argument or ``SCOPESIDE_DEVICE`` (default ``auto``)."""
    req = (device or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    if req not in _VALID:
        raise BackendError(
            f"{DEVICE_ENV}={req!r} is not a device; use one of {', '.join(_VALID)}"
        )
    return req


def select_device(device: str | None = None) -> str:
    """Resolve ``auto``/``cpu``/``gpu`` to ``"cpu"`` or ``"gpu"``.

    Raises
    ------
    BackendError
        When ``gpu`` is forced but no usable GPU (or no CuPy) is present.
    """
    req = requested_device(device)
    if req == "cpu":
        chosen = "cpu"
    elif req == "gpu":
        if not gpu_available():
            why = "CuPy is not installed (pip install 'scopeside[gpu]')" if _import_cupy() is None \
                else "no CUDA device is visible"
            raise BackendError(f"{DEVICE_ENV}=gpu was requested but {why}")
        chosen = "gpu"
    else:
        chosen = "gpu" if gpu_available() else "cpu"
    if _chosen.get(req) != chosen:
        _chosen[req] = chosen
        log.info("compute device: %s (requested %s)", chosen, req)
    return chosen


def get_xp(device: str | None = None) -> ModuleType:
    """The array module (numpy or cupy) for ``device`` (resolved by :func:`select_device`)."""
    if select_device(device) == "gpu":
        return _import_cupy()  # type: ignore[return-value]
    return np


def is_cupy_array(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def xp_of(*arrays: Any) -> ModuleType:
    """The array module of the inputs: cupy if any of them is a CuPy array, else numpy."""
    for a in arrays:
        if is_cupy_array(a):
            return _import_cupy()  # type: ignore[return-value]
    return np


def to_numpy(a: Any) -> np.ndarray:
    """A NumPy copy/view of ``a`` (host transfer for CuPy arrays)."""
    if is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def to_device(a: Any, device: str | None = None) -> Any:
    """Move ``a`` to ``device`` (``cpu``/``gpu``/``auto``); returns the same array if already there."""
    if select_device(device) == "gpu":
        cp = _import_cupy()
        return cp.asarray(a)  # type: ignore[union-attr]
    return to_numpy(a)


def n_workers() -> int:
    """Threads for CPU FFTs: ``SCOPESIDE_THREADS`` or :func:`set_workers`, else all cores."""
    if _workers is not None:
        return _workers
    env = os.environ.get(THREADS_ENV)
    if env:
        try:
            return max(1, int(env))
        except ValueError as exc:
            raise BackendError(f"{THREADS_ENV}={env!r} is not a whole number") from exc
    return os.cpu_count() or 1


def set_workers(n: int | None) -> None:
    """Set the CPU FFT thread count for this process (``None`` = back to the default)."""
    global _workers
    _workers = None if n is None else max(1, int(n))


@contextmanager
def workers(n: int) -> Iterator[None]:
    """Temporarily use ``n`` CPU FFT threads."""
    global _workers
    old = _workers
    set_workers(n)
    try:
        yield
    finally:
        _workers = old


# --- FFT facade -----------------------------------------------------------------------------

def _fft_mod(a: Any) -> tuple[Any, dict[str, Any]]:
    if is_cupy_array(a):
        return _import_cupy().fft, {}  # type: ignore[union-attr]
    return _sfft, {"workers": n_workers()}


def fftn(a, s=None, axes=None, norm=None):
    m, kw = _fft_mod(a)
    return m.fftn(a, s=s, axes=axes, norm=norm, **kw)


def ifftn(a, s=None, axes=None, norm=None):
    m, kw = _fft_mod(a)
    return m.ifftn(a, s=s, axes=axes, norm=norm, **kw)


def rfftn(a, s=None, axes=None, norm=None):
    m, kw = _fft_mod(a)
    return m.rfftn(a, s=s, axes=axes, norm=norm, **kw)


def irfftn(a, s=None, axes=None, norm=None):
    m, kw = _fft_mod(a)
    return m.irfftn(a, s=s, axes=axes, norm=norm, **kw)


def fft2(a, s=None, axes=(-2, -1), norm=None):
    return fftn(a, s=s, axes=axes, norm=norm)


def ifft2(a, s=None, axes=(-2, -1), norm=None):
    return ifftn(a, s=s, axes=axes, norm=norm)


def rfft2(a, s=None, axes=(-2, -1), norm=None):
    return rfftn(a, s=s, axes=axes, norm=norm)


def irfft2(a, s=None, axes=(-2, -1), norm=None):
    return irfftn(a, s=s, axes=axes, norm=norm)


def fftshift(a, axes=None):
    return xp_of(a).fft.fftshift(a, axes=axes)


def ifftshift(a, axes=None):
    return xp_of(a).fft.ifftshift(a, axes=axes)


def fftfreq(n: int, d: float = 1.0, xp: ModuleType = np):
    return xp.fft.fftfreq(n, d)


def rfftfreq(n: int, d: float = 1.0, xp: ModuleType = np):
    return xp.fft.rfftfreq(n, d)


def next_fast_len(n: int, real: bool = True) -> int:
    """Smallest FFT-friendly size >= n."""
    return int(_sfft.next_fast_len(int(n), real=real))


# --- memory ---------------------------------------------------------------------------------

def free_memory_pool() -> None:
    """Return cached GPU memory blocks to the driver (no-op without CuPy)."""
    if _cupy is not None:
        try:
            _cupy.get_default_memory_pool().free_all_blocks()
            _cupy.get_default_pinned_memory_pool().free_all_blocks()
        except Exception as exc:  # the pool may be unusable without a device
            log.debug("could not free the CuPy memory pool: %s", exc)


def gpu_memory_bytes() -> tuple[int, int] | None:
    """(free, total) bytes of the current GPU, or ``None`` on the CPU."""
    if not gpu_available():
        return None
    free, total = _import_cupy().cuda.runtime.memGetInfo()  # type: ignore[union-attr]
    return int(free), int(total)


def _reset_for_tests() -> None:
    """Forget cached device decisions (tests change SCOPESIDE_DEVICE)."""
    global _gpu_ok, _workers
    _gpu_ok = None
    _workers = None
    _chosen.clear()


def ndimage_of(a: Any) -> ModuleType:
    """``scipy.ndimage`` for NumPy arrays, ``cupyx.scipy.ndimage`` for CuPy arrays."""
    if is_cupy_array(a):
        import cupyx.scipy.ndimage as cnd  # noqa: PLC0415

        return cnd
    import scipy.ndimage as snd  # noqa: PLC0415

    return snd
