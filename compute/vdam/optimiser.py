"""The VDAM update (RELION 4, Kimanius et al. 2021, eq. 12-14) and the EM update, for 2D or 3D.

Nothing here knows about poses, images or dimensionality. References live in Fourier space
as ``(K, *fourier_shape)`` complex arrays; every quantity that varies with resolution is
indexed through an integer ``shell_index`` array of ``fourier_shape``. An E-step (2D in
:mod:`compute.vdam.estep2d`, 3D by the initial-model code) hands over
:class:`Accumulators`:

- ``data[h, k]``   = G = sum_i P * H^T sigma^-2 (x_i - H v)     (half-set h = 0, 1)
- ``weight[h, k]`` = F = sum_i P * diag(H^T sigma^-2 H)          per Fourier element, or per
  shell (``(2, K, n_shells)``) when it is rotationally symmetric (2D in-plane search)

The gradient numerator is accumulated from residuals (not as B - F v), so an approximate F
only scales the step and never moves the fixed point; G^ = G / (F + eps1).

VDAM update for class k (one reference per class, as RELION 4 keeps for 2D and the initial
model; the half-sets give two first moments)::

    m_h <- b1 m_h + (1 - b1) (v + G^_h)                     (b1 = 0.9)
    (the moment is kept on the Newton targets v + G^ rather than on G^ itself: the same for a
    fixed v, but a heavy-ball momentum on Newton-scaled gradients with eta ~ 0.9 rings and
    overshoots the references by ~2x; the target form converges without ringing)
    u   <- b2 u   + (1 - b2) |G^_1 - G^_2|^2 / |(G^_1 + G^_2)/2|^2     (b2 = 0.999, RELION 4)
    D_h  = (m_h - v) / sqrt(u + eps2)                         (eps2 = 1: never amplifies)
    FSC_k per shell between the half references m_1 and m_2 (each an average of its half's
          mini-batch reconstructions v + G^_h), turned into the regularised weight
          f = 2T SNR / (1 + 2T SNR), SNR = FSC / (1 - FSC)
    v   <- v + eta_k [ f * (D_1 + D_2)/2 - (1 - f) v ],   eta_k = eta (1 - exp(-(3K+10) p_k))

The sign is that of an ascent (G is the gradient of the log-likelihood).
EM update (eq. 5-6, written as one preconditioned step so it uses the same G):
v <- v + (G - v/(T tau2)) / (F + 1/(T tau2)) = B/(F + 1/(T tau2)) when F is exact, with tau2
the reference power per shell and G, F summed over both halves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from types import ModuleType

import numpy as np

from compute.backend import to_numpy, xp_of


@dataclass
class Accumulators:
    """What one E-step pass over a batch of particles returns (see the module docstring).

    ``sigma2_sum / sigma2_count`` is the batch's noise power per shell (residuals of the best
    hypotheses); ``class_weight[h, k]`` the summed posteriors.
    """

    data: object            # (2, K, *fshape) complex
    weight: object          # (2, K, *fshape) or (2, K, n_shells) real
    class_weight: object    # (2, K)
    sigma2_sum: object      # (n_shells,)
    sigma2_count: object    # (n_shells,)
    n_particles: int = 0
    loglik_sum: float = 0.0

    def __iadd__(self, other: Accumulators) -> Accumulators:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


@dataclass
class OptimiserState:
    """Everything needed to continue a run (written to disk by the job at each checkpoint)."""

    refs: object                      # (K, *fshape) complex64
    mom1: object                      # (2, K, *fshape) complex64
    mom2: object                      # (K, *fshape) float32
    class_frac: np.ndarray            # (K,)
    sigma2: np.ndarray                # (n_shells,)
    fsc: np.ndarray                   # (K, n_shells) last regularised FSC estimate
    n_updates: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    iteration: int = 0

    @property
    def n_classes(self) -> int:
        return int(self.refs.shape[0])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain NumPy arrays (for ``np.savez``)."""
        return {f.name: np.asarray(to_numpy(getattr(self, f.name))) for f in fields(self)}

    @classmethod
    def from_arrays(cls, d, xp: ModuleType = np) -> OptimiserState:
        return cls(refs=xp.asarray(d["refs"]), mom1=xp.asarray(d["mom1"]),
                   mom2=xp.asarray(d["mom2"]), class_frac=np.asarray(d["class_frac"]),
                   sigma2=np.asarray(d["sigma2"]), fsc=np.asarray(d["fsc"]),
                   n_updates=np.asarray(d["n_updates"]), iteration=int(d["iteration"]))


def new_state(refs, sigma2, xp: ModuleType | None = None) -> OptimiserState:
    """Fresh optimiser state for initial references ``(K, *fshape)`` and noise ``sigma2``."""
    xp = xp or xp_of(refs)
    K = refs.shape[0]
    n_shells = len(sigma2)
    return OptimiserState(
        refs=xp.asarray(refs, dtype=np.complex64),
        mom1=xp.zeros((2,) + tuple(refs.shape), dtype=np.complex64),
        mom2=xp.zeros(tuple(refs.shape), dtype=np.float32),
        class_frac=np.full(K, 1.0 / K), sigma2=np.asarray(sigma2, dtype=np.float64).copy(),
        fsc=np.ones((K, n_shells)), n_updates=np.zeros(K, dtype=np.int64), iteration=0)


def shell_mean(values, shell_index, n_shells: int):
    """Mean of ``values`` (K, *fshape) per shell -> (K, n_shells)."""
    xp = xp_of(values)
    K = values.shape[0]
    idx = shell_index.ravel()
    cnt = xp.bincount(idx, minlength=n_shells)[:n_shells].astype(np.float64)
    out = xp.stack([xp.bincount(idx, weights=values[k].ravel().astype(np.float64),
                                minlength=n_shells)[:n_shells] for k in range(K)])
    return out / xp.maximum(cnt, 1.0)[None]


def fsc_per_class(a, b, shell_index, n_shells: int):
    """FSC per class and shell between two sets of Fourier arrays (K, *fshape)."""
    xp = xp_of(a)
    num = shell_mean((a * xp.conj(b)).real, shell_index, n_shells)
    da = shell_mean(xp.abs(a) ** 2, shell_index, n_shells)
    db = shell_mean(xp.abs(b) ** 2, shell_index, n_shells)
    return num / xp.sqrt(xp.maximum(da * db, 1e-30))


def regularised_fsc(fsc_half, tau_fudge: float):
    """Half-set FSC -> the weight used in the update: f = 2T SNR/(1 + 2T SNR)."""
    f = np.clip(np.asarray(fsc_half, dtype=np.float64), 0.0, 0.999)
    snr = 2.0 * tau_fudge * f / (1.0 - f)
    return snr / (1.0 + snr)


class VdamOptimiser:
    """VDAM and EM updates over Fourier-space references of any dimensionality.

    Parameters
    ----------
    shell_index
        Integer shell of each Fourier element (``fourier_shape``).
    n_shells
        Number of shells kept (``box // 2 + 1``).
    constrain
        Optional ``refs -> refs`` applied after every update (e.g. a real-space mask).
    """

    def __init__(self, shell_index, n_shells: int, beta1: float = 0.9, beta2: float = 0.999,
                 eps2: float = 1.0, sigma2_memory: float = 0.3, class_memory: float = 0.2,
                 constrain: Callable | None = None, replacement: str = "copy",
                 replacement_cooldown: int = 10) -> None:
        if replacement not in ("copy", "split"):
            raise ValueError(f"replacement must be 'copy' or 'split', got {replacement!r}")
        self.shell_index = shell_index
        self.n_shells = int(n_shells)
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps2 = eps2
        self.sigma2_memory = sigma2_memory
        self.class_memory = class_memory
        self.constrain = constrain
        self.replacement = replacement
        self.replacement_cooldown = int(replacement_cooldown)
        # mini-batch index of each class's last replacement (split mode; the 2D driver saves
        # it with its checkpoints)
        self.last_replaced: dict[int, int] = {}
        # misfit split: how far the children's moments are set along the fit-group difference
        self.split_gain = 1.0

    # -- helpers -----------------------------------------------------------------------------
    def _expand_weight(self, weight):
        """Per-shell weights (…, n_shells) -> per element (…, *fshape); full arrays pass through."""
        fshape = tuple(self.shell_index.shape)
        if tuple(weight.shape[-len(fshape):]) == fshape:
            return weight
        return weight[..., self.shell_index]

    def update_noise(self, state: OptimiserState, acc: Accumulators, memory: float | None = None):
        """Running average of sigma2 per shell from the batch residuals (shells with data only)."""
        s = np.asarray(to_numpy(acc.sigma2_sum), dtype=np.float64)
        c = np.asarray(to_numpy(acc.sigma2_count), dtype=np.float64)
        lam = self.sigma2_memory if memory is None else memory
        have = c > 0
        est = np.where(have, s / np.maximum(c, 1e-30), state.sigma2)
        state.sigma2 = np.where(have, (1.0 - lam) * state.sigma2 + lam * est, state.sigma2)

    def update_class_fractions(self, state: OptimiserState, acc: Accumulators,
                               memory: float | None = None) -> np.ndarray:
        cw = np.asarray(to_numpy(acc.class_weight), dtype=np.float64).sum(0)
        batch = cw / max(cw.sum(), 1e-30)
        lam = self.class_memory if memory is None else memory
        state.class_frac = (1.0 - lam) * state.class_frac + lam * batch
        state.class_frac /= state.class_frac.sum()
        return batch

    # -- VDAM ---------------------------------------------------------------------------------
    def vdam_step(self, state: OptimiserState, acc: Accumulators, step: float, tau_fudge: float,
                  inactivity_threshold: float | None = None,
                  split_score=None, split_groups: Callable | None = None
                  ) -> list[tuple[int, int]]:
        """One VDAM update from one mini-batch. Returns the (replaced, source) class pairs.

        ``inactivity_threshold`` (rho) switches on inactive-class replacement (middle phase):
        the class with the smallest fraction a, if p_a < rho/K, takes the reference and moments
        of the class b with the largest normalised update, plus b's update; b keeps its old
        reference (``copy``). In ``split`` mode see :meth:`_split_replace`; ``split_score``
        (K,) then chooses the source class (largest score) instead of the class size, and
        ``split_groups`` (``b -> Accumulators`` or None) makes the split follow b's
        heterogeneity (``misfit`` split, see :meth:`_split_replace`).
        """
        xp = xp_of(state.refs)
        K = state.n_classes
        self.update_noise(state, acc)
        self.update_class_fractions(state, acc)
        v = state.refs
        Fh = self._expand_weight(xp.asarray(acc.weight))
        Bh = xp.asarray(acc.data)
        eps1 = 1e-3 * float(xp.mean(Fh[Fh > 0])) if bool((Fh > 0).any()) else 1e-30
        G = xp.where(Fh > 0, Bh, 0.0)
        Gh = G / (Fh + eps1)
        has = to_numpy(xp.asarray(acc.class_weight).sum(0)) > 0
        first = state.n_updates == 0
        # first moments (no bias on the first update: start from the first gradient)
        b1 = xp.asarray(np.where(first, 0.0, self.beta1).astype(np.float32))
        b1 = b1.reshape((1, K) + (1,) * (v.ndim - 1))
        # first moment of the half-set targets v + G^ (see the module docstring)
        state.mom1 = (b1 * state.mom1 + (1 - b1) * (v[None] + Gh)).astype(np.complex64)
        n = Gh[1] - Gh[0]
        s = 0.5 * (Gh[1] + Gh[0])
        ratio = (xp.abs(n) ** 2 / (xp.abs(s) ** 2 + 1e-30)).astype(np.float32)
        b2 = xp.asarray(np.where(first, 0.0, self.beta2).astype(np.float32))
        b2 = b2.reshape((K,) + (1,) * (v.ndim - 1))
        live = xp.asarray(has.reshape((K,) + (1,) * (v.ndim - 1)))
        mom2 = b2 * state.mom2 + (1 - b2) * ratio
        state.mom2 = xp.where(live, mom2, state.mom2).astype(np.float32)
        denom = xp.sqrt(state.mom2 + self.eps2)
        D1 = (state.mom1[0] - v) / denom
        D2 = (state.mom1[1] - v) / denom
        # the half references are the half-set moments (EMAs of each half's reconstructions)
        fsc_half = to_numpy(fsc_per_class(state.mom1[0], state.mom1[1], self.shell_index,
                                          self.n_shells))
        fsc_half = np.where(first[:, None], 1.0, fsc_half)
        f = regularised_fsc(fsc_half, tau_fudge)
        state.fsc = f
        fx = xp.asarray(f.astype(np.float32))[:, self.shell_index]
        eta = step * (1.0 - np.exp(-(3 * K + 10) * state.class_frac))
        eta = np.where(has | ~first, eta, 0.0)
        delta = fx * 0.5 * (D1 + D2) - (1.0 - fx) * v
        delta = delta * xp.asarray(eta.astype(np.float32)).reshape((K,) + (1,) * (v.ndim - 1))
        replaced: list[tuple[int, int]] = []
        new = v + delta
        if inactivity_threshold is not None and inactivity_threshold > 0 and K > 1:
            if self.replacement == "split":
                pair = self._split_replace(state, v, new, delta, fx, D1, D2, eta,
                                           inactivity_threshold, split_score,
                                           split_groups=split_groups, eps1=eps1)
                if pair is not None:
                    replaced.append(pair)
            else:
                a = int(np.argmin(state.class_frac))
                mag = to_numpy(xp.sum(xp.abs(0.5 * (D1 + D2)) ** 2,
                                      axis=tuple(range(1, v.ndim)))).astype(np.float64)
                mag[a] = -1.0
                b = int(np.argmax(mag))
                if state.class_frac[a] < inactivity_threshold / K:
                    new[a] = v[b] + delta[b]
                    new[b] = v[b]
                    state.mom1[:, a] = state.mom1[:, b] + delta[b][None]
                    state.mom2[a] = state.mom2[b]
                    half = 0.5 * state.class_frac[b]
                    state.class_frac[a] = state.class_frac[b] = half
                    state.n_updates[a] = state.n_updates[b]
                    state.fsc[a] = state.fsc[b]
                    replaced.append((a, b))
        if self.constrain is not None:
            new = self.constrain(new)
        state.refs = new.astype(np.complex64)
        state.n_updates = state.n_updates + has.astype(np.int64)
        state.iteration += 1
        return replaced

    def _split_replace(self, state: OptimiserState, v, new, delta, fx, D1, D2, eta,
                       rho: float, score=None, split_groups: Callable | None = None,
                       eps1: float = 1e-30) -> tuple[int, int] | None:
        """Split mode: the emptiest class a takes over one half of class b.

        With the RELION-4 copy (a <- v_b + delta_b, b keeps v_b) the copy is b's *updated*
        reference, so it wins every one of b's particles; b empties and is replaced next, and
        the class that was emptied last stays empty. Here both are re-seeded symmetrically
        from b's two half-set moments: a <- v_b + eta_b (f D_1 - (1 - f) v_b) with both of
        a's moments set to b's half-1 moment, b <- v_b + eta_b (f D_2 - (1 - f) v_b) with both
        moments set to b's half-2 moment. Neither is favoured, so b's particles divide
        between the two (they differ by b's half-set disagreement, and drift apart where b
        holds more than one kind of particle) and the class fractions are halved. Source b
        is, among the classes not replaced or split in the last ``replacement_cooldown``
        mini-batches, the one with the largest ``score`` (the 2D driver passes how badly each
        class fits its particles, :func:`compute.vdam.classify2d.class_misfit`), or the
        largest class when ``score`` is None; a is only replaced if it has not been re-seeded
        that recently.

        With ``split_groups`` (the 2D driver's ``split_mode = "misfit"``) the two children
        differ along b's heterogeneity instead of its half-set noise: ``split_groups(b)``
        returns accumulators of b's particles in this mini-batch with the half-set slot
        standing for the fit group (slot 0: the particles that fit b worse than its median,
        slot 1: the others). With t_w, t_g the two groups' Newton targets v_b + G^ and t their
        pooled one, a's moments are set to m + f (t_w - t) and b's to m + f (t_g - t), where m
        is the mean of b's two half-set moments and f its regularised FSC weight per shell
        (which keeps the low-resolution difference and damps the few particles' noise); the
        references then take the usual step towards them. So a starts on the side of the
        particles b explains worst (for a class that holds two molecules, the minority one).
        Without groups (too few particles) it falls back to the half-set split.
        """
        K = state.n_classes
        it = state.iteration
        recent = {k for k, t in self.last_replaced.items()
                  if it - t < self.replacement_cooldown}
        cand_a = [k for k in range(K) if k not in recent]
        if not cand_a:
            return None
        a = min(cand_a, key=lambda k: state.class_frac[k])
        if state.class_frac[a] >= rho / K:
            return None
        cand_b = [k for k in range(K) if k != a and k not in recent]
        if not cand_b:
            return None
        if score is None:
            b = max(cand_b, key=lambda k: state.class_frac[k])
        else:
            b = max(cand_b, key=lambda k: (float(score[k]), state.class_frac[k]))
        if state.class_frac[b] <= 2.0 * state.class_frac[a]:
            return None
        e = float(eta[b])
        groups = split_groups(b) if split_groups is not None else None
        if groups is not None:
            xp = xp_of(state.refs)
            Fg = self._expand_weight(xp.asarray(groups.weight)[:, b])      # (2, *fshape)
            Gg = xp.where(Fg > 0, xp.asarray(groups.data)[:, b], 0.0)
            tw = Gg[0] / (Fg[0] + eps1)
            tg = Gg[1] / (Fg[1] + eps1)
            tp = (Gg[0] + Gg[1]) / (Fg[0] + Fg[1] + eps1)
            mean = 0.5 * (state.mom1[0, b] + state.mom1[1, b])
            gain = self.split_gain * fx[b]
            both = (Fg[0] > 0) & (Fg[1] > 0)
            m1 = (mean + gain * xp.where(both, tw - tp, 0.0)).astype(np.complex64)
            m2 = (mean + gain * xp.where(both, tg - tp, 0.0)).astype(np.complex64)
            denom = xp.sqrt(state.mom2[b] + self.eps2)
            Da, Db = (m1 - v[b]) / denom, (m2 - v[b]) / denom
        else:
            m1, m2 = state.mom1[0, b].copy(), state.mom1[1, b].copy()
            Da, Db = D1[b], D2[b]
        new[a] = v[b] + e * (fx[b] * Da - (1.0 - fx[b]) * v[b])
        new[b] = v[b] + e * (fx[b] * Db - (1.0 - fx[b]) * v[b])
        state.mom1[0, a] = m1
        state.mom1[1, a] = m1
        state.mom1[0, b] = m2
        state.mom1[1, b] = m2
        state.mom2[a] = state.mom2[b]
        half = 0.5 * state.class_frac[b]
        state.class_frac[a] = state.class_frac[b] = half
        state.n_updates[a] = state.n_updates[b]
        state.fsc[a] = state.fsc[b]
        self.last_replaced[a] = self.last_replaced[b] = it
        return a, b

    # -- EM -----------------------------------------------------------------------------------
    def em_step(self, state: OptimiserState, acc: Accumulators, tau_fudge: float) -> None:
        """Closed-form EM update from the accumulators of a full pass over the data."""
        xp = xp_of(state.refs)
        K = state.n_classes
        G = xp.asarray(acc.data).sum(0)
        F = self._expand_weight(xp.asarray(acc.weight)).sum(0)
        tau2 = shell_mean(xp.abs(state.refs) ** 2, self.shell_index, self.n_shells)  # (K, S)
        tau2 = xp.maximum(tau2, 1e-30)[:, self.shell_index] * tau_fudge
        v = state.refs
        new = xp.where(F > 0, v + (G - v / tau2) / (F + 1.0 / tau2), 0.0)
        cw = to_numpy(xp.asarray(acc.class_weight).sum(0))
        has = cw > 0
        keep = xp.asarray(has.reshape((K,) + (1,) * (new.ndim - 1)))
        new = xp.where(keep, new, state.refs)
        s = np.asarray(to_numpy(acc.sigma2_sum), dtype=np.float64)
        c = np.asarray(to_numpy(acc.sigma2_count), dtype=np.float64)
        state.sigma2 = np.where(c > 0, s / np.maximum(c, 1e-30), state.sigma2)
        state.class_frac = np.maximum(cw / max(cw.sum(), 1e-30), 1e-12)
        state.class_frac /= state.class_frac.sum()
        # data-vs-prior as the resolution measure: SSNR = tau2 * F (per shell)
        Fs = shell_mean(F, self.shell_index, self.n_shells)
        t2 = shell_mean(xp.abs(new) ** 2, self.shell_index, self.n_shells) * tau_fudge
        ssnr = to_numpy(t2 * Fs)
        state.fsc = ssnr / (1.0 + ssnr)
        if self.constrain is not None:
            new = self.constrain(new)
        state.refs = new.astype(np.complex64)
        state.n_updates = state.n_updates + has.astype(np.int64)
        state.iteration += 1
