"""De novo 3D initial model with VDAM (RELION 4's ``relion_refine --grad --denovo_3dref``).

The optimiser, schedule, noise bookkeeping and class replacement are the ones of 2D
classification (:mod:`compute.vdam`); only the E-step differs (:mod:`compute.estep3d`: adaptive
orientation search over SO(3) and back-projection). The 3D E-step hands the optimiser a
*preconditioned* gradient: per half-set and class the back-projected, sigma2-whitened residuals
divided by the back-projected CTF^2/sigma2 weights on the padded Fourier grid (a
reconstruction of the residual), so the accumulators' diagonal is 1.

Usage (arrays in, arrays out)::

    im = InitialModel3D(source, InitialModelParams(...))
    im.initialise()
    while not im.done:
        im.step()
    res = im.final_pass()
    vol = im.class_volume(k)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from compute.backend import to_numpy
from compute.errors import ComputeError
from compute.estep3d import Estep3D, offsets_grid
from compute.fourier import shell_resolution_a
from compute.geometry import matrix_to_euler
from compute.vdam.init import blob_references
from compute.vdam.optimiser import Accumulators, OptimiserState, VdamOptimiser, new_state
from compute.vdam.schedule import BatchSampler, Schedule, ScheduleParams

log = logging.getLogger(__name__)


@dataclass
class InitialModelParams:
    n_classes: int = 3                   # nr_classes
    n_iter: int = 200                    # nr_iter (mini-batches)
    tau_fudge: float = 4.0               # tau_fudge
    particle_diameter_a: float = 200.0   # particle_diameter
    offset_range_px: float = 6.0         # offset_range
    offset_step_px: float = 2.0          # offset_step
    do_ctf: bool = True
    seed: int = 1
    ini_resolution_a: float = 40.0       # resolution of the first mini-batches
    fin_resolution_a: float = 15.0       # resolution limit reached at the end of the middle phase
    max_resolution_a: float | None = None  # never go beyond (default: Nyquist)
    resolution_increment_shells: int = 3
    coarse_order: int = 1                # HEALPix order of the global coarse grid (30 deg)
    top: int = 5                         # candidates refined per particle
    recentre: bool = True                # keep each class's centre of mass on the box centre
    inactivity_threshold: float = 0.1
    batch: int = 500                     # particles per E-step call in the final pass


@dataclass
class ParticleAssignment:
    class_index: np.ndarray
    rot: np.ndarray
    tilt: np.ndarray
    psi: np.ndarray
    origin_x_px: np.ndarray
    origin_y_px: np.ndarray
    max_prob: np.ndarray
    n_significant: np.ndarray
    log_likelihood: np.ndarray


@dataclass
class StepInfo3D:
    iteration: int
    n_total: int
    phase: str
    batch_size: int
    r_max: float
    seconds: float = 0.0
    replaced: list = field(default_factory=list)


class InitialModel3D:
    """VDAM de novo initial model from a particle source (see :mod:`compute.vdam.classify2d`)."""

    def __init__(self, source, params: InitialModelParams, xp=np) -> None:
        p = params
        n = source.n_particles
        if p.n_classes < 1:
            raise ComputeError("the number of classes must be >= 1")
        if n < 2 * p.n_classes:
            raise ComputeError(f"{n} particles are too few for {p.n_classes} classes")
        self.source, self.params, self.xp = source, p, xp
        self.estep = Estep3D(source.box, source.pixel_size_a, p.particle_diameter_a,
                             do_ctf=p.do_ctf, xp=xp)
        self.n_shells = self.estep.n_shells
        self.optimiser = VdamOptimiser(self.estep.shell_index, self.n_shells,
                                       constrain=self._mask_refs)
        self.schedule = Schedule(n, ScheduleParams.initial_model(p.n_iter, p.tau_fudge))
        rng = np.random.default_rng([p.seed, 11])
        self.halves = (rng.permutation(n) % 2 + 1).astype(np.int64)
        self.sampler = BatchSampler(n, seed=p.seed)
        self.offsets = offsets_grid(p.offset_range_px, p.offset_step_px)
        self.state: OptimiserState | None = None
        self.r_max = self._ini_rmax()
        self.total_seconds = 0.0
        z = np.zeros(n)
        self.results = ParticleAssignment(np.full(n, -1), z.copy(), z.copy(), z.copy(),
                                          z.copy(), z.copy(), z.copy(), np.zeros(n, int), z.copy())

    # -- set-up --------------------------------------------------------------------------------
    def _ini_rmax(self) -> float:
        n, px = self.source.box, self.source.pixel_size_a
        return float(min(n // 2 - 1, max(4.0, n * px / self.params.ini_resolution_a)))

    def _max_rmax(self) -> float:
        n, px = self.source.box, self.source.pixel_size_a
        lim = n // 2 - 1
        if self.params.max_resolution_a:
            lim = min(lim, n * px / self.params.max_resolution_a)
        return float(lim)

    def _scheduled_rmax(self, iteration: int) -> float:
        """Resolution limit allowed at a mini-batch: ``ini_resolution_a`` for the initial phase,
        then linear in 1/resolution up to ``fin_resolution_a`` at the end of the middle phase.
        The FSC between the half-set moments shares the current reference and so is
        optimistic; this cap keeps the early, noisy mini-batches at low resolution (and cheap)."""
        n, px = self.source.box, self.source.pixel_size_a
        sp = self.schedule.params
        a = sp.ini_frac * self.params.n_iter
        b = (1.0 - sp.fin_frac) * self.params.n_iter
        t = float(np.clip((iteration - a) / max(b - a, 1e-9), 0.0, 1.0))
        inv = (1 - t) / self.params.ini_resolution_a + t / self.params.fin_resolution_a
        return float(n * px * inv)

    def _phase_ramp(self, shift_zyx):
        """exp(-2 pi i k.s / n) on the references' half transform: shifts a map by ``s`` voxels."""
        n = self.source.box
        kz = np.fft.fftfreq(n)[:, None, None]
        ky = np.fft.fftfreq(n)[None, :, None]
        kx = np.fft.rfftfreq(n)[None, None, :]
        sz, sy, sx = (float(v) for v in shift_zyx)
        return np.exp(-2j * np.pi * (kz * sz + ky * sy + kx * sx)).astype(np.complex64)

    def centre_offsets(self) -> np.ndarray:
        """(K, 3) centre of mass (z, y, x voxels from the box centre) of each class's positive
        density inside the mask."""
        vols = to_numpy(self.estep.to_real(self.state.refs))
        n = self.source.box
        g = (np.arange(n) - n // 2).astype(np.float64)
        out = np.zeros((len(vols), 3))
        for k, v in enumerate(vols):
            d = np.clip(v.astype(np.float64), 0.0, None)
            tot = d.sum()
            if tot <= 0:
                continue
            out[k] = [(d.sum((1, 2)) * g).sum() / tot, (d.sum((0, 2)) * g).sum() / tot,
                      (d.sum((0, 1)) * g).sum() / tot]
        return out

    def _recentre(self) -> None:
        """Shift each class (reference and half-set moments together) so its centre of mass is
        on the box centre. A 3D shift of the reference is absorbed by the particles' 2D offsets,
        so nothing in the likelihood stops a de novo model from drifting; a drifted model is cut
        by the spherical mask and needs offsets at the edge of the search range, and the
        refinement that starts from it inherits both (issue 11: 3.4 px = 12 A drift in z)."""
        xp = self.xp
        st = self.state
        moved = False
        for k, c in enumerate(self.centre_offsets()):
            if float(np.abs(c).max()) < 0.05:
                continue
            ramp = xp.asarray(self._phase_ramp(-c))
            st.refs[k] = (st.refs[k] * ramp).astype(np.complex64)
            st.mom1[:, k] = (st.mom1[:, k] * ramp[None]).astype(np.complex64)
            moved = True
        if moved:
            st.refs = self._mask_refs(st.refs)

    def _mask_refs(self, refs):
        real = self.estep.to_real(refs) * self.estep.mask3d
        return self.estep.to_fourier(real).astype(np.complex64)

    def initialise(self) -> None:
        p = self.params
        n = self.source.box
        take = np.sort(np.random.default_rng([p.seed, 3]).permutation(self.source.n_particles)[:300])
        imgs = self.source.images(take)
        if not np.isfinite(imgs).all():
            raise ComputeError("particle images contain NaN or infinite values")
        self.estep.set_resolution(n // 2 - 1)
        X = to_numpy(self.estep.prepare_images(self.xp.asarray(imgs)))
        ps = np.mean(np.abs(X) ** 2, axis=0) * 2.0
        shell = self.estep._shell
        sig = np.bincount(shell, weights=ps, minlength=self.n_shells)
        cnt = np.bincount(shell, minlength=self.n_shells) * 2.0
        sigma2 = sig / np.maximum(cnt, 1)
        sigma2[0] = sigma2[1] if self.n_shells > 1 else 1.0
        sigma2 = np.maximum(sigma2, 1e-6 * sigma2.max())
        refs = blob_references(p.n_classes, (n, n, n), self.source.pixel_size_a,
                               p.particle_diameter_a, rng=np.random.default_rng([p.seed, 5]))
        # scale the blobs so their projections carry the images' power at low resolution
        self.estep.set_resolution(self.r_max)
        from compute.geometry import random_rotations

        st = self.estep.store(self.xp.asarray(refs[0]))
        P = to_numpy(self.estep.project(st, random_rotations(50, 1)))
        Xl = to_numpy(self.estep.prepare_images(self.xp.asarray(imgs[:100])))
        scale = np.sqrt(np.mean(np.abs(Xl) ** 2) / max(np.mean(np.abs(P) ** 2), 1e-30))
        refs = refs * np.float32(scale * 0.5)
        self.state = new_state(self.estep.to_fourier(self.xp.asarray(refs)), sigma2, xp=self.xp)

    @property
    def iteration(self) -> int:
        return 0 if self.state is None else self.state.iteration

    @property
    def done(self) -> bool:
        return self.iteration >= self.params.n_iter

    def resolution_shell(self) -> int:
        st = self.state
        curve = (st.class_frac[:, None] * st.fsc).sum(0)
        below = np.nonzero(curve[1:] < 0.5)[0]
        return int(below[0]) if len(below) else self.n_shells - 1

    def class_resolution_a(self) -> np.ndarray:
        res = shell_resolution_a(self.source.box, self.source.pixel_size_a)
        out = []
        for f in self.state.fsc:
            below = np.nonzero(f[1:] < 0.5)[0]
            s = int(below[0]) if len(below) else len(f) - 1
            out.append(res[max(s, 1)])
        return np.array(out)

    # -- E-step ------------------------------------------------------------------------------------
    def _search(self, idx, accumulate: bool):
        xp = self.xp
        st = self.state
        imgs = self.source.images(idx)
        ok = np.isfinite(imgs.reshape(len(idx), -1)).all(1)
        idx, imgs = idx[ok], imgs[ok]
        ctf = self.source.ctf(idx)
        self.estep.set_resolution(self.r_max)
        vols = self.estep.to_real(st.refs)
        stores = [self.estep.store(vols[k]) for k in range(st.n_classes)]
        X = self.estep.prepare_images(xp.asarray(imgs))
        cv = self.estep.ctf_values(ctf)
        with np.errstate(divide="ignore"):
            logp = np.log(st.class_frac)
        hyp, best = self.estep.search(stores, X, cv, st.sigma2, logp, self.offsets,
                                      coarse_order=self.params.coarse_order, top=self.params.top)
        r = self.results
        eul = matrix_to_euler(best.rot)
        rot, tilt, psi = eul[:, 0], eul[:, 1], eul[:, 2]
        r.class_index[idx] = best.klass
        r.rot[idx], r.tilt[idx], r.psi[idx] = rot, tilt, psi
        r.origin_x_px[idx] = best.origin_px[:, 0]
        r.origin_y_px[idx] = best.origin_px[:, 1]
        r.max_prob[idx] = best.max_prob
        r.n_significant[idx] = best.n_significant
        r.log_likelihood[idx] = best.log_likelihood
        if not accumulate:
            return idx, None
        K = st.n_classes
        grids = [[self.estep.new_grid() for _ in range(K)] for _ in range(2)]
        self.estep.accumulate(grids, hyp, X, cv, st.sigma2, self.halves[idx], residual=True,
                              stores=stores)
        fshape = tuple(self.estep.shell_index.shape)
        data = xp.zeros((2, K, *fshape), dtype=np.complex64)
        cw = np.zeros((2, K))
        for h in range(2):
            for k in range(K):
                d, w = grids[h][k]
                if float(w.max()) <= 0:
                    continue
                eps = 1e-2 * float(w[w > 0].mean())
                g = self.estep.grid_to_volume(d, w, regulariser=eps)
                data[h, k] = self.estep.to_fourier(g * self.estep.mask3d)
        hsel = self.halves[idx][hyp.particle]
        for h in (1, 2):
            cw[h - 1] = np.bincount(hyp.klass[hsel == h], weights=hyp.weight[hsel == h], minlength=K)
        s2s, s2c = self.estep.residual_power(stores, X, cv, best)
        acc = Accumulators(data=data, weight=np.ones((2, K, self.n_shells), dtype=np.float32),
                           class_weight=cw, sigma2_sum=s2s, sigma2_count=s2c,
                           n_particles=len(idx), loglik_sum=float(best.log_likelihood.sum()))
        return idx, acc

    def step(self) -> StepInfo3D:
        if self.state is None:
            raise ComputeError("initialise() first")
        t0 = time.perf_counter()
        it = self.state.iteration
        stage = self.schedule.stage(it)
        idx = self.sampler.next(stage.batch_size)
        r_used = self.r_max
        idx, acc = self._search(idx, accumulate=True)
        rho = self.params.inactivity_threshold if stage.phase == "middle" else None
        replaced = self.optimiser.vdam_step(self.state, acc, stage.step, stage.tau_fudge,
                                            inactivity_threshold=rho)
        if self.params.recentre:
            self._recentre()
        if self.state.iteration >= 3:
            r = self.resolution_shell() + self.params.resolution_increment_shells
            r = min(r, self._scheduled_rmax(self.state.iteration))
            self.r_max = float(min(self._max_rmax(), max(self._ini_rmax(), r)))
        dt = time.perf_counter() - t0
        self.total_seconds += dt
        return StepInfo3D(it + 1, self.params.n_iter, stage.phase, len(idx), r_used, dt, replaced)

    def final_pass(self, progress=None) -> ParticleAssignment:
        n = self.source.n_particles
        b = self.params.batch
        for c0 in range(0, n, b):
            self._search(np.arange(c0, min(n, c0 + b)), accumulate=False)
            if progress is not None:
                progress(min(n, c0 + b), n)
        return self.results

    def class_volume(self, k: int) -> np.ndarray:
        """Real-space map of class ``k`` (n, n, n) float32."""
        return to_numpy(self.estep.to_real(self.state.refs[k:k + 1])[0])

    def checkpoint(self) -> dict[str, np.ndarray]:
        d = self.state.to_arrays()
        d.update({f"res_{k}": getattr(self.results, k) for k in self.results.__dataclass_fields__})
        pi, off = self.sampler.position()
        d.update(sampler=np.array([pi, off]), r_max=np.array(self.r_max), halves=self.halves,
                 total_seconds=np.array(self.total_seconds))
        return d

    def restore(self, d) -> None:
        self.state = OptimiserState.from_arrays(d, xp=self.xp)
        for k in self.results.__dataclass_fields__:
            getattr(self.results, k)[:] = d[f"res_{k}"]
        pi, off = (int(v) for v in d["sampler"])
        self.sampler = BatchSampler(self.source.n_particles, seed=self.params.seed,
                                    pass_index=pi, offset=off)
        self.r_max = float(d["r_max"])
        self.halves = np.asarray(d["halves"]).astype(np.int64)
        self.total_seconds = float(d["total_seconds"])
