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


def generator_matrices(name: str) -> np.ndarray:
    """The group's generator rotations (a map invariant under them is invariant under all)."""
    kind, n = parse_symmetry(name)
    if kind == "C":
        gens = [(n, (0.0, 0.0, 1.0))] if n > 1 else []
    elif kind == "D":
        gens = ([(n, (0.0, 0.0, 1.0))] if n > 1 else []) + [(2, (1.0, 0.0, 0.0))]
    else:
        gens = _GENERATORS[kind]
    return np.array([axis_rotation(ax, 2 * np.pi / fold) for fold, ax in gens]).reshape(-1, 3, 3)


def symmetry_score(vol, name: str, placement: np.ndarray, mats=None) -> float:
    """Mean correlation of the map with itself under the group placed by ``placement``.

    ``placement`` maps RELION's standard axes into the map's frame; a group element ``g`` acts
    on the map as ``placement @ g @ placement.T``. By default the generators are used (cheaper,
    and zero-error exactly when the map has the whole group's symmetry).
    """
    mats = generator_matrices(name) if mats is None else mats
    if len(mats) == 0:
        return 1.0
    P = np.asarray(placement)
    return float(np.mean([_corr(vol, rotate_volume(vol, P @ g @ P.T)) for g in mats]))


def _z_to(d) -> np.ndarray:
    """A rotation taking the z axis onto the unit vector ``d``."""
    d = np.asarray(d, dtype=np.float64)
    d = d / np.linalg.norm(d)
    z = np.array([0.0, 0.0, 1.0])
    c = float(z @ d)
    if c > 1 - 1e-12:
        return np.eye(3)
    if c < -1 + 1e-12:
        return axis_rotation((1.0, 0.0, 0.0), np.pi)
    ax = np.cross(z, d)
    return axis_rotation(ax, float(np.arccos(np.clip(c, -1, 1))))


def _coarse_placements(name: str, step_deg: float) -> np.ndarray:
    """Candidate placements ``P = Rz->d @ Rz(psi)``: the main axis ``d`` on a HEALPix-like
    grid of one hemisphere (an axis and its opposite give the same group), psi over the range
    that the group does not already make equivalent."""
    from compute.orientations import healpix_directions, order_for_step

    kind, n = parse_symmetry(name)
    rot, tilt = healpix_directions(order_for_step(step_deg))
    keep = tilt <= 90.0 + 1e-6
    r, t = np.radians(rot[keep]), np.radians(tilt[keep])
    dirs = np.stack([np.cos(r) * np.sin(t), np.sin(r) * np.sin(t), np.cos(t)], 1)
    if kind == "C":
        psi_max = 0.0 if n > 1 else 360.0
    elif kind == "D":
        psi_max = 180.0 / n
    else:
        psi_max = 360.0
    psis = np.arange(0.0, psi_max, step_deg) if psi_max > 0 else np.zeros(1)
    out = [_z_to(d) @ axis_rotation((0, 0, 1), np.radians(p)) for d in dirs for p in psis]
    return np.array(out)


def _rotvec_matrix(v) -> np.ndarray:
    a = float(np.linalg.norm(v))
    return np.eye(3) if a < 1e-12 else axis_rotation(np.asarray(v) / a, a)


def find_symmetry_placement(vol, name: str, coarse_step_deg: float = 15.0,
                            work_box: int = 16, refine_box: int = 32,
                            n_starts: int = 3) -> tuple[np.ndarray, float]:
    """Rotation ``P`` that maps RELION's standard symmetry axes onto the map's own axes.

    A coarse search (main axis over a hemisphere x the in-plane angles the group leaves
    distinct) on a down-sampled copy of the map is followed by a simplex refinement of a
    rotation vector on a ``refine_box`` copy. Returns ``(P, score)`` (score: mean correlation
    of the full-size map with its generator mates, 1 = perfectly symmetric).
    """
    from scipy.optimize import minimize

    from compute.fourier import fourier_crop

    v = be.to_numpy(vol).astype(np.float32)
    if order(name) == 1:
        return np.eye(3), 1.0
    n = v.shape[0]
    small = fourier_crop(v, (work_box,) * 3) if n > work_box else v
    mid = fourier_crop(v, (refine_box,) * 3) if n > refine_box else v
    cands = _coarse_placements(name, coarse_step_deg)
    scores = np.array([symmetry_score(small, name, P) for P in cands])
    order_idx = np.argsort(scores)[::-1]
    starts = [cands[order_idx[0]]]
    for i in order_idx[1:]:  # distinct starting points
        if len(starts) >= n_starts:
            break
        if all(_placement_distance_deg(cands[i], s, name) > 2 * coarse_step_deg for s in starts):
            starts.append(cands[i])

    results = []
    for P0 in starts:
        def neg(x, P0=P0):
            return -symmetry_score(mid, name, _rotvec_matrix(x) @ P0)

        s0 = np.radians(coarse_step_deg) / 2
        r = minimize(neg, np.zeros(3), method="Nelder-Mead",
                     options={"xatol": 1e-3, "fatol": 1e-5, "maxiter": 120,
                              "initial_simplex": np.vstack([np.zeros(3), np.eye(3) * s0])})
        results.append((r.fun, _rotvec_matrix(r.x) @ P0))
    _, P = min(results, key=lambda t: t[0])
    return P, symmetry_score(v, name, P)


def _placement_distance_deg(a, b, name: str) -> float:
    """Smallest rotation angle between placements ``a`` and ``b g`` over the group."""
    g = symmetry_matrices(name)
    M = np.einsum("ji,gjk->gik", a, np.einsum("ij,gjk->gik", b, g))
    tr = np.einsum("gii->g", M)
    return float(np.degrees(np.arccos(np.clip((tr.max() - 1) / 2, -1, 1))))


def align_to_symmetry(vol, name: str, **kw) -> tuple[np.ndarray, np.ndarray, float]:
    """Rotate the map so its symmetry axes lie on RELION's standard axes, then symmetrise.

    Returns ``(aligned_map, placement, score)``; ``placement`` is the rotation that was found
    (the map's axes = ``placement`` applied to the standard axes).
    """
    P, score = find_symmetry_placement(vol, name, **kw)
    aligned = rotate_volume(vol, P.T)
    return symmetrise(aligned, name), P, score


def _best_shift(a, b, max_frac: float = 0.25) -> tuple[np.ndarray, float]:
    """Integer shift ``s`` (z, y, x; at most ``max_frac`` of the box) maximising the
    correlation of ``a`` moved by ``s`` with ``b``, and that correlation."""
    a = a - a.mean()
    b = b - b.mean()
    cc = np.fft.irfftn(np.conj(np.fft.rfftn(a)) * np.fft.rfftn(b), s=a.shape,
                       axes=tuple(range(a.ndim)))
    n = np.array(a.shape)
    lag = [np.where(np.arange(m) <= m // 2, np.arange(m), np.arange(m) - m) for m in n]
    far = np.zeros(a.shape, dtype=bool)
    for ax, L in enumerate(lag):
        sh = [1] * a.ndim
        sh[ax] = -1
        far |= np.abs(L).reshape(sh) > max_frac * n[ax]
    cc[far] = -np.inf
    i = np.unravel_index(int(np.argmax(cc)), cc.shape)
    norm = max(float(np.sqrt(np.sum(a * a) * np.sum(b * b))), 1e-30)
    return np.array([L[k] for L, k in zip(lag, i)], dtype=np.float64), float(cc[i]) / norm


def align_map_to_reference(vol, ref, coarse_step_deg: float = 30.0, work_box: int = 16,
                           refine_box: int = 32, allow_mirror: bool = True,
                           n_candidates: int = 4) -> tuple[np.ndarray, float, bool]:
    """Rotate and shift ``vol`` (and mirror it when that fits better: a de novo model's hand
    is arbitrary) onto ``ref``. Returns ``(aligned_map, correlation, mirrored)``.

    Coarse search over SO(3) (HEALPix directions x in-plane angles at ``coarse_step_deg``) on
    down-sampled copies, each rotation with its best translation (FFT cross-correlation: a
    de novo map's origin is arbitrary too); the ``n_candidates`` best rotations of each hand
    are each refined by a simplex over a rotation vector and a sub-voxel shift on ``refine_box``
    copies, and the best refined one is applied to the full map. Used to compare an initial
    model with the ground truth (tests, benchmarks).
    """
    from scipy.optimize import minimize

    from compute.fourier import fourier_crop, shift_volume
    from compute.orientations import grid_matrices, order_for_step

    v = be.to_numpy(vol).astype(np.float32)
    r = be.to_numpy(ref).astype(np.float32)
    n = v.shape[0]
    crop = (lambda a, m: fourier_crop(a, (m,) * 3) if n > m else a)  # noqa: E731
    cands = grid_matrices(order_for_step(coarse_step_deg))
    rs = crop(r, work_box)
    ws = rs.shape[0]
    scored = []
    for mirror in ((False, True) if allow_mirror else (False,)):
        vs = crop(v[::-1].copy() if mirror else v, work_box)
        for ci, M in enumerate(cands):
            sh, sc = _best_shift(rotate_volume(vs, M), rs)
            scored.append((sc, ci, mirror, sh * (n / ws)))
    scored.sort(key=lambda t: -t[0])
    # the best few of each hand: at the coarse size the two hands of a compact map score
    # alike, and a symmetric map's top candidates are its symmetry copies of one optimum
    hands = (False, True) if allow_mirror else (False,)
    starts = [t for h in hands for t in [u for u in scored if u[2] == h][:max(1, n_candidates)]]
    rm = crop(r, refine_box)
    m_box = rm.shape[0]
    s0 = np.radians(coarse_step_deg) / 2
    best = None
    for _, ci, mirror, sh_full in starts:
        vm = crop(v[::-1].copy() if mirror else v, refine_box)
        M0 = cands[ci]

        def neg(x, vm=vm, M0=M0):
            rot = rotate_volume(vm, _rotvec_matrix(x[:3]) @ M0)
            return -_corr(shift_volume(rot, x[3:]), rm)

        x0 = np.concatenate([np.zeros(3), sh_full * (m_box / n)])
        simplex = np.vstack([x0, x0 + np.diag([s0, s0, s0, 1.0, 1.0, 1.0])])
        res = minimize(neg, x0, method="Nelder-Mead",
                       options={"xatol": 1e-3, "fatol": 1e-5, "maxiter": 600,
                                "initial_simplex": simplex})
        if best is None or res.fun < best[0]:
            best = (float(res.fun), res.x, M0, mirror)
    _, x, M0, mirror = best
    vv = v[::-1].copy() if mirror else v
    out = shift_volume(rotate_volume(vv, _rotvec_matrix(x[:3]) @ M0), x[3:] * (n / m_box))
    return out, _corr(out, r), mirror
