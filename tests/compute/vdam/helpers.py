"""Small synthetic particle stacks for the VDAM tests (until/besides compute.simulate)."""

from __future__ import annotations

import numpy as np

from compute.ctf import CtfParams, apply_ctf
from compute.vdam.estep2d import CtfBatch


def blob_molecule(n: int, rng: np.random.Generator, n_blobs: int = 12, radius: float = 0.3):
    """A random 2D 'molecule' of Gaussian blobs centred in an n x n box."""
    yy, xx = np.mgrid[:n, :n] - n // 2
    img = np.zeros((n, n))
    for _ in range(n_blobs):
        c = rng.uniform(-radius, radius, 2) * n
        w = rng.uniform(0.04, 0.09) * n
        img += rng.uniform(0.5, 1.0) * np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / (2 * w * w))
    return img.astype(np.float32)


def rotate_shift(img: np.ndarray, psi_deg: float, ox: float, oy: float) -> np.ndarray:
    """RELION convention used by Estep2D: out(r) = img(A^T (r + o)) (bilinear)."""
    from scipy.ndimage import map_coordinates

    n = img.shape[0]
    yy, xx = np.mgrid[:n, :n].astype(np.float64) - n // 2
    x, y = xx + ox, yy + oy
    c, s = np.cos(np.deg2rad(psi_deg)), np.sin(np.deg2rad(psi_deg))
    # A^T = [[c, -s], [s, c]] acting on (x, y)
    sx = c * x - s * y
    sy = s * x + c * y
    return map_coordinates(img, [sy + n // 2, sx + n // 2], order=3, mode="constant")


def make_stack(n_particles: int, box: int = 32, n_mol: int = 3, snr: float = 0.5,
               pixel_size_a: float = 4.0, seed: int = 0, ctf: bool = True,
               max_shift: float = 2.0):
    """Particles of ``n_mol`` blob molecules: (stack, CtfBatch, truth dict)."""
    rng = np.random.default_rng(seed)
    mols = [blob_molecule(box, rng) for _ in range(n_mol)]
    labels = rng.integers(0, n_mol, n_particles)
    psi = rng.uniform(0, 360, n_particles)
    ox, oy = rng.uniform(-max_shift, max_shift, (2, n_particles))
    du = rng.uniform(8000, 25000, n_particles)
    stack = np.empty((n_particles, box, box), dtype=np.float32)
    for i in range(n_particles):
        img = rotate_shift(mols[labels[i]], psi[i], ox[i], oy[i])
        if ctf:
            img = apply_ctf(img.astype(np.float32), pixel_size_a, CtfParams(du[i], du[i]))
        stack[i] = img
    sig_var = stack.var()
    stack += rng.standard_normal(stack.shape).astype(np.float32) * np.sqrt(sig_var / snr)
    z = np.zeros(n_particles)
    cb = CtfBatch(du, du, z, z + 300.0, z + 2.7, z + 0.1, z, z) if ctf else None
    return stack, cb, {"labels": labels, "psi": psi, "ox": ox, "oy": oy, "mols": mols}
