"""2D classification driver: VDAM mini-batches (or EM iterations) over a particle source.

Arrays in, arrays out: the particles come from a :class:`ParticleSource` (the job reads
them from memory-mapped stacks), results are NumPy arrays the job writes to STAR/MRC.
A run is a sequence of calls the job can interleave with checkpoints and abort checks::

    clf = Classify2D(source, params)
    clf.initialise()                          # or clf.restore(saved_arrays)
    while not clf.done:
        info = clf.step()                     # one mini-batch (VDAM) or one pass (EM)
    results = clf.final_pass()                # VDAM: assignment only, no update
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Protocol

import numpy as np

from compute.backend import to_numpy
from compute.errors import ComputeError
from compute.fourier import shell_resolution_a
from compute.vdam.estep2d import CtfBatch, Estep2D, ParticleResults, Sampling2D
from compute.vdam.init import blob_references, match_power
from compute.vdam.optimiser import (
    Accumulators,
    OptimiserState,
    VdamOptimiser,
    new_state,
)
from compute.vdam.schedule import BatchSampler, Schedule, ScheduleParams

log = logging.getLogger(__name__)


class ParticleSource(Protocol):
    """Random access to the particles: images (B, n, n) float32 and their CTFs."""

    n_particles: int
    box: int
    pixel_size_a: float

    def images(self, idx: np.ndarray) -> np.ndarray: ...

    def ctf(self, idx: np.ndarray) -> CtfBatch: ...


@dataclass
class ArraySource:
    """A :class:`ParticleSource` over in-memory arrays (tests, small data)."""

    stack: np.ndarray
    pixel_size_a: float
    ctfs: CtfBatch | None = None

    @property
    def n_particles(self) -> int:
        return int(self.stack.shape[0])

    @property
    def box(self) -> int:
        return int(self.stack.shape[-1])

    def images(self, idx):
        return np.asarray(self.stack[idx], dtype=np.float32)

    def ctf(self, idx):
        if self.ctfs is None:
            return CtfBatch.none(len(idx))
        return self.ctfs.subset(idx)


@dataclass
class Classify2DParams:
    """Options of a 2D classification (RELION 4 class2d names in comments)."""

    n_classes: int = 50                     # nr_classes
    use_em: bool = False                    # do_em (else do_grad)
    n_iter: int = 200                       # nr_iter_grad (mini-batches)
    n_iter_em: int = 25                     # nr_iter_em
    tau_fudge: float = 2.0                  # tau_fudge
    particle_diameter_a: float = 200.0      # particle_diameter
    psi_step_deg: float = 6.0               # psi_sampling
    offset_range_px: float = 5.0            # offset_range
    offset_step_px: float = 1.0             # offset_step
    do_ctf: bool = True                     # do_ctf_correction
    zero_mask: bool = True                  # do_zero_mask
    inactivity_threshold: float = 0.1       # class_inactivity_threshold (0 = off)
    replacement: str = "split"              # "split" a class in two / "copy" (RELION 4)
    # which class a split takes its halves from: "misfit", the class whose particles fit it
    # worst (class_misfit), or "largest", the biggest class (the rule before 2026-12-05);
    # docs/class2d.md, "Junk classes in VDAM"
    split_source: str = "misfit"
    # how a split divides its source class b: "misfit", the two children from b's particles
    # in the mini-batch that fit it worse / better than its median (they differ along b's
    # heterogeneity), or "halfset", from b's two half-set moments (they differ by half-set
    # noise; the rule before 2026-12-05 06:35 UTC); docs/class2d.md, "Junk classes in VDAM"
    split_mode: str = "misfit"
    # VDAM only: EM iterations over all particles after the mini-batches, before the final
    # pass (RELION 4's --grad_em_iters, default 0)
    grad_em_iters: int = 0
    # search a coarser psi/offset grid while the E-step resolution is low (psi step = the
    # resolution over the particle radius, offset step = a third of the resolution; never
    # finer than psi_step_deg / offset_step_px; the final pass always uses the user's grid),
    # VDAM and EM alike (job option allow_coarser, as RELION's, off by default: 5-7 % less
    # CPU on the standard set, but less pure classes in small boxes; docs/class2d.md)
    coarse_sampling: bool = False
    # VDAM only: cap on the E-step resolution, grad_ini_resol in the initial phase, linear to
    # grad_fin_resol over the middle phase, grad_fin_resol in the final phase and final pass
    # (RELION 4's --grad_ini_resol / --grad_fin_resol, whose defaults are 35 / 15 A); None =
    # the FSC rule alone
    grad_ini_resol_a: float | None = 35.0
    grad_fin_resol_a: float | None = 15.0
    seed: int = 1
    ini_resolution_a: float = 30.0          # resolution limit of the first E-steps
    resolution_increment_shells: int = 5
    em_batch: int = 1000                    # particles per E-step call in EM / final pass


def class_misfit(class_index, log_likelihood, n_classes: int,
                 min_members: int = 3) -> np.ndarray:
    """How badly each class fits its particles in one mini-batch, (K,).

    The sum over the class's particles of how far each one's log-likelihood (at its best
    hypothesis) lies below the median of the class: large for a class that holds particles
    its reference does not explain (junk in a molecule class, two kinds of junk in one
    class), and it grows with the number of such particles. Classes with fewer than
    ``min_members`` particles in the batch score 0. The split replacement divides the class
    with the largest score, as bisecting k-means splits the cluster with the largest spread
    (the one-sided, robust analogue of its sum of squared errors).
    """
    cls = np.asarray(class_index)
    ll = np.asarray(log_likelihood, dtype=np.float64)
    out = np.zeros(int(n_classes))
    for k in np.unique(cls[cls >= 0]):
        sel = cls == k
        if sel.sum() >= min_members:
            out[k] = np.maximum(np.median(ll[sel]) - ll[sel], 0.0).sum()
    return out


@dataclass
class StepInfo:
    iteration: int
    n_total: int
    phase: str
    batch_size: int
    seconds: float
    estep_seconds: float
    r_max: float
    replaced: list[tuple[int, int]] = field(default_factory=list)


class Classify2D:
    """2D classification of a particle source with VDAM (default) or EM."""

    def __init__(self, source: ParticleSource, params: Classify2DParams,
                 xp: ModuleType = np) -> None:
        p = params
        n = source.n_particles
        if p.n_classes < 1:
            raise ComputeError(f"the number of classes must be >= 1, got {p.n_classes}")
        if p.n_classes > n:
            raise ComputeError(f"{p.n_classes} classes requested but there are only {n} "
                               "particles; use fewer classes")
        if p.split_source not in ("misfit", "largest"):
            raise ComputeError(f"split_source must be 'misfit' or 'largest', got "
                               f"{p.split_source!r}")
        if p.split_mode not in ("halfset", "misfit"):
            raise ComputeError(f"split_mode must be 'halfset' or 'misfit', got "
                               f"{p.split_mode!r}")
        self.source = source
        self.params = p
        self.xp = xp
        self.estep = Estep2D(source.box, source.pixel_size_a,
                             Sampling2D(p.psi_step_deg, p.offset_range_px, p.offset_step_px),
                             p.particle_diameter_a, do_ctf=p.do_ctf, zero_mask=p.zero_mask, xp=xp)
        self.n_shells = self.estep.n_shells
        self.optimiser = VdamOptimiser(self.estep.shell_index, self.n_shells,
                                       constrain=self._mask_refs, replacement=p.replacement)
        self.schedule = Schedule(n, ScheduleParams(n_iter=p.n_iter, tau_fudge=p.tau_fudge))
        self.n_total = p.n_iter_em if p.use_em else p.n_iter + max(0, int(p.grad_em_iters))
        rng = np.random.default_rng([p.seed, 7])
        self.halves = (rng.permutation(n) % 2 + 1).astype(np.int64)
        self.results = ParticleResults(
            class_index=np.full(n, -1, dtype=np.int64), psi_deg=np.zeros(n),
            origin_x_px=np.zeros(n), origin_y_px=np.zeros(n), max_prob=np.zeros(n),
            n_significant=np.zeros(n, dtype=np.int64), log_likelihood=np.zeros(n))
        self.bad = np.zeros(n, dtype=bool)            # NaN/inf images, skipped
        self.sampler = BatchSampler(n, seed=p.seed)
        self.state: OptimiserState | None = None
        self.r_max = self._ini_rmax()
        cap = self.resolution_cap_shell(0)
        if cap is not None:
            self.r_max = float(min(self.r_max, cap))
        self.estep_seconds = 0.0
        self.total_seconds = 0.0

    # -- set-up ------------------------------------------------------------------------------
    def _ini_rmax(self) -> float:
        n, px = self.source.box, self.source.pixel_size_a
        return float(min(n // 2, max(6.0, n * px / self.params.ini_resolution_a)))

    def _mask_refs(self, refs):
        real = self.estep.to_real(refs) * self.estep.mask
        return self.estep.to_fourier(real).astype(np.complex64)

    def _read(self, idx: np.ndarray):
        """Images and CTFs of ``idx`` with non-finite images dropped (and remembered)."""
        imgs = self.source.images(idx)
        ok = np.isfinite(imgs.reshape(len(idx), -1)).all(axis=1)
        if not ok.all():
            bad = idx[~ok]
            self.bad[bad] = True
            log.warning("skipping %d particle(s) with NaN/inf pixels (first: index %d)",
                        len(bad), int(bad[0]))
            idx, imgs = idx[ok], imgs[ok]
        return idx, imgs, self.source.ctf(idx)

    def initialise(self) -> None:
        """Blob references scaled to the data's power, and sigma2 from the particles."""
        p = self.params
        n = self.source.box
        take = np.random.default_rng([p.seed, 3]).permutation(self.source.n_particles)
        take = np.sort(take[:min(500, len(take))])
        idx, imgs, _ = self._read(take)
        if len(idx) == 0:
            raise ComputeError("every sampled particle image holds NaN or infinite values")
        refs = blob_references(p.n_classes, (n, n), self.source.pixel_size_a,
                               p.particle_diameter_a, rng=np.random.default_rng([p.seed, 5]))
        masked = imgs * to_numpy(self.estep.mask)
        refs = match_power(refs, masked[:100], int(self.r_max))
        # noise: the images' power spectrum (signal included: an overestimate that anneals)
        X = to_numpy(self.estep.prepare_images(self.xp.asarray(imgs)))
        ps = np.mean(np.abs(X) ** 2, axis=0)
        sig = np.bincount(to_numpy(self.estep.shell_index).ravel(), weights=ps.ravel(),
                          minlength=self.n_shells)[:self.n_shells]
        cnt = np.bincount(to_numpy(self.estep.shell_index).ravel(), minlength=self.n_shells)
        sigma2 = sig / np.maximum(cnt[:self.n_shells], 1)
        sigma2 = np.maximum(sigma2, 1e-6 * sigma2[sigma2 > 0].max())
        self.state = new_state(self.estep.to_fourier(self.xp.asarray(refs)), sigma2, xp=self.xp)

    @property
    def iteration(self) -> int:
        return 0 if self.state is None else self.state.iteration

    @property
    def done(self) -> bool:
        return self.iteration >= self.n_total

    # -- resolution --------------------------------------------------------------------------
    def resolution_shell(self) -> int:
        """Highest shell where the class-weighted regularised FSC stays >= 0.5."""
        st = self.state
        curve = (st.class_frac[:, None] * st.fsc).sum(0)
        below = np.nonzero(curve[1:] < 0.5)[0]
        return int(below[0]) if len(below) else self.n_shells - 1

    def resolution_cap_shell(self, iteration: int) -> float | None:
        """VDAM's scheduled resolution cap (shells) for mini-batch ``iteration`` (or None)."""
        p = self.params
        if p.use_em or p.grad_ini_resol_a is None or p.grad_fin_resol_a is None:
            return None
        sch = self.schedule
        it = min(int(iteration), p.n_iter - 1)
        if it < sch.n_ini:
            res = p.grad_ini_resol_a
        elif it >= sch.n_ini + sch.n_mid:
            res = p.grad_fin_resol_a
        else:
            x = (it - sch.n_ini) / max(1, sch.n_mid)
            res = p.grad_ini_resol_a + (p.grad_fin_resol_a - p.grad_ini_resol_a) * x
        return max(6.0, self.source.box * self.source.pixel_size_a / res)

    def sampling_for(self, r_max_shell: float) -> Sampling2D:
        """The psi/offset grid searched at E-step resolution ``r_max_shell`` (shells)."""
        es = self.estep
        if not self.params.coarse_sampling:
            return es.sampling
        res_a = es.box * es.pixel_size_a / max(float(r_max_shell), 1e-6)
        return es.sampling.for_resolution(res_a, self.params.particle_diameter_a,
                                          es.pixel_size_a)

    def _update_rmax(self) -> None:
        cap = self.resolution_cap_shell(self.state.iteration)
        if self.state.iteration < 3:
            if cap is not None:
                self.r_max = float(min(self._ini_rmax(), cap))
            return
        r = self.resolution_shell() + self.params.resolution_increment_shells
        r = min(self.source.box // 2, max(self._ini_rmax(), r))
        if cap is not None:
            r = min(r, cap)
        self.r_max = float(r)

    def class_resolution_a(self) -> np.ndarray:
        """Estimated resolution (A) per class from its regularised FSC (0.5 crossing)."""
        n, px = self.source.box, self.source.pixel_size_a
        res = shell_resolution_a(n, px)
        out = np.empty(self.state.n_classes)
        for k, f in enumerate(self.state.fsc):
            below = np.nonzero(f[1:] < 0.5)[0]
            s = int(below[0]) if len(below) else len(f) - 1
            out[k] = res[max(s, 1)]
        return out

    # -- one step ----------------------------------------------------------------------------
    def _estep(self, idx: np.ndarray, accumulate: bool = True):
        idx, imgs, ctf = self._read(idx)
        if len(idx) == 0:
            return idx, None, None
        st = self.state
        # the final assignment pass reports the poses on the user's grid
        self.estep.set_resolution(self.r_max, self.sampling_for(self.r_max) if accumulate
                                  else self.estep.sampling)
        X = self.estep.prepare_images(self.xp.asarray(imgs),
                                      rng=np.random.default_rng([self.params.seed, int(idx[0])]))
        with np.errstate(divide="ignore"):
            logp = np.log(st.class_frac)
        t0 = time.perf_counter()
        acc, res = self.estep.run(st.refs, X, ctf, st.sigma2, logp, self.halves[idx],
                                  accumulate=accumulate)
        self.estep_seconds += time.perf_counter() - t0
        for name in res.__dataclass_fields__:
            getattr(self.results, name)[idx] = getattr(res, name)
        return idx, acc, res

    def step(self) -> StepInfo:
        """One VDAM mini-batch, or one full EM iteration."""
        if self.state is None:
            raise ComputeError("initialise() or restore() first")
        t0 = time.perf_counter()
        e0 = self.estep_seconds
        if self.params.use_em or self.state.iteration >= self.params.n_iter:
            info = self._em_iteration()
        else:
            info = self._vdam_batch()
        info.seconds = time.perf_counter() - t0
        info.estep_seconds = self.estep_seconds - e0
        self.total_seconds += info.seconds
        return info

    def _vdam_batch(self) -> StepInfo:
        it = self.state.iteration
        stage = self.schedule.stage(it)
        idx = self.sampler.next(stage.batch_size)
        idx = idx[~self.bad[idx]]
        r_used = self.r_max
        idx, acc, res = self._estep(idx)
        replaced: list[tuple[int, int]] = []
        if acc is not None:
            rho = self.params.inactivity_threshold if stage.phase == "middle" else None
            score = None
            if rho and self.params.split_source == "misfit":
                score = class_misfit(res.class_index, res.log_likelihood, self.params.n_classes)
            groups = None
            if rho and self.params.split_mode == "misfit":
                groups = self._fit_groups(idx, res)
            replaced = self.optimiser.vdam_step(self.state, acc, stage.step, stage.tau_fudge,
                                                inactivity_threshold=rho, split_score=score,
                                                split_groups=groups)
        else:
            self.state.iteration += 1
        self._update_rmax()
        return StepInfo(it + 1, self.n_total, stage.phase, len(idx), 0.0, 0.0, r_used, replaced)

    def _fit_groups(self, idx: np.ndarray, res: ParticleResults, min_members: int = 4):
        """For the misfit split: ``b -> Accumulators`` of class b's particles in this
        mini-batch, re-run through the E-step (same references, noise and priors as the
        batch) with the half-set slot standing for the fit group: 1 = log-likelihood below
        the class's median, 2 = the rest. None when b holds fewer than ``min_members``."""
        st = self.state
        refs, sigma2 = st.refs, st.sigma2.copy()
        with np.errstate(divide="ignore"):
            logp = np.log(st.class_frac)

        def groups(b: int):
            sel = np.nonzero(res.class_index == b)[0]
            if len(sel) < min_members:
                return None
            ll = res.log_likelihood[sel]
            lab = np.where(ll < np.median(ll), 1, 2)
            if (lab == 1).all() or (lab == 2).all():
                return None
            sub = idx[sel]
            X = self.estep.prepare_images(
                self.xp.asarray(self.source.images(sub)),
                rng=np.random.default_rng([self.params.seed, int(sub[0])]))
            t0 = time.perf_counter()
            acc, _ = self.estep.run(refs, X, self.source.ctf(sub), sigma2, logp, lab)
            self.estep_seconds += time.perf_counter() - t0
            return acc

        return groups

    def _em_iteration(self) -> StepInfo:
        it = self.state.iteration
        n = self.source.n_particles
        total: Accumulators | None = None
        r_used = self.r_max
        for c0 in range(0, n, self.params.em_batch):
            idx = np.arange(c0, min(n, c0 + self.params.em_batch))
            idx = idx[~self.bad[idx]]
            idx, acc, _ = self._estep(idx)
            if acc is None:
                continue
            if total is None:
                total = acc
            else:
                total += acc
        if total is None:
            raise ComputeError("no usable particles (all images hold NaN/inf)")
        # RELION's EM fudge ramps in over the first iterations as well
        self.optimiser.em_step(self.state, total, self.params.tau_fudge)
        self._update_rmax()
        return StepInfo(it + 1, self.n_total, "em", n, 0.0, 0.0, r_used)

    def final_pass(self, progress=None) -> ParticleResults:
        """Assign every particle (class, psi, origin, P_max) with the final references."""
        n = self.source.n_particles
        chunk = self.params.em_batch
        t0 = time.perf_counter()
        for c0 in range(0, n, chunk):
            idx = np.arange(c0, min(n, c0 + chunk))
            idx = idx[~self.bad[idx]]
            self._estep(idx, accumulate=False)
            if progress is not None:
                progress(min(n, c0 + chunk), n)
        self.total_seconds += time.perf_counter() - t0
        return self.results

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, np.ndarray]:
        """Arrays that let :meth:`restore` continue exactly where this run is."""
        d = self.state.to_arrays()
        d.update({f"res_{k}": getattr(self.results, k) for k in self.results.__dataclass_fields__})
        pi, off = self.sampler.position()
        last = np.full(self.params.n_classes, -1, dtype=np.int64)
        for k, t in self.optimiser.last_replaced.items():
            last[k] = t
        d.update(sampler=np.array([pi, off]), r_max=np.array(self.r_max), bad=self.bad,
                 last_replaced=last,
                 halves=self.halves, estep_seconds=np.array(self.estep_seconds),
                 total_seconds=np.array(self.total_seconds))
        return d

    def restore(self, d) -> None:
        self.state = OptimiserState.from_arrays(d, xp=self.xp)
        if self.state.refs.shape[0] != self.params.n_classes:
            raise ComputeError("the saved state has a different number of classes")
        for k in self.results.__dataclass_fields__:
            getattr(self.results, k)[:] = d[f"res_{k}"]
        pi, off = (int(v) for v in d["sampler"])
        self.sampler = BatchSampler(self.source.n_particles, seed=self.params.seed,
                                    pass_index=pi, offset=off)
        self.r_max = float(d["r_max"])
        if "last_replaced" in d:
            self.optimiser.last_replaced = {int(k): int(t) for k, t in
                                             enumerate(np.asarray(d["last_replaced"])) if t >= 0}
        self.bad = np.asarray(d["bad"]).astype(bool)
        self.halves = np.asarray(d["halves"])
        self.estep_seconds = float(d["estep_seconds"])
        self.total_seconds = float(d["total_seconds"])

    # -- outputs -----------------------------------------------------------------------------
    def class_images(self) -> np.ndarray:
        """Real-space class averages (K, n, n) float32 (NumPy)."""
        return to_numpy(self.estep.to_real(self.state.refs)).astype(np.float32)
