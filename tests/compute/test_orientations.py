"""HEALPix directions and orientation grids."""

from __future__ import annotations

import numpy as np
import pytest

from compute.geometry import angular_distance_deg, projection_direction
from compute.orientations import (
    grid_matrices,
    healpix_directions,
    healpix_step_deg,
    local_perturbations,
    order_for_step,
    orientation_grid,
)


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_healpix_directions_are_uniform(order):
    rot, tilt = healpix_directions(order)
    assert len(rot) == 12 * 4**order
    d = projection_direction(rot, tilt)
    assert np.allclose(np.linalg.norm(d, axis=1), 1.0)
    # equal-area: the mean direction is ~0 and every octant holds the same share
    assert np.abs(d.mean(0)).max() < 1e-9
    cos = np.clip(d @ d.T, -1, 1)
    np.fill_diagonal(cos, -1)
    nn = np.degrees(np.arccos(cos.max(1)))
    step = healpix_step_deg(order)
    assert 0.6 * step < np.median(nn) < 1.3 * step
    # covering: a random direction is never far from a grid point
    rng = np.random.default_rng(0)
    v = rng.standard_normal((500, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    far = np.degrees(np.arccos(np.clip((v @ d.T).max(1), -1, 1)))
    assert far.max() < 1.1 * step


def test_orders_and_grids():
    assert healpix_step_deg(3) == pytest.approx(7.5)
    assert order_for_step(7.5) == 3 and order_for_step(8) == 3 and order_for_step(1.8) == 6
    g = orientation_grid(1)
    assert g.shape == (48 * 12, 3)
    M = grid_matrices(1)
    assert np.allclose(np.einsum("nji,njk->nik", M, M), np.eye(3), atol=1e-9)
    # any rotation is within ~ one step of the grid
    from compute.geometry import random_rotations

    R = random_rotations(100, 1)
    d = angular_distance_deg(R[:, None], M[None]).min(1)
    assert d.max() < 2.0 * healpix_step_deg(1)


def test_local_perturbations():
    p = local_perturbations(2.0)
    assert p.shape == (7, 3, 3)
    a = angular_distance_deg(np.eye(3)[None], p)
    assert a[0] == pytest.approx(0.0, abs=1e-6) and np.allclose(a[1:], 2.0)
    full = local_perturbations(1.0, 1, full=True)
    assert full.shape == (27, 3, 3)
