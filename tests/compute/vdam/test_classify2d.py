"""2D classification end to end on simulated particles with known molecules and angles."""

from __future__ import annotations

import numpy as np
import pytest

from compute.errors import ComputeError
from compute.vdam.classify2d import ArraySource, Classify2D, Classify2DParams
from tests.compute.vdam.simdata import fixed_view_stack


@pytest.fixture(scope="module")
def data():
    return fixed_view_stack(360, n_mol=3, box=32, snr=0.15, seed=4)


def _params(**kw):
    base = dict(n_classes=5, n_iter=24, particle_diameter_a=100, psi_step_deg=12,
                offset_range_px=2, offset_step_px=1, seed=2)
    base.update(kw)
    return Classify2DParams(**base)


def _purity(cls, mol, min_frac=0.05):
    """Fraction of the majority molecule in each class holding >= min_frac of the data."""
    out = []
    for k in np.unique(cls):
        lab = mol[cls == k]
        if len(lab) >= min_frac * len(cls):
            out.append(np.bincount(lab + 1).max() / len(lab))
    return np.array(out)


def _psi_consistency(cls, psi_true, psi_found, mol):
    """Circular spread (deg) of (true - found) psi inside each class, averaged: small when a
    class holds one view with its in-plane angles consistently assigned."""
    spreads = []
    for k in np.unique(cls):
        sel = (cls == k) & (mol >= 0)
        if sel.sum() < 10:
            continue
        d = np.deg2rad(psi_true[sel] - psi_found[sel])
        # modulo the molecule's in-plane symmetry (c4ring is 4-fold, rod 2-fold)
        best = np.inf
        for order in (1, 2, 4):
            r = np.abs(np.mean(np.exp(1j * order * d)))
            best = min(best, np.rad2deg(np.sqrt(-2 * np.log(max(r, 1e-9)))) / order)
        spreads.append(best)
    return float(np.mean(spreads))


def test_vdam_recovers_the_molecules_and_their_angles(data):
    imgs, mol, psi, ctf = data
    clf = Classify2D(ArraySource(imgs, 4.0, ctf), _params())
    clf.initialise()
    while not clf.done:
        clf.step()
    res = clf.final_pass()
    assert (_purity(res.class_index, mol) >= 0.9).all()
    # every molecule dominates at least one class
    assert len({np.bincount(mol[res.class_index == k] + 1).argmax() - 1
                for k in np.unique(res.class_index) if (res.class_index == k).sum() > 20}) == 3
    assert _psi_consistency(res.class_index, psi, res.psi_deg, mol) < 15.0
    assert clf.estep_seconds > 0 and (res.n_significant >= 1).all()


def test_em_classifies_too(data):
    imgs, mol, psi, ctf = data
    clf = Classify2D(ArraySource(imgs, 4.0, ctf), _params(use_em=True, n_iter_em=6))
    clf.initialise()
    while not clf.done:
        clf.step()
    assert (_purity(clf.results.class_index, mol) >= 0.85).all()


def test_checkpoint_restore_continues_identically(data):
    imgs, _, _, ctf = data
    src = ArraySource(imgs[:200], 4.0, ctf.subset(np.arange(200)))
    p = _params(n_iter=8, n_classes=3)
    a = Classify2D(src, p)
    a.initialise()
    for _ in range(4):
        a.step()
    saved = {k: np.copy(v) for k, v in a.checkpoint().items()}
    for _ in range(4):
        a.step()
    b = Classify2D(src, p)
    b.restore(saved)
    for _ in range(4):
        b.step()
    assert np.allclose(a.state.refs, b.state.refs, atol=1e-4)
    assert np.array_equal(a.results.class_index, b.results.class_index)


def test_nan_images_are_skipped(data):
    imgs, _, _, ctf = data
    bad = imgs[:120].copy()
    bad[7, 3, 3] = np.nan
    clf = Classify2D(ArraySource(bad, 4.0, ctf.subset(np.arange(120))),
                     _params(n_iter=3, n_classes=2))
    clf.initialise()
    while not clf.done:
        clf.step()
    clf.final_pass()
    assert clf.bad[7] and clf.bad.sum() == 1
    assert clf.results.class_index[7] == -1
    assert (clf.results.class_index[np.arange(120) != 7] >= 0).all()


def test_more_classes_than_particles_is_an_error(data):
    imgs, _, _, ctf = data
    with pytest.raises(ComputeError, match="only 10 particles"):
        Classify2D(ArraySource(imgs[:10], 4.0, ctf.subset(np.arange(10))), _params(n_classes=20))


def _run_replacing(data, mode):
    imgs, mol, _, ctf = data
    clf = Classify2D(ArraySource(imgs, 4.0, ctf),
                     _params(n_classes=8, inactivity_threshold=0.9, replacement=mode))
    clf.initialise()
    reps = []
    while not clf.done:
        info = clf.step()
        reps += [(info.iteration, a, b) for a, b in info.replaced]
    return clf.final_pass(), mol, reps


def test_split_replacement_does_not_churn(data):
    """8 classes for 3 molecules with a high inactivity threshold: classes get replaced.

    With RELION 4's copy rule the copy of b's updated reference takes all of b's particles,
    so the same two classes replace each other every mini-batch; split replacement re-seeds
    a class at most once per cooldown, and every class ends holding particles, purely."""
    res, mol, reps = _run_replacing(data, "split")
    assert 1 <= len(reps) <= 6
    last: dict[int, int] = {}
    for it, a, b in reps:
        for k in (a, b):
            assert it - last.get(k, -100) >= 3
            last[k] = it
    sizes = np.bincount(res.class_index, minlength=8)
    assert (sizes > 0).all()
    assert (_purity(res.class_index, mol) >= 0.9).all()
    _, _, copy_reps = _run_replacing(data, "copy")
    pairs = [frozenset((a, b)) for _, a, b in copy_reps]
    assert len(copy_reps) >= 8 and max(pairs.count(p) for p in set(pairs)) >= 8


def test_vdam_resolution_cap_follows_the_schedule(data):
    """The E-step resolution is capped at 35 A in the initial phase, 15 A in the final phase
    and final pass, linearly in between (VDAM only; EM follows the FSC rule alone)."""
    imgs, mol, _, ctf = data
    src = ArraySource(imgs, 4.0, ctf)
    clf = Classify2D(src, _params(n_iter=20, grad_ini_resol_a=60.0, grad_fin_resol_a=12.0))
    box_a = 32 * 4.0
    assert clf.resolution_cap_shell(0) == pytest.approx(max(6.0, box_a / 60.0))
    assert clf.resolution_cap_shell(19) == pytest.approx(box_a / 12.0)
    mid = [clf.resolution_cap_shell(i) for i in range(clf.schedule.n_ini,
                                                      clf.schedule.n_ini + clf.schedule.n_mid)]
    assert all(a <= b for a, b in zip(mid, mid[1:]))
    clf.initialise()
    used = []
    while not clf.done:
        info = clf.step()
        used.append(info.r_max)
        assert info.r_max <= clf.resolution_cap_shell(info.iteration - 1) + 1e-9
    assert max(used) == pytest.approx(box_a / 12.0)       # the FSC rule alone goes higher
    res = clf.final_pass()
    assert clf.estep.r_max == pytest.approx(box_a / 12.0)
    assert (_purity(res.class_index, mol) >= 0.9).all()
    em = Classify2D(src, _params(use_em=True, n_iter_em=2))
    assert em.resolution_cap_shell(0) is None


def test_vdam_can_finish_with_em_iterations(data):
    """grad_em_iters: EM passes over all particles after the mini-batches (RELION's
    --grad_em_iters); the classes stay pure and every particle is visited by each."""
    imgs, mol, _, ctf = data
    clf = Classify2D(ArraySource(imgs, 4.0, ctf), _params(n_iter=16, grad_em_iters=2))
    assert clf.n_total == 18
    clf.initialise()
    phases = []
    while not clf.done:
        info = clf.step()
        phases.append((info.phase, info.batch_size))
    assert phases[-2:] == [("em", len(imgs)), ("em", len(imgs))]
    assert all(ph != "em" for ph, _ in phases[:-2])
    res = clf.final_pass()
    assert (_purity(res.class_index, mol) >= 0.9).all()


def test_coarse_sampling_while_the_resolution_is_low(data):
    """With coarse_sampling the E-step searches a coarser psi/offset grid while its
    resolution is low (here the 60 A cap of the initial phase) and the user's grid at the
    end (10 A: 11.5 deg needed, 12 asked) and in the final pass; the classes stay pure and
    the angles consistent."""
    imgs, mol, psi_true, ctf = data
    src = ArraySource(imgs, 4.0, ctf)
    clf = Classify2D(src, _params(n_iter=20, grad_ini_resol_a=60.0, grad_fin_resol_a=10.0,
                                  coarse_sampling=True))
    user = clf.estep.sampling
    early = clf.sampling_for(clf.resolution_cap_shell(0))
    assert early.psi_step_deg > user.psi_step_deg and early.offset_step_px > user.offset_step_px
    assert clf.sampling_for(clf.resolution_cap_shell(19)) == user
    clf.initialise()
    grids = []
    while not clf.done:
        clf.step()
        grids.append(len(clf.estep.psi))
    assert grids[0] < len(user.psi_deg())
    res = clf.final_pass()
    assert clf.estep.current_sampling == user
    assert set(np.round(res.psi_deg, 6)) <= set(np.round(user.psi_deg(), 6))
    # it still classifies, but less purely than the user's grid in this small box (where
    # the 17 deg the 10-15 A caps allow stay coarser than the 12 asked for most of the run;
    # docs/class2d.md): hence off by default
    assert (_purity(res.class_index, mol) >= 0.8).all()
    assert len({np.bincount(mol[res.class_index == k] + 1).argmax() - 1
                for k in np.unique(res.class_index) if (res.class_index == k).sum() > 20}) == 3
    assert _psi_consistency(res.class_index, psi_true, res.psi_deg, mol) < 10.0
    off = Classify2D(src, _params(n_iter=20))                # the default: off
    assert off.sampling_for(off.resolution_cap_shell(0)) == off.estep.sampling
