"""Movies: drift truth recovered by cross-correlation, local deformation, dose fading,
counting statistics, gain and defects, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from compute.fourier import frc
from compute.simulate.movie import (
    critical_exposure,
    drift_trajectory,
    poisson_counts,
    simulate_movie,
)


def _xcorr_shift(a, b):
    """Shift (dx, dy) of ``a`` relative to ``b`` by phase-free cross-correlation with a
    parabolic sub-pixel peak."""
    A = np.fft.rfft2(a - a.mean())
    B = np.fft.rfft2(b - b.mean())
    cc = np.fft.fftshift(np.fft.irfft2(A * np.conj(B), s=a.shape))
    iy, ix = np.unravel_index(np.argmax(cc), cc.shape)

    def par(m, c, p):
        d = m - 2 * c + p
        return 0.0 if d == 0 else 0.5 * (m - p) / d

    sx = ix + par(cc[iy, ix - 1], cc[iy, ix], cc[iy, ix + 1]) - a.shape[1] // 2
    sy = iy + par(cc[iy - 1, ix], cc[iy, ix], cc[iy + 1, ix]) - a.shape[0] // 2
    return sx, sy


def test_poisson_counts_distribution():
    rng = np.random.default_rng(0)
    lam = np.full(200_000, 2.5, np.float32)
    k = poisson_counts(lam, rng)
    hist = np.bincount(k, minlength=10)[:10] / lam.size
    from scipy.stats import poisson

    np.testing.assert_allclose(hist, poisson.pmf(np.arange(10), 2.5), atol=3e-3)
    lam = rng.uniform(0.1, 5, 300_000).astype(np.float32)
    k = poisson_counts(lam, rng).astype(np.float64)
    assert abs((k - lam).mean()) < 0.01 and abs((k - lam).var() / lam.mean() - 1) < 0.02


def test_drift_trajectory_shape():
    g = drift_trajectory(30, np.random.default_rng(1), total_px=25.0, jitter_px=0.0)
    assert g.shape == (30, 2) and np.all(g[0] == 0)
    assert abs(np.hypot(*g.T).max() - 25.0) < 1e-6
    step = np.hypot(*np.diff(g, axis=0).T)
    assert step[:3].mean() > step[-5:].mean()  # fast start, slow glide


def test_drift_trajectory_largest_excursion_is_drift_px():
    # the old end-point scaling let a 40-frame path wander 195 px for total_px = 30
    for seed in range(100):
        g = drift_trajectory(40, np.random.default_rng(seed), total_px=30.0, jitter_px=0.05)
        assert abs(np.hypot(*g.T).max() - 30.0) < 1e-6, seed
        assert np.hypot(*g[-1]) > 15.0, seed  # it drifts, not wanders back


def test_ice_moves_with_the_specimen_illumination_does_not():
    kw = dict(pixel_size_a=1.0, dose_per_frame_e_a2=50.0, local_px=0.0, jitter_px=0.0,
              dose_damage=False, gain_rms=0.0, n_hot=0, n_dead=0, seed=2, thon_contrast=0.0,
              n_particles=0, ice_variation=3.0, gradient=0.0)
    mv = simulate_movie(256, 2, drift=np.array([[0.0, 0.0], [12.0, -7.0]]), **kw)
    from scipy import ndimage

    a, b = (ndimage.gaussian_filter(f.astype(np.float32), 3.0) for f in mv.frames)
    inner = (slice(30, -30), slice(30, -30))
    moved = ((b - ndimage.shift(a, (-7.0, 12.0), order=1))[inner] ** 2).mean()
    static = ((b - a)[inner] ** 2).mean()
    assert moved < 0.3 * static, (moved, static)


def test_global_drift_recovered_by_cross_correlation():
    mv = simulate_movie(384, 8, pixel_size_a=1.5, dose_per_frame_e_a2=3.0, drift_px=30.0,
                        local_px=0.0, gain_rms=0.0, n_hot=0, n_dead=0, seed=3,
                        molecules=["asym"], thon_contrast=1.0)
    ref = mv.truth_image
    err = []
    for f in range(8):
        sx, sy = _xcorr_shift(mv.frames[f].astype(np.float32), ref)
        err.append(np.hypot(sx - mv.truth.global_shifts_px[f, 0],
                            sy - mv.truth.global_shifts_px[f, 1]))
    assert max(err) < 0.25
    assert np.hypot(*mv.truth.global_shifts_px[-1]) > 25


def test_local_deformation_differs_between_patches_as_the_truth_says():
    mv = simulate_movie(512, 6, pixel_size_a=1.5, dose_per_frame_e_a2=4.0, drift_px=5.0,
                        local_px=4.0, dose_damage=False, gain_rms=0.0, n_hot=0, n_dead=0,
                        seed=5, thon_contrast=2.0)
    t = mv.truth
    last = mv.frames[-1].astype(np.float32)
    found, expect = [], []
    for cy in (112, 256, 400):
        for cx in (112, 256, 400):
            sl = (slice(cy - 96, cy + 96), slice(cx - 96, cx + 96))
            found.append(_xcorr_shift(last[sl], mv.truth_image[sl]))
            dx, dy = t.displacement(cx, cy, 5)
            expect.append((float(dx), float(dy)))
    found, expect = np.array(found), np.array(expect)
    assert np.abs(found - expect).max() < 0.6
    assert np.ptp(expect, axis=0).max() > 1.0  # patches really move differently
    loc = t.local_shifts([128, 384], [128, 384])
    assert loc.shape == (6, 2, 2) and np.all(loc[0] == 0)


def test_dose_fading_removes_high_resolution_signal():
    kw = dict(pixel_size_a=1.0, dose_per_frame_e_a2=5.0, drift_px=0.0, jitter_px=0.0,
              local_px=0.0, gain_rms=0.0, n_hot=0, n_dead=0, seed=2, thon_contrast=3.0,
              bfactor_a2=0.0)
    mv = simulate_movie(256, 12, **kw)
    early = mv.frames[:3].sum(axis=0).astype(np.float32)
    late = mv.frames[-3:].sum(axis=0).astype(np.float32)
    hi = slice(int(256 / 6), int(256 / 3))  # 6 A .. 3 A
    f_early = frc(early, mv.truth_image)[hi].mean()
    f_late = frc(late, mv.truth_image)[hi].mean()
    assert f_early > 2 * f_late
    nodmg = simulate_movie(256, 12, dose_damage=False, **kw)
    late2 = nodmg.frames[-3:].sum(axis=0).astype(np.float32)
    assert frc(late2, nodmg.truth_image)[hi].mean() > 0.8 * f_early
    # the critical exposure grows at low resolution
    assert critical_exposure(0.05) > critical_exposure(0.3) > 2.81


def test_counting_gain_and_defects():
    mv = simulate_movie(128, 200, pixel_size_a=1.0, dose_per_frame_e_a2=8.0, drift_px=0.0,
                        jitter_px=0.0, local_px=0.0, dose_damage=False, gain_rms=0.08,
                        n_hot=5, n_dead=5, seed=4, n_particles=0, thon_contrast=0.0,
                        gradient=0.0, ice_variation=0.0)
    t = mv.truth
    fr = mv.frames.astype(np.float64)
    assert mv.frames.dtype == np.uint8
    hy, hx = t.hot_pixels.T
    dy, dx = t.dead_pixels.T
    assert np.all(mv.frames[:, hy, hx] == t.extra["hot_level"])
    assert np.all(mv.frames[:, dy, dx] == 0)
    ok = np.ones((128, 128), bool)
    ok[hy, hx] = ok[dy, dx] = False
    mean = fr.mean(axis=0)
    var = fr.var(axis=0)
    assert abs(var[ok].mean() / mean[ok].mean() - 1) < 0.05  # Poisson
    # the gain reference flattens the sensitivity pattern
    corrected = mean * mv.gain
    assert corrected[ok].std() < 0.6 * mean[ok].std()
    assert np.corrcoef(mean[ok], 1 / mv.gain[ok])[0, 1] > 0.7
    assert abs(corrected[ok].mean() - 8.0) < 0.1


def test_movies_are_reproducible():
    a = simulate_movie(96, 3, seed=9, n_particles=2, molecules=["small"])
    b = simulate_movie(96, 3, seed=9, n_particles=2, molecules=["small"])
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.truth.global_shifts_px, b.truth.global_shifts_px)
    c = simulate_movie(96, 3, seed=10, n_particles=2, molecules=["small"])
    assert not np.array_equal(a.frames, c.frames)
    js = a.truth.to_json()
    assert len(js["global_shifts_px"]) == 3 and js["micrograph"]["shape"] == [96, 96]


@pytest.mark.parametrize("bad", [dict(n_frames=0), dict(dose_per_frame_e_a2=0.0)])
def test_bad_arguments(bad):
    from compute.errors import ComputeError

    with pytest.raises(ComputeError):
        simulate_movie(64, **{"n_frames": 2, **bad})
