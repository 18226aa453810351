"""CuPy parity of the simulator (skips cleanly without a usable GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from compute import backend as be

pytestmark = pytest.mark.gpu


@pytest.fixture
def cp():
    if not be.gpu_available():
        pytest.skip("no usable GPU (CuPy with a CUDA device)")
    return be._import_cupy()


def test_projector_parity(cp):
    from compute.geometry import random_rotations
    from compute.simulate.molecules import density_map, molecule
    from compute.simulate.project import Projector

    v = density_map(molecule("asym"), 48, 2.5)
    R = random_rotations(7, 1)
    o = np.random.default_rng(2).uniform(-3, 3, (7, 2))
    a = Projector(v).project(R, o)
    b = Projector(cp.asarray(v)).project(cp.asarray(R), cp.asarray(o))
    assert be.is_cupy_array(b)
    np.testing.assert_allclose(be.to_numpy(b), a, atol=1e-4 * float(np.abs(a).max()))


def test_particles_and_micrograph_parity(cp):
    from compute.simulate.micrograph import simulate_micrograph
    from compute.simulate.particles import simulate_particles

    kw = dict(box=32, junk_fraction=0.4, seed=4, return_clean=True)
    a = simulate_particles(40, ["small", "d2"], device="cpu", **kw)
    b = simulate_particles(40, ["small", "d2"], device="gpu", **kw)
    np.testing.assert_array_equal(a.truth.kind, b.truth.kind)
    np.testing.assert_allclose(be.to_numpy(b.images), a.images, atol=2e-3)
    mk = dict(pixel_size_a=2.0, molecules=["small"], seed=3, noise=False, return_expected=True)
    m1 = simulate_micrograph(256, device="cpu", **mk)
    m2 = simulate_micrograph(256, device="gpu", **mk)
    np.testing.assert_allclose(be.to_numpy(m2.expected), m1.expected, rtol=1e-3, atol=1e-3)


def test_movie_on_gpu(cp):
    from compute.simulate.movie import simulate_movie

    mv = simulate_movie(128, 4, molecules=["small"], n_particles=3, seed=1, device="gpu")
    f = be.to_numpy(mv.frames)
    assert f.shape == (4, 128, 128) and abs(f.mean() - 1.0) < 0.1
