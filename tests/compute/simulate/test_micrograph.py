"""Micrographs: particle positions, dark protein, CTF truth, carbon, noise, seeds."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from compute.ctf import ctf_2d
from compute.fourier import radial_average, radial_index
from compute.simulate.micrograph import interaction_constant, simulate_micrograph
from compute.simulate.molecules import density_map, molecule

QUIET = dict(thon_contrast=0.0, gradient=0.0, ice_variation=0.0, noise=False,
             return_expected=True, return_components=True)


def test_interaction_constant_300kv():
    assert abs(interaction_constant(300.0) - 6.53e-4) < 0.05e-4


def test_particles_sit_at_their_true_coordinates():
    # phase plate at 90 deg, ~no defocus and no Cs: CTF ~ 1, so C = -2 phi (a projection)
    user_map = density_map(molecule("small"), 36, 2.0)  # a user map and a built-in, mixed
    m = simulate_micrograph(384, pixel_size_a=2.0, molecules=["small", ("mine", user_map)],
                            n_particles=12,
                            defocus_um=0.0, astigmatism_a=0.0, phase_shift_deg=90.0,
                            cs_mm=0.0, bfactor_a2=0.0, amplitude_contrast=0.0, seed=2, **QUIET)
    C = np.fft.irfft2(m.components.contrast_ft, s=(384, 384))
    p = m.truth.particles
    assert len(p["x_px"]) >= 8 and set(p["molecule"]) == {"small", "mine"}
    phi = np.clip(-C, 0, None)
    for x, y in zip(p["x_px"], p["y_px"]):
        x0, y0 = int(round(x)) - 14, int(round(y)) - 14
        win = phi[y0:y0 + 29, x0:x0 + 29]
        cy, cx = ndimage.center_of_mass(win)
        # the molecule's centre of mass is at the origin of its frame
        assert abs(cx + x0 - x) < 0.15 and abs(cy + y0 - y) < 0.15


def test_protein_is_dark_and_defocus_is_in_the_spectrum():
    m = simulate_micrograph(1024, pixel_size_a=1.2, molecules=["asym"], seed=5,
                            defocus_um=1.8, astigmatism_a=0.0, dose_e_a2=60.0, gradient=0.0,
                            ice_variation=0.0)
    t = m.truth
    lp = ndimage.uniform_filter(m.image, 30)
    yy, xx = np.round(t.particles["y_px"]).astype(int), np.round(t.particles["x_px"]).astype(int)
    assert lp[yy, xx].mean() < lp.mean() - 2 * lp.std()
    # averaged tile spectrum correlates best with the true defocus
    tiles = [m.image[i:i + 256, j:j + 256] for i in range(0, 1024, 256)
             for j in range(0, 1024, 256)]
    ps = np.mean([np.abs(np.fft.fft2(x - x.mean())) ** 2 for x in tiles], axis=0)
    r = radial_index((256, 256))
    spec = radial_average(ps, r, 129)[20:110]
    spec = spec - ndimage.uniform_filter1d(spec, 15)
    score = {}
    for df in (0.9, 1.0, 1.1):
        c = ctf_2d((256, 256), 1.2, t.ctf.with_(defocus_u_a=t.ctf.defocus_u_a * df,
                                                   defocus_v_a=t.ctf.defocus_v_a * df))
        model = radial_average(c.astype(np.float64) ** 2, r, 129)[20:110]
        score[df] = np.corrcoef(spec, model - ndimage.uniform_filter1d(model, 15))[0, 1]
    assert score[1.0] > 0.5 and score[1.0] > score[0.9] and score[1.0] > score[1.1]


def test_carbon_blobs_aggregates_and_seed():
    kw = dict(pixel_size_a=2.0, carbon=True, n_aggregates=2, n_ice_blobs=1, seed=8)
    m = simulate_micrograph(512, **kw)
    t = m.truth
    cm = t.carbon.mask((512, 512))
    assert 0.05 < cm.mean() < 0.95
    assert m.image[cm].mean() < m.image[~cm].mean()
    singles = t.single_particles()
    xi = np.round(t.particles["x_px"][singles]).astype(int)
    yi = np.round(t.particles["y_px"][singles]).astype(int)
    assert not cm[yi, xi].any()
    agg = t.particles["kind"] == "aggregate"
    assert agg.sum() >= 8 and set(t.particles["group"][agg]) == {0, 1}
    bx, by, br = t.ice_blobs[0]
    yy, xx = np.mgrid[0:512, 0:512]
    inside = (xx - bx) ** 2 + (yy - by) ** 2 < (0.7 * br) ** 2
    if inside.any():
        assert m.image[inside].mean() < m.image[~inside & ~cm].mean()
    again = simulate_micrograph(512, **kw)
    np.testing.assert_array_equal(m.image, again.image)
    js = t.to_json()
    assert js["ctf"]["defocus_u_a"] == t.ctf.defocus_u_a and len(js["particles"]["x_px"]) == len(
        t.particles["x_px"])


def test_counting_noise_is_poisson():
    m = simulate_micrograph(256, pixel_size_a=1.0, n_particles=0, thon_contrast=0.0,
                            gradient=0.0, ice_variation=0.0, dose_e_a2=30.0, seed=1)
    assert abs(m.image.mean() - 30.0) < 0.2
    assert abs(m.image.var() / m.image.mean() - 1) < 0.05
    assert np.array_equal(m.image, np.round(m.image))
