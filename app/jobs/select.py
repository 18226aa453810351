"""relion.select: value-based selection of micrographs or particles, or the class ranker.

- ``do_select_values``: keep the rows of ``fn_mic`` (micrographs) or ``fn_data``
  (particles) whose ``select_label`` lies within ``select_minval`` .. ``select_maxval``
  (inclusive); writes ``micrographs.star`` or ``particles.star`` with the input's optics
  table, as RELION does. ``continue`` keeps the rows selected before and adds only rows not
  seen in the previous output (new micrographs), so earlier selections never change.
- ``do_class_ranker``: hands the job to the class ranker,
  ``app.jobs.rank_select.run_ranker_selection(ctx)`` (imported only when asked for).

Interactive selection (RELION's GUI) is not available: one of the two must be set.
"""

from __future__ import annotations

import importlib

import numpy as np
import pandas as pd

from app.errors import UserError
from app.jobs.base import Job, JobContext, Option, Unsupported
from metadata.star import read_star, resolve_path, write_star

MICS_NODE = "MicrographGroupMetadata.star.relion"
PARTICLES_NODE = "ParticleGroupMetadata.star.relion"


class SelectJob(Job):
    options = [
        Option("fn_mic", "", "path", "micrographs STAR file to select from"),
        Option("fn_data", "", "path", "particles STAR file to select from"),
        Option("fn_model", "", "path", "2D classification optimiser/model STAR (class ranker)"),
        Option("do_select_values", "No", "bool", "select on the value of select_label"),
        Option("select_label", "rlnCtfMaxResolution", "str", "STAR label to select on"),
        Option("select_minval", "-9999", "float", "smallest value kept (inclusive)"),
        Option("select_maxval", "6", "float", "largest value kept (inclusive; default 6 Å for "
               "rlnCtfMaxResolution)"),
        Option("do_class_ranker", "No", "bool", "select 2D classes with the class ranker"),
        Option("rank_threshold", "0.15", "float", "minimum class score (class ranker)"),
        Option("select_nr_parts", "-1", "int", "minimum number of particles (class ranker)"),
        Option("select_nr_classes", "-1", "int", "minimum number of classes (class ranker)"),
    ]
    input_options = ["fn_mic", "fn_data", "fn_model"]
    unsupported = [
        Unsupported("do_split", ("no",), "splitting a STAR file into subsets"),
        Unsupported("do_discard", ("no",), "discarding images by their statistics"),
        Unsupported("do_remove_duplicates", ("no",), "removing duplicate particles"),
        Unsupported("do_regroup", ("no",), "regrouping particles"),
    ]

    def run(self, ctx: JobContext) -> None:
        if ctx.get("do_class_ranker", False):
            run_ranker = _ranker_hook()
            run_ranker(ctx)
            return
        if not ctx.get("do_select_values", False):
            raise UserError("relion.select: set do_select_values (value-based selection) or "
                            "do_class_ranker; interactive selection is not available")
        fn_mic = str(ctx.get("fn_mic", "") or "").strip()
        fn_data = str(ctx.get("fn_data", "") or "").strip()
        if fn_mic:
            src, table, key, out_name, node = fn_mic, "micrographs", "rlnMicrographName", \
                "micrographs.star", MICS_NODE
        elif fn_data:
            src, table, key, out_name, node = fn_data, "particles", "rlnImageName", \
                "particles.star", PARTICLES_NODE
        else:
            raise UserError("relion.select: give fn_mic (micrographs) or fn_data (particles)")
        path = resolve_path(src, project_dir=ctx.project_dir)
        blocks = read_star(path)
        if table not in blocks:
            raise UserError(f"{path}: no data_{table} table (tables present: "
                            f"{', '.join(blocks) or 'none'})")
        ctx.add_input_node(path, node)
        rows = blocks[table]
        label = str(ctx.get("select_label", "rlnCtfMaxResolution")).strip().lstrip("_")
        if label not in rows.columns:
            raise UserError(f"select_label {label}: no such column in {path} (columns: "
                            f"{', '.join(rows.columns)})")
        lo = float(ctx.get("select_minval", -9999.0))
        hi = float(ctx.get("select_maxval", 9999.0))
        if lo > hi:
            raise UserError(f"select_minval ({lo:g}) is larger than select_maxval ({hi:g})")

        out_path = ctx.path(out_name)
        previous = None
        if ctx.is_continue and out_path.exists():
            previous = read_star(out_path).get(table)
        if previous is not None and key in previous.columns and key in rows.columns:
            seen = set(previous[key].astype(str))
            new_rows = rows[~rows[key].astype(str).isin(seen)]
        else:
            previous = None
            new_rows = rows
        vals = pd.to_numeric(new_rows[label], errors="coerce").to_numpy(dtype=float)
        keep = np.isfinite(vals) & (vals >= lo) & (vals <= hi)
        chosen = new_rows[keep]
        result = chosen if previous is None else pd.concat([previous, chosen], ignore_index=True)
        ctx.info("%s %s in [%g, %g]: kept %d of %d new rows (%d in total)", table, label, lo, hi,
                 int(keep.sum()), len(new_rows), len(result))
        out = {name: df for name, df in blocks.items() if name != table}
        out[table] = result.reset_index(drop=True)
        write_star(out_path, out)
        ctx.add_output_node(out_path, node)


def _ranker_hook():
    try:
        mod = importlib.import_module("app.jobs.rank_select")
    except ModuleNotFoundError as exc:
        if exc.name in ("app.jobs.rank_select",):
            raise UserError("do_class_ranker: class ranker not available "
                            "(app.jobs.rank_select is missing)") from None
        raise
    fn = getattr(mod, "run_ranker_selection", None)
    if fn is None:
        raise UserError("do_class_ranker: class ranker not available "
                        "(app.jobs.rank_select has no run_ranker_selection)")
    return fn


JOB = SelectJob
