"""RELION ZYZ Euler conventions: matrix layout, round trips, uniform sampling."""

from __future__ import annotations

import numpy as np
import pytest

from compute.geometry import (
    angular_distance_deg,
    euler_to_matrix,
    matrix_to_euler,
    projection_direction,
    random_euler,
    random_rotations,
    rotate_coordinates,
)


def _rz(a):
    a = np.deg2rad(a)
    return np.array([[np.cos(a), np.sin(a), 0], [-np.sin(a), np.cos(a), 0], [0, 0, 1]])


def _ry(b):
    b = np.deg2rad(b)
    return np.array([[np.cos(b), 0, -np.sin(b)], [0, 1, 0], [np.sin(b), 0, np.cos(b)]])


def test_matrix_is_rz_ry_rz_composition():
    rot, tilt, psi = 33.0, 71.0, -120.0
    expect = _rz(psi) @ _ry(tilt) @ _rz(rot)
    np.testing.assert_allclose(euler_to_matrix(rot, tilt, psi), expect, atol=1e-12)


def test_known_values_relion_layout():
    # tilt 90 about y: the volume's x axis maps to image -z (third row = (sin b, 0, cos b))
    A = euler_to_matrix(0.0, 90.0, 0.0)
    np.testing.assert_allclose(A @ [1, 0, 0], [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(A @ [0, 0, 1], [-1, 0, 0], atol=1e-12)
    # pure rot 90: image x axis is the volume's y axis
    A = euler_to_matrix(90.0, 0.0, 0.0)
    np.testing.assert_allclose(A @ [0, 1, 0], [1, 0, 0], atol=1e-12)


def test_round_trip_vectorised():
    rng = np.random.default_rng(0)
    e = np.column_stack([rng.uniform(-180, 180, 500), rng.uniform(0.5, 179.5, 500),
                         rng.uniform(-180, 180, 500)])
    m = euler_to_matrix(e[:, 0], e[:, 1], e[:, 2])
    assert m.shape == (500, 3, 3)
    back = matrix_to_euler(m)
    np.testing.assert_allclose(back, e, atol=1e-8)


@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_gimbal_lock_gives_same_matrix(tilt):
    m = euler_to_matrix(25.0, tilt, 40.0)
    e = matrix_to_euler(m)
    assert e[0] == 0.0 and abs(e[1] - tilt) < 1e-9
    np.testing.assert_allclose(euler_to_matrix(*e), m, atol=1e-12)


def test_projection_direction_is_At_z():
    rng = np.random.default_rng(1)
    e = random_euler(50, rng)
    m = euler_to_matrix(e[:, 0], e[:, 1], e[:, 2])
    d = projection_direction(e[:, 0], e[:, 1])
    np.testing.assert_allclose(d, np.einsum("nji,j->ni", m, [0, 0, 1.0]), atol=1e-12)


def test_random_rotations_are_uniform():
    R = random_rotations(20000, 3)
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape),
                               atol=1e-12)
    assert np.allclose(np.linalg.det(R), 1.0)
    # Haar measure: cos(tilt) is uniform on [-1, 1]; rot and psi uniform; rotation angle has
    # density (1 - cos w)/pi so its mean is pi/2 + 2/pi
    e = matrix_to_euler(R)
    c = np.cos(np.deg2rad(e[:, 1]))
    hist, _ = np.histogram(c, bins=10, range=(-1, 1))
    assert hist.min() > 0.9 * 2000 and hist.max() < 1.1 * 2000
    hist, _ = np.histogram(e[:, 0], bins=8, range=(-180, 180))
    assert hist.min() > 0.9 * 2500
    w = np.deg2rad(angular_distance_deg(np.eye(3), R))
    assert abs(w.mean() - (np.pi / 2 + 2 / np.pi)) < 0.02
    # seeded
    np.testing.assert_array_equal(random_rotations(5, 7), random_rotations(5, 7))


def test_angular_distance_and_rotate_coordinates():
    a = euler_to_matrix(10, 20, 30)
    b = euler_to_matrix(10, 20, 45)  # extra in-plane 15 degrees
    assert abs(angular_distance_deg(a, b) - 15.0) < 1e-9
    pts = np.array([[1.0, 2, 3], [-1, 0, 2]])
    out = rotate_coordinates(pts, np.stack([a, b]))
    np.testing.assert_allclose(out[1], pts @ b.T)
