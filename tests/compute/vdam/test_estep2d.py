"""The 2D E-step against ground truth: projection accuracy, pose recovery, gradient scale."""

from __future__ import annotations

import numpy as np
import pytest

from compute.vdam.estep2d import CtfBatch, Estep2D, Sampling2D, _significant
from tests.compute.vdam.helpers import blob_molecule, rotate_shift


def test_sampling_grid():
    s = Sampling2D(psi_step_deg=12, offset_range_px=5, offset_step_px=2)
    assert len(s.psi_deg()) == 30
    off = s.offsets_px()
    assert (np.hypot(off[:, 0], off[:, 1]) <= 5 + 1e-9).all()
    assert len(off) == 21 and [0.0, 0.0] in off.tolist()


def test_projection_matches_real_space_rotation():
    rng = np.random.default_rng(0)
    n = 48
    es = Estep2D(n, 4.0, Sampling2D(15, 2, 1), 150, do_ctf=False)
    es.set_resolution(n // 2)
    mol = blob_molecule(n, rng) * es.mask
    W = es.project(es.to_fourier(mol[None]))[0]
    for j in (1, 3, 7, 13):
        truth = es.to_fourier(rotate_shift(mol, es.psi[j], 0, 0)[None])[0].ravel()[es._flat]
        assert np.linalg.norm(W[j] - truth) / np.linalg.norm(truth) < 0.05


def _find_poses(es, mols, truth):
    """Run the E-step on noise-free images of ``truth`` = [(class, psi, ox, oy)] and check
    that it finds each class, angle and shift; returns the accumulators and the result."""
    imgs = np.stack([rotate_shift(mols[k], psi, ox, oy) for k, psi, ox, oy in truth])
    X = es.prepare_images(imgs)
    acc, res = es.run(es.to_fourier(mols), X, CtfBatch.none(len(truth)), np.ones(es.n_shells),
                      np.log(np.full(len(mols), 1 / len(mols))), np.array([1, 2, 1]))
    assert res.class_index.tolist() == [t[0] for t in truth]
    assert np.allclose(res.psi_deg, [t[1] for t in truth])
    assert np.allclose(res.origin_x_px, [t[2] for t in truth])
    assert np.allclose(res.origin_y_px, [t[3] for t in truth])
    return acc, res


def test_estep_recovers_class_angle_and_shift():
    rng = np.random.default_rng(1)
    n = 32
    es = Estep2D(n, 4.0, Sampling2D(10, 3, 1), 110, do_ctf=False)
    es.set_resolution(16)
    mols = np.stack([blob_molecule(n, rng) * es.mask for _ in range(3)])
    truth = [(1, 30.0, 2.0, -1.0), (2, 120.0, 0.0, 1.0), (0, 250.0, -1.0, -2.0)]
    acc, res = _find_poses(es, mols, truth)
    assert (res.max_prob > 0.99).all() and (res.n_significant == 1).all()
    assert acc.class_weight.sum() == pytest.approx(3.0)


def test_gradient_is_a_newton_step_towards_the_data():
    """G / F at the true reference is ~0 and at half of it ~ +half (ascent, unit curvature)."""
    rng = np.random.default_rng(2)
    n = 32
    es = Estep2D(n, 4.0, Sampling2D(10, 2, 1), 110, do_ctf=True)
    es.set_resolution(10)
    mol = blob_molecule(n, rng) * es.mask
    from compute.ctf import CtfParams, apply_ctf

    m = 60
    psi = rng.choice(es.psi, m)
    du = rng.uniform(8000, 20000, m)
    imgs = np.stack([apply_ctf(rotate_shift(mol, p, 0, 0).astype(np.float32), 4.0,
                               CtfParams(d, d)) for p, d in zip(psi, du)])
    z = np.zeros(m)
    ctf = CtfBatch(du, du, z, z + 300, z + 2.7, z + 0.1, z, z)
    X = es.prepare_images(imgs)
    v = es.to_fourier(mol[None])
    sel = es._grid_sel
    for scale, expect in ((1.0, 0.0), (0.5, 0.5)):
        acc, _ = es.run(v * scale, X, ctf, np.ones(es.n_shells), np.zeros(1),
                        np.where(np.arange(m) % 2, 1, 2))
        F = acc.weight.sum(0)[0][es.shell_index]
        Gh = acc.data.sum(0)[0][sel] / F[sel]
        ratio = np.vdot(v[0][sel], Gh).real / np.vdot(v[0][sel], v[0][sel]).real
        assert ratio == pytest.approx(expect, abs=0.1)


def test_significant_weights_hold_the_mass():
    rng = np.random.default_rng(3)
    L = rng.standard_normal((5, 2000)).astype(np.float32) * np.array([[0.1, 1, 3, 8, 30]]).T
    P = np.exp(L - L.max(1, keepdims=True))
    Z = P.sum(1)
    rows, cols, vals, nsig = _significant(P, Z, 0.999, 500)
    for r in range(5):
        kept = cols[rows == r]
        assert len(kept) == nsig[r] <= 500
        if nsig[r] < 500:
            assert P[r, kept].sum() / Z[r] >= 0.999 - 1e-6
        # the kept ones are the largest
        assert P[r, kept].min() >= np.sort(P[r])[::-1][nsig[r] - 1] - 1e-12
    assert nsig[0] == 500 and nsig[-1] < 50
    assert np.allclose(np.bincount(rows, weights=vals), 1.0)


def test_sampling_for_resolution_is_coarser_only_at_low_resolution():
    """psi step = resolution / particle radius, offset step = resolution / 3, never finer
    than the user's grid (RELION's allow_coarser)."""
    s = Sampling2D(psi_step_deg=12, offset_range_px=5, offset_step_px=2)
    c = s.for_resolution(35.0, 160.0, 4.0)
    assert np.rad2deg(35.0 / 80.0) >= c.psi_step_deg > s.psi_step_deg
    assert len(c.psi_deg()) == 16                            # even: psi, psi + 180 pairs
    assert c.offset_step_px == pytest.approx(35.0 / 12.0)
    assert len(c.offsets_px()) == 9 and c.offset_range_px == 5
    assert s.for_resolution(15.0, 160.0, 4.0) == s          # 10.7 deg needed: the user's 12
    assert s.for_resolution(4.0, 160.0, 4.0) == s


def test_estep_on_a_coarse_grid_and_back():
    """The E-step can switch to a coarser grid and back; poses are found on the grid used."""
    rng = np.random.default_rng(5)
    n = 32
    es = Estep2D(n, 4.0, Sampling2D(10, 3, 1), 110, do_ctf=False)
    mols = np.stack([blob_molecule(n, rng) * es.mask for _ in range(3)])
    coarse = Sampling2D(30, 3, 2)
    es.set_resolution(12, coarse)
    assert len(es.psi) == 12 and len(es.offsets) == len(coarse.offsets_px())
    truth = [(1, 60.0, 2.0, 0.0), (2, 150.0, 0.0, -2.0), (0, 270.0, -2.0, 2.0)]
    _find_poses(es, mols, truth)
    es.set_resolution(12)                                   # back to the construction grid
    assert len(es.psi) == 36 and len(es.offsets) == len(Sampling2D(10, 3, 1).offsets_px())


def test_half_plane_projector_matches_the_full_plane_gather():
    """The CPU read from the rfft2 half plane (Friedel mates conjugated) and the splat with
    its Hermitian part equal the plain full-plane gather / bincount path the GPU uses."""
    rng = np.random.default_rng(6)
    n = 32
    es = Estep2D(n, 4.0, Sampling2D(15, 2, 1), 100, do_ctf=False)
    es.set_resolution(14)
    refs = es.to_fourier((rng.standard_normal((3, n, n)) * es.mask).astype(np.float32))
    sums = (rng.standard_normal((3, len(es.psi), es.n_f))
            + 1j * rng.standard_normal((3, len(es.psi), es.n_f))).astype(np.complex64)
    W, B = es.project(refs), es.backproject(sums)
    es._read_mat = None
    W0, B0 = es.project(refs), es.backproject(sums)
    assert np.linalg.norm(W - W0) / np.linalg.norm(W0) < 1e-5
    assert np.linalg.norm(B - B0) / np.linalg.norm(B0) < 1e-5


def test_psi_pairs_give_the_same_posteriors_as_the_plain_product():
    """Evaluating psi and psi + 180 together (A + B, A - B) is exact."""
    rng = np.random.default_rng(7)
    n = 32
    es = Estep2D(n, 4.0, Sampling2D(12, 2, 1), 100, do_ctf=True)
    es.set_resolution(12)
    refs = es.to_fourier((rng.standard_normal((4, n, n)) * es.mask).astype(np.float32))
    imgs = rng.standard_normal((20, n, n)).astype(np.float32)
    z = np.zeros(20)
    du = rng.uniform(8000, 25000, 20)
    ctf = CtfBatch(du, du, z, z + 300, z + 2.7, z + 0.1, z, z)
    X = es.prepare_images(imgs)
    es.chunk_floats = 6 * len(es.offsets) * 4 * len(es.psi)     # several chunks of 6
    out = []
    for pair in (True, False):
        es.pair_psi = pair
        out.append(es.run(refs, X, ctf, np.full(es.n_shells, 50.0), np.log(np.full(4, 0.25)),
                          np.where(np.arange(20) % 2, 1, 2)))
    (a1, r1), (a0, r0) = out
    assert (r1.class_index == r0.class_index).all() and np.allclose(r1.psi_deg, r0.psi_deg)
    assert np.allclose(r1.log_likelihood, r0.log_likelihood, rtol=1e-4, atol=1e-2)
    assert np.allclose(r1.max_prob, r0.max_prob, atol=1e-4)
    assert np.linalg.norm(a1.data - a0.data) / np.linalg.norm(a0.data) < 1e-4


def test_odd_number_of_angles_uses_the_single_product():
    """25 angles cannot pair up: the plain product is used and poses are still found."""
    rng = np.random.default_rng(8)
    n = 32
    es = Estep2D(n, 4.0, Sampling2D(14.4, 2, 1), 110, do_ctf=False)
    es.set_resolution(14)
    assert len(es.psi) == 25
    mols = np.stack([blob_molecule(n, rng) * es.mask for _ in range(2)])
    truth = [(1, 14.4 * 7, 1.0, 0.0), (0, 14.4 * 20, 0.0, -1.0)]
    imgs = np.stack([rotate_shift(mols[k], psi, ox, oy) for k, psi, ox, oy in truth])
    _, res = es.run(es.to_fourier(mols), es.prepare_images(imgs), CtfBatch.none(2),
                    np.ones(es.n_shells), np.log(np.full(2, 0.5)), np.array([1, 2]))
    assert res.class_index.tolist() == [1, 0]
    assert np.allclose(res.psi_deg, [t[1] for t in truth])
    assert np.allclose(res.origin_x_px, [1.0, 0.0]) and np.allclose(res.origin_y_px, [0.0, -1.0])
