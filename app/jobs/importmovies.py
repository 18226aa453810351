"""relion.import: list movies (or micrographs) with their optics group, as RELION 4 does.

Output ``Import/jobNNN/movies.star`` (``is_multiframe`` Yes) with

- ``data_optics``: ``rlnOpticsGroupName``, ``rlnOpticsGroup``, ``rlnMtfFileName`` (when given),
  ``rlnMicrographOriginalPixelSize``, ``rlnVoltage``, ``rlnSphericalAberration``,
  ``rlnAmplitudeContrast`` (and ``rlnBeamTiltX/Y`` when non-zero);
- ``data_movies``: ``rlnMicrographMovieName``, ``rlnOpticsGroup``;

or ``micrographs.star`` (``data_micrographs``: ``rlnMicrographName``, optics with
``rlnMicrographPixelSize`` too) for single-frame micrographs. ``fn_in_raw`` is a glob relative
to the project directory. ``continue`` keeps the rows already listed and appends only files that
are new since the last run (in sorted order); no match at all is a warning, not a failure, so an
on-the-fly scheme can start before the first movie lands.
"""

from __future__ import annotations

import glob
from pathlib import Path, PureWindowsPath

import pandas as pd

from app.errors import UserError
from app.jobs.base import Job, JobContext, Option, Unsupported
from metadata.star import read_star, write_star

MOVIES_NODE = "MicrographMovieGroupMetadata.star.relion"
#: files the pattern matched that are not movies (SerialEM montages / image stacks)
SKIPPED_FILE = "skipped_not_movies.txt"
MICS_NODE = "MicrographGroupMetadata.star.relion"


class ImportJob(Job):
    options = [
        Option("fn_in_raw", "Movies/*.tiff", "path", "glob of the raw movies, relative to the "
               "project"),
        Option("is_multiframe", "Yes", "bool", "movies (Yes) or single-frame micrographs (No)"),
        Option("optics_group_name", "opticsGroup1", "str", "name of the optics group"),
        Option("fn_mtf", "", "path", "detector MTF STAR file (optional)"),
        Option("angpix", "1.4", "float", "pixel size of the raw movies (Å)"),
        Option("kV", "300", "float", "acceleration voltage (kV)"),
        Option("Cs", "2.7", "float", "spherical aberration (mm)"),
        Option("Q0", "0.1", "float", "amplitude contrast"),
        Option("beamtilt_x", "0", "float", "beam tilt x (mrad)"),
        Option("beamtilt_y", "0", "float", "beam tilt y (mrad)"),
    ]
    unsupported = [
        Unsupported("do_raw", ("yes",), "an import without raw movies/micrographs"),
        Unsupported("do_other", ("no",), "importing references, masks, coordinates or "
                    "half-maps (do_other)"),
    ]

    def run(self, ctx: JobContext) -> None:
        pattern = str(ctx.get("fn_in_raw", "")).strip()
        if not pattern:
            raise UserError("option fn_in_raw: give a file pattern such as Movies/*.tiff")
        px = ctx.get("angpix")
        if px is None or px <= 0:
            raise UserError(f"option angpix: pixel size must be positive, got {px}")
        multi = bool(ctx["is_multiframe"])
        name_col = "rlnMicrographMovieName" if multi else "rlnMicrographName"
        table = "movies" if multi else "micrographs"
        out = ctx.path("movies.star" if multi else "micrographs.star")

        root = Path(ctx.project_dir)
        pat = pattern if Path(pattern).is_absolute() else str(root / pattern)
        found = []
        for f in sorted(glob.glob(pat, recursive=True)):
            p = Path(f)
            if not p.is_file():
                continue
            found.append(ctx.rel(p) if not Path(pattern).is_absolute() else str(p))

        known: list[str] = []
        if ctx.is_continue and out.is_file():
            old = read_star(out)
            if table in old and name_col in old[table].columns:
                known = [str(v) for v in old[table][name_col]]
        seen = set(known)
        new = [f for f in found if f not in seen]
        if multi:
            # SerialEM maps/stacks beside the frames; remembered so a continue does not re-warn
            skip_file = ctx.path(SKIPPED_FILE)
            skipped = set(skip_file.read_text(encoding="utf-8").splitlines()) \
                if ctx.is_continue and skip_file.is_file() else set()
            kept, newly = [], []
            for f in new:
                if f in skipped:
                    continue
                why = _not_a_movie(Path(f) if Path(f).is_absolute() else root / f)
                if why:
                    ctx.warning("%s skipped: %s", f, why)
                    newly.append(f)
                else:
                    kept.append(f)
            if newly:
                skip_file.write_text("".join(f"{x}\n" for x in sorted(skipped | set(newly))),
                                     encoding="utf-8")
            new = kept
        names = known + new
        if not found:
            ctx.warning("no files match %s (yet)", pattern)
        ctx.info("%d %s listed (%d new)", len(names), table, len(new))

        optics = {
            "rlnOpticsGroupName": [str(ctx.get("optics_group_name", "opticsGroup1"))],
            "rlnOpticsGroup": [1],
        }
        mtf = str(ctx.get("fn_mtf", "") or "").strip()
        if mtf:
            optics["rlnMtfFileName"] = [mtf]
        optics["rlnMicrographOriginalPixelSize"] = [float(px)]
        if not multi:
            optics["rlnMicrographPixelSize"] = [float(px)]
        optics["rlnVoltage"] = [float(ctx.get("kV", 300.0))]
        optics["rlnSphericalAberration"] = [float(ctx.get("Cs", 2.7))]
        optics["rlnAmplitudeContrast"] = [float(ctx.get("Q0", 0.1))]
        bx, by = float(ctx.get("beamtilt_x", 0.0)), float(ctx.get("beamtilt_y", 0.0))
        if bx or by:
            optics["rlnBeamTiltX"] = [bx]
            optics["rlnBeamTiltY"] = [by]
        rows = pd.DataFrame({name_col: names, "rlnOpticsGroup": [1] * len(names)})
        write_star(out, {"optics": pd.DataFrame(optics), table: rows})
        ctx.add_output_node(out, MOVIES_NODE if multi else MICS_NODE)


def _not_a_movie(path: Path) -> str | None:
    """Why a file matched by the movie pattern is not a movie, from its SerialEM ``.mdoc``.

    SerialEM keeps navigator maps (montages) and tilt-series / anchor image stacks in the
    session folder beside the frames, all as ``.mrc``; their mdoc has ``[ZValue]`` sections
    (a movie's own mdoc has ``[FrameSet]``). ``None`` when it is a movie or cannot be told.
    """
    from metadata.errors import MetadataError
    from metadata.mdoc import parse_mdoc

    md = path.with_name(path.name + ".mdoc")
    if not md.is_file():
        return None
    try:
        m = parse_mdoc(md)
    except MetadataError:
        return None
    if m.is_frame_mdoc:
        return None
    if m.is_montage:
        return f"a montage ({len(m.sections)} pieces; {md.name})"
    if len(m.sections) > 1:
        return f"an image stack of {len(m.sections)} images ({md.name})"
    sfp = m.sections[0].sub_frame_path
    if sfp and PureWindowsPath(sfp).name != path.name:
        return f"an image whose frames are in {PureWindowsPath(sfp).name} ({md.name})"
    return None


JOB = ImportJob
