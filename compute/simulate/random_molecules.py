"""Random Gaussian pseudo-atom molecules (training shapes for the class ranker).

The built-in molecules (:mod:`compute.simulate.molecules`) are six fixed shapes; a network
trained on a few of them learns their outlines. This module draws unlimited random
proteins of the same kind (ellipsoidal domains filled with pseudo-atoms) with varied size
(45–300 Å), domain count, elongation and symmetry (C1, Cn, Dn, helical segments), and
random variants of the built-in *training* molecules (anisotropic scaling, a deleted
cap, atom thinning).

Names (accepted by :func:`get_molecule`, so a job description stays a plain string):

* ``rand:<seed>`` — a random blob-domain protein (:func:`random_molecule`);
* ``var:<name>:<seed>`` — a random variant of the built-in molecule ``name``
  (:func:`variant_molecule`);
* anything else — the built-in molecule of that name.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from compute.errors import ComputeError
from compute.simulate.molecules import (
    A3_PER_RESIDUE,
    Molecule,
    _ellipsoid,
    _finish,
    _rot_z,
    molecule,
)

#: about the most pseudo-atoms of a random molecule (larger ones get coarser atoms, like ``ribosome``)
MAX_ATOMS = 4000
DIAMETER_RANGE_A = (45.0, 300.0)
SYMMETRIES = ("C1", "Cn", "Dn", "helix")
SYMMETRY_P = (0.55, 0.2, 0.12, 0.13)
CN_ORDERS = (2, 3, 5, 6, 7, 8)
DN_ORDERS = (3, 4, 5)
#: smallest semi-axis of a domain after scaling (no sub-residue specks)
MIN_RADIUS_A = 7.0


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _domains(rng: np.random.Generator, n_dom: int) -> list[tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]]:
    """A connected chain/tree of ellipsoids (centre, radii, orientation), unit-ish size."""
    doms = []
    for i in range(n_dom):
        size = rng.lognormal(0.0, 0.35)
        elong = rng.uniform(1.0, 2.8)
        radii = size * np.array([1.0, rng.uniform(0.6, 1.0), elong]) * rng.uniform(0.8, 1.2, 3)
        rot = _random_rotation(rng)
        if i == 0:
            centre = np.zeros(3)
        else:
            parent_c, parent_r, _ = doms[int(rng.integers(0, i))]
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            # touching or slightly overlapping the parent
            reach = (parent_r.mean() + radii.mean()) * rng.uniform(0.55, 1.05)
            centre = parent_c + d * reach
        doms.append((centre, radii, rot))
    return doms


def _extent(doms) -> float:
    return max(float(np.linalg.norm(c)) + float(r.max()) for c, r, _ in doms)


@lru_cache(maxsize=32)
def random_molecule(seed: int, diameter_a: float | None = None) -> Molecule:
    """A random protein of ellipsoidal domains (seeded: the same seed, the same atoms).

    Size is log-uniform in :data:`DIAMETER_RANGE_A` unless ``diameter_a`` is given;
    symmetry C1 (55 %), Cn with n in :data:`CN_ORDERS` (20 %), Dn with n in
    :data:`DN_ORDERS` (12 %) or a helical
    segment (13 %); 1–6 domains per asymmetric unit with elongation up to ~3.
    """
    rng = np.random.default_rng([int(seed), 0x5CA1E])
    target = float(diameter_a) if diameter_a else float(
        np.exp(rng.uniform(*np.log(DIAMETER_RANGE_A))))
    sym = str(rng.choice(SYMMETRIES, p=SYMMETRY_P))
    n_dom = int(rng.integers(1, 7)) if sym == "C1" else int(rng.integers(1, 4))
    doms = _domains(rng, n_dom)
    # centre the asymmetric unit, then place it for the symmetry
    com = np.mean([c for c, _, _ in doms], axis=0)
    doms = [(c - com, r, o) for c, r, o in doms]
    ops: list[tuple[np.ndarray, np.ndarray]] = [(np.eye(3), np.zeros(3))]
    symmetry = "C1"
    extra: dict = {}
    if sym in ("Cn", "Dn"):
        # C4 and D2 are left out: the ranker's held-aside validation molecules (c4ring,
        # d2) have those symmetries, and no training shape should imitate them
        n = int(rng.choice(CN_ORDERS if sym == "Cn" else DN_ORDERS))
        unit = _extent(doms)
        off = np.array([unit * rng.uniform(0.6, 1.6), 0.0, rng.uniform(-0.5, 0.5) * unit])
        doms = [(c + off, r, o) for c, r, o in doms]
        ops = [(_rot_z(360.0 * i / n), np.zeros(3)) for i in range(n)]
        if sym == "Dn":
            flip = np.diag([1.0, -1.0, -1.0])
            ops = ops + [(flip @ R, t) for R, t in ops]
        symmetry = f"{sym[0]}{n}"
    elif sym == "helix":
        n = int(rng.integers(5, 16))
        unit = _extent(doms)
        rise = unit * rng.uniform(0.4, 1.0)
        twist = float(rng.uniform(20.0, 180.0))
        off = np.array([unit * rng.uniform(0.2, 1.0), 0.0, 0.0])
        doms = [(c + off, r, o) for c, r, o in doms]
        ops = [(_rot_z(i * twist), np.array([0.0, 0.0, (i - (n - 1) / 2) * rise]))
               for i in range(n)]
        extra = {"helical_rise_a": rise, "helical_twist_deg": twist}
    # scale to the target diameter (allowing for the atom width)
    all_c = [(R @ c + t, r) for c, r, _ in doms for R, t in ops]
    ext = max(float(np.linalg.norm(c)) + float(r.max()) for c, r in all_c)
    scale = 0.5 * target / max(ext, 1e-6)
    doms = [(c * scale, np.maximum(r * scale, MIN_RADIUS_A), o) for c, r, o in doms]
    total_vol = sum(4.0 / 3.0 * np.pi * np.prod(r) for _, r, _ in doms) * len(ops)
    a3 = max(A3_PER_RESIDUE, total_vol / MAX_ATOMS)
    sigma = max(2.0, 0.45 * a3 ** (1.0 / 3.0))
    sub = np.concatenate([_ellipsoid(rng, c, r, a3, o) for c, r, o in doms])
    pts = np.concatenate([sub @ R.T + t for R, t in ops])
    if extra:
        extra["helical_rise_a"] = float(extra["helical_rise_a"] * scale)
    return _finish(f"rand:{seed}", pts, sigma, a3, symmetry if sym != "helix" else "C1",
                   f"random {sym} protein, {n_dom} domain(s)/unit, ~{target:.0f} A",
                   centre=True, **extra)


@lru_cache(maxsize=32)
def variant_molecule(name: str, seed: int) -> Molecule:
    """A random variant of the built-in molecule ``name``: anisotropic scaling along random
    axes (0.75–1.3), a random cap deleted (0–25 % of the atoms) and mild coordinate noise."""
    base = molecule(name)
    rng = np.random.default_rng([int(seed), 0xA7A7])
    R = _random_rotation(rng)
    S = np.diag(rng.uniform(0.75, 1.3, 3))
    pts = base.coords_a @ (R @ S @ R.T).T
    w = base.weights
    if rng.random() < 0.7:
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        proj = pts @ d
        cut = np.quantile(proj, 1.0 - rng.uniform(0.05, 0.25))
        keep = proj <= cut
        pts, w = pts[keep], w[keep]
    pts = pts + rng.normal(0, 0.5 * base.sigma_a, pts.shape)
    pts = pts - (pts * w[:, None]).sum(axis=0) / w.sum()
    pts.setflags(write=False)
    w = np.array(w)
    w.setflags(write=False)
    return Molecule(f"var:{name}:{seed}", pts, w, base.sigma_a, "C1",
                    f"random variant of {name}", {})


def get_molecule(name: str) -> Molecule:
    """Resolve ``rand:<seed>``, ``var:<name>:<seed>`` or a built-in molecule name."""
    try:
        if name.startswith("rand:"):
            return random_molecule(int(name.split(":", 1)[1]))
        if name.startswith("var:"):
            _, base, seed = name.split(":")
            return variant_molecule(base, int(seed))
    except ValueError:
        raise ComputeError(f"bad random molecule name {name!r} (rand:<seed> or "
                           f"var:<name>:<seed>)") from None
    return molecule(name)

