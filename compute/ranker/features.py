"""Class-ranker inputs: the 64x64 network image and the feature vector of each 2D class.

Arrays in, arrays out (no files). Everything runs on NumPy: a job has at most a few
hundred classes and the features need scipy.ndimage morphology.

Geometry
--------
Two windows are cut from each class average (box ``n`` px, pixel size ``p`` Å, particle
diameter ``d`` Å, ``d_px = d / p``):

- the **network image**: a centred window of ``min(n, d_px)`` pixels (the particle
  diameter, as in RELION 4), Fourier-rescaled to 64x64 and standardised (zero mean,
  unit standard deviation);
- the **feature image**: a centred window of ``min(n, 1.3 d_px)`` pixels Fourier-rescaled
  to 64x64, so the particle circle has radius ``r ≈ 24.6`` px and an outer ring
  ``r … 1.25 r`` remains inside the window. Intensities keep the class average's own
  units (particle-normalised, so comparable across jobs).

Two optional steps, recorded in the checkpoint (``PREPROCESS_KEY``) because a network is
trained with or without them: :func:`recentre_images` moves the network image's density
centre to the image centre (sub-pixel Fourier shift, clamped to ``RECENTRE_MAX_SHIFT_PX``),
and :func:`relative_intensity` divides the ``INTENSITY_FEATURES`` by the job's median
``lp_std`` (so the units a classification program writes do not matter).

Masks on the feature image: the *circle* (radius ``r``); the *protein* region, the pixels
of the 25 Å low-passed image inside the circle above an Otsu threshold; the *solvent*,
the rest of the circle; the *ring*, ``r < radius ≤ 1.25 r``.

Features (order of :data:`FEATURE_NAMES`)
-----------------------------------------
``acc_rot_deg``, ``acc_trans_a`` (classification accuracies), ``resolution_a`` (the
class's estimated resolution), ``weighted_resolution`` ((1/res²)/ln N, Å⁻²),
``relative_resolution`` (res / best resolution of the job), ``ring_mean``, ``ring_std``,
``protein_std``, ``solvent_mean``, ``solvent_std``, ``scattered_fraction`` (protein area
outside the largest connected blob / protein area), ``edge_signal`` (fraction of the
circle's edge band covered by protein), ``lp_mean/std/min/max`` (25 Å low-pass inside the
circle), ``granulo_r1`` … ``granulo_r6`` (protein area left after a binary opening with a
disc of radius 1…6 px, as a fraction of the protein area), and the three job-relative
features ``protein_sum``, ``solvent_sum``, ``relative_signal``
(protein_sum / (|protein_sum| + |solvent_sum|)), z-scored among the job's scored classes.

Missing metadata (no accuracy columns, no resolution) is ``nan`` in the raw vector;
:func:`normalise_features` replaces it by the training-set mean (a z-score of 0), which is
the documented fallback. The metadata features are z-scored on a log scale (they span
decades: 0.1–180°, 3–999 Å).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from compute.fourier import fourier_crop, fourier_pad, lowpass, radius_grid

IMAGE_SIZE = 64
FEATURE_WINDOW = 1.3
LOWPASS_A = 25.0
MIN_PARTICLES = 10  # classes with <= this many particles are not scored (RELION)

META_FEATURES = ("acc_rot_deg", "acc_trans_a", "resolution_a", "weighted_resolution",
                 "relative_resolution")
IMAGE_FEATURES = ("ring_mean", "ring_std", "protein_std", "solvent_mean", "solvent_std",
                  "scattered_fraction", "edge_signal", "lp_mean", "lp_std", "lp_min", "lp_max",
                  *(f"granulo_r{r}" for r in range(1, 7)))
JOB_FEATURES = ("protein_sum", "solvent_sum", "relative_signal")
FEATURE_NAMES: tuple[str, ...] = META_FEATURES + IMAGE_FEATURES + JOB_FEATURES
N_FEATURES = len(FEATURE_NAMES)
JOB_SLICE = slice(N_FEATURES - len(JOB_FEATURES), N_FEATURES)
#: resolutions are clipped to this range before use (junk classes report 999 Å)
RESOLUTION_RANGE_A = (1.0, 100.0)
Z_CLIP = 6.0
#: heavy-tailed features z-scored on a log scale
LOG_FEATURES = ("acc_rot_deg", "acc_trans_a", "resolution_a", "weighted_resolution",
                "relative_resolution")
_LOG_IDX = np.array([FEATURE_NAMES.index(n) for n in LOG_FEATURES])
#: image features proportional to the class average's intensity scale (means and standard
#: deviations of pixel values); the rest are invariant to it
INTENSITY_FEATURES = ("ring_mean", "ring_std", "protein_std", "solvent_mean", "solvent_std",
                      "lp_mean", "lp_std", "lp_min", "lp_max")
_INTENSITY_IDX = np.array([FEATURE_NAMES.index(n) for n in INTENSITY_FEATURES])
#: the job's intensity scale for ``relative_intensity``: median of this feature over its
#: scored classes
INTENSITY_REFERENCE = "lp_std"


def _log_columns(X: np.ndarray) -> np.ndarray:
    Y = np.array(X, dtype=np.float64, copy=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        Y[:, _LOG_IDX] = np.log(np.maximum(Y[:, _LOG_IDX], 1e-6))
    return Y


@dataclass(frozen=True)
class ClassMeta:
    """Classification metadata of one class; ``None`` where the model.star lacks it."""

    n_particles: float
    acc_rot_deg: float | None = None
    acc_trans_a: float | None = None
    resolution_a: float | None = None


def window_rescale(img: np.ndarray, window_px: float, out_size: int = IMAGE_SIZE) -> np.ndarray:
    """Centre window of ``window_px`` (clamped to the box, made even) Fourier-rescaled to ``out_size``."""
    n = img.shape[-1]
    w = int(min(n, max(8, 2 * round(window_px / 2))))
    c = n // 2
    lo = c - w // 2
    win = img[..., lo:lo + w, lo:lo + w]
    if w > out_size:
        return fourier_crop(win.astype(np.float32), out_size)
    if w < out_size:
        return fourier_pad(win.astype(np.float32), out_size)
    return win.astype(np.float32, copy=True)


def _standardise(x: np.ndarray) -> np.ndarray:
    mu = x.mean(axis=(-2, -1), keepdims=True)
    sd = x.std(axis=(-2, -1), keepdims=True)
    return ((x - mu) / np.maximum(sd, 1e-6)).astype(np.float32)


def network_images(images: np.ndarray, pixel_size_a: float, diameter_a: float,
                   recentre: bool = False) -> np.ndarray:
    """The (K, 64, 64) standardised network inputs of a stack of class averages (K, n, n).

    With ``recentre`` the standardised images go through :func:`recentre_images` (the
    checkpoint says whether its network was trained so, see ``PREPROCESS_KEY``).
    """
    imgs = np.asarray(images, dtype=np.float32)
    out = _standardise(window_rescale(imgs, diameter_a / pixel_size_a))
    return recentre_images(out) if recentre else out


#: checkpoint key of the network-image preprocessing, e.g. ``{"recentre": True}``;
#: checkpoints without it were trained on un-recentred images
PREPROCESS_KEY = "preprocess"
#: recentring: low-pass of the density estimate (Gaussian sigma, network pixels), radius of
#: the second centre-of-mass pass (network pixels) and the largest shift applied (network
#: pixels of the 64-px image = 1/8 of the particle diameter)
RECENTRE_SIGMA_PX = 2.0
RECENTRE_RADIUS_PX = 22.0
RECENTRE_MAX_SHIFT_PX = 8.0


def density_centres(net: np.ndarray) -> np.ndarray:
    """(K, 2) centre (y, x) of the particle density of standardised network images, pixels
    from the image centre.

    Centre of mass of the positive part of a Gaussian low-pass (sigma
    ``RECENTRE_SIGMA_PX``), then once more inside a circle of radius ``RECENTRE_RADIUS_PX``
    around that first estimate, so that noise and density far from the particle (a
    neighbour, a carbon edge) pull less. An image without positive density gives (0, 0).
    """
    x = np.asarray(net, dtype=np.float32)
    K, n, _ = x.shape
    lp = ndimage.gaussian_filter(x, (0, RECENTRE_SIGMA_PX, RECENTRE_SIGMA_PX), mode="constant")
    w = np.clip(lp, 0.0, None).astype(np.float64)
    yy, xx = np.mgrid[:n, :n].astype(np.float64) - n // 2
    tot = w.sum(axis=(1, 2))
    ok = tot > 0
    safe = np.where(ok, tot, 1.0)
    cy = np.where(ok, (w * yy).sum(axis=(1, 2)) / safe, 0.0)
    cx = np.where(ok, (w * xx).sum(axis=(1, 2)) / safe, 0.0)
    inside = ((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
              <= RECENTRE_RADIUS_PX ** 2)
    w2 = w * inside
    tot2 = w2.sum(axis=(1, 2))
    ok2 = tot2 > 0
    safe2 = np.where(ok2, tot2, 1.0)
    cy = np.where(ok2, (w2 * yy).sum(axis=(1, 2)) / safe2, cy)
    cx = np.where(ok2, (w2 * xx).sum(axis=(1, 2)) / safe2, cx)
    return np.stack([cy, cx], axis=1)


def fourier_shift_images(x: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Shift each image of ``x`` (K, n, n) by ``shifts`` (K, 2) (y, x) pixels, sub-pixel, by a
    Fourier phase ramp on the image zero-padded to 2n (so nothing wraps around: pixels
    shifted in from outside are 0)."""
    x = np.asarray(x, dtype=np.float32)
    K, n, _ = x.shape
    m = 2 * n
    pad = np.zeros((K, m, m), dtype=np.float32)
    lo = n // 2
    pad[:, lo:lo + n, lo:lo + n] = x
    ky = np.fft.fftfreq(m)[:, None]
    kx = np.fft.rfftfreq(m)[None, :]
    sh = np.asarray(shifts, dtype=np.float64)
    ramp = np.exp(-2j * np.pi * (ky[None] * sh[:, 0, None, None] + kx[None] * sh[:, 1, None, None]))
    out = np.fft.irfft2(np.fft.rfft2(pad) * ramp.astype(np.complex64), s=(m, m))
    return out[:, lo:lo + n, lo:lo + n].astype(np.float32)


def recentre_images(net: np.ndarray, max_shift_px: float = RECENTRE_MAX_SHIFT_PX,
                    chunk: int = 512) -> np.ndarray:
    """Standardised network images moved so their density centre (:func:`density_centres`)
    sits at the image centre, then standardised again.

    A good class average that a classification left a few pixels off-centre then looks like
    a centred one; the shift is clamped to ``max_shift_px`` (per axis), so a box that holds
    only part of a particle (an off-centre pick) stays partial and visibly truncated: what
    the window cut off is not brought back, the shifted-in pixels are 0 (the mean).
    Idempotent up to interpolation; the same function is applied to the stored training
    images and at inference.
    """
    x = np.asarray(net, dtype=np.float32)
    if x.ndim != 3 or len(x) == 0:
        return x.astype(np.float32, copy=True)
    out = np.empty_like(x)
    for b in range(0, len(x), chunk):
        xb = x[b:b + chunk]
        c = np.clip(density_centres(xb), -max_shift_px, max_shift_px)
        out[b:b + chunk] = _standardise(fourier_shift_images(xb, -c))
    return out


def _otsu(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    if v.size == 0 or v.max() <= v.min():
        return float(v.max()) if v.size else 0.0
    hist, edges = np.histogram(v, bins=64)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


_DISCS = {r: (radius_grid((2 * r + 1, 2 * r + 1)) <= r + 0.01) for r in range(1, 7)}


def image_features(img: np.ndarray, pixel_size_a: float, diameter_a: float) -> np.ndarray:
    """The image features (``IMAGE_FEATURES``) and the raw job features (``JOB_FEATURES``) of one class.

    Parameters
    ----------
    img : (n, n) array
        Class average (protein white, particle-normalised units).
    pixel_size_a, diameter_a : float
        Pixel size and particle (mask) diameter in Å.

    Returns
    -------
    (len(IMAGE_FEATURES) + 3,) float64 array.
    """
    d_px = diameter_a / pixel_size_a
    window = min(img.shape[-1], FEATURE_WINDOW * d_px)
    f = window_rescale(np.asarray(img, dtype=np.float32), window).astype(np.float64)
    f_px = window * pixel_size_a / IMAGE_SIZE  # Å per pixel in the feature image
    r = 0.5 * d_px * IMAGE_SIZE / window
    rad = radius_grid(f.shape)
    circle = rad <= r
    ring = (rad > r) & (rad <= min(1.25 * r, IMAGE_SIZE / 2))
    if ring.sum() < 8:  # box smaller than the particle: use the corners
        ring = rad > min(r, IMAGE_SIZE / 2 - 2)
    lp = lowpass(f, max(LOWPASS_A, 2.5 * f_px), f_px)
    thr = _otsu(lp[circle])
    protein = circle & (lp > thr)
    solvent = circle & ~protein
    n_prot = int(protein.sum())
    if n_prot:
        lab, nlab = ndimage.label(protein)
        sizes = np.bincount(lab.ravel())[1:]
        scattered = 1.0 - sizes.max() / n_prot
        gran = [ndimage.binary_opening(protein, structure=_DISCS[k]).sum() / n_prot
                for k in range(1, 7)]
    else:
        scattered, gran = 1.0, [0.0] * 6
    edge_band = circle & (rad > r - 2.0)
    edge = float(protein[edge_band].mean()) if edge_band.any() else 0.0
    lp_c = lp[circle]
    p_std = float(f[protein].std()) if n_prot > 1 else 0.0
    s_mean = float(f[solvent].mean()) if solvent.any() else 0.0
    s_std = float(f[solvent].std()) if solvent.sum() > 1 else 0.0
    p_sum = float(f[protein].sum()) / circle.sum()
    s_sum = float(f[solvent].sum()) / circle.sum()
    rel = p_sum / (abs(p_sum) + abs(s_sum) + 1e-12)
    return np.array([
        float(f[ring].mean()), float(f[ring].std()), p_std, s_mean, s_std,
        float(scattered), edge, float(lp_c.mean()), float(lp_c.std()), float(lp_c.min()),
        float(lp_c.max()), *map(float, gran), p_sum, s_sum, rel,
    ], dtype=np.float64)


def meta_features(meta: ClassMeta, best_resolution_a: float | None) -> np.ndarray:
    """``META_FEATURES`` of one class (``nan`` where the metadata is unknown)."""
    nan = float("nan")
    lo, hi = RESOLUTION_RANGE_A
    res = None if meta.resolution_a is None or not np.isfinite(meta.resolution_a) \
        else float(np.clip(meta.resolution_a, lo, hi))
    n = max(float(meta.n_particles), 2.0)
    wres = nan if res is None else (1.0 / res ** 2) / np.log(n)
    if res is None or best_resolution_a is None:
        rel = nan
    else:
        rel = res / float(np.clip(best_resolution_a, lo, hi))
    acc_r = nan if meta.acc_rot_deg is None else float(meta.acc_rot_deg)
    acc_t = nan if meta.acc_trans_a is None else float(meta.acc_trans_a)
    return np.array([acc_r, acc_t, nan if res is None else res, wres, rel], dtype=np.float64)


def relative_intensity(X: np.ndarray, job: np.ndarray | None = None) -> np.ndarray:
    """``INTENSITY_FEATURES`` divided by their job's intensity scale (the median
    ``INTENSITY_REFERENCE`` over the job's rows), so they no longer depend on the units a
    classification program writes its class averages in (or on how bright a data set's
    particles are); the other features are unchanged.

    ``X`` holds the raw features of scored classes (rows with ``nan`` are ignored for the
    scale); ``job`` gives each row's job (default: all one job). A job whose scale is not
    positive keeps its values.
    """
    Y = np.array(X, dtype=np.float64, copy=True)
    jobs = np.zeros(len(Y), dtype=np.int64) if job is None else np.asarray(job)
    ref = Y[:, FEATURE_NAMES.index(INTENSITY_REFERENCE)]
    for j in np.unique(jobs):
        m = jobs == j
        r = ref[m]
        r = r[np.isfinite(r)]
        scale = float(np.median(r)) if r.size else 0.0
        if scale > 1e-12:
            Y[np.ix_(m, _INTENSITY_IDX)] /= scale
    return Y


def job_features(images: np.ndarray, metas: list[ClassMeta], pixel_size_a: float,
                 diameter_a: float, relative: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Raw feature matrix (K, N_FEATURES) of one job and the mask of scored classes.

    Classes with ``n_particles <= MIN_PARTICLES`` or a non-finite image are not scored;
    their rows are ``nan``. The job features are z-scored among the scored classes
    (a job with one scored class gets 0). With ``relative`` the intensity features are
    divided by the job's intensity scale (:func:`relative_intensity`).
    """
    imgs = np.asarray(images, dtype=np.float32)
    if imgs.ndim != 3 or imgs.shape[0] != len(metas):
        raise ValueError(f"need (K, n, n) images matching {len(metas)} classes, got {imgs.shape}")
    K = len(metas)
    scored = np.array([m.n_particles > MIN_PARTICLES for m in metas], dtype=bool)
    scored &= np.isfinite(imgs).all(axis=(1, 2)) & (imgs.std(axis=(1, 2)) > 0)
    res_known = [m.resolution_a for m, s in zip(metas, scored)
                 if s and m.resolution_a is not None and np.isfinite(m.resolution_a)]
    best = min(res_known) if res_known else None
    X = np.full((K, N_FEATURES), np.nan)
    for k in np.flatnonzero(scored):
        X[k, :len(META_FEATURES)] = meta_features(metas[k], best)
        X[k, len(META_FEATURES):] = image_features(imgs[k], pixel_size_a, diameter_a)
    if scored.any():
        J = X[scored, JOB_SLICE]
        mu = J.mean(axis=0)
        sd = J.std(axis=0)
        X[scored, JOB_SLICE] = np.where(sd > 1e-12, (J - mu) / np.where(sd > 1e-12, sd, 1.0), 0.0)
        if relative:
            X[scored] = relative_intensity(X[scored])
    return X, scored


@dataclass(frozen=True)
class FeatureStats:
    """Global normalisation statistics (training-set mean and std per feature)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray) -> FeatureStats:
        """Statistics of a raw training feature matrix (``nan`` entries ignored)."""
        Y = _log_columns(np.atleast_2d(X))
        mean = np.nanmean(Y, axis=0)
        std = np.nanstd(Y, axis=0)
        mean = np.where(np.isfinite(mean), mean, 0.0)
        std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
        # the job features are already z-scores
        mean[JOB_SLICE] = 0.0
        std[JOB_SLICE] = 1.0
        return cls(mean, std)

    def to_dict(self) -> dict[str, list[float]]:
        return {"names": list(FEATURE_NAMES), "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureStats:
        if list(d.get("names", [])) != list(FEATURE_NAMES):
            raise ValueError("feature statistics were made for a different feature list")
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64))


def normalise_features(X: np.ndarray, stats: FeatureStats) -> np.ndarray:
    """Global z-score with the training statistics (``LOG_FEATURES`` on a log scale).

    Unknown (``nan``) values become 0, the training mean; the result is clipped to ±6.
    """
    Z = (_log_columns(np.atleast_2d(X)) - stats.mean) / stats.std
    Z = np.where(np.isfinite(Z), Z, 0.0)
    return np.clip(Z, -Z_CLIP, Z_CLIP).astype(np.float32)
