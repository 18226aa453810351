"""VDAM schedules: mini-batch size, step size and regularisation fudge per mini-batch.

Three phases (RELION 4): the first 30 % of the mini-batches at the initial step size and
batch size, the last 20 % at the final ones; in between the step size and the fudge T follow
a sigmoid centred a quarter of the way into the middle phase and the batch size grows
linearly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compute.errors import ComputeError


@dataclass(frozen=True)
class ScheduleParams:
    """Defaults for 2D; :meth:`initial_model` gives the 3D initial-model ones."""

    n_iter: int = 200
    ini_frac: float = 0.3
    fin_frac: float = 0.2
    ini_step: float = 0.9
    fin_step: float = 0.3
    tau_fudge: float = 2.0
    ini_batch_frac: float = 0.005
    ini_batch_max: int = 10_000
    ini_batch_min: int = 200
    fin_batch_frac: float = 0.05
    fin_batch_max: int = 100_000
    fin_batch_min: int = 1_000
    sigmoid_sharpness: float = 20.0

    @classmethod
    def initial_model(cls, n_iter: int = 200, tau_fudge: float = 4.0) -> ScheduleParams:
        return cls(n_iter=n_iter, fin_step=0.5, tau_fudge=tau_fudge, ini_batch_max=5_000,
                   fin_batch_frac=0.10, fin_batch_max=50_000)


@dataclass(frozen=True)
class Stage:
    """What mini-batch ``iteration`` (0-based) uses."""

    iteration: int
    phase: str          # "initial" | "middle" | "final"
    batch_size: int
    step: float
    tau_fudge: float


class Schedule:
    """Per-mini-batch settings for a data set of ``n_particles``."""

    def __init__(self, n_particles: int, params: ScheduleParams | None = None) -> None:
        p = params or ScheduleParams()
        if p.n_iter < 1:
            raise ComputeError(f"the number of mini-batches must be >= 1, got {p.n_iter}")
        if n_particles < 1:
            raise ComputeError("no particles to classify")
        self.params = p
        self.n_particles = int(n_particles)
        self.n_ini = int(round(p.n_iter * p.ini_frac))
        self.n_fin = int(round(p.n_iter * p.fin_frac))
        self.n_mid = max(0, p.n_iter - self.n_ini - self.n_fin)
        n = self.n_particles
        self.ini_batch = min(n, max(min(int(p.ini_batch_frac * n), p.ini_batch_max), p.ini_batch_min))
        self.fin_batch = min(n, max(min(int(p.fin_batch_frac * n), p.fin_batch_max), p.fin_batch_min))

    def _sigmoid01(self, x: float) -> float:
        k = self.params.sigmoid_sharpness

        def s(t: float) -> float:
            return 1.0 / (1.0 + np.exp(-k * (t - 0.25)))

        return float((s(x) - s(0.0)) / (s(1.0) - s(0.0)))

    def stage(self, iteration: int) -> Stage:
        p = self.params
        it = int(iteration)
        if it < self.n_ini:
            return Stage(it, "initial", self.ini_batch, p.ini_step, 1.0)
        if it >= self.n_ini + self.n_mid:
            return Stage(it, "final", self.fin_batch, p.fin_step, p.tau_fudge)
        x = (it - self.n_ini) / max(1, self.n_mid)
        s = self._sigmoid01(x)
        bs = int(round(self.ini_batch + (self.fin_batch - self.ini_batch) * x))
        return Stage(it, "middle", bs, p.ini_step + (p.fin_step - p.ini_step) * s,
                     1.0 + (p.tau_fudge - 1.0) * s)

    def __iter__(self):
        return (self.stage(i) for i in range(self.params.n_iter))

    def total_particles(self) -> int:
        """Particle visits over the whole schedule (for ETA and cost estimates)."""
        return int(sum(s.batch_size for s in self))


class BatchSampler:
    """Mini-batches of particle indices: each pass is a fresh seeded permutation.

    The position (pass number, offset) fully determines the next batch, so a resumed run
    draws exactly the batches the killed run would have drawn.
    """

    def __init__(self, n_particles: int, seed: int = 0, pass_index: int = 0, offset: int = 0):
        self.n = int(n_particles)
        self.seed = int(seed)
        self.pass_index = int(pass_index)
        self.offset = int(offset)
        self._perm = self._permutation(self.pass_index)

    def _permutation(self, k: int) -> np.ndarray:
        return np.random.default_rng([self.seed, k]).permutation(self.n)

    def next(self, size: int) -> np.ndarray:
        size = min(int(size), self.n)
        out = []
        need = size
        while need > 0:
            if self.offset >= self.n:
                self.pass_index += 1
                self.offset = 0
                self._perm = self._permutation(self.pass_index)
            take = self._perm[self.offset:self.offset + need]
            out.append(take)
            self.offset += len(take)
            need -= len(take)
        return np.unique(np.concatenate(out))

    def position(self) -> tuple[int, int]:
        return self.pass_index, self.offset
