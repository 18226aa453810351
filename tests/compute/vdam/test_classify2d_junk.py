"""Split replacement that divides the worst-fitting class: junk gets classes of its own."""

from __future__ import annotations

import numpy as np

from compute.vdam.classify2d import class_misfit


def test_class_misfit_scores_the_class_holding_outliers():
    rng = np.random.default_rng(0)
    # class 0: 60 particles that all fit alike; class 1: 20, four of them far worse (junk);
    # class 2: two particles (too few to judge); class 3: none in this batch
    cls = np.r_[np.zeros(60), np.ones(20), [2, 2]].astype(np.int64)
    ll = -1000.0 + rng.normal(0.0, 5.0, len(cls))
    ll[60:64] -= 400.0
    ll[80:82] -= 400.0
    s = class_misfit(cls, ll, 4)
    assert s.shape == (4,)
    assert s[1] > 5 * s[0] > 0                 # the outliers, not the size, decide
    assert s[2] == 0.0 and s[3] == 0.0
    # more outliers score more; a uniform shift of a class (a worse but homogeneous fit) does
    # not change its score
    ll2 = ll.copy()
    ll2[64:68] -= 400.0
    assert class_misfit(cls, ll2, 4)[1] > s[1]
    ll3 = ll.copy()
    ll3[:60] -= 300.0
    assert np.isclose(class_misfit(cls, ll3, 4)[0], s[0])


def _stack_with_junk(n, seed, junk_kinds=("aggregate", "wrongsize"), junk_fraction=0.25,
                     box=32, snr=0.15):
    """Three molecules, each seen from one fixed view at random in-plane angles, plus junk
    (labels: molecule index, -1 for junk)."""
    from compute.geometry import euler_to_matrix
    from compute.simulate.particles import simulate_particles
    from compute.vdam.estep2d import CtfBatch

    rng = np.random.default_rng(seed)
    mols = ("asym", "c4ring", "rod")
    views = rng.uniform([0, 30], [360, 150], (3, 2))
    which = rng.integers(0, 3, n)
    psi = rng.uniform(0, 360, n)
    imgs = np.empty((n, box, box), dtype=np.float32)
    lab = np.full(n, -1)
    du, dv, ang = np.empty(n), np.empty(n), np.empty(n)
    for m in range(3):
        sel = np.nonzero(which == m)[0]
        st = simulate_particles(len(sel), (mols[m],), box=box, snr=snr, seed=seed * 10 + m,
                                rotations=euler_to_matrix(views[m, 0], views[m, 1], psi[sel]),
                                junk_fraction=junk_fraction, junk_kinds=junk_kinds,
                                max_shift_px=1.5, pixel_size_a=4.0)
        imgs[sel] = st.images
        lab[sel] = np.where(st.truth.is_junk, -1, m)
        t = st.truth.ctf
        du[sel], dv[sel], ang[sel] = t.defocus_u_a, t.defocus_v_a, t.defocus_angle_deg
    z = np.zeros(n)
    return imgs, lab, CtfBatch(du, dv, ang, z + 300.0, z + 2.7, z + 0.1, z, z + 40.0)


def _junk_gathered(cls, lab, K):
    junk = lab == -1
    jc = [k for k in range(K) if (cls == k).any() and np.mean(junk[cls == k]) >= 0.7]
    return float(np.isin(cls[junk], jc).mean())


def test_misfit_split_gives_junk_classes_of_its_own():
    """480 particles of three molecules, a quarter of them aggregates and wrong-size
    particles, 8 classes, replacement forced often (rho 0.9). Splitting the worst-fitting
    class gathers the junk into junk classes (>= 70 % junk) in every one of 8 seeds and more
    of it than splitting the biggest class, which in some seeds forms no junk class at all
    (measured: 0.42-0.72 against 0.00-0.60 of the junk, means 0.51 and 0.33). Measured with
    the half-set split, which this test keeps (with the misfit split, the default since, the
    means were 0.41 and 0.50 in this small, constantly re-seeded set; docs/class2d.md)."""
    from compute.vdam.classify2d import ArraySource, Classify2D, Classify2DParams

    K = 8
    got = {"misfit": [], "largest": []}
    for seed in range(1, 9):
        imgs, lab, ctf = _stack_with_junk(480, seed)
        for rule in got:
            p = Classify2DParams(n_classes=K, n_iter=24, particle_diameter_a=100,
                                 psi_step_deg=12, offset_range_px=2, offset_step_px=1,
                                 seed=2, inactivity_threshold=0.9, split_source=rule,
                                 split_mode="halfset")
            clf = Classify2D(ArraySource(imgs, 4.0, ctf), p)
            clf.initialise()
            while not clf.done:
                clf.step()
            got[rule].append(_junk_gathered(clf.final_pass().class_index, lab, K))
    misfit, largest = np.array(got["misfit"]), np.array(got["largest"])
    assert misfit.min() >= 0.3
    assert misfit.mean() >= largest.mean() + 0.1
    assert (misfit > largest).sum() >= 5


def _two_molecule_stack(n, seed, frac_minor=0.3, box=32, snr=0.15):
    """Two molecules (asym, c4ring), each at one fixed view and random in-plane angles; label
    1 = the minority molecule (``frac_minor`` of the particles)."""
    from compute.geometry import euler_to_matrix
    from compute.simulate.particles import simulate_particles
    from compute.vdam.estep2d import CtfBatch

    rng = np.random.default_rng(seed)
    views = rng.uniform([0, 30], [360, 150], (2, 2))
    which = (rng.random(n) < frac_minor).astype(int)
    psi = rng.uniform(0, 360, n)
    imgs = np.empty((n, box, box), dtype=np.float32)
    du, dv, ang = np.empty(n), np.empty(n), np.empty(n)
    for m, mol in enumerate(("asym", "c4ring")):
        sel = np.nonzero(which == m)[0]
        st = simulate_particles(len(sel), (mol,), box=box, snr=snr, seed=seed * 10 + m,
                                rotations=euler_to_matrix(views[m, 0], views[m, 1], psi[sel]),
                                max_shift_px=1.5, pixel_size_a=4.0)
        imgs[sel] = st.images
        t = st.truth.ctf
        du[sel], dv[sel], ang[sel] = t.defocus_u_a, t.defocus_v_a, t.defocus_angle_deg
    z = np.zeros(n)
    return imgs, which, CtfBatch(du, dv, ang, z + 300.0, z + 2.7, z + 0.1, z, z + 40.0)


def _split_merged_class(seed, mode):
    """A class that holds both molecules (the reference of a one-class run) is split into an
    empty class in one middle-phase mini-batch; returns the fraction of the minority and of
    the majority molecule that the new class then wins."""
    from compute.vdam.classify2d import ArraySource, Classify2D, Classify2DParams

    imgs, lab, ctf = _two_molecule_stack(400, seed)
    src = ArraySource(imgs, 4.0, ctf)
    common = dict(particle_diameter_a=100, psi_step_deg=12, offset_range_px=2,
                  offset_step_px=1, seed=2, n_iter=20)
    one = Classify2D(src, Classify2DParams(n_classes=1, **common))
    one.initialise()
    for _ in range(6):
        one.step()
    clf = Classify2D(src, Classify2DParams(n_classes=2, inactivity_threshold=0.5,
                                           split_mode=mode, **common))
    clf.initialise()
    s1, s = one.state, clf.state
    s.refs[:] = s1.refs[0]
    s.mom1[:] = s1.mom1[:, :1]
    s.mom2[:] = s1.mom2[0]
    s.sigma2 = s1.sigma2.copy()
    s.fsc[:] = s1.fsc[0]
    s.n_updates[:] = s1.n_updates[0]
    s.class_frac = np.array([0.999, 0.001])           # class 1 inactive: it takes half of 0
    s.iteration = clf.schedule.n_ini + 1              # middle phase: replacement is on
    clf.r_max = one.r_max
    info = clf.step()
    assert info.replaced == [(1, 0)]
    cls = clf.final_pass().class_index
    return float(np.mean(cls[lab == 1] == 1)), float(np.mean(cls[lab == 0] == 1))


def test_misfit_split_mode_sends_the_minority_molecule_to_the_new_class():
    """The misfit split seeds the new class from the particles its source fits worst, so for a
    class that merges two molecules (70/30) the new class wins the minority molecule at once
    (measured: all of it and 0-4 % of the majority in seeds 1-4); the half-set split divides
    the class along half-set noise (measured: 8-55 % of the minority, 22-87 % of the
    majority)."""
    got = {m: [_split_merged_class(seed, m) for seed in range(1, 5)]
           for m in ("misfit", "halfset")}
    for minor, major in got["misfit"]:
        assert minor >= 0.9 and major <= 0.1
    assert not all(minor >= 0.9 and major <= 0.1 for minor, major in got["halfset"])
