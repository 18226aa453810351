"""Fourier-space tools shared by every algorithm: crop/pad, shells, FRC/FSC, spectra, masks.

Conventions: unshifted FFT grids (DC at index 0) unless a function says otherwise;
real-space images are centred at ``n // 2``.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from compute import backend as be
from compute.backend import xp_of


def radial_index(shape: tuple[int, ...], rfft: bool = False, xp: ModuleType = np):
    """Integer Fourier shell index (rounded radius in pixels) on an unshifted (r)FFT grid."""
    axes = []
    for i, n in enumerate(shape):
        if rfft and i == len(shape) - 1:
            axes.append(xp.fft.rfftfreq(n) * n)
        else:
            axes.append(xp.fft.fftfreq(n) * n)
    grids = xp.meshgrid(*axes, indexing="ij")
    r = xp.sqrt(sum(g * g for g in grids))
    return xp.round(r).astype(np.int32)


def radius_grid(shape: tuple[int, ...], xp: ModuleType = np):
    """Real-space distance (pixels) from the box centre ``n // 2`` in each axis."""
    axes = [xp.arange(n) - n // 2 for n in shape]
    grids = xp.meshgrid(*axes, indexing="ij")
    return xp.sqrt(sum(g.astype(np.float32) ** 2 for g in grids))


def soft_mask(shape: tuple[int, ...], radius_px: float, edge_px: float = 3.0,
              xp: ModuleType = np, dtype=np.float32):
    """Circular/spherical mask: 1 inside ``radius_px``, raised-cosine fall-off over ``edge_px``."""
    r = radius_grid(shape, xp=xp)
    if edge_px <= 0:
        return (r <= radius_px).astype(dtype)
    m = 0.5 + 0.5 * xp.cos(np.pi * xp.clip((r - radius_px) / edge_px, 0.0, 1.0))
    return m.astype(dtype)


def fourier_crop(img, new_size: int | tuple[int, ...]):
    """Down-sample real image(s) by cropping the centred Fourier transform.

    Works on the last 2 axes (a stack of 2D images) when ``new_size`` is an int;
    pass a tuple to crop 3D volumes. Mean intensity is preserved.
    """
    return _fourier_resize(img, new_size)


def fourier_pad(img, new_size: int | tuple[int, ...]):
    """Up-sample real image(s) by zero-padding the centred Fourier transform."""
    return _fourier_resize(img, new_size)


def _fourier_resize(img, new_size):
    xp = xp_of(img)
    if isinstance(new_size, int):
        nd = 2
        new_shape = (new_size, new_size)
    else:
        nd = len(new_size)
        new_shape = tuple(new_size)
    axes = tuple(range(img.ndim - nd, img.ndim))
    old_shape = img.shape[-nd:]
    if tuple(old_shape) == new_shape:
        return img.copy()
    F = be.fftshift(be.fftn(img, axes=axes), axes=axes)
    out = xp.zeros(img.shape[:-nd] + new_shape, dtype=F.dtype)
    src, dst = [], []
    for o, n in zip(old_shape, new_shape):
        m = min(o, n)
        so, sn = o // 2 - m // 2, n // 2 - m // 2
        src.append(slice(so, so + m))
        dst.append(slice(sn, sn + m))
    lead = (slice(None),) * (img.ndim - nd)
    out[lead + tuple(dst)] = F[lead + tuple(src)]
    res = be.ifftn(be.ifftshift(out, axes=axes), axes=axes).real
    scale = float(np.prod(new_shape)) / float(np.prod(old_shape))
    return (res * scale).astype(img.dtype if img.dtype.kind == "f" else np.float32)


def radial_average(values, shell_index, n_shells: int | None = None, weights=None):
    """Mean of ``values`` per integer shell (shells beyond ``n_shells`` are dropped)."""
    xp = xp_of(values)
    idx = shell_index.ravel()
    n = int(idx.max()) + 1 if n_shells is None else n_shells
    keep = idx < n
    v = values.ravel()[keep]
    w = xp.ones_like(v, dtype=np.float64) if weights is None else weights.ravel()[keep]
    s = xp.bincount(idx[keep], weights=(v * w).astype(np.float64), minlength=n)[:n]
    c = xp.bincount(idx[keep], weights=w.astype(np.float64), minlength=n)[:n]
    return s / xp.maximum(c, 1e-30)


def radial_power_spectrum(img):
    """Rotationally averaged power spectrum of a 2D/3D image, one value per shell up to n//2."""
    F = be.fftn(img)
    shell = radial_index(img.shape, xp=xp_of(img))
    n = min(img.shape) // 2 + 1
    return radial_average(xp_of(img).abs(F) ** 2, shell, n)


def fourier_shell_correlation(a, b, n_shells: int | None = None):
    """FRC (2D) or FSC (3D) between two equally shaped real arrays, shells 0..n//2."""
    xp = xp_of(a)
    if a.shape != b.shape:
        raise ValueError(f"FSC needs equal shapes, got {a.shape} and {b.shape}")
    Fa = be.rfftn(a)
    Fb = be.rfftn(b)
    shell = radial_index(a.shape, rfft=True, xp=xp).ravel()
    n = (min(a.shape) // 2 + 1) if n_shells is None else n_shells
    keep = shell < n
    idx = shell[keep]
    # count the half-plane once but weight non-redundant columns: fine for correlations
    num = xp.bincount(idx, weights=(Fa.ravel()[keep] * xp.conj(Fb.ravel()[keep])).real, minlength=n)
    da = xp.bincount(idx, weights=(xp.abs(Fa.ravel()[keep]) ** 2), minlength=n)
    db = xp.bincount(idx, weights=(xp.abs(Fb.ravel()[keep]) ** 2), minlength=n)
    return num[:n] / xp.sqrt(xp.maximum(da[:n] * db[:n], 1e-30))


frc = fourier_shell_correlation
fsc = fourier_shell_correlation


def shell_resolution_a(n_box: int, pixel_size_a: float) -> np.ndarray:
    """Resolution (A) of each shell 0..n//2 (shell 0 = inf)."""
    s = np.arange(n_box // 2 + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(s > 0, n_box * pixel_size_a / np.maximum(s, 1e-12), np.inf)


def resolution_at_threshold(curve, n_box: int, pixel_size_a: float, threshold: float) -> float:
    """Resolution (A) where an FSC curve first drops below ``threshold`` (linear interpolation).

    Returns the Nyquist resolution when it never drops below.
    """
    c = be.to_numpy(curve).astype(np.float64)
    for i in range(1, len(c)):
        if c[i] < threshold:
            # interpolate the crossing between shell i-1 and i
            c0, c1 = c[i - 1], c[i]
            t = 0.0 if c0 == c1 else (c0 - threshold) / (c0 - c1)
            s = (i - 1) + float(np.clip(t, 0.0, 1.0))
            return float(n_box * pixel_size_a / max(s, 1e-6))
    return 2.0 * pixel_size_a


def lowpass(img, resolution_a: float, pixel_size_a: float, edge_shells: float = 2.0):
    """Soft low-pass filter of a real 2D/3D array to ``resolution_a``."""
    xp = xp_of(img)
    n = img.shape
    F = be.rfftn(img)
    axes = [xp.fft.fftfreq(m) for m in n[:-1]] + [xp.fft.rfftfreq(n[-1])]
    grids = xp.meshgrid(*axes, indexing="ij")
    k = xp.sqrt(sum(g * g for g in grids)) / pixel_size_a  # 1/A
    kc = 1.0 / resolution_a
    w = edge_shells / (min(n) * pixel_size_a)
    filt = 0.5 + 0.5 * xp.cos(np.pi * xp.clip((k - kc) / max(w, 1e-9) + 0.5, 0.0, 1.0))
    filt = xp.where(k < kc - w / 2, 1.0, filt)
    return be.irfftn(F * filt, s=n).astype(img.dtype, copy=False)


def shift_volume(vol, shift_zyx) -> np.ndarray:
    """A 3D map moved by ``shift_zyx`` voxels (sub-voxel, circular: Fourier shift theorem)."""
    v = np.asarray(vol, dtype=np.float32)
    n = v.shape
    k = np.meshgrid(*[np.fft.fftfreq(m) for m in n[:-1]], np.fft.rfftfreq(n[-1]), indexing="ij")
    ph = sum(kk * float(s) for kk, s in zip(k, shift_zyx))
    return np.fft.irfftn(np.fft.rfftn(v) * np.exp(-2j * np.pi * ph), s=n,
                         axes=tuple(range(len(n)))).astype(np.float32)


def shift_image(img, shift_yx, xp: ModuleType | None = None):
    """Sub-pixel shift of 2D image(s) by (dy, dx) pixels via the Fourier shift theorem."""
    xp = xp or xp_of(img)
    ny, nx = img.shape[-2:]
    ky = xp.fft.fftfreq(ny)[:, None]
    kx = xp.fft.rfftfreq(nx)[None, :]
    sh = xp.asarray(shift_yx, dtype=np.float64).reshape(-1, 2)
    phase = xp.exp(-2j * np.pi * (ky[None] * sh[:, 0, None, None] + kx[None] * sh[:, 1, None, None]))
    F = be.rfft2(img)
    out = be.irfft2(F * (phase if img.ndim == 3 else phase[0]), s=(ny, nx))
    return out.astype(img.dtype if img.dtype.kind == "f" else np.float32, copy=False)
