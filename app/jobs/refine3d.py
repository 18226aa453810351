"""relion.refine3d: gold-standard 3D auto-refinement (:mod:`compute.refine3d`).

Reads ``fn_img`` (particles.star) and ``fn_ref`` (a map; rescaled to the particles' box/pixel
size when they differ), low-passes the reference to ``ini_high`` and refines with independent
half-sets until convergence. Writes ``run_class001.mrc`` (both halves), the half-maps
``run_half1_class001_unfil.mrc`` / ``run_half2_class001_unfil.mrc``, ``run_model.star`` (general
block with ``rlnCurrentResolution`` plus a ``model_class_1`` FSC table with
``rlnFourierShellCorrelation``/``rlnGoldStandardFsc``, ``rlnResolution``,
``rlnAngstromResolution``, ``rlnSsnrMap``) and ``run_data.star`` (angles, origins, half-set),
and ``run_itNNN_half{1,2}_class001.mrc`` per iteration.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from app.errors import UserError
from app.jobs.base import Job, JobContext, Option, Unsupported
from app.jobs.class2d import StarParticles
from app.jobs.inimodel3d import check_symmetry, pick_xp, resolve_input, shell_table, write_data_star
from compute import backend as be
from compute.errors import ComputeError
from compute.refine3d import Refine3D, Refine3DParams, healpix_order_of_step
from metadata.errors import MetadataError
from metadata.images import read_mrc, write_mrc
from metadata.star import write_star

log = logging.getLogger(__name__)


def _sampling_deg(text) -> float:
    """``"7.5 degrees"`` (RELION's GUI value) or a number -> degrees."""
    s = str(text).strip().split()[0] if str(text).strip() else "7.5"
    try:
        v = float(s)
    except ValueError:
        raise UserError(f"sampling: cannot read an angle from {text!r}") from None
    if v <= 0:
        raise UserError("sampling must be > 0 degrees")
    return v


def load_reference(path, box: int, px: float) -> np.ndarray:
    try:
        vol, ref_px = read_mrc(path)
    except MetadataError as exc:
        raise UserError(f"fn_ref: {exc}") from None
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise UserError(f"fn_ref: {path} is not a cubic 3D map (shape {vol.shape})")
    if ref_px is not None and abs(ref_px - px) > 1e-3 * px or vol.shape[0] != box:
        from compute.simulate.project import resample_map

        vol = resample_map(vol, ref_px or px, px, box)
    return np.asarray(vol, dtype=np.float32)


class Refine3DJob(Job):
    options = [
        Option("fn_img", "", "path", "input particles.star"),
        Option("fn_ref", "", "path", "reference map (.mrc)"),
        Option("fn_mask", "", "path", "reference mask (not used: a spherical mask is applied)"),
        Option("ref_correct_greyscale", "No", "bool", "reference on absolute greyscale"),
        Option("ini_high", "40", "float", "initial low-pass of the reference (A)"),
        Option("sym_name", "C1", "str", "point group"),
        Option("particle_diameter", "200", "float", "mask diameter (A)"),
        Option("do_zero_mask", "Yes", "bool", "zeros outside the mask"),
        Option("do_ctf_correction", "Yes", "bool", "use the CTFs"),
        Option("sampling", "7.5 degrees", "str", "initial angular sampling"),
        Option("offset_range", "5", "float", "offset search range (pixels)"),
        Option("offset_step", "1", "float", "offset search step (pixels)"),
        Option("auto_local_sampling", "1.8 degrees", "str", "local searches from this step"),
        Option("do_solvent_fsc", "No", "bool", "solvent-flattened FSC (spherical mask used)"),
        Option("max_iter", "20", "int", "safety limit on the iterations"),
        Option("gpu_ids", "", "str", "GPU to use"),
        Option("use_gpu", "No", "bool", "run on a GPU"),
        Option("random_seed", "1", "int", "random seed"),
    ]
    input_options = ["fn_img", "fn_ref"]
    unsupported = [
        Unsupported("relax_sym", (), "relaxed symmetry"),
        Unsupported("do_helix", ("no",), "helical refinement"),
    ]

    def run(self, ctx: JobContext) -> None:
        star = resolve_input(ctx, "fn_img")
        ref_path = resolve_input(ctx, "fn_ref")
        sym = check_symmetry(ctx.get("sym_name", "C1"))
        need_ctf = bool(ctx.get("do_ctf_correction", True))
        src = StarParticles(star, ctx.project_dir, need_ctf)
        if src.box % 2:
            raise UserError(f"{star}: the particles' box ({src.box}) must be even for 3D")
        ctx.add_input_node(star, "ParticlesData.star.relion")
        ctx.add_input_node(ref_path, "DensityMap.mrc")
        if ctx.get("fn_mask"):
            ctx.warning("fn_mask is not used yet: a soft spherical mask of particle_diameter is")
        ref = load_reference(ref_path, src.box, src.pixel_size_a)
        be.set_workers(ctx.threads)
        params = Refine3DParams(
            ini_high_a=float(ctx.get("ini_high", 40.0)), symmetry=sym,
            particle_diameter_a=float(ctx.get("particle_diameter", 200.0)),
            initial_step_deg=_sampling_deg(ctx.get("sampling", "7.5")),
            auto_local_step_deg=_sampling_deg(ctx.get("auto_local_sampling", "1.8")),
            offset_range_px=float(ctx.get("offset_range", 5.0)),
            offset_step_px=float(ctx.get("offset_step", 1.0)), do_ctf=need_ctf,
            max_iter=int(ctx.get("max_iter", 20)), seed=int(ctx.get("random_seed", 1)))
        if params.offset_step_px <= 0 or params.offset_range_px < 0:
            raise UserError("offset_step must be > 0 and offset_range >= 0")
        if params.ini_high_a <= 2 * src.pixel_size_a:
            raise UserError(f"ini_high ({params.ini_high_a} A) must be coarser than Nyquist "
                            f"({2 * src.pixel_size_a:.2f} A)")
        px = src.pixel_size_a
        origin = None
        if "rlnOriginXAngst" in src.rows.columns and "rlnOriginYAngst" in src.rows.columns:
            origin = np.stack([src.rows["rlnOriginXAngst"].to_numpy(float),
                               src.rows["rlnOriginYAngst"].to_numpy(float)], 1) / px
        try:
            ref3d = Refine3D(src, ref, params, xp=pick_xp(ctx), initial_origin_px=origin)
        except ComputeError as exc:
            raise UserError(f"{star}: {exc}") from None
        while not ref3d.done:
            ctx.check_abort()
            it = ref3d.iteration + 1

            def prog(d, t, it=it):
                ctx.check_abort()
                ctx.progress(d, t, f"iteration {it} particles")

            info = ref3d.iterate(progress=prog)
            change = ("first orientations" if not np.isfinite(info.angle_change_deg) else
                      f"angular change median {info.angle_change_deg:.2f} / mean "
                      f"{info.angle_change_mean_deg:.2f} deg, "
                      f"{100.0 * info.changed_fraction:.0f} % of particles moved")
            ctx.info("iteration %d: resolution %.2f A, step %.2f deg (%s), %.0f s, %s",
                     info.iteration, info.resolution_a, info.step_deg,
                     "local" if info.local else "global", info.seconds, change)
            for h in (1, 2):
                write_mrc(ctx.path(f"run_it{info.iteration:03d}_half{h}_class001.mrc"),
                          ref3d.refs[h - 1], pixel_size_a=px)
        res = ref3d.result()
        out_map = ctx.path("run_class001.mrc")
        write_mrc(out_map, res.combined, pixel_size_a=px)
        write_mrc(ctx.path("run_half1_class001_unfil.mrc"), res.half1, pixel_size_a=px)
        write_mrc(ctx.path("run_half2_class001_unfil.mrc"), res.half2, pixel_size_a=px)
        shells, s_inv, s_ang = shell_table(src.box, px)
        f = np.clip(res.fsc, 0.0, 0.999)
        fsc_table = pd.DataFrame({
            "rlnSpectralIndex": shells, "rlnResolution": s_inv, "rlnAngstromResolution": s_ang,
            "rlnFourierShellCorrelation": res.fsc, "rlnGoldStandardFsc": res.fsc,
            "rlnSsnrMap": 2 * f / (1 - f)})
        last = res.history[-1]
        general = {
            "rlnReferenceDimensionality": 3, "rlnDataDimensionality": 2,
            "rlnOriginalImageSize": src.box, "rlnCurrentResolution": res.resolution_a,
            "rlnCurrentImageSize": int(2 * last.r_max), "rlnPixelSize": px, "rlnNrClasses": 1,
            "rlnNrBodies": 1, "rlnNrGroups": 1, "rlnNrOpticsGroups": 1,
            "rlnTau2FudgeFactor": params.tau_fudge, "rlnNormCorrectionAverage": 1.0,
            "rlnLogLikelihood": float(res.log_likelihood.sum()),
            "rlnAveragePmax": float(res.max_prob.mean()),
        }
        classes = pd.DataFrame({
            "rlnReferenceImage": [ctx.rel(out_map)], "rlnClassDistribution": [1.0],
            "rlnAccuracyRotations": [last.step_deg],
            "rlnAccuracyTranslationsAngst": [params.offset_step_px * px],
            "rlnEstimatedResolution": [res.resolution_a],
            "rlnOverallFourierCompleteness": [1.0]})
        write_star(ctx.path("run_model.star"), {
            "model_general": general, "model_classes": classes, "model_class_1": fsc_table,
            "model_optics_group_1": pd.DataFrame({"rlnSpectralIndex": shells,
                                                  "rlnResolution": s_inv,
                                                  "rlnSigma2Noise": res.sigma2})})
        keep = np.ones(src.n_particles, dtype=bool)
        write_data_star(ctx.path("run_data.star"), src, keep, {
            "rlnAngleRot": res.rot, "rlnAngleTilt": res.tilt, "rlnAnglePsi": res.psi,
            "rlnOriginXAngst": res.origin_x_px * px, "rlnOriginYAngst": res.origin_y_px * px,
            "rlnMaxValueProbDistribution": res.max_prob,
            "rlnNrOfSignificantSamples": res.n_significant,
            "rlnLogLikeliContribution": res.log_likelihood, "rlnRandomSubset": res.halves})
        write_star(ctx.path("run_optimiser.star"), {"optimiser_general": {
            "rlnOutputRootName": ctx.rel(ctx.path("run")),
            "rlnModelStarFile": ctx.rel(ctx.path("run_model.star")),
            "rlnExperimentalDataStarFile": ctx.rel(ctx.path("run_data.star")),
            "rlnCurrentIteration": len(res.history), "rlnDoAutoRefine": 1,
            "rlnDoSplitRandomHalves": 1, "rlnSymmetryGroup": sym,
            "rlnParticleDiameter": params.particle_diameter_a,
            "rlnHealpixOrder": healpix_order_of_step(last.step_deg),
            "rlnAutoLocalSearchesHealpixOrder": healpix_order_of_step(
                params.auto_local_step_deg),
            "rlnOffsetRange": params.offset_range_px, "rlnOffsetStep": params.offset_step_px,
            "rlnRandomSeed": params.seed}})
        ctx.info("final resolution %.2f A (FSC 0.143 between half-maps) after %d iterations",
                 res.resolution_a, len(res.history))
        ctx.add_output_node(out_map, "DensityMap.mrc.relion.refine3d")
        ctx.add_output_node(ctx.path("run_half1_class001_unfil.mrc"),
                            "DensityMap.mrc.relion.halfmap.refine3d")
        ctx.add_output_node(ctx.path("run_data.star"), "ParticlesData.star.relion.refine3d")
        ctx.add_output_node(ctx.path("run_model.star"), "ProcessData.star.relion.refine3d")


JOB = Refine3DJob
