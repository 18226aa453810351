"""relion.initialmodel: de novo 3D initial model with VDAM, then symmetry alignment.

Reads ``fn_img`` (a particles.star with optics; the images are streamed from their stacks by
:class:`app.jobs.class2d.StarParticles`) and runs :class:`compute.inimodel.InitialModel3D`
(C1, ``nr_classes`` classes, ``nr_iter`` mini-batches). Every 10 mini-batches and at the end it
writes RELION 4's ``run_itNNN_class00k.mrc``, ``run_itNNN_model.star``, ``run_itNNN_data.star``,
``run_itNNN_optimiser.star`` plus ``run_itNNN_vdam_state.npz`` (the optimiser's moments: a
killed run continues from its last written iteration). Finally the class with most particles
is rotated so that its symmetry axes for ``sym_name`` lie on RELION's standard axes
(:func:`compute.symmetry.align_to_symmetry`) and written as ``initial_model.mrc`` (the proc
scheme's ``SET_myref_inimodel`` points there).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from app.errors import UserError
from app.jobs.base import Job, JobContext, Option
from app.jobs.class2d import StarParticles, latest_vdam_state
from compute import backend as be
from compute.errors import ComputeError
from compute.inimodel import InitialModel3D, InitialModelParams
from compute.symmetry import align_to_symmetry, parse_symmetry
from metadata.images import write_mrc
from metadata.star import write_star

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 10


def resolve_input(ctx: JobContext, name: str) -> Path:
    fn = ctx.get(name)
    if not fn:
        raise UserError(f"{name}: no input file given")
    p = Path(str(fn))
    if not p.is_absolute():
        p = ctx.project_dir / p
    if not p.is_file():
        raise UserError(f"{name}: {p} does not exist")
    return p


def pick_xp(ctx: JobContext):
    if bool(ctx.get("use_gpu", False)) or str(ctx.get("gpu_ids", "") or "").strip():
        if be.gpu_available():
            ctx.info("running on the GPU")
            return be.get_xp("gpu")
        ctx.warning("a GPU was requested but none is usable; running on the CPU")
    return np


def check_symmetry(name: str) -> str:
    try:
        parse_symmetry(name)
    except ComputeError as exc:
        raise UserError(f"sym_name: {exc}") from None
    return str(name).strip().upper()


def shell_table(box: int, px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shells = np.arange(box // 2 + 1)
    with np.errstate(divide="ignore"):
        ang = np.where(shells > 0, box * px / np.maximum(shells, 1e-9), 999.0)
    return shells, shells / (box * px), ang


def particle_rows(src: StarParticles, keep: np.ndarray) -> pd.DataFrame:
    rows = src.blocks.get("particles")
    if rows is None:
        rows = next(iter(src.blocks.values()))
    return rows.reset_index(drop=True).loc[keep].copy()


def write_data_star(path: Path, src: StarParticles, keep, columns: dict) -> None:
    rows = particle_rows(src, keep)
    for k, v in columns.items():
        rows[k] = np.asarray(v)[keep]
    blocks: dict[str, object] = {}
    if "optics" in src.blocks:
        blocks["optics"] = src.blocks["optics"]
    blocks["particles"] = rows
    write_star(path, blocks)


class InitialModelJob(Job):
    options = [
        Option("fn_img", "", "path", "input particles.star"),
        Option("nr_classes", "3", "int", "number of classes K"),
        Option("nr_iter", "200", "int", "VDAM mini-batches"),
        Option("tau_fudge", "4", "float", "regularisation parameter T"),
        Option("sym_name", "C1", "str", "point group the final model is aligned to"),
        Option("particle_diameter", "200", "float", "mask diameter (A)"),
        Option("do_solvent", "Yes", "bool", "flatten the solvent (spherical mask)"),
        Option("do_ctf_correction", "Yes", "bool", "use the CTFs"),
        Option("offset_range", "6", "float", "offset search range (pixels)"),
        Option("offset_step", "2", "float", "offset search step (pixels)"),
        Option("sampling", "15 degrees", "str", "initial angular sampling (adaptive anyway)"),
        Option("gpu_ids", "", "str", "GPU to use"),
        Option("use_gpu", "No", "bool", "run on a GPU"),
        Option("random_seed", "1", "int", "random seed"),
    ]
    input_options = ["fn_img"]

    def run(self, ctx: JobContext) -> None:
        star = resolve_input(ctx, "fn_img")
        sym = check_symmetry(ctx.get("sym_name", "C1"))
        need_ctf = bool(ctx.get("do_ctf_correction", True))
        src = StarParticles(star, ctx.project_dir, need_ctf)
        ctx.add_input_node(star, "ParticlesData.star.relion")
        be.set_workers(ctx.threads)
        params = InitialModelParams(
            n_classes=int(ctx.get("nr_classes", 3)), n_iter=int(ctx.get("nr_iter", 200)),
            tau_fudge=float(ctx.get("tau_fudge", 4.0)),
            particle_diameter_a=float(ctx.get("particle_diameter", 200.0)),
            offset_range_px=float(ctx.get("offset_range", 6.0)),
            offset_step_px=float(ctx.get("offset_step", 2.0)), do_ctf=need_ctf,
            seed=int(ctx.get("random_seed", 1)))
        if params.offset_step_px <= 0 or params.offset_range_px < 0:
            raise UserError("offset_step must be > 0 and offset_range >= 0")
        if params.n_iter < 1:
            raise UserError("nr_iter must be at least 1")
        if src.box % 2:
            raise UserError(f"{star}: the particles' box ({src.box}) must be even for 3D")
        try:
            im = InitialModel3D(src, params, xp=pick_xp(ctx))
        except ComputeError as exc:
            raise UserError(f"{star}: {exc}") from None
        writer = InitialModelWriter(ctx, src, im)
        last = writer.latest_state()
        final_done = False
        if last is not None:
            ctx.info("continuing from %s", last.name)
            with np.load(last) as d:
                arrays = {k: d[k] for k in d.files}
            im.restore(arrays)
            final_done = bool(arrays.get("final_done", False))
        else:
            im.initialise()
        while not im.done:
            ctx.check_abort()
            info = im.step()
            ctx.progress(info.iteration, info.n_total, "mini-batch")
            if info.replaced:
                ctx.info("mini-batch %d: inactive class(es) replaced: %s", info.iteration,
                         ", ".join(f"{a + 1}<-{b + 1}" for a, b in info.replaced))
            if info.iteration % CHECKPOINT_EVERY == 0 and not im.done:
                writer.write(info.iteration)
        if not final_done:
            ctx.info("final assignment pass over %d particles", src.n_particles)
            im.final_pass(progress=lambda d, t: (ctx.check_abort(),
                                                 ctx.progress(d, t, "final pass")))
        out = writer.write(im.iteration, final=True)
        counts = np.bincount(im.results.class_index[im.results.class_index >= 0],
                             minlength=im.state.n_classes)
        best = int(np.argmax(counts))
        vol = im.class_volume(best)
        ctx.info("class %d has most particles (%d of %d)", best + 1, counts[best], src.n_particles)
        if sym != "C1":
            ctx.check_abort()
            vol, placement, score = align_to_symmetry(vol, sym)
            ctx.info("aligned to %s symmetry axes (self-correlation %.3f)", sym, score)
        ini = ctx.path("initial_model.mrc")
        write_mrc(ini, vol, pixel_size_a=src.pixel_size_a)
        ctx.info("mini-batches took %.1f s in total", im.total_seconds)
        ctx.add_output_node(out["optimiser"], "ProcessData.star.relion.optimiser.initialmodel")
        ctx.add_output_node(out["data"], "ParticlesData.star.relion.initialmodel")
        ctx.add_output_node(ini, "DensityMap.mrc.relion.initialmodel")


class InitialModelWriter:
    """RELION 4 output files of an initial-model run, plus the resume state."""

    def __init__(self, ctx: JobContext, src: StarParticles, im: InitialModel3D) -> None:
        self.ctx, self.src, self.im = ctx, src, im

    def latest_state(self) -> Path | None:
        return latest_vdam_state(self.ctx.out_dir)

    def write(self, iteration: int, final: bool = False) -> dict[str, Path]:
        ctx, im, src = self.ctx, self.im, self.src
        root = f"run_it{iteration:03d}"
        px, box = src.pixel_size_a, src.box
        st = im.state
        K = st.n_classes
        paths = {k: ctx.path(f"{root}_{k}.star") for k in ("model", "data", "optimiser")}
        maps = []
        for k in range(K):
            p = ctx.path(f"{root}_class{k + 1:03d}.mrc")
            write_mrc(p, im.class_volume(k), pixel_size_a=px)
            maps.append(p)
        res = im.results
        good = res.class_index >= 0
        step = im.estep.last_step_deg if hasattr(im.estep, "last_step_deg") else 15.0
        acc_rot = np.full(K, 999.0)
        acc_tr = np.full(K, 999.0)
        for k in range(K):
            sel = good & (res.class_index == k)
            if sel.any():
                pm = float(res.max_prob[sel].mean())
                acc_rot[k] = step * (2.0 - pm)
                acc_tr[k] = im.params.offset_step_px * px * (2.0 - pm)
        shells, s_inv, s_ang = shell_table(box, px)
        completeness = np.array([float(np.mean(f[1:int(im.r_max) + 1] > 0.5)) for f in st.fsc])
        classes = pd.DataFrame({
            "rlnReferenceImage": [ctx.rel(p) for p in maps],
            "rlnClassDistribution": st.class_frac,
            "rlnAccuracyRotations": acc_rot,
            "rlnAccuracyTranslationsAngst": acc_tr,
            "rlnEstimatedResolution": im.class_resolution_a(),
            "rlnOverallFourierCompleteness": completeness,
            "rlnClassPriorOffsetX": np.zeros(K), "rlnClassPriorOffsetY": np.zeros(K),
        })
        general = {
            "rlnReferenceDimensionality": 3, "rlnDataDimensionality": 2,
            "rlnOriginalImageSize": box, "rlnCurrentResolution": float(
                box * px / max(im.resolution_shell(), 1)),
            "rlnCurrentImageSize": int(2 * im.r_max), "rlnPixelSize": px, "rlnNrClasses": K,
            "rlnNrBodies": 1, "rlnNrGroups": 1, "rlnNrOpticsGroups": 1,
            "rlnTau2FudgeFactor": im.params.tau_fudge, "rlnNormCorrectionAverage": 1.0,
            "rlnSigmaOffsetsAngst": im.params.offset_range_px * px / 3.0,
            "rlnOrientationalPriorMode": 0,
            "rlnLogLikelihood": float(res.log_likelihood[good].sum()),
            "rlnAveragePmax": float(res.max_prob[good].mean()) if good.any() else 0.0,
        }
        blocks: dict[str, object] = {"model_general": general, "model_classes": classes}
        for k in range(K):
            f = np.clip(st.fsc[k], 0.0, 0.999)
            blocks[f"model_class_{k + 1}"] = pd.DataFrame({
                "rlnSpectralIndex": shells, "rlnResolution": s_inv,
                "rlnAngstromResolution": s_ang, "rlnSsnrMap": f / (1.0 - f),
                "rlnGoldStandardFsc": st.fsc[k],
                "rlnFourierCompleteness": (shells <= im.r_max).astype(float)})
        blocks["model_optics_group_1"] = pd.DataFrame({
            "rlnSpectralIndex": shells, "rlnResolution": s_inv, "rlnSigma2Noise": st.sigma2})
        write_star(paths["model"], blocks)
        write_data_star(paths["data"], src, good, {
            "rlnClassNumber": res.class_index + 1, "rlnAngleRot": res.rot,
            "rlnAngleTilt": res.tilt, "rlnAnglePsi": res.psi,
            "rlnOriginXAngst": res.origin_x_px * px, "rlnOriginYAngst": res.origin_y_px * px,
            "rlnMaxValueProbDistribution": res.max_prob,
            "rlnNrOfSignificantSamples": res.n_significant,
            "rlnLogLikeliContribution": res.log_likelihood, "rlnRandomSubset": im.halves})
        state_path = ctx.path(f"{root}_vdam_state.npz")
        arrays = im.checkpoint()
        arrays["final_done"] = np.array(bool(final))
        tmp = state_path.with_name(f".{state_path.name}.tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(state_path)
        opt = {
            "rlnOutputRootName": ctx.rel(ctx.path("run")),
            "rlnModelStarFile": ctx.rel(paths["model"]),
            "rlnExperimentalDataStarFile": ctx.rel(paths["data"]),
            "rlnCurrentIteration": iteration, "rlnNumberOfIterations": im.params.n_iter,
            "rlnDoGradientRefine": 1, "rlnParticleDiameter": im.params.particle_diameter_a,
            "rlnDoCorrectCtf": int(im.params.do_ctf), "rlnTau2FudgeFactor": im.params.tau_fudge,
            "rlnRandomSeed": im.params.seed, "rlnOffsetRange": im.params.offset_range_px,
            "rlnOffsetStep": im.params.offset_step_px,
            "rlnClassInactivityThreshold": im.params.inactivity_threshold,
            "scsVdamStateFile": ctx.rel(state_path),
        }
        write_star(paths["optimiser"], {"optimiser_general": opt})
        return paths


JOB = InitialModelJob
