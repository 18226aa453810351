"""Molecules, density maps and Fourier-slice projections against exact ground truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from compute.errors import ComputeError
from compute.fourier import frc
from compute.geometry import euler_to_matrix, random_rotations
from compute.simulate.molecules import available_molecules, default_box, density_map, molecule
from compute.simulate.project import Projector, project, project_atoms, resample_map


def test_molecules_are_distinct_and_have_their_symmetry():
    names = available_molecules()
    assert {"asym", "c4ring", "d2", "ribosome", "rod"} <= set(names)
    rg = {n: molecule(n).radius_of_gyration_a() for n in names}
    assert len({round(v) for v in rg.values()}) == len(names)
    # C4: rotating the atoms 90 deg about z maps the set onto itself
    m = molecule("c4ring")
    rz = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    a = np.sort(np.round(m.coords_a @ rz.T, 6), axis=0)
    np.testing.assert_allclose(a, np.sort(np.round(m.coords_a, 6), axis=0), atol=1e-5)
    # ... but not 45 deg
    r45 = euler_to_matrix(45.0, 0, 0)
    assert np.abs(np.sort(m.coords_a @ r45.T, axis=0) - np.sort(m.coords_a, axis=0)).max() > 1
    # D2: 180 deg about x, y, z
    m = molecule("d2")
    for d in ([1, -1, -1], [-1, 1, -1], [-1, -1, 1]):
        b = np.sort(m.coords_a * np.array(d, float), axis=0)
        np.testing.assert_allclose(b, np.sort(m.coords_a, axis=0), atol=1e-9)
    # asym is not C2 about z
    m = molecule("asym")
    b = np.sort(m.coords_a * np.array([-1.0, -1, 1]), axis=0)
    assert np.abs(b - np.sort(m.coords_a, axis=0)).max() > 5


def test_density_map_mass_and_centre():
    m = molecule("asym")
    for ps in (1.5, 3.0):
        box = default_box(m, ps)
        v = density_map(m, box, ps)
        assert v.shape == (box,) * 3 and box % 2 == 0
        assert abs(v.sum() - m.weights.sum()) < 1e-3 * m.weights.sum()
        com = np.array(ndimage.center_of_mass(v))  # z, y, x
        np.testing.assert_allclose(com, [box // 2] * 3, atol=0.05)


def test_projection_of_identity_is_sum_along_z():
    m = molecule("d2")
    v = density_map(m, 48, 3.0)
    p = project(v, np.eye(3)[None])[0]
    # the projector band-limits to the Nyquist circle: compare with the same band
    F = np.fft.rfft2(v.sum(axis=0))
    ky, kx = np.meshgrid(np.fft.fftfreq(48) * 48, np.fft.rfftfreq(48) * 48, indexing="ij")
    ref = np.fft.irfft2(np.where(kx**2 + ky**2 <= 24**2, F, 0), s=(48, 48))
    assert np.sqrt(((p - ref) ** 2).mean() / (ref**2).mean()) < 0.03


def test_fourier_slice_matches_exact_atom_projection():
    m = molecule("asym")
    box, ps = 64, 2.0
    P = Projector(density_map(m, box, ps))
    R = random_rotations(6, 11)
    origins = np.array([[3.5, -2.25]] * 3 + [[0.0, 0.0]] * 3)
    a = P.project(R, origins)
    e = project_atoms(m, R, box, ps, origins)
    rel = np.sqrt(((a - e) ** 2).mean() / (e**2).mean())
    assert rel < 0.03
    for i in range(6):
        assert frc(a[i], e[i])[1:28].min() > 0.99


def test_projection_along_rotated_axis_equals_projection_of_rotated_map():
    """Projecting at A equals summing along z the map resampled at A^T r."""
    m = molecule("asym")
    box, ps = 56, 2.5
    v = density_map(m, box, ps)
    A = euler_to_matrix(30.0, 60.0, -20.0)
    c = box // 2
    zz, yy, xx = np.meshgrid(*(np.arange(box) - c,) * 3, indexing="ij")
    r = np.stack([xx, yy, zz], -1) @ A  # rows: (A^T r)^T
    rotated = ndimage.map_coordinates(v, [r[..., 2] + c, r[..., 1] + c, r[..., 0] + c],
                                      order=3, mode="constant")
    ref = rotated.sum(axis=0)
    p = project(v, A[None], pad=2)[0]
    assert np.corrcoef(p.ravel(), ref.ravel())[0, 1] > 0.995
    # and not at a different angle
    q = project(v, euler_to_matrix(30.0, 80.0, -20.0)[None])[0]
    assert np.corrcoef(q.ravel(), ref.ravel())[0, 1] < 0.95


def test_origin_convention_moves_centre_to_minus_origin():
    m = molecule("small")
    box, ps = 48, 2.0
    P = Projector(density_map(m, box, ps))
    img = P.project(np.eye(3)[None], np.array([[5.0, -3.0]]))[0]
    cy, cx = ndimage.center_of_mass(np.clip(img, 0, None))
    # the molecule's centre of mass projects to (N//2 - originX, N//2 - originY)
    assert abs(cx - (box // 2 - 5.0)) < 0.1 and abs(cy - (box // 2 + 3.0)) < 0.1


def test_projector_accepts_euler_and_rejects_bad_shapes():
    v = density_map(molecule("small"), 32, 3.0)
    P = Projector(v)
    e = np.array([[10.0, 20, 30]])
    np.testing.assert_allclose(P.project(e), P.project(euler_to_matrix(10, 20, 30)[None]),
                               atol=1e-6)
    with pytest.raises(ComputeError):
        Projector(v[:, :, :30])
    with pytest.raises(ComputeError):
        P.project(np.zeros((2, 4)))


def test_resample_map_matches_rendering_at_the_new_pixel_size():
    m = molecule("asym")
    fine = density_map(m, 96, 1.5)
    coarse = resample_map(fine, 1.5, 3.0, 64)
    ref = density_map(m, 64, 3.0)
    assert coarse.shape == (64, 64, 64)
    assert np.corrcoef(coarse.ravel(), ref.ravel())[0, 1] > 0.99
    np.testing.assert_allclose(ndimage.center_of_mass(coarse), [32, 32, 32], atol=0.05)
