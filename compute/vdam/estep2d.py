"""The 2D E-step: likelihoods over in-plane rotations x translations x classes with CTF.

Model (RELION convention, protein white): a particle image is
``x(r) = (Rot_psi v_k)(r + o) * CTF + noise`` with ``(Rot_psi v)(r) = v(A^T r)``,
``A = [[cos psi, sin psi], [-sin psi, cos psi]]`` (RELION's passive in-plane rotation)
and ``o`` the origin (``rlnOriginX/Y`` in pixels). In Fourier space (unnormalised FFT of
the ``ifftshift``-ed image, so the box centre ``n // 2`` is the phase origin)::

    X(f) = exp(+2 pi i f.o) * CTF(f) * V_k(A^T f) + N(f),   E|N(f)|^2 = sigma2(shell of f)

How it is computed (all batched):

- references are gridding-corrected, zero-padded 2x and Fourier transformed once per call;
  every rotated reference is read from that padded transform by bilinear interpolation at
  the rotated frequencies of a fixed half-plane sample set (the frequencies up to the
  current resolution limit);
- translations are applied to the particles as phase ramps, so the cross term of the
  log-likelihood for all (particle, shift) x (class, psi) pairs is ONE real matrix product
  ``(b*T, 2F) @ (2F, K*R)`` (faster than one inverse FFT per pair at these sizes, see
  docs/class2d.md); the quadratic term is a second, small product;
- posteriors are pruned to the significant hypotheses (99.9 % of the mass, at most
  5,000 per particle); their weighted, CTF- and sigma2-scaled shifted particles are summed
  per (class, psi) by a sparse product and splatted back into the padded reference grid
  (the adjoint of the bilinear read), cropped in real space and gridding-corrected.

The E-step returns :class:`compute.vdam.optimiser.Accumulators` (what any E-step, 2D or 3D,
hands the optimiser) plus per-particle results for the ``_data.star``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from compute import backend as be
from compute.backend import xp_of
from compute.ctf import CtfParams, gamma
from compute.errors import ComputeError
from compute.fourier import radial_index, soft_mask
from compute.vdam.optimiser import Accumulators

#: significant-weight pruning (RELION 4 defaults for 2D)
SIGNIFICANT_MASS = 0.999
MAX_SIGNIFICANT_2D = 5000


@dataclass(frozen=True)
class Sampling2D:
    """In-plane angle and translation grid.

    Attributes
    ----------
    psi_step_deg
        In-plane angular step (RELION ``psi_sampling``).
    offset_range_px, offset_step_px
        Translations searched within a circle of this radius (pixels) in steps of
        ``offset_step_px`` (RELION ``offset_range`` / ``offset_step``).
    """

    psi_step_deg: float = 6.0
    offset_range_px: float = 5.0
    offset_step_px: float = 1.0

    def psi_deg(self) -> np.ndarray:
        n = max(1, int(round(360.0 / self.psi_step_deg)))
        return np.arange(n, dtype=np.float64) * (360.0 / n)

    def offsets_px(self) -> np.ndarray:
        """(T, 2) translations as (x, y) pixels inside the circle of ``offset_range_px``."""
        step = max(float(self.offset_step_px), 1e-3)
        m = int(np.floor(self.offset_range_px / step + 1e-6))
        g = np.arange(-m, m + 1) * step
        yy, xx = np.meshgrid(g, g, indexing="ij")
        keep = xx**2 + yy**2 <= self.offset_range_px**2 + 1e-6
        return np.stack([xx[keep], yy[keep]], axis=1)

    def for_resolution(self, resolution_a: float, particle_diameter_a: float,
                       pixel_size_a: float) -> Sampling2D:
        """The grid the E-step needs at ``resolution_a``: never finer than this one.

        In-plane step: the arc it sweeps at the particle's radius equals the resolution,
        ``dpsi = resolution / radius`` (the rule of RELION's auto-sampling, angular step =
        360 * resolution / (pi * diameter)); offset step: a third of the resolution, so the
        largest error on the grid (half a diagonal, 0.24 of the resolution) stays below a
        quarter period of the highest frequency used. The number of angles is rounded up to
        an even one (psi and psi + 180 deg are evaluated together). At 35 A for a 160 A
        particle at 4 A/px: 25 deg needed, 22.5 deg (16 angles), and 2.9 px offset steps; at
        15 A: 10.7 deg and 1.25 px (the user's grid is then kept).
        """
        radius = 0.5 * float(particle_diameter_a)
        if not (resolution_a > 0 and radius > 0):
            return self
        n_user = len(self.psi_deg())
        need_deg = np.rad2deg(resolution_a / radius)
        n = int(np.ceil(360.0 / need_deg - 1e-6))
        n = min(n_user, max(2, n + n % 2))          # even: psi and psi + 180 pair up
        psi = 360.0 / n if n < n_user else self.psi_step_deg
        off = max(float(self.offset_step_px), resolution_a / (3.0 * pixel_size_a))
        # never coarser than the range itself (keep at least the centre and the 4 neighbours)
        off = min(off, max(float(self.offset_step_px), float(self.offset_range_px)))
        return Sampling2D(psi, self.offset_range_px, off)


@dataclass
class CtfBatch:
    """Per-particle CTF parameters as arrays of length B (RELION units)."""

    defocus_u_a: np.ndarray
    defocus_v_a: np.ndarray
    defocus_angle_deg: np.ndarray
    voltage_kv: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift_deg: np.ndarray
    bfactor_a2: np.ndarray

    def __len__(self) -> int:
        return len(self.defocus_u_a)

    def subset(self, idx) -> CtfBatch:
        return CtfBatch(*(np.asarray(getattr(self, f))[idx] for f in self.__dataclass_fields__))

    @classmethod
    def none(cls, n: int) -> CtfBatch:
        """Placeholder for ``do_ctf_correction = No`` (CTF = 1 everywhere)."""
        z = np.zeros(n)
        return cls(z, z, z, z + 300.0, z + 2.7, z + 0.1, z, z)


def ctf_on_samples(ctf: CtfBatch, kx, ky) -> np.ndarray:
    """Each particle's CTF at the frequencies ``(kx, ky)`` (1/A, shape (F,)), (B, F) float32.

    Particles are grouped by (voltage, Cs, Q) so the aberration terms are evaluated once per
    optics group; used by the 2D and the 3D E-steps.
    """
    out = np.empty((len(ctf), len(kx)), dtype=np.float32)
    keys = np.stack([ctf.voltage_kv, ctf.cs_mm, ctf.amplitude_contrast], 1)
    uniq, inv = np.unique(keys, axis=0, return_inverse=True)
    inv = np.asarray(inv).ravel()
    k2 = kx**2 + ky**2
    for g, (kv, cs, q) in enumerate(uniq):
        sel = inv == g
        p = CtfParams(defocus_u_a=ctf.defocus_u_a[sel, None], defocus_v_a=ctf.defocus_v_a[sel, None],
                      defocus_angle_deg=ctf.defocus_angle_deg[sel, None], voltage_kv=float(kv),
                      cs_mm=float(cs), amplitude_contrast=float(q),
                      phase_shift_deg=ctf.phase_shift_deg[sel, None])
        c = -np.sin(gamma(kx[None], ky[None], p))
        out[sel] = c * np.exp(-ctf.bfactor_a2[sel, None] * k2[None] / 4.0)
    return out


@dataclass
class ParticleResults:
    """Best hypothesis per particle (0-based class; psi in degrees; origin in pixels)."""

    class_index: np.ndarray
    psi_deg: np.ndarray
    origin_x_px: np.ndarray
    origin_y_px: np.ndarray
    max_prob: np.ndarray
    n_significant: np.ndarray
    log_likelihood: np.ndarray


def sinc2_correction(n: int, pad: int, ndim: int = 2) -> np.ndarray:
    """Real-space attenuation of (bi/tri)linear interpolation on a ``pad``-times padded grid."""
    x = (np.arange(n) - n // 2) / float(pad * n)
    g1 = np.sinc(x) ** 2
    out = g1
    for _ in range(ndim - 1):
        out = np.multiply.outer(out, g1)
    return out.astype(np.float32)


class Estep2D:
    """Batched 2D E-step for one box size, pixel size and sampling.

    Parameters
    ----------
    box
        Image size (pixels, even).
    pixel_size_a
        Pixel size of the images (A).
    sampling
        Angles and translations to search.
    particle_diameter_a
        Mask diameter (A) for the images and the references.
    do_ctf
        Multiply references by each particle's CTF (``do_ctf_correction``).
    zero_mask
        Outside the mask the images are zero (``do_zero_mask = Yes``) or filled with noise.
    """

    def __init__(self, box: int, pixel_size_a: float, sampling: Sampling2D,
                 particle_diameter_a: float, do_ctf: bool = True, zero_mask: bool = True,
                 xp: ModuleType = np, chunk_floats: int = 12_000_000) -> None:
        if box % 2:
            raise ComputeError(f"2D classification needs an even box size, got {box}")
        self.box = int(box)
        self.pixel_size_a = float(pixel_size_a)
        self.sampling = sampling
        self.do_ctf = do_ctf
        self.zero_mask = zero_mask
        self.xp = xp
        self.pad = 2
        self.chunk_floats = int(chunk_floats)
        #: evaluate psi and psi + 180 together (exact; needs an even number of angles)
        self.pair_psi = True
        n = self.box
        self.fourier_shape = (n, n // 2 + 1)
        self.n_shells = n // 2 + 1
        self.shell_index = xp.minimum(radial_index((n, n), rfft=True, xp=xp), n // 2)
        radius_px = 0.5 * particle_diameter_a / self.pixel_size_a
        self.mask_radius_px = float(min(radius_px, n / 2 - 1))
        self.mask = soft_mask((n, n), self.mask_radius_px, edge_px=max(2.0, 0.05 * n), xp=xp)
        self.gridding = xp.asarray(sinc2_correction(n, self.pad))
        self.psi = sampling.psi_deg()
        self.offsets = sampling.offsets_px()
        #: the grid of the current sample set (``sampling`` or a coarser one, see
        #: :meth:`set_resolution`)
        self.current_sampling = sampling
        self.r_max: float | None = None
        #: seconds spent per part of :meth:`run` (for profiling and the benchmark)
        self.timings: dict[str, float] = {}

    # -- geometry shared with the optimiser ----------------------------------------------------
    def to_fourier(self, real):
        """Real images (.., n, n) centred at n//2 -> (.., n, n//2+1) with the centre as phase origin."""
        return be.rfft2(be.ifftshift(real, axes=(-2, -1)))

    def to_real(self, fourier):
        """Inverse of :meth:`to_fourier`."""
        n = self.box
        return be.fftshift(be.irfft2(fourier, s=(n, n)), axes=(-2, -1)).astype(np.float32)

    # -- sample set ------------------------------------------------------------------------------
    def set_resolution(self, r_max_shell: float, sampling: Sampling2D | None = None) -> None:
        """Use Fourier components up to ``r_max_shell`` (pixels in the box's Fourier grid).

        ``sampling`` replaces the in-plane angles and translations searched from now on
        (default: the one given at construction), e.g. the coarser grid
        :meth:`Sampling2D.for_resolution` allows at a low resolution limit.
        """
        xp = self.xp
        n = self.box
        r_max = float(min(max(r_max_shell, 2.0), n // 2))
        sampling = self.sampling if sampling is None else sampling
        if self.r_max == r_max and sampling == self.current_sampling:
            return
        self.r_max = r_max
        if sampling != self.current_sampling:
            self.current_sampling = sampling
            self.psi = sampling.psi_deg()
            self.offsets = sampling.offsets_px()
        fy = np.fft.fftfreq(n) * n
        fx = np.fft.rfftfreq(n) * n
        FY, FX = np.meshgrid(fy, fx, indexing="ij")
        rad = np.sqrt(FX**2 + FY**2)
        sel = (rad <= r_max + 1e-6) & (rad > 0.5)
        iy, ix = np.nonzero(sel)
        self._grid_sel = xp.asarray(sel)               # where the E-step has data
        self._flat = iy * (n // 2 + 1) + ix            # into the (n, n//2+1) grid
        fxs, fys = FX[sel], FY[sel]
        self._fx, self._fy = fxs, fys                    # cycles per box
        mult = np.where((ix == 0) | (ix == n // 2), 1.0, 2.0)
        self._mult = mult.astype(np.float32)
        self._shell = np.rint(rad[sel]).astype(np.int64)
        onehot = np.zeros((len(self._shell), self.n_shells), dtype=np.float32)
        onehot[np.arange(len(self._shell)), self._shell] = 1.0
        onehot /= np.maximum(onehot.sum(0, keepdims=True), 1.0)
        # mult/sigma2 already carries the Friedel weight: undo it for a plain per-shell mean
        self._shell_avg = xp.asarray(onehot / self._mult_for_avg(ix, n)[:, None])
        self.n_f = len(fxs)
        self._read_idx, self._read_w, self._read_mat = self._read_structures(self.psi, fxs, fys)
        self._ramp = self._ramps(self.offsets, fxs, fys)
        self._kx = fxs / (n * self.pixel_size_a)
        self._ky = fys / (n * self.pixel_size_a)

    def _read_structures(self, psi_deg, fxs, fys):
        """Bilinear read of A^T f on the padded full grid for every psi: (R, F, 4) indices and
        weights, and on the CPU the same read as one sparse matrix (R*F, m*m)."""
        xp = self.xp
        p = self.pad
        m = p * self.box
        ang = np.deg2rad(psi_deg)[:, None]
        c, s = np.cos(ang), np.sin(ang)
        qx = (c * fxs[None] - s * fys[None]) * p
        qy = (s * fxs[None] + c * fys[None]) * p
        x0, y0 = np.floor(qx), np.floor(qy)
        wx, wy = qx - x0, qy - y0
        x0 = x0.astype(np.int64)
        y0 = y0.astype(np.int64)
        idx, w = [], []
        for dy, dx, ww in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx),
                           (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):
            idx.append(((y0 + dy) % m) * m + (x0 + dx) % m)
            w.append(ww)
        read_idx = xp.asarray(np.stack(idx, -1))             # (R, F, 4)
        read_w = xp.asarray(np.stack(w, -1).astype(np.float32))
        read_mat = None
        if xp is np:
            import scipy.sparse as sp

            nrow = read_idx.shape[0] * read_idx.shape[1]
            rows = np.repeat(np.arange(nrow), 4)
            flat_idx, flat_w = read_idx.ravel(), read_w.ravel()
            full = sp.csr_matrix((flat_w, (rows, flat_idx)), shape=(nrow, m * m))
            # the same read from the half-plane (rfft2) transform: a position with x > m/2
            # reads the complex conjugate of its Friedel mate, so the real and imaginary
            # parts get their own matrix (same pattern, signs differ)
            h = m // 2 + 1
            qy, qx = flat_idx // m, flat_idx % m
            conj = qx > m // 2
            hidx = np.where(conj, ((-qy) % m) * h + (m - qx) % m, qy * h + qx)
            half_re = sp.csr_matrix((flat_w, (rows, hidx)), shape=(nrow, m * h))
            half_im = sp.csr_matrix((np.where(conj, -flat_w, flat_w), (rows, hidx)),
                                    shape=(nrow, m * h))
            read_mat = (full, half_re, half_im)
        return read_idx, read_w, read_mat

    def _ramps(self, offsets, fxs, fys):
        """Phase ramps for the translations: exp(-2 pi i f.t / n), (T, F) complex64."""
        ph = -2.0 * np.pi * (np.outer(offsets[:, 0], fxs) + np.outer(offsets[:, 1], fys)) / self.box
        return self.xp.asarray(np.exp(1j * ph).astype(np.complex64))

    @staticmethod
    def _mult_for_avg(ix, n):
        return np.where((ix == 0) | (ix == n // 2), 1.0, 2.0).astype(np.float32)

    # -- particles ---------------------------------------------------------------------------------
    def prepare_images(self, images, rng: np.random.Generator | None = None):
        """Mask real images (B, n, n) and return their Fourier transforms (B, n, n//2+1)."""
        xp = xp_of(images)
        imgs = xp.asarray(images, dtype=np.float32)
        if not bool(xp.all(xp.isfinite(imgs))):
            raise ComputeError("images contain NaN or infinite values")
        if self.zero_mask:
            imgs = imgs * self.mask
        else:
            outside = self.mask < 0.5
            sd = xp.sqrt(xp.mean(imgs[:, outside] ** 2, axis=1))[:, None, None]
            g = np.random.default_rng(rng).standard_normal(imgs.shape).astype(np.float32)
            imgs = imgs * self.mask + (1 - self.mask) * xp.asarray(g) * sd
        return self.to_fourier(imgs).astype(np.complex64)

    def ctf_values(self, ctf: CtfBatch):
        """CTF of each particle on the current sample set, (B, F) float32."""
        if not self.do_ctf:
            return self.xp.ones((len(ctf), self.n_f), dtype=np.float32)
        return self.xp.asarray(ctf_on_samples(ctf, self._kx, self._ky))

    # -- references ---------------------------------------------------------------------------------
    def _wrap_index(self):
        """Rows/columns of the 2x padded, origin-at-0 grid that hold the n x n box."""
        n, m = self.box, self.box * self.pad
        return np.concatenate([np.arange(n // 2), np.arange(m - n // 2, m)])

    def _padded_transforms(self, refs_fourier, half: bool = False):
        """Gridding-corrected, 2x zero-padded transforms of the references: full plane
        (K, m*m), or with ``half`` the rfft2 half plane (K, m*(m//2+1))."""
        xp = self.xp
        n, p = self.box, self.pad
        m = n * p
        k = refs_fourier.shape[0]
        # the box image with its centre at index 0 (as the references' phase origin), divided
        # by the gridding correction, placed into the origin-at-0 padded grid by wrapping
        x = be.irfft2(refs_fourier, s=(n, n)) / be.ifftshift(self.gridding)
        u = xp.asarray(self._wrap_index())
        padded = xp.zeros((k, m, m), dtype=np.float32)
        padded[:, u[:, None], u[None, :]] = x
        if half:
            return be.rfft2(padded).astype(np.complex64).reshape(k, m * (m // 2 + 1))
        return be.fft2(padded).astype(np.complex64).reshape(k, m * m)

    def project(self, refs_fourier):
        """Rotated references on the sample set: (K, R, F) complex64."""
        # bilinear read of the padded transforms: on the CPU from the half plane
        # (K, m*(m//2+1)) by the sparse read matrices, else from the full plane (K, m*m)
        P = self._padded_transforms(refs_fourier, half=self._read_mat is not None)
        k = P.shape[0]
        read_idx, read_w = self._read_idx, self._read_w
        R, F = read_idx.shape[:2]
        if self._read_mat is not None:
            _, half_re, half_im = self._read_mat
            W = np.empty((R * F, k), dtype=np.complex64)
            W.real = half_re @ np.ascontiguousarray(P.real.T)                      # (R*F, K)
            W.imag = half_im @ np.ascontiguousarray(P.imag.T)
            return np.ascontiguousarray(W.T.reshape(k, R, F))
        out = self.xp.empty((k, R, F), dtype=np.complex64)
        for j in range(R):
            out[:, j] = (P[:, read_idx[j]] * read_w[j]).sum(-1)
        return out

    def backproject(self, sums):
        """Adjoint of :meth:`project` for per-(class, psi) sums (K, R, F) -> (K, n, n//2+1).

        ``sums`` must carry the Friedel multiplicity of each sample (2 off the self-conjugate
        column, 1 on it), as the E-step's sigma2-weighted particles do.
        """
        xp = self.xp
        n, p = self.box, self.pad
        m = n * p
        k = sums.shape[0]
        # every half-plane sample stands for itself and its Friedel mate; the sums already
        # carry that multiplicity (2, or 1 on the self-conjugate column), so half of it goes
        # into the grid here and twice the real part is taken below
        vals = sums * 0.5
        if self._read_mat is not None:
            flat = vals.reshape(k, -1).T                                          # (R*F, K)
            both = np.concatenate([flat.real, flat.imag], axis=1).astype(np.float32)
            g = np.asarray(self._read_mat[0].T @ both)                            # (m*m, 2K)
            grid = (g[:, :k] + 1j * g[:, k:]).T.reshape(k, m, m)
        else:
            base = (xp.arange(k) * (m * m))[:, None, None, None]
            idx = (base + self._read_idx[None]).ravel()
            wv = (vals[..., None] * self._read_w[None]).ravel()
            re = xp.bincount(idx, weights=wv.real.astype(np.float64), minlength=k * m * m)
            im = xp.bincount(idx, weights=wv.imag.astype(np.float64), minlength=k * m * m)
            grid = (re + 1j * im).reshape(k, m, m)
        # twice the real part of the inverse transform = the inverse real transform of twice
        # the Hermitian part g(q) + conj(g(-q)) (half plane)
        h = m // 2 + 1
        ry = xp.asarray((-np.arange(m)) % m)
        rx = xp.asarray((-np.arange(h)) % m)
        herm = grid[:, :, :h] + xp.conj(grid[:, ry[:, None], rx[None, :]])
        img = be.irfft2(herm, s=(m, m))
        # the n x n box around the origin (wrapped), gridding-corrected, back to the box's
        # transform (its centre is the phase origin, as to_fourier's)
        u = xp.asarray(self._wrap_index())
        img = img[:, u[:, None], u[None, :]] / be.ifftshift(self.gridding) * float(p * p)
        return be.rfft2(img.astype(np.float32)).astype(np.complex64)

    # -- the E-step -------------------------------------------------------------------------------
    def run(self, refs_fourier, X, ctf: CtfBatch, sigma2, log_prior, halves,
            prior_offsets_px=None, accumulate: bool = True,
            class_active=None) -> tuple[Accumulators | None, ParticleResults]:
        """Expectation over all hypotheses for a batch of particles.

        Parameters
        ----------
        refs_fourier
            (K, n, n//2+1) complex references (from :meth:`to_fourier`).
        X
            (B, n, n//2+1) complex particle transforms from :meth:`prepare_images`.
        ctf
            The particles' CTF parameters.
        sigma2
            (n_shells,) noise power per shell (same FFT normalisation as ``X``).
        log_prior
            (K,) log class priors (``-inf`` switches a class off).
        halves
            (B,) 1 or 2: the random half-set of each particle.
        prior_offsets_px
            (B, 2) (x, y) origins the translation grid is centred on (default zeros).
        accumulate
            False for the final assignment pass (no sums, just best hypotheses).

        Returns
        -------
        (Accumulators or None, ParticleResults)
        """
        if self.r_max is None:
            raise ComputeError("Estep2D.set_resolution must be called before run")
        xp = self.xp
        K = refs_fourier.shape[0]
        B = X.shape[0]
        R, F = self._read_idx.shape[:2]
        T = self.offsets.shape[0]
        n = self.box
        s2 = xp.asarray(sigma2, dtype=np.float32)[xp.asarray(self._shell)]          # (F,)
        inv_s2 = xp.asarray(self._mult) / xp.maximum(s2, 1e-30)                     # mult/sigma2
        tick = _Ticker(self.timings)
        W = self.project(refs_fourier)                                              # (K, R, F)
        # sigma2 folded into the references: cross = sum Re(conj(W) Y) mult / sigma2
        # psi and psi + 180 deg read the references at f and -f: W(psi + 180) = conj W(psi)
        # exactly (real images, symmetric bilinear weights), so with the cross term split as
        # A + B (A = Re W Re Y, B = Im W Im Y, over sigma2) the pair is A + B and A - B: two
        # products of half the width over half the angles, half the work of one
        paired = self.pair_psi and R % 2 == 0
        if paired:
            R2 = R // 2
            Wre = (W.real[:, :R2] * inv_s2).reshape(K * R2, F)
            Wim = (W.imag[:, :R2] * inv_s2).reshape(K * R2, F)
        else:
            Wr = (xp.concatenate([W.real, W.imag], axis=-1)
                  * xp.concatenate([inv_s2, inv_s2])).reshape(K * R, 2 * F)      # (KR, 2F)
        W2 = (W.real**2 + W.imag**2).reshape(K * R, F)
        ctfv = self.ctf_values(ctf)                                                 # (B, F)
        Xs = X.reshape(B, -1)[:, xp.asarray(self._flat)]                            # (B, F)
        if prior_offsets_px is None:
            prior = np.zeros((B, 2))
        else:
            prior = np.asarray(prior_offsets_px, dtype=np.float64).reshape(B, 2)
        if prior.any():
            # particle-specific phase ramp for the prior origin
            pph = -2.0 * np.pi * (np.outer(prior[:, 0], self._fx) + np.outer(prior[:, 1], self._fy)) / n
            Xs = Xs * xp.asarray(np.exp(1j * pph).astype(np.complex64))
        lp = xp.asarray(log_prior, dtype=np.float32)
        lp_cols = xp.repeat(lp, R)                                                   # (KR,)
        halves = np.asarray(halves).astype(np.int64)
        tick("project")

        if accumulate:
            data_sum = xp.zeros((2, K, R, F), dtype=np.complex64)
            weight_shell = xp.zeros((2, K, self.n_shells), dtype=np.float64)
            class_w = xp.zeros((2, K), dtype=np.float64)
            s2_sum = xp.zeros(self.n_shells, dtype=np.float64)
            s2_cnt = xp.zeros(self.n_shells, dtype=np.float64)
        res = ParticleResults(*(np.zeros(B, dtype=d) for d in
                                (np.int64, np.float64, np.float64, np.float64, np.float64,
                                 np.int64, np.float64)))
        shell_x = xp.asarray(self._shell)
        cnt_shell = xp.bincount(shell_x, weights=xp.asarray(self._mult, dtype=np.float64),
                                minlength=self.n_shells)
        per = max(1, int(self.chunk_floats // max(1, T * K * R)))
        for c0 in range(0, B, per):
            c1 = min(B, c0 + per)
            b = c1 - c0
            cx = ctfv[c0:c1]
            # shifted CTF x particle, real and imaginary parts side by side: (b, T, 2F)
            a = cx * Xs[c0:c1]
            # one complex product, then the parts into their blocks (1.8x faster than four
            # real products into the blocks)
            Yc = a[:, None, :] * self._ramp[None]
            Ys = xp.empty((b, T, 2 * F), dtype=np.float32)
            Ys[..., :F] = Yc.real
            Ys[..., F:] = Yc.imag
            del Yc
            Ym = Ys.reshape(b * T, 2 * F)
            tick("shift")
            if paired:
                L = xp.empty((b, T, K, R), dtype=np.float32)
                Ab = Ym[:, :F] @ Wre.T                                              # (bT, KR/2)
                Bb = (Ym[:, F:] @ Wim.T).reshape(b, T, K, R2)
                Ab = Ab.reshape(b, T, K, R2)
                xp.add(Ab, Bb, out=L[..., :R2])
                xp.subtract(Ab, Bb, out=L[..., R2:])
                del Ab, Bb
                L = L.reshape(b, T, K * R)
            else:
                L = (Ym @ Wr.T).reshape(b, T, K * R)                                # cross term
            # minus the quadratic term, plus the log prior (-inf switches a class off)
            L -= (0.5 * ((cx * cx * inv_s2) @ W2.T) - lp_cols[None, :])[:, None, :]
            L = L.reshape(b, T * K * R)
            tick("matmul")
            best = xp.argmax(L, axis=1)
            Lmax = L[xp.arange(b), best]
            L -= Lmax[:, None]
            P = xp.exp(L, out=L)                                                    # in place
            Z = P.sum(axis=1)
            # data-term log-likelihood: -0.5 sum|X - cW|^2/sigma2 at its best + log sum
            x2 = 0.5 * ((Xs[c0:c1].real ** 2 + Xs[c0:c1].imag ** 2) * inv_s2).sum(1)
            loglik = be.to_numpy(Lmax + xp.log(Z) - x2 - lp_cols[best % (K * R)])
            bt, bkr = be.to_numpy(best // (K * R)), be.to_numpy(best % (K * R))
            bk, bpsi = bkr // R, bkr % R
            res.class_index[c0:c1] = bk
            res.psi_deg[c0:c1] = self.psi[bpsi]
            res.origin_x_px[c0:c1] = prior[c0:c1, 0] + self.offsets[bt, 0]
            res.origin_y_px[c0:c1] = prior[c0:c1, 1] + self.offsets[bt, 1]
            res.max_prob[c0:c1] = be.to_numpy(1.0 / Z)
            res.log_likelihood[c0:c1] = loglik
            tick("posterior")
            rows, cols, vals, nsig = _significant(P, Z, SIGNIFICANT_MASS, MAX_SIGNIFICANT_2D)
            tick("significant")
            res.n_significant[c0:c1] = nsig
            if not accumulate:
                continue
            # sums per (class, psi) of P * c X shifted / sigma2, per half
            hb = halves[c0:c1]
            rows_np = be.to_numpy(rows)
            cols_np = be.to_numpy(cols)
            vals_np = be.to_numpy(vals)
            hrow = hb[rows_np]
            # CTF^2 / sigma2 averaged per shell: the diagonal is rotationally averaged because
            # each class sees its particles at all in-plane angles
            per_shell = (cx * cx * inv_s2) @ self._shell_avg                         # (b, S)
            # sigma2 is radial and the same for every particle, so it commutes with the sum
            # and the back-rotation: accumulate un-whitened (CTF x particle) sums, apply the
            # Friedel multiplicity to the (class, psi) sums and divide by sigma2 on the
            # reference grid (keeps G and F on the same footing)
            mult = xp.asarray(self._mult)
            for h in (1, 2):
                m_h = hrow == h
                if not m_h.any():
                    continue
                r_p = rows_np[m_h]
                t_idx = cols_np[m_h] // (K * R)
                kr = cols_np[m_h] % (K * R)
                v = vals_np[m_h]
                acc2 = _sparse_rows_sum(xp, r_p * T + t_idx, kr, v, Ym, K * R)    # (KR, 2F)
                acc = acc2[:, :F] + 1j * acc2[:, F:]
                # gradient numerator: subtract the model, sum_i w_i c_i^2/sigma2 * W_kpsi
                # (the (class, psi) x particle weights are sparse: same product as above)
                model = _sparse_rows_sum(xp, r_p, kr, v, cx * cx, K * R) * W.reshape(K * R, F)
                data_sum[h - 1] += ((acc - model) * mult).reshape(K, R, F)
                wk = np.bincount(r_p * K + kr // R, weights=v, minlength=b * K).reshape(b, K)
                wkx = xp.asarray(wk)
                weight_shell[h - 1] += wkx.T @ per_shell.astype(np.float64)
                class_w[h - 1] += wkx.sum(0)
            # residual power at the best hypothesis, per shell
            Wb = W.reshape(K * R, F)[xp.asarray(bkr)]
            ramp_b = self._ramp[xp.asarray(bt)]
            diff = Xs[c0:c1] * ramp_b - cx * Wb
            d2 = (diff.real**2 + diff.imag**2) * xp.asarray(self._mult)
            # robust to outliers (ice, carbon): particles whose whitened residual is more than
            # 3x the chunk's median do not enter the noise estimate
            chi = (d2 / xp.maximum(s2, 1e-30)).sum(1)
            inl = chi <= 3.0 * xp.median(chi)
            s2_sum += xp.bincount(shell_x, weights=d2[inl].sum(0).astype(np.float64),
                                  minlength=self.n_shells)
            s2_cnt += cnt_shell * float(inl.sum())
            tick("accumulate")
        if not accumulate:
            return None, res
        # the adjoint leaks a little outside the sampled frequencies: keep B where F lives
        inv_grid = 1.0 / xp.maximum(xp.asarray(sigma2, dtype=np.float32), 1e-30)[self.shell_index]
        data = (self.backproject(data_sum.reshape(2 * K, R, F)).reshape(2, K, *self.fourier_shape)
                * (self._grid_sel * inv_grid))
        tick("backproject")
        weight = weight_shell
        acc = Accumulators(data=data, weight=weight.astype(np.float32), class_weight=class_w,
                           sigma2_sum=s2_sum, sigma2_count=s2_cnt, n_particles=B,
                           loglik_sum=float(res.log_likelihood.sum()))
        return acc, res


class _Ticker:
    """Adds the time since the previous call to ``timings[name]``."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.t
        self.t = now


def _significant(P, Z, mass: float, max_n: int):
    """Significant hypotheses per row of the unnormalised posteriors P (row sums Z).

    Keeps, per row, the largest values until they hold ``mass`` of the row's total (at most
    ``max_n``). Returns (rows, cols, normalised kept values, number kept per row).
    Candidates are first cut at 1e-9 of the row total, so the sort only sees the few
    hypotheses that matter once the posteriors are peaked.
    """
    xp = xp_of(P)
    b, H = P.shape
    Zn = be.to_numpy(Z).astype(np.float64)
    rows_out, cols_out, vals_out = [], [], []
    # rows whose best hypothesis alone holds the mass (max of P is 1 by construction)
    single = 1.0 / Zn >= mass
    if single.any():
        r1 = np.nonzero(single)[0]
        rows_out.append(r1)
        cols_out.append(be.to_numpy(xp.argmax(P[xp.asarray(r1)], axis=1)))
        vals_out.append(np.ones(len(r1)))
    rest = np.nonzero(~single)[0]
    Pr = P[xp.asarray(rest)] if len(rest) < b else P
    cand = Pr > (xp.asarray(Zn[rest] * 1e-9, dtype=P.dtype))[:, None]
    counts = be.to_numpy(cand.sum(axis=1))
    few = counts <= max_n
    if few.any():
        rr, cc = xp.nonzero(cand[xp.asarray(few)])
        sub = rest[np.nonzero(few)[0]]
        rr = be.to_numpy(rr)
        cc = be.to_numpy(cc)
        rows = sub[rr]
        vals = be.to_numpy(P[xp.asarray(rows), xp.asarray(cc)]).astype(np.float64) / Zn[rows]
        order = np.lexsort((-vals, rows))
        rows, cc, vals = rows[order], cc[order], vals[order]
        csum = np.cumsum(vals)
        start = np.searchsorted(rows, rows, side="left")
        before = csum - vals - np.concatenate([[0.0], csum])[start]
        keep = before < mass
        rows_out.append(rows[keep])
        cols_out.append(cc[keep])
        vals_out.append(vals[keep])
    for r in rest[np.nonzero(~few)[0]]:
        part = xp.argpartition(-P[r], max_n - 1)[:max_n]
        v = be.to_numpy(P[r][part]).astype(np.float64) / Zn[r]
        o = np.argsort(-v)
        v, c = v[o], be.to_numpy(part)[o]
        keep = (np.cumsum(v) - v) < mass
        rows_out.append(np.full(int(keep.sum()), r))
        cols_out.append(c[keep])
        vals_out.append(v[keep])
    rows = np.concatenate(rows_out)
    cols = np.concatenate(cols_out)
    vals = np.concatenate(vals_out)
    nsig = np.bincount(rows, minlength=b).astype(np.int64)
    tot = np.bincount(rows, weights=vals, minlength=b)
    vals = vals / tot[rows]
    return rows, cols, vals, nsig


def _sparse_rows_sum(xp, src_rows, dst_rows, weights, Y, n_dst):
    """out[dst] += w * Y[src] for real Y (S, D): a sparse (n_dst x S) @ Y product."""
    if xp is np:
        import scipy.sparse as sp

        M = sp.csr_matrix((weights.astype(np.float32), (dst_rows, src_rows)),
                          shape=(n_dst, Y.shape[0]))
        return np.asarray(M @ Y, dtype=np.float32)
    M = xp.zeros((n_dst, Y.shape[0]), dtype=np.float32)
    M[xp.asarray(dst_rows), xp.asarray(src_rows)] = xp.asarray(weights, dtype=np.float32)
    return M @ Y
