"""Extraction: box sizes, integer centring, re-scaling, normalisation, dust, dropped picks."""

from __future__ import annotations

import numpy as np
import pytest

from compute import backend as be
from compute.errors import ComputeError
from compute.extract import (
    box_sizes,
    extract_particles,
    inside_mask,
    normalise_background,
    rescale_stack,
)
from compute.fourier import radius_grid
from compute.simulate.micrograph import simulate_micrograph
from compute.simulate.molecules import Molecule, molecule


def globular(diameter_a: float) -> Molecule:
    m = molecule("ribosome")
    f = diameter_a / m.diameter_a
    return Molecule(f"globular{diameter_a:g}", m.coords_a * f, m.weights * f**3, m.sigma_a * f)


def test_box_sizes_follow_relion_it():
    b = box_sizes(180.0, 1.0)           # 270 px box; 96 px is the first below 3.75 A/px
    assert (b.box_px, b.small_box_px) == (270, 96) and b.rescale
    assert b.small_pixel_size_a == pytest.approx(270 / 96)
    assert b.mask_diameter_a == pytest.approx(198.0)
    b = box_sizes(130.0, 0.83)          # 130/0.83*1.5 = 234.9 -> 236 (even); 64 px: 3.07 A
    assert (b.box_px, b.small_box_px) == (236, 64)
    b = box_sizes(100.0, 4.0)           # 37.5 -> 38 px, already coarse: no down-scaling
    assert (b.box_px, b.small_box_px) == (38, 38) and not b.rescale
    with pytest.raises(ComputeError):
        box_sizes(-1.0, 1.0)


def _gauss_mic(n, xs, ys, sigma=3.0, amp=-5.0):
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    img = np.zeros((n, n))
    for x, y in zip(xs, ys):
        img += amp * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return img.astype(np.float32)


def _centroid(img):
    w = np.clip(img, 0, None)
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    return (w * yy).sum() / w.sum(), (w * xx).sum() / w.sum()


def test_particle_is_centred_on_box_centre_after_rescaling(rng):
    n, box, small = 512, 96, 48
    gy, gx = np.mgrid[0:3, 0:4]
    xs = 70 + 120 * gx.ravel() + rng.uniform(-0.5, 0.5, 12)   # boxes never overlap a neighbour
    ys = 70 + 150 * gy.ravel() + rng.uniform(-0.5, 0.5, 12)
    mic = _gauss_mic(n, xs, ys, sigma=4.0)
    res = extract_particles(mic, xs, ys, box, 1.0, rescale_box=small, normalise=False)
    assert res.kept.all() and res.stack.shape == (12, small, small)
    assert res.pixel_size_a == pytest.approx(2.0)
    for img, x, y in zip(res.stack, xs, ys):
        cy, cx = _centroid(img)  # inverted: protein white
        # integer centring puts round(x) on pixel box//2; the sub-pixel rest stays
        ey = small // 2 + (y - np.floor(y + 0.5)) * small / box
        ex = small // 2 + (x - np.floor(x + 0.5)) * small / box
        assert abs(cy - ey) < 0.25 and abs(cx - ex) < 0.25
        assert abs(cy - small // 2) < 1.0 and abs(cx - small // 2) < 1.0


def test_simulated_particles_normalised_and_centred():
    d, px, n = 180.0, 2.0, 1536
    kw = dict(pixel_size_a=px, molecules=[globular(d)], n_particles=30, seed=4,
              min_distance_a=2.2 * d)  # no neighbour inside a box
    mg = simulate_micrograph(n, **kw)
    t = mg.truth.particles
    b = box_sizes(d, px)                      # 136 px, re-scaled to 96 px (2.83 A/px)
    assert b.rescale
    res = extract_particles(mg.image, t["x_px"], t["y_px"], b.box_px, px,
                            rescale_box=b.small_box_px)
    stack = res.stack
    assert len(stack) == int(res.kept.sum()) >= 10
    r = radius_grid(stack.shape[1:])
    outside = r > (d / 2) / res.pixel_size_a
    bg = stack[:, outside]
    assert abs(bg.mean()) < 0.05
    assert abs(bg.std() - 1.0) < 0.05

    # centring: on the noise-free specimen (no ice texture, weak defocus, a phase plate so
    # that the CTF is ~1 at low frequency) the centre of mass of each particle (the
    # molecule's centre of mass is the volume centre the simulator projects onto the true
    # coordinate) lies on the box centre
    clean = simulate_micrograph(n, noise=False, thon_contrast=0.0, ice_variation=0.0,
                                gradient=0.0, defocus_um=0.5, astigmatism_a=0.0,
                                phase_shift_deg=90.0, **kw)
    tc = clean.truth.particles
    res = extract_particles(clean.image, tc["x_px"], tc["y_px"], b.box_px, px,
                            rescale_box=b.small_box_px)
    assert len(res.stack) >= 10
    inside = r <= 0.75 * b.small_box_px / 2
    c = b.small_box_px // 2
    yy, xx = np.mgrid[0:b.small_box_px, 0:b.small_box_px]
    offs = []
    for img in res.stack:
        w = np.where(inside, img, 0.0)
        offs.append(((w * yy).sum() / w.sum() - c, (w * xx).sum() / w.sum() - c))
    offs = np.array(offs)
    # protein is white after extraction
    assert np.mean([img[inside].mean() for img in res.stack]) > 0
    err = np.hypot(offs[:, 0], offs[:, 1])
    assert err.max() < 1.0, err.round(2).tolist()


def test_picks_whose_box_leaves_the_micrograph_are_dropped():
    mic = np.zeros((200, 300), np.float32)
    xs = np.array([50.0, 10.0, 290.0, 150.0, 150.0])
    ys = np.array([50.0, 100.0, 100.0, 5.0, 160.0])
    keep = inside_mask(xs, ys, 64, mic.shape)
    assert keep.tolist() == [True, False, False, False, True]
    res = extract_particles(mic + np.random.default_rng(0).normal(size=mic.shape).astype(
        np.float32), xs, ys, 64, 1.0)
    assert res.n_dropped == 3 and res.stack.shape == (2, 64, 64)


def test_normalisation_removes_ramp_and_dust(rng):
    n = 64
    yy, xx = np.mgrid[0:n, 0:n]
    imgs = rng.normal(5.0, 3.0, (4, n, n)).astype(np.float32) + (0.2 * xx + 0.1 * yy)
    imgs[:, 2, 3] = 500.0     # white dust in the background
    imgs[:, 60, 5] = -500.0   # black dust
    out = normalise_background(imgs, 20.0, white_dust=5.0, black_dust=5.0)
    bg = radius_grid((n, n)) > 20.0
    assert np.abs(out[:, bg].mean(axis=1)).max() < 1e-4
    assert np.abs(out[:, bg].std(axis=1) - 1).max() < 1e-4
    assert np.abs(out).max() < 8.0
    kept = normalise_background(imgs, 20.0)
    assert kept.max() > 20.0 and kept.min() < -20.0


def test_rescale_and_errors():
    s = np.random.default_rng(1).normal(size=(3, 64, 64)).astype(np.float32)
    assert rescale_stack(s, 32).shape == (3, 32, 32)
    assert rescale_stack(s, 64) is s
    with pytest.raises(ComputeError):
        rescale_stack(s, 33)
    with pytest.raises(ComputeError, match="even"):
        extract_particles(s[0], [32], [32], 31, 1.0)
    with pytest.raises(ComputeError, match="larger than the micrograph"):
        extract_particles(s[0], [32], [32], 128, 1.0)
    with pytest.raises(ComputeError, match="background"):
        normalise_background(s, 100.0)


def test_empty_pick_list_gives_empty_stack():
    mic = np.zeros((128, 128), np.float32)
    res = extract_particles(mic, [], [], 32, 1.0, rescale_box=16)
    assert res.stack.shape == (0, 16, 16) and res.n_dropped == 0


@pytest.mark.gpu
def test_gpu_matches_cpu(rng):
    if not be.gpu_available():
        pytest.skip("no usable GPU")
    mic = rng.normal(size=(512, 512)).astype(np.float32)
    xs, ys = rng.uniform(60, 450, 10), rng.uniform(60, 450, 10)
    cpu = extract_particles(mic, xs, ys, 96, 1.0, rescale_box=48)
    gpu = extract_particles(be.to_device(mic, "gpu"), xs, ys, 96, 1.0, rescale_box=48)
    np.testing.assert_allclose(be.to_numpy(gpu.stack), cpu.stack, atol=1e-3)
