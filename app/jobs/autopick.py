"""relion.autopick: Laplacian-of-Gaussian picking (or Topaz, when installed) per micrograph.

Inputs: ``fn_input_autopick`` (a micrographs STAR file with an optics table, e.g. from
CtfFind or Select). Outputs, as RELION 4 writes them:

- one coordinate file per micrograph, ``AutoPick/jobNNN/<mic path>_autopick.star`` where
  ``<mic path>`` is the micrograph's path with its ``<Type>/jobNNN/`` prefix removed and no
  extension (``MotionCorr/job002/Movies/a.mrc`` -> ``AutoPick/job005/Movies/a_autopick.star``),
  with ``rlnCoordinateX/Y`` (pixels), ``rlnClassNumber``, ``rlnAutopickFigureOfMerit``,
  ``rlnAnglePsi``;
- ``autopick.star``: table ``coordinate_files`` (``rlnMicrographName``,
  ``rlnMicrographCoordinates``) listing every micrograph with a coordinate file.

``continue`` picks only micrographs without a coordinate file yet.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from app.errors import UserError
from app.jobs.base import Job, JobContext, Option, Unsupported
from compute import backend as be
from compute.ctf import CtfParams
from compute.pick import LogPickerSettings, Picks, pick_log
from metadata.images import mrc_pixel_size, read_mrc
from metadata.star import read_star, resolve_path, write_star

#: RELION 4 node types
MICS_NODE = "MicrographGroupMetadata.star.relion"
COORDS_NODE = "MicrographsCoords.star.relion.autopick"

_JOB_PREFIX = re.compile(r"^(?:.*?/)?job\d+/(.+)$")


def relion_post_name(mic_name: str) -> str:
    """A micrograph path without its ``<Type>/jobNNN/`` prefix and extension (RELION's
    ``decomposePipelineFileName`` + ``withoutExtension``)."""
    name = str(mic_name).replace("\\", "/")
    m = _JOB_PREFIX.match(name)
    post = m.group(1) if m else name.lstrip("/")
    p = Path(post)
    return str(p.with_suffix("")) if p.suffix else post


def read_micrographs(path: str | Path, ctx: JobContext, option: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(micrograph rows with optics columns merged in, optics table or None)."""
    if not str(path).strip():
        raise UserError(f"option {option}: no micrographs STAR file given")
    p = resolve_path(str(path), project_dir=ctx.project_dir)
    blocks = read_star(p)
    if "micrographs" not in blocks:
        raise UserError(f"{p}: no data_micrographs table (option {option}); tables present: "
                        f"{', '.join(blocks) or 'none'}")
    mics = blocks["micrographs"].copy()
    if "rlnMicrographName" not in mics.columns:
        raise UserError(f"{p}: data_micrographs has no rlnMicrographName column")
    optics = blocks.get("optics")
    if optics is not None and "rlnOpticsGroup" in mics.columns and "rlnOpticsGroup" in optics:
        extra = [c for c in optics.columns if c not in mics.columns or c == "rlnOpticsGroup"]
        mics = mics.merge(optics[extra], on="rlnOpticsGroup", how="left")
    return mics, optics


def micrograph_pixel_size(row: pd.Series, mic_path: Path) -> float:
    """Pixel size from the STAR row (rlnMicrographPixelSize), else the MRC header."""
    for col in ("rlnMicrographPixelSize", "rlnImagePixelSize"):
        v = row.get(col)
        if v is not None and np.isfinite(float(v)) and float(v) > 0:
            return float(v)
    px = mrc_pixel_size(mic_path)
    if px is None:
        raise UserError(f"{mic_path}: no pixel size (no rlnMicrographPixelSize in the STAR file "
                        "and none in the MRC header)")
    return px


def micrograph_ctf(row: pd.Series) -> CtfParams | None:
    """The micrograph's CTF from its STAR row (with optics columns merged in), or None."""
    need = ("rlnDefocusU", "rlnDefocusV", "rlnVoltage", "rlnSphericalAberration")
    vals = {}
    for c in need:
        v = row.get(c)
        if v is None or not np.isfinite(float(v)):
            return None
        vals[c] = float(v)
    if vals["rlnDefocusU"] <= 0 or vals["rlnVoltage"] <= 0:
        return None

    def opt(col: str, default: float) -> float:
        v = row.get(col)
        return float(v) if v is not None and np.isfinite(float(v)) else default

    return CtfParams(vals["rlnDefocusU"], vals["rlnDefocusV"], opt("rlnDefocusAngle", 0.0),
                     vals["rlnVoltage"], vals["rlnSphericalAberration"],
                     opt("rlnAmplitudeContrast", 0.1), opt("rlnPhaseShift", 0.0), 0.0)


def coords_table(picks: Picks) -> pd.DataFrame:
    """A RELION 4 per-micrograph coordinate table for ``picks``."""
    n = len(picks)
    return pd.DataFrame({
        "rlnCoordinateX": np.round(picks.x_px, 2),
        "rlnCoordinateY": np.round(picks.y_px, 2),
        "rlnClassNumber": np.zeros(n, dtype=int),
        "rlnAutopickFigureOfMerit": np.round(picks.fom, 4),
        "rlnAnglePsi": np.full(n, -999.0),
    })


class AutopickJob(Job):
    options = [
        Option("fn_input_autopick", "", "path", "micrographs STAR file (CtfFind/Select output)"),
        Option("do_log", "Yes", "bool", "Laplacian-of-Gaussian picking"),
        Option("log_diam_min", "200", "float", "smallest particle diameter (Å)"),
        Option("log_diam_max", "250", "float", "largest particle diameter (Å)"),
        Option("log_invert", "No", "bool", "particles are white on a dark background"),
        Option("log_maxres", "20", "float", "low-pass filter before picking (Å)"),
        Option("log_adjust_thr", "0", "float", "threshold in std-devs above the mean "
               "(positive: fewer picks)"),
        Option("log_upper_thr", "999", "float", "drop picks more than this many std-devs "
               "above the mean"),
        Option("do_topaz", "No", "bool", "pick with Topaz (needs topaz-em and a model)"),
        Option("do_topaz_pick", "No", "bool", "RELION 4/5's name for do_topaz"),
        Option("topaz_model", "", "path", "trained Topaz model"),
        Option("topaz_particle_diameter", "-1", "float", "particle diameter for Topaz (Å)"),
        Option("topaz_nr_particles", "-1", "int", "expected particles per micrograph (Topaz)"),
        Option("topaz_threshold", "-6", "float", "Topaz score threshold (log-likelihood)"),
    ]
    input_options = ["fn_input_autopick"]
    unsupported = [
        Unsupported("do_amyloid", ("no",), "amyloid picking (RELION 5)"),
        Unsupported("do_topaz_train", ("no",), "training a Topaz model"),
        Unsupported("do_pick_helical_segments", ("no",), "picking helical segments"),
    ]

    def run(self, ctx: JobContext) -> None:
        mics, _ = read_micrographs(ctx.get("fn_input_autopick", ""), ctx, "fn_input_autopick")
        ctx.add_input_node(resolve_path(ctx["fn_input_autopick"], project_dir=ctx.project_dir),
                           MICS_NODE)
        do_topaz = bool(ctx.get("do_topaz", False)) or bool(ctx.get("do_topaz_pick", False))
        if not do_topaz and not ctx.get("do_log", True):
            raise UserError("relion.autopick: set do_log or do_topaz (template picking is not "
                            "supported)")
        settings = None
        if not do_topaz:
            settings = LogPickerSettings(
                diameter_min_a=float(ctx["log_diam_min"]), diameter_max_a=float(ctx["log_diam_max"]),
                maxres_a=float(ctx.get("log_maxres", 20.0)),
                adjust_threshold=float(ctx.get("log_adjust_thr", 0.0)),
                upper_threshold=float(ctx.get("log_upper_thr", 999.0)),
                invert=bool(ctx.get("log_invert", False)))
        else:
            _check_topaz(ctx)

        names = [str(n) for n in mics["rlnMicrographName"]]
        coord_paths = {n: ctx.path(relion_post_name(n) + "_autopick.star") for n in names}
        todo = [i for i, n in enumerate(names)
                if not (ctx.is_continue and coord_paths[n].exists())]
        ctx.info("%d micrographs, %d to pick%s", len(names), len(todo),
                 " (continue)" if ctx.is_continue else "")
        total = 0
        with be.workers(ctx.threads):
            if do_topaz:
                total = _run_topaz(ctx, mics, todo, coord_paths)
            else:
                for k, i in enumerate(todo):
                    ctx.check_abort()
                    row = mics.iloc[i]
                    path = resolve_path(names[i], project_dir=ctx.project_dir)
                    img, _ = read_mrc(path)
                    px = micrograph_pixel_size(row, path)
                    picks = pick_log(img, px, settings, ctf=micrograph_ctf(row))
                    write_star(coord_paths[names[i]], {"": coords_table(picks)})
                    total += len(picks)
                    ctx.progress(k + 1, len(todo), "picked")
        ctx.info("%d particles picked from %d micrographs", total, len(todo))

        listed = [(n, ctx.rel(coord_paths[n])) for n in names if coord_paths[n].exists()]
        table = pd.DataFrame({"rlnMicrographName": [n for n, _ in listed],
                              "rlnMicrographCoordinates": [c for _, c in listed]})
        out = write_star(ctx.path("autopick.star"), {"coordinate_files": table})
        ctx.add_output_node(out, COORDS_NODE)


def _check_topaz(ctx: JobContext) -> None:
    if importlib.util.find_spec("topaz") is None:
        raise UserError("do_topaz: Topaz picking needs the optional topaz-em package, which is "
                        "not installed (pip install topaz-em); use LoG picking instead")
    model = str(ctx.get("topaz_model", "") or "").strip().strip('"')
    if not model:
        raise UserError("do_topaz: no topaz_model given (a trained Topaz model file is needed)")
    if not resolve_path(model, project_dir=ctx.project_dir).exists():
        raise UserError(f"topaz_model {model}: file not found")
    if float(ctx.get("topaz_particle_diameter", -1) or -1) <= 0:
        raise UserError("do_topaz: set topaz_particle_diameter (Å)")


def _run_topaz(ctx: JobContext, mics: pd.DataFrame, todo: list[int],
               coord_paths: dict[str, Path]) -> int:
    """Pick with ``topaz extract`` (run as a child process, argument list, no shell)."""
    model = resolve_path(str(ctx["topaz_model"]).strip('"'), project_dir=ctx.project_dir)
    total = 0
    names = [str(n) for n in mics["rlnMicrographName"]]
    for k, i in enumerate(todo):
        ctx.check_abort()
        path = resolve_path(names[i], project_dir=ctx.project_dir)
        px = micrograph_pixel_size(mics.iloc[i], path)
        # Topaz's general models expect ~8 Å pixels; scale to that
        scale = max(1, int(round(8.0 / px)))
        radius = max(1, int(round(float(ctx["topaz_particle_diameter"]) / 2.0 / px / scale)))
        with tempfile.TemporaryDirectory() as tmp:
            out_txt = Path(tmp) / "picks.txt"
            pre = Path(tmp) / "pre"
            pre.mkdir()
            _topaz(["preprocess", "-s", str(scale), "-o", str(pre), str(path)], path)
            small = sorted(pre.glob("*.mrc"))
            if not small:
                raise UserError(f"topaz preprocess wrote nothing for {path}")
            _topaz(["extract", "-m", str(model), "-r", str(radius), "-x", str(scale),
                    "-t", str(float(ctx.get("topaz_threshold", -6.0))), "-o", str(out_txt),
                    str(small[0])], path)
            tab = pd.read_csv(out_txt, sep="\t")
        n_max = int(ctx.get("topaz_nr_particles", -1) or -1)
        tab = tab.sort_values("score", ascending=False)
        if n_max > 0:
            tab = tab.head(n_max)
        picks = Picks(tab["x_coord"].to_numpy(float), tab["y_coord"].to_numpy(float),
                      tab["score"].to_numpy(float),
                      np.full(len(tab), float(ctx["topaz_particle_diameter"])))
        write_star(coord_paths[names[i]], {"": coords_table(picks)})
        total += len(picks)
        ctx.progress(k + 1, len(todo), "picked (Topaz)")
    return total


def _topaz(args: list[str], mic: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "topaz", *args], capture_output=True, text=True,
                         check=False)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"topaz {args[0]} failed on {mic}: {tail[0]}")


JOB = AutopickJob
