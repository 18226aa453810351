"""Back-projection: insert 2D Fourier slices into a 3D Fourier volume and reconstruct.

The adjoint of :class:`compute.simulate.project.Projector` (same conventions: volumes indexed
``[z, y, x]`` with the centre at ``n // 2``, slice coordinates ``A^T (kx, ky, 0)``, images'
Fourier transforms referenced to the box centre). Values are splatted with trilinear weights
onto a padded half-grid (pad 2 by default), divided by the accumulated weights (plus a
Wiener/tau2 regulariser when given), inverse transformed, gridding-corrected and cropped.
"""

from __future__ import annotations

import numpy as np

from compute import backend as be
from compute.backend import xp_of
from compute.errors import ComputeError


def centre_phase(box: int, xp=np):
    """Phase factors (box, box//2+1) that move the real-space origin from 0 to ``box // 2``."""
    ky = xp.fft.fftfreq(box)[:, None]
    kx = xp.fft.rfftfreq(box)[None, :]
    c = box // 2
    return xp.exp(2j * np.pi * (kx * c + ky * c)).astype(np.complex64)


def images_to_centred_ft(images):
    """rfft2 of real images with the phase origin at the box centre (what slices hold)."""
    n = images.shape[-1]
    return (be.rfft2(images) * centre_phase(n, xp_of(images))).astype(np.complex64)


class BackProjector:
    """Accumulates ``sum w * slice`` and ``sum w`` on a padded 3D half Fourier grid.

    Parameters
    ----------
    box : int
        Edge of the reconstructed cube.
    pad : int
        Oversampling of the Fourier grid (2 as RELION).
    max_radius : float or None
        Only frequencies up to this radius (pixels of ``box``) are inserted.
    """

    def __init__(self, box: int, pad: int = 2, max_radius: float | None = None, xp=np):
        self.box, self.pad, self.xp = int(box), int(pad), xp
        m = self.box * self.pad
        self.m = m
        self.shape = (m + 1, m + 1, m // 2 + 2)
        self.data = xp.zeros(int(np.prod(self.shape)), dtype=np.complex128)
        self.weight = xp.zeros(int(np.prod(self.shape)), dtype=np.float64)
        n = self.box
        ky = xp.fft.fftfreq(n) * n
        kx = xp.fft.rfftfreq(n) * n
        KY, KX = xp.meshgrid(ky, kx, indexing="ij")
        r = n / 2.0 if max_radius is None else min(float(max_radius), n / 2.0)
        inside = (KX * KX + KY * KY) <= r * r
        self._sel = xp.nonzero(inside.ravel())[0]
        self._kx = KX.ravel()[self._sel]
        self._ky = KY.ravel()[self._sel]

    def insert(self, slices, weights, rotations):
        """Add slices (n, box, box//2+1) complex with per-coefficient weights (same shape, real,
        or None for 1) at orientations ``rotations`` (n, 3, 3) RELION matrices.

        ``slices`` should already be multiplied by their weights' numerator (e.g. CTF * x / s2),
        and ``weights`` be the matching denominators (e.g. CTF^2 / s2).
        """
        xp = self.xp
        R = xp.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
        n_img = R.shape[0]
        S = slices.reshape(n_img, -1)[:, self._sel]
        W = None if weights is None else weights.reshape(n_img, -1)[:, self._sel]
        scale = self.pad
        c = self.m // 2
        X = (R[:, 0, 0, None] * self._kx + R[:, 1, 0, None] * self._ky) * scale
        Y = (R[:, 0, 1, None] * self._kx + R[:, 1, 1, None] * self._ky) * scale
        Z = (R[:, 0, 2, None] * self._kx + R[:, 1, 2, None] * self._ky) * scale
        neg = X < 0
        X = xp.where(neg, -X, X)
        Y = xp.where(neg, -Y, Y) + c
        Z = xp.where(neg, -Z, Z) + c
        S = xp.where(neg, xp.conj(S), S)
        x0, y0, z0 = xp.floor(X), xp.floor(Y), xp.floor(Z)
        fx, fy, fz = X - x0, Y - y0, Z - z0
        sy, sx = self.shape[1] * self.shape[2], self.shape[2]
        base = (z0.astype(np.int64) * sy + y0.astype(np.int64) * sx + x0.astype(np.int64)).ravel()
        size = self.data.shape[0]
        Sr = S.ravel()
        Wr = None if W is None else W.ravel()
        fx, fy, fz = fx.ravel(), fy.ravel(), fz.ravel()
        for dz, wz in ((0, 1 - fz), (sy, fz)):
            for dy, wy in ((0, 1 - fy), (sx, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    w = wz * wy * wx
                    idx = base + (dz + dy + dx)
                    self.data += xp.bincount(idx, weights=(Sr.real * w), minlength=size) \
                        + 1j * xp.bincount(idx, weights=(Sr.imag * w), minlength=size)
                    ww = w if Wr is None else Wr * w
                    self.weight += xp.bincount(idx, weights=ww, minlength=size)

    def add(self, other: BackProjector) -> None:
        self.data += other.data
        self.weight += other.weight

    def reconstruct(self, regulariser=None, min_weight: float = 1e-3):
        """The map ``(box, box, box)`` float32 from ``data / (weight + regulariser)``.

        ``regulariser``: None, a scalar, or a per-shell array (index = radius in pixels of the
        box) such as ``1 / (T * tau2)`` for a Wiener-like (MAP) reconstruction.
        """
        xp = self.xp
        m, n = self.m, self.box
        data = self.data.reshape(self.shape)[:m, :m, : m // 2 + 1]
        weight = self.weight.reshape(self.shape)[:m, :m, : m // 2 + 1]
        # Friedel mates on the x = 0 plane are stored once each side: symmetrise that plane
        reg = 0.0
        if regulariser is not None:
            reg_arr = xp.asarray(regulariser, dtype=np.float64)
            if reg_arr.ndim == 0:
                reg = reg_arr
            else:
                kz = xp.arange(m) - m // 2
                kx = xp.arange(m // 2 + 1)
                KZ, KY, KX = xp.meshgrid(kz, kz, kx, indexing="ij")
                r = xp.sqrt(KZ * KZ + KY * KY + KX * KX) / self.pad
                ri = xp.clip(xp.round(r).astype(np.int64), 0, reg_arr.shape[0] - 1)
                reg = reg_arr[ri]
        denom = weight + reg
        F = xp.where(denom > min_weight, data / xp.maximum(denom, min_weight), 0)
        F = F.astype(np.complex64)
        # back to the unshifted rfft layout of the padded volume, centre at the origin
        F = be.ifftshift(F, axes=(0, 1))
        vol = be.irfftn(F, s=(m, m, m))
        vol = be.fftshift(vol)
        o = m // 2 - n // 2
        vol = vol[o:o + n, o:o + n, o:o + n]
        x = (xp.arange(n) - n // 2) / m
        s = xp.sinc(x) ** 2
        vol = vol / (s[:, None, None] * s[None, :, None] * s[None, None, :])
        return vol.astype(np.float32)


def reconstruct(images, rotations, ctf=None, origins_px=None, pad: int = 2, regulariser=None):
    """Direct Fourier reconstruction of real images (n, N, N) at known orientations.

    ``ctf``: (n, N, N//2+1) CTF values on the rfft grid or None. Origins are RELION's in pixels
    (the image is shifted by +origin to centre it before insertion).
    """
    xp = xp_of(images)
    N = images.shape[-1]
    if images.shape[-2] != N:
        raise ComputeError("reconstruct needs square images")
    F = images_to_centred_ft(images.astype(np.float32))
    if origins_px is not None:
        from compute.simulate.project import phase_shift_grid

        o = xp.asarray(origins_px, dtype=np.float64).reshape(-1, 2)
        # multiply by conj(shift to -origin) = shift back; phase_shift_grid includes the
        # centre phase, remove it by dividing by the zero-origin grid
        ph = phase_shift_grid(N, o, xp) / phase_shift_grid(N, xp.zeros((1, 2)), xp)
        F = F * xp.conj(ph)
    bp = BackProjector(N, pad=pad, xp=xp)
    if ctf is None:
        bp.insert(F, None, rotations)
    else:
        bp.insert(F * ctf, ctf * ctf, rotations)
    return bp.reconstruct(regulariser=regulariser)
