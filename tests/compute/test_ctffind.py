"""CTF estimation against micrographs made with a known CTF (compute.ctf.apply_ctf)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from compute import backend as be
from compute import ctf, ctffind, fourier
from compute.errors import ComputeError

PX = 1.0


def _micrograph(rng, p: ctf.CtfParams, n=1024, snr=0.1):
    obj = fourier.lowpass(rng.standard_normal((n, n)).astype(np.float32), 2.5 * PX, PX)
    img = ctf.apply_ctf(obj, PX, p)
    img = img / img.std() * np.sqrt(snr)
    bg = ndimage.gaussian_filter(rng.standard_normal((n, n)).astype(np.float32), 4)
    return img + rng.standard_normal((n, n)).astype(np.float32) + 0.5 * bg / bg.std()


def _ok(fit, p):
    tol_u = max(0.005 * p.defocus_u_a, 50.0)
    tol_v = max(0.005 * p.defocus_v_a, 50.0)
    return abs(fit.defocus_u_a - p.defocus_u_a) <= tol_u and \
        abs(fit.defocus_v_a - p.defocus_v_a) <= tol_v


def test_defocus_and_astigmatism_over_the_range(rng):
    s = ctffind.CtfSearch(pixel_size_a=PX)
    good, n = 0, 8
    for i in range(n):
        mean = 5000 + 30000 * i / (n - 1)
        ast = rng.uniform(0, 1000)
        ang = rng.uniform(0, 180)
        p = ctf.CtfParams(mean + ast / 2, mean - ast / 2, ang, bfactor_a2=50)
        fit = ctffind.estimate_ctf(_micrograph(rng, p), s)
        good += _ok(fit, p)
        if ast >= 200:
            assert abs((fit.defocus_angle_deg - ang + 90) % 180 - 90) <= 5
        assert 0 < fit.figure_of_merit <= 1
    assert good == n  # >= 95 % of 8


def test_phase_shift_is_recovered(rng):
    s = ctffind.CtfSearch(pixel_size_a=PX, do_phase_shift=True, phase_min_deg=0,
                          phase_max_deg=180, phase_step_deg=10)
    p = ctf.CtfParams(8300, 8000, 40, phase_shift_deg=75.0, bfactor_a2=50)
    fit = ctffind.estimate_ctf(_micrograph(rng, p), s)
    assert abs((fit.phase_shift_deg - 75.0 + 90) % 180 - 90) <= 10
    assert _ok(fit, p)


def test_max_resolution_worsens_with_bfactor(rng):
    s = ctffind.CtfSearch(pixel_size_a=PX)
    res = []
    for b in (0.0, 150.0, 400.0):
        p = ctf.CtfParams(15200, 14800, 20, bfactor_a2=b)
        res.append(ctffind.estimate_ctf(_micrograph(np.random.default_rng(7), p), s)
                   .max_resolution_a)
    assert res[0] <= res[1] <= res[2] and res[2] > res[0] + 0.5, res


def test_tile_spectrum_halves_match_and_diagnostic(rng):
    img = rng.standard_normal((300, 400)).astype(np.float32)
    half = ctffind.tile_power_spectrum(img, 128)
    full = ctffind.tile_power_spectrum(img, 128, full=True)
    assert half.shape == (128, 65) and full.shape == (128, 128)
    assert np.allclose(ctffind.half_from_full(full), half)
    assert np.allclose(full[5, 100], full[-5, 28])  # Hermitian
    assert abs(half[1:, 1:].mean() / (img.var() * 128 * 128 * 0.9) - 1) < 0.2
    p = ctf.CtfParams(12000, 11800, 10)
    s = ctffind.CtfSearch(pixel_size_a=PX, box=512)
    ps = ctffind.tile_power_spectrum(_micrograph(rng, p), 512)
    fit = ctffind.estimate_ctf_from_spectrum(ps, s)
    d = ctffind.diagnostic_image(ps, s, fit)
    assert d.shape == (512, 512) and np.isfinite(d).all()


def test_bad_micrograph_is_refused(rng):
    img = rng.standard_normal((256, 256)).astype(np.float32)
    img[3, 3] = np.nan
    with pytest.raises(ComputeError, match="NaN"):
        ctffind.estimate_ctf(img, ctffind.CtfSearch(pixel_size_a=1.0, box=128))
    with pytest.raises(ComputeError, match="constant"):
        ctffind.estimate_ctf(np.zeros((256, 256), np.float32),
                             ctffind.CtfSearch(pixel_size_a=1.0, box=128))


@pytest.mark.gpu
def test_tile_spectrum_gpu_parity(rng):
    if not be.gpu_available():
        pytest.skip("no usable GPU")
    cp = be.get_xp("gpu")
    img = rng.standard_normal((512, 512)).astype(np.float32)
    a = ctffind.tile_power_spectrum(img, 128)
    b = be.to_numpy(ctffind.tile_power_spectrum(cp.asarray(img), 128))
    assert np.allclose(a, b, rtol=1e-3)
