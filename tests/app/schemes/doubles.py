"""Fast test-double jobs that honour the job contract (registered via SCOPESIDE_EXTRA_JOBS).

One class serves every RELION label; what it does depends on the label and on
``<project>/doubles.json`` (all optional):

- ``sleep``: seconds per item processed (abort is checked between items);
- ``ctf_res``: list of rlnCtfMaxResolution values, cycled over micrographs;
- ``parts_per_mic``: particles extracted per micrograph;
- ``keep_fraction``: fraction of particles kept by the class-ranker selection;
- ``behaviour``: {label: "exception" | "kill" | "hang" | "hang_ignore_abort"}.

Every run appends ``label job_dir new|continue processed=N`` to ``<project>/double_log.txt``;
per-item work is recorded in ``<job_dir>/done.txt`` so a continued job skips finished items.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pandas as pd

from app.jobs.base import Job, JobContext, Option
from metadata.star import read_star, write_star

LABELS = ("relion.import", "relion.motioncorr", "relion.ctffind", "relion.select",
          "relion.autopick", "relion.extract", "relion.class2d", "relion.initialmodel",
          "relion.refine3d", "test.slow", "test.quick")


def extra_jobs_env() -> str:
    return ",".join(f"{label}={__name__}" for label in LABELS)


def _control(project: Path) -> dict:
    f = project / "doubles.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _rows(path: Path, table: str) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame()
    data = read_star(path)
    return data.get(table, pd.DataFrame())


class DoubleJob(Job):
    options = [Option(n, "") for n in (
        "fn_in_raw", "input_star_mics", "fn_mic", "fn_data", "fn_model", "fn_input_autopick",
        "star_mics", "coords_suffix", "fn_img", "fn_ref", "do_select_values", "select_label",
        "select_minval", "select_maxval", "do_class_ranker", "rank_threshold", "do_log",
        "do_topaz", "nr_classes", "sym_name", "items")]
    input_options = ["input_star_mics", "fn_mic", "fn_input_autopick", "star_mics", "fn_img",
                     "fn_model", "fn_ref"]

    def run(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.project = Path(ctx.project_dir)
        self.control = _control(self.project)
        label = self.jobtype.label
        behaviour = self.control.get("behaviour", {}).get(label)
        processed = 0
        try:
            if behaviour == "exception":
                raise RuntimeError(f"{label} double crashed on purpose")
            if behaviour == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if behaviour in ("hang", "hang_ignore_abort"):
                t0 = time.monotonic()
                while time.monotonic() - t0 < 120:  # never outlive a failed test for long
                    if behaviour == "hang":
                        ctx.check_abort()
                    time.sleep(0.05)
                raise RuntimeError("hang double gave up after 120 s")
            method = getattr(self, "_" + label.split(".")[1])
            processed = method()
        finally:
            with open(self.project / "double_log.txt", "a") as fh:
                fh.write(f"{label} {ctx.rel(ctx.out_dir)}/ "
                         f"{'continue' if ctx.is_continue else 'new'} processed={processed}\n")

    # -- helpers ----------------------------------------------------------------------------
    def _p(self, rel: str) -> Path:
        return self.project / rel

    def _done(self) -> list[str]:
        f = self.ctx.path("done.txt")
        return f.read_text().split() if f.exists() else []

    def _process(self, items: list[str], limit: int | None = None) -> list[str]:
        """Process items not done yet (sleep + abort check each); return all done items."""
        done = self._done()
        todo = [i for i in items if i not in done]
        if limit is not None:
            todo = todo[:limit]
        for item in todo:
            self.ctx.check_abort()
            time.sleep(float(self.control.get("sleep", 0)))
            with open(self.ctx.path("done.txt"), "a") as fh:
                fh.write(item + "\n")
            done.append(item)
        self.count = len(todo)
        return done

    # -- job types --------------------------------------------------------------------------
    def _import(self) -> int:
        pattern = self.ctx.get("fn_in_raw", "Movies/*.tiff")
        movies = sorted(str(p.relative_to(self.project)) for p in self.project.glob(pattern))
        done = self._process(movies)
        out = self.ctx.path("movies.star")
        write_star(out, {"optics": pd.DataFrame({"rlnOpticsGroup": [1]}),
                         "movies": pd.DataFrame({"rlnMicrographMovieName": done})})
        self.ctx.add_output_node(out, "MicrographMovieGroupMetadata.star.relion")
        return self.count

    def _motioncorr(self) -> int:
        src = self._p(self.ctx.get("input_star_mics"))
        movies = list(_rows(src, "movies").get("rlnMicrographMovieName", []))
        other = str(self.ctx.get("other_args", "")).split()
        limit = int(other[other.index("--do_at_most") + 1]) if "--do_at_most" in other else None
        done = self._process(movies, limit)
        out = self.ctx.path("corrected_micrographs.star")
        write_star(out, {"micrographs": pd.DataFrame(
            {"rlnMicrographName": [m.replace(".tiff", ".mrc") for m in done]})})
        self.ctx.add_input_node(src, "MicrographMovieGroupMetadata.star.relion")
        self.ctx.add_output_node(out, "MicrographGroupMetadata.star.relion.motioncorr")
        return self.count

    def _ctffind(self) -> int:
        src = self._p(self.ctx.get("input_star_mics"))
        mics = list(_rows(src, "micrographs").get("rlnMicrographName", []))
        done = self._process(mics)
        res = self.control.get("ctf_res", [4.0])
        out = self.ctx.path("micrographs_ctf.star")
        write_star(out, {"micrographs": pd.DataFrame(
            {"rlnMicrographName": done,
             "rlnCtfMaxResolution": [float(res[i % len(res)]) for i in range(len(done))]})})
        self.ctx.add_input_node(src, "MicrographGroupMetadata.star.relion")
        self.ctx.add_output_node(out, "MicrographGroupMetadata.star.relion.ctf")
        return self.count

    def _select(self) -> int:
        if self.ctx.get("fn_mic"):
            src = self._p(self.ctx.get("fn_mic"))
            df = _rows(src, "micrographs")
            lab = self.ctx.get("select_label", "rlnCtfMaxResolution")
            lo, hi = float(self.ctx.get("select_minval", -9999)), float(
                self.ctx.get("select_maxval", 9999))
            keep = df[(df[lab] >= lo) & (df[lab] <= hi)] if len(df) else df
            out = self.ctx.path("micrographs.star")
            write_star(out, {"micrographs": keep.reset_index(drop=True)})
            self.ctx.add_output_node(out, "MicrographGroupMetadata.star.relion")
            return len(keep)
        model = self._p(self.ctx.get("fn_model"))
        n_in = int(_rows(model, "optimiser_general")["rlnNrParticles"].iloc[0])
        n = int(round(n_in * float(self.control.get("keep_fraction", 1.0))))
        out = self.ctx.path("particles.star")
        write_star(out, {"particles": pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@x.mrcs"
                                                                    for i in range(n)]})})
        self.ctx.add_input_node(model, "OptimiserData.star.relion.class2d")
        self.ctx.add_output_node(out, "ParticleGroupMetadata.star.relion")
        return n

    def _autopick(self) -> int:
        src = self._p(self.ctx.get("fn_input_autopick"))
        mics = list(_rows(src, "micrographs").get("rlnMicrographName", []))
        done = self._process(mics)
        out = self.ctx.path("autopick.star")
        write_star(out, {"coordinate_files": pd.DataFrame({"rlnMicrographName": done})})
        (self.ctx.path("picker.txt")).write_text(
            f"do_log={self.ctx.get('do_log')} do_topaz={self.ctx.get('do_topaz')}\n")
        self.ctx.add_output_node(out, "MicrographCoordsGroup.star.relion.autopick")
        return self.count

    def _extract(self) -> int:
        src = self._p(self.ctx.get("star_mics"))
        mics = list(_rows(src, "micrographs").get("rlnMicrographName", []))
        done = self._process(mics)
        k = int(self.control.get("parts_per_mic", 100))
        out = self.ctx.path("particles.star")
        write_star(out, {"particles": pd.DataFrame(
            {"rlnImageName": [f"{j + 1:06d}@{m}s" for m in done for j in range(k)]})})
        self.ctx.add_output_node(out, "ParticleGroupMetadata.star.relion")
        return self.count

    def _class2d(self) -> int:
        src = self._p(self.ctx.get("fn_img"))
        n = len(_rows(src, "particles"))
        out = self.ctx.path("run_it200_optimiser.star")
        write_star(out, {"optimiser_general": {"rlnNrParticles": n}})
        self.ctx.add_input_node(src, "ParticleGroupMetadata.star.relion")
        self.ctx.add_output_node(out, "OptimiserData.star.relion.class2d")
        return n

    def _initialmodel(self) -> int:
        out = self.ctx.path("initial_model.mrc")
        out.write_text(f"model from {self.ctx.get('fn_img')}\n")
        self.ctx.add_output_node(out, "DensityMap.mrc.relion.initialmodel")
        return 1

    def _refine3d(self) -> int:
        self.ctx.path("run_class001.mrc").write_text(f"ref {self.ctx.get('fn_ref')}\n")
        return 1

    def _slow(self) -> int:
        items = [f"item{i:02d}" for i in range(int(self.ctx.get("items", 6) or 6))]
        self._process(items)
        self.ctx.path("result.txt").write_text(" ".join(self._done()) + "\n")
        return self.count

    def _quick(self) -> int:
        return 0


JOB = DoubleJob
