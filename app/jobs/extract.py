"""relion.extract: cut particles out of micrographs into per-micrograph MRC stacks.

Inputs: ``star_mics`` (micrographs STAR with CTF values, e.g. CtfFind's
``micrographs_ctf.star``) and ``coords_suffix`` (RELION 4: the picking job's
``autopick.star`` listing one coordinate file per micrograph).

Outputs, as RELION 4 writes them:

- ``Extract/jobNNN/<mic path>.mrcs`` (``<mic path>`` without the ``<Type>/jobNNN/`` prefix),
  float16 (MRC mode 12) unless ``do_float16`` is No (float32, which RELION 3.1 needs);
- ``particles.star`` with ``data_optics`` (``rlnImagePixelSize``, ``rlnImageSize``,
  ``rlnImageDimensionality``, voltage, Cs, amplitude contrast …) and ``data_particles``
  (coordinates, ``rlnImageName`` ``N@stack``, ``rlnMicrographName``, the micrograph's CTF
  values and figure of merit).

Picks whose box leaves the micrograph are dropped and counted. ``continue`` extracts only
micrographs without a stack yet, keeping the rows of those already done.
"""

from __future__ import annotations

import pandas as pd

from app.errors import UserError
from app.jobs.autopick import (
    COORDS_NODE,
    MICS_NODE,
    micrograph_pixel_size,
    read_micrographs,
    relion_post_name,
)
from app.jobs.base import Job, JobContext, Option, Unsupported
from compute import backend as be
from compute.extract import extract_particles
from metadata.images import read_mrc, write_mrc
from metadata.star import join_image_name, read_star, resolve_path, write_star

PARTICLES_NODE = "ParticleGroupMetadata.star.relion"
#: micrographs already extracted (those without particles have no stack to show it)
DONE_FILE = "extracted_micrographs.txt"

#: micrograph columns copied onto each particle (CTF and bookkeeping), when present
MIC_COLUMNS = ("rlnOpticsGroup", "rlnCtfMaxResolution", "rlnCtfFigureOfMerit", "rlnDefocusU",
               "rlnDefocusV", "rlnDefocusAngle", "rlnCtfBfactor", "rlnCtfScalefactor",
               "rlnPhaseShift")
#: optics columns carried from the micrographs' optics table
OPTICS_COLUMNS = ("rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize",
                  "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")


class ExtractJob(Job):
    options = [
        Option("star_mics", "", "path", "micrographs STAR file with CTF values"),
        Option("coords_suffix", "", "path", "autopick.star of the picking job"),
        Option("extract_size", "128", "int", "box size on the micrograph (pixels, even)"),
        Option("do_rescale", "No", "bool", "re-scale the particles"),
        Option("rescale", "128", "int", "re-scaled box size (pixels, even)"),
        Option("do_invert", "Yes", "bool", "invert contrast (protein white)"),
        Option("do_norm", "Yes", "bool", "normalise the background to mean 0, std 1"),
        Option("bg_diameter", "-1", "float", "background circle diameter (pixels, before "
               "re-scaling, as RELION); -1: 75 % of the box"),
        Option("white_dust", "-1", "float", "remove white dust beyond this many std-devs "
               "(-1: off)"),
        Option("black_dust", "-1", "float", "remove black dust beyond this many std-devs "
               "(-1: off)"),
        Option("do_float16", "Yes", "bool", "write float16 stacks (MRC mode 12)"),
        Option("do_fom_threshold", "No", "bool", "use only picks with a figure of merit above "
               "minimum_pick_fom"),
        Option("minimum_pick_fom", "0", "float", "minimum rlnAutopickFigureOfMerit"),
    ]
    input_options = ["star_mics", "coords_suffix"]
    unsupported = [
        Unsupported("do_reextract", ("no",), "re-extraction of refined particles"),
        Unsupported("do_extract_helix", ("no",), "helical segment extraction"),
    ]

    def run(self, ctx: JobContext) -> None:
        mics, optics = read_micrographs(ctx.get("star_mics", ""), ctx, "star_mics")
        star_mics = resolve_path(ctx["star_mics"], project_dir=ctx.project_dir)
        ctx.add_input_node(star_mics, MICS_NODE)
        coords = _coordinate_files(ctx)
        box = int(ctx.get("extract_size", 0) or 0)
        if box <= 0 or box % 2:
            raise UserError(f"extract_size must be a positive even number of pixels, got {box}")
        out_box = box
        if ctx.get("do_rescale", False):
            out_box = int(ctx.get("rescale", 0) or 0)
            if out_box <= 0 or out_box % 2:
                raise UserError(f"rescale must be a positive even number of pixels, got {out_box}")
        bg_diam = float(ctx.get("bg_diameter", -1) or -1)
        if bg_diam >= box:
            raise UserError(f"bg_diameter {bg_diam:g} px leaves no background in the "
                            f"{box}-px box")
        # RELION gives bg_diameter in pixels before re-scaling
        bg_radius_out = bg_diam / 2.0 * out_box / box if bg_diam > 0 else None
        float16 = bool(ctx.get("do_float16", True))
        fom_min = float(ctx.get("minimum_pick_fom", 0.0)) if ctx.get("do_fom_threshold") else None

        done_file = ctx.path(DONE_FILE)
        previous = _previous_rows(ctx) if ctx.is_continue else None
        done = set()
        if ctx.is_continue and done_file.exists():
            done = set(done_file.read_text(encoding="utf-8").split("\n")) - {""}
        names = [str(n) for n in mics["rlnMicrographName"]]
        stacks = {n: ctx.path(relion_post_name(n) + ".mrcs") for n in names}
        tables: list[pd.DataFrame] = []
        todo = []
        for i, n in enumerate(names):
            if n not in coords:
                continue
            if previous is not None and n in previous and stacks[n].exists():
                tables.append(previous[n])
            elif n in done and previous is not None and n not in previous:
                continue  # done before, no particle in it
            else:
                todo.append(i)
        ctx.info("%d micrographs with coordinates, %d to extract%s", len(tables) + len(todo),
                 len(todo), " (continue)" if ctx.is_continue else "")
        n_dropped = n_kept = 0
        pixel_out: dict[int, float] = {}
        with be.workers(ctx.threads):
            for k, i in enumerate(todo):
                ctx.check_abort()
                row = mics.iloc[i]
                name = names[i]
                mic_path = resolve_path(name, project_dir=ctx.project_dir)
                px = micrograph_pixel_size(row, mic_path)
                picks = _read_coords(coords[name], ctx)
                if fom_min is not None and "rlnAutopickFigureOfMerit" in picks.columns:
                    picks = picks[picks["rlnAutopickFigureOfMerit"] >= fom_min]
                img, _ = read_mrc(mic_path)
                res = extract_particles(
                    img, picks["rlnCoordinateX"].to_numpy(float),
                    picks["rlnCoordinateY"].to_numpy(float), box, px,
                    rescale_box=out_box, invert=bool(ctx.get("do_invert", True)),
                    normalise=bool(ctx.get("do_norm", True)),
                    bg_radius_px=bg_radius_out,
                    white_dust=float(ctx.get("white_dust", -1)),
                    black_dust=float(ctx.get("black_dust", -1)), rng=i)
                done.add(name)
                n_dropped += res.n_dropped
                kept = picks[res.kept].reset_index(drop=True)
                n_kept += len(kept)
                group = int(row.get("rlnOpticsGroup", 1)) if "rlnOpticsGroup" in row else 1
                pixel_out[group] = res.pixel_size_a
                if len(kept) == 0:
                    continue
                stack_rel = ctx.rel(stacks[name])
                write_mrc(stacks[name], be.to_numpy(res.stack), pixel_size_a=res.pixel_size_a,
                          float16=float16, is_stack=True)
                tables.append(_particle_rows(kept, row, name, stack_rel))
                ctx.progress(k + 1, len(todo), "extracted")
        done |= {names[i] for i in range(len(names)) if names[i] in coords and (
            previous is not None and names[i] in previous)}
        done_file.write_text("\n".join(sorted(done)) + "\n", encoding="utf-8")
        ctx.info("%d particles extracted from %d micrographs; %d picks dropped because their "
                 "%d-px box leaves the micrograph", n_kept, len(todo), n_dropped, box)
        (ctx.path("extract_summary.txt")).write_text(
            f"micrographs {len(todo)}\nparticles {n_kept}\ndropped_outside {n_dropped}\n",
            encoding="utf-8")

        parts = pd.concat(tables, ignore_index=True) if tables else _empty_particles()
        opt = _optics_table(mics, optics, box, out_box, pixel_out)
        out = write_star(ctx.path("particles.star"), {"optics": opt, "particles": parts})
        ctx.add_output_node(out, PARTICLES_NODE)


def _coordinate_files(ctx: JobContext) -> dict[str, str]:
    src = str(ctx.get("coords_suffix", "") or "").strip()
    if not src:
        raise UserError("option coords_suffix: no coordinate list (the picking job's "
                        "autopick.star) given")
    p = resolve_path(src, project_dir=ctx.project_dir)
    blocks = read_star(p)
    tab = blocks.get("coordinate_files")
    if tab is None or not {"rlnMicrographName", "rlnMicrographCoordinates"} <= set(tab.columns):
        raise UserError(f"{p}: expected a data_coordinate_files table with rlnMicrographName and "
                        "rlnMicrographCoordinates (RELION 4 autopick.star)")
    ctx.add_input_node(p, COORDS_NODE)
    return {str(m): str(c) for m, c in zip(tab["rlnMicrographName"],
                                            tab["rlnMicrographCoordinates"])}


def _read_coords(path: str, ctx: JobContext) -> pd.DataFrame:
    p = resolve_path(path, project_dir=ctx.project_dir)
    blocks = read_star(p)
    tab = next(iter(blocks.values())) if blocks else pd.DataFrame()
    if len(tab) and not {"rlnCoordinateX", "rlnCoordinateY"} <= set(tab.columns):
        raise UserError(f"{p}: no rlnCoordinateX/rlnCoordinateY columns")
    if not len(tab):
        return pd.DataFrame({"rlnCoordinateX": [], "rlnCoordinateY": []})
    return tab.reset_index(drop=True)


def _particle_rows(picks: pd.DataFrame, mic_row: pd.Series, mic_name: str,
                   stack_rel: str) -> pd.DataFrame:
    n = len(picks)
    out = pd.DataFrame({"rlnCoordinateX": picks["rlnCoordinateX"].to_numpy(float),
                        "rlnCoordinateY": picks["rlnCoordinateY"].to_numpy(float)})
    for col in ("rlnClassNumber", "rlnAutopickFigureOfMerit", "rlnAnglePsi"):
        if col in picks.columns:
            out[col] = picks[col].to_numpy()
    out["rlnImageName"] = [join_image_name(i, stack_rel) for i in range(n)]
    out["rlnMicrographName"] = mic_name
    for col in MIC_COLUMNS:
        if col in mic_row.index and pd.notna(mic_row[col]):
            out[col] = mic_row[col]
    if "rlnOpticsGroup" not in out.columns:
        out["rlnOpticsGroup"] = 1
    return out


def _empty_particles() -> pd.DataFrame:
    return pd.DataFrame({"rlnCoordinateX": [], "rlnCoordinateY": [], "rlnImageName": [],
                         "rlnMicrographName": [], "rlnOpticsGroup": []})


def _optics_table(mics: pd.DataFrame, optics: pd.DataFrame | None, box: int, out_box: int,
                  pixel_out: dict[int, float]) -> pd.DataFrame:
    if optics is None or "rlnOpticsGroup" not in optics.columns:
        raise UserError("the micrographs STAR file has no data_optics table (voltage, Cs and "
                        "pixel size are needed for particles.star)")
    rows = []
    for _, o in optics.iterrows():
        g = int(o["rlnOpticsGroup"])
        mic_px = None
        for col in ("rlnMicrographPixelSize", "rlnMicrographOriginalPixelSize"):
            if col in o.index and pd.notna(o[col]) and float(o[col]) > 0:
                mic_px = float(o[col])
                break
        img_px = pixel_out.get(g, None if mic_px is None else mic_px * box / out_box)
        if img_px is None:
            raise UserError(f"optics group {g}: no rlnMicrographPixelSize in the micrographs "
                            "STAR file")
        r = {c: o[c] for c in OPTICS_COLUMNS if c in o.index}
        r.setdefault("rlnOpticsGroupName", f"opticsGroup{g}")
        r["rlnOpticsGroup"] = g
        if "rlnMicrographOriginalPixelSize" not in r and mic_px is not None:
            r["rlnMicrographOriginalPixelSize"] = mic_px
        r["rlnImagePixelSize"] = img_px
        r["rlnImageSize"] = out_box
        r["rlnImageDimensionality"] = 2
        r["rlnCtfDataAreCtfPremultiplied"] = 0
        rows.append(r)
    return pd.DataFrame(rows)


def _previous_rows(ctx: JobContext) -> dict[str, pd.DataFrame]:
    p = ctx.path("particles.star")
    if not p.exists():
        return {}
    tab = read_star(p).get("particles")
    if tab is None or not len(tab):
        return {}
    return {str(m): g.reset_index(drop=True) for m, g in tab.groupby("rlnMicrographName",
                                                                     sort=False)}


JOB = ExtractJob
