"""Ground-truth particle stacks for the VDAM tests, from the project's simulator.

Each molecule is seen from ONE fixed (rot, tilt) view with a random in-plane angle, so the
true 2D classes are the molecules and the true in-plane angles are known.
"""

from __future__ import annotations

import numpy as np

from compute.geometry import euler_to_matrix
from compute.simulate.particles import simulate_particles
from compute.vdam.estep2d import CtfBatch

MOLECULES = ("asym", "c4ring", "rod")


def fixed_view_stack(n: int, n_mol: int = 2, box: int = 32, snr: float = 0.5, seed: int = 0,
                     junk_fraction: float = 0.0, max_shift_px: float = 1.5):
    """(ParticleStack, molecule index per particle (-1 for junk), CtfBatch)."""
    rng = np.random.default_rng(seed)
    mols = MOLECULES[:n_mol]
    # one view per molecule (seeded), random psi per particle
    views = rng.uniform([0, 30], [360, 150], (n_mol, 2))
    which = rng.integers(0, n_mol, n)
    psi = rng.uniform(0, 360, n)
    rots = np.stack([views[which, 0], views[which, 1], psi], 1)
    # the simulator draws the molecule itself; give it ours through per-molecule runs
    out_imgs = np.empty((n, box, box), dtype=np.float32)
    truth_mol = np.full(n, -1)
    parts = []
    for m in range(n_mol):
        sel = np.nonzero(which == m)[0]
        st = simulate_particles(len(sel), (mols[m],), box=box, snr=snr, seed=seed * 10 + m,
                                rotations=euler_to_matrix(rots[sel, 0], rots[sel, 1], rots[sel, 2]),
                                junk_fraction=junk_fraction, max_shift_px=max_shift_px,
                                pixel_size_a=4.0)
        out_imgs[sel] = st.images
        truth_mol[sel] = np.where(st.truth.is_junk, -1, m)
        parts.append((sel, st.truth))
    du = np.empty(n)
    dv = np.empty(n)
    ang = np.empty(n)
    for sel, t in parts:
        du[sel], dv[sel], ang[sel] = t.ctf.defocus_u_a, t.ctf.defocus_v_a, t.ctf.defocus_angle_deg
    z = np.zeros(n)
    ctf = CtfBatch(du, dv, ang, z + 300.0, z + 2.7, z + 0.1, z, z + 40.0)
    return out_imgs, truth_mol, psi, ctf
