from __future__ import annotations

import numpy as np
import pytest

from compute import ctf, fourier


def test_wavelength_300kv():
    assert ctf.electron_wavelength_a(300) == pytest.approx(0.019687, rel=1e-4)
    assert ctf.electron_wavelength_a(200) == pytest.approx(0.025079, rel=1e-4)


def test_ctf_positive_just_above_dc_for_underfocus():
    p = ctf.CtfParams(15000, 15000, 0, 300, 2.7, 0.1)
    k = np.array([1e-4, 2e-3])
    c = ctf.ctf_1d(k, p)
    assert c[0] > 0 and c[1] > 0


def test_first_zero_matches_formula():
    # without Cs and amplitude contrast the first zero is at k = 1/sqrt(lambda*df)
    p = ctf.CtfParams(20000, 20000, 0, 300, 0.0, 0.0)
    lam = ctf.electron_wavelength_a(300)
    k0 = 1 / np.sqrt(lam * 20000)
    k = np.linspace(0.2 * k0, 1.2 * k0, 20001)
    c = ctf.ctf_1d(k, p)
    first = k[np.argmax(np.sign(c) != np.sign(c[0]))]
    assert first == pytest.approx(k0, rel=1e-3)


def test_astigmatism_angle_convention():
    p = ctf.CtfParams(20000, 10000, 30.0, 300, 2.7, 0.1)
    # along the defocus angle the local defocus is U, perpendicular it is V
    lam = ctf.electron_wavelength_a(300)
    gu = ctf.gamma(np.array([np.cos(np.deg2rad(30)) * 0.05]), np.array([np.sin(np.deg2rad(30)) * 0.05]), p)
    pu = ctf.CtfParams(20000, 20000, 0, 300, 2.7, 0.1)
    assert gu[0] == pytest.approx(ctf.gamma(np.array([0.05]), np.array([0.0]), pu)[0], rel=1e-9)
    del lam


def test_fourier_crop_preserves_mean_and_low_frequencies(rng):
    img = fourier.lowpass(rng.standard_normal((64, 64)).astype(np.float32) + 3.0, 20.0, 1.0)
    small = fourier.fourier_crop(img, 32)
    assert small.shape == (32, 32)
    assert small.mean() == pytest.approx(img.mean(), rel=1e-4)
    back = fourier.fourier_pad(small, 64)
    np.testing.assert_allclose(back, img, atol=1e-3)


def test_frc_identical_is_one_and_noise_is_low(rng):
    a = rng.standard_normal((64, 64))
    b = rng.standard_normal((64, 64))
    assert np.allclose(fourier.frc(a, a)[1:], 1.0)
    assert abs(fourier.frc(a, b)[5:].mean()) < 0.1


def test_resolution_at_threshold():
    curve = np.array([1, 1, 0.9, 0.6, 0.3, 0.1, 0.0])
    r = fourier.resolution_at_threshold(curve, 12, 2.0, 0.5)
    # crossing between shell 3 (0.6) and 4 (0.3): s = 3 + 1/3
    assert r == pytest.approx(12 * 2.0 / (3 + 1 / 3))


def test_shift_image_roundtrip(rng):
    img = fourier.lowpass(rng.standard_normal((48, 48)), 8.0, 1.0)
    s = fourier.shift_image(fourier.shift_image(img, (2.5, -1.25)), (-2.5, 1.25))
    np.testing.assert_allclose(s, img, atol=1e-6)


def test_soft_mask():
    m = fourier.soft_mask((32, 32), 10, 4)
    assert m[16, 16] == 1.0 and m[0, 0] == 0.0 and 0 < m[16, 16 + 12] < 1
