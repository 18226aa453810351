"""relion.motioncorr: RELION's own motion correction per movie (:mod:`compute.motion`).

Outputs, in RELION 4's layout (``<rel>`` = the movie path relative to the project, without
extension, e.g. ``Movies/GridSquare_1/Data/FoilHole_2``):

- ``MotionCorr/jobNNN/<rel>.mrc`` — the dose-weighted sum (the plain sum when dose weighting is
  off), float16 (mode 12) when ``do_float16``; ``<rel>_noDW.mrc`` with ``do_save_noDW``;
- ``<rel>_PS.mrc`` — the tile-averaged power spectrum of the plain sum (centred, 512², for
  ``relion.ctffind`` with ``use_given_ps``);
- ``<rel>.star`` — per-movie metadata: ``data_general``, ``data_global_shift`` (frame,
  ``rlnMicrographShiftX/Y`` in unbinned pixels: the displacement of each frame relative to the
  first), ``data_local_shift`` (fitted patch trajectories) and ``data_hot_pixels``;
- ``corrected_micrographs.star`` — ``data_optics`` (input optics plus
  ``rlnMicrographPixelSize``) and ``data_micrographs`` (``rlnCtfPowerSpectrum``,
  ``rlnMicrographName``, ``rlnMicrographMetadata``, ``rlnOpticsGroup``,
  ``rlnAccumMotionTotal/Early/Late`` in Å, ``rlnMicrographNameNoDW``); movies that failed are
  listed in ``data_failed`` (``rlnMicrographMovieName``, ``scopesideFailureReason``,
  ``scopesideFileBytes``) and the job goes on.

``continue`` processes only movies not done yet (a failed movie is retried when its file
size changed, e.g. it was still being written); ``other_args`` ``--do_at_most N`` caps the
number of movies processed in one run.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from app.errors import UserError
from app.jobs.base import Job, JobContext, Option
from compute import backend as be
from compute.errors import ComputeError
from compute.motion import (
    MotionOptions,
    MotionResult,
    correct_motion,
    eer_gain,
    power_spectrum_for_ctf,
    transform_gain,
)
from metadata.errors import MetadataError
from metadata.frames import (
    DM_SUFFIXES,
    frame_range,
    movie_format,
    open_movie,
    read_defects,
    read_gain,
)
from metadata.images import write_mrc
from metadata.star import read_star, resolve_path, write_star

log = logging.getLogger(__name__)

MOVIES_NODE = "MicrographMovieGroupMetadata.star.relion"
MICS_NODE = "MicrographGroupMetadata.star.relion.motioncorr"
FAILED_TABLE = "failed"
REASON_COL = "scopesideFailureReason"
BYTES_COL = "scopesideFileBytes"
PS_BOX = 512


def do_at_most(ctx: JobContext) -> int | None:
    """``--do_at_most N`` from ``other_args`` (``None`` when absent or negative)."""
    m = re.search(r"--do_at_most[=\s]+(-?[0-9.eE+]+)", str(ctx.raw_options.get("other_args", "")))
    if not m:
        return None
    try:
        n = int(round(float(m.group(1))))
    except ValueError:
        raise UserError(f"other_args: --do_at_most needs a number, got {m.group(1)!r}") from None
    return n if n >= 0 else None


def output_stem(name: str) -> str:
    """Movie/micrograph path relative to the project, without a ``<Type>/jobNNN/`` prefix and
    without extension (absolute paths keep only the file name, under ``Movies/``)."""
    n = str(name).replace("\\", "/")
    m = re.match(r"^(?:.*?/)?job\d+/(.+)$", n)
    if m:
        n = m.group(1)
    p = Path(n)
    if p.is_absolute() or ".." in p.parts:
        p = Path("Movies") / p.name
    return str(p.with_suffix("")) if p.suffix else str(p)


def read_input(ctx: JobContext, option: str, table: str) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """(path, optics table, rows) of an input STAR file; clear errors for what is missing."""
    name = str(ctx.get(option, "") or "").strip()
    if not name:
        raise UserError(f"option {option}: no input STAR file given")
    p = resolve_path(name, project_dir=ctx.project_dir)
    blocks = read_star(p)
    if table not in blocks:
        raise UserError(f"{p}: no data_{table} table (option {option}); tables present: "
                        f"{', '.join(blocks) or 'none'}")
    if "optics" not in blocks:
        raise UserError(f"{p}: no data_optics table (RELION 3.1+ STAR file needed)")
    return p, blocks["optics"], blocks[table]


def optics_value(optics: pd.DataFrame, group: int, col: str, what: str, path) -> float:
    row = optics[optics["rlnOpticsGroup"] == group] if "rlnOpticsGroup" in optics else optics
    if row.empty or col not in row.columns:
        raise UserError(f"{path}: optics group {group} has no {col} ({what})")
    v = float(row.iloc[0][col])
    if not np.isfinite(v) or v <= 0:
        raise UserError(f"{path}: optics group {group} has an invalid {col} = {v}")
    return v


def choice_index(text: str, option: str, valid: range) -> int:
    """RELION's ``"90 degrees (1)"`` style choices or a bare number."""
    t = str(text).strip()
    m = re.search(r"\((-?\d+)\)\s*$", t)
    try:
        v = int(m.group(1)) if m else int(float(t or 0))
    except ValueError:
        raise UserError(f"option {option}: {text!r} is not one of {list(valid)}") from None
    if v not in valid:
        raise UserError(f"option {option}: {v} is not one of {list(valid)}")
    return v


def previous_outputs(star: Path, table: str, key: str) -> tuple[pd.DataFrame | None,
                                                                  pd.DataFrame | None]:
    """(done rows, failed rows) of an earlier run's output STAR, or (None, None)."""
    if not star.is_file():
        return None, None
    blocks = read_star(star)
    done = blocks.get(table)
    failed = blocks.get(FAILED_TABLE)
    if done is not None and key not in done.columns:
        done = None
    return done, failed


def star_safe(text: str) -> str:
    """A reason as one STAR token (starfile writes no quotes): whitespace becomes ``_``."""
    return re.sub(r"\s+", "_", str(text).strip()).replace('"', "'") or "unknown"


def file_bytes(p: Path) -> int:
    try:
        return int(p.stat().st_size)
    except OSError:
        return -1


class MotionCorrJob(Job):
    options = [
        Option("input_star_mics", "", "path", "movies STAR file from relion.import"),
        Option("first_frame_sum", "1", "int", "first frame to use (1-based)"),
        Option("last_frame_sum", "-1", "int", "last frame to use (<= 0: the last)"),
        Option("dose_per_frame", "1", "float", "dose per frame (e/Å²); per EER frame for EER"),
        Option("pre_exposure", "0", "float", "dose before the first frame (e/Å²)"),
        Option("eer_grouping", "32", "int", "EER raw frames summed into one frame"),
        Option("do_float16", "Yes", "bool", "write float16 (MRC mode 12) sums"),
        Option("do_dose_weighting", "Yes", "bool", "dose-weight the sum (Grant & Grigorieff)"),
        Option("do_save_noDW", "No", "bool", "also write the sum without dose weighting"),
        Option("do_save_ps", "Yes", "bool", "write the power spectrum for CTF estimation"),
        Option("group_for_ps", "4", "float", "dose per power-spectrum group (accepted; the "
               "spectrum is taken from the aligned plain sum)"),
        Option("bfactor", "150", "float",
               "B-factor of the patch alignment weighting (Å²); the whole-frame alignment "
               "weights by the data's own spectral SNR"),
        Option("group_frames", "1", "int", "frames summed together for alignment"),
        Option("bin_factor", "1", "float", "output binning (Fourier crop), 2 for super-res"),
        Option("fn_gain_ref", "", "path", "gain reference (multiplied into the frames)"),
        Option("gain_rot", "0", "str", "gain rotation: 0-3 quarter turns clockwise"),
        Option("gain_flip", "0", "str", "gain flip: 0 none, 1 upside down, 2 left-right"),
        Option("fn_defect", "", "path", "defect map (image or 'x y w h' text)"),
        Option("patch_x", "5", "int", "patches along x"),
        Option("patch_y", "5", "int", "patches along y"),
    ]
    input_options = ["input_star_mics"]

    def run(self, ctx: JobContext) -> None:
        be.set_workers(ctx.threads)
        in_path, optics, movies = read_input(ctx, "input_star_mics", "movies")
        if "rlnMicrographMovieName" not in movies.columns:
            raise UserError(f"{in_path}: data_movies has no rlnMicrographMovieName column")
        ctx.add_input_node(in_path, MOVIES_NODE)
        out_star = ctx.path("corrected_micrographs.star")
        done, failed = (previous_outputs(out_star, "micrographs", "rlnMicrographMovieName")
                        if ctx.is_continue else (None, None))
        done_names = set() if done is None else {str(v) for v in done["rlnMicrographMovieName"]}
        failed_bytes = {} if failed is None else {
            str(r["rlnMicrographMovieName"]): int(r.get(BYTES_COL, -1))
            for _, r in failed.iterrows()}

        todo = []
        for _, row in movies.iterrows():
            name = str(row["rlnMicrographMovieName"])
            if name in done_names:
                continue
            p = resolve_path(name, in_path, ctx.project_dir)
            if name in failed_bytes and failed_bytes[name] == file_bytes(p):
                continue
            todo.append(row)
        limit = do_at_most(ctx)
        if limit is not None and len(todo) > limit:
            ctx.info("--do_at_most %d: %d of %d new movies this time", limit, limit, len(todo))
            todo = todo[:limit]
        ctx.info("%d movies to process (%d done before)", len(todo), len(done_names))

        gain_cache: dict[tuple[int, int], np.ndarray] = {}
        gain_file = str(ctx.get("fn_gain_ref", "") or "").strip()
        raw_gain = (read_gain(resolve_path(gain_file, project_dir=ctx.project_dir))
                    if gain_file else None)
        self._gain_name = gain_file or "None"
        self._gain_is_tfs = gain_file.lower().endswith(".gain")  # Thermo Fisher, multiplicative
        if raw_gain is not None and Path(gain_file).suffix.lower() in DM_SUFFIXES:
            # RELION and MotionCor2 read MRC gain references, not Gatan's .dm4: keep an MRC
            # copy (as read, before gain_rot/gain_flip) and name it in the outputs
            copy = ctx.path("gain_reference.mrc")
            src = resolve_path(gain_file, project_dir=ctx.project_dir)
            if not copy.is_file() or copy.stat().st_mtime < Path(src).stat().st_mtime:
                write_mrc(copy, raw_gain)  # once, not on every continue of an on-the-fly run
                ctx.info("gain reference %s (DigitalMicrograph) copied to %s for "
                         "RELION-readable outputs", gain_file, ctx.rel(copy))
            self._gain_name = ctx.rel(copy)
        g_rot = choice_index(ctx.get("gain_rot", "0"), "gain_rot", range(4))
        g_flip = choice_index(ctx.get("gain_flip", "0"), "gain_flip", range(3))
        gain = transform_gain(raw_gain, g_rot, g_flip) if raw_gain is not None else None
        defect_file = str(ctx.get("fn_defect", "") or "").strip()

        new_rows, new_failed = [], []
        t0 = time.monotonic()
        for i, row in enumerate(todo):
            ctx.check_abort()
            name = str(row["rlnMicrographMovieName"])
            p = resolve_path(name, in_path, ctx.project_dir)
            try:
                rec = self._one(ctx, row, p, optics, in_path, gain, defect_file, gain_cache)
                new_rows.append(rec)
                ctx.info("%s: total motion %.1f Å", name, rec["rlnAccumMotionTotal"])
            except (MetadataError, ComputeError, UserError) as exc:
                reason = str(exc).replace("\n", " ")
                ctx.warning("%s FAILED: %s", name, reason)
                new_failed.append({"rlnMicrographMovieName": name, REASON_COL: star_safe(reason),
                                   BYTES_COL: file_bytes(p)})
            ctx.progress(i + 1, len(todo), "movies")
        if todo:
            ctx.info("%d movies in %.1f s", len(todo), time.monotonic() - t0)

        rows = [] if done is None else [r for _, r in done.iterrows()]
        mics = pd.DataFrame([*(dict(r) for r in rows), *new_rows])
        if mics.empty:
            mics = pd.DataFrame({c: [] for c in ("rlnMicrographName", "rlnMicrographMetadata",
                                                  "rlnOpticsGroup", "rlnAccumMotionTotal",
                                                  "rlnAccumMotionEarly", "rlnAccumMotionLate",
                                                  "rlnMicrographMovieName")})
        fails = {} if failed is None else {str(r["rlnMicrographMovieName"]): dict(r)
                                           for _, r in failed.iterrows()}
        for f in new_failed:
            fails[f["rlnMicrographMovieName"]] = f
        for r in new_rows:
            fails.pop(r["rlnMicrographMovieName"], None)
        out_optics = optics.copy()
        bin_f = float(ctx.get("bin_factor", 1.0) or 1.0)
        if "rlnMicrographOriginalPixelSize" in out_optics:
            out_optics["rlnMicrographPixelSize"] = (
                out_optics["rlnMicrographOriginalPixelSize"].astype(float) * max(bin_f, 1.0))
        blocks = {"optics": out_optics, "micrographs": mics}
        if fails:
            blocks[FAILED_TABLE] = pd.DataFrame(list(fails.values()))
        write_star(out_star, blocks)
        ctx.add_output_node(out_star, MICS_NODE)
        if todo and not new_rows and not done_names:
            raise UserError(f"all {len(todo)} movies failed; see {FAILED_TABLE} in {out_star}")

    # ----------------------------------------------------------------------------------------
    def _one(self, ctx: JobContext, row, path: Path, optics, in_path, gain, defect_file,
             gain_cache) -> dict:
        name = str(row["rlnMicrographMovieName"])
        group = int(row.get("rlnOpticsGroup", 1))
        px = optics_value(optics, group, "rlnMicrographOriginalPixelSize", "pixel size", in_path)
        kv = optics_value(optics, group, "rlnVoltage", "voltage", in_path)
        fmt = movie_format(path)
        eer_g = max(1, int(ctx.get("eer_grouping", 32) or 32))
        dose = ctx.get("dose_per_frame")
        dose = float(dose) * (eer_g if fmt == "eer" else 1) if dose else None
        pre = float(ctx.get("pre_exposure", 0.0) or 0.0)
        with open_movie(path, eer_grouping=eer_g) as mv:
            first = int(ctx.get("first_frame_sum", 1) or 1)
            frames = frame_range(mv, first, ctx.get("last_frame_sum", -1))
            shape = tuple(mv.frame_shape)
            defects = None
            if defect_file:
                key = ("defect", *shape)
                if key not in gain_cache:
                    gain_cache[key] = read_defects(
                        resolve_path(defect_file, project_dir=ctx.project_dir), shape)
                defects = gain_cache[key]
            opts = MotionOptions(
                pixel_size_a=px, dose_per_frame_e_a2=dose,
                pre_exposure_e_a2=pre + (first - 1) * (dose or 0.0), voltage_kv=kv,
                bfactor_a2=float(ctx.get("bfactor", 150.0)),
                patch_x=int(ctx.get("patch_x", 5)), patch_y=int(ctx.get("patch_y", 5)),
                group_frames=int(ctx.get("group_frames", 1) or 1),
                bin_factor=float(ctx.get("bin_factor", 1.0) or 1.0),
                do_dose_weighting=bool(ctx.get("do_dose_weighting", True)))

            def note(stage: str) -> None:
                ctx.check_abort()

            if gain is not None and fmt == "tiff" and self._gain_is_tfs:
                # a Thermo Fisher .gain is a TIFF: with TIFF movies it is flipped like them
                key = ("tiff-gain", *shape)
                if key not in gain_cache:
                    gain_cache[key] = gain[::-1].copy()
                gain = gain_cache[key]
            if gain is not None and fmt == "eer":
                key = ("eer-gain", *shape)
                if key not in gain_cache:
                    # RELION's EER rules: an 8K gain for 4K frames is binned; a gain file
                    # other than Thermo Fisher's multiplicative .gain is inverted
                    gain_cache[key] = eer_gain(gain, shape, multiplicative=self._gain_is_tfs)
                gain = gain_cache[key]
            res = correct_motion(frames, opts, gain=gain, defect_mask=defects, progress=note)
            n_frames = len(frames)
        stem = output_stem(name)
        out_mic = ctx.path(stem + ".mrc")
        f16 = bool(ctx.get("do_float16", True))
        main = res.dose_weighted if res.dose_weighted is not None else res.non_weighted
        write_mrc(out_mic, main, res.pixel_size_a, float16=f16)
        rec = {"rlnMicrographName": ctx.rel(out_mic)}
        if res.dose_weighted is not None and bool(ctx.get("do_save_noDW", False)):
            nodw = ctx.path(stem + "_noDW.mrc")
            write_mrc(nodw, res.non_weighted, res.pixel_size_a, float16=f16)
            rec["rlnMicrographNameNoDW"] = ctx.rel(nodw)
        if bool(ctx.get("do_save_ps", True)):
            ps = be.to_numpy(power_spectrum_for_ctf(res.non_weighted, PS_BOX))
            ps_path = ctx.path(stem + "_PS.mrc")
            write_mrc(ps_path, ps, res.pixel_size_a, float16=False)
            rec = {"rlnCtfPowerSpectrum": ctx.rel(ps_path), **rec}
        meta = ctx.path(stem + ".star")
        self._write_metadata(meta, res, name, n_frames, shape, opts, first, kv, ctx,
                             self._gain_name)
        rec.update({
            "rlnMicrographMetadata": ctx.rel(meta),
            "rlnOpticsGroup": group,
            "rlnAccumMotionTotal": res.accum_motion_total_a,
            "rlnAccumMotionEarly": res.accum_motion_early_a,
            "rlnAccumMotionLate": res.accum_motion_late_a,
            "rlnMicrographMovieName": name,
        })
        return rec

    @staticmethod
    def _write_metadata(path: Path, res: MotionResult, movie: str, n: int, shape, opts,
                        first: int, kv: float, ctx: JobContext, gain_name: str = "None") -> None:
        general = {
            "rlnImageSizeX": int(shape[1]), "rlnImageSizeY": int(shape[0]), "rlnImageSizeZ": n,
            "rlnMicrographMovieName": movie,
            "rlnMicrographGainName": gain_name,
            "rlnMicrographBinning": float(opts.bin_factor),
            "rlnMicrographOriginalPixelSize": float(opts.pixel_size_a),
            "rlnMicrographDoseRate": float(opts.dose_per_frame_e_a2 or 0.0),
            "rlnMicrographPreExposure": float(opts.pre_exposure_e_a2),
            "rlnVoltage": float(kv), "rlnMicrographStartFrame": int(first),
            # 0 = no RELION polynomial model; our fitted patch trajectories are in local_shift
            "rlnMotionModelVersion": 0,
        }
        blocks: dict = {"general": general}
        s = res.shifts_px
        blocks["global_shift"] = pd.DataFrame({
            "rlnMicrographFrameNumber": np.arange(1, n + 1),
            "rlnMicrographShiftX": s[:, 1], "rlnMicrographShiftY": s[:, 0]})
        if res.local_model is not None and res.patch_centres_px is not None:
            c = res.patch_centres_px
            fr = np.arange(n)
            tot = np.stack([res.model_shifts_px(c, f) for f in fr], axis=1)  # (P, n, 2)
            blocks["local_shift"] = pd.DataFrame({
                "rlnMicrographFrameNumber": np.tile(fr + 1, len(c)),
                "rlnCoordinateX": np.repeat(c[:, 1], n), "rlnCoordinateY": np.repeat(c[:, 0], n),
                "rlnMicrographShiftX": tot[..., 1].ravel(),
                "rlnMicrographShiftY": tot[..., 0].ravel()})
        d = res.defect_yx[:100_000]
        if len(d):
            blocks["hot_pixels"] = pd.DataFrame({"rlnCoordinateX": d[:, 1].astype(float),
                                                 "rlnCoordinateY": d[:, 0].astype(float)})
        write_star(path, blocks)


JOB = MotionCorrJob
