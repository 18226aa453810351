"""Beam-induced motion correction (RELION's own MotionCor2-like algorithm), arrays in and out.

Pipeline (:func:`correct_motion`), streaming over the frames twice so a 4096² x 40 movie never
has to sit in memory as float32:

1. **Pass 1** — per frame: gain-normalise (``raw * gain``, gain rotated/flipped beforehand with
   :func:`transform_gain`), fill defect pixels, accumulate the full-size sum (for hot/dead pixel
   detection) and keep a sum-binned copy (at most ``align_max_size`` pixels on the long side)
   for alignment.
2. **Defects** — hot/dead pixels are found in the sum (robust ``hot_pixel_sigma`` outliers) and
   their static contribution is removed from the binned frames (a static pattern would pull
   every shift towards zero).
3. **Whole-frame alignment** (:func:`align_stack`) — each frame (or group of frames) is
   cross-correlated in Fourier space against the sum of all *other* aligned frames, weighted
   by ``exp(-B k² / 4)``; the peak's parabolic sub-pixel position updates the shift, and the
   loop repeats until the largest update is below ``tolerance_px``. Because the frames are
   re-shifted by the current estimate every iteration, the final residual peak sits at zero
   lag where the parabolic fit is unbiased.
4. **Patch alignment** — the globally aligned binned frames are cut into ``patch_y x patch_x``
   patches, each patch stack is aligned the same way (all patches in one batched FFT) and the
   residual shifts are fitted by a smooth model: the residual displacement is
   ``sum_j c_j(t) f_j(x, y)`` with ``f`` in {1, x, y, x², xy, y²} and ``c_j(t)`` a cubic in time
   without constant term (MotionCor2's form), plus a free offset per patch.
5. **Pass 2** — per frame (in reverse order): local residual warp (bilinear), FFT, global shift
   by the Fourier shift theorem, accumulation of the plain sum and of the dose-weighted sum by a
   Horner scheme (``acc = acc * r(k) + F``; ``r = exp(-dose_per_frame / (2 Ne(k)))``) with the
   Grant & Grigorieff critical exposure ``Ne(k) = 0.245 k^-1.665 + 2.81`` e/Å² (x 0.8 below
   250 kV). The weighted sum is renormalised by ``sqrt(n / sum q²)`` per frequency so white noise
   stays white. Optional binning is a Fourier crop of both sums before the inverse FFT.

Shift convention: ``shifts[i] = (dy, dx)`` is the displacement of frame ``i``'s content
relative to frame 0 in unbinned pixels, i.e. ``frame_i(x) = frame_0(x - shift_i)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from compute import backend as be
from compute.backend import xp_of
from compute.errors import ComputeError

log = logging.getLogger(__name__)

#: dose (e/Å²) separating "early" from "late" accumulated motion, as RELION does
EARLY_DOSE_E_A2 = 4.0


# --------------------------------------------------------------------------------------------
# gain, defects, binning
# --------------------------------------------------------------------------------------------

def transform_gain(gain, rotation: int = 0, flip: int = 0):
    """Rotate then flip a gain reference as RELION's ``gain_rot``/``gain_flip`` options do.

    Parameters
    ----------
    gain
        2D gain reference (multiplied into the raw frames).
    rotation
        Number of 90° clockwise turns as seen with row 0 at the top (0-3; RELION's
        "No rotation (0)", "90 degrees (1)", ...).
    flip
        0 none, 1 upside down (rows reversed), 2 left to right (columns reversed).
    """
    xp = xp_of(gain)
    rotation = int(rotation) % 4
    if int(flip) not in (0, 1, 2):
        raise ComputeError(f"gain flip must be 0, 1 or 2, got {flip}")
    g = xp.rot90(gain, k=-rotation)
    if int(flip) == 1:
        g = g[::-1, :]
    elif int(flip) == 2:
        g = g[:, ::-1]
    return xp.ascontiguousarray(g)


def bin_sum(img, factor: int):
    """Sum-bin the last two axes by an integer factor (edges that do not fill a bin are dropped)."""
    if factor <= 1:
        return img
    ny, nx = img.shape[-2:]
    h, w = ny // factor, nx // factor
    a = img[..., : h * factor, : w * factor]
    # strided slice additions: a reduction over a tiny trailing axis is ~20x slower
    cols = a[..., :, 0::factor].astype(np.float32)
    for j in range(1, factor):
        cols += a[..., :, j::factor]
    out = cols[..., 0::factor, :].copy()
    for j in range(1, factor):
        out += cols[..., j::factor, :]
    return out


def fourier_bin(img, out_shape: tuple[int, int]):
    """Bin a 2D image to ``out_shape`` by cropping its spectrum (an ideal low-pass), scaled
    like :func:`bin_sum` (a constant ``c`` becomes ``c * ny * nx / (oy * ox)``).

    Sum-binning attenuates the signal towards the binned Nyquist (by cos(pi k) per axis) while
    the aliased noise keeps the noise power per frequency, so the binned frames' SNR there
    falls by up to half; a Fourier crop keeps it. For alignment at bin 2 this lowered the
    per-frame shift error of the 4096² benchmark movie by 6 % (0.322 -> 0.304 px RMS), at the
    cost of one full-size rFFT per frame.
    """
    xp = xp_of(img)
    ny, nx = img.shape[-2:]
    oy, ox = int(out_shape[0]), int(out_shape[1])
    if (oy, ox) == (ny, nx):
        return img.astype(np.float32, copy=False)
    # rows first, keeping only the columns that survive the crop, so the transform along y
    # runs over half of them (10-25 % less than a full rfft2 at bin 2)
    F = be.rfftn(img.astype(np.float32, copy=False), axes=(1,))[:, : ox // 2 + 1]
    F = be.fftn(F, axes=(0,))
    top = (oy + 1) // 2
    bot = oy // 2
    Fc = xp.concatenate([F[:top], F[ny - bot:]], axis=0) if bot else F[:top]
    return be.irfft2(Fc, s=(oy, ox)).astype(np.float32, copy=False)


def taper_profiles(shape: tuple[int, int], edge_frac: float = 0.05) -> list[np.ndarray]:
    """1D raised-cosine edge profiles (y, x) of :func:`taper_window`."""
    out = []
    for n in shape:
        e = max(1, int(round(edge_frac * n)))
        w = np.ones(n, dtype=np.float32)
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(e) + 0.5) / e)
        w[:e] = ramp
        w[n - e:] = ramp[::-1]
        out.append(w)
    return out


def taper_window(shape: tuple[int, int], edge_frac: float = 0.05, xp: ModuleType = np):
    """Separable raised-cosine edge taper (1 inside, 0 at the border) against FFT edge artefacts."""
    wy, wx = taper_profiles(shape, edge_frac)
    return xp.asarray(wy[:, None] * wx[None, :])


def _overlap_norm(shifts, profiles, r: int, lag_scale=(1.0, 1.0)):
    """Window-overlap envelope D_i(lag) = sum_{j != i} O(lag + s_i - s_j) for each frame.

    Frames are windowed before their content is re-aligned, so the windows of different
    frames sit at different places; the overlap of frame i's window with the others' changes
    with the lag and would pull the peak. Dividing the correlation by this envelope removes
    that bias. ``O`` is the (separable) autocorrelation of the window, from the 1D profiles.
    """
    s = np.asarray(shifts, dtype=np.float64)  # (..., n, 2)
    parts = []
    for a, w in enumerate(profiles):
        lags = np.arange(-r, r + 1, dtype=np.float64) * lag_scale[a]
        w = w.astype(np.float64)
        ac = np.correlate(w, w, mode="full") / float(np.dot(w, w))  # lags -(n-1)..(n-1)
        pos = np.arange(-(w.size - 1), w.size, dtype=np.float64)
        d = s[..., :, None, a] - s[..., None, :, a]  # (..., n, n)
        parts.append(np.interp(lags + d[..., None], pos, ac))  # (..., n, n, L)
    o = parts[0][..., :, None] * parts[1][..., None, :]  # (..., n, n, L, L)
    n = s.shape[-2]
    o = o * (1.0 - np.eye(n))[..., None, None]
    return o.sum(axis=-3)  # (..., n, L, L)


def detect_defects(total, n_sigma: float = 6.0, sample: int = 200_000, seed: int = 0):
    """Hot and dead pixels of a frame sum: robust ``n_sigma`` outliers from the median.

    Returns a boolean mask (True = defect).
    """
    xp = xp_of(total)
    flat = total.ravel()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, flat.size, size=min(sample, flat.size))
    s = be.to_numpy(flat[xp.asarray(idx)]).astype(np.float64)
    med = float(np.median(s))
    mad = float(np.median(np.abs(s - med))) * 1.4826
    sigma = max(mad, np.sqrt(max(med, 1.0)) * 0.5, 1e-6)
    bad = (total > med + n_sigma * sigma) | (total < med - n_sigma * sigma)
    if med >= 20:  # a pixel that never counted while its neighbours saw >= 20 electrons
        bad = bad | (total == 0)
    return bad


# --------------------------------------------------------------------------------------------
# alignment
# --------------------------------------------------------------------------------------------

def _freq_grids(shape: tuple[int, int], xp: ModuleType):
    ny, nx = shape
    ky = xp.fft.fftfreq(ny).astype(np.float32)
    kx = xp.fft.rfftfreq(nx).astype(np.float32)
    return ky, kx


def _phase_ramps(shifts, ky, kx, xp: ModuleType):
    """exp(+2 pi i k.s) factors (separable) that undo a displacement ``s`` (..., 2)."""
    sy = shifts[..., 0:1].astype(np.float32)
    sx = shifts[..., 1:2].astype(np.float32)
    ey = xp.exp((2j * np.pi) * (sy * ky)).astype(np.complex64)  # (..., ny)
    ex = xp.exp((2j * np.pi) * (sx * kx)).astype(np.complex64)  # (..., nxh)
    return ey, ex


def _parabolic_peak(win, r: int, xp: ModuleType):
    """Integer argmax plus 1D parabolic refinement per axis of windows (..., 2r+1, 2r+1)."""
    lead = win.shape[:-2]
    m = win.shape[-1]
    flat = win.reshape(-1, m * m)
    am = xp.argmax(flat, axis=1)
    iy = am // m
    ix = am % m
    iyc = xp.clip(iy, 1, m - 2)
    ixc = xp.clip(ix, 1, m - 2)
    rows = xp.arange(flat.shape[0])
    w3 = win.reshape(-1, m, m)

    def fit(c0, cm, cp):
        den = cm - 2 * c0 + cp
        off = xp.where(den < 0, 0.5 * (cm - cp) / xp.where(den < 0, den, -1.0), 0.0)
        return xp.clip(off, -0.5, 0.5)

    c0 = w3[rows, iyc, ixc]
    dy = fit(c0, w3[rows, iyc - 1, ixc], w3[rows, iyc + 1, ixc])
    dx = fit(c0, w3[rows, iyc, ixc - 1], w3[rows, iyc, ixc + 1])
    py = iyc.astype(np.float64) + dy - r
    px = ixc.astype(np.float64) + dx - r
    return xp.stack([py, px], axis=-1).reshape(*lead, 2)


def bfactor_weight(shape: tuple[int, int], pixel_size_a: float, bfactor_a2: float,
                   lowcut_px: float = 2.0, xp: ModuleType = np):
    """``exp(-B k²/4)`` on an rfft grid, with the lowest ``lowcut_px`` shells suppressed."""
    ky, kx = _freq_grids(shape, xp)
    k2 = (ky[:, None] ** 2 + kx[None, :] ** 2)
    w = xp.exp(-bfactor_a2 * k2 / (4.0 * pixel_size_a ** 2))
    r = xp.sqrt(k2) * min(shape)
    w = w * (1.0 - xp.exp(-(r / max(lowcut_px, 1e-3)) ** 2))
    return w.astype(np.float32)


def align_stack(F, shape: tuple[int, int], pixel_size_a: float, bfactor_a2: float = 150.0,
                max_shift_px: float = 40.0, n_iter: int = 10, tolerance_px: float = 0.01,
                refine_window_px: int = 3, weights=None, taper=None,
                coarse_bfactor_a2: float | None = 2000.0, lowcut_px: float = 2.0,
                return_sigma: bool = False, init_shifts=None):
    """Align frames to the sum of the others by Fourier cross-correlation (batched).

    Parameters
    ----------
    F
        rfft2 of the (tapered, mean-subtracted) frames, shape ``(..., n, ny, nx//2+1)``; leading
        axes are independent stacks (e.g. patches) aligned together in one batched FFT.
    shape
        Real-space ``(ny, nx)``.
    pixel_size_a
        Pixel size of these frames (Å), for the B-factor weighting.
    max_shift_px
        Search radius (pixels of these frames) of the first iteration.
    weights
        Optional Fourier weight (ny, nx//2+1) instead of the B-factor weight, or a callable
        ``weights(shifts) -> W`` evaluated once after the coarse stage (see
        :func:`ssnr_weight`).
    lowcut_px
        Frequencies below about this many periods across the frame are suppressed (static
        illumination and ice gradients carry no motion).
    coarse_bfactor_a2
        B-factor of a first, coarse stage searching the full ``max_shift_px`` range each
        iteration (``None`` to skip it).
    taper
        The 1D (y, x) window profiles the frames were multiplied by before the FFT; the
        correlation is then normalised by the windows' overlap (see :func:`_overlap_norm`).

    return_sigma
        Also return the expected standard error of each shift (see :func:`_shift_sigma`).
    init_shifts
        Start from these shifts (..., n, 2) and skip the coarse stage (a refinement round).

    Returns
    -------
    shifts : (..., n, 2)
        ``(dy, dx)`` displacement of each frame relative to frame 0, in pixels of these frames.
    sigma : (..., n, 2)
        Only with ``return_sigma``: standard error of each frame's shift, pixels.
    """
    xp = xp_of(F)
    n = F.shape[-3]
    lead = F.shape[:-3]
    shifts = xp.zeros((*lead, n, 2), dtype=np.float64)
    if n < 2:
        return (shifts, xp.full_like(shifts, np.inf)) if return_sigma else shifts
    ky, kx = _freq_grids(shape, xp)
    weight_fn = weights if callable(weights) else None
    W = weights if weights is not None and weight_fn is None else bfactor_weight(
        shape, pixel_size_a, bfactor_a2, lowcut_px, xp=xp)
    # the frame's correlation with itself is removed from its correlation with the sum
    self_power = (F.real ** 2 + F.imag ** 2).astype(np.float32, copy=False)
    r_full = int(min(max(2, np.ceil(max_shift_px)), min(shape) // 2 - 2))
    r_fine = int(min(max(2, refine_window_px), r_full))
    if init_shifts is not None:
        shifts = xp.asarray(init_shifts, dtype=np.float64).reshape(shifts.shape)
        shifts = shifts - shifts[..., 0:1, :]
        r_first = r_fine
    elif coarse_bfactor_a2 and coarse_bfactor_a2 > bfactor_a2 and r_full > r_fine:
        # coarse stage: low-pass heavily and search the whole range until the shifts settle,
        # so a large first step (or a weak first estimate) cannot strand the fine stage
        Wc = bfactor_weight(shape, pixel_size_a, coarse_bfactor_a2, lowcut_px, xp=xp)
        # crop once to where the coarse weight matters (the correlation is then computed on
        # the small grid; lags come back in units of ny/cy, nx/cx pixels)
        cy, cx = _crop_size(Wc, shape[0]), _crop_size(Wc, shape[1])
        crop = _crop_grid(shape, (cy, cx), xp)
        Fc = F[..., crop[0], :][..., : crop[1]]
        kyc, kxc = ky[crop[0]], kx[: crop[1]]
        Wcc = Wc[crop[0], :][:, : crop[1]]
        selfc = (Fc.real ** 2 + Fc.imag ** 2).astype(np.float32, copy=False)
        for _ in range(max(3, n_iter // 2)):
            delta = _coarse_step(Fc, selfc, shifts, kyc, kxc, Wcc, (cy, cx),
                                 (shape[0] / cy, shape[1] / cx), r_full, taper, xp)
            shifts = shifts + delta
            shifts = shifts - shifts[..., 0:1, :]
            # a frame whose peak was lost in noise must not wander beyond the search range
            shifts = xp.clip(shifts, -max_shift_px, max_shift_px)
            if float(xp.abs(delta - delta.mean(axis=-2, keepdims=True)).max()) < 0.5:
                break
        del Fc, selfc
        r_first = r_fine
    else:
        r_first = r_full
    if weight_fn is not None:  # data-driven weight, from frames roughly aligned by now
        W = weight_fn(shifts)
    selfwin = None
    for it in range(n_iter):
        r = r_first if it == 0 else r_fine
        if r > r_fine:  # no coarse stage: one full-grid search first
            delta = _coarse_step(F, self_power, shifts, ky, kx, W, shape, (1.0, 1.0), r,
                                 taper, xp)
        else:
            if selfwin is None:
                selfwin = _self_window(self_power, W, ky, kx, shape, r_fine, xp)
            # once the peak sits within a pixel of zero lag, the 3x3 lags around it are all
            # the parabolic fit needs (the direct DFT costs in proportion to the lags)
            rr = r if it <= (1 if r_first > r_fine else 0) else 1
            sw = selfwin[..., r_fine - rr:r_fine + rr + 1, r_fine - rr:r_fine + rr + 1]
            delta = _fine_step(F, sw, shifts, ky, kx, W, shape, rr, taper, xp)
        shifts = shifts + delta
        shifts = shifts - shifts[..., 0:1, :]
        if float(xp.abs(delta - delta.mean(axis=-2, keepdims=True)).max()) < tolerance_px:
            break
    if return_sigma:
        return shifts, _shift_sigma(F, self_power, shifts, ky, kx, W, shape, xp)
    return shifts


def _shift_sigma(F, self_power, shifts, ky, kx, W, shape, xp):
    """Standard error of each frame's cross-correlation peak position (..., n, 2), pixels.

    At the peak the correlation's slope is zero; its noise is the weighted sum of the cross
    power's imaginary parts, ``var(dCC/dx) = sum c² W² (2 pi k_x)² |F_i|² |R_i|² / 2`` (noise-
    dominated cross power, each half-plane frequency independent, ``c`` = 2 for the columns
    the rfft stores once for two), and the peak curvature is ``d²CC/dx² = -sum c W (2 pi
    k_x)² Re P``; the position error is their ratio. This is the usual small-error
    (Cramér-Rao-like) estimate: it tells the well-measured early frames from the damaged
    late ones, which the trajectory smoother uses as weights.
    """
    n = F.shape[-3]
    ey, ex = _phase_ramps(shifts, ky, kx, xp)
    S = _shifted_sum(F, ey, ex, xp)
    c = _rfft_column_weights(kx, shape[1], xp)
    k2y = ((2.0 * np.pi) ** 2 * ky * ky).astype(np.float32)[:, None] * c[None, :]
    k2x = ((2.0 * np.pi) ** 2 * kx * kx).astype(np.float32)[None, :] * c[None, :]
    wy, wx_ = W * k2y, W * k2x
    wwy, wwx = W * wy * c[None, :], W * wx_ * c[None, :]
    out = xp.empty((*F.shape[:-3], n, 2), dtype=np.float64)
    for j in range(n):
        G = F[..., j, :, :] * ey[..., j, :, None]
        G *= ex[..., j, None, :]
        R = S - G
        P = (G * xp.conj(R)).real
        pr = R.real ** 2 + R.imag ** 2
        pr *= self_power[..., j, :, :]
        for a, (w1, w2) in enumerate(((wy, wwy), (wx_, wwx))):
            curv = (P * w1).sum(axis=(-2, -1))
            var = 0.5 * (pr * w2).sum(axis=(-2, -1))
            sig = xp.sqrt(var) / xp.maximum(xp.abs(curv), 1e-30)
            out[..., j, a] = xp.where(curv > 0, sig, np.inf)
    return out


def _rfft_column_weights(kx, nx: int, xp):
    """2 for rfft columns that stand for two frequencies (±kx), 1 for kx = 0 and Nyquist."""
    c = xp.full(kx.shape, 2.0, dtype=np.float32)
    c[0] = 1.0
    if nx % 2 == 0:
        c[-1] = 1.0
    return c


def _shifted_sum(F, ey, ex, xp):
    """``sum_j F_j * ey_j * ex_j`` over the frame axis, one frame at a time (no stack copy)."""
    n = F.shape[-3]
    S = xp.zeros((*F.shape[:-3], *F.shape[-2:]), dtype=np.complex64)
    for j in range(n):
        g = F[..., j, :, :] * ey[..., j, :, None]
        g *= ex[..., j, None, :]
        S += g
    return S


def _crop_grid(shape, crop_shape, xp):
    """Row indices and column count of an rfft grid cropped to ``crop_shape``."""
    ny = shape[0]
    cy, cx = crop_shape
    h = cy // 2
    rows = xp.concatenate([xp.arange(h), xp.arange(ny - h, ny)]) if cy < ny else xp.arange(ny)
    return rows, cx // 2 + 1


def _lag_matrices(ky, kx, nx: int, r: int, xp):
    """DFT rows ``exp(2 pi i lag k)`` for lags -r..r: (L, ny) and (L, nxh) (the latter with
    the rfft column weights, so ``Re(Ey P Ex^T)`` is the real correlation at those lags)."""
    lags = xp.arange(-r, r + 1, dtype=np.float32)
    Ey = xp.exp((2j * np.pi) * lags[:, None] * ky[None, :]).astype(np.complex64)
    c = _rfft_column_weights(kx, nx, xp)
    Ex = (xp.exp((2j * np.pi) * lags[:, None] * kx[None, :]) * c[None, :]).astype(np.complex64)
    return Ey, Ex


def _self_window(self_power, W, ky, kx, shape, r: int, xp):
    """Each frame's correlation with itself at lags -r..r (..., n, L, L): it is removed from
    the correlation with the full sum, so the frame's own noise never correlates."""
    Ey, Ex = _lag_matrices(ky, kx, shape[1], r, xp)
    return xp.matmul(xp.matmul(Ey, (self_power * W).astype(np.complex64)), Ex.T).real


def _fine_step(F, selfwin, shifts, ky, kx, W, shape, r: int, taper, xp):
    """Fine round: every frame against the sum of the others at the (2r+1)² lags around its
    current shift, by a direct DFT (two small matrix products per frame).

    The frame's own phase ramp is folded into the DFT rows instead of being applied to a copy
    of the whole stack, and the weight into the conjugate sum, so one complex multiply per
    frame and two thin matrix products are all the full-grid work.
    """
    n = F.shape[-3]
    ey, ex = _phase_ramps(shifts, ky, kx, xp)
    S = _shifted_sum(F, ey, ex, xp)
    SW = xp.conj(S)
    SW *= W
    Ey0, Ex0 = _lag_matrices(ky, kx, shape[1], r, xp)
    L = 2 * r + 1
    win = xp.empty((*F.shape[:-3], n, L, L), dtype=np.float32)
    for j in range(n):
        M = F[..., j, :, :] * SW
        Eyj = Ey0 * ey[..., j, None, :]
        Exj = Ex0 * ex[..., j, None, :]
        win[..., j, :, :] = xp.matmul(xp.matmul(Eyj, M), xp.swapaxes(Exj, -1, -2)).real
    win -= selfwin
    if taper is not None:
        win = win / xp.asarray(_overlap_norm(be.to_numpy(shifts), taper, r))
    return _parabolic_peak(win, r, xp)


def ssnr_weight(F, shifts, shape: tuple[int, int], qsum=None, q2sum=None,
                lowcut_px: float = 2.0, kmax: float = 0.5, smooth_shells: int = 9,
                q4sum=None):
    """Cross-correlation weight from the data's own spectral signal-to-noise ratio.

    For frame ``i`` (Fourier ``F_i``, signal ``q_i S``, noise power ``N`` before the dose filter
    ``q_i`` that :func:`correct_motion` multiplies in) against the dose-filtered sum of the
    others, the cross power has mean ``q_i² Σq² S²`` and variance about
    ``q_i² N (Σq² N + (Σq²)² S²)``; weighting each frequency by mean / variance gives
    ``W ∝ SSNR / (1 + Σq² SSNR)`` with ``SSNR = S² / N`` of one undamaged frame. ``S²`` and
    ``N`` are estimated per shell from the roughly aligned frames: the coherent power
    ``|Σ F_i|² - Σ |F_i|²`` holds only signal, ``Σ |F_i|²`` is almost all noise. Unlike a fixed
    B-factor this follows the specimen's real spectrum (Thon rings, ice, particles) and puts
    the weight where the *sum of the others* is still informative.

    The coherent power of frames whose signal carries ``q_i²`` (the damage ``q_i`` times the
    matched filter ``q_i``) is ``((Σq²)² - Σq⁴) S²``: pass ``q4sum`` = ``Σ q_i⁴`` for that
    normalisation. Without it the older ``(Σq)² - Σq²`` is used, which underestimates ``S²``
    where ``q`` fades (0.2-0.7x of the truth beyond 1/20 Å⁻¹ on the 4K benchmark) and made
    this weight look worse than the B-factor (fixed 2026-12-05).

    ``qsum``, ``q2sum``: ``Σ q_i`` and ``Σ q_i²`` on the rfft grid (None = no dose filter).
    Returns a (ny, nx//2+1) float32 weight with the lowest ``lowcut_px`` shells and
    frequencies beyond ``kmax`` (cycles/pixel) suppressed.
    """
    xp = xp_of(F)
    ny, nx = shape
    n = F.shape[-3]
    ky, kx = _freq_grids(shape, xp)
    ey, ex = _phase_ramps(shifts, ky, kx, xp)
    coh = None
    inc = None
    # accumulate frame by frame (no full-size copy of the stack); leading axes are summed too
    Fl = F.reshape(-1, n, *F.shape[-2:])
    eyl = ey.reshape(-1, n, ey.shape[-1])
    exl = ex.reshape(-1, n, ex.shape[-1])
    for b in range(Fl.shape[0]):
        S = xp.zeros(F.shape[-2:], dtype=np.complex64)
        for i in range(n):
            g = Fl[b, i] * eyl[b, i][:, None]
            g *= exl[b, i][None, :]
            S += g
            p = (g.real ** 2 + g.imag ** 2)
            inc = p if inc is None else inc + p
        c = S.real ** 2 + S.imag ** 2
        coh = c if coh is None else coh + c
    coh = coh - inc
    kr = xp.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    nsh = int(np.ceil(0.5 * max(shape) * np.sqrt(2))) + 1
    shell = xp.minimum((kr * max(shape)).astype(np.int64), nsh - 1).ravel()

    def rad(a):
        a = xp.broadcast_to(xp.asarray(a, dtype=np.float64), kr.shape).ravel()
        return be.to_numpy(xp.bincount(shell, weights=a, minlength=nsh))

    cnt = np.maximum(rad(1.0), 1.0)
    if qsum is None:
        qs, q2 = np.full(nsh, float(n)), np.full(nsh, float(n))
    else:
        qs, q2 = rad(qsum) / cnt, rad(q2sum) / cnt
    if q4sum is not None and qsum is not None:
        sig = rad(coh) / cnt / np.maximum(q2 * q2 - rad(q4sum) / cnt, 1e-12)  # S² per shell
    else:
        sig = rad(coh) / cnt / np.maximum(qs * qs - q2, 1e-12)
    noise = rad(inc) / cnt / np.maximum(q2, 1e-12)          # N per shell
    ssnr = np.clip(sig / np.maximum(noise, 1e-30), 0.0, None)
    if smooth_shells > 1:  # shells are noisy; the spectrum is smooth on this scale
        kern = np.ones(smooth_shells) / smooth_shells
        ssnr = np.convolve(np.pad(ssnr, smooth_shells // 2, mode="edge"), kern, mode="valid")
    w = ssnr / (1.0 + q2 * ssnr)
    W = xp.asarray(w.astype(np.float32))[shell].reshape(kr.shape)
    r = kr * min(shape)
    W = W * (1.0 - xp.exp(-(r / max(lowcut_px, 1e-3)) ** 2)) * (kr <= kmax)
    top = float(W.max())
    return (W / top if top > 0 else W).astype(np.float32)


def _crop_size(W, n: int, frac: float = 1e-3) -> int:
    """Smallest even grid (<= n) holding every frequency where the weight exceeds ``frac``."""
    xp = xp_of(W)
    wmax = float(W.max())
    ky = xp.abs(xp.fft.fftfreq(W.shape[0]))[:, None]
    kx = xp.fft.rfftfreq(2 * (W.shape[1] - 1))[None, :]
    k = xp.maximum(ky, kx)
    keep = W > frac * wmax
    kmax = float(k[keep].max()) if bool(keep.any()) else 0.5
    c = int(np.ceil(2 * kmax * n * 1.1 / 2.0)) * 2
    return int(min(n, max(32, c)))


def _coarse_step(F, self_power, shifts, ky, kx, W, shape, scale, r: int, taper, xp):
    """Coarse round on a (possibly Fourier-cropped) grid: every frame against the sum of the
    others by an inverse FFT, peak searched within ``r`` original pixels; returns the shift
    updates in original pixels. ``ky``, ``kx`` are the grid's frequencies in cycles per
    *original* pixel and ``scale`` = original pixels per lag of this grid."""
    ey, ex = _phase_ramps(shifts, ky, kx, xp)
    G = F * ey[..., :, None]
    G *= ex[..., None, :]
    S = G.sum(axis=-3, keepdims=True)
    P = G
    P *= xp.conj(S)
    P -= self_power
    P *= W
    cy, cx = shape
    cc = be.irfft2(P, s=(cy, cx))
    fy, fx = scale
    rc = int(min(np.ceil(r / min(fy, fx)), min(cy, cx) // 2 - 2))
    iy = xp.arange(-rc, rc + 1) % cy
    ix = xp.arange(-rc, rc + 1) % cx
    win = cc[..., iy, :][..., ix]
    # no window-overlap normalisation here (``taper`` is unused): at large lags the overlap
    # is small and dividing by it amplified noise into spurious peaks at the search edge
    # (a 1024² movie locked at ±200 px); the fine stage, within a few pixels, removes the bias
    pk = _parabolic_peak(win, rc, xp)
    return pk * xp.asarray([fy, fx])


def curvature_relaxation(y, rel_sigma=None):
    """Penalty weights (n - 2,) in (0, 1] for the second differences of a measured track.

    A second difference far above its own noise marks real curvature (the fast first
    frames): its weight drops towards 0 so the smoother may follow it. The noise of each
    second difference comes from the relative per-frame noise ``rel_sigma`` (the trend of the
    standard errors; flat if None), scaled so that the normalised third differences have a
    unit robust spread; the noisy, dose-damaged late frames therefore need a larger bend
    before they count as motion.
    """
    y = np.asarray(y, dtype=np.float64)
    r = np.ones_like(y) if rel_sigma is None else np.asarray(rel_sigma, dtype=np.float64)
    z3 = np.diff(y, 3) / np.sqrt(r[:-3] ** 2 + 9 * r[1:-2] ** 2 + 9 * r[2:-1] ** 2 + r[3:] ** 2)
    scale3 = 1.4826 * np.median(np.abs(z3 - np.median(z3))) + 1e-9
    noise2 = scale3 * np.sqrt(r[:-2] ** 2 + 4 * r[1:-1] ** 2 + r[2:] ** 2)
    curv = np.abs(np.diff(y, 2))
    return 1.0 / (1.0 + (curv / (4.0 * noise2)) ** 2)


def smooth_trajectory(shifts, lambdas=None, sigma=None, order: int = 3,
                      criterion: str = "reml"):
    """Denoise a measured trajectory (n, 2) with an adaptive, weighted Whittaker smoother.

    Minimises ``sum_i w_i (s_i - m_i)² + lambda * sum_j v_j (D^order s)_j²`` per axis, where
    ``m`` are the measured shifts, ``w_i = 1 / sigma_i²`` the measurement weights (uniform
    without ``sigma``; the per-frame standard errors of :func:`align_stack` make the smoother
    follow the well-measured early frames, where the fast initial motion is, and average the
    noisy, dose-damaged late ones), ``D`` finite differences, and ``v_j`` relax the penalty
    where the measured curvature is far above its local noise (the fast first frames; the
    noise of each second difference is taken from the sigma trend, scaled to the data's
    third differences, so the noisier late frames are not mistaken for curvature; with a
    flat sigma this is the plain robust spread of the third differences). ``lambda``
    is chosen per axis by ``criterion``: ``"reml"`` (default) maximises the restricted
    marginal likelihood of the data under the Gaussian smoothness prior the penalty stands
    for, with the overall noise scale profiled out (so ``sigma`` only needs to be right in
    its relative trend); ``"gcv"`` is (weighted) generalised cross-validation, which on
    40-frame trajectories sometimes picks a near-interpolating ``lambda`` (2026-12, 4096²
    simulator movie seed 2: 0.25 px RMS error with GCV, 0.16 px with REML; on 60 simulated
    noisy trajectories the mean error fell from 0.151 to 0.134 px). ``sigma`` is itself
    noisy, so only its smooth trend over the frames (a quadratic in log sigma) is used.
    Frame 0 stays the origin.
    """
    m = np.asarray(be.to_numpy(shifts), dtype=np.float64)
    n = m.shape[0]
    if n < 5:
        return m
    order = int(min(max(order, 1), n - 2))
    if lambdas is None:
        lambdas = np.logspace(-2, 4, 25)
    t = np.arange(n, dtype=np.float64)
    trends = np.ones_like(m)           # relative noise level per frame and axis
    if sigma is not None:
        sg = np.asarray(be.to_numpy(sigma), dtype=np.float64).reshape(n, -1)
        for a in range(m.shape[1]):
            lg = np.log(np.clip(sg[:, a], 1e-6, 1e6))
            ok = np.isfinite(sg[:, a]) & (sg[:, a] > 0)
            if ok.sum() >= 5:
                trends[:, a] = np.exp(np.polyval(np.polyfit(t[ok], lg[ok], 2), t))
    wts = 1.0 / trends ** 2
    wts /= wts.mean(axis=0, keepdims=True)
    D = np.diff(np.eye(n), order, axis=0)
    out = np.empty_like(m)
    for a in range(m.shape[1]):
        y = m[:, a].copy()
        w = wts[:, a].copy()
        # outliers (a frame whose correlation peak was lost in noise) would pass through the
        # relaxed penalty as "fast motion": compare with a running median, drop the frames
        # far off it (weight 0, the smoother interpolates) before anything else
        pad = np.pad(y, 2, mode="edge")
        med = np.median(np.stack([pad[i:i + n] for i in range(5)]), axis=0)
        dev = y - med
        scale = 1.4826 * np.median(np.abs(dev - np.median(dev))) + 1e-6
        bad = np.abs(dev) > 8.0 * scale + 1.0
        bad[0] = False
        if bad.any() and (~bad).sum() >= order + 3:
            y[bad] = med[bad]
            w[bad] = 0.0
        v2 = curvature_relaxation(y, trends[:, a])
        # penalty weights per row of D: the smallest v2 the row's frames touch
        v = np.array([v2[max(0, j - 1):j + order - 1].min() if v2.size else 1.0
                      for j in range(D.shape[0])])
        P = D.T @ (v[:, None] * D)
        Wm = np.diag(w)
        if criterion == "reml":
            # prior x ~ N(0, phi (lam P)^-) and data y ~ N(x, phi W^-1); with the scale phi
            # profiled out, -2 log L_R = r log(rss + lam x'Px) + log|W + lam P| - r log lam
            # (+ const), r = rank P (the polynomials of degree < order are unpenalised)
            ev = np.linalg.eigvalsh(P)
            rank = int((ev > 1e-9 * max(float(ev.max()), 1e-30)).sum())
        elif criterion != "gcv":
            raise ComputeError(f"unknown smoothing criterion {criterion!r}")
        best = None
        for lam in lambdas:
            A = Wm + lam * P
            H = np.linalg.solve(A, Wm)
            fit = H @ y
            rss = float((w * (y - fit) ** 2).sum())
            if criterion == "reml":
                pen = float(lam * fit @ P @ fit)
                score = (rank * np.log(max(rss + pen, 1e-300)) + np.linalg.slogdet(A)[1]
                         - rank * np.log(lam))
            else:
                tr = float(np.trace(H))
                score = n * rss / max((n - tr) ** 2, 1e-12)
            if best is None or score < best[0]:
                best = (score, fit)
        out[:, a] = best[1]
    return out - out[0:1]


def interpolate_group_shifts(group_shifts, group_size: int, n_frames: int):
    """Per-frame shifts from shifts of consecutive frame groups (linear, extrapolated at ends)."""
    gs = be.to_numpy(group_shifts)
    ng = gs.shape[-2]
    if group_size <= 1 or ng == n_frames:
        return gs
    centres = np.array([min(n_frames, (g + 1) * group_size) - g * group_size for g in range(ng)])
    centres = np.array([g * group_size + (c - 1) / 2.0 for g, c in enumerate(centres)])
    t = np.arange(n_frames, dtype=np.float64)
    out = np.empty((*gs.shape[:-2], n_frames, 2))
    flat_in = gs.reshape(-1, ng, 2)
    flat_out = out.reshape(-1, n_frames, 2)
    for b in range(flat_in.shape[0]):
        for a in range(2):
            y = flat_in[b, :, a]
            if ng == 1:
                flat_out[b, :, a] = y[0]
                continue
            v = np.interp(t, centres, y)
            lo, hi = t < centres[0], t > centres[-1]
            v[lo] = y[0] + (t[lo] - centres[0]) * (y[1] - y[0]) / (centres[1] - centres[0])
            v[hi] = y[-1] + (t[hi] - centres[-1]) * (y[-1] - y[-2]) / (centres[-1] - centres[-2])
            flat_out[b, :, a] = v
    return out - out[..., 0:1, :]


# --------------------------------------------------------------------------------------------
# local motion model
# --------------------------------------------------------------------------------------------

def _spatial_basis(x, y, n_terms: int):
    terms = [np.ones_like(x), x, y, x * x, x * y, y * y]
    return np.stack(terms[:n_terms], axis=-1)


def _time_basis(n_frames: int, times=None):
    """(t, t², t³) with t = frame / (n_frames - 1), at every frame or at (fractional) ``times``."""
    f = np.arange(n_frames, dtype=np.float64) if times is None else np.asarray(times, float)
    t = f / max(n_frames - 1, 1)
    return np.stack([t, t * t, t ** 3], axis=-1)  # zero at frame 0


@dataclass
class LocalMotionModel:
    """Smooth residual displacement field (on top of the global shifts), MotionCor2's form.

    ``r_a(x, y, t) = sum_{j, m} coeffs[a, m, j] * g_m(t) * f_j(x, y)`` for axis ``a`` (0 = y,
    1 = x), ``g = (t, t², t³)`` with ``t = frame / (n - 1)``, ``f = (1, x, y, x², xy, y²)`` with
    ``x = X / nx - 0.5``, ``y = Y / ny - 0.5`` in unbinned pixels; values in unbinned pixels.
    """

    coeffs: np.ndarray  # (2, 3, n_terms)
    frame_shape: tuple[int, int]
    n_frames: int

    def evaluate(self, yx_px, frame: int | np.ndarray):
        """Residual displacement (..., 2) at unbinned positions ``yx_px`` (..., 2) and frame(s)."""
        yx = np.asarray(yx_px, dtype=np.float64)
        y = yx[..., 0] / self.frame_shape[0] - 0.5
        x = yx[..., 1] / self.frame_shape[1] - 0.5
        f = _spatial_basis(x, y, self.coeffs.shape[-1])
        g = _time_basis(self.n_frames)[np.asarray(frame)]
        return np.einsum("...m,amj,...j->...a", g, self.coeffs, f)

    def row_polys(self, frame: int):
        """Per-axis polynomial in x for each row: coefficients (a0(y), a1(y), a2(y)) factors."""
        g = _time_basis(self.n_frames)[frame]
        c = np.einsum("m,amj->aj", g, self.coeffs)  # (2, n_terms)
        full = np.zeros((2, 6))
        full[:, : c.shape[1]] = c
        return full


def fit_local_motion(centres_px, residual_shifts_px, frame_shape: tuple[int, int],
                     times=None, n_frames: int | None = None) -> LocalMotionModel:
    """Least-squares fit of :class:`LocalMotionModel` to patch residual shifts.

    Parameters
    ----------
    centres_px
        (P, 2) patch centres (y, x) in unbinned pixels.
    residual_shifts_px
        (P, m, 2) measured patch displacements after global alignment (any per-patch offset),
        at every frame (``m = n_frames``) or at the (fractional) frame ``times`` (m,) of
        frame groups.
    n_frames
        Frames of the movie (default ``m``).
    """
    c = np.asarray(centres_px, dtype=np.float64)
    s = np.asarray(residual_shifts_px, dtype=np.float64)
    n_p, n_f, _ = s.shape
    n_frames = int(n_frames or n_f)
    n_terms = 6 if n_p >= 9 else (3 if n_p >= 3 else 1)
    f = _spatial_basis(c[:, 1] / frame_shape[1] - 0.5, c[:, 0] / frame_shape[0] - 0.5, n_terms)
    g = _time_basis(n_frames, times)
    # design (P, m, 3*n_terms); per-patch offsets projected out by centring over time
    X = np.einsum("tm,pj->ptmj", g, f).reshape(n_p, n_f, -1)
    X = X - X.mean(axis=1, keepdims=True)
    Y = s - s.mean(axis=1, keepdims=True)
    A = X.reshape(n_p * n_f, -1)
    coeffs = np.empty((2, 3, n_terms))
    for a in range(2):
        sol, *_ = np.linalg.lstsq(A, Y[..., a].ravel(), rcond=None)
        coeffs[a] = sol.reshape(3, n_terms)
    return LocalMotionModel(coeffs, tuple(frame_shape), n_frames)


def local_model_significance(model: LocalMotionModel, centres_px, residual_shifts_px,
                             times=None) -> float:
    """F statistic of the local model against "no local motion" (per-patch offsets only)."""
    s = np.asarray(residual_shifts_px, dtype=np.float64)
    y = s - s.mean(axis=1, keepdims=True)
    g = _time_basis(model.n_frames, times if times is not None else np.arange(s.shape[1]))
    f = _spatial_basis(np.asarray(centres_px)[:, 1] / model.frame_shape[1] - 0.5,
                       np.asarray(centres_px)[:, 0] / model.frame_shape[0] - 0.5,
                       model.coeffs.shape[-1])
    pred = np.einsum("tm,amj,pj->pta", g, model.coeffs, f)
    pred = pred - pred.mean(axis=1, keepdims=True)
    rss0 = float((y ** 2).sum())
    rss1 = float(((y - pred) ** 2).sum())
    p = model.coeffs.size
    dof = y.size - p - 2 * s.shape[0]
    if dof <= 0 or rss1 <= 0:
        return float("inf")
    return ((rss0 - rss1) / p) / (rss1 / dof)


def _fast_size_below(n: int) -> int:
    """Largest even 2^a 3^b 5^c <= n (n >= 2)."""
    for m in range(int(n) - int(n) % 2, 1, -2):
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
    return 2


def _group_centres(group_size: int, n_frames: int) -> np.ndarray:
    """Mean frame index of each consecutive group of ``group_size`` frames."""
    ng = (n_frames + group_size - 1) // group_size
    return np.array([(j * group_size + min(n_frames, (j + 1) * group_size) - 1) / 2.0
                     for j in range(ng)])


def _residual_field(model: LocalMotionModel, frame: int, shape: tuple[int, int],
                    offset_yx=(0.0, 0.0), xp: ModuleType = np):
    """Residual displacement maps (ry, rx) over a full frame (unbinned pixels)."""
    full = model.row_polys(frame)  # (2, 6) for 1, x, y, x², xy, y²
    ny, nx = shape
    y = (xp.arange(ny, dtype=np.float32) - float(offset_yx[0])) / model.frame_shape[0] - 0.5
    x = (xp.arange(nx, dtype=np.float32) - float(offset_yx[1])) / model.frame_shape[1] - 0.5
    out = []
    for a in range(2):
        c0, cx, cy, cxx, cxy, cyy = (float(v) for v in full[a])
        out.append((c0 + cy * y + cyy * y * y)[:, None] + ((cx + cxy * y)[:, None] * x[None, :])
                   + (cxx * x * x)[None, :])
    return out[0].astype(np.float32), out[1].astype(np.float32)


def _residual_max(model: LocalMotionModel, frame: int, shape: tuple[int, int],
                  offset_yx=(0.0, 0.0), n: int = 17) -> float:
    """Largest |residual displacement| over the frame, from an ``n x n`` grid (the field is
    a quadratic: its extremes lie on the border or at one interior point, so a 17 x 17 grid
    is within a few % of the truth; only used to skip negligible warps)."""
    y = np.linspace(0, shape[0] - 1, n) - float(offset_yx[0])
    x = np.linspace(0, shape[1] - 1, n) - float(offset_yx[1])
    yx = np.stack(np.meshgrid(y, x, indexing="ij"), axis=-1)
    return float(np.abs(model.evaluate(yx, frame)).max())


def warp_local(img, model: LocalMotionModel, frame: int, offset_yx=(0.0, 0.0),
               strip_rows: int = 512):
    """``out(y, x) = img(y + r_y, x + r_x)`` for the residual field of ``model`` at ``frame``
    (as :func:`_residual_field` then :func:`warp_bilinear`, bilinear, clamped borders).

    On the CPU the sampling grid is built strip by strip straight from the field's quadratic
    coefficients in torch (``r(x) = A(y) + B(y) x + C x²`` per row: two fused full-size
    operations per axis) instead of full-size NumPy maps and their copies, which took twice
    as long as the interpolation itself (4096² x 40 frames: 20 s of 36 s).
    """
    xp = xp_of(img)
    if xp is not np:
        ry, rx = _residual_field(model, frame, img.shape, offset_yx=offset_yx, xp=xp)
        return warp_bilinear(img, ry, rx)
    import torch  # noqa: PLC0415

    ny, nx = img.shape
    full = model.row_polys(frame)  # (2, 6): 1, x, y, x², xy, y²
    fy, fx = model.frame_shape
    sy, sx = 2.0 / max(ny - 1, 1), 2.0 / max(nx - 1, 1)
    # normalised model coordinates of the columns and rows (float64 for the coefficients)
    xv = (np.arange(nx, dtype=np.float64) - float(offset_yx[1])) / fx - 0.5
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    out = np.empty((ny, nx), dtype=np.float32)
    cols = np.arange(nx, dtype=np.float64)
    # per axis a: r_a = A_a(y) + B_a(y) x + C_a x² with x, y the normalised coordinates
    colterm, bx = [], []
    for a, scale in ((1, sx), (0, sy)):
        c0, cx, cy, cxx, cxy, cyy = (float(v) for v in full[a])
        base = cols * sx - 1.0 if a == 1 else np.zeros(nx)
        colterm.append(torch.from_numpy((base + cxx * xv * xv * scale).astype(np.float32)))
        bx.append(torch.from_numpy(xv.astype(np.float32)))
    for r0 in range(0, ny, strip_rows):
        r1 = min(ny, r0 + strip_rows)
        rows = np.arange(r0, r1, dtype=np.float64)
        yv = (rows - float(offset_yx[0])) / fy - 0.5
        grid = torch.empty((1, r1 - r0, nx, 2), dtype=torch.float32)
        for k, (a, scale) in enumerate(((1, sx), (0, sy))):
            c0, cx, cy, cxx, cxy, cyy = (float(v) for v in full[a])
            rowterm = (c0 + cy * yv + cyy * yv * yv) * scale
            if a == 0:
                rowterm = rowterm + rows * sy - 1.0
            slope = torch.from_numpy(((cx + cxy * yv) * scale).astype(np.float32))
            g = torch.from_numpy(rowterm.astype(np.float32))[:, None] + colterm[k][None, :]
            g.addcmul_(slope[:, None], bx[k][None, :])
            grid[0, :, :, k] = g
        res = torch.nn.functional.grid_sample(t, grid, mode="bilinear",
                                              padding_mode="border", align_corners=True)
        out[r0:r1] = res[0, 0].numpy()
    return out


def warp_bilinear(img, ry, rx, strip_rows: int = 256):
    """``out(y, x) = img(y + ry, x + rx)`` with bilinear interpolation and clamped borders."""
    xp = xp_of(img)
    ny, nx = img.shape
    if xp is np:
        import torch  # noqa: PLC0415 - grid_sample is ~7x faster than scipy's map_coordinates

        t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
        out = np.empty((ny, nx), dtype=np.float32)
        xs = np.arange(nx, dtype=np.float32)
        for r0 in range(0, ny, strip_rows):
            r1 = min(ny, r0 + strip_rows)
            ys = np.arange(r0, r1, dtype=np.float32)[:, None]
            gx = (xs[None, :] + rx[r0:r1]) * (2.0 / max(nx - 1, 1)) - 1.0
            gy = (ys + ry[r0:r1]) * (2.0 / max(ny - 1, 1)) - 1.0
            grid = torch.from_numpy(np.stack([gx, gy], axis=-1).astype(np.float32))[None]
            res = torch.nn.functional.grid_sample(t, grid, mode="bilinear",
                                                  padding_mode="border", align_corners=True)
            out[r0:r1] = res[0, 0].numpy()
        return out
    yy = xp.clip(xp.arange(ny, dtype=np.float32)[:, None] + ry, 0, ny - 1)
    xx = xp.clip(xp.arange(nx, dtype=np.float32)[None, :] + rx, 0, nx - 1)
    y0 = xp.clip(xp.floor(yy).astype(np.int64), 0, ny - 2)
    x0 = xp.clip(xp.floor(xx).astype(np.int64), 0, nx - 2)
    fy, fx = yy - y0, xx - x0
    return ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x0 + 1])
            + fy * ((1 - fx) * img[y0 + 1, x0] + fx * img[y0 + 1, x0 + 1])).astype(np.float32)


# --------------------------------------------------------------------------------------------
# dose weighting
# --------------------------------------------------------------------------------------------

def critical_exposure(k_inv_a, voltage_kv: float = 300.0):
    """Grant & Grigorieff (2015) critical exposure Ne(k) in e/Å² (k in 1/Å; inf at k = 0)."""
    xp = xp_of(k_inv_a)
    k = xp.asarray(k_inv_a, dtype=np.float64)
    with np.errstate(divide="ignore"):
        ne = 0.245 * xp.where(k > 0, k, 1.0) ** -1.665 + 2.81
    ne = xp.where(k > 0, ne, np.inf)
    return ne * (0.8 if voltage_kv < 250 else 1.0)


def dose_weights(n_frames: int, k_inv_a, dose_per_frame_e_a2: float, pre_exposure_e_a2: float = 0.0,
                 voltage_kv: float = 300.0):
    """Per-frame weights q_i(k) = exp(-D_i / (2 Ne(k))) at the mid-frame dose D_i (n, ...)."""
    xp = xp_of(k_inv_a)
    ne = critical_exposure(k_inv_a, voltage_kv)
    d = pre_exposure_e_a2 + (xp.arange(n_frames) + 0.5) * dose_per_frame_e_a2
    return xp.exp(-d.reshape((-1,) + (1,) * ne.ndim) / (2.0 * ne[None]))


def accumulated_motion(shifts_px, pixel_size_a: float, dose_per_frame_e_a2: float | None,
                       pre_exposure_e_a2: float = 0.0,
                       early_dose_e_a2: float = EARLY_DOSE_E_A2) -> tuple[float, float, float]:
    """RELION's rlnAccumMotionTotal/Early/Late (Å): path length of the global trajectory.

    Early covers the frame steps ending at or below ``early_dose_e_a2`` cumulative dose (the
    first 4 frames when the dose per frame is unknown).
    """
    s = np.asarray(be.to_numpy(shifts_px), dtype=np.float64)
    steps = np.linalg.norm(np.diff(s, axis=0), axis=1) * pixel_size_a
    if steps.size == 0:
        return 0.0, 0.0, 0.0
    if dose_per_frame_e_a2:
        end_dose = pre_exposure_e_a2 + (np.arange(1, steps.size + 1) + 1) * dose_per_frame_e_a2
        early = end_dose <= early_dose_e_a2
    else:
        early = np.arange(steps.size) < 4
    return float(steps.sum()), float(steps[early].sum()), float(steps[~early].sum())


# --------------------------------------------------------------------------------------------
# the whole movie
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MotionOptions:
    """Options of :func:`correct_motion` (units in the names; defaults as RELION's GUI)."""

    pixel_size_a: float
    dose_per_frame_e_a2: float | None = None
    pre_exposure_e_a2: float = 0.0
    voltage_kv: float = 300.0
    bfactor_a2: float = 150.0
    patch_x: int = 5
    patch_y: int = 5
    group_frames: int = 1
    bin_factor: float = 1.0
    do_dose_weighting: bool = True
    align_max_size: int = 2048
    align_max_res_a: float = 4.0
    align_fourier_bin: bool = True
    ssnr_weighting: bool = True
    refine_rounds: int = 0
    patch_group_frames: int = 0
    max_shift_px: float = 200.0
    n_iter: int = 10
    tolerance_px: float = 0.01
    hot_pixel_sigma: float | None = 6.0
    patch_min_size_px: int = 48
    flatfield_cycles: float | None = 4.0
    smooth_trajectory: bool = True
    local_min_f: float = 2.0
    lowcut_cycles: float = 2.0


@dataclass
class MotionResult:
    """Sums and trajectories of one movie (shifts in unbinned pixels, see module docstring)."""

    non_weighted: np.ndarray
    dose_weighted: np.ndarray | None
    shifts_px: np.ndarray                      # (n, 2) global (dy, dx)
    pixel_size_a: float                        # of the output sums (after binning)
    local_model: LocalMotionModel | None = None
    patch_centres_px: np.ndarray | None = None  # (P, 2)
    patch_shifts_px: np.ndarray | None = None   # (P, n, 2) measured (global + residual)
    defect_yx: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    accum_motion_total_a: float = 0.0
    accum_motion_early_a: float = 0.0
    accum_motion_late_a: float = 0.0

    def model_shifts_px(self, yx_px, frame) -> np.ndarray:
        """Total modelled displacement (global + local) at unbinned positions and frame(s)."""
        g = self.shifts_px[np.asarray(frame)]
        if self.local_model is None:
            return np.broadcast_to(g, np.broadcast_shapes(np.shape(yx_px), np.shape(g))).copy()
        return g + self.local_model.evaluate(yx_px, frame)


FrameSource = Sequence  # anything with len() and [i] -> 2D array (ndarray, memmap, frame reader)


def check_frame(frame, index: int, xp: ModuleType = np) -> None:
    """Raise :class:`ComputeError` for a frame holding NaN/inf or nothing but zeros."""
    if frame.dtype.kind == "f" and not bool(xp.isfinite(frame).all()):
        raise ComputeError(f"frame {index + 1} contains NaN or infinite values")
    if not bool(xp.any(frame)):
        raise ComputeError(f"frame {index + 1} is all zeros")


def eer_gain(gain, frame_shape: tuple[int, int], multiplicative: bool = True):
    """A gain reference made fit for EER frames of ``frame_shape``, by RELION's rules.

    - A gain at twice the frame size (an 8K gain for 4K EER frames) is reduced by 2 x 2
      blocks (the mean; RELION sums, which only rescales the output).
    - Thermo Fisher's ``.gain`` is multiplicative; any other gain file given for EER movies
      holds counts and is inverted (``mean / gain``; zero stays zero, i.e. a defect).
    """
    xp = xp_of(gain)
    g = xp.asarray(gain, dtype=np.float32)
    h, w = int(frame_shape[0]), int(frame_shape[1])
    if g.shape == (2 * h, 2 * w):
        g = g.reshape(h, 2, w, 2).mean(axis=(1, 3))
    if not multiplicative:
        pos = g > 0
        if bool(pos.any()):
            mean = float(g[pos].mean())
            g = xp.where(pos, mean / xp.where(pos, g, 1.0), 0.0).astype(np.float32)
    return g


def _prepare_gain(gain, shape, xp):
    if gain is None:
        return None, None
    g = xp.asarray(gain, dtype=np.float32)
    if g.shape != tuple(shape):
        raise ComputeError(f"gain reference is {g.shape[1]}x{g.shape[0]} but the frames are "
                           f"{shape[1]}x{shape[0]} (check the gain file and gain_rot)")
    bad = ~xp.isfinite(g) | (g <= 0)
    if bool(bad.all()):
        raise ComputeError("gain reference has no positive finite pixel")
    g = xp.where(bad, 0.0, g).astype(np.float32)
    return g, bad


def correct_motion(frames: FrameSource, opts: MotionOptions, gain=None, defect_mask=None,
                   progress: Callable[[str], None] | None = None,
                   xp: ModuleType | None = None) -> MotionResult:
    """Align and sum one movie (see the module docstring for the algorithm).

    Parameters
    ----------
    frames
        ``len()``-able sequence of 2D frames (raw counts or floats); read twice, one at a time.
    opts
        :class:`MotionOptions`.
    gain
        Gain reference (already rotated/flipped) multiplied into each frame, or ``None``.
    defect_mask
        Boolean mask of known bad pixels (True = defect), or ``None``.
    progress
        Optional callback receiving a short stage name (e.g. to check for an abort).
    xp
        Array module to compute with (default: that of the first frame).

    Raises
    ------
    ComputeError
        Wrong gain size, a frame with NaN/inf or all zeros, fewer than one frame.
    """
    n = len(frames)
    if n < 1:
        raise ComputeError("the movie has no frames")
    f0 = frames[0]
    xp = xp or xp_of(f0)
    shape = tuple(int(v) for v in f0.shape)
    if len(shape) != 2:
        raise ComputeError(f"frames must be 2D, got shape {shape}")
    ny, nx = shape
    gain_arr, gain_bad = _prepare_gain(gain, shape, xp)
    mask = xp.zeros(shape, dtype=bool) if defect_mask is None else xp.asarray(defect_mask, bool)
    if mask.shape != shape:
        raise ComputeError(f"defect map is {mask.shape[1]}x{mask.shape[0]} but the frames are "
                           f"{nx}x{ny}")
    if gain_bad is not None:
        mask = mask | gain_bad
    note = progress or (lambda _s: None)

    # ---- pass 1: gain, sum, binned copies for alignment ------------------------------------
    abin = max(1, int(np.ceil(max(shape) / max(opts.align_max_size, 16))))
    ash = (ny // abin, nx // abin)
    fbin = bool(opts.align_fourier_bin) and abin > 1
    binned = np.empty((n, *ash), dtype=np.float32) if xp is np else xp.empty((n, *ash), np.float32)
    total = xp.zeros(shape, dtype=np.float32)
    mask_idx = xp.nonzero(mask.ravel())[0]
    for i in range(n):
        fr = xp.asarray(frames[i])
        check_frame(fr, i, xp)
        fr = fr.astype(np.float32)
        if gain_arr is not None:
            fr *= gain_arr
        if mask_idx.size:
            fr.ravel()[mask_idx] = 0.0
        total += fr
        binned[i] = fourier_bin(fr[:ash[0] * abin, :ash[1] * abin], ash) if fbin \
            else bin_sum(fr, abin)
    note("read")
    if opts.hot_pixel_sigma:
        good_total = xp.where(mask, xp.median(total), total)
        mask = mask | detect_defects(good_total, opts.hot_pixel_sigma)
    mask_idx = xp.nonzero(mask.ravel())[0]
    fill = float(total.ravel()[xp.nonzero(~mask.ravel())[0]].mean()) / n if mask_idx.size else 0.0
    if mask_idx.size:
        corr = xp.zeros(shape, dtype=np.float32)
        corr.ravel()[mask_idx] = fill - total.ravel()[mask_idx] / n
        binned += (fourier_bin(corr[:ash[0] * abin, :ash[1] * abin], ash) if fbin
                   else bin_sum(corr, abin))[None]
    if opts.flatfield_cycles:
        # illumination that does not move with the specimen would pin the shifts at zero:
        # divide the alignment frames by the smooth part of the sum
        tb = bin_sum(xp.where(mask, fill * n, total), abin)
        flat = _smooth(tb, opts.flatfield_cycles)
        flat = flat / float(flat.mean())
        binned /= xp.maximum(flat, 0.05)[None]

    # ---- whole-frame alignment -------------------------------------------------------------
    px_align = opts.pixel_size_a * abin
    prof = taper_profiles(ash, 0.05)
    taper = xp.asarray(prof[0][:, None] * prof[1][None, :])
    g = max(1, int(opts.group_frames))
    ng = (n + g - 1) // g
    grouped = xp.stack([binned[j * g:(j + 1) * g].sum(axis=0) for j in range(ng)]) if g > 1 \
        else xp.asarray(binned)
    means = grouped.mean(axis=(-2, -1), keepdims=True)
    F = be.rfft2((grouped - means) * taper).astype(np.complex64, copy=False)
    qsum = q2sum = q4sum = None
    if opts.dose_per_frame_e_a2:
        # matched filter: a damaged frame keeps its signal at low resolution only, so weight
        # each (group of) frame(s) by its expected dose fading before correlating
        qf = _group_dose_filter(ash, px_align, opts, n, g, xp)
        F *= qf
        qsum, q2sum = qf.sum(axis=0), (qf * qf).sum(axis=0)
        q4sum = ((qf * qf) ** 2).sum(axis=0) if opts.ssnr_weighting else None
        del qf
    weights = None
    if opts.ssnr_weighting:
        def weights(sh, F=F):  # evaluated by align_stack after its coarse stage
            return ssnr_weight(F, sh, ash, qsum, q2sum, opts.lowcut_cycles,
                               kmax=min(0.5, px_align / max(opts.align_max_res_a, 1e-3)),
                               q4sum=q4sum)
    gshift, gsig = align_stack(F, ash, px_align, opts.bfactor_a2, opts.max_shift_px / abin,
                               opts.n_iter, opts.tolerance_px, taper=prof,
                               lowcut_px=opts.lowcut_cycles, weights=weights,
                               return_sigma=True)
    if opts.smooth_trajectory and ng >= 12:  # too few points to tell noise from curvature
        gshift = smooth_trajectory(gshift, sigma=gsig)
        for _ in range(opts.refine_rounds):
            # the reference (sum of the others) is now built from the smoothed trajectory,
            # i.e. less blurred by the other frames' measurement noise: measure again
            W = weights(gshift) if weights is not None else None
            gshift, gsig = align_stack(F, ash, px_align, opts.bfactor_a2, 2.0, 1,
                                       opts.tolerance_px, taper=prof,
                                       lowcut_px=opts.lowcut_cycles, weights=W,
                                       return_sigma=True, init_shifts=gshift)
            gshift = smooth_trajectory(gshift, sigma=gsig)
    shifts_a = interpolate_group_shifts(be.to_numpy(gshift), g, n)  # align pixels, per frame
    shifts = shifts_a * abin
    del F
    note("global")

    # ---- patch alignment -------------------------------------------------------------------
    local = centres = pshifts = None
    py, pxn = max(1, int(opts.patch_y)), max(1, int(opts.patch_x))
    cellh, cellw = ash[0] // py, ash[1] // pxn
    # patches of an FFT-friendly size (2^a 3^b 5^c) centred in their cells: 2048 // 5 = 409
    # is prime, and its FFTs cost several times those of 400
    ph, pw = _fast_size_below(cellh), _fast_size_below(cellw)
    if py * pxn > 1 and n >= 3 and min(ph, pw) * abin >= opts.patch_min_size_px and min(ph, pw) >= 16:
        gp = int(opts.patch_group_frames) if opts.patch_group_frames else max(g, n // 10)
        gp = max(1, min(gp, n // 3))
        ngp = (n + gp - 1) // gp
        ky, kx = _freq_grids(ash, xp)
        oy, ox = (cellh - ph) // 2, (cellw - pw) // 2
        pt = xp.empty((py * pxn, ngp, ph, pw), dtype=np.float32)
        for j in range(ngp):  # group sums of the globally aligned binned frames, cut to patches
            Fb = be.rfft2(binned[j * gp:(j + 1) * gp] - binned[j * gp:(j + 1) * gp].mean(
                axis=(-2, -1), keepdims=True))
            ey, ex = _phase_ramps(xp.asarray(shifts_a[j * gp:(j + 1) * gp]), ky, kx, xp)
            Fb *= ey[:, :, None]
            Fb *= ex[:, None, :]
            al = be.irfft2(Fb.sum(axis=0), s=ash).astype(np.float32, copy=False)
            for a_ in range(py):
                for b_ in range(pxn):
                    y0, x0 = a_ * cellh + oy, b_ * cellw + ox
                    pt[a_ * pxn + b_, j] = al[y0:y0 + ph, x0:x0 + pw]
        del Fb, al
        pprof = taper_profiles((ph, pw), 0.1)
        pt = (pt - pt.mean(axis=(-2, -1), keepdims=True)) * xp.asarray(
            pprof[0][:, None] * pprof[1][None, :])
        Fp = be.rfft2(pt).astype(np.complex64, copy=False)
        del pt
        if opts.dose_per_frame_e_a2:
            Fp *= _group_dose_filter((ph, pw), px_align, opts, n, gp, xp)[None]
        # patch shifts are noisy (0.3-1 px): iterating to 0.01 px only costs time
        pres_g = align_stack(Fp, (ph, pw), px_align, opts.bfactor_a2,
                             max(4.0, 8.0 / abin), min(opts.n_iter, 5),
                             max(opts.tolerance_px, 0.05), taper=pprof)
        pres_g = be.to_numpy(pres_g) * abin
        tg = _group_centres(gp, n)
        pres = interpolate_group_shifts(pres_g / abin, gp, n) * abin
        cy = (np.arange(py) * cellh + oy + 0.5 * ph) * abin
        cx = (np.arange(pxn) * cellw + ox + 0.5 * pw) * abin
        centres = np.stack(np.meshgrid(cy, cx, indexing="ij"), axis=-1).reshape(-1, 2)
        local = fit_local_motion(centres, pres_g, shape, times=tg, n_frames=n)
        f_stat = local_model_significance(local, centres, pres_g, times=tg)
        log.info("local motion model: F = %.2f (threshold %.2f)", f_stat, opts.local_min_f)
        if f_stat < opts.local_min_f:
            # the patch shifts are mostly noise: a model fitted to them would only add it
            log.info("local motion model not significant; using whole-frame shifts only")
            local = None
        pshifts = shifts[None] + pres - pres[:, :1]
        del Fp
        note("patches")

    # ---- pass 2: full-size shifted sums with dose weighting ---------------------------------
    ky, kx = _freq_grids(shape, xp)
    k = xp.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2) / opts.pixel_size_a
    dw = bool(opts.do_dose_weighting and opts.dose_per_frame_e_a2)
    if dw:
        ne = critical_exposure(k, opts.voltage_kv)
        a = (1.0 / (2.0 * ne)).astype(np.float32)
        r = xp.exp(-a * float(opts.dose_per_frame_e_a2)).astype(np.float32)
    acc = xp.zeros((ny, nx // 2 + 1), dtype=np.complex64)
    acc_dw = xp.zeros_like(acc) if dw else None
    for i in range(n - 1, -1, -1):  # reverse order for the Horner-form dose weighting
        fr = xp.asarray(frames[i]).astype(np.float32)
        if gain_arr is not None:
            fr *= gain_arr
        if mask_idx.size:
            fr.ravel()[mask_idx] = fill
        if local is not None:
            if _residual_max(local, i, shape, offset_yx=shifts[i]) > 0.01:
                fr = warp_local(fr, local, i, offset_yx=shifts[i])
        Fi = be.rfft2(fr).astype(np.complex64, copy=False)
        ey, ex = _phase_ramps(xp.asarray(shifts[i]), ky, kx, xp)
        Fi *= ey[:, None]
        Fi *= ex[None, :]
        acc += Fi
        if dw:
            acc_dw *= r
            acc_dw += Fi
    note("sum")
    if dw:
        d0 = float(opts.pre_exposure_e_a2) + 0.5 * float(opts.dose_per_frame_e_a2)
        q0 = xp.exp(-a * d0)
        r2 = r * r
        with np.errstate(divide="ignore", invalid="ignore"):
            sumq2 = q0 * q0 * xp.where(r2 < 1 - 1e-7, (1 - r2 ** n) / (1 - r2), float(n))
        acc_dw *= (q0 * xp.sqrt(n / xp.maximum(sumq2, 1e-30))).astype(np.float32)
    out_shape = shape
    if opts.bin_factor and opts.bin_factor > 1.0:
        oy = int(round(ny / opts.bin_factor / 2.0)) * 2
        ox = int(round(nx / opts.bin_factor / 2.0)) * 2
        out_shape = (oy, ox)
        acc = _crop_rfft(acc, out_shape)
        acc_dw = _crop_rfft(acc_dw, out_shape) if dw else None
    scale = float(out_shape[0] * out_shape[1]) / float(ny * nx)
    plain = (be.irfft2(acc, s=out_shape) * scale).astype(np.float32, copy=False)
    weighted = (be.irfft2(acc_dw, s=out_shape) * scale).astype(np.float32, copy=False) \
        if dw else None
    out_px = opts.pixel_size_a * nx / out_shape[1]
    tot, early, late = accumulated_motion(shifts, opts.pixel_size_a, opts.dose_per_frame_e_a2,
                                          opts.pre_exposure_e_a2)
    dy, dx = (be.to_numpy(v) for v in xp.nonzero(mask))
    return MotionResult(plain, weighted, np.asarray(shifts), out_px, local, centres, pshifts,
                        np.stack([dy, dx], axis=-1), tot, early, late)


def _group_dose_filter(shape, pixel_size_a: float, opts: MotionOptions, n: int, g: int, xp):
    """Mean dose fading q(k) of each group of ``g`` frames on an rfft grid (ng, ny, nx//2+1)."""
    ky, kx = _freq_grids(shape, xp)
    k = xp.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2) / pixel_size_a
    # q_i = exp(-D_i / (2 Ne)) with D_i = pre + (i + 1/2) dose: q_0 * r^i, in float32
    a = (0.5 / critical_exposure(k, opts.voltage_kv)).astype(np.float32)
    dose = float(opts.dose_per_frame_e_a2)
    q = xp.exp(-a * np.float32(opts.pre_exposure_e_a2 + 0.5 * dose))
    r = xp.exp(-a * np.float32(dose))
    ng = (n + g - 1) // g
    out = xp.empty((ng, *k.shape), dtype=np.float32)
    for j in range(ng):
        m = min(n, (j + 1) * g) - j * g
        acc = q.copy()
        for _ in range(m - 1):
            q = q * r
            acc += q
        q = q * r
        out[j] = acc / np.float32(m)
    return out


def _smooth(img, cycles: float):
    """Gaussian low-pass keeping about ``cycles`` periods across the image."""
    xp = xp_of(img)
    ky, kx = _freq_grids(img.shape, xp)
    r2 = (ky[:, None] * img.shape[0]) ** 2 + (kx[None, :] * img.shape[1]) ** 2
    F = be.rfft2(img) * xp.exp(-r2 / (2.0 * cycles ** 2))
    return be.irfft2(F, s=img.shape).astype(np.float32, copy=False)


def _crop_rfft(F, out_shape: tuple[int, int]):
    """Fourier crop of an rfft2 array (ny, nx//2+1) to the rfft grid of ``out_shape``."""
    xp = xp_of(F)
    oy, ox = out_shape
    h = oy // 2
    rows = xp.concatenate([F[:h], F[F.shape[0] - h:]], axis=0)
    return xp.ascontiguousarray(rows[:, : ox // 2 + 1])


def power_spectrum_for_ctf(img, box: int = 512):
    """Tile-averaged power spectrum (centred, ``box`` x ``box``) for ``_PS.mrc`` and CTFFIND."""
    from compute.ctffind import tile_power_spectrum  # noqa: PLC0415

    return be.fftshift(tile_power_spectrum(img, box, full=True))
