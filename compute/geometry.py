"""Rotations in RELION's convention: ZYZ Euler angles (rot, tilt, psi) in degrees.

The matrix is ``A = Rz(psi) @ Ry(tilt) @ Rz(rot)`` with the *passive* elementary rotations

    Rz(a) = [[ cos a, sin a, 0],      Ry(b) = [[cos b, 0, -sin b],
             [-sin a, cos a, 0],               [    0, 1,      0],
             [     0,     0, 1]]               [sin b, 0,  cos b]]

(RELION's ``Euler_angles2matrix``). ``A`` maps a point of the reference volume to
the frame of the particle image: the image of a particle with angles
(rot, tilt, psi) is the projection along z of the volume rotated by ``A``,

    image(x, y) = sum_z V(A^T (x, y, z)),

equivalently its 2D Fourier transform is the central slice ``F3(A^T (kx, ky, 0))``.
The projection direction in the volume frame is ``A^T (0, 0, 1)`` =
``(cos rot sin tilt, sin rot sin tilt, cos tilt)``; psi is the in-plane rotation.

All functions are vectorised: angles broadcast to ``(..., 3, 3)`` matrices and
matrices of shape ``(..., 3, 3)`` give angles of shape ``(...)``. They accept
NumPy or CuPy arrays (the module is taken from the inputs).
"""

from __future__ import annotations

import numpy as np

from compute.backend import xp_of


def euler_to_matrix(rot, tilt, psi):
    """RELION rotation matrices from ZYZ Euler angles in degrees.

    Parameters
    ----------
    rot, tilt, psi : float or array
        ``rlnAngleRot``, ``rlnAngleTilt``, ``rlnAnglePsi`` in degrees (broadcast together).

    Returns
    -------
    array, shape ``(..., 3, 3)``
        ``A = Rz(psi) Ry(tilt) Rz(rot)`` (float64), mapping volume coordinates to image
        coordinates.
    """
    xp = xp_of(rot, tilt, psi)
    a, b, g = xp.broadcast_arrays(*(xp.deg2rad(xp.asarray(v, dtype=np.float64))
                                    for v in (rot, tilt, psi)))
    ca, sa, cb, sb, cg, sg = xp.cos(a), xp.sin(a), xp.cos(b), xp.sin(b), xp.cos(g), xp.sin(g)
    m = xp.empty(a.shape + (3, 3), dtype=np.float64)
    m[..., 0, 0] = cg * cb * ca - sg * sa
    m[..., 0, 1] = cg * cb * sa + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cb * ca - cg * sa
    m[..., 1, 1] = -sg * cb * sa + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sb * ca
    m[..., 2, 1] = sb * sa
    m[..., 2, 2] = cb
    return m


def matrix_to_euler(matrices):
    """ZYZ Euler angles (rot, tilt, psi) in degrees from RELION rotation matrices.

    Inverse of :func:`euler_to_matrix` with tilt in [0, 180]; rot and psi in (-180, 180].
    At tilt = 0 or 180 (gimbal lock) rot is set to 0 and the whole in-plane angle is psi.

    Parameters
    ----------
    matrices : array, shape ``(..., 3, 3)``

    Returns
    -------
    array, shape ``(..., 3)``
        Columns rot, tilt, psi in degrees.
    """
    xp = xp_of(matrices)
    m = xp.asarray(matrices, dtype=np.float64)
    sb = xp.sqrt(m[..., 0, 2] ** 2 + m[..., 1, 2] ** 2)
    tilt = xp.arctan2(sb, m[..., 2, 2])
    regular = sb > 1e-9
    rot = xp.where(regular, xp.arctan2(m[..., 2, 1], m[..., 2, 0]), 0.0)
    psi_reg = xp.arctan2(m[..., 1, 2], -m[..., 0, 2])
    # gimbal lock: A = Rz(psi + rot) (tilt 0) or Rz(psi - rot) Ry(180) (tilt 180)
    psi_up = xp.arctan2(-m[..., 1, 0], m[..., 0, 0])
    psi_down = xp.arctan2(m[..., 1, 0], -m[..., 0, 0])
    psi = xp.where(regular, psi_reg, xp.where(m[..., 2, 2] > 0, psi_up, psi_down))
    return xp.rad2deg(xp.stack([rot, tilt, psi], axis=-1))


def quaternion_to_matrix(q):
    """Rotation matrices (active, ``R @ v``) from unit quaternions ``(..., 4)`` = (w, x, y, z)."""
    xp = xp_of(q)
    q = xp.asarray(q, dtype=np.float64)
    q = q / xp.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    m = xp.empty(q.shape[:-1] + (3, 3), dtype=np.float64)
    m[..., 0, 0] = 1 - 2 * (y * y + z * z)
    m[..., 0, 1] = 2 * (x * y - z * w)
    m[..., 0, 2] = 2 * (x * z + y * w)
    m[..., 1, 0] = 2 * (x * y + z * w)
    m[..., 1, 1] = 1 - 2 * (x * x + z * z)
    m[..., 1, 2] = 2 * (y * z - x * w)
    m[..., 2, 0] = 2 * (x * z - y * w)
    m[..., 2, 1] = 2 * (y * z + x * w)
    m[..., 2, 2] = 1 - 2 * (x * x + y * y)
    return m


def random_rotations(n: int, rng: np.random.Generator | int | None = None):
    """``n`` rotation matrices drawn uniformly (Haar measure) from SO(3), shape ``(n, 3, 3)``.

    Uses normalised 4D Gaussian quaternions, which are uniform on the 3-sphere.
    """
    rng = np.random.default_rng(rng)
    return quaternion_to_matrix(rng.standard_normal((int(n), 4)))


def random_euler(n: int, rng: np.random.Generator | int | None = None):
    """``n`` uniformly distributed orientations as RELION (rot, tilt, psi) degrees, ``(n, 3)``."""
    return matrix_to_euler(random_rotations(n, rng))


def projection_direction(rot, tilt):
    """Unit viewing direction(s) in the volume frame for (rot, tilt) in degrees, ``(..., 3)``.

    This is ``A^T (0, 0, 1)``: the volume axis that projects onto the image's z.
    """
    xp = xp_of(rot, tilt)
    a = xp.deg2rad(xp.asarray(rot, dtype=np.float64))
    b = xp.deg2rad(xp.asarray(tilt, dtype=np.float64))
    a, b = xp.broadcast_arrays(a, b)
    return xp.stack([xp.cos(a) * xp.sin(b), xp.sin(a) * xp.sin(b), xp.cos(b)], axis=-1)


def angular_distance_deg(a, b):
    """Rotation angle (degrees) of ``a^T b`` for matrices ``(..., 3, 3)``: 0 when equal."""
    xp = xp_of(a, b)
    tr = xp.einsum("...ji,...ji->...", xp.asarray(a), xp.asarray(b))
    return xp.rad2deg(xp.arccos(xp.clip((tr - 1.0) / 2.0, -1.0, 1.0)))


def rotate_coordinates(coords, matrices):
    """Apply rotation matrices ``(..., 3, 3)`` to points ``(n, 3)``: returns ``(..., n, 3)``.

    With RELION matrices this gives the atom positions in each image frame
    (``x_img = A x_vol``).
    """
    xp = xp_of(coords, matrices)
    return xp.einsum("...ij,nj->...ni", xp.asarray(matrices), xp.asarray(coords))
