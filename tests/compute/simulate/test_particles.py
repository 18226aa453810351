"""Particle stacks: CTF, SNR, junk and ground truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from compute.ctf import apply_ctf, ctf_2d
from compute.errors import ComputeError
from compute.fourier import lowpass
from compute.simulate.molecules import density_map, molecule
from compute.simulate.particles import (
    JUNK_KINDS,
    ctf_batch,
    draw_ctf,
    simulate_particles,
)
from compute.simulate.project import Projector


def test_ctf_batch_is_compute_ctf():
    rng = np.random.default_rng(3)
    c = draw_ctf(rng, 4, defocus_um=(0.5, 3.5), astigmatism_a=(0, 1000),
                 phase_shift_deg=(0, 90), bfactor_a2=(0, 150), voltage_kv=200, cs_mm=1.4,
                 amplitude_contrast=0.07)
    batch = ctf_batch((48, 48), 1.3, c)
    for i in range(4):
        ref = ctf_2d((48, 48), 1.3, c.params(i), rfft=True)
        np.testing.assert_allclose(batch[i], ref, atol=2e-5)
    assert (c.defocus_u_a >= c.defocus_v_a).all()


def test_seeded_and_reproducible():
    a = simulate_particles(40, ["asym", "d2"], box=32, junk_fraction=0.5, seed=5)
    b = simulate_particles(40, ["asym", "d2"], box=32, junk_fraction=0.5, seed=5)
    c = simulate_particles(40, ["asym", "d2"], box=32, junk_fraction=0.5, seed=6)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.truth.kind, b.truth.kind)
    assert not np.allclose(a.images, c.images)


@pytest.mark.parametrize("snr", [0.05, 1.0])
def test_snr_is_the_one_asked_for(snr):
    s = simulate_particles(300, ["c4ring"], box=48, snr=snr, return_clean=True, seed=2)
    noise = s.images - s.clean
    assert abs(noise.std() - 1.0) < 0.01 and abs(noise.mean()) < 0.01
    measured = np.var(s.clean, axis=(1, 2)).mean() / noise.var()
    assert abs(measured / snr - 1) < 0.03
    # white: the noise spectrum is flat
    p = np.abs(np.fft.rfft2(noise)) ** 2
    assert abs(p[:, :8, :8].mean() / p[:, 16:24, 16:24].mean() - 1) < 0.1


def test_clean_images_are_ctf_times_projection_of_truth():
    box, ps = 48, 2.5
    kw = dict(box=box, pixel_size_a=ps, snr=np.inf, return_clean=True, seed=9,
              defocus_um=(1.0, 3.0), astigmatism_a=(0, 800), phase_shift_deg=(0, 60),
              bfactor_a2=(0, 100))
    plain = simulate_particles(6, ["asym"], apply_ctf=False, **kw)
    withc = simulate_particles(6, ["asym"], **kw)
    t = plain.truth
    # the plain projections are the projector's output at the true angles and origins
    P = Projector(density_map(molecule("asym"), box, ps))
    ref = P.project(t.rotations(), np.column_stack([t.origin_x_a, t.origin_y_a]) / ps)
    np.testing.assert_allclose(plain.clean, ref, atol=1e-3 * ref.max())
    for i in range(6):
        expect = apply_ctf(plain.clean[i], ps, withc.truth.ctf.params(i))
        np.testing.assert_allclose(withc.clean[i], expect, atol=1e-3 * np.abs(expect).max())


def test_protein_is_white():
    """Below the first CTF zero the image correlates positively with the projection."""
    kw = dict(box=48, pixel_size_a=2.5, snr=np.inf, return_clean=True, seed=1,
              defocus_um=(1.5, 2.5), bfactor_a2=100)
    s = simulate_particles(50, ["d2"], **kw)
    p = simulate_particles(50, ["d2"], apply_ctf=False, **kw)
    assert p.clean.sum() > 0
    low = lowpass(s.clean, 45.0, 2.5)
    ref = lowpass(p.clean, 45.0, 2.5)
    cc = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(low, ref)]
    assert min(cc) > 0.8


def test_junk_kinds_and_truth_record():
    s = simulate_particles(140, ["asym", "c4ring"], box=48, junk_fraction=0.5, snr=np.inf,
                           return_clean=True, seed=4, apply_ctf=False)
    t = s.truth
    assert set(t.kind) == {"particle", *JUNK_KINDS}
    assert (t.kind != "particle").sum() == 70
    e = np.var(s.clean, axis=(1, 2))
    good = t.kind == "particle"
    assert np.all(e[t.kind == "empty"] == 0)
    assert np.median(e[t.kind == "ice"]) > 4 * np.median(e[good])
    assert np.isnan(t.rot_deg[np.isin(t.kind, ["ice", "carbon", "empty", "aggregate"])]).all()
    assert np.isfinite(t.rot_deg[good]).all()
    assert (t.molecule[t.kind == "ice"] == "").all()
    assert set(t.molecule[good]) == {"asym", "c4ring"}
    # off-centre particles: their mass sits >= 25 % of the box from the centre
    for i in np.nonzero(t.kind == "offcentre")[0]:
        cy, cx = ndimage.center_of_mass(np.clip(s.clean[i], 0, None))
        r = np.hypot(t.origin_x_a[i], t.origin_y_a[i]) / t.pixel_size_a
        assert r >= 0.25 * 48 - 1e-6
        assert abs(cx - (24 - t.origin_x_a[i] / t.pixel_size_a)) < 8
    # aggregates hold several copies: more mass than a single particle
    assert np.median(s.clean[t.kind == "aggregate"].sum(axis=(1, 2))) > 2.5 * np.median(
        s.clean[good].sum(axis=(1, 2)))
    tab = t.table()
    assert len(tab["rlnDefocusU"]) == 140 and tab["scsKind"][0] == t.kind[0]
    js = t.to_json()
    assert js["particles"]["rlnAngleRot"][int(np.nonzero(t.kind == "ice")[0][0])] is None


def test_groups_share_ctf_and_user_maps_work():
    vol = density_map(molecule("small"), 32, 2.0)
    s = simulate_particles(10, [("mine", vol)], box=32, pixel_size_a=2.0, group_size=4, seed=3)
    t = s.truth
    assert list(t.micrograph) == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert len(set(t.ctf.defocus_u_a[:4])) == 1 and t.ctf.defocus_u_a[0] != t.ctf.defocus_u_a[4]
    assert set(t.molecule) == {"mine"}
    with pytest.raises(ComputeError):
        simulate_particles(3, [("mine", vol[:30, :30, :30])], box=32, pixel_size_a=2.0)
    with pytest.raises(ComputeError):
        simulate_particles(3, ["asym"], junk_kinds=["lava"], junk_fraction=0.5)


def test_given_orientations_and_origins_are_kept():
    eul = np.array([[10.0, 40, 70], [100, 120, -30]])
    s = simulate_particles(2, ["asym"], box=32, rotations=eul, origins_a=[[3, -4], [0, 5]],
                           seed=0)
    np.testing.assert_allclose(np.column_stack([s.truth.rot_deg, s.truth.tilt_deg,
                                                s.truth.psi_deg]), eul, atol=1e-9)
    np.testing.assert_allclose(s.truth.origin_y_a, [-4, 5])


def test_structural_noise_carries_the_ctf_and_keeps_unit_variance():
    kw = dict(box=64, pixel_size_a=2.0, snr=0.1, return_clean=True, seed=6,
              defocus_um=2.0, astigmatism_a=0.0, bfactor_a2=0.0)
    s = simulate_particles(200, ["d2"], structural_noise=0.6, **kw)
    noise = s.images - s.clean
    assert abs(noise.var() - 1.0) < 0.02
    p = (np.abs(np.fft.rfft2(noise)) ** 2).mean(axis=0)
    c2 = ctf_2d((64, 64), 2.0, s.truth.ctf.params(0), rfft=True) ** 2
    assert np.corrcoef(p.ravel(), c2.ravel())[0, 1] > 0.5
    white = simulate_particles(200, ["d2"], **kw)
    pw = (np.abs(np.fft.rfft2(white.images - white.clean)) ** 2).mean(axis=0)
    assert abs(np.corrcoef(pw.ravel(), c2.ravel())[0, 1]) < 0.2
