"""Particle extraction: box cut-out, Fourier re-scaling, contrast inversion, normalisation.

Conventions follow RELION's ``relion_preprocess``:

- a pick at ``(x, y)`` (micrograph pixels, x = column) is cut out with integer centring:
  the box starts at ``round(x) - box // 2``, so the particle centre lands on pixel
  ``box // 2`` (RELION's ``FIRST_XMIPP_INDEX``); boxes that leave the micrograph are
  dropped and reported, never padded;
- re-scaling crops (or pads) the centred Fourier transform, which keeps the centre pixel
  fixed for even boxes;
- normalisation subtracts a least-squares plane fitted to the background (pixels outside
  ``bg_radius_px`` from the centre), removes dust (background outliers beyond
  ``white_dust`` / ``black_dust`` std-devs are replaced by Gaussian noise with the
  background's statistics) and scales so the background has mean 0 and std 1;
- contrast inversion multiplies by −1, so protein (dark in the micrograph) becomes white.

Box sizes for a particle diameter follow relion_it (:func:`box_sizes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from compute import backend as be
from compute.backend import to_numpy, xp_of
from compute.errors import ComputeError
from compute.fourier import fourier_pad, radius_grid

#: relion_it's candidate sizes for the down-scaled box
SMALL_BOXES = (48, 64, 96, 128, 160, 192, 256, 288, 300, 320, 360, 384, 400, 420, 450, 480,
               512, 640, 768, 896, 1024)
#: relion_it down-scales until the pixel size is below this (Å)
MAX_SMALL_PIXEL_A = 3.75


@dataclass(frozen=True)
class BoxSizes:
    """relion_it box sizes for a particle diameter.

    ``box_px`` is the extraction box on the micrograph; ``small_box_px`` the re-scaled box
    (equal to ``box_px`` when no down-scaling is needed); ``mask_diameter_a`` 1.1 × diameter.
    """

    box_px: int
    small_box_px: int
    pixel_size_a: float
    small_pixel_size_a: float
    mask_diameter_a: float

    @property
    def rescale(self) -> bool:
        return self.small_box_px != self.box_px


def box_sizes(diameter_a: float, pixel_size_a: float) -> BoxSizes:
    """Box and down-scaled box for ``diameter_a`` at ``pixel_size_a`` (relion_it rules).

    Box = diameter in pixels × 1.5 rounded up to an even number; the down-scaled box is the
    smallest of :data:`SMALL_BOXES` whose pixel size is below 3.75 Å, and no down-scaling
    happens when the box is already that small.
    """
    if not (diameter_a > 0 and pixel_size_a > 0):
        raise ComputeError(f"diameter ({diameter_a}) and pixel size ({pixel_size_a}) must be "
                           "positive")
    box = int(math.ceil(diameter_a / pixel_size_a * 1.5))
    box += box % 2
    small = box
    for b in SMALL_BOXES:
        if b >= box:
            break
        if box * pixel_size_a / b < MAX_SMALL_PIXEL_A:
            small = b
            break
    return BoxSizes(box, small, pixel_size_a, box * pixel_size_a / small, 1.1 * diameter_a)


def box_origins(x_px, y_px, box: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corner (row, column) of each box: ``round(c) - box // 2``."""
    x0 = np.floor(np.asarray(x_px, dtype=np.float64) + 0.5).astype(np.int64) - box // 2
    y0 = np.floor(np.asarray(y_px, dtype=np.float64) + 0.5).astype(np.int64) - box // 2
    return y0, x0


def inside_mask(x_px, y_px, box: int, shape: tuple[int, int]) -> np.ndarray:
    """True for picks whose whole box lies inside a micrograph of ``shape`` (rows, cols)."""
    y0, x0 = box_origins(x_px, y_px, box)
    return (x0 >= 0) & (y0 >= 0) & (x0 + box <= shape[1]) & (y0 + box <= shape[0])


def cut_boxes(mic, x_px, y_px, box: int):
    """Cut ``box``² windows centred (integer) on the picks; every box must be inside."""
    xp = xp_of(mic)
    y0, x0 = box_origins(x_px, y_px, box)
    if len(y0) == 0:
        return xp.zeros((0, box, box), dtype=np.float32)
    if (x0.min() < 0 or y0.min() < 0 or (x0 + box).max() > mic.shape[1]
            or (y0 + box).max() > mic.shape[0]):
        raise ComputeError("a box leaves the micrograph; filter picks with inside_mask first")
    if xp is np:
        # one block copy per particle (much faster than a per-pixel gather)
        win = np.lib.stride_tricks.sliding_window_view(mic, (box, box))
        return win[y0, x0].astype(np.float32, copy=False)
    ar = xp.arange(box)
    yi = xp.asarray(y0)[:, None, None] + ar[None, :, None]
    xi = xp.asarray(x0)[:, None, None] + ar[None, None, :]
    return mic[yi, xi].astype(np.float32, copy=False)


def rescale_stack(stack, new_box: int):
    """Fourier-crop (or pad) a stack of square images to ``new_box``²."""
    n = stack.shape[-1]
    if new_box == n:
        return stack
    if new_box % 2 or n % 2:
        raise ComputeError(f"re-scaling needs even boxes, got {n} -> {new_box}")
    if new_box > n:
        return fourier_pad(stack, new_box)
    # crop on the half-plane transform (half the work of a complex crop)
    xp = xp_of(stack)
    F = be.rfft2(stack.astype(np.float32, copy=False))
    h = new_box // 2
    G = xp.concatenate([F[..., :h, : h + 1], F[..., n - h:, : h + 1]], axis=-2)
    out = be.irfft2(G, s=(new_box, new_box)) * (float(new_box * new_box) / float(n * n))
    return out.astype(np.float32, copy=False)


def normalise_background(stack, bg_radius_px: float, white_dust: float = -1.0,
                         black_dust: float = -1.0, ramp: bool = True,
                         rng: np.random.Generator | int | None = 0):
    """Normalise each image so its background (outside ``bg_radius_px``) has mean 0, std 1.

    Parameters
    ----------
    stack
        (N, n, n) images.
    bg_radius_px
        Radius (pixels) of the particle circle; pixels outside it are background.
    white_dust, black_dust
        Replace background-statistics outliers brighter than mean + white_dust·std (darker
        than mean − black_dust·std) by Gaussian noise; ≤ 0 disables (RELION's −1).
    ramp
        Subtract a plane fitted to the background first (RELION does).
    rng
        Seed or generator for the dust replacement noise.
    """
    xp = xp_of(stack)
    if stack.ndim != 3:
        raise ComputeError(f"normalisation needs an (N, n, n) stack, got {tuple(stack.shape)}")
    n_img, ny, nx = stack.shape
    if n_img == 0:
        return stack.astype(np.float32)
    r = radius_grid((ny, nx), xp=xp)
    bg = (r > bg_radius_px).ravel()
    nbg = int(to_numpy(bg.sum()))
    if nbg < 10:
        raise ComputeError(f"background radius {bg_radius_px:.1f} px leaves only {nbg} "
                           f"background pixels in a {nx}-px box")
    flat = stack.reshape(n_img, -1).astype(np.float32, copy=False)
    if ramp:
        yy, xx = xp.meshgrid(xp.arange(ny, dtype=np.float32) - ny // 2,
                             xp.arange(nx, dtype=np.float32) - nx // 2, indexing="ij")
        A = xp.stack([xp.ones(ny * nx, dtype=np.float32), yy.ravel(), xx.ravel()], axis=1)
        Ab = A[bg]
        pinv = xp.linalg.pinv(Ab)                       # (3, nbg)
        coef = flat[:, bg] @ pinv.T                     # (N, 3)
        flat = flat - coef @ A.T
    vals = flat[:, bg]
    mean = vals.mean(axis=1, keepdims=True)
    std = vals.std(axis=1, keepdims=True)
    if white_dust > 0 or black_dust > 0:
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        bad = xp.zeros(flat.shape, dtype=bool)
        if white_dust > 0:
            bad |= flat > mean + white_dust * std
        if black_dust > 0:
            bad |= flat < mean - black_dust * std
        nbad = int(to_numpy(bad.sum()))
        if nbad:
            noise = xp.asarray(gen.standard_normal(flat.shape).astype(np.float32))
            flat = xp.where(bad, mean + std * noise, flat)
            vals = flat[:, bg]
            mean = vals.mean(axis=1, keepdims=True)
            std = vals.std(axis=1, keepdims=True)
    std = xp.where(std > 0, std, 1.0)
    return ((flat - mean) / std).reshape(n_img, ny, nx).astype(np.float32)


@dataclass
class Extracted:
    """Result of :func:`extract_particles`: the stack and which picks it holds."""

    stack: object           # (N_kept, n, n) float32 array (NumPy or CuPy)
    kept: np.ndarray        # bool per input pick: True when its box was inside
    pixel_size_a: float     # pixel size of the stack

    @property
    def n_dropped(self) -> int:
        return int((~self.kept).sum())


def extract_particles(mic, x_px, y_px, box: int, pixel_size_a: float,
                      rescale_box: int | None = None, invert: bool = True,
                      normalise: bool = True, bg_radius_px: float | None = None,
                      white_dust: float = -1.0, black_dust: float = -1.0,
                      rng: np.random.Generator | int | None = 0) -> Extracted:
    """Extract, re-scale, normalise and contrast-invert particles from one micrograph.

    Parameters
    ----------
    mic
        2D micrograph (protein dark).
    x_px, y_px
        Pick coordinates in micrograph pixels (x = column).
    box
        Extraction box (even) in micrograph pixels.
    pixel_size_a
        Micrograph pixel size (Å).
    rescale_box
        Output box after Fourier re-scaling (``None`` = no re-scaling).
    invert
        Multiply by −1 so protein is white (RELION's ``do_invert``).
    normalise
        Background normalisation (RELION's ``do_norm``).
    bg_radius_px
        Background radius in *output* pixels; default 0.75 × half the output box (RELION's
        default when ``bg_diameter`` is −1).
    white_dust, black_dust
        Dust removal thresholds in std-devs (≤ 0 disables).

    Returns
    -------
    Extracted
        Picks whose box leaves the micrograph are not in the stack (``kept`` is False).
    """
    if box <= 0 or box % 2:
        raise ComputeError(f"extraction box must be a positive even number, got {box}")
    if box > min(mic.shape):
        raise ComputeError(f"extraction box {box} px is larger than the micrograph "
                           f"({mic.shape[1]}×{mic.shape[0]} px)")
    out_box = box if rescale_box in (None, 0) else int(rescale_box)
    if out_box <= 0 or out_box % 2:
        raise ComputeError(f"re-scaled box must be a positive even number, got {rescale_box}")
    x_px = np.asarray(x_px, dtype=np.float64).ravel()
    y_px = np.asarray(y_px, dtype=np.float64).ravel()
    kept = inside_mask(x_px, y_px, box, mic.shape)
    stack = cut_boxes(mic, x_px[kept], y_px[kept], box)
    stack = rescale_stack(stack, out_box)
    if normalise:
        rad = 0.75 * out_box / 2.0 if bg_radius_px is None or bg_radius_px <= 0 else bg_radius_px
        stack = normalise_background(stack, rad, white_dust, black_dust, rng=rng)
    if invert:
        stack = -stack
    return Extracted(stack=stack, kept=kept, pixel_size_a=pixel_size_a * box / out_box)
