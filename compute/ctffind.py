"""CTF estimation, CTFFIND4-like, with the one CTF model of :mod:`compute.ctf`.

Steps (:func:`estimate_ctf`):

1. **Spectrum** — :func:`tile_power_spectrum`: the mean power spectrum of overlapping
   ``box`` x ``box`` tiles (mean-subtracted, lightly edge-tapered), batched rFFTs.
2. **Flattening** — the spectrum is divided by a smooth radial trend (a quartic in k fitted to
   the log of the rotational average), so every ring has a similar scale.
3. **1D exhaustive search** — on the rotational average, for each mean defocus on the grid
   ``dfmin:dfstep:dfmax`` (and each phase shift on its grid for phase-plate data) the profile is
   fitted by ``B(k) + E(k) sin²γ(k)`` with ``B`` a cubic and ``E`` a quadratic in k (linear least
   squares, all candidates at once); the score is the fraction of variance explained. The best
   candidate is refined on a 10x finer grid.
4. **2D refinement** — defocus U/V/angle (and phase shift) maximise the same score over every
   pixel of the band ``resmin``-``resmax`` (Nelder-Mead; astigmatism parametrised as a vector
   ``(ax, ay)`` so the angle never wraps), started from the best of a few astigmatism guesses of
   size ``dast``.
5. **Fit limit and figure of merit** — pixels are binned by their *equi-phase* radius (the
   radius with the same γ at the mean defocus), and the correlation between the background-
   subtracted data and ``sin²γ`` is computed in a sliding window about two Thon rings wide;
   ``rlnCtfMaxResolution`` is where it first drops below ``fit_threshold``. The figure of merit
   is the correlation between background-subtracted data and model over the fitting band.
6. **Diagnostic** — :func:`diagnostic_image`: the centred spectrum, left half data, right half
   model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
from scipy import optimize

from compute import backend as be
from compute import ctf as ctfm
from compute.backend import xp_of
from compute.errors import ComputeError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# spectrum
# --------------------------------------------------------------------------------------------

def tile_power_spectrum(img, box: int = 512, overlap: float = 0.5, full: bool = False,
                        chunk: int = 16, edge_frac: float = 0.04):
    """Mean power spectrum of overlapping tiles of a 2D image (unshifted grid).

    Parameters
    ----------
    img
        2D micrograph (NumPy or CuPy).
    box
        Tile size in pixels (clipped to the image's short side, kept even).
    overlap
        Fraction of the tile shared by neighbours (0 = abutting tiles).
    full
        Return the full ``(box, box)`` grid instead of the rfft half ``(box, box//2+1)``.
    """
    xp = xp_of(img)
    if img.ndim != 2:
        raise ComputeError(f"power spectrum needs a 2D image, got shape {img.shape}")
    ny, nx = img.shape
    box = int(min(box, ny, nx)) // 2 * 2
    if box < 16:
        raise ComputeError(f"image {nx}x{ny} is too small for a power spectrum")
    step = max(1, int(round(box * (1.0 - overlap))))
    ys = _starts(ny, box, step)
    xs = _starts(nx, box, step)
    from compute.motion import taper_window  # noqa: PLC0415

    win = taper_window((box, box), edge_frac, xp)
    acc = xp.zeros((box, box // 2 + 1), dtype=np.float64)
    coords = [(y, x) for y in ys for x in xs]
    a = img.astype(np.float32, copy=False)
    for c0 in range(0, len(coords), chunk):
        tiles = xp.stack([a[y:y + box, x:x + box] for y, x in coords[c0:c0 + chunk]])
        tiles = (tiles - tiles.mean(axis=(-2, -1), keepdims=True)) * win
        F = be.rfft2(tiles)
        acc += (F.real ** 2 + F.imag ** 2).sum(axis=0)
    ps = (acc / len(coords)).astype(np.float32)
    if not full:
        return ps
    # rebuild the full grid from Hermitian symmetry
    out = xp.empty((box, box), dtype=np.float32)
    out[:, : box // 2 + 1] = ps
    rows = (-xp.arange(box)) % box
    out[:, box // 2 + 1:] = ps[rows][:, 1: box // 2][:, ::-1]
    return out


def _starts(n: int, box: int, step: int) -> list[int]:
    s = list(range(0, n - box + 1, step))
    if s[-1] != n - box:
        s.append(n - box)
    return s


def half_from_full(ps_full):
    """rfft-half ``(box, box//2+1)`` of a full unshifted spectrum."""
    box = ps_full.shape[-1]
    return ps_full[:, : box // 2 + 1]


# --------------------------------------------------------------------------------------------
# parameters and results
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CtfSearch:
    """Search settings (RELION's ctffind job options; lengths in Å, angles in degrees)."""

    pixel_size_a: float
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    box: int = 512
    res_min_a: float = 30.0
    res_max_a: float = 5.0
    defocus_min_a: float = 5000.0
    defocus_max_a: float = 50000.0
    defocus_step_a: float = 500.0
    expected_astig_a: float = 100.0
    do_phase_shift: bool = False
    phase_min_deg: float = 0.0
    phase_max_deg: float = 180.0
    phase_step_deg: float = 10.0
    fit_threshold: float = 0.3
    tile_overlap: float = 0.5


@dataclass
class CtfFit:
    """Estimated CTF of one micrograph (RELION's micrographs_ctf.star values)."""

    defocus_u_a: float
    defocus_v_a: float
    defocus_angle_deg: float
    phase_shift_deg: float | None
    figure_of_merit: float
    max_resolution_a: float
    score: float
    ring_k_inv_a: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ring_cc: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def astigmatism_a(self) -> float:
        return abs(self.defocus_u_a - self.defocus_v_a)

    @property
    def defocus_mean_a(self) -> float:
        return 0.5 * (self.defocus_u_a + self.defocus_v_a)

    def params(self, s: CtfSearch) -> ctfm.CtfParams:
        return ctfm.CtfParams(self.defocus_u_a, self.defocus_v_a, self.defocus_angle_deg,
                              s.voltage_kv, s.cs_mm, s.amplitude_contrast,
                              self.phase_shift_deg or 0.0)


# --------------------------------------------------------------------------------------------
# fitting
# --------------------------------------------------------------------------------------------

def _params(s: CtfSearch, mean: float, ax: float, ay: float, phase: float) -> ctfm.CtfParams:
    d = float(np.hypot(ax, ay))
    ang = 0.5 * np.degrees(np.arctan2(ay, ax)) % 180.0
    return ctfm.CtfParams(mean + d, mean - d, ang, s.voltage_kv, s.cs_mm, s.amplitude_contrast,
                          phase)


def _poly_basis(kt, deg_b: int = 3, deg_e: int = 2):
    return [kt ** m for m in range(deg_b + 1)], [kt ** m for m in range(deg_e + 1)]


def _ls_score(y, c, kt, weights=None):
    """R² of y ~ B(k) + E(k) c, batched over leading axes of ``c`` (..., S)."""
    bb, ee = _poly_basis(kt)
    cols = [np.broadcast_to(b, c.shape) for b in bb] + [e * c for e in ee]
    X = np.stack(cols, axis=-1)  # (..., S, 7)
    w = np.ones_like(kt) if weights is None else weights
    Xw = X * w[:, None]
    XtX = np.einsum("...si,...sj->...ij", Xw, X) + 1e-9 * np.eye(X.shape[-1])
    Xty = np.einsum("...si,s->...i", Xw, y)
    beta = np.linalg.solve(XtX, Xty[..., None])[..., 0]
    fit = np.einsum("...si,...i->...s", X, beta)
    ym = (w * y).sum() / w.sum()
    tss = (w * (y - ym) ** 2).sum()
    rss = (w * (y - fit) ** 2).sum(axis=-1)
    r2 = 1.0 - rss / max(tss, 1e-30)
    # the envelope must stay positive, otherwise cos² (half a ring off) would fit as well
    env = np.einsum("...i,is->...s", beta[..., len(bb):], np.stack(ee))
    r2 = np.where(env.mean(axis=-1) > 0, r2, r2 - 2.0)
    return r2, beta


class _Spectrum:
    """Flattened spectrum on the rfft grid with band bookkeeping."""

    def __init__(self, ps_half, s: CtfSearch):
        ps = np.asarray(be.to_numpy(ps_half), dtype=np.float64)
        box = ps.shape[0]
        if ps.shape != (box, box // 2 + 1):
            raise ComputeError(f"spectrum shape {ps.shape} is not an rfft half of a square box")
        if not np.isfinite(ps).all():
            raise ComputeError("power spectrum contains NaN or infinite values")
        self.box = box
        px = s.pixel_size_a
        ky = np.fft.fftfreq(box, d=px)
        kx = np.fft.rfftfreq(box, d=px)
        self.KY, self.KX = np.meshgrid(ky, kx, indexing="ij")
        self.K = np.hypot(self.KX, self.KY)
        self.shell = np.round(self.K * box * px).astype(int)
        nyq = box // 2
        self.kmin = 1.0 / s.res_min_a
        self.kmax = min(1.0 / s.res_max_a, 0.5 / px * 0.98)
        if self.kmin >= self.kmax:
            raise ComputeError(f"fit band {s.res_min_a}-{s.res_max_a} Å is empty at pixel size "
                               f"{px} Å")
        axes = (np.arange(box)[:, None] == 0) | (np.arange(box // 2 + 1)[None, :] == 0)
        # radial trend of the log spectrum (outside the axes, which carry tile-edge artefacts)
        valid = (~axes) & (self.shell >= 2) & (self.shell <= nyq)
        counts = np.bincount(self.shell[valid], minlength=nyq + 1)
        prof = np.bincount(self.shell[valid], weights=ps[valid], minlength=nyq + 1)
        prof = prof / np.maximum(counts, 1)
        ks = np.arange(nyq + 1) / (box * px)
        sel = (ks >= self.kmin * 0.8) & (counts > 0) & (prof > 0)
        if sel.sum() < 8:
            raise ComputeError("too few spectrum shells in the fit band")
        kk = ks[sel] / ks[sel].max()
        coef = np.polyfit(kk, np.log(prof[sel]), 4)
        trend = np.exp(np.polyval(coef, np.clip(self.K / ks[sel].max(), 0, None)))
        self.y = ps / np.maximum(trend, 1e-30)
        self.band = valid & (self.K >= self.kmin) & (self.K <= self.kmax)
        self.outer = valid & (self.K >= self.kmin)
        self.kscale = self.kmax
        # 1D rotational average inside the band
        sh = self.shell[self.band]
        n1 = np.bincount(sh)
        keep = n1 > 0
        self.k1 = (np.bincount(sh, weights=self.K[self.band]) [keep] / n1[keep])
        self.y1 = np.bincount(sh, weights=self.y[self.band])[keep] / n1[keep]
        self.w1 = np.sqrt(n1[keep].astype(np.float64))
        # 2D band pixels
        # float32 halves the cost of gamma, the bulk of each 2D evaluation (γ < 1e3 rad)
        self.kx_b = self.KX[self.band].astype(np.float32)
        self.ky_b = self.KY[self.band].astype(np.float32)
        self.k_b = self.K[self.band]
        self.y_b = self.y[self.band]
        self.fast: _FastLS | None = None


def _sin2_gamma_1d(k, s: CtfSearch, defocus, phase):
    """sin²γ on radial samples ``k`` for arrays of defocus/phase (broadcast to (..., S))."""
    lam = ctfm.electron_wavelength_a(s.voltage_kv)
    cs = s.cs_mm * 1e7
    q = s.amplitude_contrast
    kamp = np.arctan(q / np.sqrt(1 - q * q))
    d = np.asarray(defocus, dtype=np.float64)[..., None]
    ph = np.deg2rad(np.asarray(phase, dtype=np.float64))[..., None]
    g = -np.pi * lam * d * k ** 2 + 0.5 * np.pi * cs * lam ** 3 * k ** 4 - kamp - ph
    return np.sin(g) ** 2


def _search_1d(sp: _Spectrum, s: CtfSearch) -> tuple[float, float]:
    dfs = np.arange(s.defocus_min_a, s.defocus_max_a + 0.5 * s.defocus_step_a, s.defocus_step_a)
    if dfs.size == 0:
        raise ComputeError(f"defocus range {s.defocus_min_a}-{s.defocus_max_a} Å is empty")
    if s.do_phase_shift:
        phases = np.arange(s.phase_min_deg, s.phase_max_deg + 1e-6, max(s.phase_step_deg, 0.5))
    else:
        phases = np.array([0.0])
    D, P = np.meshgrid(dfs, phases, indexing="ij")
    kt = sp.k1 / sp.kscale
    c = _sin2_gamma_1d(sp.k1, s, D, P)
    r2, _ = _ls_score(sp.y1, c, kt, sp.w1)
    i, j = np.unravel_index(int(np.argmax(r2)), r2.shape)
    best_df, best_ph = float(D[i, j]), float(P[i, j])
    # finer grid around the best
    fine = best_df + np.linspace(-s.defocus_step_a, s.defocus_step_a, 41)
    fine = fine[fine > 0]
    fph = best_ph + (np.linspace(-s.phase_step_deg, s.phase_step_deg, 11)
                     if s.do_phase_shift else np.array([0.0]))
    D, P = np.meshgrid(fine, fph, indexing="ij")
    r2, _ = _ls_score(sp.y1, _sin2_gamma_1d(sp.k1, s, D, P), kt, sp.w1)
    i, j = np.unravel_index(int(np.argmax(r2)), r2.shape)
    return float(D[i, j]), float(P[i, j])


class _FastLS:
    """:func:`_ls_score` for one fixed set of pixels and many models ``c``.

    Everything that does not depend on ``c`` (the background columns, their products with the
    envelope columns and with the data) is computed once, so one evaluation costs about 20 dot
    products instead of building and reducing an (n, 7) design matrix.
    """

    def __init__(self, y, kt):
        bb, ee = _poly_basis(kt)
        self.B = np.stack(bb)  # (4, n)
        self.E = np.stack(ee)  # (3, n)
        self.y = y
        self.BtB = self.B @ self.B.T
        self.Bty = self.B @ y
        self.BE = np.einsum("in,jn->ijn", self.B, self.E).reshape(-1, y.size)  # (12, n)
        self.EE = np.einsum("in,jn->ijn", self.E, self.E).reshape(-1, y.size)  # (9, n)
        self.Ey = self.E * y
        self.yy = float(y @ y)
        self.tss = float(((y - y.mean()) ** 2).sum())
        self.Emean = self.E.mean(axis=1)

    def score(self, c) -> tuple[float, np.ndarray]:
        nb, ne = self.B.shape[0], self.E.shape[0]
        XtX = np.empty((nb + ne, nb + ne))
        XtX[:nb, :nb] = self.BtB
        be_ = (self.BE @ c).reshape(nb, ne)
        XtX[:nb, nb:] = be_
        XtX[nb:, :nb] = be_.T
        XtX[nb:, nb:] = (self.EE @ (c * c)).reshape(ne, ne)
        Xty = np.concatenate([self.Bty, self.Ey @ c])
        beta = np.linalg.solve(XtX + 1e-9 * np.eye(nb + ne), Xty)
        rss = self.yy - float(beta @ Xty)
        r2 = 1.0 - rss / max(self.tss, 1e-30)
        if float(self.Emean @ beta[nb:]) <= 0:  # envelope must be positive (not cos²)
            r2 -= 2.0
        return float(r2), beta


def _score_2d(sp: _Spectrum, s: CtfSearch, p: ctfm.CtfParams) -> tuple[float, np.ndarray]:
    g = ctfm.gamma(sp.kx_b, sp.ky_b, p)
    c = (np.sin(g) ** 2).astype(np.float64)
    if sp.fast is None:
        sp.fast = _FastLS(sp.y_b, sp.k_b / sp.kscale)
    return sp.fast.score(c)


def _refine_2d(sp: _Spectrum, s: CtfSearch, df0: float, ph0: float):
    dast = max(float(s.expected_astig_a), 50.0)
    starts = [(df0, 0.0, 0.0)]
    for a in (0.0, 45.0, 90.0, 135.0):
        t = np.deg2rad(2 * a)
        for size in (0.5 * dast, dast):
            starts.append((df0, size * np.cos(t), size * np.sin(t)))

    def cost(v):
        ph = float(v[3]) if s.do_phase_shift else 0.0
        if v[0] <= 0:
            return 1.0
        return -_score_2d(sp, s, _params(s, v[0], v[1], v[2], ph))[0]

    scored = sorted(starts, key=lambda st: cost(np.array([*st, ph0])))
    best = None
    for st in scored[:2]:
        x0 = np.array([*st, ph0]) if s.do_phase_shift else np.array(st)
        step = np.array([max(100.0, 0.01 * df0), 0.5 * dast, 0.5 * dast, 10.0])[: x0.size]
        simplex = np.vstack([x0] + [x0 + np.eye(x0.size)[i] * step[i] for i in range(x0.size)])
        res = optimize.minimize(cost, x0, method="Nelder-Mead",
                                options={"initial_simplex": simplex, "xatol": 1.0,
                                         "fatol": 1e-7, "maxiter": 600})
        if best is None or res.fun < best.fun:
            best = res
    # one restart with a small simplex: Nelder-Mead often stops early on a narrow ridge
    # (the astigmatism angle is poorly constrained when the astigmatism is small)
    x0 = best.x
    step = np.array([50.0, 0.2 * dast, 0.2 * dast, 3.0])[: x0.size]
    simplex = np.vstack([x0] + [x0 + np.eye(x0.size)[i] * step[i] for i in range(x0.size)])
    res = optimize.minimize(cost, x0, method="Nelder-Mead",
                            options={"initial_simplex": simplex, "xatol": 0.5, "fatol": 1e-8,
                                     "maxiter": 400})
    if res.fun < best.fun:
        best = res
    v = best.x
    ph = float(v[3]) if s.do_phase_shift else 0.0
    return _params(s, v[0], v[1], v[2], ph), -float(best.fun)


def _equiphase_k(sp: _Spectrum, s: CtfSearch, p: ctfm.CtfParams, mask):
    """Radius at the mean defocus with the same γ as each pixel (undoes astigmatism)."""
    lam = ctfm.electron_wavelength_a(s.voltage_kv)
    cs = s.cs_mm * 1e7
    theta = np.arctan2(sp.KY[mask], sp.KX[mask])
    ang = np.deg2rad(p.defocus_angle_deg)
    df = p.defocus_mean_a + 0.5 * (p.defocus_u_a - p.defocus_v_a) * np.cos(2 * (theta - ang))
    k2 = sp.K[mask] ** 2
    a = 0.5 * np.pi * cs * lam ** 3
    b = np.pi * lam
    # defocus/Cs part of gamma at the pixel, then solve a u² - b m u = that for u = k_eq²
    target = -b * df * k2 + a * k2 * k2
    m = p.defocus_mean_a
    if a > 0:
        disc = np.maximum((b * m) ** 2 + 4 * a * target, 0.0)
        u = (b * m - np.sqrt(disc)) / (2 * a)
    else:
        u = target / (-b * m)
    return np.sqrt(np.maximum(u, 0.0))


def _ring_correlation(sp: _Spectrum, s: CtfSearch, p: ctfm.CtfParams):
    """Windowed correlation of background-subtracted data with sin²γ along equi-phase radius."""
    mask = sp.outer
    keq = _equiphase_k(sp, s, p, mask)
    box, px = sp.box, s.pixel_size_a
    sh = np.round(keq * box * px).astype(int)
    nyq = box // 2
    ok = sh <= nyq
    sh, y = sh[ok], sp.y[mask][ok]
    cnt = np.bincount(sh, minlength=nyq + 1)
    d1 = np.bincount(sh, weights=y, minlength=nyq + 1) / np.maximum(cnt, 1)
    ks = np.arange(nyq + 1) / (box * px)
    m1 = _sin2_gamma_1d(ks, s, p.defocus_mean_a, p.phase_shift_deg)
    lam = ctfm.electron_wavelength_a(s.voltage_kv)
    first = int(np.ceil(sp.kmin * box * px))
    cc = np.full(nyq + 1, np.nan)
    for i in range(first, nyq + 1):
        period = box * px / max(lam * p.defocus_mean_a * max(ks[i], 1e-6), 1e-6)
        w = int(max(3, np.ceil(period)))
        lo, hi = max(first, i - w), min(nyq, i + w)
        sel = np.arange(lo, hi + 1)
        sel = sel[cnt[sel] > 0]
        if sel.size < 5:
            continue
        t = ks[sel] - ks[sel].mean()
        A = np.stack([np.ones_like(t), t], axis=1)
        rd = d1[sel] - A @ np.linalg.lstsq(A, d1[sel], rcond=None)[0]
        rm = m1[sel] - A @ np.linalg.lstsq(A, m1[sel], rcond=None)[0]
        den = np.sqrt((rd ** 2).sum() * (rm ** 2).sum())
        cc[i] = (rd * rm).sum() / den if den > 0 else 0.0
    return ks, cc


def _fit_limit(ks, cc, kmin: float, threshold: float, pixel_size_a: float) -> float:
    valid = np.isfinite(cc) & (ks >= kmin)
    idx = np.nonzero(valid)[0]
    if idx.size == 0:
        return float(1.0 / kmin)
    # smooth over 3 shells so one noisy shell does not end the fit
    c = np.convolve(np.nan_to_num(cc[idx]), np.ones(3) / 3.0, mode="same")
    ok = c >= threshold
    # the broad rings near the first maximum may fit poorly: the fit starts at the first run
    # of `start_run` good shells and ends where `stop_run` shells in a row fall below
    start_run, stop_run = 5, 8
    start = None
    for i in range(0, len(ok) - start_run + 1):
        if ok[i:i + start_run].all():
            start = i
            break
    if start is None:
        return float(1.0 / ks[idx[0]])
    j = start
    while j < len(ok):
        if not ok[j] and not ok[j:j + stop_run].any():
            break
        j += 1
    return float(1.0 / ks[idx[max(j - 1, start)]])


def estimate_ctf_from_spectrum(ps_half, s: CtfSearch) -> CtfFit:
    """Fit the CTF to an averaged power spectrum on the rfft grid ``(box, box//2+1)``."""
    sp = _Spectrum(ps_half, s)
    df0, ph0 = _search_1d(sp, s)
    p, score = _refine_2d(sp, s, df0, ph0)
    # figure of merit: correlation of background-subtracted data with the oscillating model
    g = ctfm.gamma(sp.kx_b, sp.ky_b, p)
    c = np.sin(g) ** 2
    _, beta = _ls_score(sp.y_b, c, sp.k_b / sp.kscale)
    kt = sp.k_b / sp.kscale
    bb, ee = _poly_basis(kt)
    bg = sum(b_ * v for b_, v in zip(beta[:4], bb))
    env = sum(e_ * v for e_, v in zip(beta[4:], ee))
    resid = sp.y_b - bg
    model = env * c
    fom = float(np.corrcoef(resid, model)[0, 1]) if model.std() > 0 else 0.0
    ks, cc = _ring_correlation(sp, s, p)
    maxres = _fit_limit(ks, cc, sp.kmin, s.fit_threshold, s.pixel_size_a)
    phase = (float(p.phase_shift_deg) % 180.0) if s.do_phase_shift else None
    return CtfFit(p.defocus_u_a, p.defocus_v_a, p.defocus_angle_deg, phase, fom, maxres, score,
                  ks, cc)


def estimate_ctf(img, s: CtfSearch) -> CtfFit:
    """Estimate the CTF of a 2D micrograph (tile spectrum, then :func:`estimate_ctf_from_spectrum`)."""
    xp = xp_of(img)
    if not bool(xp.isfinite(img).all()):
        raise ComputeError("micrograph contains NaN or infinite values")
    if float(img.std()) == 0.0:
        raise ComputeError("micrograph is constant (no signal)")
    ps = tile_power_spectrum(img, s.box, s.tile_overlap)
    return estimate_ctf_from_spectrum(ps, s)


def diagnostic_image(ps_half, s: CtfSearch, fit: CtfFit, xp: ModuleType = np):
    """Centred ``box`` x ``box`` image: left half the flattened spectrum, right half the model.

    Both halves are scaled to zero mean and unit variance inside the fitting band and clipped to
    ±3, as a quick visual check of ring positions.
    """
    sp = _Spectrum(ps_half, s)
    box = sp.box
    kx, ky = ctfm.frequency_grid((box, box), s.pixel_size_a)
    p = fit.params(s)
    model = np.sin(ctfm.gamma(kx, ky, p)) ** 2
    data_half = sp.y
    rows = (-np.arange(box)) % box
    data = np.empty((box, box))
    data[:, : box // 2 + 1] = data_half
    data[:, box // 2 + 1:] = data_half[rows][:, 1: box // 2][:, ::-1]
    k = np.hypot(kx, ky)
    band = (k >= sp.kmin) & (k <= sp.kmax)

    def norm(a):
        a = a - a[band].mean()
        sd = a[band].std()
        return np.clip(a / (sd if sd > 0 else 1.0), -3, 3)

    d = np.fft.fftshift(norm(data))
    m = np.fft.fftshift(norm(model))
    out = d.copy()
    out[:, box // 2:] = m[:, box // 2:]
    return xp.asarray(out.astype(np.float32))
