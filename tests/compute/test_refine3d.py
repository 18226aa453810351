"""Gold-standard refinement on simulated particles: honest resolution, recovery of the truth."""

from __future__ import annotations

import numpy as np
import pytest

from compute.errors import ComputeError
from compute.fourier import fsc, resolution_at_threshold
from compute.geometry import angular_distance_deg
from compute.refine3d import Refine3D, Refine3DParams
from compute.simulate.molecules import density_map, molecule
from compute.simulate.particles import simulate_particles
from compute.symmetry import symmetrise
from compute.vdam.classify2d import ArraySource
from tests.compute.test_estep3d import ctf_of


def _source(mol, n, box, snr, seed):
    stk = simulate_particles(n, (mol,), box=box, snr=snr, seed=seed, max_shift_px=1.5)
    px = stk.truth.pixel_size_a
    return stk, ArraySource(np.asarray(stk.images), px, ctf_of(stk.truth, n))


@pytest.mark.slow
def test_refine_asym_recovers_truth_without_overfitting():
    box = 24
    stk, src = _source("asym", 500, box, 0.5, 21)
    px = src.pixel_size_a
    truth = density_map(molecule("asym"), box, px)
    p = Refine3DParams(ini_high_a=4.5 * px, particle_diameter_a=0.9 * box * px,
                       offset_range_px=2, offset_step_px=1, max_iter=5)
    r = Refine3D(src, truth, p)
    prev = None
    while not r.done:
        before = None if prev is None else r.rot.copy()
        info = r.iterate()
        if before is not None:
            # the reported changes are the particles' orientation changes of this iteration
            dist = angular_distance_deg(before, r.rot)
            assert info.angle_change_deg == pytest.approx(np.median(dist))
            assert info.angle_change_mean_deg == pytest.approx(np.mean(dist))
            assert info.changed_fraction == pytest.approx(np.mean(dist > 1e-3))
        prev = info
    res = r.result()
    assert len(res.history) >= 2
    vs_truth = resolution_at_threshold(fsc(res.combined, truth), box, px, 0.5)
    # better than the starting low-pass, and the half-map estimate agrees with the truth
    assert res.resolution_a < 0.85 * p.ini_high_a
    assert abs(res.resolution_a - vs_truth) / vs_truth < 0.25
    err = angular_distance_deg(stk.truth.rotations(), r.rot)
    print("refine test: median angular error", np.median(err), "within 20 deg", np.mean(err < 20))
    assert np.mean(err < 20) > 0.6
    assert set(np.unique(res.halves)) == {1, 2}
    # the half-maps are independent reconstructions, not copies
    assert not np.allclose(res.half1, res.half2)


@pytest.mark.slow
def test_refine_with_symmetry_gives_symmetric_maps():
    box = 24
    stk, src = _source("d2", 300, box, 0.5, 22)
    px = src.pixel_size_a
    truth = density_map(molecule("d2"), box, px)
    p = Refine3DParams(ini_high_a=4.5 * px, particle_diameter_a=0.9 * box * px, symmetry="D2",
                       offset_range_px=2, offset_step_px=1, max_iter=2)
    r = Refine3D(src, truth, p)
    while not r.done:
        r.iterate()
    res = r.result()
    c = np.corrcoef(res.combined.ravel(), symmetrise(res.combined, "D2").ravel())[0, 1]
    assert c > 0.99
    assert np.corrcoef(res.combined.ravel(), truth.ravel())[0, 1] > 0.8


def test_refine_rejects_bad_reference():
    stk, src = _source("asym", 10, 24, 1.0, 1)
    with pytest.raises(ComputeError):
        Refine3D(src, np.zeros((20, 20, 20)), Refine3DParams())
