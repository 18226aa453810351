"""The 3D E-step: likelihoods over orientations x translations x classes, with adaptive
(coarse-to-fine) orientation sampling, and back-projection of the significant hypotheses.

Model and units are those of the 2D E-step (:mod:`compute.vdam.estep2d`): particle images are
masked, Fourier transformed without normalisation with the box centre as phase origin, compared
on a half-plane sample set up to the current resolution radius with per-shell noise sigma2 and
each particle's CTF. A projection is a central slice ``F3(A^T (kx, ky, 0))`` of the reference
(RELION matrices, :mod:`compute.geometry`), read by trilinear interpolation from a 2x padded,
gridding-corrected transform; back-projection is the exact adjoint (trilinear splatting).

Orientations are searched adaptively rather than exhaustively: every hypothesis of a coarse
HEALPix grid is scored with one matrix product (all particles share the projections), then each
particle's best few are refined locally with finer perturbations, twice, halving the step each
time. Cost per particle is then ~ (coarse grid + 2 x 27 x top) projections instead of the whole
fine grid (36,864 orientations at 7.5 deg).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compute import backend as be
from compute.backend import xp_of
from compute.errors import ComputeError
from compute.fourier import radial_index, soft_mask
from compute.orientations import grid_matrices, healpix_step_deg, local_perturbations
from compute.vdam.estep2d import CtfBatch, _significant, ctf_on_samples

SIGNIFICANT_MASS = 0.999
MAX_SIGNIFICANT_3D = 2000


def sinc2_3d(n: int, pad: int):
    x = (np.arange(n) - n // 2) / float(pad * n)
    s = np.sinc(x) ** 2
    return (s[:, None, None] * s[None, :, None] * s[None, None, :]).astype(np.float32)


def offsets_grid(range_px: float, step_px: float) -> np.ndarray:
    """(T, 2) (x, y) translations within a circle of ``range_px`` on a ``step_px`` grid."""
    step = max(float(step_px), 1e-3)
    m = int(np.floor(range_px / step + 1e-6))
    g = np.arange(-m, m + 1) * step
    yy, xx = np.meshgrid(g, g, indexing="ij")
    keep = xx**2 + yy**2 <= range_px**2 + 1e-6
    return np.stack([xx[keep], yy[keep]], axis=1)


@dataclass
class Hypotheses:
    """Significant hypotheses of a batch: flat arrays over (particle, kept hypothesis)."""

    particle: np.ndarray   # (H,) row in the batch
    klass: np.ndarray      # (H,) class index
    rot: np.ndarray        # (H, 3, 3) RELION matrices
    offset: np.ndarray     # (H, 2) origin (x, y) px
    weight: np.ndarray     # (H,) posterior
    #: (H,) id of the (particle, class, orientation) of each hypothesis: hypotheses that only
    #: differ in translation share it and are back-projected as one slice
    group: np.ndarray | None = None


@dataclass
class BestPose:
    klass: np.ndarray
    rot: np.ndarray        # (B, 3, 3)
    origin_px: np.ndarray  # (B, 2)
    max_prob: np.ndarray
    n_significant: np.ndarray
    log_likelihood: np.ndarray


class Estep3D:
    """Scoring and back-projection on one box; see the module docstring."""

    def __init__(self, box: int, pixel_size_a: float, particle_diameter_a: float,
                 do_ctf: bool = True, pad: int = 2, xp=np) -> None:
        if box % 2:
            raise ComputeError(f"3D needs an even box size, got {box}")
        self.box, self.pixel_size_a, self.pad, self.xp = int(box), float(pixel_size_a), pad, xp
        self.do_ctf = do_ctf
        n = self.box
        self.n_shells = n // 2 + 1
        self.shell_index = xp.minimum(radial_index((n, n, n), rfft=True, xp=xp), n // 2)
        r = 0.5 * particle_diameter_a / self.pixel_size_a
        self.mask_radius_px = float(min(r, n / 2 - 1))
        self.mask2d = soft_mask((n, n), self.mask_radius_px, edge_px=max(2.0, 0.05 * n), xp=xp)
        self.mask3d = soft_mask((n, n, n), self.mask_radius_px, edge_px=max(2.0, 0.05 * n), xp=xp)
        self.gridding = xp.asarray(sinc2_3d(n, pad))
        self.r_max: float | None = None
        #: resolution (shells) used at an angular step: radius = res_factor / step_deg (360: a
        #: 30 deg coarse grid is scored to 12 shells; 180 misranked ~15 % of 64 px particles)
        self.res_factor = 360.0

    # -- Fourier conventions shared with the optimiser -------------------------------------------
    def to_fourier(self, vol):
        return be.rfftn(be.ifftshift(vol, axes=(-3, -2, -1)), axes=(-3, -2, -1))

    def to_real(self, F):
        n = self.box
        return be.fftshift(be.irfftn(F, s=(n, n, n), axes=(-3, -2, -1)),
                           axes=(-3, -2, -1)).astype(np.float32)

    # -- sample set --------------------------------------------------------------------------------
    def set_resolution(self, r_max_shell: float) -> None:
        n = self.box
        r = float(min(max(r_max_shell, 3.0), n // 2 - 1))
        if self.r_max == r:
            return
        self.r_max = r
        fy = np.fft.fftfreq(n) * n
        fx = np.fft.rfftfreq(n) * n
        FY, FX = np.meshgrid(fy, fx, indexing="ij")
        rad = np.sqrt(FX**2 + FY**2)
        half = (FX > 0) | ((FX == 0) & (FY > 0))  # a true half plane: every sample counts twice
        sel = (rad <= r + 1e-6) & half
        iy, ix = np.nonzero(sel)
        self._flat = iy * (n // 2 + 1) + ix
        self._fx = FX[sel]
        self._fy = FY[sel]
        self._shell = np.rint(rad[sel]).astype(np.int64)
        self.n_f = len(self._fx)
        self._kx = self._fx / (n * self.pixel_size_a)
        self._ky = self._fy / (n * self.pixel_size_a)
        self._cnt_shell = np.bincount(self._shell, minlength=self.n_shells) * 2.0

    def translation_ramps(self, offsets_px):
        """exp(-2 pi i f.o / n) for (T, 2) origins: shifting a particle by +origin centres it."""
        o = np.asarray(offsets_px, dtype=np.float64).reshape(-1, 2)
        ph = -2.0 * np.pi * (np.outer(o[:, 0], self._fx) + np.outer(o[:, 1], self._fy)) / self.box
        return self.xp.asarray(np.exp(1j * ph).astype(np.complex64))

    # -- particles ---------------------------------------------------------------------------------
    def prepare_images(self, images):
        """Masked particle transforms on the sample set, (B, F) complex64."""
        xp = self.xp
        imgs = xp.asarray(images, dtype=np.float32)
        if not bool(xp.all(xp.isfinite(imgs))):
            raise ComputeError("images contain NaN or infinite values")
        F = be.rfft2(be.ifftshift(imgs * self.mask2d, axes=(-2, -1)))
        return F.reshape(F.shape[0], -1)[:, xp.asarray(self._flat)].astype(np.complex64)

    def ctf_values(self, ctf: CtfBatch):
        """Each particle's CTF on the sample set, (B, F) float32 (ones without CTF)."""
        if not self.do_ctf:
            return self.xp.ones((len(ctf), self.n_f), dtype=np.float32)
        return self.xp.asarray(ctf_on_samples(ctf, self._kx, self._ky))

    # -- projection / back-projection ------------------------------------------------------------
    def store(self, vol):
        """Padded, gridding-corrected half transform of a real volume, flattened with a guard."""
        xp = self.xp
        n, p = self.box, self.pad
        m = n * p
        big = xp.zeros((m, m, m), dtype=np.float32)
        o = m // 2 - n // 2
        big[o:o + n, o:o + n, o:o + n] = vol / self.gridding
        F = be.rfftn(be.ifftshift(big))
        F = be.fftshift(F, axes=(0, 1)).astype(np.complex64)
        st = xp.zeros((m + 1, m + 1, m // 2 + 2), dtype=np.complex64)
        st[:m, :m, : m // 2 + 1] = F
        return st.ravel()

    def _coords(self, R, sub=None):
        xp = self.xp
        R = xp.asarray(R, dtype=np.float32)
        p = np.float32(self.pad)
        c = self.box * self.pad // 2
        fx, fy = (self._fx, self._fy) if sub is None else (self._fx[sub], self._fy[sub])
        kx = xp.asarray(fx, dtype=np.float32)
        ky = xp.asarray(fy, dtype=np.float32)
        X = (R[..., 0, 0, None] * kx + R[..., 1, 0, None] * ky) * p
        Y = (R[..., 0, 1, None] * kx + R[..., 1, 1, None] * ky) * p
        Z = (R[..., 0, 2, None] * kx + R[..., 1, 2, None] * ky) * p
        neg = X < 0
        X = xp.where(neg, -X, X)
        Y = xp.where(neg, -Y, Y) + c
        Z = xp.where(neg, -Z, Z) + c
        x0, y0, z0 = xp.floor(X), xp.floor(Y), xp.floor(Z)
        m = self.box * self.pad
        sy, sx = (m + 1) * (m // 2 + 2), m // 2 + 2
        base = z0.astype(np.int64) * sy + y0.astype(np.int64) * sx + x0.astype(np.int64)
        return base, X - x0, Y - y0, Z - z0, neg, sy, sx

    def project(self, store, R, sub=None):
        """Slices ``(..., F)`` complex64 of one stored volume at matrices ``R (..., 3, 3)``
        (only the samples ``sub`` when given)."""
        xp = self.xp
        base, fx, fy, fz, neg, sy, sx = self._coords(R, sub)
        acc = None
        for dz, wz in ((0, 1 - fz), (sy, fz)):
            for dy, wy in ((0, 1 - fy), (sx, fy)):
                wzy = wz * wy
                t = store[base + (dz + dy)] * (wzy * (1 - fx)) + store[base + (dz + dy + 1)] * (wzy * fx)
                acc = t if acc is None else acc + t
        return xp.where(neg, xp.conj(acc), acc).astype(np.complex64)

    def new_grid(self):
        m = self.box * self.pad
        size = (m + 1) * (m + 1) * (m // 2 + 2)
        return self.xp.zeros(size, dtype=np.complex128), self.xp.zeros(size, dtype=np.float64)

    def backproject(self, data, weight, values, weights, R) -> None:
        """Adjoint of :meth:`project`: splat ``values (n, F)`` and ``weights (n, F)`` at ``R``."""
        xp = self.xp
        base, fx, fy, fz, neg, sy, sx = self._coords(R)
        vals = xp.where(neg, xp.conj(values), values)
        size = data.shape[0]
        base, fx, fy, fz = base.ravel(), fx.ravel(), fy.ravel(), fz.ravel()
        vr = vals.real.ravel().astype(np.float64)
        vi = vals.imag.ravel().astype(np.float64)
        wv = xp.broadcast_to(weights, vals.shape).ravel().astype(np.float64)
        for dz, wz in ((0, 1 - fz), (sy, fz)):
            for dy, wy in ((0, 1 - fy), (sx, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    w = (wz * wy * wx).astype(np.float64)
                    idx = base + (dz + dy + dx)
                    data += xp.bincount(idx, weights=vr * w, minlength=size) \
                        + 1j * xp.bincount(idx, weights=vi * w, minlength=size)
                    weight += xp.bincount(idx, weights=wv * w, minlength=size)

    def grid_to_volume(self, data, weight, regulariser=0.0, min_weight: float = 1e-6):
        """``data / (weight + regulariser)`` on the padded grid -> real volume (n, n, n).

        ``regulariser`` is a scalar or a per-shell array (radius in pixels of the box).
        """
        xp = self.xp
        n, p = self.box, self.pad
        m = n * p
        shape = (m + 1, m + 1, m // 2 + 2)
        d = data.reshape(shape)[:m, :m, : m // 2 + 1]
        w = weight.reshape(shape)[:m, :m, : m // 2 + 1]
        reg = xp.asarray(regulariser, dtype=np.float64)
        if reg.ndim == 1:
            kz = xp.arange(m) - m // 2
            kx = xp.arange(m // 2 + 1)
            KZ, KY, KX = xp.meshgrid(kz, kz, kx, indexing="ij")
            ri = xp.clip(xp.rint(xp.sqrt(KZ * KZ + KY * KY + KX * KX) / p).astype(np.int64),
                         0, reg.shape[0] - 1)
            reg = reg[ri]
        den = w + reg
        F = xp.where(den > min_weight, d / xp.maximum(den, min_weight), 0).astype(np.complex64)
        vol = be.fftshift(be.irfftn(be.ifftshift(F, axes=(0, 1)), s=(m, m, m)))
        o = m // 2 - n // 2
        # the slices are DFT values of the n-box, which equal the zero-padded m-box DFT at
        # the scaled frequencies, so the inverse m-box transform needs no extra scale
        vol = vol[o:o + n, o:o + n, o:o + n] / self.gridding
        return vol.astype(np.float32)

    # -- scoring -----------------------------------------------------------------------------------
    @staticmethod
    def _loglik(Yw, Q, P):
        """Cross-minus-quadratic term for shared projections.

        Yw (B, T, F) = mult * CTF * X_shifted / sigma2;  Q (B, F) = 0.5 * mult * CTF^2 / sigma2;
        P (C, F) projections.  Returns (B, T, C).
        """
        xp = xp_of(Yw)
        B, T, F = Yw.shape
        A = xp.concatenate([Yw.real, Yw.imag], axis=-1).reshape(B * T, 2 * F)
        W = xp.concatenate([P.real, P.imag], axis=-1)
        L = (A @ W.T).reshape(B, T, -1)
        L -= (Q @ (P.real**2 + P.imag**2).T)[:, None, :]
        return L

    @staticmethod
    def _loglik_own(Yw, Q, P):
        """As :meth:`_loglik` with per-particle projections P (B, C, F) -> (B, T, C)."""
        xp = xp_of(Yw)
        L = xp.einsum("btf,bcf->btc", Yw.real, P.real) + xp.einsum("btf,bcf->btc", Yw.imag, P.imag)
        L -= xp.einsum("bf,bcf->bc", Q, P.real**2 + P.imag**2)[:, None, :]
        return L

    def search(self, stores, X, ctfv, sigma2, log_prior, offsets_px, prior_origin_px=None,
               coarse_order: int = 1, top: int = 3, local_rots=None,
               local_step_deg: float | None = None, final_step_deg: float | None = None,
               min_levels: int = 2, fine_offsets: bool = True):
        """Score a batch and return its significant hypotheses and best poses.

        Global search (``local_rots`` None): every class is projected on the HEALPix grid of
        ``coarse_order`` and scored at a resolution matched to that step; each particle's
        ``top`` best are then refined locally, halving the step per level, with the
        resolution used growing with the sampling (radius ~ 90 / step_deg shells, at most
        the current limit), until the step is at most ``final_step_deg`` (default: what the
        current resolution limit needs). Local search: the same refinement levels around the
        given orientations (B, 3, 3), starting at ``local_step_deg``.
        With ``fine_offsets`` the last level re-centres each particle on its best translation
        so far and searches half-steps around it (translations finer than the offset step).
        """
        xp = self.xp
        K = len(stores)
        B = X.shape[0]
        r_max = float(self.r_max)
        shell = self._shell
        s2 = xp.asarray(np.asarray(sigma2, dtype=np.float32)[shell])
        inv = 2.0 / xp.maximum(s2, 1e-30)                      # Friedel multiplicity 2
        prior = np.zeros((B, 2)) if prior_origin_px is None else np.asarray(prior_origin_px)
        ramps = self.translation_ramps(offsets_px)             # (T, F)
        Xc = X * self.translation_ramps(prior)
        Y = (ctfv * Xc)[:, None, :] * ramps[None]              # (B, T, F)
        Yw = Y * inv
        Q = 0.5 * ctfv * ctfv * inv
        lp = np.asarray(log_prior, dtype=np.float64)
        if final_step_deg is None:
            final_step_deg = 90.0 / max(r_max, 1.0)

        def subset(step):
            r = min(r_max, max(3.0, self.res_factor / step))
            return np.nonzero(shell <= r)[0]

        if local_rots is None:
            G = grid_matrices(coarse_order)
            step = healpix_step_deg(coarse_order)
            sub = subset(step)
            sx = xp.asarray(sub)
            P = xp.concatenate([self.project(st, G, sub) for st in stores])     # (K*O, f)
            L = self._loglik(Yw[:, :, sx], Q[:, sx], P)
            L += xp.asarray(np.repeat(lp, len(G)), dtype=np.float32)
            Lm = L.max(axis=1)
            k_top = min(top, Lm.shape[1])
            cand = be.to_numpy(xp.argsort(-Lm, axis=1)[:, :k_top])
            cand_k = cand // len(G)
            cand_R = G[cand % len(G)]                                       # (B, top, 3, 3)
        else:
            cand_R = np.asarray(local_rots).reshape(B, 1, 3, 3).repeat(K, axis=1)
            cand_k = np.tile(np.arange(K), (B, 1))
            step = 2.0 * float(local_step_deg)
        n_levels = 0
        offs = np.asarray(offsets_px, dtype=np.float64).reshape(-1, 2)
        ux = np.unique(np.round(offs[:, 0], 6))
        base_step = float(np.min(np.diff(ux))) if len(ux) > 1 else 0.0
        while True:
            step = step / 2.0
            n_levels += 1
            last = n_levels >= min_levels and step <= final_step_deg * 1.0001
            if last and fine_offsets and base_step > 0:
                # re-centre on the best translation so far, then search half-steps around it
                bt_prev = be.to_numpy(xp.argmax(L.max(axis=2), axis=1))
                prior = prior + offs[bt_prev]
                offs = offsets_grid(base_step, base_step / 2.0)
                Xc = X * self.translation_ramps(prior)
                Y = (ctfv * Xc)[:, None, :] * self.translation_ramps(offs)[None]
                Yw = Y * inv
            pert = local_perturbations(step, 1)                               # (7, 3, 3)
            Rn = np.einsum("bcij,pjk->bcpik", cand_R, pert).reshape(B, -1, 3, 3)
            kn = np.repeat(cand_k, len(pert), axis=1)                         # (B, C)
            sub = np.arange(self.n_f) if last else subset(step)
            sx = xp.asarray(sub)
            Pn = xp.zeros((B, Rn.shape[1], len(sub)), dtype=np.complex64)
            for k in range(K):
                sel = kn == k
                if sel.any():
                    bi, ci = np.nonzero(sel)
                    Pn[bi, ci] = self.project(stores[k], Rn[bi, ci], sub)
            L = self._loglik_own(Yw[:, :, sx], Q[:, sx], Pn)
            L += xp.asarray(lp[kn], dtype=np.float32)[:, None, :]
            if last:
                break
            Lm = be.to_numpy(L.max(axis=1))
            k_top = min(top, Lm.shape[1])
            best = np.argsort(-Lm, axis=1)[:, :k_top]
            cand_R = np.take_along_axis(Rn, best[:, :, None, None], axis=1)
            cand_k = np.take_along_axis(kn, best, axis=1)
        # posteriors over the final (T, C) candidates
        B, T, C = L.shape
        L2 = L.reshape(B, T * C)
        best = xp.argmax(L2, axis=1)
        Lmax = L2[xp.arange(B), best]
        Pp = xp.exp(L2 - Lmax[:, None])
        Z = Pp.sum(axis=1)
        rows, cols, vals, nsig = _significant(Pp, Z, SIGNIFICANT_MASS, MAX_SIGNIFICANT_3D)
        t_idx, c_idx = cols // C, cols % C
        hyp = Hypotheses(particle=rows, klass=kn[rows, c_idx], rot=Rn[rows, c_idx],
                         offset=prior[rows] + offs[t_idx], weight=vals,
                         group=np.asarray(rows, dtype=np.int64) * C + c_idx)
        bt, bc = be.to_numpy(best) // C, be.to_numpy(best) % C
        ar = np.arange(B)
        x2 = be.to_numpy(0.5 * (Xc.real**2 + Xc.imag**2) @ inv)
        bp = BestPose(klass=kn[ar, bc], rot=Rn[ar, bc], origin_px=prior + offs[bt],
                      max_prob=be.to_numpy(1.0 / Z), n_significant=nsig,
                      log_likelihood=be.to_numpy(Lmax + xp.log(Z)) - x2)
        self.last_step_deg = step
        return hyp, bp

    def accumulate(self, grids, hyp: Hypotheses, X, ctfv, sigma2, halves, residual: bool,
                   stores=None, symmetry=None):
        """Back-project the significant hypotheses of the last :meth:`search`.

        ``grids[h][k] = (data, weight)``; with ``residual`` the model projection is subtracted
        (VDAM gradient numerator), otherwise the plain particles are inserted (reconstruction).
        ``symmetry`` (S, 3, 3) inserts every slice at each symmetry mate too.
        Returns the per-shell residual power sums and counts at the best hypotheses.
        """
        xp = self.xp
        s2 = xp.asarray(np.asarray(sigma2, dtype=np.float32)[self._shell])
        inv = 1.0 / xp.maximum(s2, 1e-30)
        H = len(hyp.particle)
        if H == 0:
            return
        # hypotheses that differ only in translation share a slice: sum their shifted,
        # posterior-weighted images first (one projection/back-projection per orientation)
        keys = np.arange(H) if hyp.group is None else np.asarray(hyp.group)
        order = np.argsort(keys, kind="stable")
        ks = keys[order]
        starts = np.concatenate([[0], np.nonzero(np.diff(ks))[0] + 1])
        first = order[starts]
        wv = hyp.weight[order].astype(np.float32)
        # offsets lie on a coarse lattice: exponentiate each distinct one once
        uo, inv_o = np.unique(np.round(np.asarray(hyp.offset)[order], 4), axis=0,
                              return_inverse=True)
        ramps = self.translation_ramps(uo)[xp.asarray(np.asarray(inv_o).ravel())]
        Xw = X[xp.asarray(hyp.particle[order])] * ramps
        Xw *= xp.asarray(wv)[:, None]
        S = be.to_numpy(Xw) if xp is not np else Xw
        S = xp.asarray(np.add.reduceat(S, starts, axis=0))               # (G, F)
        W = xp.asarray(np.add.reduceat(wv, starts))[:, None]              # (G, 1)
        part, klass, rot = hyp.particle[first], hyp.klass[first], hyp.rot[first]
        c = ctfv[xp.asarray(part)]
        vals = c * S
        if residual:
            model = xp.zeros_like(S)
            for k in np.unique(klass):
                sel = klass == k
                model[xp.asarray(np.nonzero(sel)[0])] = self.project(stores[k], rot[sel])
            vals = vals - c * c * W * model
        vals = vals * inv
        wts = (c * c) * W * inv
        halves = np.asarray(halves)
        mats = [np.eye(3)] if symmetry is None else list(symmetry)
        for h in (1, 2):
            for k in np.unique(klass):
                s = np.nonzero((halves[part] == h) & (klass == k))[0]
                if len(s) == 0:
                    continue
                d, wt = grids[h - 1][k]
                for g in mats:
                    Rg = np.einsum("hij,jk->hik", rot[s], g)
                    self.backproject(d, wt, vals[xp.asarray(s)], wts[xp.asarray(s)], Rg)

    def residual_power(self, stores, X, ctfv, best: BestPose):
        """Per-shell sums and counts of |X - CTF P|^2 at each particle's best pose."""
        xp = self.xp
        B = X.shape[0]
        P = xp.zeros((B, self.n_f), dtype=np.complex64)
        for k in np.unique(best.klass):
            s = np.nonzero(best.klass == k)[0]
            P[xp.asarray(s)] = self.project(stores[k], best.rot[s])
        Xs = X * self.translation_ramps(best.origin_px)
        d = Xs - ctfv * P
        d2 = be.to_numpy((d.real**2 + d.imag**2).sum(0)).astype(np.float64) * 2.0
        sums = np.bincount(self._shell, weights=d2, minlength=self.n_shells)
        return sums, self._cnt_shell * B
