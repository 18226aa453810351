"""Laplacian-of-Gaussian particle picking (RELION's LoG picker, re-implemented for speed).

Algorithm (see ``docs/picking.md``):

1. Fourier-crop the micrograph to a working pixel size whose Nyquist matches the low-pass
   resolution (``maxres_a``, RELION's ``log_maxres``), so a 4096² micrograph becomes ~400².
2. Mirror-pad the small image and filter it with scale-normalised LoG kernels
   ``-σ² ∇²G_σ`` (sign chosen so that *dark* particles score positive) for a geometric range
   of diameters between ``diameter_min_a`` and ``diameter_max_a`` (diameter = 3.6 σ), and for
   larger diameters up to ``max_search × diameter_max_a``. The in-range scales filter the
   image minus an edge-preserving background (a median over ``background_diameters`` × the
   maximum diameter), so a carbon edge's intensity step does not hide the particles
   touching it; the larger scales see the whole image.
3. Per pixel keep the best in-range score and its diameter. Pixels whose best score over
   *all* scales is at a diameter above the maximum belong to something too big to be a
   particle (ice blob, aggregate, carbon edge) and are excluded, and so is a disc of the
   blob's radius (measured on the image, at most its LoG scale) plus the minimum radius
   around the centre of every strong large blob.
4. Threshold at ``mean + adjust_threshold × std`` of the score map (RELION's semantics) and
   never below a noise floor (``noise_floor`` std-devs of the noise, estimated from the
   power just beyond ``maxres_a``), so an empty micrograph gives no picks. Peaks above
   ``mean + upper_threshold × std`` are dropped, and so are peaks that are not round
   (Hessian eigenvalue ratio below ``min_roundness``: edges) or that a larger diameter
   explains almost as well (``big_ratio``: aggregates).
5. Peaks below a floor measured on the score far from every candidate
   (``background_floor``), peaks that are part of a larger dark region
   (``mass_score_max``), that have another strong maximum closer than ``overlap`` × the
   diameter (overlapping objects, aggregate members) or with much more mass around them
   than a typical pick (``mass_ratio``: aggregates) are dropped, then greedy non-maximum suppression: a weaker peak closer than
   ``neighbour × (d_detected + d_min) / 2`` to a stronger one is dropped (a rejected
   aggregate peak no longer suppresses the particle next to it); picks within half their
   detected diameter of the micrograph edge are dropped.

The figure of merit is the score in standard deviations above the score map's mean.
Works on NumPy or CuPy arrays (FFTs through :mod:`compute.backend`); peak finding runs on
the host on the small working image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from compute import backend as be
from compute.backend import to_numpy, xp_of
from compute.ctf import CtfParams, ctf_from_grid
from compute.errors import ComputeError

#: diameter = DIAM_PER_SIGMA × σ. The scale-normalised LoG of a uniform disc of radius R peaks
#: at σ = R/√2 (D = 2√2 σ); a projected sphere (thicker in the middle) peaks at a smaller σ,
#: measured as D ≈ 3.6 σ, which is what particles look like.
DIAM_PER_SIGMA = 3.6

#: the in-range LoG kernels are high-passed at 1 / (this × the maximum diameter)
HIGHPASS_DIAMETERS = 2.0


@dataclass(frozen=True)
class LogPickerSettings:
    """Options of the LoG picker, named after RELION's ``relion.autopick`` job options.

    Attributes
    ----------
    diameter_min_a, diameter_max_a
        Smallest / largest particle diameter (Å): ``log_diam_min`` / ``log_diam_max``.
    maxres_a
        Low-pass resolution (Å) applied before picking (``log_maxres``, default 20).
    adjust_threshold
        Threshold in std-devs of the score map above its mean (``log_adjust_thr``);
        positive gives fewer picks.
    upper_threshold
        Picks scoring more than this many std-devs above the mean are dropped
        (``log_upper_thr``; 999 = no limit).
    invert
        Particles are white on a dark background (``log_invert``).
    neighbour
        Fraction of ``(d_detected + d_min)/2`` within which weaker neighbours are suppressed
        (RELION's ``--LoG_neighbour`` / 100).
    max_search
        Scales are searched up to this many times ``diameter_max_a`` to recognise larger
        blobs (RELION's ``--Log_max_search``, default 5).
    noise_floor
        Minimum score for any pick, in std-devs of the noise (estimated from the power
        just beyond ``maxres_a``, assumed white), so an empty micrograph gives no picks.
    scale_step
        Ratio between successive searched diameters.
    min_roundness
        Smallest ratio of the Hessian eigenvalues (λ2/λ1) at a pick: 1 for a round blob,
        ~0 along an edge (carbon edges, the rims of ice).
    big_blob_std
        A large blob must score this many std-devs above the score map mean before the area
        around it (its radius plus the minimum radius) is excluded.
    big_blob_z
        A response at a diameter above the maximum only counts when it stands this many
        robust std-devs (median/MAD over the micrograph) above that scale's typical
        response, so smooth ice-thickness or illumination changes are not taken for blobs.
    mass_ratio
        A pick whose response at the first diameter above the maximum (a measure of the
        mass around it) exceeds this multiple of the median over all picks is dropped:
        aggregates and clumps hold several particles' mass. Needs at least 8 picks. Applied
        before the final non-maximum suppression (the median is over a first suppression's
        picks), so a rejected aggregate peak does not suppress its neighbours.
    background_diameters
        The in-range LoG scales see the micrograph minus its median over a disc of this
        many maximum diameters (edge-preserving: a carbon edge is a step that the median
        keeps, particles cover too little of the disc to shift it); 0 switches it off.
    big_ratio
        A pick is dropped when some diameter above the maximum scores at least this
        fraction of its own score (it is part of something larger: an aggregate).
    mass_score_max
        A pick whose response at the first diameter above the maximum is at least this
        fraction of its score is dropped, however few picks there are: it is part of a
        larger dark region (an ice-thickness dip, an aggregate). A single particle's is
        ~0.3 × its score (at most ~0.75 on the benchmark micrographs). 0 = off.
    background_floor
        Picks must score this many robust std-devs (median/MAD) above the score over the
        pixels farther than 0.75 × ``diameter_max_a`` from every candidate peak. The noise
        floor assumes white noise; ice-thickness dips of a particle's size are not. 0 = off.
    overlap
        A pick with another local maximum of at least half its score closer than this
        fraction of the mean diameter ``(diameter_min_a + diameter_max_a)/2`` is dropped:
        overlapping particles and the members of an aggregate (touching particles' maxima
        stay about a diameter apart). 0 = off.
    """

    diameter_min_a: float
    diameter_max_a: float
    maxres_a: float = 20.0
    adjust_threshold: float = 0.0
    upper_threshold: float = 999.0
    invert: bool = False
    neighbour: float = 1.0
    max_search: float = 5.0
    noise_floor: float = 5.0
    scale_step: float = 1.12
    min_roundness: float = 0.25
    big_ratio: float = 0.92
    big_blob_std: float = 3.0
    mass_ratio: float = 2.2
    big_blob_z: float = 5.0
    background_diameters: float = 2.0
    mass_score_max: float = 0.9
    background_floor: float = 4.5
    overlap: float = 0.72


@dataclass
class Picks:
    """Picked positions in micrograph pixels (x = column, y = row), best first.

    ``fom`` is the score in std-devs above the score map mean (``rlnAutopickFigureOfMerit``);
    ``diameter_a`` the best-scoring LoG diameter.
    """

    x_px: np.ndarray = field(default_factory=lambda: np.zeros(0))
    y_px: np.ndarray = field(default_factory=lambda: np.zeros(0))
    fom: np.ndarray = field(default_factory=lambda: np.zeros(0))
    diameter_a: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return int(len(self.x_px))

    def select(self, keep: np.ndarray) -> Picks:
        return Picks(self.x_px[keep], self.y_px[keep], self.fom[keep], self.diameter_a[keep])


@dataclass
class LogMaps:
    """Intermediate maps on the working grid (for diagnostics and the GUI)."""

    score: np.ndarray          # best in-range LoG score per pixel
    diameter_a: np.ndarray     # diameter of that score
    excluded: np.ndarray       # bool: pixels belonging to blobs larger than the maximum
    pixel_size_yx_a: tuple[float, float]
    offset_px: float           # micrograph coordinate of working pixel 0 (binning shift)
    threshold: np.ndarray      # per-pixel threshold: max(RELION's, the noise floor)
    mean: float
    std: float
    noise_sd: np.ndarray       # estimated noise std of the score at each pixel's best scale
    big_score: np.ndarray | None = None       # best score over diameters above the maximum
    big_diameter_a: np.ndarray | None = None  # its diameter
    roundness: np.ndarray | None = None  # Hessian eigenvalue ratio λ2/λ1 (1 round, 0 edge)
    mass: np.ndarray | None = None       # response at the first diameter above the maximum


def _check(mic, pixel_size_a: float, s: LogPickerSettings) -> None:
    if mic.ndim != 2:
        raise ComputeError(f"LoG picking needs a 2D micrograph, got shape {tuple(mic.shape)}")
    if not (pixel_size_a and pixel_size_a > 0):
        raise ComputeError(f"pixel size must be positive, got {pixel_size_a}")
    if not (s.diameter_min_a > 0 and s.diameter_max_a > 0):
        raise ComputeError("LoG diameters must be positive "
                           f"(log_diam_min={s.diameter_min_a}, log_diam_max={s.diameter_max_a})")
    if s.diameter_max_a < s.diameter_min_a:
        raise ComputeError(f"log_diam_max ({s.diameter_max_a} Å) is smaller than log_diam_min "
                           f"({s.diameter_min_a} Å)")
    extent = min(mic.shape) * pixel_size_a
    if s.diameter_max_a >= extent:
        raise ComputeError(f"particle diameter {s.diameter_max_a:g} Å is larger than the "
                           f"micrograph ({mic.shape[1]}×{mic.shape[0]} px = {extent:.0f} Å "
                           "on its short side)")
    if s.maxres_a is not None and s.maxres_a <= 0:
        raise ComputeError(f"log_maxres must be positive, got {s.maxres_a}")


def working_pixel_size(pixel_size_a: float, s: LogPickerSettings) -> float:
    """Pixel size (Å) of the down-sampled image the LoG runs on: Nyquist at ``maxres_a``,
    but fine enough that the smallest diameter spans at least 10 pixels."""
    target = max(s.maxres_a / 2.0, pixel_size_a)
    return max(pixel_size_a, min(target, s.diameter_min_a / 10.0))


def _even(n: float) -> int:
    return max(2, 2 * int(round(n / 2.0)))


def downsample(mic, pixel_size_a: float, new_pixel_a: float,
               noise_band_a: tuple[float, float] | None = None, binned_by: int = 1):
    """Fourier-crop a micrograph (any shape) to about ``new_pixel_a``.

    Returns the image (mean removed), the exact (y, x) pixel sizes of the result and the
    noise variance per *working* pixel estimated from the mean power in the resolution band
    ``noise_band_a`` = (low, high) Å, assuming white noise (``None`` when no band is given).
    ``binned_by``: the image was binned by this factor, whose box-filter response is divided
    out of the noise estimate.
    """
    xp = xp_of(mic)
    ny, nx = mic.shape
    my = min(ny, _even(ny * pixel_size_a / new_pixel_a))
    mx = min(nx, _even(nx * pixel_size_a / new_pixel_a))
    a = mic.astype(np.float32, copy=False)
    F = be.rfft2(a)
    noise_var = None
    if noise_band_a is not None:
        noise_var = (_band_noise_variance(F, (ny, nx), pixel_size_a, noise_band_a, binned_by)
                     * (my * mx) / (ny * nx))
    hy = my // 2
    G = xp.empty((my, mx // 2 + 1), dtype=F.dtype)
    G[:hy] = F[:hy, : mx // 2 + 1]
    G[hy:] = F[ny - hy:, : mx // 2 + 1]
    G[0, 0] = 0.0
    small = be.irfft2(G, s=(my, mx)) * (float(my * mx) / float(ny * nx))
    return small.astype(np.float32, copy=False), (ny * pixel_size_a / my, nx * pixel_size_a / mx), noise_var


def _box_response(f: np.ndarray, b: int) -> np.ndarray:
    """Response of a b-pixel box average at ``f`` cycles per binned pixel."""
    if b <= 1:
        return np.ones_like(f)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sin(np.pi * f) / (b * np.sin(np.pi * f / b))
    return np.where(np.abs(f) < 1e-12, 1.0, r)


def _band_noise_variance(F, shape: tuple[int, int], pixel_size_a: float,
                         band_a: tuple[float, float], binned_by: int = 1) -> float:
    """Per-pixel variance of white noise with the mean power of ``F`` in a resolution band."""
    xp = xp_of(F)
    ny, nx = shape
    k_lo = 1.0 / band_a[0]
    k_hi = min(1.0 / band_a[1], 0.95 / (2.0 * pixel_size_a))
    if k_hi <= k_lo:
        k_lo = 0.6 / (2.0 * pixel_size_a)
        k_hi = 0.95 / (2.0 * pixel_size_a)
    # only the rows/columns that can fall in the band (keeps this cheap on 4k images)
    ry = int(math.ceil(k_hi * ny * pixel_size_a)) + 1
    rx = int(math.ceil(k_hi * nx * pixel_size_a)) + 1
    rows = np.r_[0:min(ry, ny // 2), max(ny - ry, ny // 2):ny]
    sub = F[xp.asarray(rows)][:, :min(rx, F.shape[1])]
    cy = np.fft.fftfreq(ny)[rows]
    cx = np.fft.rfftfreq(nx)[: sub.shape[1]]
    fy = (cy / pixel_size_a)[:, None]
    fx = (cx / pixel_size_a)[None, :]
    k = np.sqrt(fy * fy + fx * fx)
    gain = (_box_response(cy, binned_by)[:, None] * _box_response(cx, binned_by)[None, :]) ** 2
    m = (k >= k_lo) & (k <= k_hi)
    sel = xp.asarray(m)
    p = xp.abs(sub[sel]) ** 2 / xp.asarray(np.maximum(gain[m], 1e-3).astype(np.float32))
    if p.size == 0:
        return 0.0
    return float(to_numpy(p.mean())) / float(ny * nx)


def search_diameters(s: LogPickerSettings) -> tuple[np.ndarray, np.ndarray]:
    """(in-range diameters, larger diameters) searched, in Å."""
    n_in = max(2, int(math.ceil(math.log(s.diameter_max_a / s.diameter_min_a)
                                / math.log(s.scale_step))) + 1)
    if s.diameter_max_a == s.diameter_min_a:
        d_in = np.array([s.diameter_min_a])
    else:
        d_in = np.geomspace(s.diameter_min_a, s.diameter_max_a, n_in)
    top = max(s.max_search, 1.3) * s.diameter_max_a
    d_out = []
    d = s.diameter_max_a * 1.3
    while d <= top * 1.0001:
        d_out.append(d)
        d *= 1.3
    return d_in, np.array(d_out)


def log_maps(mic, pixel_size_a: float, settings: LogPickerSettings,
             ctf: CtfParams | None = None) -> LogMaps:
    """Best-scale LoG score map, its diameters and the large-blob exclusion mask.

    With ``ctf`` the micrograph is first filtered by its CTF (a matched filter: phases
    flipped, frequencies the CTF suppresses weighted down), which is what makes small
    particles at low defocus detectable (RELION's ``--LoG_use_ctf`` idea).
    """
    s = settings
    _check(mic, pixel_size_a, s)
    xp = xp_of(mic)
    band = (s.maxres_a, 0.6 * s.maxres_a)
    work_a = working_pixel_size(pixel_size_a, s)
    # bin in real space first while the binned Nyquist stays well beyond the noise band and
    # the working Nyquist (a 4096² FFT is most of the cost otherwise)
    b = max(1, int(min(work_a, 0.6 * s.maxres_a / 2.0) / (1.25 * pixel_size_a)))
    offset = (b - 1) / 2.0
    if b > 1:
        ny0, nx0 = (mic.shape[0] // b) * b, (mic.shape[1] // b) * b
        mic = mic[:ny0, :nx0].astype(np.float32, copy=False).reshape(
            ny0 // b, b, nx0 // b, b).mean(axis=(1, 3))
    small, (py, px), noise_var = downsample(mic, pixel_size_a * b, work_a, noise_band_a=band,
                                            binned_by=b)
    my, mx = small.shape
    d_in, d_out = search_diameters(s)
    d_all = np.concatenate([d_in, d_out])

    # mirror-pad so the periodic FFT sees no edge step (which large kernels would pick up)
    pad = int(math.ceil(1.6 * d_all.max() / DIAM_PER_SIGMA / min(py, px)))
    pad = min(pad, my - 1, mx - 1)
    fy, fx = my + 2 * pad, mx + 2 * pad
    fy2, fx2 = be.next_fast_len(fy), be.next_fast_len(fx)

    def pad_fft(a):
        p = xp.pad(a, pad, mode="reflect")
        return be.rfft2(xp.pad(p, ((0, fy2 - fy), (0, fx2 - fx)), mode="reflect"))

    F = pad_fft(small)
    ky = be.fftfreq(fy2, py, xp=xp)[:, None].astype(np.float32)
    kx = be.rfftfreq(fx2, px, xp=xp)[None, :].astype(np.float32)
    k2 = ky * ky + kx * kx
    # soft low-pass at maxres (the crop already cuts at Nyquist; this removes the corners)
    kc = 1.0 / max(s.maxres_a, 2.0 * max(py, px))
    lp = xp.exp(-(k2 / (kc * kc)) ** 4).astype(np.float32)
    F = F * lp
    # the in-range scales see the micrograph minus an edge-preserving background (a median
    # over ~2 particle diameters): a carbon edge is an intensity step, which the LoG turns
    # into a band of negative score along the hole side that hides the particles touching
    # it. The larger scales keep the full image (they must see carbon, ice and aggregates).
    F_in = F
    if s.background_diameters > 0:
        bg = xp.asarray(_edge_background(to_numpy(small), min(py, px), s))
        F_in = F - pad_fft(bg) * lp
    if ctf is not None:
        c = ctf_from_grid(kx + 0 * ky, ky + 0 * kx, ctf.with_(bfactor_a2=0.0)).astype(np.float32)
        F = F * c
        F_in = F_in * c
        lp = lp * c
    sign = -1.0 if s.invert else 1.0
    hp = (1.0 - xp.exp(-k2 * (HIGHPASS_DIAMETERS * s.diameter_max_a) ** 2)).astype(np.float32)

    n_in = len(d_in)
    first_out = None
    # weights turning the half-plane (rfft) sum into a full-plane mean (Parseval)
    wcol = xp.full((1, kx.shape[1]), 2.0, dtype=np.float32)
    wcol[0, 0] = 1.0
    if fx2 % 2 == 0:
        wcol[0, -1] = 1.0
    noise_sd = np.zeros(len(d_all))
    best_in = None
    best_idx = None
    best_out = None
    out_idx = None
    four_pi2 = 4.0 * math.pi * math.pi
    for i, d in enumerate(d_all):
        sig = d / DIAM_PER_SIGMA
        # -σ²∇²G in Fourier: σ² 4π²k² exp(-2π²σ²k²); dark blobs (negative) -> negative
        # response, so flip to make dark particles score positive.
        kern = (-sign * sig * sig * four_pi2) * k2 * xp.exp(-2.0 * math.pi ** 2 * sig * sig * k2)
        if i < n_in:
            # in-range scales ignore variations much larger than a particle (ice thickness,
            # illumination): the LoG's own k² fall-off lets too much of them through
            kern = kern * hp
        h = kern.astype(np.float32) * lp
        noise_sd[i] = math.sqrt(max(noise_var or 0.0, 0.0)
                                * float(to_numpy((wcol * h * h).sum())) / (fy2 * fx2))
        FF = F_in if i < n_in else F
        r = be.irfft2(FF * kern.astype(np.float32), s=(fy2, fx2))[pad:pad + my, pad:pad + mx]
        if i < n_in:
            # Hessian of the smoothed image at this scale (for the blob-vs-edge test)
            g = (-sign * four_pi2 * sig * sig) * xp.exp(-2.0 * math.pi ** 2 * sig * sig * k2) * hp
            hs = [be.irfft2(FF * (g * a * b).astype(np.float32), s=(fy2, fx2))[pad:pad + my, pad:pad + mx]
                  for a, b in ((ky, ky), (kx, kx), (ky, kx))]
            if best_in is None:
                best_in = r.copy()
                best_idx = xp.zeros(r.shape, dtype=np.int16)
                hess = [h_.copy() for h_ in hs]
            else:
                upd = r > best_in
                best_in = xp.where(upd, r, best_in)
                best_idx = xp.where(upd, np.int16(i), best_idx)
                hess = [xp.where(upd, h_, h0) for h_, h0 in zip(hs, hess)]
        else:
            if i == n_in:
                first_out = r.copy()
            # only responses that stand out from this scale's own background variation count
            # as blobs: smooth ice-thickness and illumination changes respond strongly at
            # large scales everywhere, a contamination blob is an outlier
            med = xp.median(r)
            mad = 1.4826 * xp.median(xp.abs(r - med))
            r = xp.where(r - med > s.big_blob_z * mad, r, -np.inf)
            if best_out is None:
                best_out = r.copy()
                out_idx = xp.full(r.shape, n_in, dtype=np.int16)
            else:
                upd = r > best_out
                best_out = xp.where(upd, r, best_out)
                out_idx = xp.where(upd, np.int16(i), out_idx)

    score = to_numpy(best_in).astype(np.float32)
    idx = to_numpy(best_idx)
    hyy, hxx, hxy = (to_numpy(h_).astype(np.float32) for h_ in hess)
    # eigenvalues of the Hessian: a round blob has two similar ones, an edge one near zero
    tr = hxx + hyy
    disc = np.sqrt(np.maximum((hxx - hyy) ** 2 + 4.0 * hxy * hxy, 0.0))
    l1 = 0.5 * (tr + disc)
    l2 = 0.5 * (tr - disc)
    with np.errstate(divide="ignore", invalid="ignore"):
        roundness = np.where(l1 > 0, l2 / l1, 0.0).astype(np.float32)
    diam = d_in[idx].astype(np.float32)

    # noise floor per pixel: noise_floor × the noise std of the pixel's best scale
    noise_thr = (s.noise_floor * noise_sd[idx]).astype(np.float32)

    valid = np.ones(score.shape, dtype=bool)
    bo = oi = None
    excluded = np.zeros(score.shape, dtype=bool)
    if best_out is not None:
        bo = to_numpy(best_out).astype(np.float32)
        oi = to_numpy(out_idx)
        # RELION's rule: a pixel whose best diameter is above the maximum is no particle
        valid = ~((bo > score) & (bo > s.noise_floor * noise_sd[oi]))
    vals = score[valid] if valid.any() else score.ravel()
    mean = float(vals.mean())
    std = float(vals.std())
    if bo is not None:
        # ...and the rim of such a blob is no particle either: around every centre of a
        # strong large blob (a local maximum of the large-scale score that beats the in-range
        # score) exclude a disc of the blob's radius plus the minimum particle radius.
        w = max(3, int(round(s.diameter_max_a / min(py, px))) | 1)
        t_big = max(mean + s.big_blob_std * std, 0.0)
        centres = ((bo == ndimage.maximum_filter(bo, size=w, mode="nearest")) & (bo > score)
                   & (bo > t_big) & (bo > s.noise_floor * noise_sd[oi]))
        excluded = ~valid
        if centres.any():
            # the blob's radius measured on the image (the LoG scale, in ×1.3 steps, makes
            # a small dark ice blob as large as the first diameter above the maximum)
            cy, cx = np.nonzero(centres)
            r_scale = d_all[oi[cy, cx]] / 2.0 / min(py, px)
            r_blob = _blob_radii(to_numpy(small), cy, cx, r_scale, sign)
            excluded |= _paint_discs(score.shape, cy, cx,
                                     r_blob + s.diameter_min_a / 2.0 / min(py, px))
    thr = np.maximum(np.float32(mean + s.adjust_threshold * std), noise_thr)
    return LogMaps(score=score, diameter_a=diam, excluded=excluded, pixel_size_yx_a=(py, px),
                   offset_px=offset,
                   threshold=thr, mean=mean, std=std, noise_sd=noise_sd[idx].astype(np.float32),
                   big_score=bo, big_diameter_a=None if oi is None else d_all[oi].astype(np.float32),
                   roundness=roundness,
                   mass=None if first_out is None else to_numpy(first_out).astype(np.float32))


def _edge_background(small: np.ndarray, pix: float, s: LogPickerSettings) -> np.ndarray:
    """Edge-preserving background of the working image: the median over a disc of
    ``background_diameters`` × the maximum diameter (particles cover well under half of it),
    computed on a grid of ~minimum diameter / 4 and interpolated back (bilinear)."""
    f = max(1, int(round(s.diameter_min_a / 4.0 / pix)))
    ny, nx = small.shape
    cy, cx = max(1, ny // f), max(1, nx // f)
    coarse = small[:cy * f, :cx * f].reshape(cy, f, cx, f).mean(axis=(1, 3))
    r = max(1.0, 0.5 * s.background_diameters * s.diameter_max_a / (f * pix))
    rr = int(math.ceil(r))
    yy, xx = np.mgrid[-rr:rr + 1, -rr:rr + 1]
    bg = ndimage.median_filter(coarse, footprint=(yy * yy + xx * xx) <= r * r, mode="reflect")
    gy = (np.arange(ny) + 0.5) / f - 0.5
    gx = (np.arange(nx) + 0.5) / f - 0.5
    g = np.meshgrid(gy, gx, indexing="ij")
    return ndimage.map_coordinates(bg, g, order=1, mode="nearest").astype(np.float32)


def _blob_radii(img: np.ndarray, cy: np.ndarray, cx: np.ndarray, r_scale: np.ndarray,
                sign: float) -> np.ndarray:
    """Radius (working pixels) of each dark blob centred at (cy, cx): where the ring-averaged
    image comes back half-way from the blob's centre value to the level just outside the
    scale radius ``r_scale`` (the LoG scale overestimates the size of small dark blobs, as
    the steps between searched diameters are coarse). Never more than ``r_scale``."""
    ny, nx = img.shape
    out = np.asarray(r_scale, dtype=np.float64).copy()
    for k, (y, x, rs) in enumerate(zip(cy, cx, r_scale)):
        R = int(math.ceil(1.5 * rs)) + 1
        y0, y1, x0, x1 = max(0, y - R), min(ny, y + R + 1), max(0, x - R), min(nx, x + R + 1)
        sub = sign * img[y0:y1, x0:x1]
        yy, xx = np.mgrid[y0 - y:y1 - y, x0 - x:x1 - x]
        rr = np.hypot(yy, xx)
        ring = (rr >= rs) & (rr <= 1.5 * rs)
        core = rr <= max(1.0, 0.25 * rs)
        if not ring.any() or not core.any():
            continue
        bg = float(np.median(sub[ring]))
        v0 = float(sub[core].mean())
        if not bg > v0:
            continue
        ri = np.round(rr).astype(int)
        n = np.bincount(ri.ravel(), minlength=R + 1)
        tot = np.bincount(ri.ravel(), weights=sub.ravel(), minlength=R + 1)
        prof = tot / np.maximum(n, 1)
        half = v0 + 0.5 * (bg - v0)
        above = np.nonzero((prof >= half) & (n > 0) & (np.arange(len(prof)) > 0))[0]
        if len(above):
            out[k] = min(rs, float(above[0]))
    return out


def _paint_discs(shape: tuple[int, int], cy: np.ndarray, cx: np.ndarray,
                 r: np.ndarray) -> np.ndarray:
    """Boolean mask of discs of radius ``r`` (pixels) centred at (cy, cx)."""
    ny, nx = shape
    out = np.zeros(shape, dtype=bool)
    for y, x, rad in zip(cy, cx, r):
        R = int(math.ceil(rad))
        y0, y1, x0, x1 = max(0, y - R), min(ny, y + R + 1), max(0, x - R), min(nx, x + R + 1)
        yy, xx = np.mgrid[y0 - y:y1 - y, x0 - x:x1 - x]
        out[y0:y1, x0:x1] |= (yy * yy + xx * xx) <= rad * rad
    return out


def pick_log(mic, pixel_size_a: float, settings: LogPickerSettings,
             ctf: CtfParams | None = None) -> Picks:
    """Pick particles in one micrograph with the LoG picker.

    Parameters
    ----------
    mic
        2D micrograph (NumPy or CuPy), particles dark unless ``settings.invert``.
    pixel_size_a
        Micrograph pixel size in Å.
    settings
        :class:`LogPickerSettings`.
    ctf
        The micrograph's CTF, when known: the micrograph is CTF-filtered before the LoG.

    Returns
    -------
    Picks
        Coordinates in micrograph pixels (``x`` = column, ``y`` = row), strongest first.
        A micrograph without particles gives an empty :class:`Picks`.

    Raises
    ------
    ComputeError
        Bad settings, or a diameter larger than the micrograph.
    """
    s = settings
    maps = log_maps(mic, pixel_size_a, s, ctf=ctf)
    score = maps.score
    if not np.isfinite(score).all():
        raise ComputeError("micrograph contains NaN or infinite values")
    if maps.std <= 0 or not np.isfinite(maps.std):
        return Picks()
    py, px = maps.pixel_size_yx_a
    ps = min(py, px)
    # local maxima over a neighbourhood ~ half the minimum radius (cheap first cut)
    w = max(3, int(round(s.diameter_min_a / 4.0 / ps)) | 1)
    peak = (score == ndimage.maximum_filter(score, size=w, mode="nearest"))
    cand = peak & (score >= maps.threshold) & ~maps.excluded
    if maps.roundness is not None:
        cand &= maps.roundness >= s.min_roundness
    if maps.big_score is not None:
        cand &= maps.big_score < s.big_ratio * score
    upper = maps.mean + s.upper_threshold * maps.std
    cand &= score <= upper
    if s.background_floor > 0 and cand.any():
        # background floor: the noise floor assumes white noise, but ice-thickness dips of
        # a particle's size (small fields, large particles) are not. Measure the score's
        # spread over the pixels far from every candidate (robust: median/MAD) and require
        # picks to stand background_floor of those std-devs above it.
        far = ndimage.distance_transform_edt(~(peak & (score >= maps.threshold)))
        bg = (far > 0.75 * s.diameter_max_a / ps) & ~maps.excluded
        if bg.sum() >= max(64, 0.02 * score.size):
            v = score[bg]
            med = float(np.median(v))
            sd = 1.4826 * float(np.median(np.abs(v - med)))
            cand &= score >= med + s.background_floor * sd
    yy, xx = np.nonzero(cand)
    if len(yy) == 0:
        return Picks()
    sc = score[yy, xx]
    order = np.argsort(-sc, kind="stable")
    yy, xx, sc = yy[order], xx[order], sc[order]
    dd = maps.diameter_a[yy, xx]

    if maps.mass is not None and s.mass_score_max > 0:
        # part of a larger dark region (an ice-thickness dip, an aggregate): the response
        # just above the maximum diameter nearly matches the particle-range score. A single
        # particle's is ~0.3 x its score (≤ 0.75 on the benchmark micrographs).
        ok = maps.mass[yy, xx] < s.mass_score_max * sc
        yy, xx, sc, dd = yy[ok], xx[ok], sc[ok], dd[ok]
        if len(yy) == 0:
            return Picks()
    if s.overlap > 0:
        # overlapping objects: another local maximum of at least half the pick's score
        # closer than overlap x the mean diameter (particles overlapping each other, the
        # members of an aggregate; touching particles' maxima stay ~a diameter apart)
        ok = _no_close_peak(score, peak & (score >= maps.threshold), yy, xx, sc, (py, px),
                            s.overlap * 0.5 * (s.diameter_min_a + s.diameter_max_a))
        yy, xx, sc, dd = yy[ok], xx[ok], sc[ok], dd[ok]
        if len(yy) == 0:
            return Picks()
    pts = np.stack([yy * py, xx * px], axis=1)
    keep = _nms(pts, dd, s)
    if maps.mass is not None and keep.sum() >= 8:
        # aggregates hold several particles' mass: drop candidates whose mass is well above
        # that of a typical pick *before* the final suppression, so that a rejected aggregate
        # peak does not suppress a real particle next to it
        mass = maps.mass[yy, xx]
        # (a typical particle's mass is ~0.3 x its score; picks on the dark side of carbon
        # or ice have negative mass and must not drag the reference to ~0)
        ref = max(float(np.median(mass[keep])), 0.25 * float(np.median(sc[keep])))
        if ref > 0:
            ok = mass <= s.mass_ratio * ref
            yy, xx, sc, dd, pts = yy[ok], xx[ok], sc[ok], dd[ok], pts[ok]
            keep = _nms(pts, dd, s)
    yy, xx, sc, dd = yy[keep], xx[keep], sc[keep], dd[keep]

    # sub-pixel refinement by a parabola through the 3-point neighbourhood
    fy = _parabolic(score, yy, xx, axis=0)
    fx = _parabolic(score, yy, xx, axis=1)
    ny, nx = mic.shape
    # working-grid pixel i covers original pixels around i * (p_work / p_mic)
    y_mic = (yy + fy) * (py / pixel_size_a) + maps.offset_px
    x_mic = (xx + fx) * (px / pixel_size_a) + maps.offset_px
    r_px = dd / 2.0 / pixel_size_a
    inside = ((x_mic >= r_px) & (x_mic <= nx - 1 - r_px)
              & (y_mic >= r_px) & (y_mic <= ny - 1 - r_px))
    fom = (sc - maps.mean) / maps.std
    return Picks(x_mic[inside].astype(np.float64), y_mic[inside].astype(np.float64),
                 fom[inside].astype(np.float64), dd[inside].astype(np.float64))


def _no_close_peak(score: np.ndarray, peaks: np.ndarray, yy: np.ndarray, xx: np.ndarray,
                   sc: np.ndarray, pix_yx: tuple[float, float], r_a: float) -> np.ndarray:
    """True for candidates with no other local maximum (``peaks``) of at least half their
    score within ``r_a`` Å."""
    py_, px_ = np.nonzero(peaks)
    ok = np.ones(len(yy), dtype=bool)
    if len(py_) < 2:
        return ok
    pv = score[py_, px_]
    tree = cKDTree(np.stack([py_ * pix_yx[0], px_ * pix_yx[1]], axis=1))
    near = tree.query_ball_point(np.stack([yy * pix_yx[0], xx * pix_yx[1]], axis=1), r=r_a)
    for k, js in enumerate(near):
        for j in js:
            if (py_[j] != yy[k] or px_[j] != xx[k]) and pv[j] >= 0.5 * sc[k]:
                ok[k] = False
                break
    return ok


def _nms(pts: np.ndarray, dd: np.ndarray, s: LogPickerSettings) -> np.ndarray:
    """Greedy non-maximum suppression of candidates sorted strongest first: a weaker one
    closer than ``neighbour`` × (d_detected + d_min)/2 (Å) to a kept one is dropped."""
    keep = np.zeros(len(pts), dtype=bool)
    if len(pts) == 0:
        return keep
    tree = cKDTree(pts)
    rmax = s.neighbour * (float(dd.max()) + s.diameter_min_a) / 2.0
    pairs = tree.query_ball_point(pts, r=rmax)
    alive = np.ones(len(pts), dtype=bool)
    for i in range(len(pts)):
        if not alive[i]:
            continue
        keep[i] = True
        lim = s.neighbour * (dd[i] + s.diameter_min_a) / 2.0
        for j in pairs[i]:
            if j > i and alive[j]:
                dy = pts[j, 0] - pts[i, 0]
                dx = pts[j, 1] - pts[i, 1]
                if dy * dy + dx * dx < lim * lim:
                    alive[j] = False
    return keep


def _parabolic(img: np.ndarray, yy: np.ndarray, xx: np.ndarray, axis: int) -> np.ndarray:
    n = img.shape[axis]
    if axis == 0:
        lo = img[np.clip(yy - 1, 0, n - 1), xx]
        hi = img[np.clip(yy + 1, 0, n - 1), xx]
    else:
        lo = img[yy, np.clip(xx - 1, 0, n - 1)]
        hi = img[yy, np.clip(xx + 1, 0, n - 1)]
    c = img[yy, xx]
    den = lo - 2.0 * c + hi
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(den < 0, 0.5 * (lo - hi) / den, 0.0)
    return np.clip(off, -0.5, 0.5)


def match_picks(pick_xy: np.ndarray, true_xy: np.ndarray, max_dist_px: float
                ) -> tuple[int, int, int]:
    """One-to-one matching of picks to true centres within ``max_dist_px``.

    Returns (true positives, number of picks, number of true centres); precision = tp/picks,
    recall = tp/true.
    """
    pick_xy = np.asarray(pick_xy, dtype=np.float64).reshape(-1, 2)
    true_xy = np.asarray(true_xy, dtype=np.float64).reshape(-1, 2)
    if len(pick_xy) == 0 or len(true_xy) == 0:
        return 0, len(pick_xy), len(true_xy)
    tree = cKDTree(true_xy)
    d, j = tree.query(pick_xy, k=1, distance_upper_bound=max_dist_px)
    used = set()
    tp = 0
    for i in np.argsort(d):
        if np.isfinite(d[i]) and j[i] not in used:
            used.add(int(j[i]))
            tp += 1
    return tp, len(pick_xy), len(true_xy)
