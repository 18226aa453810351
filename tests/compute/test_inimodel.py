"""De novo initial model with VDAM on simulated particles: recovery of the truth, resume."""

from __future__ import annotations

import numpy as np
import pytest

from compute.errors import ComputeError
from compute.fourier import fsc, resolution_at_threshold
from compute.inimodel import InitialModel3D, InitialModelParams
from compute.simulate.molecules import density_map, molecule
from compute.simulate.particles import simulate_particles
from compute.symmetry import align_map_to_reference
from compute.vdam.classify2d import ArraySource
from tests.compute.test_estep3d import ctf_of

BOX = 24


def _source(n, snr, seed, mol="asym"):
    stk = simulate_particles(n, (mol,), box=BOX, snr=snr, seed=seed, max_shift_px=1.5)
    return stk, ArraySource(np.asarray(stk.images), stk.truth.pixel_size_a, ctf_of(stk.truth, n))


@pytest.mark.slow
def test_initial_model_recovers_the_molecule():
    stk, src = _source(500, 1.0, 41)
    px = src.pixel_size_a
    p = InitialModelParams(n_classes=1, n_iter=20, particle_diameter_a=0.85 * BOX * px,
                           offset_range_px=2, offset_step_px=1, seed=2)
    im = InitialModel3D(src, p)
    im.initialise()
    truth = density_map(molecule("asym"), BOX, px)
    _, cc0, _ = align_map_to_reference(im.class_volume(0), truth)
    while not im.done:
        im.step()
    vol = im.class_volume(0)
    aligned, cc, _ = align_map_to_reference(vol, truth)
    res = resolution_at_threshold(fsc(aligned, truth), BOX, px, 0.5)
    print(f"initial model test: corr {cc0:.2f} -> {cc:.2f}, FSC=0.5 at {res:.1f} A")
    assert cc > 0.7 and cc > cc0 + 0.15
    assert res < 6.5 * px
    assert im.results.class_index.max() == 0
    # the model is kept on the box centre (a drifted model is cut by the mask: issue 11)
    assert np.abs(im.centre_offsets()).max() < 0.5


def test_recentre_moves_reference_and_moments_together():
    from compute.vdam.optimiser import new_state

    _, src = _source(10, 1.0, 1)
    im = InitialModel3D(src, InitialModelParams(n_classes=1, particle_diameter_a=0.85 * BOX
                                                * src.pixel_size_a))
    g = np.arange(BOX) - BOX // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    vol = np.exp(-((z - 2.0) ** 2 + (y + 1.0) ** 2 + x ** 2) / 8.0).astype(np.float32)
    im.state = new_state(im.estep.to_fourier(vol[None]), np.ones(im.n_shells))
    im.state.mom1[:] = im.state.refs[None]
    assert np.allclose(im.centre_offsets()[0], [2.0, -1.0, 0.0], atol=0.1)
    im._recentre()
    assert np.abs(im.centre_offsets()).max() < 0.05
    moved = im.estep.to_real(im.state.refs)[0]
    assert abs(float(moved[BOX // 2, BOX // 2, BOX // 2]) - float(vol.max())) < 0.05
    assert np.allclose(im.state.mom1[0, 0], im.state.mom1[1, 0])
    # the moments moved with the reference (no spurious gradient from the shift)
    mom = im.estep.to_real(im.state.mom1[0])[0]
    assert abs(float(mom[BOX // 2, BOX // 2, BOX // 2]) - float(vol.max())) < 0.05


def test_checkpoint_restore_continues_identically():
    stk, src = _source(240, 1.0, 42)
    px = src.pixel_size_a
    p = InitialModelParams(n_classes=2, n_iter=6, particle_diameter_a=0.85 * BOX * px,
                           offset_range_px=1, offset_step_px=1, seed=3)
    a = InitialModel3D(src, p)
    a.initialise()
    for _ in range(2):
        a.step()
    saved = {k: np.array(v) for k, v in a.checkpoint().items()}
    b = InitialModel3D(src, p)
    b.restore(saved)
    assert b.iteration == 2
    a.step()
    b.step()
    assert np.allclose(a.state.refs, b.state.refs, atol=1e-5)
    assert np.array_equal(a.results.class_index, b.results.class_index)


def test_bad_parameters():
    _, src = _source(10, 1.0, 1)
    with pytest.raises(ComputeError):
        InitialModel3D(src, InitialModelParams(n_classes=0))
    with pytest.raises(ComputeError):
        InitialModel3D(src, InitialModelParams(n_classes=8))
