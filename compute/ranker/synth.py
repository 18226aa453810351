"""Labelled training data for the class ranker: realistic 2D class averages with ground truth.

A class average is what a 2D classification produces from its members: the CTF-corrected,
Wiener-regularised average

    A(k) = sum_i c_i(k) [t_i(k) S_i(k) + n_i(k)] / (sum_i c_i(k)^2 + lambda(k))

of particles with signal ``S_i`` (projections from :mod:`compute.simulate`, at the class's
view plus the alignment errors of the class, or junk), true CTF ``t_i``, the CTF the
classification assumed ``c_i`` (equal to ``t_i`` unless the kind is ``wrong_ctf``) and
white noise ``n_i`` of unit real-space variance (particles are normalised so). The sum of
the noise terms is itself Gaussian, so it is drawn once per class with the right variance
(``sum_i c_i^2`` per Fourier component); the signal sum uses up to 48 representative
members. That makes a class of 5,000 particles as cheap as one of 50 while keeping its
noise level, CTF weighting, blur and contamination realistic.

Per-class metadata follow RELION's definitions as closely as the model allows: the
estimated resolution is where the average's spectral SNR drops below 1; the accuracy of
rotations / translations is the in-plane rotation (deg) / shift (Å) of the class signal
that changes a particle's log-likelihood by 1.

Ground truth per class: ``purity`` (fraction of members that are correctly picked copies of
the molecule), ``frc_score`` (mean FRC, between 1/diameter and 1/max(12 Å, 3 px), of the
masked average with the best-matching true projection over in-plane rotations and small
shifts). A class is ground-truth *good* when ``purity >= GOOD_PURITY`` (0.5) and
``frc_score >= GOOD_FRC`` (0.45); the target :func:`target_score` is on an absolute 0–1
scale with good classes in [0.15, 1] and the others below 0.15.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from compute.ctf import CtfParams, ctf_2d
from compute.fourier import radial_index, soft_mask
from compute.geometry import euler_to_matrix
from compute.ranker.features import ClassMeta
from compute.simulate.particles import carbon_edge, ice_blob

KINDS = ("good", "views_mixed", "misaligned", "partial", "neighbours", "offcentre",
         "wrong_ctf", "aggregate", "ice", "carbon", "empty")
GOOD_PURITY = 0.5
GOOD_FRC = 0.45
MAX_MEMBERS = 48
FRC_HI_A = 12.0


@dataclass(frozen=True)
class JobConditions:
    """One simulated data set / classification job."""

    molecule: str
    pixel_size_a: float
    box: int
    diameter_a: float            # mask / particle diameter the user gave
    snr: float                   # per-particle signal variance / noise variance in the circle
    n_classes: int = 50
    n_particles: int = 10000
    defocus_a: tuple[float, float] = (8000.0, 25000.0)
    voltage_kv: float = 300.0
    bfactor_a2: float = 60.0
    kind_weights: dict[str, float] = field(default_factory=dict)


DEFAULT_KIND_WEIGHTS = {"good": 0.34, "views_mixed": 0.06, "misaligned": 0.06, "partial": 0.1,
                        "neighbours": 0.06, "offcentre": 0.05, "wrong_ctf": 0.05,
                        "aggregate": 0.07, "ice": 0.06, "carbon": 0.06, "empty": 0.09}


@dataclass
class ClassTruth:
    kind: str
    n_particles: int
    purity: float
    frc_score: float
    score: float

    @property
    def good(self) -> bool:
        return self.purity >= GOOD_PURITY and self.frc_score >= GOOD_FRC


def target_score(purity, frc_score):
    """The absolute 0–1 training target of a class from its ground truth.

    Good classes (``purity >= GOOD_PURITY`` and ``frc_score >= GOOD_FRC``) score
    ``0.15 + 0.85 * sqrt(u_p * u_f)`` with ``u_p = (purity - 0.5) / 0.5`` and
    ``u_f = min((frc - 0.45) / 0.45, 1)``; other classes score
    ``0.15 * min(purity / 0.5, 1) * clip((frc - 0.1) / 0.35, 0, 1)``. So the selection
    threshold 0.15 is exactly the ground-truth good/bad boundary and the score is continuous
    across it (like the paper's label ladder, where 0.15 separates junk from the rest).
    Works on scalars and arrays.
    """
    a = np.asarray(purity, dtype=np.float64)
    b = np.asarray(frc_score, dtype=np.float64)
    good = (a >= GOOD_PURITY) & (b >= GOOD_FRC)
    u = np.sqrt(np.clip((a - GOOD_PURITY) / (1 - GOOD_PURITY), 0, 1)
                * np.clip((b - GOOD_FRC) / GOOD_FRC, 0, 1))
    v = np.minimum(a / GOOD_PURITY, 1.0) * np.clip((b - 0.1) / (GOOD_FRC - 0.1), 0, 1)
    out = np.where(good, 0.15 + 0.85 * u, 0.15 * np.minimum(v, 0.999))
    return float(out) if out.ndim == 0 else out


# --- helpers -----------------------------------------------------------------------------

def _ctf_half(box: int, px: float, df: float, cond: JobConditions, rng) -> np.ndarray:
    ast = rng.uniform(0, 600)
    p = CtfParams(df + ast / 2, df - ast / 2, rng.uniform(0, 180), cond.voltage_kv,
                  bfactor_a2=cond.bfactor_a2)
    return ctf_2d((box, box), px, p, rfft=True)


def _shift_phase(box: int, shifts_px: np.ndarray) -> np.ndarray:
    ky = np.fft.fftfreq(box)[:, None]
    kx = np.fft.rfftfreq(box)[None, :]
    s = np.atleast_2d(shifts_px)
    return np.exp(-2j * np.pi * (ky[None] * s[:, 0, None, None] + kx[None] * s[:, 1, None, None]))


def _jitter_euler(base: np.ndarray, n: int, sd_tilt: float, sd_psi: float, rng) -> np.ndarray:
    e = np.repeat(base[None], n, axis=0).astype(np.float64)
    e[:, 0] += rng.normal(0, sd_tilt, n) * 1.0
    e[:, 1] += rng.normal(0, sd_tilt, n)
    e[:, 2] += rng.normal(0, sd_psi, n)
    return e


def _random_view(rng) -> np.ndarray:
    return np.array([rng.uniform(-180, 180), np.rad2deg(np.arccos(rng.uniform(-1, 1))),
                     rng.uniform(-180, 180)])


class _JobSim:
    """Per-job state: projector, scale of the signal, frequency grids, masks."""

    def __init__(self, cond: JobConditions, rng: np.random.Generator) -> None:
        from compute.simulate.molecules import density_map
        from compute.simulate.project import Projector
        from compute.simulate.random_molecules import get_molecule

        self.cond, self.rng = cond, rng
        self.mol = get_molecule(cond.molecule)
        n, px = cond.box, cond.pixel_size_a
        self.n, self.px = n, px
        self.proj = Projector(density_map(self.mol, n, px))
        self.mask = soft_mask((n, n), 0.5 * cond.diameter_a / px, edge_px=3.0)
        self.mol_r_px = 0.5 * self.mol.diameter_a / px
        self.shell = radial_index((n, n), rfft=True)
        self.n_shells = int(self.shell.max()) + 1
        self.yy, self.xx = np.mgrid[0:n, 0:n] - n // 2
        # signal scale: particle SNR = var(CTF * projection in the molecule circle) / 1
        views = np.array([_random_view(rng) for _ in range(8)])
        F = self.proj.project_fourier(euler_to_matrix(views[:, 0], views[:, 1], views[:, 2]))
        df = float(np.mean(cond.defocus_a))
        c = _ctf_half(n, px, df, cond, rng)
        imgs = np.fft.irfft2(F * c, s=(n, n))
        circ = (self.yy ** 2 + self.xx ** 2) <= self.mol_r_px ** 2
        var = float(np.mean([im[circ].var() for im in imgs]))
        self.alpha = np.sqrt(cond.snr / max(var, 1e-30))
        self.junk_sd = np.sqrt(cond.snr)  # junk contrast comparable to particles

    # -- member signals (rfft, CTF-free, particle units) ------------------------------------
    def views(self, eulers: np.ndarray, shifts_px: np.ndarray | None = None) -> np.ndarray:
        e = np.atleast_2d(eulers)
        # matrices, not Euler triples: a (3, 3) Euler array would read as one matrix
        R = euler_to_matrix(e[:, 0], e[:, 1], e[:, 2])
        F = self.proj.project_fourier(R) * self.alpha
        if shifts_px is not None:
            F = F * _shift_phase(self.n, shifts_px)
        return F

    def _real(self, imgs: np.ndarray) -> np.ndarray:
        return np.fft.rfft2(imgs)

    def junk(self, kind: str, m: int) -> np.ndarray:
        rng, n = self.rng, self.n
        R = self.mol_r_px
        if kind == "empty":
            return np.zeros((m, n, n // 2 + 1), dtype=np.complex128)
        if kind == "aggregate":
            out = np.zeros((m, n, n // 2 + 1), dtype=np.complex128)
            for i in range(m):
                k = int(rng.integers(3, 8))
                eul = np.array([_random_view(rng) for _ in range(k)])
                sh = rng.normal(0, 0.6 * R, (k, 2))
                out[i] = self.views(eul, sh).sum(axis=0)
            return out
        if kind == "ice":
            amp = self.junk_sd * rng.uniform(1.5, 4.0)
            imgs = np.stack([ice_blob(rng, n, amp) for _ in range(m)]).astype(np.float64)
            imgs -= imgs.mean(axis=(1, 2), keepdims=True)
            return self._real(imgs)
        if kind == "carbon":
            # a classification aligns carbon edges: turn each edge to a common direction
            amp = self.junk_sd * rng.uniform(1.0, 3.0)
            target = rng.uniform(0, 180)
            imgs = np.empty((m, n, n))
            for i in range(m):
                im = carbon_edge(rng, n, amp).astype(np.float64)
                imgs[i] = _align_edge(im, target + rng.normal(0, 6))
            imgs -= imgs.mean(axis=(1, 2), keepdims=True)
            return self._real(imgs)
        raise ValueError(kind)

    # -- one class ---------------------------------------------------------------------------
    def make_class(self, kind: str, n_part: int) -> tuple[np.ndarray, ClassMeta, ClassTruth]:
        rng, n, cond = self.rng, self.n, self.cond
        m = int(min(MAX_MEMBERS, max(n_part, 1)))
        base = _random_view(rng)
        refs_views = [base]
        good = np.ones(m, dtype=bool)
        wrong_df = 0.0
        if kind in ("good", "partial", "neighbours", "wrong_ctf", "offcentre"):
            eul = _jitter_euler(base, m, rng.uniform(1, 5), rng.uniform(0.5, 4), rng)
            sh = rng.normal(0, rng.uniform(0.2, 1.2), (m, 2))
            if kind == "offcentre":
                d = rng.uniform(0.35, 0.7) * self.mol_r_px * np.array(
                    [np.sin(a := rng.uniform(0, 2 * np.pi)), np.cos(a)])
                sh = sh + d
            F = self.views(eul, sh)
            if kind == "neighbours":
                k_nb = rng.uniform(0.5, 1.0)
                for i in range(m):
                    if rng.random() < k_nb:
                        a = rng.uniform(0, 2 * np.pi)
                        dist = rng.uniform(1.6, 2.2) * self.mol_r_px
                        F[i] += self.views(_random_view(rng)[None],
                                           np.array([[dist * np.sin(a), dist * np.cos(a)]]))[0]
            if kind == "partial":
                pur = rng.uniform(0.15, 0.85)
                bad = rng.random(m) > pur
                if not bad.any() and m > 1:
                    bad[0] = True
                jk = rng.choice(["empty", "aggregate", "ice", "carbon"])
                if bad.any():
                    F[bad] = self.junk(jk, int(bad.sum()))
                good = ~bad
            if kind == "wrong_ctf":
                wrong_df = rng.uniform(2500, 9000) * rng.choice([-1, 1])
        elif kind == "views_mixed":
            nv = int(rng.integers(2, 6))
            vlist = [_random_view(rng) for _ in range(nv)]
            refs_views = vlist
            which = rng.integers(0, nv, m)
            eul = np.array([vlist[w] for w in which])
            eul = _jitter_euler(np.zeros(3), m, 3.0, 3.0, rng) + eul
            F = self.views(eul, rng.normal(0, 1.0, (m, 2)))
        elif kind == "misaligned":
            eul = _jitter_euler(base, m, rng.uniform(3, 15), rng.uniform(20, 120), rng)
            F = self.views(eul, rng.normal(0, rng.uniform(1.5, 5), (m, 2)))
        else:  # junk
            F = self.junk(kind, m)
            good[:] = False
        w = n_part / m
        # CTFs: true and assumed
        dfs = rng.uniform(*cond.defocus_a, m)
        num = np.zeros((n, n // 2 + 1), dtype=np.complex128)
        den = np.zeros((n, n // 2 + 1))
        for i in range(m):
            t = _ctf_half(n, self.px, dfs[i], cond, rng)
            c = t if wrong_df == 0.0 else _ctf_half(n, self.px, max(2000.0, dfs[i] + wrong_df),
                                                   cond, rng)
            num += c * t * F[i]
            den += c * c
        num *= w
        den *= w
        noise_var = (n * n) * den  # per complex component
        noise = np.sqrt(noise_var / 2) * (rng.standard_normal(num.shape)
                                          + 1j * rng.standard_normal(num.shape))
        sig_pow = _shell_mean(np.abs(num) ** 2, self.shell, self.n_shells)
        noi_pow = _shell_mean(noise_var, self.shell, self.n_shells)
        ssnr = sig_pow / np.maximum(noi_pow, 1e-30)
        mean_den = _shell_mean(den, self.shell, self.n_shells)
        # Wiener regularisation from the class's own SSNR (floored at 1: as after a few
        # iterations of a classification, tau^2 ~ signal power)
        # plus a floor worth 2 % of the particles' CTF^2: where the CTF envelope has died
        # (den ~ 0) the average must go to 0, not amplify the noise by 1/sqrt(den)
        lam = mean_den / np.maximum(ssnr, 1.0) + 0.02 * n_part
        avg_F = (num + noise) / (den + lam[self.shell])
        img = np.fft.irfft2(avg_F, s=(n, n)) * self.mask
        # metadata
        res = _resolution(ssnr, n, self.px)
        clean = np.fft.irfft2(num / (den + lam[self.shell]), s=(n, n))
        c2 = den / max(n_part, 1)
        acc_rot, acc_tr = _accuracies(clean, c2, self.px, rng)
        meta = ClassMeta(float(n_part), acc_rot, acc_tr, res)
        # truth
        purity = float(good.mean())
        refs = self.views(np.array(refs_views))
        refs_img = np.fft.irfft2(refs, s=(n, n)) * self.mask
        frc_score = best_match_frc(img, refs_img, self.px, self.cond.diameter_a)
        truth = ClassTruth(kind, int(n_part), purity, frc_score, target_score(purity, frc_score))
        return img.astype(np.float32), meta, truth


def _align_edge(img: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate an image with one straight edge so that the edge normal points at ``angle_deg``
    (bright side first), from the structure tensor of the smoothed image."""
    sm = ndimage.gaussian_filter(img, 2.0)
    gy, gx = np.gradient(sm)
    theta = np.degrees(np.arctan2(gy.sum(), gx.sum()))  # mean gradient: towards the bright side
    return ndimage.rotate(img, theta - angle_deg, reshape=False, order=1, mode="nearest")


def _shell_mean(v: np.ndarray, shell: np.ndarray, n: int) -> np.ndarray:
    s = np.bincount(shell.ravel(), weights=v.ravel(), minlength=n)[:n]
    c = np.bincount(shell.ravel(), minlength=n)[:n]
    return s / np.maximum(c, 1)


def _resolution(ssnr: np.ndarray, n: int, px: float) -> float:
    below = np.flatnonzero(ssnr[1:n // 2 + 1] < 1.0)
    if below.size == 0:
        return 2.0 * px
    k = int(below[0]) + 1
    if k <= 1:
        return 999.0
    return float(n * px / (k - 0.5))


def _accuracies(clean: np.ndarray, c2: np.ndarray, px: float, rng) -> tuple[float, float]:
    """Rotation (deg) and translation (Å) changing a particle's log-likelihood by 1."""
    n = clean.shape[0]
    F0 = np.fft.rfft2(clean)
    rot = ndimage.rotate(clean, 2.0, reshape=False, order=1)
    d_rot = np.sum(c2 * np.abs(np.fft.rfft2(rot) - F0) ** 2) * 2 / (n * n) / 4.0  # per deg^2
    ph = _shift_phase(n, np.array([[0.0, 1.0]]))[0]
    d_tr = np.sum(c2 * np.abs(F0 * ph - F0) ** 2) * 2 / (n * n)  # per px^2
    jit = np.exp(rng.normal(0, 0.15, 2))
    acc_rot = float(np.clip(1.0 / np.sqrt(max(d_rot, 1e-12)), 0.05, 180.0) * jit[0])
    acc_tr = float(np.clip(1.0 / np.sqrt(max(d_tr, 1e-12)), 0.01, n / 2) * px * jit[1])
    return acc_rot, acc_tr


def best_match_frc(img: np.ndarray, refs: np.ndarray, pixel_size_a: float, diameter_a: float,
                   psi_step_deg: float = 6.0, max_shift_px: float = 3.0) -> float:
    """Mean FRC (1/diameter … 1/max(12 Å, 3 px)) of ``img`` with the best of ``refs``.

    Searches in-plane rotations of each reference (``psi_step_deg``) and shifts up to
    ``max_shift_px`` (cross-correlation peak), returns the best band-averaged FRC.
    """
    n = img.shape[-1]
    refs = np.atleast_3d(refs) if refs.ndim == 2 else refs
    shell = radial_index((n, n), rfft=True)
    k_lo = max(1, int(np.floor(n * pixel_size_a / diameter_a)))
    k_hi = int(min(n // 2, np.floor(n * pixel_size_a / max(FRC_HI_A, 3 * pixel_size_a))))
    k_hi = max(k_hi, k_lo + 1)
    band = (shell >= k_lo) & (shell <= k_hi)
    Fi = np.fft.rfft2(img)
    angles = np.arange(0.0, 360.0, psi_step_deg)
    rot = np.stack([ndimage.rotate(r, a, reshape=False, order=1)
                    for r in refs for a in angles])
    Fr = np.fft.rfft2(rot)
    # shift search: cross-correlation restricted to |shift| <= max_shift
    cc = np.fft.irfft2(Fi[None] * np.conj(Fr) * band[None], s=(n, n))
    yy, xx = np.meshgrid(np.fft.fftfreq(n) * n, np.fft.fftfreq(n) * n, indexing="ij")
    allowed = (yy ** 2 + xx ** 2) <= max_shift_px ** 2
    cc = np.where(allowed[None], cc, -np.inf)
    flat = cc.reshape(cc.shape[0], -1)
    best_idx = np.argmax(flat, axis=1)
    best_val = flat[np.arange(flat.shape[0]), best_idx]
    j = int(np.argmax(best_val))
    sy, sx = yy.ravel()[best_idx[j]], xx.ravel()[best_idx[j]]
    Fr_best = Fr[j] * _shift_phase(n, np.array([[sy, sx]]))[0]
    num = np.bincount(shell[band], weights=(Fi[band] * np.conj(Fr_best[band])).real,
                      minlength=k_hi + 1)
    da = np.bincount(shell[band], weights=np.abs(Fi[band]) ** 2, minlength=k_hi + 1)
    db = np.bincount(shell[band], weights=np.abs(Fr_best[band]) ** 2, minlength=k_hi + 1)
    frc = num[k_lo:k_hi + 1] / np.sqrt(np.maximum(da * db, 1e-30)[k_lo:k_hi + 1])
    return float(np.clip(np.mean(frc), 0.0, 1.0))


def class_sizes(n_classes: int, n_particles: int, rng) -> np.ndarray:
    """Class populations: log-normal spread, a few tiny classes (<= 10) as real jobs have."""
    w = rng.lognormal(0.0, 1.0, n_classes)
    sizes = np.floor(w / w.sum() * n_particles).astype(int)
    tiny = rng.random(n_classes) < 0.06
    sizes[tiny] = rng.integers(0, 11, int(tiny.sum()))
    return sizes


def synth_job(cond: JobConditions, seed: int) -> tuple[np.ndarray, list[ClassMeta],
                                                       list[ClassTruth]]:
    """Simulate one 2D classification job: class averages, their metadata and ground truth.

    Returns
    -------
    images : (K, box, box) float32 masked class averages (protein white)
    metas : per-class :class:`ClassMeta`
    truth : per-class :class:`ClassTruth`
    """
    rng = np.random.default_rng(seed)
    sim = _JobSim(cond, rng)
    weights = dict(DEFAULT_KIND_WEIGHTS)
    weights.update(cond.kind_weights)
    kinds = list(weights)
    p = np.array([weights[k] for k in kinds], dtype=np.float64)
    p /= p.sum()
    sizes = class_sizes(cond.n_classes, cond.n_particles, rng)
    imgs, metas, truth = [], [], []
    for k in range(cond.n_classes):
        kind = str(rng.choice(kinds, p=p))
        img, meta, tr = sim.make_class(kind, int(max(sizes[k], 1)))
        if sizes[k] == 0:
            meta = ClassMeta(0.0, meta.acc_rot_deg, meta.acc_trans_a, meta.resolution_a)
            tr = ClassTruth(kind, 0, tr.purity, tr.frc_score, tr.score)
        imgs.append(img)
        metas.append(meta)
        truth.append(tr)
    return np.stack(imgs), metas, truth


def random_conditions(rng: np.random.Generator, molecules: list[str]) -> JobConditions:
    """Draw varied job conditions: molecule, pixel size, box, mask diameter (sometimes wrong),
    SNR, defocus, B-factor, class count and the mix of class kinds.

    ``molecules`` holds names for :func:`compute.simulate.random_molecules.get_molecule`;
    the entry ``"rand"`` draws a fresh random protein (``rand:<seed>``) and ``"var:<name>"``
    a fresh random variant of a built-in molecule (``var:<name>:<seed>``).
    """
    from compute.simulate.random_molecules import get_molecule

    name = str(rng.choice(molecules))
    if name == "rand":
        name = f"rand:{int(rng.integers(0, 2**31))}"
    elif name.startswith("var:") and name.count(":") == 1:
        name = f"{name}:{int(rng.integers(0, 2**31))}"
    mol = get_molecule(name)
    d_true = mol.diameter_a
    # pixel size such that the particle spans 30-70 px
    d_px = rng.uniform(30, 70)
    px = float(np.clip(d_true / d_px, 0.8, 6.0))
    size_err = rng.choice([1.0, 1.0, 1.0, rng.uniform(0.75, 0.95), rng.uniform(1.1, 1.5)])
    diameter = d_true * size_err * rng.uniform(1.0, 1.15)
    box = int(np.ceil(rng.uniform(1.3, 1.9) * max(diameter, d_true) / px))
    box = int(min(128, box + box % 2))
    snr = float(np.exp(rng.uniform(np.log(0.004), np.log(0.15))))
    kw = {k: float(v * np.exp(rng.normal(0, 0.5))) for k, v in DEFAULT_KIND_WEIGHTS.items()}
    return JobConditions(molecule=name, pixel_size_a=px, box=box, diameter_a=float(diameter),
                         snr=snr, n_classes=int(rng.integers(20, 60)),
                         n_particles=int(rng.integers(2000, 40000)),
                         defocus_a=(float(rng.uniform(5000, 12000)), float(rng.uniform(15000, 30000))),
                         bfactor_a2=float(rng.uniform(20, 150)), kind_weights=kw)
