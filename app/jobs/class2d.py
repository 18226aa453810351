"""relion.class2d: 2D classification with VDAM (default) or EM, RELION 4 outputs.

Reads ``fn_img`` (a particles.star with optics) and streams the images from their
memory-mapped stacks. Writes, every 10 mini-batches (every iteration for EM) and at the end,
``run_itNNN_classes.mrcs``, ``run_itNNN_model.star``, ``run_itNNN_data.star``,
``run_itNNN_optimiser.star`` and ``run_itNNN_vdam_state.npz`` (the optimiser's moments, so a
killed run continues from its last written iteration with ``--continue`` or a re-run in the
same directory).

Bad input: a particles.star without the CTF columns (with ``do_ctf_correction``) or with
more classes than particles fails with a clear message; particles whose images hold NaN/inf
are skipped (logged, left out of ``_data.star``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from app.errors import UserError
from app.jobs.base import Job, JobContext, Option, Unsupported
from compute import backend as be
from compute.errors import ComputeError
from compute.vdam.classify2d import Classify2D, Classify2DParams
from compute.vdam.estep2d import CtfBatch
from metadata.images import StackReader, write_mrc
from metadata.star import particles_with_optics, read_star, write_star

log = logging.getLogger(__name__)

CTF_LABELS = ("rlnDefocusU", "rlnDefocusV", "rlnVoltage", "rlnSphericalAberration")
CHECKPOINT_EVERY = 10


class StarParticles:
    """A :class:`compute.vdam.classify2d.ParticleSource` over a particles.star."""

    def __init__(self, star_path: Path, project_dir: Path, need_ctf: bool) -> None:
        blocks = read_star(star_path)
        self.blocks = blocks
        rows = particles_with_optics(blocks, "particles", star_path)
        if "rlnImageName" not in rows.columns:
            raise UserError(f"{star_path}: no rlnImageName column; is this a particles.star?")
        if len(rows) == 0:
            raise UserError(f"{star_path}: no particles")
        if need_ctf:
            missing = [c for c in CTF_LABELS if c not in rows.columns]
            if missing:
                raise UserError(f"{star_path}: CTF columns missing ({', '.join(missing)}); run "
                                "CTF estimation first or set do_ctf_correction to No")
        self.rows = rows.reset_index(drop=True)
        self.names = self.rows["rlnImageName"].astype(str).to_numpy()
        self.reader = StackReader(star_path, project_dir)
        first = self.reader.read(self.names[:1])
        self.box = int(first.shape[-1])
        if "rlnImagePixelSize" in self.rows.columns:
            self.pixel_size_a = float(self.rows["rlnImagePixelSize"].iloc[0])
        elif "rlnDetectorPixelSize" in self.rows.columns and "rlnMagnification" in self.rows.columns:
            self.pixel_size_a = float(self.rows["rlnDetectorPixelSize"].iloc[0]
                                      / self.rows["rlnMagnification"].iloc[0] * 1e4)
        else:
            raise UserError(f"{star_path}: no rlnImagePixelSize in the optics table")
        self.n_particles = len(self.rows)
        self.need_ctf = need_ctf

        def col(name, default):
            if name in self.rows.columns:
                return self.rows[name].to_numpy(dtype=np.float64)
            return np.full(self.n_particles, default, dtype=np.float64)

        self._ctf = CtfBatch(col("rlnDefocusU", 0.0), col("rlnDefocusV", 0.0),
                             col("rlnDefocusAngle", 0.0), col("rlnVoltage", 300.0),
                             col("rlnSphericalAberration", 2.7), col("rlnAmplitudeContrast", 0.1),
                             col("rlnPhaseShift", 0.0), col("rlnCtfBfactor", 0.0))

    def images(self, idx):
        return self.reader.read(self.names[np.asarray(idx)])

    def ctf(self, idx):
        if not self.need_ctf:
            return CtfBatch.none(len(idx))
        return self._ctf.subset(np.asarray(idx))


class Class2DJob(Job):
    options = [
        Option("fn_img", "", "path", "input particles.star"),
        Option("nr_classes", "50", "int", "number of classes K"),
        Option("do_grad", "Yes", "bool", "use VDAM (gradient) instead of EM"),
        Option("nr_iter_grad", "200", "int", "VDAM mini-batches"),
        Option("do_em", "No", "bool", "use EM"),
        Option("nr_iter_em", "25", "int", "EM iterations"),
        Option("tau_fudge", "2", "float", "regularisation parameter T"),
        Option("particle_diameter", "200", "float", "mask diameter (A)"),
        Option("psi_sampling", "6", "float", "in-plane angular sampling (degrees)"),
        Option("offset_range", "5", "float", "offset search range (pixels)"),
        Option("offset_step", "1", "float", "offset search step (pixels)"),
        Option("do_ctf_correction", "Yes", "bool", "use the CTFs"),
        Option("do_zero_mask", "Yes", "bool", "zeros outside the mask (else noise)"),
        Option("allow_coarser", "No", "bool",
               "coarser psi/offset steps while the resolution is low (faster, can be less pure)"),
        Option("gpu_ids", "", "str", "GPU to use (empty: CPU unless SCOPESIDE_DEVICE says)"),
        Option("use_gpu", "No", "bool", "run on a GPU"),
        Option("class_inactivity_threshold", "0.1", "float",
               "replace classes below this fraction of 1/K (0 = off)"),
        Option("random_seed", "1", "int", "random seed"),
    ]
    input_options = ["fn_img"]
    unsupported = [
        Unsupported("dont_skip_align", ("yes",), "classification without alignment"),
        Unsupported("do_helix", ("no",), "helical 2D classification"),
    ]

    def run(self, ctx: JobContext) -> None:
        fn = ctx.get("fn_img")
        if not fn:
            raise UserError("fn_img: no input particles.star given")
        star = Path(fn)
        if not star.is_absolute():
            star = ctx.project_dir / star
        use_em = bool(ctx.get("do_em", False)) or not bool(ctx.get("do_grad", True))
        need_ctf = bool(ctx.get("do_ctf_correction", True))
        src = StarParticles(star, ctx.project_dir, need_ctf)
        ctx.add_input_node(star, "ParticlesData.star.relion")
        be.set_workers(ctx.threads)
        params = Classify2DParams(
            n_classes=int(ctx.get("nr_classes", 50)), use_em=use_em,
            n_iter=int(ctx.get("nr_iter_grad", 200)), n_iter_em=int(ctx.get("nr_iter_em", 25)),
            tau_fudge=float(ctx.get("tau_fudge", 2.0)),
            particle_diameter_a=float(ctx.get("particle_diameter", 200.0)),
            psi_step_deg=float(ctx.get("psi_sampling", 6.0)),
            offset_range_px=float(ctx.get("offset_range", 5.0)),
            offset_step_px=float(ctx.get("offset_step", 1.0)),
            do_ctf=need_ctf, zero_mask=bool(ctx.get("do_zero_mask", True)),
            coarse_sampling=bool(ctx.get("allow_coarser", False)),
            inactivity_threshold=float(ctx.get("class_inactivity_threshold", 0.1) or 0.0),
            seed=int(ctx.get("random_seed", 1)))
        if params.psi_step_deg <= 0 or params.offset_step_px <= 0 or params.offset_range_px < 0:
            raise UserError("psi_sampling and offset_step must be > 0, offset_range >= 0")
        xp = np
        if bool(ctx.get("use_gpu", False)) or str(ctx.get("gpu_ids", "") or "").strip():
            if be.gpu_available():
                xp = be.get_xp("gpu")
                ctx.info("running on the GPU")
            else:
                ctx.warning("a GPU was requested but none is usable; running on the CPU")
        try:
            clf = Classify2D(src, params, xp=xp)
        except ComputeError as exc:
            raise UserError(f"{star}: {exc}") from None
        writer = Class2DWriter(ctx, src, clf, star)
        last = writer.latest_state()
        if last is not None:
            ctx.info("continuing from %s", last.name)
            with np.load(last) as d:
                arrays = {k: d[k] for k in d.files}
            clf.restore(arrays)
            final_done = bool(arrays.get("final_done", False))
        else:
            clf.initialise()
            final_done = False
        what = "EM iteration" if use_em else "mini-batch"
        while not clf.done:
            ctx.check_abort()
            info = clf.step()
            ctx.progress(info.iteration, info.n_total, what)
            if info.replaced:
                ctx.info("mini-batch %d: inactive class(es) replaced: %s", info.iteration,
                         ", ".join(f"{a + 1}<-{b + 1}" for a, b in info.replaced))
            if use_em or info.iteration % CHECKPOINT_EVERY == 0 or clf.done:
                if not (clf.done and not use_em):
                    writer.write(info.iteration)
        if not final_done and not use_em:
            ctx.info("final assignment pass over %d particles", src.n_particles)
            clf.final_pass(progress=lambda d, t: (ctx.check_abort(), ctx.progress(d, t, "final pass")))
        out = writer.write(clf.iteration, final=True)
        n_bad = int(clf.bad.sum())
        if n_bad:
            ctx.warning("%d particle(s) with NaN/inf pixels were skipped and are not in %s",
                        n_bad, out["data"].name)
        ctx.info("E-step %.1f s of %.1f s total (%.0f %%)", clf.estep_seconds,
                 clf.total_seconds, 100.0 * clf.estep_seconds / max(clf.total_seconds, 1e-9))
        ctx.add_output_node(out["optimiser"], "ProcessData.star.relion.optimiser.class2d")
        ctx.add_output_node(out["data"], "ParticlesData.star.relion.class2d")
        ctx.add_output_node(out["classes"], "Image2DStack.mrcs")


def latest_vdam_state(out_dir: Path) -> Path | None:
    """The newest ``run_itNNN_vdam_state.npz`` checkpoint in a job directory (to resume from)."""
    best, best_it = None, -1
    for p in Path(out_dir).glob("run_it*_vdam_state.npz"):
        m = re.match(r"run_it(\d+)_vdam_state\.npz$", p.name)
        if m and int(m.group(1)) > best_it:
            best, best_it = p, int(m.group(1))
    return best


class Class2DWriter:
    """RELION 4 output files of a 2D classification, plus the resume state."""

    def __init__(self, ctx: JobContext, src: StarParticles, clf: Classify2D, star: Path) -> None:
        self.ctx = ctx
        self.src = src
        self.clf = clf
        self.star = star

    def latest_state(self) -> Path | None:
        return latest_vdam_state(self.ctx.out_dir)

    def write(self, iteration: int, final: bool = False) -> dict[str, Path]:
        ctx, clf, src = self.ctx, self.clf, self.src
        root = f"run_it{iteration:03d}"
        px = src.pixel_size_a
        paths = {k: ctx.path(f"{root}_{k}{ext}") for k, ext in
                 (("classes", ".mrcs"), ("model", ".star"), ("data", ".star"),
                  ("optimiser", ".star"))}
        st = clf.state
        K = st.n_classes
        write_mrc(paths["classes"], clf.class_images(), pixel_size_a=px, is_stack=True)
        res = clf.results
        good = ~clf.bad & (res.class_index >= 0)
        # per-class statistics from the current assignments
        cls = res.class_index
        acc_rot = np.full(K, 999.0)
        acc_tr = np.full(K, 999.0)
        prior_x = np.zeros(K)
        prior_y = np.zeros(K)
        for k in range(K):
            sel = good & (cls == k)
            if sel.any():
                pm = float(res.max_prob[sel].mean())
                # heuristic accuracy: the sampling step, widened when posteriors are broad
                acc_rot[k] = clf.params.psi_step_deg * (2.0 - pm)
                acc_tr[k] = clf.params.offset_step_px * px * (2.0 - pm)
                prior_x[k] = float(res.origin_x_px[sel].mean() * px)
                prior_y[k] = float(res.origin_y_px[sel].mean() * px)
        resol = clf.class_resolution_a()
        n_sh = clf.n_shells
        shells = np.arange(n_sh)
        with np.errstate(divide="ignore"):
            shell_res = np.where(shells > 0, src.box * px / np.maximum(shells, 1e-9), 999.0)
        r_max = clf.r_max
        completeness = np.array([float(np.mean(f[1:int(r_max) + 1] > 0.5)) for f in st.fsc])
        classes = pd.DataFrame({
            "rlnReferenceImage": [f"{k + 1:06d}@{ctx.rel(paths['classes'])}" for k in range(K)],
            "rlnClassDistribution": st.class_frac,
            "rlnAccuracyRotations": acc_rot,
            "rlnAccuracyTranslationsAngst": acc_tr,
            "rlnEstimatedResolution": resol,
            "rlnOverallFourierCompleteness": completeness,
            "rlnClassPriorOffsetX": prior_x,
            "rlnClassPriorOffsetY": prior_y,
        })
        general = {
            "rlnReferenceDimensionality": 2, "rlnDataDimensionality": 2,
            "rlnOriginalImageSize": src.box, "rlnCurrentResolution": float(
                src.box * px / max(clf.resolution_shell(), 1)),
            "rlnCurrentImageSize": int(2 * r_max), "rlnPixelSize": px, "rlnNrClasses": K,
            "rlnNrBodies": 1, "rlnNrGroups": 1, "rlnNrOpticsGroups": 1,
            "rlnTau2FudgeFactor": clf.params.tau_fudge, "rlnNormCorrectionAverage": 1.0,
            "rlnSigmaOffsetsAngst": clf.params.offset_range_px * px / 3.0,
            "rlnOrientationalPriorMode": 0, "rlnSigmaPriorRotAngle": 0.0,
            "rlnSigmaPriorTiltAngle": 0.0, "rlnSigmaPriorPsiAngle": 0.0,
            "rlnLogLikelihood": float(res.log_likelihood[good].sum()),
            "rlnAveragePmax": float(res.max_prob[good].mean()) if good.any() else 0.0,
        }
        blocks: dict[str, object] = {"model_general": general, "model_classes": classes}
        with np.errstate(divide="ignore", invalid="ignore"):
            for k in range(K):
                f = np.clip(st.fsc[k], 0.0, 0.999)
                blocks[f"model_class_{k + 1}"] = pd.DataFrame({
                    "rlnSpectralIndex": shells, "rlnResolution": shells / (src.box * px),
                    "rlnAngstromResolution": shell_res,
                    "rlnSsnrMap": f / (1.0 - f), "rlnGoldStandardFsc": st.fsc[k],
                    "rlnFourierCompleteness": (shells <= r_max).astype(float),
                })
        blocks["model_optics_group_1"] = pd.DataFrame({
            "rlnSpectralIndex": shells, "rlnResolution": shells / (src.box * px),
            "rlnSigma2Noise": st.sigma2})
        write_star(paths["model"], blocks)
        # data.star: the input rows (skipped particles left out) with the assignments
        rows = self.src.blocks.get("particles")
        if rows is None:
            rows = next(iter(self.src.blocks.values()))
        rows = rows.reset_index(drop=True).loc[good].copy()
        rows["rlnClassNumber"] = cls[good] + 1
        rows["rlnAnglePsi"] = res.psi_deg[good]
        rows["rlnOriginXAngst"] = res.origin_x_px[good] * px
        rows["rlnOriginYAngst"] = res.origin_y_px[good] * px
        rows["rlnMaxValueProbDistribution"] = res.max_prob[good]
        rows["rlnNrOfSignificantSamples"] = res.n_significant[good]
        rows["rlnLogLikeliContribution"] = res.log_likelihood[good]
        rows["rlnRandomSubset"] = clf.halves[good]
        data_blocks: dict[str, object] = {}
        if "optics" in self.src.blocks:
            data_blocks["optics"] = self.src.blocks["optics"]
        data_blocks["particles"] = rows
        write_star(paths["data"], data_blocks)
        state_path = ctx.path(f"{root}_vdam_state.npz")
        arrays = clf.checkpoint()
        arrays["final_done"] = np.array(bool(final and not clf.params.use_em))
        tmp = state_path.with_name(f".{state_path.name}.tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(state_path)
        opt = {
            "rlnOutputRootName": ctx.rel(ctx.path("run")),
            "rlnModelStarFile": ctx.rel(paths["model"]),
            "rlnExperimentalDataStarFile": ctx.rel(paths["data"]),
            "rlnCurrentIteration": iteration,
            "rlnNumberOfIterations": clf.n_total,
            "rlnDoGradientRefine": 0 if clf.params.use_em else 1,
            "rlnParticleDiameter": clf.params.particle_diameter_a,
            "rlnDoZeroMask": int(clf.params.zero_mask),
            "rlnDoCorrectCtf": int(clf.params.do_ctf),
            "rlnTau2FudgeFactor": clf.params.tau_fudge,
            "rlnRandomSeed": clf.params.seed,
            "rlnPsiStep": clf.params.psi_step_deg,
            "rlnOffsetRange": clf.params.offset_range_px,
            "rlnOffsetStep": clf.params.offset_step_px,
            "rlnClassInactivityThreshold": clf.params.inactivity_threshold,
            "scsVdamStateFile": ctx.rel(state_path),
        }
        write_star(paths["optimiser"], {"optimiser_general": opt})
        return paths


JOB = Class2DJob
