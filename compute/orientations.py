"""Orientation sampling on SO(3) as RELION does it: HEALPix directions x in-plane angles.

HEALPix order ``k`` (``nside = 2**k``) gives ``12 nside^2`` equal-area viewing directions with
an angular step of about ``60 / 2**k`` degrees (order 2 = 15 deg, 3 = 7.5 deg, 4 = 3.75 deg,
5 = 1.875 deg); the in-plane angle psi uses the same step. Directions are RELION's
(rot, tilt) = (phi, theta) of the pixel centres.

The ring-scheme pixel centres are computed here (a few lines of closed-form geometry) rather
than pulling in healpy and its astropy dependency for one function.
"""

from __future__ import annotations

import numpy as np

from compute.geometry import euler_to_matrix


def healpix_step_deg(order: int) -> float:
    """Angular sampling of a HEALPix order (RELION: 60 / 2**order degrees)."""
    return 60.0 / (2 ** int(order))


def order_for_step(step_deg: float) -> int:
    """Smallest HEALPix order whose step is at most ``step_deg``."""
    k = 0
    while healpix_step_deg(k) > step_deg + 1e-9:
        k += 1
    return k


def healpix_directions(order: int) -> tuple[np.ndarray, np.ndarray]:
    """(rot, tilt) in degrees of the ``12 * 4**order`` HEALPix ring-scheme pixel centres."""
    nside = 2 ** int(order)
    npix = 12 * nside * nside
    ncap = 2 * nside * (nside - 1)
    ipix = np.arange(npix)
    z = np.empty(npix)
    phi = np.empty(npix)
    north = ipix < ncap
    south = ipix >= npix - ncap
    eq = ~(north | south)
    # polar caps
    for mask, sign in ((north, 1.0), (south, -1.0)):
        ip = (ipix[mask] + 1) if sign > 0 else (npix - ipix[mask])
        iring = np.floor(0.5 * (1 + np.sqrt(2 * ip - 1))).astype(np.int64)
        iphi = ip - 2 * iring * (iring - 1)
        if sign < 0:
            iphi = 4 * iring + 1 - iphi
        z[mask] = sign * (1.0 - iring**2 / (3.0 * nside * nside))
        phi[mask] = (iphi - 0.5) * np.pi / (2.0 * iring)
    # equatorial belt
    ip = ipix[eq] - ncap
    iring = ip // (4 * nside) + nside
    iphi = ip % (4 * nside) + 1
    fodd = np.where((iring + nside) % 2 == 1, 1.0, 0.5)
    z[eq] = (2 * nside - iring) * 2.0 / (3.0 * nside)
    phi[eq] = (iphi - fodd) * np.pi / (2.0 * nside)
    tilt = np.degrees(np.arccos(np.clip(z, -1, 1)))
    rot = np.degrees(phi) % 360.0
    return rot, tilt


def psi_angles(order: int) -> np.ndarray:
    step = healpix_step_deg(order)
    n = int(round(360.0 / step))
    return np.arange(n) * (360.0 / n)


def orientation_grid(order: int) -> np.ndarray:
    """All (rot, tilt, psi) of an order, shape ``(12 * 4**order * n_psi, 3)`` in degrees."""
    rot, tilt = healpix_directions(order)
    psi = psi_angles(order)
    r = np.repeat(rot, len(psi))
    t = np.repeat(tilt, len(psi))
    p = np.tile(psi, len(rot))
    return np.stack([r, t, p], axis=1)


def grid_matrices(order: int) -> np.ndarray:
    g = orientation_grid(order)
    return euler_to_matrix(g[:, 0], g[:, 1], g[:, 2])


def local_perturbations(step_deg: float, n_steps: int = 1, full: bool = False) -> np.ndarray:
    """Small rotations around identity for local searches, as matrices ``(m, 3, 3)``.

    By default the identity and ``±k*step`` about each of the x, y and z axes
    (``1 + 6 n_steps`` rotations, a "star" that a coarse-to-fine search halves per level);
    ``full`` gives the cubic grid of ``(2 n_steps + 1)^3`` products instead.
    """
    from compute.symmetry import axis_rotation

    vals = np.radians(np.arange(-n_steps, n_steps + 1) * step_deg)
    if not full:
        mats = [np.eye(3)]
        for ax in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
            mats += [axis_rotation(ax, a) for a in vals if a != 0]
        return np.array(mats)
    mats = []
    for a in vals:
        for b in vals:
            for c in vals:
                mats.append(axis_rotation((1, 0, 0), a) @ axis_rotation((0, 1, 0), b)
                            @ axis_rotation((0, 0, 1), c))
    return np.array(mats)
