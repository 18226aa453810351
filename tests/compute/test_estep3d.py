"""3D E-step: projection/back-projection adjointness and pose recovery against the truth."""

from __future__ import annotations

import numpy as np
import pytest

from compute.estep3d import Estep3D, offsets_grid
from compute.geometry import angular_distance_deg, random_rotations
from compute.simulate.molecules import density_map, molecule
from compute.simulate.particles import simulate_particles
from compute.vdam.estep2d import CtfBatch


def ctf_of(truth, n):
    c = truth.ctf
    return CtfBatch(c.defocus_u_a, c.defocus_v_a, c.defocus_angle_deg, np.full(n, c.voltage_kv),
                    np.full(n, c.cs_mm), np.full(n, c.amplitude_contrast), c.phase_shift_deg,
                    c.bfactor_a2)


def test_project_backproject_are_adjoint(rng):
    es = Estep3D(16, 5.0, 70.0)
    es.set_resolution(7)
    vol = rng.standard_normal((16, 16, 16)).astype(np.float32)
    st = es.store(vol)
    R = random_rotations(5, 2)
    P = es.project(st, R)
    y = (rng.standard_normal(P.shape) + 1j * rng.standard_normal(P.shape)).astype(np.complex64)
    d, w = es.new_grid()
    es.backproject(d, w, y, np.ones(P.shape, np.float32), R)
    lhs = np.vdot(y, P).real
    # <P s, y> = <s, P^T y> on the stored grid (the gather reads the same cells it splats)
    rhs = np.vdot(d.astype(np.complex64), st).real
    assert lhs == pytest.approx(rhs, rel=1e-3)


def test_projection_matches_simulated_images():
    box = 32
    stk = simulate_particles(60, ("asym",), box=box, snr=1e6, seed=3, max_shift_px=0.0,
                             apply_ctf=False)
    px = stk.truth.pixel_size_a
    es = Estep3D(box, px, box * px, do_ctf=False)
    es.set_resolution(box // 2 - 1)
    X = es.prepare_images(np.asarray(stk.images) * 0 + np.asarray(stk.images))
    vol = density_map(molecule("asym"), box, px)
    P = es.project(es.store(vol * es.mask3d), stk.truth.rotations())
    # the simulated images are scaled arbitrarily (noise sigma 1): compare correlations
    c = [abs(np.vdot(P[i], X[i])) / np.linalg.norm(P[i]) / np.linalg.norm(X[i])
         for i in range(60)]
    assert np.median(c) > 0.95


def test_search_recovers_poses_and_origins():
    box, n = 32, 240
    stk = simulate_particles(n, ("asym",), box=box, snr=2.0, seed=5, max_shift_px=2.0)
    px = stk.truth.pixel_size_a
    es = Estep3D(box, px, 0.9 * box * px)
    es.set_resolution(15)
    vol = density_map(molecule("asym"), box, px)
    X = es.prepare_images(stk.images)
    cv = es.ctf_values(ctf_of(stk.truth, n))
    s2 = np.full(box // 2 + 1, float(np.mean(np.abs(X) ** 2)))
    hyp, best = es.search([es.store(vol * es.mask3d)], X, cv, s2, np.zeros(1),
                          offsets_grid(3, 1), coarse_order=1, top=6, final_step_deg=3.0)
    err = angular_distance_deg(stk.truth.rotations(), best.rot)
    assert es.last_step_deg <= 3.0
    assert np.median(err) < 6.0
    # the small 'boot' is nearly two-fold symmetric at this size: a few land on the mate
    assert np.mean(err > 20) < 0.15
    true_origin = np.stack([stk.truth.origin_x_a, stk.truth.origin_y_a], 1) / px
    good = err < 20
    assert np.median(np.abs(best.origin_px[good] - true_origin[good])) <= 1.0
    assert (best.max_prob > 0).all() and (best.max_prob <= 1).all()
    assert hyp.weight.shape == hyp.particle.shape and (best.n_significant >= 1).all()


def test_search_picks_the_right_class():
    box, n = 32, 120
    stk = simulate_particles(n, ("asym", "d2"), box=box, snr=2.0, seed=6, max_shift_px=1.0)
    px = stk.truth.pixel_size_a
    es = Estep3D(box, px, 0.9 * box * px)
    es.set_resolution(10)
    vols = [density_map(molecule(m), box, px) for m in ("asym", "d2")]
    X = es.prepare_images(stk.images)
    cv = es.ctf_values(ctf_of(stk.truth, n))
    s2 = np.full(box // 2 + 1, float(np.mean(np.abs(X) ** 2)))
    _, best = es.search([es.store(v * es.mask3d) for v in vols], X, cv, s2,
                        np.log([0.5, 0.5]), offsets_grid(2, 1), coarse_order=1, top=4)
    truth = (np.asarray(stk.truth.molecule) == "d2").astype(int)
    assert np.mean(best.klass == truth) > 0.95


def test_backprojection_reconstructs_the_truth():
    box, n = 32, 600
    stk = simulate_particles(n, ("asym",), box=box, snr=1.0, seed=7, max_shift_px=0.0)
    px = stk.truth.pixel_size_a
    es = Estep3D(box, px, 0.9 * box * px)
    es.set_resolution(box // 2 - 1)
    X = es.prepare_images(stk.images)
    cv = es.ctf_values(ctf_of(stk.truth, n))
    from compute.estep3d import Hypotheses

    hyp = Hypotheses(particle=np.arange(n), klass=np.zeros(n, int), rot=stk.truth.rotations(),
                     offset=np.zeros((n, 2)), weight=np.ones(n))
    grids = [[es.new_grid()], [es.new_grid()]]
    s2 = np.ones(box // 2 + 1)
    es.accumulate(grids, hyp, X, cv, s2, np.ones(n, int), residual=False)
    d, w = grids[0][0]
    rec = es.grid_to_volume(d, w, regulariser=0.05 * float(w[w > 0].mean()))
    vol = density_map(molecule("asym"), box, px)
    m = es.mask3d
    assert np.corrcoef((rec * m).ravel(), (vol * m).ravel())[0, 1] > 0.9
