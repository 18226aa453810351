"""The contrast transfer function, in RELION's convention (one model for everything).

gamma(k) = -pi*lambda*df(theta)*k^2 + pi/2*Cs*lambda^3*k^4 - atan(Q/sqrt(1-Q^2)) - phase_shift
CTF(k)   = -sin(gamma(k)) * exp(-B*k^2/4)

k in 1/A, lambda in A (relativistic), Cs in A, defocus in A (positive = underfocus),
df(theta) = (U+V)/2 + (U-V)/2 * cos(2*(theta - angle)), theta = atan2(ky, kx).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import ModuleType

import numpy as np

from compute.backend import xp_of


def electron_wavelength_a(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Angstrom for an acceleration voltage in kV."""
    v = float(voltage_kv) * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + 0.978466e-6 * v))


@dataclass(frozen=True)
class CtfParams:
    """CTF parameters with units in the names (RELION's defocus convention)."""

    defocus_u_a: float
    defocus_v_a: float
    defocus_angle_deg: float = 0.0
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    phase_shift_deg: float = 0.0
    bfactor_a2: float = 0.0

    @property
    def defocus_mean_a(self) -> float:
        return 0.5 * (self.defocus_u_a + self.defocus_v_a)

    @property
    def astigmatism_a(self) -> float:
        return abs(self.defocus_u_a - self.defocus_v_a)

    def with_(self, **kw) -> CtfParams:
        return replace(self, **kw)


def frequency_grid(shape: tuple[int, int], pixel_size_a: float, rfft: bool = False,
                   xp: ModuleType = np):
    """(kx, ky) in 1/A on the unshifted FFT grid of a 2D image (``rfft`` for the half grid)."""
    ny, nx = shape
    ky = xp.fft.fftfreq(ny, d=pixel_size_a)
    kx = xp.fft.rfftfreq(nx, d=pixel_size_a) if rfft else xp.fft.fftfreq(nx, d=pixel_size_a)
    KY, KX = xp.meshgrid(ky, kx, indexing="ij")
    return KX, KY


def gamma(kx, ky, p: CtfParams):
    """Phase aberration gamma(k) (radians) on a frequency grid (any array module)."""
    xp = xp_of(kx)
    lam = electron_wavelength_a(p.voltage_kv)
    cs_a = p.cs_mm * 1e7
    k2 = kx * kx + ky * ky
    theta = xp.arctan2(ky, kx)
    ang = np.deg2rad(p.defocus_angle_deg)
    df = 0.5 * (p.defocus_u_a + p.defocus_v_a) + 0.5 * (p.defocus_u_a - p.defocus_v_a) * xp.cos(
        2.0 * (theta - ang)
    )
    q = p.amplitude_contrast
    k_amp = np.arctan(q / np.sqrt(1.0 - q * q))
    return (-np.pi * lam * df * k2 + 0.5 * np.pi * cs_a * lam**3 * k2 * k2 - k_amp
            - np.deg2rad(p.phase_shift_deg))


def ctf_from_grid(kx, ky, p: CtfParams):
    """CTF values on a given frequency grid."""
    xp = xp_of(kx)
    c = -xp.sin(gamma(kx, ky, p))
    if p.bfactor_a2:
        c = c * xp.exp(-p.bfactor_a2 * (kx * kx + ky * ky) / 4.0)
    return c


def ctf_2d(shape: tuple[int, int], pixel_size_a: float, p: CtfParams, rfft: bool = False,
           xp: ModuleType = np, dtype=np.float32):
    """CTF on the unshifted (r)FFT grid of an image of ``shape`` (DC at [0, 0])."""
    kx, ky = frequency_grid(shape, pixel_size_a, rfft=rfft, xp=xp)
    return ctf_from_grid(kx, ky, p).astype(dtype)


def ctf_1d(k, p: CtfParams, angle_deg: float | None = None):
    """CTF along a radial line at ``angle_deg`` (default: the defocus angle, i.e. defocus U)."""
    xp = xp_of(k)
    a = np.deg2rad(p.defocus_angle_deg if angle_deg is None else angle_deg)
    return ctf_from_grid(k * np.cos(a), k * xp.asarray(np.sin(a)), p)


def apply_ctf(images, pixel_size_a: float, params: CtfParams | list[CtfParams]):
    """Multiply real images (N, y, x) or (y, x) by their CTFs in Fourier space."""
    from compute import backend as be

    xp = xp_of(images)
    single = images.ndim == 2
    imgs = images[None] if single else images
    plist = [params] * imgs.shape[0] if isinstance(params, CtfParams) else list(params)
    F = be.rfft2(imgs)
    kx, ky = frequency_grid(imgs.shape[-2:], pixel_size_a, rfft=True, xp=xp)
    ctfs = xp.stack([ctf_from_grid(kx, ky, p) for p in plist])
    out = be.irfft2(F * ctfs, s=imgs.shape[-2:]).astype(images.dtype, copy=False)
    return out[0] if single else out
