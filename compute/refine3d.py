"""Gold-standard 3D auto-refinement (RELION's ``relion_refine --auto_refine --split_random_halves``).

The particles are split into two independent half-sets; each half is aligned against its own
reference only and reconstructed on its own, so the FSC between the two half-maps is an
honest resolution estimate (FSC = 0.143). Per iteration:

1. E-step per half (:class:`compute.estep3d.Estep3D`): while the angular step is coarser than
   ``auto_local_step_deg`` every particle gets a global adaptive search (HEALPix coarse grid,
   then per-particle coarse-to-fine refinement down to the current step); below it, a local
   search around each particle's previous orientation.
2. Reconstruction of each half (significant hypotheses back-projected with their posteriors,
   symmetry mates included) with a Wiener regulariser from the previous FSC:
   ``v = sum(w CTF X / s2) / (sum(w CTF^2 / s2) + 1 / (T tau2))`` where the per-shell
   ``1 / tau2`` is taken as ``mean_shell(weight) / SSNR`` and ``SSNR = FSC / (1 - FSC)``.
3. FSC between the masked half-maps; resolution at 0.143; the noise sigma2 per shell from the
   residuals at the best poses; the next resolution limit = current resolution + a few shells;
   the angular step is halved when the resolution stops improving (as RELION does) and never
   finer than the resolution needs (half a shell's arc at ``r_max``, at least 0.9 deg).
4. Stop when the step is at its finest, the resolution did not improve and the orientations
   hardly changed (or at ``max_iter``).

The final map ``combined`` is the reconstruction from both halves with the full-set SSNR
(``2 FSC / (1 + FSC)``), as RELION's ``run_class001.mrc``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from compute.backend import to_numpy
from compute.errors import ComputeError
from compute.estep3d import Estep3D, offsets_grid
from compute.fourier import fsc as fsc_curve
from compute.fourier import lowpass, resolution_at_threshold
from compute.geometry import angular_distance_deg, matrix_to_euler
from compute.orientations import healpix_step_deg
from compute.symmetry import symmetry_matrices

log = logging.getLogger(__name__)


@dataclass
class Refine3DParams:
    ini_high_a: float = 40.0              # ini_high: low-pass of the starting reference
    symmetry: str = "C1"                  # sym_name
    particle_diameter_a: float = 200.0    # particle_diameter
    initial_step_deg: float = 7.5         # sampling
    auto_local_step_deg: float = 1.8      # auto_local_sampling
    offset_range_px: float = 5.0          # offset_range
    offset_step_px: float = 1.0           # offset_step
    do_ctf: bool = True
    tau_fudge: float = 1.0
    max_iter: int = 20
    seed: int = 1
    coarse_order: int = 1                 # HEALPix order of the global coarse grid
    top: int = 4                          # candidates refined per particle in a search
    batch: int = 400                      # particles per E-step call
    extra_shells: int = 3                 # resolution limit = current FSC shell + this


@dataclass
class RefineIteration:
    iteration: int
    resolution_a: float
    step_deg: float
    r_max: float
    local: bool
    angle_change_deg: float               # median over the particles (drives the sampling)
    seconds: float
    # on a discrete grid most particles keep their orientation once the map has settled, so
    # the median reads 0; the mean and the fraction that moved show what is still changing
    # (RELION prints the mean, rlnChangesOptimalOrientations)
    angle_change_mean_deg: float = float("nan")
    changed_fraction: float = float("nan")


@dataclass
class RefineResult:
    combined: np.ndarray
    half1: np.ndarray
    half2: np.ndarray
    fsc: np.ndarray                 # (n_shells,) FSC between the masked half-maps
    resolution_a: float
    rot: np.ndarray
    tilt: np.ndarray
    psi: np.ndarray
    origin_x_px: np.ndarray
    origin_y_px: np.ndarray
    max_prob: np.ndarray
    n_significant: np.ndarray
    log_likelihood: np.ndarray
    halves: np.ndarray
    sigma2: np.ndarray
    history: list


class Refine3D:
    """Gold-standard refinement; call :meth:`iterate` until :attr:`done`, then :meth:`result`."""

    def __init__(self, source, reference, params: Refine3DParams, xp=np,
                 initial_origin_px=None) -> None:
        p = params
        n = source.n_particles
        if n < 2:
            raise ComputeError("refinement needs at least 2 particles")
        ref = np.asarray(reference, dtype=np.float32)
        if ref.shape != (source.box,) * 3:
            raise ComputeError(f"the reference is {ref.shape}, the particles' box is {source.box}")
        self.source, self.params, self.xp = source, p, xp
        self.sym = symmetry_matrices(p.symmetry)
        self.estep = Estep3D(source.box, source.pixel_size_a, p.particle_diameter_a,
                             do_ctf=p.do_ctf, xp=xp)
        self.n_shells = self.estep.n_shells
        box, px = source.box, source.pixel_size_a
        rng = np.random.default_rng([p.seed, 7])
        self.halves = (rng.permutation(n) % 2 + 1).astype(np.int64)
        start = lowpass(ref, p.ini_high_a, px) * to_numpy(self.estep.mask3d)
        self.refs = [start.copy(), start.copy()]
        self.offsets = offsets_grid(p.offset_range_px, p.offset_step_px)
        self.r_max = float(min(box // 2 - 1, max(4.0, box * px / p.ini_high_a)))
        self.step_deg = float(p.initial_step_deg)
        self.iteration = 0
        self.fsc = np.zeros(self.n_shells)
        self.resolution_a = float(p.ini_high_a)
        self.best_resolution_a = np.inf
        self.n_no_gain = 0
        self.done = False
        self.history: list[RefineIteration] = []
        self.rot = np.full((n, 3, 3), np.nan)
        z = np.zeros(n)
        self.origin = np.zeros((n, 2))
        if initial_origin_px is not None:
            self.origin[:] = np.asarray(initial_origin_px, dtype=np.float64).reshape(n, 2)
        self.max_prob, self.nsig, self.loglik = z.copy(), np.zeros(n, int), z.copy()
        self.sigma2 = self._initial_sigma2()
        self.grids = None

    def _initial_sigma2(self) -> np.ndarray:
        n = self.source.box
        take = np.sort(np.random.default_rng([self.params.seed, 3])
                       .permutation(self.source.n_particles)[:300])
        self.estep.set_resolution(n // 2 - 1)
        X = to_numpy(self.estep.prepare_images(self.xp.asarray(self.source.images(take))))
        ps = np.mean(np.abs(X) ** 2, axis=0) * 2.0
        sig = np.bincount(self.estep._shell, weights=ps, minlength=self.n_shells)
        cnt = np.bincount(self.estep._shell, minlength=self.n_shells) * 2.0
        s2 = sig / np.maximum(cnt, 1)
        s2[0] = s2[1]
        return np.maximum(s2, 1e-6 * s2.max())

    @property
    def local(self) -> bool:
        return self.iteration > 0 and self.step_deg <= self.params.auto_local_step_deg + 1e-6

    def _finest_step(self) -> float:
        """The angular step the current resolution limit needs (an arc of half a shell at
        ``r_max``), never below 0.9 deg; at 64 px near Nyquist this is ~0.9 deg, so the last
        iterations are local searches (below ``auto_local_sampling``)."""
        return max(0.9, float(np.degrees(0.5 / max(self.r_max, 1.0))))

    def iterate(self, progress=None) -> RefineIteration:
        """One iteration over all particles (both halves)."""
        if self.done:
            raise ComputeError("the refinement has converged already")
        t0 = time.perf_counter()
        xp, es, p = self.xp, self.estep, self.params
        es.set_resolution(self.r_max)
        stores = [es.store(xp.asarray(r)) for r in self.refs]
        grids = [[es.new_grid()], [es.new_grid()]]
        n = self.source.n_particles
        s2_sum = np.zeros(self.n_shells)
        s2_cnt = np.zeros(self.n_shells)
        local = self.local
        prev = self.rot.copy()
        done_n = 0
        for h in (1, 2):
            members = np.nonzero(self.halves == h)[0]
            for c0 in range(0, len(members), p.batch):
                idx = members[c0:c0 + p.batch]
                imgs = self.source.images(idx)
                X = es.prepare_images(xp.asarray(imgs))
                cv = es.ctf_values(self.source.ctf(idx))
                kw = {}
                if local:
                    kw = dict(local_rots=self.rot[idx], local_step_deg=2.0 * self.step_deg,
                              final_step_deg=self.step_deg, prior_origin_px=self.origin[idx])
                else:
                    kw = dict(coarse_order=p.coarse_order, top=p.top,
                              final_step_deg=self.step_deg, prior_origin_px=self.origin[idx])
                hyp, best = es.search([stores[h - 1]], X, cv, self.sigma2, np.zeros(1),
                                      self.offsets, **kw)
                self.rot[idx] = best.rot
                self.origin[idx] = best.origin_px
                self.max_prob[idx] = best.max_prob
                self.nsig[idx] = best.n_significant
                self.loglik[idx] = best.log_likelihood
                halves_b = np.full(len(idx), 1 if h == 1 else 2)
                g = [[grids[0][0]], [grids[1][0]]]
                es.accumulate(g, hyp, X, cv, self.sigma2, halves_b, residual=False,
                              symmetry=self.sym if len(self.sym) > 1 else None)
                s, c = es.residual_power([stores[h - 1]], X, cv, best)
                s2_sum += s
                s2_cnt += c
                done_n += len(idx)
                if progress is not None:
                    progress(done_n, n)
        self.grids = grids
        have = s2_cnt > 0
        self.sigma2 = np.where(have, s2_sum / np.maximum(s2_cnt, 1e-30), self.sigma2)
        self.sigma2[0] = self.sigma2[1]
        # reconstruct the halves with the previous FSC as the prior, then measure the new FSC
        self.refs = [self._reconstruct(grids[h][0], self.fsc, full=False) for h in range(2)]
        mask = to_numpy(es.mask3d)
        self.fsc = to_numpy(fsc_curve(self.refs[0] * mask, self.refs[1] * mask))
        # the half-maps only carry signal up to r_max: beyond it the FSC is meaningless
        self.fsc[int(self.r_max) + 1:] = 0.0
        box, px = self.source.box, self.source.pixel_size_a
        self.resolution_a = resolution_at_threshold(self.fsc, box, px, 0.143)
        change = mean_change = moved = np.nan
        if np.isfinite(prev).all():
            dist = angular_distance_deg(prev, self.rot)
            change = float(np.median(dist))
            mean_change = float(np.mean(dist))
            moved = float(np.mean(dist > 1e-3))
        info = RefineIteration(self.iteration + 1, self.resolution_a, self.step_deg, self.r_max,
                               local, change, time.perf_counter() - t0, mean_change, moved)
        self.history.append(info)
        self.iteration += 1
        self._next_sampling(change)
        return info

    def _next_sampling(self, change: float) -> None:
        p = self.params
        box, px = self.source.box, self.source.pixel_size_a
        improved = self.resolution_a < 0.97 * self.best_resolution_a
        self.best_resolution_a = min(self.best_resolution_a, self.resolution_a)
        self.n_no_gain = 0 if improved else self.n_no_gain + 1
        shell = box * px / self.resolution_a
        self.r_max = float(min(box // 2 - 1, max(self.r_max, shell + p.extra_shells)))
        finest = self._finest_step()
        at_finest = self.step_deg <= finest * 1.0001 or self.step_deg / 2 < finest * 0.75
        small_change = np.isfinite(change) and change <= 2.0 * self.step_deg
        if not improved and small_change and not at_finest:
            self.step_deg = max(self.step_deg / 2.0, finest)
            self.n_no_gain = 0
        elif (at_finest and self.n_no_gain >= 1 and small_change) or self.iteration >= p.max_iter:
            self.done = True

    def _reconstruct(self, grid, fsc, full: bool):
        """Wiener-like reconstruction of a (data, weight) grid with tau2 from an FSC."""
        es = self.estep
        data, weight = grid
        w = to_numpy(weight).reshape(es.box * es.pad + 1, es.box * es.pad + 1, -1)
        m = es.box * es.pad
        w = w[:m, :m, : m // 2 + 1]
        kz = np.arange(m) - m // 2
        kx = np.arange(m // 2 + 1)
        KZ, KY, KX = np.meshgrid(kz, kz, kx, indexing="ij")
        ri = np.rint(np.sqrt(KZ * KZ + KY * KY + KX * KX) / es.pad).astype(np.int64)
        ri = np.minimum(ri, self.n_shells - 1)
        cnt = np.bincount(ri.ravel(), minlength=self.n_shells)
        wmean = np.bincount(ri.ravel(), weights=w.ravel(), minlength=self.n_shells) / np.maximum(cnt, 1)
        f = np.clip(np.asarray(fsc, dtype=np.float64), 1e-3, 0.999)
        ssnr = 2 * f / (1 + f) / (1 - 2 * f / (1 + f)) if full else f / (1 - f)
        ssnr = ssnr * self.params.tau_fudge
        reg = wmean / ssnr
        if not np.any(np.asarray(fsc) > 0):   # no FSC yet: only avoid dividing by ~0
            reg = 1e-3 * np.maximum(wmean, wmean.max() * 1e-6)
        # beyond the current limit no data were inserted: keep it empty
        reg[int(self.r_max) + 2:] = np.inf
        reg = np.where(np.isfinite(reg), reg, 1e30)
        vol = es.grid_to_volume(data, weight, regulariser=self.xp.asarray(reg))
        return to_numpy(vol) * to_numpy(es.mask3d)

    def result(self) -> RefineResult:
        if self.grids is None:
            raise ComputeError("no iteration has run")
        d = self.grids[0][0][0] + self.grids[1][0][0]
        w = self.grids[0][0][1] + self.grids[1][0][1]
        combined = self._reconstruct((d, w), self.fsc, full=True)
        eul = matrix_to_euler(self.rot)
        return RefineResult(combined=combined, half1=self.refs[0], half2=self.refs[1],
                            fsc=self.fsc.copy(), resolution_a=self.resolution_a,
                            rot=eul[:, 0], tilt=eul[:, 1], psi=eul[:, 2],
                            origin_x_px=self.origin[:, 0].copy(),
                            origin_y_px=self.origin[:, 1].copy(), max_prob=self.max_prob.copy(),
                            n_significant=self.nsig.copy(), log_likelihood=self.loglik.copy(),
                            halves=self.halves.copy(), sigma2=self.sigma2.copy(),
                            history=list(self.history))


def healpix_order_of_step(step_deg: float) -> int:
    """HEALPix order whose step is closest to ``step_deg`` (for the STAR files)."""
    k = 0
    while healpix_step_deg(k) > step_deg * 1.01:
        k += 1
    return k
