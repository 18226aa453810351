"""Point groups with RELION's axes, volume rotation, symmetrisation and symmetry alignment."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from compute.errors import ComputeError
from compute.geometry import euler_to_matrix
from compute.simulate.molecules import density_map, molecule
from compute.symmetry import (
    align_to_symmetry,
    find_symmetry_placement,
    parse_symmetry,
    rotate_volume,
    symmetrise,
    symmetry_matrices,
)


@pytest.mark.parametrize("name,order", [("C1", 1), ("C4", 4), ("D2", 4), ("D7", 14), ("T", 12),
                                        ("O", 24), ("I", 60), ("I1", 60), ("I3", 60),
                                        ("I4", 60)])
def test_group_orders_and_closure(name, order):
    g = symmetry_matrices(name)
    assert g.shape == (order, 3, 3)
    assert np.allclose(g[0], np.eye(3))
    # rotations, closed under products
    assert np.allclose(np.einsum("gji,gjk->gik", g, g), np.eye(3), atol=1e-6)
    assert np.allclose(np.linalg.det(g), 1.0)
    prod = np.einsum("aij,bjk->abik", g, g).reshape(-1, 3, 3)
    d = np.abs(prod[:, None] - g[None]).max(axis=(2, 3)).min(axis=1)
    assert d.max() < 1e-4


def test_relion_axes():
    # D2: 2-folds on x, y and z; C4 about z; I2 has 2-folds on x, y, z (RELION's default I)
    for name in ("D2", "I"):
        g = symmetry_matrices(name)
        for ax in np.eye(3):
            r2 = -np.eye(3) + 2 * np.outer(ax, ax)
            assert np.abs(g - r2).max(axis=(1, 2)).min() < 1e-6
    c4 = symmetry_matrices("C4")
    assert np.allclose(c4 @ np.array([0, 0, 1.0]), [0, 0, 1])


def test_parse_errors():
    assert parse_symmetry("d3") == ("D", 3)
    for bad in ("C0", "X2", "", "D"):
        with pytest.raises(ComputeError):
            parse_symmetry(bad)


def test_rotate_volume_matches_rotated_density():
    mol = molecule("asym")
    px = 5.0
    vol = density_map(mol, 32, px)
    M = euler_to_matrix(30.0, 50.0, -20.0)
    rotated_atoms = density_map(dataclasses.replace(mol, coords_a=mol.coords_a @ M.T), 32, px)
    out = rotate_volume(vol, M)
    back = rotate_volume(out, M.T)
    inner = np.s_[8:24, 8:24, 8:24]
    assert np.corrcoef(back[inner].ravel(), vol[inner].ravel())[0, 1] > 0.97
    assert np.corrcoef(out.ravel(), rotated_atoms.ravel())[0, 1] > 0.95


def test_symmetrise_d2_molecule_is_invariant():
    vol = density_map(molecule("d2"), 32, 4.0)
    sym = symmetrise(vol, "D2")
    assert np.corrcoef(sym.ravel(), vol.ravel())[0, 1] > 0.98
    vol_a = density_map(molecule("asym"), 32, 4.0)
    sym_a = symmetrise(vol_a, "D2")
    assert np.corrcoef(sym_a.ravel(), vol_a.ravel())[0, 1] < 0.8


def _axis_errors_deg(found, truth) -> float:
    """Largest angle between each of the true axes (columns of ``truth``) and the nearest
    found axis, ignoring sign and order (D2's axes are interchangeable)."""
    c = np.abs(truth.T @ found)  # cosines between true and found axes
    return float(np.degrees(np.arccos(np.clip(c.max(axis=1), -1, 1))).max())


def _axis_permutations():
    """Rotations that permute the x, y, z axes (D2's placements are defined up to these)."""
    out = []
    for perm in ([0, 1, 2], [1, 2, 0], [2, 0, 1], [1, 0, 2], [0, 2, 1], [2, 1, 0]):
        for signs in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1), (-1, 1, 1), (1, -1, 1),
                      (1, 1, -1), (-1, -1, -1)):
            M = np.eye(3)[perm] * np.array(signs)[:, None]
            if np.linalg.det(M) > 0:
                out.append(M)
    return out


@pytest.mark.parametrize("name,mol", [("D2", "d2"), ("C4", "c4ring")])
def test_align_to_symmetry_recovers_axes(name, mol):
    vol = density_map(molecule(mol), 32, 4.0)
    P = euler_to_matrix(37.0, 64.0, 112.0)
    tilted = rotate_volume(vol, P)
    found, score = find_symmetry_placement(tilted, name)
    assert score > 0.9
    if name == "D2":  # the three 2-folds, each within 3 deg of a true one
        assert _axis_errors_deg(found, P) < 3.0
    else:  # C4: only the 4-fold axis is defined
        z = found @ np.array([0, 0, 1.0])
        assert np.degrees(np.arccos(min(1.0, abs(float(z @ P[:, 2]))))) < 3.0
    aligned, _, _ = align_to_symmetry(tilted, name)
    assert np.corrcoef(aligned.ravel(), symmetrise(aligned, name).ravel())[0, 1] > 0.98
    if name == "D2":  # the aligned map's axes are x, y, z: it matches the untilted truth
        c = max(np.corrcoef(rotate_volume(vol, g).ravel(), aligned.ravel())[0, 1]
                for g in _axis_permutations())
        assert c > 0.97


def test_align_map_to_reference_recovers_rotation_shift_and_hand():
    """A de novo model comes in any orientation, hand and origin: the truth comparison must
    undo all three (without the shift search a 3-voxel offset cost ~0.25 in correlation)."""
    from compute.fourier import shift_volume
    from compute.symmetry import align_map_to_reference

    truth = density_map(molecule("asym"), 32, 5.4)
    M = np.asarray(euler_to_matrix(47.0, 71.0, -128.0), dtype=np.float64).reshape(3, 3)
    moved = shift_volume(rotate_volume(truth, M), (2.6, -3.1, 1.4))
    for mirrored in (False, True):
        v = moved[::-1].copy() if mirrored else moved
        out, cc, mir = align_map_to_reference(v, truth)
        assert mir is mirrored
        assert cc > 0.95
        assert np.corrcoef(out.ravel(), truth.ravel())[0, 1] > 0.95
    # the same map without the shift search's help: the unshifted rotation alone is worse
    plain = rotate_volume(moved, M.T)
    assert np.corrcoef(plain.ravel(), truth.ravel())[0, 1] < cc - 0.05


def test_align_map_to_reference_symmetric_map_of_the_other_hand():
    """A D2 map already on its axes, of the other hand: its four symmetry copies fill the
    top coarse candidates of one hand, so each hand must get its own candidates."""
    from compute.symmetry import align_map_to_reference

    truth = density_map(molecule("d2"), 32, 5.0)
    out, cc, mir = align_map_to_reference(truth[::-1].copy(), truth)
    assert mir is True
    assert cc > 0.95
