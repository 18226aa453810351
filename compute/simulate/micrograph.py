"""Micrographs with particles at known positions and orientations, in a realistic background.

Image formation (weak-phase object, RELION CTF convention; protein DARK as in raw data)::

    phi(x)      = sigma_e * dV * t_protein(x)            particles (and aggregates)
                + phi_ice(x) * sqrt(t_ice(x) / t_mean)   amorphous-ice structure (white noise)
                + carbon / ice-blob phase where present
    C(x)        = -2 * irfft2( CTF(k) * rfft2(phi) )     CTF(k) = -sin(gamma(k)) exp(-B k^2/4)
    A(x)        = illumination gradient * exp(-t_total(x) / lambda_inelastic)
    expected(x) = dose_e_a2 * pixel_size_a^2 * A(x) * (1 + C(x))   [electrons per pixel]
    image       = Poisson(expected)

``sigma_e`` is the relativistic interaction constant (rad / (V A)), ``dV`` the protein/ice
potential contrast (default 2 V), ``t_protein`` the projected protein thickness from the
density map (one pseudo-atom = 136 A^3). Because the CTF is positive at low frequency for
underfocus, particles come out darker than the ice, as on a real micrograph; the amorphous
ice term passes the same CTF, so the power spectrum shows Thon rings over the flat
shot-noise floor with a strength set by ``thon_contrast`` (ice scattering power / shot-noise
power at the mean thickness and ``dose_e_a2``, before the envelope).

Coordinates follow RELION: ``x`` is the column, ``y`` the row, in pixels of the
micrograph; a particle at ``(x, y)`` has its volume centre projected exactly there.
:class:`MicrographComponents` (mean ``A`` and the Fourier transform of ``C``) lets
:mod:`compute.simulate.movie` re-render the same specimen frame by frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compute import backend as be
from compute.ctf import CtfParams, electron_wavelength_a
from compute.errors import ComputeError
from compute.geometry import matrix_to_euler, random_rotations
from compute.simulate.molecules import Molecule, default_box, density_map, molecule
from compute.simulate.particles import CtfDraw, ctf_batch, draw
from compute.simulate.project import Projector, map_diameter_px, phase_shift_grid

#: pseudo-atom volume (A^3): projected map values x this / pixel area = protein thickness
A3_PER_WEIGHT = 136.0
INELASTIC_MFP_A = 3800.0


def interaction_constant(voltage_kv: float) -> float:
    """Relativistic electron interaction constant sigma_e in rad / (V * A)."""
    v = voltage_kv * 1e3
    lam = electron_wavelength_a(voltage_kv)
    mc2 = 510998.95  # electron rest energy in eV
    return float(2 * np.pi / (lam * v) * (mc2 + v) / (2 * mc2 + v))


def smooth_field(shape: tuple[int, int], rng: np.random.Generator, n_waves: int = 12,
                 max_cycles: float = 3.0, xp=np):
    """A smooth random field (zero mean, unit-ish rms) with at most ``max_cycles`` periods
    across the image: a sum of random plane waves, built from outer products (cheap)."""
    ny, nx = shape
    y = xp.arange(ny, dtype=np.float32) / ny
    x = xp.arange(nx, dtype=np.float32) / nx
    out = xp.zeros(shape, dtype=np.float32)
    for _ in range(n_waves):
        fy, fx = rng.uniform(-max_cycles, max_cycles, 2)
        ph = rng.uniform(0, 2 * np.pi)
        amp = np.float32(rng.normal())
        # amp * cos(a + b) = amp * (cos a cos b - sin a sin b): two real outer products
        a = 2 * np.pi * fy * y + ph
        b = 2 * np.pi * fx * x
        out += (amp * xp.cos(a))[:, None] * xp.cos(b)[None, :]
        out -= (amp * xp.sin(a))[:, None] * xp.sin(b)[None, :]
    return out / max(float(np.sqrt(n_waves / 2.0)), 1e-6)


@dataclass
class CarbonEdge:
    """Carbon outside a circular hole (centre and radius in micrograph pixels)."""

    centre_x_px: float
    centre_y_px: float
    radius_px: float
    thickness_a: float

    def mask(self, shape: tuple[int, int], xp=np):
        """True on carbon."""
        y = xp.arange(shape[0])[:, None]
        x = xp.arange(shape[1])[None, :]
        return (x - self.centre_x_px) ** 2 + (y - self.centre_y_px) ** 2 > self.radius_px**2


@dataclass
class MicrographTruth:
    """Ground truth of one micrograph.

    ``particles`` columns (arrays): ``x_px``, ``y_px`` (RELION rlnCoordinateX/Y), ``kind``
    (``"particle"`` or ``"aggregate"``), ``group`` (aggregate id, -1 for single particles),
    ``molecule``, ``rot_deg``, ``tilt_deg``, ``psi_deg``.
    """

    shape: tuple[int, int]
    pixel_size_a: float
    ctf: CtfParams
    dose_e_a2: float
    ice_thickness_mean_a: float
    particles: dict[str, np.ndarray]
    carbon: CarbonEdge | None = None
    ice_blobs: list[tuple[float, float, float]] = field(default_factory=list)
    seed: int | None = None
    box_px: dict[str, int] = field(default_factory=dict)

    def single_particles(self) -> np.ndarray:
        """Indices of isolated true particles (not in aggregates)."""
        return np.nonzero(self.particles["kind"] == "particle")[0]

    def table(self) -> dict[str, np.ndarray]:
        """RELION-labelled columns (plus scs extras) for a coordinates/truth STAR file."""
        p = self.particles
        n = len(p["x_px"])
        return {
            "rlnCoordinateX": p["x_px"], "rlnCoordinateY": p["y_px"],
            "rlnAngleRot": p["rot_deg"], "rlnAngleTilt": p["tilt_deg"],
            "rlnAnglePsi": p["psi_deg"],
            "rlnDefocusU": np.full(n, self.ctf.defocus_u_a),
            "rlnDefocusV": np.full(n, self.ctf.defocus_v_a),
            "rlnDefocusAngle": np.full(n, self.ctf.defocus_angle_deg),
            "scsKind": p["kind"], "scsMolecule": p["molecule"], "scsGroup": p["group"],
        }

    def to_json(self) -> dict[str, Any]:
        c = self.ctf
        return {
            "shape": list(self.shape), "pixel_size_a": self.pixel_size_a, "seed": self.seed,
            "dose_e_a2": self.dose_e_a2, "ice_thickness_mean_a": self.ice_thickness_mean_a,
            "ctf": {"defocus_u_a": c.defocus_u_a, "defocus_v_a": c.defocus_v_a,
                    "defocus_angle_deg": c.defocus_angle_deg, "voltage_kv": c.voltage_kv,
                    "cs_mm": c.cs_mm, "amplitude_contrast": c.amplitude_contrast,
                    "phase_shift_deg": c.phase_shift_deg, "bfactor_a2": c.bfactor_a2},
            "carbon": None if self.carbon is None else vars(self.carbon).copy(),
            "ice_blobs": [list(b) for b in self.ice_blobs],
            "box_px": dict(self.box_px),
            "particles": {k: np.asarray(v).tolist() for k, v in self.particles.items()},
        }


@dataclass
class MicrographComponents:
    """What a movie needs to re-render the specimen: mean intensity ``A`` (relative, ~1)
    and ``contrast_ft`` = rfft2 of the CTF-modulated contrast ``C``; ``illumination`` is the
    part of ``A`` that belongs to the beam (it stays put while the specimen, and with it the
    ice-thickness attenuation ``A / illumination``, moves)."""

    mean: Any
    contrast_ft: Any
    illumination: Any = None


@dataclass
class Micrograph:
    """``image``: electrons per pixel (Poisson noise unless ``noise=False``), float32;
    ``expected``: the noise-free expectation (when asked for)."""

    image: Any
    truth: MicrographTruth
    expected: Any = None
    components: MicrographComponents | None = None


def _place(rng, n_want, shape, margin, min_dist, forbidden) -> np.ndarray:
    """Greedy random sequential placement of up to ``n_want`` points (x, y)."""
    ny, nx = shape
    pts: list[np.ndarray] = []
    acc = np.zeros((0, 2))
    tries = 0
    while len(acc) < n_want and tries < 40:
        tries += 1
        cand = np.column_stack([rng.uniform(margin, nx - margin, 4 * n_want + 16),
                                rng.uniform(margin, ny - margin, 4 * n_want + 16)])
        cand = cand[~forbidden(cand)]
        for c in cand:
            if len(acc) >= n_want:
                break
            if acc.shape[0] and (((acc - c) ** 2).sum(axis=1) < min_dist**2).any():
                continue
            pts.append(c)
            acc = np.asarray(pts)
    return acc.reshape(-1, 2)


def simulate_micrograph(
    shape: tuple[int, int] | int = 1024,
    *,
    pixel_size_a: float = 1.0,
    molecules: Sequence[str | Molecule] = ("asym",),
    n_particles: int | None = None,
    min_distance_a: float | None = None,
    defocus_um=(0.8, 2.5),
    astigmatism_a=(0.0, 500.0),
    defocus_angle_deg=None,
    phase_shift_deg=0.0,
    bfactor_a2=60.0,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    dose_e_a2: float = 40.0,
    ice_thickness_a=(250.0, 450.0),
    ice_variation: float = 0.25,
    gradient: float = 0.05,
    protein_contrast_v: float = 2.0,
    thon_contrast: float = 0.3,
    carbon: bool = False,
    n_aggregates: int = 0,
    n_ice_blobs: int = 0,
    noise: bool = True,
    return_expected: bool = False,
    return_components: bool = False,
    seed: int | None = 0,
    device: str | None = "cpu",
) -> Micrograph:
    """Simulate one micrograph with ground truth.

    Parameters
    ----------
    shape : int or (ny, nx)
        Size in pixels.
    pixel_size_a : float
    molecules : sequence
        Built-in names, :class:`Molecule` objects or ``(name, map)`` pairs of user maps at
        ``pixel_size_a`` (cubic, centred at ``box // 2``), mixed at equal abundance.
    n_particles : int, optional
        Particles wanted (fewer if they do not fit); default fills ~25 % of the free area.
    min_distance_a : float, optional
        Closest centre-to-centre distance (default: 0.9 x the largest diameter).
    defocus_um, astigmatism_a, phase_shift_deg, bfactor_a2
        A number or a ``(low, high)`` range drawn once for the micrograph.
    defocus_angle_deg : float, optional
        Astigmatism angle (default uniform in [0, 180)).
    dose_e_a2 : float
        Total exposure (e/A^2): sets the shot noise.
    ice_thickness_a : number or range
        Mean ice thickness (A), drawn once.
    ice_variation : float
        Relative rms of the smooth thickness variation across the image.
    gradient : float
        Peak relative illumination gradient across the image.
    protein_contrast_v : float
        Protein minus ice mean inner potential (V).
    thon_contrast : float
        Amorphous-ice scattering power relative to the shot-noise power (sets Thon-ring
        visibility).
    carbon : bool
        A carbon edge (a foil-hole boundary) crossing the image.
    n_aggregates, n_ice_blobs : int
        Clusters of 4-10 overlapping particles; dense ice contamination blobs.
    noise : bool
        Poisson counting noise (False: the expectation itself).
    return_expected, return_components : bool
        Also return the noise-free image / the parts a movie needs.
    seed : int or None
    device : ``"cpu"`` (default, bit-reproducible), ``"gpu"`` or ``"auto"``.
    """
    shape = (int(shape), int(shape)) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
    if min(shape) < 32:
        raise ComputeError(f"micrograph shape {shape} is too small (>= 32 px)")
    if pixel_size_a <= 0 or dose_e_a2 <= 0:
        raise ComputeError("pixel size and dose must be > 0")
    xp = be.get_xp(device)
    rng = np.random.default_rng(seed)
    ps = float(pixel_size_a)
    ny, nx = shape
    if not molecules:
        raise ComputeError("simulate_micrograph needs at least one molecule")
    # (name, map at pixel_size_a, diameter in px) per molecule; user maps come as (name, map)
    sources = []
    for spec in molecules:
        if isinstance(spec, tuple):
            name, vol = spec
            vol = np.asarray(vol, dtype=np.float32)
            if vol.ndim != 3 or len(set(vol.shape)) != 1:
                raise ComputeError(f"map {name!r} must be a cubic volume, got {vol.shape}")
            sources.append((str(name), vol, map_diameter_px(vol)))
        else:
            mol = molecule(spec) if isinstance(spec, str) else spec
            sources.append((mol.name, None, mol.diameter_a / ps, mol))

    # --- per-micrograph parameters ---
    d = float(draw(rng, defocus_um, 1)[0]) * 1e4
    a = float(draw(rng, astigmatism_a, 1)[0])
    ang = float(rng.uniform(0, 180)) if defocus_angle_deg is None else float(defocus_angle_deg)
    ctf = CtfParams(d + a / 2, d - a / 2, ang, float(voltage_kv), float(cs_mm),
                    float(amplitude_contrast), float(draw(rng, phase_shift_deg, 1)[0]),
                    float(draw(rng, bfactor_a2, 1)[0]))
    t_mean = float(draw(rng, ice_thickness_a, 1)[0])
    sigma_e = interaction_constant(voltage_kv)

    # --- layout: carbon, blobs, particles ---
    carbon_edge = None
    if carbon:
        r = rng.uniform(0.8, 1.5) * max(shape)
        th = rng.uniform(0, 2 * np.pi)
        # the edge crosses the image at 25-75 % of the way along a random direction
        reach = rng.uniform(0.25, 0.75) * max(shape) - max(shape) / 2
        cx = nx / 2 - (r + reach) * np.cos(th)
        cy = ny / 2 - (r + reach) * np.sin(th)
        carbon_edge = CarbonEdge(float(cx), float(cy), float(r), float(rng.uniform(100, 250)))
    blobs = []
    for _ in range(int(n_ice_blobs)):
        rb = rng.uniform(100, 400) / ps
        blobs.append((float(rng.uniform(0, nx)), float(rng.uniform(0, ny)), float(rb)))
    diam_px = max(src[2] for src in sources)
    min_d = (min_distance_a / ps) if min_distance_a else 0.9 * diam_px
    boxes = {src[0]: (default_box(src[3], ps, 1.2) if src[1] is None else src[1].shape[0])
             for src in sources}
    margin = min(0.5 * diam_px, 0.25 * min(shape))

    def forbidden(c):
        bad = np.zeros(len(c), dtype=bool)
        if carbon_edge is not None:
            bad |= ((c[:, 0] - carbon_edge.centre_x_px) ** 2
                    + (c[:, 1] - carbon_edge.centre_y_px) ** 2) > carbon_edge.radius_px**2
        for bx, by, br in blobs:
            bad |= ((c[:, 0] - bx) ** 2 + (c[:, 1] - by) ** 2) < (br + margin) ** 2
        return bad

    if n_particles is None:
        n_particles = int(0.25 * nx * ny / (np.pi * (0.5 * diam_px) ** 2))
    centres = _place(rng, int(n_particles) + int(n_aggregates), shape, margin,
                     max(min_d, 1.0), forbidden)
    # aggregates take the first places (they must exist when asked for), singles the rest
    n_agg = min(len(centres), int(n_aggregates))
    xs, ys, kinds, groups = [], [], [], []
    for i, (x, y) in enumerate(centres):
        if i >= n_agg:
            xs.append(x)
            ys.append(y)
            kinds.append("particle")
            groups.append(-1)
        else:
            k = int(rng.integers(4, 11))
            off = rng.normal(0, 0.3 * diam_px, (k, 2))
            xs.extend(x + off[:, 0])
            ys.extend(y + off[:, 1])
            kinds.extend(["aggregate"] * k)
            groups.extend([i] * k)
    n_obj = len(xs)
    mol_idx = rng.integers(len(sources), size=n_obj)
    R = random_rotations(n_obj, rng)
    eul = matrix_to_euler(R)
    px = np.asarray(xs, dtype=np.float64)
    py = np.asarray(ys, dtype=np.float64)

    # --- phase image: particles ---
    phi = xp.zeros(shape, dtype=np.float32)
    scale = sigma_e * protein_contrast_v * A3_PER_WEIGHT / ps**2
    for m, src in enumerate(sources):
        sel = np.nonzero(mol_idx == m)[0]
        if not sel.size:
            continue
        b = boxes[src[0]]
        vol = density_map(src[3], b, ps) if src[1] is None else src[1]
        P = Projector(xp.asarray(vol), pad=2)
        ix = np.floor(px[sel]).astype(int)
        iy = np.floor(py[sel]).astype(int)
        # origin = -fraction puts the centre at box//2 + fraction
        org = -np.column_stack([px[sel] - ix, py[sel] - iy])
        for s0 in range(0, sel.size, 256):
            ss = slice(s0, s0 + 256)
            F = P.slices(xp.asarray(R[sel[ss]])) * phase_shift_grid(b, xp.asarray(org[ss]), xp)
            imgs = be.irfft2(F, s=(b, b)).astype(np.float32) * np.float32(scale)
            for j, img in enumerate(imgs):
                x0 = ix[s0 + j] - b // 2
                y0 = iy[s0 + j] - b // 2
                xa, ya = max(x0, 0), max(y0, 0)
                xb, yb = min(x0 + b, nx), min(y0 + b, ny)
                if xb > xa and yb > ya:
                    phi[ya:yb, xa:xb] += img[ya - y0:yb - y0, xa - x0:xb - x0]

    # --- ice, carbon, blobs ---
    t_ice = t_mean * (1.0 + ice_variation * smooth_field(shape, rng, xp=xp) / 2.0)
    t_ice = xp.clip(t_ice, 0.2 * t_mean, None)
    t_total = t_ice
    # white amorphous-ice phase noise: var chosen so its CTF-modulated power is
    # thon_contrast x the shot-noise power at the mean thickness (<CTF^2> ~ 1/2)
    ice_var = thon_contrast / (2.0 * dose_e_a2 * ps * ps)
    struct = xp.asarray(rng.standard_normal(shape, dtype=np.float32))
    weight = xp.sqrt(t_ice / t_mean)
    if carbon_edge is not None:
        cmask = carbon_edge.mask(shape, xp=xp)
        # carbon scatters about 2x as strongly per A as ice
        weight = xp.where(cmask, xp.sqrt(weight**2 + 2.0 * carbon_edge.thickness_a / t_mean),
                          weight)
        t_total = t_total + cmask * np.float32(2.0 * carbon_edge.thickness_a)
    phi += struct * weight * np.float32(np.sqrt(ice_var))
    if blobs:
        yy = xp.arange(ny, dtype=np.float32)[:, None]
        xx = xp.arange(nx, dtype=np.float32)[None, :]
        for bx, by, br in blobs:
            dist = xp.sqrt((xx - bx) ** 2 + (yy - by) ** 2)
            m = 0.5 - 0.5 * xp.tanh((dist - br) / 3.0)
            extra = np.float32(rng.uniform(1000, 3000))
            t_total = t_total + m * extra
            phi += m * np.float32(0.5)  # bounded: the weak-phase model has its limits

    # --- CTF and intensity ---
    Fphi = be.rfft2(phi)
    c2d = ctf_batch(shape, ps, CtfDraw(*(np.array([v]) for v in (
        ctf.defocus_u_a, ctf.defocus_v_a, ctf.defocus_angle_deg, ctf.phase_shift_deg,
        ctf.bfactor_a2)), ctf.voltage_kv, ctf.cs_mm, ctf.amplitude_contrast), xp=xp)[0]
    contrast_ft = (-2.0 * c2d * Fphi).astype(np.complex64)
    C = be.irfft2(contrast_ft, s=shape).astype(np.float32)
    illum = 1.0 + gradient * smooth_field(shape, rng, n_waves=3, max_cycles=0.5, xp=xp)
    A = (illum * xp.exp(-(t_total - t_mean) / INELASTIC_MFP_A)).astype(np.float32)
    counts = np.float32(dose_e_a2 * ps * ps)
    expected = counts * A * xp.clip(1.0 + C, 0.02, None)
    if noise:
        if xp is np:
            image = rng.poisson(expected).astype(np.float32)
        else:
            image = xp.random.poisson(expected).astype(np.float32)
    else:
        image = expected

    truth = MicrographTruth(
        shape=shape, pixel_size_a=ps, ctf=ctf, dose_e_a2=float(dose_e_a2),
        ice_thickness_mean_a=t_mean,
        particles={
            "x_px": px, "y_px": py, "kind": np.asarray(kinds, dtype=str),
            "group": np.asarray(groups, dtype=int),
            "molecule": np.asarray([sources[m][0] for m in mol_idx], dtype=str),
            "rot_deg": eul[:, 0], "tilt_deg": eul[:, 1], "psi_deg": eul[:, 2],
        },
        carbon=carbon_edge, ice_blobs=blobs, seed=seed, box_px=boxes,
    )
    comps = MicrographComponents(A, contrast_ft, illum.astype(np.float32)) if return_components \
        else None
    return Micrograph(image=image, truth=truth,
                      expected=expected if return_expected else None, components=comps)
