"""Particle stacks with per-particle CTF, noise at a chosen SNR, several molecules and junk.

Images look like RELION extraction output: protein WHITE (the projection times the CTF,
no contrast inversion needed), background noise of standard deviation 1 and mean 0.

Signal model, per particle ``i`` (on the rfft grid of the box)::

    F_i(k) = CTF_i(k) * sum_c Slice_c(k) * exp(-2 pi i k . (centre - origin_c))  (+ junk)
    image_i = irfft2(F_i) / sigma + white_noise(1)

with ``CTF_i`` RELION's CTF (:func:`compute.ctf.gamma`), ``Slice_c`` a Fourier-slice
projection (:mod:`compute.simulate.project`) of each component ``c`` (the particle
itself, or the pieces of a junk image), and ``sigma`` chosen so that

    SNR = mean over true particles of var(clean image over the whole box) / sigma^2.

Junk kinds (``JUNK_KINDS``): ``ice`` (a dense, soft-edged blob, much stronger than a
particle), ``carbon`` (a carbon edge: a textured half-plane across the box), ``aggregate``
(3-7 overlapping copies), ``empty`` (noise only), ``offcentre`` (a particle 25-45 % of the
box away from the centre), ``wrongsize`` (the molecule scaled by 0.5 or 1.7) and
``neighbour`` (a centred particle with 1-2 neighbours cut by the box edge).

The generator is seeded: the same arguments and ``seed`` give bit-identical images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from compute import backend as be
from compute.ctf import CtfParams, frequency_grid, gamma
from compute.errors import ComputeError
from compute.geometry import euler_to_matrix, matrix_to_euler, random_rotations
from compute.simulate.molecules import Molecule, density_map, molecule
from compute.simulate.project import Projector, map_diameter_px, phase_shift_grid

JUNK_KINDS = ("ice", "carbon", "aggregate", "empty", "offcentre", "wrongsize", "neighbour")
GOOD = "particle"
#: kinds whose image contains a correctly sized molecule with a meaningful orientation
ORIENTED_KINDS = (GOOD, "offcentre", "neighbour")
WRONG_SIZE_FACTORS = (0.5, 1.7)
_CHUNK = 2048


def draw(rng: np.random.Generator, spec, n: int) -> np.ndarray:
    """``n`` values from a spec: a number (constant) or a ``(low, high)`` uniform range."""
    if spec is None:
        return np.zeros(n)
    if np.ndim(spec) == 0:
        return np.full(n, float(spec))
    lo, hi = (float(v) for v in spec)
    if hi < lo:
        raise ComputeError(f"range ({lo}, {hi}) has high < low")
    return rng.uniform(lo, hi, n)


@dataclass
class CtfDraw:
    """Per-image CTF parameters as arrays (RELION units and conventions)."""

    defocus_u_a: np.ndarray
    defocus_v_a: np.ndarray
    defocus_angle_deg: np.ndarray
    phase_shift_deg: np.ndarray
    bfactor_a2: np.ndarray
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1

    def params(self, i: int) -> CtfParams:
        return CtfParams(float(self.defocus_u_a[i]), float(self.defocus_v_a[i]),
                         float(self.defocus_angle_deg[i]), self.voltage_kv, self.cs_mm,
                         self.amplitude_contrast, float(self.phase_shift_deg[i]),
                         float(self.bfactor_a2[i]))

    def take(self, idx) -> CtfDraw:
        return CtfDraw(self.defocus_u_a[idx], self.defocus_v_a[idx],
                       self.defocus_angle_deg[idx], self.phase_shift_deg[idx],
                       self.bfactor_a2[idx], self.voltage_kv, self.cs_mm,
                       self.amplitude_contrast)


def draw_ctf(rng: np.random.Generator, n: int, *, defocus_um=(0.8, 2.5), astigmatism_a=(0, 300),
             phase_shift_deg=0.0, bfactor_a2=40.0, voltage_kv: float = 300.0,
             cs_mm: float = 2.7, amplitude_contrast: float = 0.1) -> CtfDraw:
    """Random CTF parameters: mean defocus (um), astigmatism U-V (A), angle uniform in
    [0, 180), U >= V; each spec is a number or a ``(low, high)`` range."""
    d = draw(rng, defocus_um, n) * 1e4
    a = draw(rng, astigmatism_a, n)
    ang = rng.uniform(0.0, 180.0, n)
    return CtfDraw(d + a / 2, d - a / 2, ang, draw(rng, phase_shift_deg, n),
                   draw(rng, bfactor_a2, n), float(voltage_kv), float(cs_mm),
                   float(amplitude_contrast))


def ctf_batch(shape: tuple[int, int], pixel_size_a: float, ctf: CtfDraw, xp=np,
              rfft: bool = True):
    """CTF images ``(n, ny, nx//2+1)`` (rfft grid, DC at [0, 0]) for every entry of ``ctf``.

    Uses :func:`compute.ctf.gamma` with per-image parameter arrays, so it is the same
    model as :func:`compute.ctf.ctf_2d`.
    """
    kx, ky = frequency_grid(shape, pixel_size_a, rfft=rfft, xp=xp)
    kx, ky = kx.astype(np.float32), ky.astype(np.float32)
    col = lambda a: xp.asarray(np.asarray(a, dtype=np.float32)[:, None, None])  # noqa: E731
    p = CtfParams(col(ctf.defocus_u_a), col(ctf.defocus_v_a), col(ctf.defocus_angle_deg),
                  ctf.voltage_kv, ctf.cs_mm, ctf.amplitude_contrast, col(ctf.phase_shift_deg),
                  0.0)
    c = -xp.sin(gamma(kx[None], ky[None], p))
    b = col(ctf.bfactor_a2)
    c = c * xp.exp(-b * (kx * kx + ky * ky)[None] / 4.0)
    return c.astype(np.float32)


@dataclass
class ParticleTruth:
    """Ground truth per image (arrays of length n) plus the stack's constants.

    ``kind`` is ``"particle"`` or a junk kind; ``molecule`` the molecule name drawn (also for
    molecule-based junk; ``""`` for ice/carbon/empty). Angles are RELION (rot, tilt, psi)
    degrees and origins RELION ``rlnOriginX/YAngst`` (NaN where a kind has none).
    ``micrograph`` groups images that share one CTF (``group_size``).
    """

    kind: np.ndarray
    molecule: np.ndarray
    rot_deg: np.ndarray
    tilt_deg: np.ndarray
    psi_deg: np.ndarray
    origin_x_a: np.ndarray
    origin_y_a: np.ndarray
    ctf: CtfDraw
    micrograph: np.ndarray
    pixel_size_a: float
    box: int
    snr: float
    noise_sigma: float
    seed: int | None
    molecules: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    @property
    def is_junk(self) -> np.ndarray:
        return self.kind != GOOD

    def rotations(self) -> np.ndarray:
        """RELION matrices ``(n, 3, 3)`` (NaN rows where there is no orientation)."""
        return euler_to_matrix(self.rot_deg, self.tilt_deg, self.psi_deg)

    def table(self) -> dict[str, np.ndarray]:
        """Columns named as RELION labels (plus ``scs*`` extras), ready for a STAR file."""
        return {
            "rlnAngleRot": self.rot_deg, "rlnAngleTilt": self.tilt_deg,
            "rlnAnglePsi": self.psi_deg,
            "rlnOriginXAngst": self.origin_x_a, "rlnOriginYAngst": self.origin_y_a,
            "rlnDefocusU": self.ctf.defocus_u_a, "rlnDefocusV": self.ctf.defocus_v_a,
            "rlnDefocusAngle": self.ctf.defocus_angle_deg,
            "rlnPhaseShift": self.ctf.phase_shift_deg, "rlnCtfBfactor": self.ctf.bfactor_a2,
            "rlnVoltage": np.full(len(self), self.ctf.voltage_kv),
            "rlnSphericalAberration": np.full(len(self), self.ctf.cs_mm),
            "rlnAmplitudeContrast": np.full(len(self), self.ctf.amplitude_contrast),
            "scsKind": self.kind, "scsMolecule": self.molecule,
            "scsMicrographIndex": self.micrograph,
        }

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (lists; NaN as None)."""
        def clean(a):
            a = np.asarray(a)
            if a.dtype.kind == "f":
                return [None if not np.isfinite(v) else float(v) for v in a]
            return a.tolist()
        return {
            "pixel_size_a": self.pixel_size_a, "box": self.box, "snr": self.snr,
            "noise_sigma": self.noise_sigma, "seed": self.seed, "molecules": self.molecules,
            "voltage_kv": self.ctf.voltage_kv, "cs_mm": self.ctf.cs_mm,
            "amplitude_contrast": self.ctf.amplitude_contrast,
            "particles": {k: clean(v) for k, v in self.table().items()},
        }


@dataclass
class ParticleStack:
    """Images ``(n, box, box)`` float32 (protein white, noise sigma 1) and their truth.

    ``clean`` holds the noise-free images on the same scale when asked for.
    """

    images: Any
    truth: ParticleTruth
    clean: Any = None


# --- sources of signal ---------------------------------------------------------------------

MoleculeSpec = str | Molecule | tuple[str, np.ndarray]


def _volume_for(spec: MoleculeSpec, box: int, pixel_size_a: float, factor: float = 1.0):
    """(name, volume) at the stack's box/pixel size; ``factor`` scales the apparent size."""
    if isinstance(spec, tuple):
        name, vol = spec
        vol = np.asarray(vol, dtype=np.float32)
        if vol.shape != (box, box, box):
            raise ComputeError(f"map {name!r} has shape {vol.shape}; the stack needs "
                               f"({box}, {box}, {box}) at {pixel_size_a} A/px (resample it "
                               "first with compute.simulate.project.resample_map)")
        if factor != 1.0:
            vol = _zoom_centred(vol, factor)
        return name, vol
    mol = molecule(spec) if isinstance(spec, str) else spec
    return mol.name, density_map(mol, box, pixel_size_a / factor)


def _zoom_centred(vol: np.ndarray, factor: float) -> np.ndarray:
    n = vol.shape[0]
    z = ndimage.zoom(vol, factor, order=1)
    m = z.shape[0]
    out = np.zeros_like(vol)
    if m >= n:
        o = m // 2 - n // 2
        out[:] = z[o:o + n, o:o + n, o:o + n]
    else:
        o = n // 2 - m // 2
        out[o:o + m, o:o + m, o:o + m] = z
    return out * (vol.sum() / max(float(out.sum()), 1e-30))


def _diameter_px(spec: MoleculeSpec, vol: np.ndarray, pixel_size_a: float) -> float:
    if isinstance(spec, tuple):
        return map_diameter_px(vol)
    mol = molecule(spec) if isinstance(spec, str) else spec
    return mol.diameter_a / pixel_size_a


def _soft_disk(box: int, cy: float, cx: float, r: float, edge: float) -> np.ndarray:
    y, x = np.mgrid[0:box, 0:box]
    d = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
    return 0.5 - 0.5 * np.tanh((d - r) / max(edge, 1e-3))


def _lowpass_noise(rng: np.random.Generator, box: int, corr_px: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal((box, box)), corr_px, mode="wrap")
    return n / max(n.std(), 1e-12)


def ice_blob(rng: np.random.Generator, box: int, amplitude: float, pad: int = 0) -> np.ndarray:
    """A dense, soft-edged contamination blob (positive = white after extraction).

    ``pad`` renders the same blob (placed relative to the central ``box``) on a canvas of
    ``box + 2 pad`` pixels, so a CTF applied to it has room for its fringes.
    """
    n = box + 2 * pad
    r = rng.uniform(0.2, 0.6) * box
    cy, cx = box / 2 + rng.uniform(-0.35, 0.35, 2) * box + pad
    yy, xx = np.mgrid[0:n, 0:n]
    # irregular outline: radius modulated with angle
    th = np.arctan2(yy - cy, xx - cx)
    k = rng.integers(2, 5)
    rr = r * (1 + 0.15 * np.sin(k * th + rng.uniform(0, 2 * np.pi)))
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    m = 0.5 - 0.5 * np.tanh((d - rr) / 1.5)
    tex = 1 + 0.15 * _lowpass_noise(rng, n, 3.0)
    return (amplitude * m * tex).astype(np.float32)


def carbon_edge(rng: np.random.Generator, box: int, amplitude: float, pad: int = 0) -> np.ndarray:
    """A textured half-plane (carbon film) with a soft straight edge crossing the box
    (``pad``: rendered on a ``box + 2 pad`` canvas, as :func:`ice_blob`)."""
    n = box + 2 * pad
    th = rng.uniform(0, 2 * np.pi)
    off = rng.uniform(-0.3, 0.3) * box
    yy, xx = np.mgrid[0:n, 0:n] - (box / 2 + pad)
    s = xx * np.cos(th) + yy * np.sin(th) - off
    m = 0.5 + 0.5 * np.tanh(s / 1.0)
    tex = 1 + 0.3 * _lowpass_noise(rng, n, 1.5)
    return (amplitude * m * tex).astype(np.float32)


@dataclass
class _Component:
    image: int
    source: int  # index into the projector list
    rot: np.ndarray
    origin_px: np.ndarray


def simulate_particles(
    n: int,
    molecules: Sequence[MoleculeSpec] = ("asym",),
    *,
    box: int = 64,
    pixel_size_a: float | None = None,
    fractions: Sequence[float] | None = None,
    junk_fraction: float = 0.0,
    junk_kinds: Sequence[str] = JUNK_KINDS,
    snr: float = 0.1,
    defocus_um=(0.8, 2.5),
    astigmatism_a=(0.0, 300.0),
    phase_shift_deg=0.0,
    bfactor_a2=40.0,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    max_shift_px: float = 2.0,
    structural_noise: float = 0.0,
    rotations=None,
    origins_a=None,
    group_size: int | None = None,
    apply_ctf: bool = True,
    return_clean: bool = False,
    seed: int | None = 0,
    device: str | None = "cpu",
) -> ParticleStack:
    """Simulate a particle stack with ground truth.

    Parameters
    ----------
    n : int
        Number of images.
    molecules : sequence
        Built-in names (see :func:`compute.simulate.molecules.available_molecules`),
        :class:`Molecule` objects, or ``(name, volume)`` pairs of user maps already at
        ``box`` and ``pixel_size_a`` (``[z, y, x]``, centred at ``box // 2``).
    box : int
        Image size in pixels.
    pixel_size_a : float or None
        Angstrom per pixel; default: the largest molecule spans ~2/3 of the box.
    fractions : sequence of float, optional
        Relative abundance of each molecule (default equal).
    junk_fraction : float
        Fraction of images that are junk, spread evenly over ``junk_kinds``.
    snr : float
        Mean variance of the clean true-particle images over the whole box divided by the
        noise variance (``inf`` for no noise); the noise level is set from the true particles
        of the first chunk (2048 images at 64 px, fewer for big boxes).
    defocus_um, astigmatism_a, phase_shift_deg, bfactor_a2
        A number or a ``(low, high)`` uniform range; mean defocus in um, astigmatism
        |U - V| in A, phase shift in degrees, CTF B-factor (envelope exp(-B k^2/4)) in A^2.
    voltage_kv, cs_mm, amplitude_contrast : float
    max_shift_px : float
        Origins of true particles uniform in [-max, max] pixels per axis.
    structural_noise : float
        Fraction (0-1) of the noise variance that is ice scattering modulated by each
        image's CTF (Thon rings in the noise, as in real extracted particles); the rest is
        white. The total noise variance stays 1.
    rotations : array, optional
        ``(n, 3, 3)`` matrices or ``(n, 3)`` Euler angles for every image (default: uniform).
    origins_a : array, optional
        ``(n, 2)`` rlnOriginX/YAngst for every image (overrides ``max_shift_px``).
    group_size : int, optional
        Images per "micrograph": consecutive groups share one CTF.
    apply_ctf : bool
        False gives pure projections (still noisy).
    return_clean : bool
        Also return the noise-free images (same scale).
    seed : int or None
    device : str or None
        ``"cpu"`` (default, reproducible bit for bit), ``"gpu"`` or ``"auto"``.

    Returns
    -------
    ParticleStack
    """
    if n < 1:
        raise ComputeError("simulate_particles needs n >= 1")
    if not molecules:
        raise ComputeError("simulate_particles needs at least one molecule")
    bad = [k for k in junk_kinds if k not in JUNK_KINDS]
    if bad:
        raise ComputeError(f"unknown junk kind(s) {bad}; known: {', '.join(JUNK_KINDS)}")
    if not 0.0 <= junk_fraction <= 1.0:
        raise ComputeError(f"junk_fraction {junk_fraction} is not in [0, 1]")
    if snr <= 0:
        raise ComputeError(f"snr must be > 0 (got {snr})")
    if not 0.0 <= structural_noise < 1.0:
        raise ComputeError(f"structural_noise {structural_noise} is not in [0, 1)")
    xp = be.get_xp(device)
    rng = np.random.default_rng(seed)
    specs = list(molecules)
    if pixel_size_a is None:
        diam = max((molecule(s) if isinstance(s, str) else s).diameter_a
                   for s in specs if not isinstance(s, tuple)) if any(
            not isinstance(s, tuple) for s in specs) else None
        if diam is None:
            raise ComputeError("pixel_size_a is required with user maps")
        pixel_size_a = float(diam / (box * 2.0 / 3.0))
    ps = float(pixel_size_a)

    # --- what each image is ---
    w = np.ones(len(specs)) if fractions is None else np.asarray(fractions, dtype=np.float64)
    if w.shape != (len(specs),) or (w < 0).any() or w.sum() <= 0:
        raise ComputeError("fractions must be one non-negative weight per molecule")
    mol_idx = rng.choice(len(specs), size=n, p=w / w.sum())
    kind = np.full(n, GOOD, dtype=object)
    n_junk = int(round(junk_fraction * n)) if junk_kinds else 0
    junk_pos = rng.choice(n, size=n_junk, replace=False) if n_junk else np.zeros(0, int)
    kind[junk_pos] = [junk_kinds[i % len(junk_kinds)] for i in range(n_junk)]
    kind = kind.astype(str)

    if rotations is not None:
        R = np.asarray(rotations, dtype=np.float64)
        if R.ndim == 2:
            R = euler_to_matrix(R[:, 0], R[:, 1], R[:, 2])
        if R.shape != (n, 3, 3):
            raise ComputeError(f"rotations must be ({n}, 3, 3) or ({n}, 3), got {R.shape}")
    else:
        R = random_rotations(n, rng)
    if origins_a is not None:
        org = np.asarray(origins_a, dtype=np.float64).reshape(n, 2) / ps
    else:
        org = rng.uniform(-max_shift_px, max_shift_px, (n, 2))

    if group_size:
        n_groups = -(-n // int(group_size))
        g = draw_ctf(rng, n_groups, defocus_um=defocus_um, astigmatism_a=astigmatism_a,
                     phase_shift_deg=phase_shift_deg, bfactor_a2=bfactor_a2,
                     voltage_kv=voltage_kv, cs_mm=cs_mm, amplitude_contrast=amplitude_contrast)
        micrograph = np.arange(n) // int(group_size)
        ctf = g.take(micrograph)
    else:
        ctf = draw_ctf(rng, n, defocus_um=defocus_um, astigmatism_a=astigmatism_a,
                       phase_shift_deg=phase_shift_deg, bfactor_a2=bfactor_a2,
                       voltage_kv=voltage_kv, cs_mm=cs_mm, amplitude_contrast=amplitude_contrast)
        micrograph = np.arange(n)

    # --- projectors: each molecule at its size, plus scaled copies for wrong-size junk ---
    sources: list[tuple[int, float]] = [(m, 1.0) for m in range(len(specs))]
    names, vols = [], []
    for m in range(len(specs)):
        nm, v = _volume_for(specs[m], box, ps)
        names.append(nm)
        vols.append(v)
    diam_px = [_diameter_px(specs[m], vols[m], ps) for m in range(len(specs))]
    if "wrongsize" in kind:
        for m in range(len(specs)):
            for f in WRONG_SIZE_FACTORS:
                sources.append((m, f))
    projectors: list[Projector | None] = [None] * len(sources)

    def projector(i: int) -> Projector:
        if projectors[i] is None:
            m, f = sources[i]
            vol = vols[m] if f == 1.0 else _volume_for(specs[m], box, ps, f)[1]
            projectors[i] = Projector(xp.asarray(vol))
        return projectors[i]

    # --- components of every image ---
    comps: list[_Component] = []
    rot_out = R.copy()
    org_out = org.copy()
    has_orient = np.isin(kind, ORIENTED_KINDS) | (kind == "wrongsize")
    molname = np.array([names[m] for m in mol_idx], dtype=object)
    extra_rng = np.random.default_rng(rng.integers(2**63))
    for i in range(n):
        k = kind[i]
        m = int(mol_idx[i])
        if k in (GOOD, "offcentre", "neighbour"):
            if k == "offcentre":
                r = extra_rng.uniform(0.25, 0.45) * box
                a = extra_rng.uniform(0, 2 * np.pi)
                org[i] = (r * np.cos(a), r * np.sin(a))
                org_out[i] = org[i]
            comps.append(_Component(i, m, R[i], org[i]))
            if k == "neighbour":
                for _ in range(int(extra_rng.integers(1, 3))):
                    mm = int(extra_rng.integers(len(specs)))
                    d = extra_rng.uniform(0.7, 1.0) * 0.5 * (diam_px[m] + diam_px[mm])
                    a = extra_rng.uniform(0, 2 * np.pi)
                    comps.append(_Component(i, mm, random_rotations(1, extra_rng)[0],
                                            org[i] + (d * np.cos(a), d * np.sin(a))))
        elif k == "wrongsize":
            f_idx = int(extra_rng.integers(len(WRONG_SIZE_FACTORS)))
            src = len(specs) + m * len(WRONG_SIZE_FACTORS) + f_idx
            comps.append(_Component(i, src, R[i], org[i]))
        elif k == "aggregate":
            for _ in range(int(extra_rng.integers(3, 8))):
                mm = int(extra_rng.integers(len(specs)))
                o = extra_rng.normal(0, 0.25 * diam_px[mm] + 1, 2)
                comps.append(_Component(i, mm, random_rotations(1, extra_rng)[0], o))
        if k not in (GOOD, "offcentre", "neighbour", "wrongsize"):
            rot_out[i] = np.nan
            org_out[i] = np.nan
        if k in ("ice", "carbon", "empty"):
            molname[i] = ""
    angles = matrix_to_euler(rot_out)
    angles[~has_orient] = np.nan

    # typical particle strength sets the scale of ice / carbon junk
    real_junk: dict[int, np.ndarray] = {}
    if np.isin(kind, ("ice", "carbon")).any():
        ref = projector(0).project(random_rotations(8, extra_rng))
        peak = float(np.mean([be.to_numpy(r).max() for r in ref]))
        for i in np.nonzero(np.isin(kind, ("ice", "carbon")))[0]:
            # rendered on a 2x canvas: the CTF fringes of these extended objects must not
            # wrap around the box (extraction crops them from a whole micrograph)
            if kind[i] == "ice":
                real_junk[i] = ice_blob(extra_rng, box, peak * extra_rng.uniform(2.0, 5.0),
                                        pad=box // 2)
            else:
                real_junk[i] = carbon_edge(extra_rng, box, peak * extra_rng.uniform(0.7, 1.5),
                                           pad=box // 2)

    # --- render chunk by chunk ---
    by_image: list[list[_Component]] = [[] for _ in range(n)]
    for c in comps:
        by_image[c.image].append(c)
    noise_rng = np.random.default_rng(extra_rng.integers(2**63))
    sigma = None
    images = np.empty((n, box, box), dtype=np.float32) if xp is np else xp.empty(
        (n, box, box), dtype=np.float32)
    clean_all = None
    if return_clean:
        clean_all = xp.empty((n, box, box), dtype=np.float32)
    # bound the Fourier work arrays (~200 MB per chunk) whatever the box
    chunk = int(max(64, min(_CHUNK, 2e8 // (box * (box // 2 + 1) * 8))))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        F = xp.zeros((stop - start, box, box // 2 + 1), dtype=np.complex64)
        chunk_comps = [c for i in range(start, stop) for c in by_image[i]]
        # rank of each component within its image: one rank at a time, image indices are
        # unique, so a plain fancy-index add works on NumPy and CuPy alike
        seen: dict[int, int] = {}
        ranks = []
        for c in chunk_comps:
            ranks.append(seen.get(c.image, 0))
            seen[c.image] = ranks[-1] + 1
        for s in range(len(sources)):
            for rank in range(max(ranks, default=-1) + 1):
                cs = [c for c, r in zip(chunk_comps, ranks) if c.source == s and r == rank]
                if not cs:
                    continue
                rr = np.stack([c.rot for c in cs])
                oo = np.stack([c.origin_px for c in cs])
                idx = np.array([c.image - start for c in cs])
                P = projector(s)
                for b in range(0, len(cs), 1024):
                    Fc = P.slices(xp.asarray(rr[b:b + 1024]))
                    Fc *= phase_shift_grid(box, xp.asarray(oo[b:b + 1024]), xp)
                    F[xp.asarray(idx[b:b + 1024])] += Fc
        cb_chunk = None
        if apply_ctf:
            cb_chunk = ctf_batch((box, box), ps, ctf.take(slice(start, stop)), xp=xp)
            F *= cb_chunk
        clean = be.irfft2(F, s=(box, box)).astype(np.float32)
        pad = box // 2
        for i, img in real_junk.items():
            if start <= i < stop:
                big = xp.asarray(img)
                if apply_ctf:
                    cb = ctf_batch(big.shape, ps, ctf.take(slice(i, i + 1)), xp=xp)[0]
                    big = be.irfft2(be.rfft2(big) * cb, s=big.shape)
                clean[i - start] += big[pad:pad + box, pad:pad + box].astype(np.float32)
        if sigma is None:
            good = xp.asarray(kind[start:stop] == GOOD)
            pool = clean[good] if bool(good.any()) else clean
            sig_var = float(xp.mean(xp.var(pool, axis=(1, 2))))
            sigma = float(np.sqrt(sig_var / snr)) if np.isfinite(snr) else 1.0
            if sigma <= 0:
                sigma = 1.0
        clean /= sigma
        noise = noise_rng.standard_normal((stop - start, box, box), dtype=np.float32) \
            if np.isfinite(snr) else np.zeros((stop - start, box, box), np.float32)
        noise = xp.asarray(noise)
        if structural_noise > 0 and np.isfinite(snr) and cb_chunk is not None:
            # part of the noise is scattering by the ice, so it carries the CTF (its rings)
            sn = be.rfft2(xp.asarray(noise_rng.standard_normal((stop - start, box, box),
                                                               dtype=np.float32)))
            sn = be.irfft2(sn * cb_chunk, s=(box, box)).astype(np.float32)
            sn /= xp.sqrt(xp.mean(sn * sn, axis=(1, 2), keepdims=True) + 1e-12)
            f = np.float32(structural_noise)
            noise = noise * np.sqrt(1 - f) + sn * np.sqrt(f)
        images[start:stop] = clean + noise
        if return_clean:
            clean_all[start:stop] = clean

    truth = ParticleTruth(
        kind=kind, molecule=molname.astype(str),
        rot_deg=angles[:, 0], tilt_deg=angles[:, 1], psi_deg=angles[:, 2],
        origin_x_a=org_out[:, 0] * ps, origin_y_a=org_out[:, 1] * ps,
        ctf=ctf, micrograph=micrograph, pixel_size_a=ps, box=int(box), snr=float(snr),
        noise_sigma=1.0, seed=seed, molecules=names,
    )
    return ParticleStack(images=images, truth=truth, clean=clean_all)
