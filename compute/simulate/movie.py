"""Movies: frames of a simulated micrograph with a known drift, dose damage, counting noise,
a detector gain and defective pixels.

Frame ``f`` (0-based) of ``n`` is rendered from the specimen of
:func:`compute.simulate.micrograph.simulate_micrograph` as::

    C_f   = irfft2( contrast_ft * exp(-D_f / (2 Ne(k))) )     dose damage (Grant & Grigorieff)
    C_f   = warp(C_f, global shift g_f + local deformation)   the specimen moves
    raw_f = Poisson( dose_per_frame * pixel^2 * A * (1 + C_f) * s )   counting, sensitivity s

with ``D_f = (f + 1/2) * dose_per_frame`` the exposure at mid-frame, critical exposure
``Ne(k) = 0.245 k^-1.665 + 2.81`` e/A^2 (k in 1/A; x0.8 at 200 kV and below) and
``A = illumination * ice_f`` the mean intensity: the illumination belongs to the beam and
stays put, the ice-thickness attenuation ``ice_f`` belongs to the specimen and moves with the
global shift ``g_f`` (bilinear; it is smooth, so the few-px local deformation is neglected
for it). The gain reference is
``1 / s`` (multiply raw frames by it, as RELION and MotionCor2 do); hot pixels are stuck
high and dead pixels read 0 in every frame.

Motion convention: a specimen point at ``(x, y)`` in frame 0 appears in frame ``f`` at
``(x, y) + displacement``; ``displacement`` is 0 for frame 0. The global part ``g_f`` is
a smooth drift (fast start, then slower) plus small jitter whose largest excursion from the
frame-0 position is ``drift_px``. The local part is a smooth,
non-rigid deformation that grows with the frame index: each row ``y`` slides along x by
``u_f(y)`` and each column ``x`` slides along y by ``v_f(x)`` (both low-order cosine series),
applied as exact Fourier shifts (no interpolation blur). The full displacement of a
point is given by :meth:`MovieTruth.displacement`; patch alignment sees different shifts
in different patches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compute import backend as be
from compute.errors import ComputeError
from compute.simulate.micrograph import MicrographTruth, simulate_micrograph


def critical_exposure(k, voltage_kv: float = 300.0):
    """Critical exposure Ne(k) in e/A^2 (Grant & Grigorieff 2015), k in 1/A."""
    xp = be.xp_of(k)
    kk = xp.maximum(xp.asarray(k), 1e-6)
    ne = 0.245 * kk ** (-1.665) + 2.81
    return ne * (0.8 if voltage_kv <= 200.0 else 1.0)


def exposure_filter(shape: tuple[int, int], pixel_size_a: float, dose_e_a2: float,
                    voltage_kv: float = 300.0, xp=np):
    """Amplitude attenuation exp(-dose / (2 Ne(k))) on the rfft grid of ``shape``."""
    ky = xp.fft.fftfreq(shape[0], d=pixel_size_a).astype(np.float32)
    kx = xp.fft.rfftfreq(shape[1], d=pixel_size_a).astype(np.float32)
    k = xp.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    return xp.exp(-dose_e_a2 / (2.0 * critical_exposure(k, voltage_kv))).astype(np.float32)


def poisson_counts(lam, rng: np.random.Generator, dtype=np.uint16):
    """Poisson samples with per-pixel means ``lam`` (exact inverse-CDF sampling; fast for the
    small means of counting detectors). CuPy arrays use ``cupy.random.poisson``."""
    xp = be.xp_of(lam)
    if xp is not np:
        return xp.random.poisson(lam).astype(dtype)
    lam = np.asarray(lam, dtype=np.float32)
    top = float(lam.max()) if lam.size else 0.0
    if top > 30.0:  # large means: the library sampler is as fast
        return np.minimum(rng.poisson(lam), np.iinfo(dtype).max).astype(dtype)
    shape = lam.shape
    lam = lam.ravel()
    u = rng.random(lam.size, dtype=np.float32)
    p = np.exp(-lam)
    c = p.copy()
    k = np.zeros(lam.size, dtype=np.uint16)
    j_max = int(top + 12.0 * np.sqrt(top) + 25)
    j = 1
    while j <= 3 and j <= j_max:  # most pixels finish within a few steps: full-size passes
        k += u > c
        p *= lam / np.float32(j)
        c += p
        j += 1
    idx = np.nonzero(u > c)[0]
    lr, ur, pr, cr = lam[idx], u[idx], p[idx], c[idx]
    kr = k[idx]
    while idx.size and j <= j_max:
        more = ur > cr
        kr += more
        if not more.all():  # drop the finished ones
            done = ~more
            k[idx[done]] = kr[done]
            keep = more
            idx, lr, ur, pr, cr, kr = idx[keep], lr[keep], ur[keep], pr[keep], cr[keep], kr[keep]
        pr *= lr / np.float32(j)
        cr += pr
        j += 1
    if idx.size:
        k[idx] = kr
    return np.minimum(k, np.iinfo(dtype).max).astype(dtype).reshape(shape)


def _shift_field(img, dy: float, dx: float):
    """``out(y, x) = img(y - dy, x - dx)`` by bilinear interpolation (edges held), for smooth
    fields that are not periodic (a Fourier shift would wrap them)."""
    return be.ndimage_of(img).shift(img, (float(dy), float(dx)), order=1, mode="nearest")


def drift_trajectory(n_frames: int, rng: np.random.Generator, total_px: float = 10.0,
                     jitter_px: float = 0.05) -> np.ndarray:
    """A global drift ``(n_frames, 2)`` (x, y) px, zero at frame 0, whose largest excursion
    from the frame-0 position is exactly ``total_px`` (jitter included): a fast initial phase
    (half the motion in the first ~15 % of frames) then a slow glide in a direction within
    90° of the first, plus a smooth random-walk jitter of ``jitter_px`` per frame.

    (Until 2026-12 the path was scaled so that its *end point* lay ``total_px`` away; when
    the two directions nearly cancelled that blew the path up, e.g. a 195 px wander for
    ``total_px = 30`` on a 40-frame movie.)
    """
    t = np.arange(n_frames, dtype=np.float64)
    tau = max(1.0, 0.1 * n_frames)
    fast = 1.0 - np.exp(-t / tau)
    slow = t / max(n_frames - 1, 1)
    a1 = rng.uniform(0, 2 * np.pi)
    a2 = a1 + rng.uniform(-0.5 * np.pi, 0.5 * np.pi)
    d1 = np.array([np.cos(a1), np.sin(a1)])
    d2 = np.array([np.cos(a2), np.sin(a2)])
    path = 0.5 * fast[:, None] * d1 + 0.5 * slow[:, None] * d2
    if jitter_px > 0 and n_frames > 2:
        j = np.cumsum(rng.normal(0, jitter_px, (n_frames, 2)), axis=0)
        j -= j[0]
    else:
        j = np.zeros_like(path)
    if n_frames > 1 and total_px > 0:
        # scale the smooth part so that the largest excursion of the whole path is total_px
        # (the jitter is small against it; a few bisection steps make it exact)
        lo, hi = 0.0, 2.0 * (total_px + np.abs(j).sum()) / max(np.hypot(*path.T).max(), 1e-9)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if np.hypot(*(mid * path + j).T).max() > total_px:
                hi = mid
            else:
                lo = mid
        path = lo * path + j
    else:
        path = path * 0.0 + j
    path[0] = 0.0
    return path


@dataclass
class LocalDeformation:
    """Row/column slides: ``u_f(y) = s_f * sum_j ax_j cos(pi j y / ny + px_j)`` (px, along x)
    and ``v_f(x) = s_f * sum_j ay_j cos(pi j x / nx + py_j)`` (px, along y); ``s_f`` grows
    from 0 at frame 0 to 1 at the last frame."""

    shape: tuple[int, int]
    ax: np.ndarray
    phx: np.ndarray
    ay: np.ndarray
    phy: np.ndarray
    scale: np.ndarray  # (n_frames,)

    def u(self, y, frame: int):
        j = np.arange(1, len(self.ax) + 1)
        y = np.asarray(y, dtype=np.float64)[..., None]
        return self.scale[frame] * (self.ax * np.cos(np.pi * j * y / self.shape[0]
                                                     + self.phx)).sum(-1)

    def v(self, x, frame: int):
        j = np.arange(1, len(self.ay) + 1)
        x = np.asarray(x, dtype=np.float64)[..., None]
        return self.scale[frame] * (self.ay * np.cos(np.pi * j * x / self.shape[1]
                                                     + self.phy)).sum(-1)


@dataclass
class Detector:
    """A counting detector: per-pixel sensitivity ``s`` (the gain reference is ``1 / s``),
    hot pixels (stuck high) and dead pixels (always 0), as ``(k, 2)`` rows of (y, x)."""

    sensitivity: np.ndarray
    hot_pixels: np.ndarray
    dead_pixels: np.ndarray
    gain_rms: float

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.sensitivity.shape)

    @property
    def gain_reference(self) -> np.ndarray:
        return (1.0 / self.sensitivity).astype(np.float32)


def make_detector(shape: tuple[int, int] | int, rng: np.random.Generator | int | None = 0,
                  gain_rms: float = 0.05, n_hot: int = 20, n_dead: int = 20) -> Detector:
    """A random detector: pixel-to-pixel plus column-to-column sensitivity variation of
    relative rms ``gain_rms`` (clipped to 0.5-1.5) and ``n_hot`` / ``n_dead`` defects."""
    shape = (int(shape), int(shape)) if np.ndim(shape) == 0 else tuple(int(v) for v in shape)
    rng = np.random.default_rng(rng)
    ny, nx = shape
    if gain_rms > 0:
        s = 1.0 + gain_rms * (0.8 * rng.standard_normal(shape)
                              + 0.6 * rng.standard_normal(nx)[None, :])
        s = np.clip(s, 0.5, 1.5).astype(np.float32)
    else:
        s = np.ones(shape, dtype=np.float32)
    n_def = int(n_hot) + int(n_dead)
    if n_def > ny * nx:
        raise ComputeError(f"{n_def} defective pixels do not fit a {shape} detector")
    flat = rng.choice(ny * nx, size=n_def, replace=False) if n_def else np.zeros(0, int)
    yx = np.column_stack(np.unravel_index(flat, shape)) if n_def else np.zeros((0, 2), int)
    return Detector(s, yx[:n_hot].astype(int), yx[n_hot:].astype(int), float(gain_rms))


@dataclass
class MovieTruth:
    """Ground truth of a movie: the micrograph truth plus motion, dose, gain and defects."""

    micrograph: MicrographTruth
    n_frames: int
    dose_per_frame_e_a2: float
    global_shifts_px: np.ndarray  # (n_frames, 2): x, y
    local: LocalDeformation | None
    hot_pixels: np.ndarray  # (k, 2) rows of (y, x)
    dead_pixels: np.ndarray  # (k, 2) rows of (y, x)
    gain_rms: float
    seed: int | None = None
    extra: dict = field(default_factory=dict)

    def displacement(self, x, y, frame: int) -> tuple[np.ndarray, np.ndarray]:
        """Where a specimen point at frame-0 position ``(x, y)`` has moved by ``frame``:
        returns ``(dx, dy)`` in pixels (arrays broadcast from x, y)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        gx, gy = self.global_shifts_px[frame]
        x1, y1 = x + gx, y + gy
        if self.local is None:
            return np.broadcast_to(gx, np.broadcast(x, y).shape).copy(), \
                np.broadcast_to(gy, np.broadcast(x, y).shape).copy()
        x2 = x1 + self.local.u(y1, frame)
        y2 = y1 + self.local.v(x2, frame)
        return x2 - x, y2 - y

    def local_shifts(self, x, y) -> np.ndarray:
        """Displacement minus the global shift at points ``(x, y)`` for every frame:
        ``(n_frames, npoints, 2)`` (x, y)."""
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        out = np.zeros((self.n_frames, x.size, 2))
        for f in range(self.n_frames):
            dx, dy = self.displacement(x, y, f)
            out[f, :, 0] = dx - self.global_shifts_px[f, 0]
            out[f, :, 1] = dy - self.global_shifts_px[f, 1]
        return out

    def to_json(self) -> dict[str, Any]:
        loc = None
        if self.local is not None:
            loc = {"ax": self.local.ax.tolist(), "phx": self.local.phx.tolist(),
                   "ay": self.local.ay.tolist(), "phy": self.local.phy.tolist(),
                   "scale": self.local.scale.tolist(),
                   "model": "u_f(y)=scale_f*sum_j ax_j cos(pi j y/ny+phx_j) along x; "
                            "v_f(x)=scale_f*sum_j ay_j cos(pi j x/nx+phy_j) along y; "
                            "rows slide first, then columns"}
        return {
            "n_frames": self.n_frames, "dose_per_frame_e_a2": self.dose_per_frame_e_a2,
            "global_shifts_px": self.global_shifts_px.tolist(), "local": loc,
            "hot_pixels_yx": self.hot_pixels.tolist(), "dead_pixels_yx": self.dead_pixels.tolist(),
            "gain_rms": self.gain_rms, "seed": self.seed,
            "micrograph": self.micrograph.to_json(), **self.extra,
        }


@dataclass
class Movie:
    """``frames``: raw counts ``(n, ny, nx)`` (uint8 when they fit, else uint16);
    ``gain``: gain reference (float32, multiply raw frames by it; all ones without gain);
    ``truth_image``: the noise-free, undamaged frame-0 specimen image in e/px per frame
    (gain-normalised), the target of motion-correction tests."""

    frames: Any
    gain: Any
    truth: MovieTruth
    truth_image: Any = None


def simulate_movie(
    shape: tuple[int, int] | int = 1024,
    n_frames: int = 40,
    *,
    pixel_size_a: float = 1.0,
    dose_per_frame_e_a2: float = 1.0,
    drift_px: float = 10.0,
    jitter_px: float = 0.05,
    local_px: float = 2.0,
    local_order: int = 3,
    dose_damage: bool = True,
    gain_rms: float = 0.05,
    n_hot: int = 20,
    n_dead: int = 20,
    drift: np.ndarray | None = None,
    detector: Detector | None = None,
    seed: int | None = 0,
    device: str | None = "cpu",
    **micrograph_kw,
) -> Movie:
    """Simulate a movie with ground truth.

    Parameters
    ----------
    shape : int or (ny, nx)
    n_frames : int
    pixel_size_a : float
    dose_per_frame_e_a2 : float
        Exposure per frame (e/A^2); the total is ``n_frames`` times this.
    drift_px : float
        Largest excursion of the global drift from the frame-0 position (pixels, jitter
        included; usually reached by the last frame); ``drift`` gives an explicit
        ``(n_frames, 2)`` x, y trajectory instead (frame 0 must be 0).
    jitter_px : float
        Per-frame random-walk jitter added to the smooth drift.
    local_px : float
        Peak amplitude of the local (non-rigid) deformation by the last frame (0 = none).
    local_order : int
        Cosine terms in each local slide (smoothness).
    dose_damage : bool
        Fade high resolutions with the accumulated exposure.
    gain_rms : float
        Relative rms of the detector's per-pixel sensitivity (0 = ideal detector).
    n_hot, n_dead : int
        Defective pixels (hot: stuck high; dead: always 0).
    detector : Detector, optional
        Use this detector (sensitivity and defects; e.g. one per session) instead of drawing
        one from ``gain_rms``, ``n_hot``, ``n_dead``.
    seed, device
        As for :func:`simulate_micrograph`; other keywords go to it (molecules, defocus_um,
        carbon, ...); its ``dose_e_a2`` is the movie's total exposure.

    Returns
    -------
    Movie
    """
    shape = (int(shape), int(shape)) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
    if n_frames < 1:
        raise ComputeError("a movie needs at least one frame")
    if dose_per_frame_e_a2 <= 0:
        raise ComputeError("dose per frame must be > 0")
    xp = be.get_xp(device)
    rng = np.random.default_rng(seed)
    ps = float(pixel_size_a)
    mic_seed = int(rng.integers(2**31))
    total = dose_per_frame_e_a2 * n_frames
    mic = simulate_micrograph(shape, pixel_size_a=ps, dose_e_a2=total, noise=False,
                              return_components=True, seed=mic_seed, device=device,
                              **micrograph_kw)
    voltage = mic.truth.ctf.voltage_kv
    A = mic.components.mean
    illum = mic.components.illumination
    ice = None
    if illum is not None:
        ice = (A / illum).astype(np.float32)
        if float(ice.max() - ice.min()) < 1e-6:
            ice = None  # uniform ice: nothing to move
    Fc = mic.components.contrast_ft
    ny, nx = shape

    if drift is not None:
        g = np.asarray(drift, dtype=np.float64).reshape(n_frames, 2)
    else:
        g = drift_trajectory(n_frames, rng, drift_px, jitter_px)
    local = None
    if local_px > 0 and n_frames > 1:
        k = int(local_order)
        ax = rng.normal(0, 1, k) / np.arange(1, k + 1)
        ay = rng.normal(0, 1, k) / np.arange(1, k + 1)
        ax *= local_px / max(np.abs(ax).sum(), 1e-9)
        ay *= local_px / max(np.abs(ay).sum(), 1e-9)
        f = np.arange(n_frames) / (n_frames - 1)
        scale = (1 - np.exp(-3 * f)) / (1 - np.exp(-3.0))
        local = LocalDeformation(shape, ax, rng.uniform(0, 2 * np.pi, k), ay,
                                 rng.uniform(0, 2 * np.pi, k), scale)

    # detector: sensitivity (pixel + column pattern), defects
    if detector is None:
        detector = make_detector(shape, rng, gain_rms, n_hot, n_dead)
    elif detector.shape != shape:
        raise ComputeError(f"detector is {detector.shape} but the movie is {shape}")
    s = detector.sensitivity
    hot, dead = detector.hot_pixels, detector.dead_pixels
    gain_rms = detector.gain_rms
    counts = np.float32(dose_per_frame_e_a2 * ps * ps)
    s_dev = xp.asarray(s)
    base = counts * A  # expected counts per frame without contrast

    max_expect = float(counts) * 3.0
    dtype = np.uint8 if max_expect < 60 else np.uint16
    top = np.iinfo(dtype).max
    hot_level = min(top, max(int(20 * float(counts)) + 50, 100))
    frames = xp.empty((n_frames,) + shape, dtype=dtype)

    ky = xp.fft.fftfreq(ny).astype(np.float32)
    kx = xp.fft.rfftfreq(nx).astype(np.float32)
    kyr = xp.fft.rfftfreq(ny).astype(np.float32)
    rows = np.arange(ny)
    cols = np.arange(nx)
    noise_rng = np.random.default_rng(rng.integers(2**63))
    bs = (base * s_dev).astype(np.float32)
    if dose_damage:
        # exp(-D_f / (2 Ne)) = e0 * q^f with constant dose per frame: one multiply per frame
        e0 = exposure_filter(shape, ps, 0.5 * dose_per_frame_e_a2, voltage, xp)
        q = exposure_filter(shape, ps, dose_per_frame_e_a2, voltage, xp)
        damp = e0
    for fr in range(n_frames):
        F = Fc * damp if dose_damage else Fc.copy()
        if dose_damage and fr + 1 < n_frames:
            damp = damp * q
        gx, gy = g[fr]
        if gx or gy:
            F *= xp.exp(-2j * np.pi * ky * np.float32(gy)).astype(np.complex64)[:, None]
            F *= xp.exp(-2j * np.pi * kx * np.float32(gx)).astype(np.complex64)[None, :]
        if local is None or fr == 0:
            C = be.irfft2(F, s=shape)
        else:
            # rows slide along x by u(y'), y' the row after the global shift (exact Fourier
            # shifts: inverse along y first, then a per-row phase along x)
            G = be.ifftn(F, axes=(0,))
            u = xp.asarray(local.u(rows, fr).astype(np.float32))
            G *= xp.exp(-2j * np.pi * u[:, None] * kx[None, :]).astype(np.complex64)
            C1 = be.irfftn(G, s=(nx,), axes=(1,))
            H = be.rfftn(C1, axes=(0,))
            v = xp.asarray(local.v(cols, fr).astype(np.float32))
            H *= xp.exp(-2j * np.pi * kyr[:, None] * v[None, :]).astype(np.complex64)
            C = be.irfftn(H, s=(ny,), axes=(0,))
        C += 1.0
        xp.clip(C, 0.02, None, out=C)
        if ice is None:
            C *= bs
        else:  # the ice moves with the specimen, the illumination does not
            C *= (counts * illum * s_dev).astype(np.float32)
            C *= _shift_field(ice, gy, gx) if (gx or gy) else ice
        fr_counts = poisson_counts(C, noise_rng, dtype=dtype)
        if len(hot):
            fr_counts[xp.asarray(hot[:, 0]), xp.asarray(hot[:, 1])] = hot_level
        if len(dead):
            fr_counts[xp.asarray(dead[:, 0]), xp.asarray(dead[:, 1])] = 0
        frames[fr] = fr_counts

    gain = detector.gain_reference
    truth_image = counts * A * xp.clip(1.0 + be.irfft2(Fc, s=shape), 0.02, None)
    truth = MovieTruth(
        micrograph=mic.truth, n_frames=int(n_frames),
        dose_per_frame_e_a2=float(dose_per_frame_e_a2), global_shifts_px=g, local=local,
        hot_pixels=hot, dead_pixels=dead, gain_rms=float(gain_rms), seed=seed,
        extra={"hot_level": int(hot_level), "dtype": np.dtype(dtype).name},
    )
    return Movie(frames=frames, gain=xp.asarray(gain), truth=truth,
                 truth_image=truth_image.astype(np.float32))
