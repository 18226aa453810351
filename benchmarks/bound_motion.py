"""How well *could* the global trajectory of a simulated movie be measured? (issue 5)

Issue 5 asks for a global trajectory RMS error <= 0.1 px on the 4096² x 40-frame benchmark
movies (``bench_motion.py``); ``compute.motion`` gets 0.10-0.14 px. This script measures what
three estimators that know more than any real aligner can reach on the same cached movies, so
the pipeline's figure can be read against the information in the data:

1. **oracle**: every frame cross-correlated with the *true, noise-free image* (dose-filtered
   like that frame: the matched filter for Poisson noise), sub-pixel peak by Newton steps on
   the Fourier-domain correlation, then the same trajectory smoother as the pipeline
   (:func:`compute.motion.smooth_trajectory`). Also prints the Cramér-Rao bound per axis of
   one frame's shift with the image known (Fisher information of Poisson counts).
2. **semi-oracle, radial**: every frame against the sum of the *other* frames, each of them
   placed with its *true* shift (a perfectly aligned reference, which no aligner has), with
   the weight that maximises the correlation's signal-to-noise ratio for the true radial
   spectrum of the specimen. Under a Gaussian image prior with that spectrum this is the
   marginal-likelihood estimate of the frame's shift given all the others, i.e. the best an
   "align each frame to the sum of the others" method (MotionCor2, RELION, this pipeline) can
   do. Then the same smoother.
3. **semi-oracle, per frequency**: as 2 with the periodogram of the true image at every
   frequency instead of its radial average (knowledge of the specimen's exact spectrum,
   Thon rings and astigmatism included, that no estimate from the data gives).

Hot/dead pixels are found from the total and set to the mean, the frames are gain-corrected
with the movie's gain; the error is measured after removing the best constant offset, as in
``bench_motion.py``.

Run (movies are simulated and cached by ``bench_motion.py``'s ``make_movie``; about 2.5 min
and 3.5 GB per movie on one core):
``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bound_motion.py --seed 2 [--jitter 0.05]
[--dose 1] [--frames 40] [--size 4096]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import scipy.fft as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_motion import make_movie, rms  # noqa: E402

from compute import motion  # noqa: E402
from compute.simulate.movie import exposure_filter  # noqa: E402


class Grid:
    """rfft2 frequency grid of an (ny, nx) frame."""

    def __init__(self, ny: int, nx: int) -> None:
        self.shape = (ny, nx)
        self.ky = sf.fftfreq(ny).astype(np.float32)[:, None]
        self.kx = sf.rfftfreq(nx).astype(np.float32)[None, :]
        self.k = np.sqrt(self.ky ** 2 + self.kx ** 2)
        # weight of each rfft column in a full-plane sum (DC and Nyquist columns once)
        cw = np.full(self.kx.shape, 2.0, np.float32)
        cw[0, 0] = 1.0
        if nx % 2 == 0:
            cw[0, -1] = 1.0
        self.colw = np.broadcast_to(cw, self.k.shape)
        self.lowcut = self.k * nx >= 2.0

    def ramp(self, s) -> np.ndarray:
        """exp(+2 pi i k.s): moves content at position s back to the origin."""
        return np.exp(2j * np.pi * (self.ky * s[0] + self.kx * s[1])).astype(np.complex64)

    def radial_mean(self, a) -> np.ndarray:
        ny, nx = self.shape
        rb = np.minimum((self.k * nx).astype(np.int64), nx // 2)
        num = np.bincount(rb.ravel(), (a * self.colw).ravel(), nx // 2 + 1)
        den = np.bincount(rb.ravel(), self.colw.ravel(), nx // 2 + 1)
        return (num / np.maximum(den, 1e-12))[rb].astype(np.float32)


def peak_shift(P, g: Grid, guess, search: int = 6, n_iter: int = 10) -> np.ndarray:
    """Maximum (y, x) of the correlation whose rfft is ``P``: integer peak within ``search``
    px of ``guess``, then Newton steps on f(s) = sum Re(P e^{2 pi i k.s}) (exact sub-pixel)."""
    ny, nx = g.shape
    c = sf.irfft2(P, s=g.shape, workers=1)
    gy, gx = int(round(guess[0])), int(round(guess[1]))
    iy = (np.arange(gy - search, gy + search + 1) % ny)[:, None]
    ix = (np.arange(gx - search, gx + search + 1) % nx)[None, :]
    j = np.unravel_index(np.argmax(c[iy, ix]), (2 * search + 1,) * 2)
    s = np.array([gy - search + j[0], gx - search + j[1]], float)
    a = 2.0 * np.pi
    for _ in range(n_iter):
        Q = P * g.ramp(s) * g.colw
        grad = -a * np.array([(g.ky * Q.imag).sum(), (g.kx * Q.imag).sum()])
        hyy = -(a * a * g.ky * g.ky * Q.real).sum()
        hxx = -(a * a * g.kx * g.kx * Q.real).sum()
        hxy = -(a * a * g.ky * g.kx * Q.real).sum()
        step = np.clip(-np.linalg.solve([[hyy, hxy], [hxy, hxx]], grad), -0.5, 0.5)
        s += step
        if np.abs(step).max() < 1e-5:
            break
    return s


def bounds(m: dict, dose: float) -> dict:
    """The three estimators' trajectories (y, x) px and the per-frame Cramér-Rao bound."""
    frames, gain, shifts, truth = m["frames"], m["gain"], m["shifts"], m["truth"]
    px = float(m["px"])
    n, ny, nx = frames.shape
    g = Grid(ny, nx)
    tot = frames.sum(0, dtype=np.float32)
    bad = (tot > 4 * np.median(tot)) | (tot == 0)
    e0 = exposure_filter((ny, nx), px, 0.5 * dose)
    q = exposure_filter((ny, nx), px, dose)
    T = sf.rfft2(truth - truth.mean(), workers=1)
    F, damp, d = [], [], e0.copy()
    oracle, crb = [], []
    for i in range(n):
        fr = frames[i].astype(np.float32) * gain
        fr[bad] = fr[~bad].mean()
        Fi = (sf.rfft2(fr - fr.mean(), workers=1) * g.lowcut).astype(np.complex64)
        F.append(Fi)
        damp.append(d.copy())
        Ti = T * d
        # Cramér-Rao: Fisher information of Poisson counts with mean ~ truth for a shift
        info = [float((sf.irfft2(2j * np.pi * kk * Ti, s=g.shape, workers=1) ** 2 / truth).sum())
                for kk in (g.ky, g.kx)]
        crb.append(1.0 / np.sqrt(info))
        oracle.append(peak_shift(Fi * np.conj(Ti * g.lowcut), g, shifts[i]))
        d = d * q
    noise = float(truth.mean()) * ny * nx          # Poisson noise power per Fourier coefficient
    power = (np.abs(T) ** 2).astype(np.float32)
    dsum = sum(damp)
    S = sum(Fi * g.ramp(s) for Fi, s in zip(F, shifts))

    def weight(i, p):
        # mean / variance of the cross power of frame i with the perfectly aligned sum of
        # the others (signal q_i q_R |T|², noise terms N q_R² P + q_i² P (n-1) N + (n-1) N²)
        di, dr = damp[i], dsum - damp[i]
        return di * dr * p / (noise * dr * dr * p + di * di * p * (n - 1) * noise
                              + (n - 1) * noise * noise)

    out = {"oracle": np.array(oracle), "crb": np.array(crb)}
    for name, p in (("radial", g.radial_mean(power)), ("per-frequency", power)):
        est = []
        for i in range(n):
            ref = S - F[i] * g.ramp(shifts[i])
            est.append(peak_shift(F[i] * np.conj(ref) * weight(i, p), g, shifts[i]))
        out[name] = np.array(est)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dose", type=float, default=1.0)
    ap.add_argument("--jitter", type=float, default=0.05)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/scopeside-bench"))
    a = ap.parse_args()
    t0 = time.monotonic()
    m = make_movie(a.size, a.frames, a.cache, a.seed, 0.0, a.dose, a.jitter)
    res = bounds(m, a.dose)
    crb = res["crb"].mean(1)
    n = len(crb)
    print(f"movie A seed {a.seed}: {a.size}² x {n} frames, {a.dose:g} e/A^2/frame, jitter "
          f"{a.jitter:g} px/frame; load average {os.getloadavg()[0]:.1f}")
    print("Cramér-Rao bound per axis, image known (px), frames 0 / 10 / 20 / 30 / last: "
          + " / ".join(f"{crb[i]:.3f}" for i in (0, 10, 20, 30, n - 1)))
    print(f"{'estimator':<34}{'raw RMS px':>12}{'smoothed RMS px':>17}")
    for key, label in (("oracle", "oracle (true image)"),
                       ("radial", "semi-oracle, radial spectrum"),
                       ("per-frequency", "semi-oracle, per-frequency spectrum")):
        est = res[key]
        sm = motion.smooth_trajectory(est - est[0], sigma=res["crb"]) + est[0]
        print(f"{label:<34}{rms(est, m['shifts'])[1]:12.3f}{rms(sm, m['shifts'])[1]:17.3f}")
    print(f"{time.monotonic() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
