"""Built-in test molecules made of Gaussian pseudo-atoms, and density maps from atoms.

Each molecule is a fixed (seeded) cloud of pseudo-atoms, roughly one per residue
(~110 Da, one per ~136 A^3 of protein), filling ellipsoidal domains arranged into
a distinctive shape:

============  ========  ==================================================================
name          symmetry  shape
============  ========  ==================================================================
``asym``      C1        ~115 A "boot": three unequal domains and an arm (no symmetry)
``c4ring``    C4        ~120 A ring of four chiral subunits around z
``d2``        D2        ~110 A dimer of dimers (2-folds along x, y and z)
``ribosome``  C1        ~210 A large/small subunit pair with a cleft (coarse pseudo-atoms)
``rod``       C1        ~320 A helical filament of 14 subunits along z (rise 22 A, twist 167)
``small``     C1        ~55 A compact asymmetric protein (wrong-size picks, small boxes)
============  ========  ==================================================================

Coordinates are in Angstrom in the molecule frame (x, y, z), centred on the
centre of mass. Maps are indexed ``[z, y, x]`` with the centre at ``box // 2``
on each axis (RELION's convention), and each atom integrates to its weight, so a
map's sum (and each projection's sum) is independent of the pixel size.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from compute.errors import ComputeError

#: Angstrom^3 of protein per residue-sized pseudo-atom (1.35 g/cm^3, 110 Da)
A3_PER_RESIDUE = 136.0


@dataclass(frozen=True)
class Molecule:
    """A Gaussian pseudo-atom model.

    Attributes
    ----------
    name : str
    coords_a : (n, 3) float array of x, y, z in Angstrom, centred at the origin.
    weights : (n,) float array, scattering weight per atom (1 = one ~110 Da residue).
    sigma_a : float, standard deviation of each atom's Gaussian in Angstrom.
    symmetry : str, point group in RELION notation (``C1``, ``C4``, ``D2``).
    description : str
    """

    name: str
    coords_a: np.ndarray
    weights: np.ndarray
    sigma_a: float
    symmetry: str = "C1"
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        return int(self.coords_a.shape[0])

    @property
    def diameter_a(self) -> float:
        """Largest extent: twice the largest atom distance from the centre plus 2 sigma."""
        r = np.sqrt((self.coords_a**2).sum(axis=1)).max()
        return float(2.0 * (r + 2.0 * self.sigma_a))

    @property
    def mass_kda(self) -> float:
        return float(self.weights.sum() * 0.110)

    def radius_of_gyration_a(self) -> float:
        w = self.weights / self.weights.sum()
        return float(np.sqrt((w[:, None] * self.coords_a**2).sum()))


# --- building blocks -----------------------------------------------------------------------

def _rot_z(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rot_axis(axis, deg: float) -> np.ndarray:
    """Active rotation about a unit axis (Rodrigues)."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    a = np.deg2rad(deg)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K


def _ellipsoid(rng: np.random.Generator, centre, radii, a3_per_atom: float,
               orient: np.ndarray | None = None) -> np.ndarray:
    """Points filling an ellipsoid uniformly at the given volume per atom."""
    radii = np.asarray(radii, dtype=np.float64)
    vol = 4.0 / 3.0 * np.pi * np.prod(radii)
    n = max(1, int(round(vol / a3_per_atom)))
    pts = []
    need = n
    while need > 0:
        p = rng.uniform(-1.0, 1.0, size=(2 * need + 8, 3))
        p = p[(p**2).sum(axis=1) <= 1.0][:need]
        pts.append(p)
        need -= len(p)
    p = np.concatenate(pts) * radii
    if orient is not None:
        p = p @ orient.T
    return p + np.asarray(centre, dtype=np.float64)


def _finish(name: str, pts: np.ndarray, sigma_a: float, a3_per_atom: float, symmetry: str,
            description: str, centre: bool = True, **extra) -> Molecule:
    w = np.full(len(pts), a3_per_atom / A3_PER_RESIDUE)
    if centre:
        pts = pts - (pts * w[:, None]).sum(axis=0) / w.sum()
    pts.setflags(write=False)
    w.setflags(write=False)
    return Molecule(name, pts, w, float(sigma_a), symmetry, description, dict(extra))


def _seed(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def _asym() -> Molecule:
    rng = _seed("asym")
    parts = [
        _ellipsoid(rng, (-14, 0, -4), (30, 22, 18), A3_PER_RESIDUE, _rot_axis((0, 0, 1), 20)),
        _ellipsoid(rng, (26, 18, 6), (17, 14, 12), A3_PER_RESIDUE),
        _ellipsoid(rng, (-6, -16, 30), (8, 8, 22), A3_PER_RESIDUE, _rot_axis((1, 0.3, 0), 35)),
        _ellipsoid(rng, (12, -24, -18), (9, 9, 9), A3_PER_RESIDUE),
    ]
    return _finish("asym", np.concatenate(parts), 2.0, A3_PER_RESIDUE, "C1",
                   "asymmetric three-domain 'boot' with an arm (~57 kDa)")


def _symmetrise(sub: np.ndarray, ops: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([sub @ op.T for op in ops])


def _c4ring() -> Molecule:
    rng = _seed("c4ring")
    sub = np.concatenate([
        _ellipsoid(rng, (40, 0, 0), (13, 10, 24), A3_PER_RESIDUE, _rot_axis((1, 0, 0), 15)),
        _ellipsoid(rng, (46, 12, 16), (8, 8, 8), A3_PER_RESIDUE),
        _ellipsoid(rng, (28, -8, -18), (6, 6, 6), A3_PER_RESIDUE),
    ])
    pts = _symmetrise(sub, [_rot_z(90.0 * i) for i in range(4)])
    return _finish("c4ring", pts, 2.0, A3_PER_RESIDUE, "C4",
                   "ring of four chiral subunits around z (C4, ~52 kDa)", centre=False)


def _d2() -> Molecule:
    rng = _seed("d2")
    sub = np.concatenate([
        _ellipsoid(rng, (22, 12, 15), (20, 11, 13), A3_PER_RESIDUE, _rot_axis((0, 0, 1), 25)),
        _ellipsoid(rng, (36, 2, 28), (8, 7, 7), A3_PER_RESIDUE),
    ])
    ops = [np.eye(3), np.diag([1.0, -1, -1]), np.diag([-1.0, 1, -1]), np.diag([-1.0, -1, 1])]
    return _finish("d2", _symmetrise(sub, ops), 2.0, A3_PER_RESIDUE, "D2",
                   "dimer of dimers, 2-folds along x, y, z (D2, ~44 kDa)", centre=False)


def _ribosome() -> Molecule:
    rng = _seed("ribosome")
    a3 = 700.0  # coarse pseudo-atoms keep the atom count low; weights keep the mass
    parts = [
        _ellipsoid(rng, (0, 0, -28), (68, 62, 52), a3),
        _ellipsoid(rng, (-40, 35, -30), (22, 18, 30), a3),     # L1-stalk-like protrusion
        _ellipsoid(rng, (45, -20, -10), (18, 14, 34), a3),     # stalk
        _ellipsoid(rng, (8, 6, 48), (58, 40, 26), a3, _rot_axis((0, 1, 0), 12)),  # small subunit
        _ellipsoid(rng, (-38, -6, 62), (16, 14, 14), a3),      # head
    ]
    pts = np.concatenate(parts)
    # carve the inter-subunit cleft
    cleft = ((pts - np.array([10, 0, 18])) ** 2 / np.array([40, 26, 9]) ** 2).sum(axis=1) < 1
    return _finish("ribosome", pts[~cleft], 4.0, a3, "C1",
                   "ribosome-like pair of subunits with a cleft (~1 MDa)")


def _rod() -> Molecule:
    rng = _seed("rod")
    sub = np.concatenate([
        _ellipsoid(rng, (22, 0, 0), (16, 12, 11), A3_PER_RESIDUE),
        _ellipsoid(rng, (32, 8, 6), (7, 7, 7), A3_PER_RESIDUE),
    ])
    n, rise, twist = 14, 22.0, 166.7
    pts = np.concatenate([sub @ _rot_z(i * twist).T + np.array([0, 0, (i - (n - 1) / 2) * rise])
                          for i in range(n)])
    return _finish("rod", pts, 2.0, A3_PER_RESIDUE, "C1",
                   "helical filament segment along z (14 subunits, rise 22 A, twist 166.7 deg)",
                   helical_rise_a=rise, helical_twist_deg=twist)


def _small() -> Molecule:
    rng = _seed("small")
    pts = np.concatenate([
        _ellipsoid(rng, (0, 0, 0), (18, 14, 12), A3_PER_RESIDUE),
        _ellipsoid(rng, (16, 10, 4), (8, 7, 7), A3_PER_RESIDUE),
    ])
    return _finish("small", pts, 2.0, A3_PER_RESIDUE, "C1", "small compact protein (~55 A, 12 kDa)")


_BUILDERS: dict[str, Callable[[], Molecule]] = {
    "asym": _asym, "c4ring": _c4ring, "d2": _d2, "ribosome": _ribosome, "rod": _rod,
    "small": _small,
}
_CACHE: dict[str, Molecule] = {}


def available_molecules() -> list[str]:
    """Names accepted by :func:`molecule`."""
    return list(_BUILDERS)


def molecule(name: str) -> Molecule:
    """The built-in molecule ``name`` (always the same atoms: built from a fixed seed)."""
    if name not in _BUILDERS:
        raise ComputeError(f"unknown molecule {name!r}; built-in: {', '.join(_BUILDERS)}")
    if name not in _CACHE:
        _CACHE[name] = _BUILDERS[name]()
    return _CACHE[name]


def default_box(mol: Molecule, pixel_size_a: float, factor: float = 1.5) -> int:
    """An even box (pixels) holding ``factor`` x the molecule's diameter."""
    n = int(np.ceil(factor * mol.diameter_a / pixel_size_a))
    return n + (n % 2)


def _gauss_1d(pos, sigma_px: float, lo, n_taps: int, box: int):
    """Per-atom 1D Gaussian taps: indices ``(n, L)`` and normalised weights ``(n, L)``."""
    idx = lo[:, None] + np.arange(n_taps)[None, :]
    g = np.exp(-0.5 * ((idx - pos[:, None]) / sigma_px) ** 2) / (np.sqrt(2 * np.pi) * sigma_px)
    ok = (idx >= 0) & (idx < box)
    return np.clip(idx, 0, box - 1), np.where(ok, g, 0.0)


def effective_sigma_px(mol: Molecule, pixel_size_a: float, min_sigma_px: float = 0.6) -> float:
    """Atom width in pixels used for rendering: never below ``min_sigma_px`` (anti-aliasing)."""
    return float(max(mol.sigma_a / pixel_size_a, min_sigma_px))


def density_map(mol: Molecule, box: int, pixel_size_a: float, *,
                min_sigma_px: float = 0.6, dtype=np.float32) -> np.ndarray:
    """Render a molecule as a cubic density map.

    Parameters
    ----------
    mol : Molecule
    box : int
        Edge of the cubic map in pixels (centre at ``box // 2``).
    pixel_size_a : float
        Angstrom per voxel.
    min_sigma_px : float
        Atoms narrower than this (in voxels) are widened to it so the map is band-limited
        (no aliasing); at coarse pixel sizes the map is then a low-pass version of the model.

    Returns
    -------
    ndarray ``(box, box, box)`` indexed ``[z, y, x]``; each atom sums to its weight.
    """
    if box < 4 or pixel_size_a <= 0:
        raise ComputeError(f"density_map needs box >= 4 and pixel size > 0 (got {box}, "
                           f"{pixel_size_a})")
    s = effective_sigma_px(mol, pixel_size_a, min_sigma_px)
    pos = mol.coords_a / pixel_size_a + box // 2  # x, y, z in voxels
    half = int(np.ceil(4.0 * s))
    n_taps = 2 * half + 2
    lo = np.floor(pos).astype(np.int64) - half
    out = np.zeros(box**3, dtype=np.float64)
    chunk = max(1, int(4e6 // n_taps**3))
    for a in range(0, mol.n_atoms, chunk):
        sl = slice(a, a + chunk)
        ix, gx = _gauss_1d(pos[sl, 0], s, lo[sl, 0], n_taps, box)
        iy, gy = _gauss_1d(pos[sl, 1], s, lo[sl, 1], n_taps, box)
        iz, gz = _gauss_1d(pos[sl, 2], s, lo[sl, 2], n_taps, box)
        gz = gz * mol.weights[sl, None]
        flat = (iz[:, :, None, None] * box + iy[:, None, :, None]) * box + ix[:, None, None, :]
        w = gz[:, :, None, None] * gy[:, None, :, None] * gx[:, None, None, :]
        out += np.bincount(flat.ravel(), weights=w.ravel(), minlength=box**3)
    return out.reshape(box, box, box).astype(dtype)
