"""The generic VDAM/EM updates and the schedules, on synthetic accumulators with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from compute.fourier import radial_index
from compute.vdam.init import blob_references
from compute.vdam.optimiser import Accumulators, VdamOptimiser, new_state
from compute.vdam.schedule import BatchSampler, Schedule, ScheduleParams


def _problem(shape=(16, 9), K=2, seed=0):
    rng = np.random.default_rng(seed)
    shell = np.minimum(radial_index((16, 16), rfft=True), 8)
    target = (rng.standard_normal((K, *shape)) + 1j * rng.standard_normal((K, *shape))) * 10
    return rng, shell, target.astype(np.complex64)


def _acc(v, target, F, rng, noise=0.0):
    """Accumulators of a quadratic problem: G_h = F (target + noise_h - v)."""
    K = v.shape[0]
    data = np.stack([F * (target + noise * (rng.standard_normal(v.shape)
                                            + 1j * rng.standard_normal(v.shape)) - v)
                     for _ in range(2)])
    weight = np.full((2, K, 9), F, dtype=np.float32)
    return Accumulators(data=data.astype(np.complex64), weight=weight,
                        class_weight=np.full((2, K), 50.0), sigma2_sum=np.ones(9),
                        sigma2_count=np.ones(9), n_particles=100)


def test_vdam_converges_to_the_target_without_ringing():
    rng, shell, target = _problem()
    opt = VdamOptimiser(shell, 9)
    st = new_state(np.zeros_like(target), np.ones(9))
    errs = []
    for _ in range(40):
        opt.vdam_step(st, _acc(st.refs, target, 2.0, rng), step=0.9, tau_fudge=1.0)
        errs.append(np.linalg.norm(st.refs - target) / np.linalg.norm(target))
    assert errs[-1] < 0.05
    assert max(errs) < 1.05          # never overshoots past the start distance
    assert st.iteration == 40 and (st.n_updates == 40).all()


def test_vdam_noise_lowers_the_fsc_weight():
    rng, shell, target = _problem()
    opt = VdamOptimiser(shell, 9)
    st = new_state(target.copy(), np.ones(9))
    for _ in range(10):
        opt.vdam_step(st, _acc(st.refs, target, 2.0, rng, noise=0.0), 0.9, 1.0)
    clean = st.fsc.mean()
    st2 = new_state(target.copy(), np.ones(9))
    for _ in range(10):
        opt.vdam_step(st2, _acc(st2.refs, target, 2.0, rng, noise=40.0), 0.9, 1.0)
    assert clean > 0.95 and st2.fsc.mean() < clean - 0.1


def test_em_step_is_the_regularised_average():
    rng, shell, target = _problem(K=1)
    opt = VdamOptimiser(shell, 9)
    st = new_state(target.copy(), np.ones(9))
    F = 5.0
    opt.em_step(st, _acc(st.refs, target, F, rng), tau_fudge=1.0)
    # v = v + (G - v/tau2)/(F + 1/tau2) with G = F (target - v), v = target -> shrink only
    tau2 = np.array([np.mean(np.abs(target[0][shell == s]) ** 2) for s in range(9)])[shell]
    expect = target[0] * 2 * F / (2 * F + 1.0 / tau2)   # both halves add up
    assert np.allclose(st.refs[0], expect, rtol=1e-4, atol=1e-4)


def test_inactive_class_is_replaced_by_the_most_changing_one():
    rng, shell, target = _problem(K=3)
    opt = VdamOptimiser(shell, 9)
    st = new_state(np.zeros_like(target), np.ones(9))
    acc = _acc(st.refs, target, 2.0, rng)
    acc.class_weight = np.array([[50.0, 0.001, 50.0], [50.0, 0.001, 50.0]])
    st.class_frac = np.array([0.5, 1e-6, 0.5])
    target[2] *= 3  # class 2 moves most
    acc = _acc(st.refs, target, 2.0, rng)
    acc.class_weight = np.array([[50.0, 0.0, 50.0], [50.0, 0.0, 50.0]])
    replaced = opt.vdam_step(st, acc, 0.9, 1.0, inactivity_threshold=0.1)
    assert replaced == [(1, 2)]
    assert np.allclose(st.refs[2], 0.0)                 # b keeps its old reference
    assert np.abs(st.refs[1]).sum() > 0                  # a got b's update
    assert st.class_frac[1] == pytest.approx(st.class_frac[2])


def test_schedule_phases_and_batch_sizes():
    s = Schedule(10_000)
    assert (s.n_ini, s.n_mid, s.n_fin) == (60, 100, 40)
    first, last = s.stage(0), s.stage(199)
    assert (first.batch_size, first.step, first.tau_fudge) == (200, 0.9, 1.0)
    assert (last.batch_size, last.step, last.tau_fudge) == (1000, 0.3, 2.0)
    mid = [s.stage(i) for i in range(60, 160)]
    steps = [m.step for m in mid]
    assert all(a >= b for a, b in zip(steps, steps[1:]))          # monotone decrease
    q = mid[25]                                                     # sigmoid centre
    assert 0.35 < (0.9 - q.step) / 0.6 < 0.65
    assert Schedule(2_000_000).stage(0).batch_size == 10_000
    assert Schedule(2_000_000).stage(199).batch_size == 100_000
    im = Schedule(2_000_000, ScheduleParams.initial_model())
    assert im.stage(0).batch_size == 5_000 and im.stage(199).batch_size == 50_000
    assert im.stage(199).step == 0.5 and im.stage(199).tau_fudge == 4.0


def test_sampler_is_reproducible_and_resumable():
    a = BatchSampler(1000, seed=3)
    seq = [a.next(300) for _ in range(5)]
    b = BatchSampler(1000, seed=3)
    b.next(300)
    b.next(300)
    c = BatchSampler(1000, seed=3, pass_index=b.pass_index, offset=b.offset)
    assert all(np.array_equal(x, y) for x, y in zip(seq[2:], [c.next(300) for _ in range(3)]))
    assert len(np.unique(np.concatenate(seq[:3]))) >= 899   # one pass covers every particle


def test_blob_references_differ_and_fill_the_mask():
    refs = blob_references(4, (48, 48), 4.0, 150.0, rng=1)
    assert refs.shape == (4, 48, 48)
    yy, xx = np.mgrid[:48, :48] - 24
    outside = np.hypot(xx, yy) > 150 / 8 + 1
    assert np.abs(refs[:, outside]).max() == 0
    c = np.corrcoef(refs.reshape(4, -1))
    assert (np.abs(c[np.triu_indices(4, 1)]) < 0.6).all()
    vol = blob_references(2, (24, 24, 24), 4.0, 80.0, rng=2)
    assert vol.shape == (2, 24, 24, 24) and np.isfinite(vol).all()


def _three_class_state(K=4, seed=1):
    rng, shell, target = _problem(K=K, seed=seed)
    opt = VdamOptimiser(shell, 9, replacement="split", replacement_cooldown=5)
    st = new_state(target.copy(), np.ones(9))
    for _ in range(3):                          # give every class moments of its own
        opt.vdam_step(st, _acc(st.refs, target, 2.0, rng, noise=5.0), 0.9, 1.0)
    return rng, opt, st, target


def test_split_replacement_divides_the_biggest_class_symmetrically():
    rng, opt, st, target = _three_class_state()
    st.class_frac = np.array([0.6, 0.3, 0.099, 0.001])
    before = st.refs.copy()
    acc = _acc(st.refs, target, 2.0, rng, noise=5.0)
    acc.class_weight = np.array([[60.0, 30.0, 10.0, 0.0], [60.0, 30.0, 10.0, 0.0]])
    replaced = opt.vdam_step(st, acc, 0.9, 1.0, inactivity_threshold=0.1)
    assert replaced == [(3, 0)]                        # emptiest <- biggest (not the copy rule)
    a, b = st.refs[3], st.refs[0]
    # neither copy is favoured: both moved from b's old reference by the same amount, each
    # towards its own half-set moment, and they differ (by b's half-set disagreement)
    da = np.linalg.norm(a - before[0])
    db = np.linalg.norm(b - before[0])
    assert da == pytest.approx(db, rel=0.3)
    assert np.linalg.norm(a - b) > 1e-3 * np.linalg.norm(b)
    assert np.allclose(st.mom1[0, 3], st.mom1[1, 3]) and np.allclose(st.mom1[0, 0], st.mom1[1, 0])
    assert st.class_frac[3] == pytest.approx(st.class_frac[0])
    assert st.class_frac[0] < 0.35


def test_split_source_is_the_class_with_the_largest_score():
    """With a split score (the 2D driver's misfit per class) the split divides the class
    that scores highest, not the biggest one; without it, the biggest."""
    rng, opt, st, target = _three_class_state()
    st.class_frac = np.array([0.6, 0.3, 0.099, 0.001])
    acc = _acc(st.refs, target, 2.0, rng, noise=5.0)
    acc.class_weight = np.array([[60.0, 30.0, 10.0, 0.0], [60.0, 30.0, 10.0, 0.0]])
    replaced = opt.vdam_step(st, acc, 0.9, 1.0, inactivity_threshold=0.1,
                             split_score=np.array([1.0, 7.0, 3.0, 0.0]))
    assert replaced == [(3, 1)]
    assert st.class_frac[3] == pytest.approx(st.class_frac[1])
    assert st.class_frac[0] > 0.5                          # the biggest class is left alone
    rng, opt, st, target = _three_class_state()
    st.class_frac = np.array([0.6, 0.3, 0.099, 0.001])
    assert opt.vdam_step(st, acc, 0.9, 1.0, inactivity_threshold=0.1) == [(3, 0)]


def test_split_replacement_protects_fresh_classes_from_churn():
    rng, opt, st, target = _three_class_state()
    pairs = []
    for _ in range(12):
        # class 3 never gets particles: it must not be re-seeded every batch, and the source
        # of a split must not be the class that was just re-seeded
        acc = _acc(st.refs, target, 2.0, rng, noise=5.0)
        acc.class_weight = np.array([[60.0, 30.0, 10.0, 0.0], [60.0, 30.0, 10.0, 0.0]])
        st.class_frac[3] = 1e-4
        pairs += opt.vdam_step(st, acc, 0.9, 1.0, inactivity_threshold=0.1)
    assert len(pairs) >= 2                                # it is replaced, not forgotten
    assert all(b != 3 for _, b in pairs)
    times_3 = [i for i, (a, _) in enumerate(pairs) if a == 3]
    assert len(times_3) <= 3                              # cooldown of 5 over 12 batches


def test_copy_replacement_stays_the_default_for_the_initial_model():
    rng, shell, target = _problem(K=2)
    assert VdamOptimiser(shell, 9).replacement == "copy"
    with pytest.raises(ValueError):
        VdamOptimiser(shell, 9, replacement="steal")


def test_misfit_split_moves_the_new_class_towards_the_worse_fitting_group():
    """With fit-group accumulators (slot 0: the particles b fits worse, slot 1: the others)
    the new class a starts on the worse group's side and b on the other's; without them
    (None) the split is the half-set one."""
    rng, opt, st, target = _three_class_state()
    st.class_frac = np.array([0.6, 0.3, 0.099, 0.001])
    other = (rng.standard_normal(target.shape[1:])
             + 1j * rng.standard_normal(target.shape[1:])).astype(np.complex64) * 10
    v0 = st.refs[0].copy()

    def groups(b):
        assert b == 0
        acc = _acc(st.refs, target, 2.0, rng)
        acc.data[0, 0] = 2.0 * (other - v0)            # the worse group looks like `other`
        acc.data[1, 0] = 2.0 * (target[0] - v0)         # the better one like b's reference
        return acc

    acc = _acc(st.refs, target, 2.0, rng, noise=5.0)
    acc.class_weight = np.array([[60.0, 30.0, 10.0, 0.0], [60.0, 30.0, 10.0, 0.0]])
    assert opt.vdam_step(st, acc, 0.9, 1.0, inactivity_threshold=0.1,
                         split_groups=groups) == [(3, 0)]
    a, b = st.refs[3], st.refs[0]
    d = other - target[0]
    # a moved along (other - target) and b the other way, by the same amount
    pa = float(np.real(np.vdot(d, a - v0)))
    pb = float(np.real(np.vdot(d, b - v0)))
    assert pa > 0.05 * np.vdot(d, d).real and pb < -0.05 * np.vdot(d, d).real
    assert pa == pytest.approx(-pb, rel=0.3)
    assert np.allclose(st.mom1[0, 3], st.mom1[1, 3])
    # no groups for this class (too few particles): the half-set split
    rng, opt, st, target = _three_class_state()
    st.class_frac = np.array([0.6, 0.3, 0.099, 0.001])
    acc = _acc(st.refs, target, 2.0, rng, noise=5.0)
    acc.class_weight = np.array([[60.0, 30.0, 10.0, 0.0], [60.0, 30.0, 10.0, 0.0]])
    assert opt.vdam_step(st, acc, 0.9, 1.0, inactivity_threshold=0.1,
                         split_groups=lambda b: None) == [(3, 0)]
    assert not np.allclose(st.mom1[0, 3], st.mom1[0, 0])
