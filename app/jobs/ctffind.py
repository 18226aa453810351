"""relion.ctffind: CTFFIND4-like CTF estimation per micrograph (:mod:`compute.ctffind`).

Input ``input_star_mics`` (``corrected_micrographs.star``). With ``use_given_ps`` and a
``rlnCtfPowerSpectrum`` column, the power spectrum written by motion correction is fitted
directly; otherwise the spectrum is computed from the micrograph (``rlnMicrographNameNoDW``
with ``use_noDW``) in ``box``-pixel tiles.

Outputs (``<rel>`` = micrograph path without its ``<Type>/jobNNN/`` prefix and extension):

- ``CtfFind/jobNNN/<rel>.ctf`` — diagnostic image (MRC): flattened spectrum left, model right;
- ``CtfFind/jobNNN/<rel>.txt`` — one line in CTFFIND4's output layout;
- ``micrographs_ctf.star`` — the input optics table and every input column plus
  ``rlnCtfImage`` (``<rel>.ctf:mrc``), ``rlnDefocusU``, ``rlnDefocusV``,
  ``rlnCtfAstigmatism``, ``rlnDefocusAngle``, ``rlnCtfFigureOfMerit``,
  ``rlnCtfMaxResolution`` and ``rlnPhaseShift`` (with ``do_phaseshift``); micrographs whose
  estimation failed are listed in ``data_failed`` with the reason, and the job goes on.

``continue`` estimates only micrographs not done yet; ``--do_at_most N`` in ``other_args``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from app.errors import UserError
from app.jobs.base import Job, JobContext, Option
from app.jobs.motioncorr import (
    BYTES_COL,
    FAILED_TABLE,
    REASON_COL,
    do_at_most,
    file_bytes,
    optics_value,
    output_stem,
    previous_outputs,
    read_input,
    star_safe,
)
from compute import backend as be
from compute.ctffind import (
    CtfFit,
    CtfSearch,
    diagnostic_image,
    estimate_ctf_from_spectrum,
    half_from_full,
)
from compute.errors import ComputeError
from metadata.errors import MetadataError
from metadata.images import read_mrc, write_mrc
from metadata.star import resolve_path, write_star

MICS_IN_NODE = "MicrographGroupMetadata.star.relion.motioncorr"
CTF_NODE = "MicrographGroupMetadata.star.relion.ctf"


class CtfFindJob(Job):
    options = [
        Option("input_star_mics", "", "path", "micrographs STAR file from motion correction"),
        Option("use_noDW", "No", "bool", "estimate on the sums without dose weighting"),
        Option("do_phaseshift", "No", "bool", "fit a phase shift (phase plate)"),
        Option("phase_min", "0", "float", "minimum phase shift (degrees)"),
        Option("phase_max", "180", "float", "maximum phase shift (degrees)"),
        Option("phase_step", "10", "float", "phase-shift search step (degrees)"),
        Option("dast", "100", "float", "expected astigmatism (Å)"),
        Option("box", "512", "int", "tile size of the power spectrum (pixels)"),
        Option("resmin", "30", "float", "lowest resolution in the fit (Å)"),
        Option("resmax", "5", "float", "highest resolution in the fit (Å)"),
        Option("dfmin", "5000", "float", "minimum defocus (Å)"),
        Option("dfmax", "50000", "float", "maximum defocus (Å)"),
        Option("dfstep", "500", "float", "defocus search step (Å)"),
        Option("use_given_ps", "Yes", "bool", "use the power spectra from motion correction"),
    ]
    input_options = ["input_star_mics"]

    def run(self, ctx: JobContext) -> None:
        be.set_workers(ctx.threads)
        in_path, optics, mics = read_input(ctx, "input_star_mics", "micrographs")
        if "rlnMicrographName" not in mics.columns:
            raise UserError(f"{in_path}: data_micrographs has no rlnMicrographName column")
        ctx.add_input_node(in_path, MICS_IN_NODE)
        out_star = ctx.path("micrographs_ctf.star")
        done, failed = (previous_outputs(out_star, "micrographs", "rlnMicrographName")
                        if ctx.is_continue else (None, None))
        done_names = set() if done is None else {str(v) for v in done["rlnMicrographName"]}
        failed_bytes = {} if failed is None else {
            str(r["rlnMicrographName"]): int(r.get(BYTES_COL, -1)) for _, r in failed.iterrows()}
        todo = []
        for _, row in mics.iterrows():
            name = str(row["rlnMicrographName"])
            if name in done_names:
                continue
            if name in failed_bytes and failed_bytes[name] == file_bytes(
                    resolve_path(name, in_path, ctx.project_dir)):
                continue
            todo.append(row)
        limit = do_at_most(ctx)
        if limit is not None and len(todo) > limit:
            todo = todo[:limit]
        ctx.info("%d micrographs to process (%d done before)", len(todo), len(done_names))
        do_phase = bool(ctx.get("do_phaseshift", False))

        new_rows, new_failed = [], []
        t0 = time.monotonic()
        for i, row in enumerate(todo):
            ctx.check_abort()
            name = str(row["rlnMicrographName"])
            try:
                rec = self._one(ctx, row, optics, in_path, do_phase)
                new_rows.append(rec)
                ctx.info("%s: defocus %.0f/%.0f Å, angle %.1f°, max res %.2f Å, FOM %.3f", name,
                         rec["rlnDefocusU"], rec["rlnDefocusV"], rec["rlnDefocusAngle"],
                         rec["rlnCtfMaxResolution"], rec["rlnCtfFigureOfMerit"])
            except (MetadataError, ComputeError, UserError) as exc:
                reason = str(exc).replace("\n", " ")
                ctx.warning("%s FAILED: %s", name, reason)
                new_failed.append({"rlnMicrographName": name, REASON_COL: star_safe(reason),
                                   BYTES_COL: file_bytes(resolve_path(name, in_path,
                                                                      ctx.project_dir))})
            ctx.progress(i + 1, len(todo), "micrographs")
        if todo:
            ctx.info("%d micrographs in %.1f s", len(todo), time.monotonic() - t0)

        rows = [] if done is None else [dict(r) for _, r in done.iterrows()]
        out = pd.DataFrame([*rows, *new_rows])
        if out.empty:
            out = pd.DataFrame({c: [] for c in ("rlnMicrographName", "rlnCtfImage", "rlnDefocusU",
                                                "rlnDefocusV", "rlnCtfAstigmatism",
                                                "rlnDefocusAngle", "rlnCtfFigureOfMerit",
                                                "rlnCtfMaxResolution")})
        fails = {} if failed is None else {str(r["rlnMicrographName"]): dict(r)
                                           for _, r in failed.iterrows()}
        for f in new_failed:
            fails[f["rlnMicrographName"]] = f
        for r in new_rows:
            fails.pop(r["rlnMicrographName"], None)
        blocks = {"optics": optics, "micrographs": out}
        if fails:
            blocks[FAILED_TABLE] = pd.DataFrame(list(fails.values()))
        write_star(out_star, blocks)
        ctx.add_output_node(out_star, CTF_NODE)
        if todo and not new_rows and not done_names:
            raise UserError(f"all {len(todo)} micrographs failed; see {FAILED_TABLE} in "
                            f"{out_star}")

    def _one(self, ctx: JobContext, row, optics, in_path, do_phase: bool) -> dict:
        group = int(row.get("rlnOpticsGroup", 1))
        px = None
        for col in ("rlnMicrographPixelSize", "rlnMicrographOriginalPixelSize"):
            if col in optics.columns:
                px = optics_value(optics, group, col, "pixel size", in_path)
                break
        if px is None:
            raise UserError(f"{in_path}: optics table has no rlnMicrographPixelSize")
        s = CtfSearch(
            pixel_size_a=px,
            voltage_kv=optics_value(optics, group, "rlnVoltage", "voltage", in_path),
            cs_mm=float(optics[optics["rlnOpticsGroup"] == group].iloc[0].get(
                "rlnSphericalAberration", 2.7)),
            amplitude_contrast=float(optics[optics["rlnOpticsGroup"] == group].iloc[0].get(
                "rlnAmplitudeContrast", 0.1)),
            box=int(ctx.get("box", 512)), res_min_a=float(ctx.get("resmin", 30.0)),
            res_max_a=float(ctx.get("resmax", 5.0)),
            defocus_min_a=float(ctx.get("dfmin", 5000.0)),
            defocus_max_a=float(ctx.get("dfmax", 50000.0)),
            defocus_step_a=float(ctx.get("dfstep", 500.0)),
            expected_astig_a=float(ctx.get("dast", 100.0)),
            do_phase_shift=do_phase, phase_min_deg=float(ctx.get("phase_min", 0.0)),
            phase_max_deg=float(ctx.get("phase_max", 180.0)),
            phase_step_deg=float(ctx.get("phase_step", 10.0)))
        name = str(row["rlnMicrographName"])
        ps_col = row.get("rlnCtfPowerSpectrum")
        if bool(ctx.get("use_given_ps", True)) and isinstance(ps_col, str) and ps_col.strip():
            ps, _ = read_mrc(resolve_path(ps_col, in_path, ctx.project_dir))
            if ps.ndim == 3:
                ps = ps[0]
            if ps.shape[0] != ps.shape[1]:
                raise ComputeError(f"power spectrum {ps_col} is not square: {ps.shape}")
            half = half_from_full(np.fft.ifftshift(ps))
            s = CtfSearch(**{**s.__dict__, "box": int(ps.shape[0])})
            fit = estimate_ctf_from_spectrum(half, s)
        else:
            src = name
            if bool(ctx.get("use_noDW", False)):
                nodw = row.get("rlnMicrographNameNoDW")
                if not isinstance(nodw, str) or not nodw.strip():
                    raise UserError(f"use_noDW is Yes but {in_path} has no "
                                    f"rlnMicrographNameNoDW for {name}")
                src = nodw
            img, _ = read_mrc(resolve_path(src, in_path, ctx.project_dir))
            if img.ndim == 3:
                img = img[0]
            from compute.ctffind import tile_power_spectrum  # noqa: PLC0415

            half = tile_power_spectrum(img, s.box, s.tile_overlap)
            s = CtfSearch(**{**s.__dict__, "box": int(half.shape[0])})
            fit = estimate_ctf_from_spectrum(half, s)
        stem = output_stem(name)
        diag = ctx.path(stem + ".ctf")
        write_mrc(diag, be.to_numpy(diagnostic_image(half, s, fit)), px)
        self._write_txt(ctx.path(stem + ".txt"), name, fit, s)
        rec = {k: row[k] for k in row.index if not str(k).startswith("rlnCtf")
               and k not in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift")}
        rec.update({
            "rlnCtfImage": ctx.rel(diag) + ":mrc",
            "rlnDefocusU": fit.defocus_u_a, "rlnDefocusV": fit.defocus_v_a,
            "rlnCtfAstigmatism": fit.astigmatism_a, "rlnDefocusAngle": fit.defocus_angle_deg,
            "rlnCtfFigureOfMerit": fit.figure_of_merit,
            "rlnCtfMaxResolution": fit.max_resolution_a,
        })
        if "rlnCtfPowerSpectrum" in row.index:
            rec["rlnCtfPowerSpectrum"] = row["rlnCtfPowerSpectrum"]
        if do_phase:
            rec["rlnPhaseShift"] = fit.phase_shift_deg
        return rec

    @staticmethod
    def _write_txt(path: Path, name: str, fit: CtfFit, s: CtfSearch) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        phase = np.deg2rad(fit.phase_shift_deg or 0.0)
        path.write_text(
            f"# scopeside CTF estimate for {name}\n"
            f"# Pixel size: {s.pixel_size_a:.3f} Angstroms ; acceleration voltage: "
            f"{s.voltage_kv:.1f} keV ; spherical aberration: {s.cs_mm:.2f} mm ; amplitude "
            f"contrast: {s.amplitude_contrast:.2f}\n"
            "# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; #3 - defocus 2; "
            "#4 - azimuth of astigmatism; #5 - additional phase shift [radians]; "
            "#6 - cross correlation; #7 - spacing (in Angstroms) up to which CTF rings were "
            "fit successfully\n"
            f"1.000000 {fit.defocus_u_a:.6f} {fit.defocus_v_a:.6f} {fit.defocus_angle_deg:.6f} "
            f"{phase:.6f} {fit.figure_of_merit:.6f} {fit.max_resolution_a:.6f}\n",
            encoding="utf-8")


JOB = CtfFindJob
