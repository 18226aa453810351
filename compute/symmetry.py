"""Point-group symmetry with RELION's axis conventions: Cn, Dn, T, O, I (I1-I4).

Groups are generated from RELION's generator axes (the same as Xmipp's): Cn about z; Dn with
the n-fold on z and a 2-fold on x; T with a 3-fold on z and a 2-fold on (0, 0.816496, 0.577350);
O with 4-folds on x, y, z; I = I2 with 2-folds on x, y, z and a 5-fold in the xz plane; I1, I3,
I4 as RELION defines them. Matrices act on (x, y, z) column vectors; volumes are indexed
``[z, y, x]`` with the centre at ``n // 2``.

:func:`align_to_symmetry` finds where a map's symmetry axes are and rotates the map so that they
lie on RELION's standard axes (what ``relion_align_symmetry`` does for the initial model).
"""

from __future__ import annotations

import re

import numpy as np

from compute import backend as be
from compute.backend import xp_of
from compute.errors import ComputeError

_GENERATORS: dict[str, list[tuple[int, tuple[float, float, float]]]] = {
    "T": [(3, (0, 0, 1)), (2, (0, 0.816496, 0.577350))],
    "O": [(3, (0.5773502, 0.5773502, 0.5773502)), (4, (0, 0, 1))],
    "I2": [(2, (0, 0, 1)), (5, (0.525731114, 0, 0.850650807)), (3, (0, 0.356822076, 0.934172364))],
    "I1": [(2, (1, 0, 0)), (5, (0.85065080702670, 0, -0.5257311142635)),
           (3, (0.9341723640, 0.3568220765, 0))],
    "I3": [(2, (-0.5257311143, 0, 0.8506508070)), (5, (0, 0, 1)),
           (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
    "I4": [(2, (0.5257311143, 0, 0.8506508070)), (5, (0.8944271932547096, 0, 0.4472135909903704)),
           (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
}


def axis_rotation(axis, angle_rad: float) -> np.ndarray:
    """Active rotation matrix by ``angle_rad`` about ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * K + (1 - np.cos(angle_rad)) * K @ K


def parse_symmetry(name: str) -> tuple[str, int]:
    """``"C4"`` -> ``("C", 4)``, ``"D2"`` -> ``("D", 2)``, ``"I"`` -> ``("I2", 60)``, ..."""
    s = str(name).strip().upper()
    m = re.fullmatch(r"([CD])(\d+)", s)
    if m:
        n = int(m.group(2))
        if n < 1:
            raise ComputeError(f"symmetry {name!r}: the order must be at least 1")
        return m.group(1), n
    if s in ("T", "O"):
        return s, 12 if s == "T" else 24
    if s in ("I", "I1", "I2", "I3", "I4"):
        return ("I2" if s == "I" else s), 60
    raise ComputeError(f"unknown symmetry {name!r}; use C<n>, D<n>, T, O, I, I1, I2, I3 or I4")


def symmetry_matrices(name: str) -> np.ndarray:
    """All rotation matrices of the point group, identity first, shape ``(order, 3, 3)``."""
    kind, n = parse_symmetry(name)
    if kind == "C":
        gens = [(n, (0.0, 0.0, 1.0))]
    elif kind == "D":
        gens = [(n, (0.0, 0.0, 1.0)), (2, (1.0, 0.0, 0.0))]
    else:
        gens = _GENERATORS[kind]
    gmats = [axis_rotation(ax, 2 * np.pi / fold) for fold, ax in gens]
    group = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for g in frontier:
            for h in gmats:
                m = h @ g
                if not any(np.abs(m - q).max() < 1e-4 for q in group):
                    group.append(m)
                    new.append(m)
        frontier = new
        if len(group) > 200:  # pragma: no cover - generators are wrong
            raise ComputeError(f"symmetry {name}: group does not close")
    return np.array(group)


def order(name: str) -> int:
    return int(symmetry_matrices(name).shape[0])


def rotate_volume(vol, matrix, order_: int = 1):
    """``V'(r) = V(M^T r)``: the map rotated actively by ``M`` about its centre ``n // 2``.

    ``M`` acts on (x, y, z); the volume is indexed ``[z, y, x]``. Linear interpolation.
    """
    xp = xp_of(vol)
    nd = be.ndimage_of(vol)
    n = vol.shape[0]
    c = n // 2
    M = np.asarray(matrix, dtype=np.float64)
    # index-space matrix: index (z, y, x) <-> coords (x, y, z) reversed
    P = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.float64)
    Mi = P @ M.T @ P  # maps output index offsets to input index offsets
    offset = np.full(3, c) - Mi @ np.full(3, c)
    return nd.affine_transform(vol, xp.asarray(Mi), offset=xp.asarray(offset), order=order_,
                               mode="constant", cval=0.0)


def symmetrise(vol, name: str):
    """Average of the map over the group's rotations (RELION's axes)."""
    mats = symmetry_matrices(name)
    if len(mats) == 1:
        return vol.copy()
    acc = vol.astype(np.float32, copy=True)
    for m in mats[1:]:
        acc += rotate_volume(vol, m)
    return acc / len(mats)


def _corr(a, b) -> float:
    xp = xp_of(a)
    a = a - a.mean()
    b = b - b.mean()
    return float(xp.sum(a * b) / max(float(xp.sqrt(xp.sum(a * a) * xp.sum(b * b))), 1e-30))


def symmetry_score(vol, name: str, placement: np.ndarray) -> float:
    """Mean correlation of the map with itself under the group placed by ``placement``.

    ``placement`` maps RELION's standard axes into the map's frame; a group element ``g`` acts
    on the map as ``placement @ g @ placement.T``.
    """
    mats = symmetry_matrices(name)[1:]
    if len(mats) == 0:
        return 1.0
    P = np.asarray(placement)
    return float(np.mean([_corr(vol, rotate_volume(vol, P @ g @ P.T)) for g in mats]))


def _coarse_placements(step_deg: float) -> np.ndarray:
    from compute.geometry import euler_to_matrix

    rots = np.arange(0, 360, step_deg)
    tilts = np.arange(0, 180 + 1e-9, step_deg)
    psis = np.arange(0, 360, step_deg)
    r, t, p = np.meshgrid(rots, tilts, psis, indexing="ij")
    return euler_to_matrix(r.ravel(), t.ravel(), p.ravel())


def find_symmetry_placement(vol, name: str, coarse_step_deg: float = 20.0,
                            work_box: int = 20) -> tuple[np.ndarray, float]:
    """Rotation ``P`` that maps RELION's standard symmetry axes onto the map's own axes.

    A coarse search over SO(3) on a down-sampled, low-passed copy of the map is followed by a
    local simplex refinement at the full size. Returns ``(P, score)`` (score: mean correlation
    of the map with its symmetry mates, 1 = perfectly symmetric).
    """
    from scipy.optimize import minimize

    from compute.fourier import fourier_crop
    from compute.geometry import euler_to_matrix, matrix_to_euler

    v = be.to_numpy(vol).astype(np.float32)
    if order(name) == 1:
        return np.eye(3), 1.0
    n = v.shape[0]
    small = fourier_crop(v, (work_box,) * 3) if n > work_box else v
    cands = _coarse_placements(coarse_step_deg)
    # the score only depends on where the axes go: dedupe placements that differ by a group
    # element on the right by keeping the full grid (cheap at this size) and taking the best
    scores = np.array([symmetry_score(small, name, P) for P in cands])
    best = cands[np.argsort(scores)[::-1][:3]]

    def neg(angles):
        P = euler_to_matrix(*angles)
        return -symmetry_score(v, name, P)

    results = []
    for P0 in best:
        x0 = np.asarray(matrix_to_euler(P0), dtype=np.float64)
        r = minimize(neg, x0, method="Nelder-Mead",
                     options={"xatol": 0.2, "fatol": 1e-5, "maxiter": 150,
                              "initial_simplex": x0 + np.vstack([np.zeros(3),
                                                                 np.eye(3) * coarse_step_deg / 2])})
        results.append((r.fun, r.x))
    fun, x = min(results, key=lambda t: t[0])
    return euler_to_matrix(*x), float(-fun)


def align_to_symmetry(vol, name: str, **kw) -> tuple[np.ndarray, np.ndarray, float]:
    """Rotate the map so its symmetry axes lie on RELION's standard axes, then symmetrise.

    Returns ``(aligned_map, placement, score)``; ``placement`` is the rotation that was found
    (the map's axes = ``placement`` applied to the standard axes).
    """
    P, score = find_symmetry_placement(vol, name, **kw)
    aligned = rotate_volume(vol, P.T)
    return symmetrise(aligned, name), P, score
