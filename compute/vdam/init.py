"""Initial references: random sets of Gaussian blobs (RELION 4's VDAM start), 2D or 3D."""

from __future__ import annotations

from types import ModuleType

import numpy as np

from compute.fourier import lowpass, radial_power_spectrum


def blob_references(n_classes: int, shape: tuple[int, ...], pixel_size_a: float,
                    diameter_a: float, rng: np.random.Generator | int | None = None,
                    n_blobs: int = 40, lowpass_a: float | None = None,
                    xp: ModuleType = np) -> np.ndarray:
    """``n_classes`` different random blob images/volumes inside the particle diameter.

    Each reference holds ``n_blobs`` positive Gaussian blobs and ``n_blobs`` negative ones at
    half weight, at random positions inside the particle radius, with random widths of a few
    percent of the diameter; the result is low-pass filtered (default: diameter / 8, at least
    4 pixels) and has zero mean and unit standard deviation inside the mask.

    Returns
    -------
    array (n_classes, *shape) float32
    """
    rng = np.random.default_rng(rng)
    ndim = len(shape)
    n = min(shape)
    radius_px = 0.5 * diameter_a / pixel_size_a
    radius_px = min(radius_px, 0.5 * n - 1)
    axes = [np.arange(s) - s // 2 for s in shape]
    grids = np.meshgrid(*axes, indexing="ij")
    out = np.zeros((n_classes, *shape), dtype=np.float32)
    for k in range(n_classes):
        img = np.zeros(shape, dtype=np.float64)
        for sign, amp in ((1.0, 1.0), (-1.0, 0.5)):
            # uniform inside the ball: direction x radius^(1/ndim)
            d = rng.standard_normal((n_blobs, ndim))
            d /= np.linalg.norm(d, axis=1, keepdims=True)
            r = 0.8 * radius_px * rng.random(n_blobs) ** (1.0 / ndim)
            centres = d * r[:, None]
            widths = radius_px * rng.uniform(0.06, 0.15, n_blobs)
            for c, w in zip(centres, widths):
                d2 = sum((g - ci) ** 2 for g, ci in zip(grids, c))
                img += sign * amp * np.exp(-0.5 * d2 / (w * w))
        out[k] = img
    lp = lowpass_a or max(diameter_a / 8.0, 4.0 * pixel_size_a)
    out = np.stack([lowpass(o, lp, pixel_size_a) for o in out])
    r = np.sqrt(sum(g.astype(np.float64) ** 2 for g in grids))
    inside = r <= radius_px
    for k in range(n_classes):
        vals = out[k][inside]
        out[k] = np.where(inside, (out[k] - vals.mean()) / max(vals.std(), 1e-12), 0.0)
    return xp.asarray(out.astype(np.float32))


def match_power(refs: np.ndarray, images: np.ndarray, max_shell: int) -> np.ndarray:
    """Scale ``refs`` so their mean power up to ``max_shell`` equals that of ``images``."""
    pr = np.mean([radial_power_spectrum(r) for r in refs], axis=0)
    pi = np.mean([radial_power_spectrum(i) for i in images], axis=0)
    s = slice(1, max(2, int(max_shell)))
    scale = np.sqrt(pi[s].sum() / max(pr[s].sum(), 1e-30))
    return (refs * scale).astype(np.float32)
