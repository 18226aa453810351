"""Fast test-double jobs for every RELION label the prep/proc schemes use.

Enabled with ``SCOPESIDE_EXTRA_JOBS="relion.import=tests.app.gui.fake_jobs,..."`` (see
:data:`EXTRA_JOBS`); each job writes the same STAR/MRC outputs as the real one (small, with
random values) after ``FAKE_JOB_SECONDS`` of abort-aware "work".
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from app.jobs.base import Job, JobContext
from metadata.star import read_star, write_star
from tests.app.gui import fakes

LABELS = ("relion.import", "relion.motioncorr", "relion.ctffind", "relion.select",
          "relion.autopick", "relion.extract", "relion.class2d", "relion.initialmodel",
          "relion.refine3d")
EXTRA_JOBS = ",".join(f"{lab}={__name__}" for lab in LABELS)
MICS_PER_PASS = 3


def _work(ctx: JobContext) -> None:
    t_end = time.monotonic() + float(os.environ.get("FAKE_JOB_SECONDS", "0.3"))
    while time.monotonic() < t_end:
        ctx.check_abort()
        time.sleep(0.05)


def _rows(path: Path, table: str) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame()
    return read_star(path).get(table, pd.DataFrame())


def _input(ctx: JobContext, option: str) -> Path:
    return ctx.project_dir / str(ctx.raw_options.get(option, ""))


class FakeJob(Job):
    def run(self, ctx: JobContext) -> None:
        label = self.jobtype.name
        rng = np.random.default_rng(abs(hash((label, str(ctx.out_dir), time.time()))) % 2**32)
        _work(ctx)
        job = ctx.rel(ctx.out_dir).rstrip("/")
        proj = ctx.project_dir
        if label == "relion.import":
            write_star(ctx.path("movies.star"), {"optics": fakes.optics(), "movies":
                                                 pd.DataFrame({"rlnMicrographMovieName": [
                                                     "Movies/a.tiff"], "rlnOpticsGroup": [1]})})
        elif label == "relion.motioncorr":
            old = _rows(ctx.path("corrected_micrographs.star"), "micrographs")
            names = list(old.get("rlnMicrographName", []))
            motion = list(old.get("rlnAccumMotionTotal", []))
            new = fakes.mic_names(MICS_PER_PASS, start=len(names), job=job)
            names += new
            motion += list(rng.uniform(5, 40, len(new)))
            fakes.write_motioncorr(proj, names, np.array(motion), rng, size=128, job=job)
        elif label == "relion.ctffind":
            mics = _rows(_input(ctx, "input_star_mics"), "micrographs")
            names = list(mics["rlnMicrographName"])
            fakes.write_ctffind(proj, names, rng.uniform(8000, 25000, len(names)),
                                rng.uniform(3, 7, len(names)), job=job)
        elif label == "relion.select" and str(ctx.raw_options.get("do_class_ranker")) == "Yes":
            model = str(ctx.raw_options.get("fn_model", ""))
            c2d = model.rsplit("/", 1)[0]
            mpath = proj / model.replace("_optimiser.star", "_model.star")
            n = len(_rows(mpath, "model_classes"))
            scores = rng.uniform(0, 1, n)
            fakes.write_rank(proj, scores, class2d_job=c2d, job=job, job_star=False)
            data = _rows(proj / model.replace("_optimiser.star", "_data.star"), "particles")
            keep = np.flatnonzero(scores >= float(ctx.raw_options.get("rank_threshold", 0.15)))
            sel = data[data["rlnClassNumber"].isin(keep + 1)]
            write_star(ctx.path("particles.star"), {"optics": fakes.optics(3.0),
                                                    "particles": sel})
        elif label == "relion.select":
            mics = _rows(_input(ctx, "fn_mic"), "micrographs")
            write_star(ctx.path("micrographs.star"), {"optics": fakes.optics(),
                                                      "micrographs": mics})
        elif label == "relion.autopick":
            mics = _rows(_input(ctx, "fn_input_autopick"), "micrographs")
            names = list(mics["rlnMicrographName"])
            fakes.write_autopick(proj, names, rng.integers(30, 90, len(names)).tolist(), rng,
                                 job=job)
        elif label == "relion.extract":
            picks = _rows(_input(ctx, "coords_suffix"), "coordinate_files")
            n = 40 * max(1, len(picks))
            write_star(ctx.path("particles.star"), {"optics": fakes.optics(3.0),
                                                    "particles": pd.DataFrame({
                "rlnImageName": [f"{i + 1:06d}@{job}/particles.mrcs" for i in range(n)],
                "rlnOpticsGroup": 1})})
        elif label == "relion.class2d":
            parts = _rows(_input(ctx, "fn_img"), "particles")
            n_cls = 24
            counts = np.bincount(rng.integers(0, n_cls, max(len(parts), n_cls)),
                                 minlength=n_cls)
            fakes.write_class2d(proj, n_cls, rng, box=48, job=job, particles_per_class=counts)
            (ctx.path("RELION_JOB_EXIT_SUCCESS")).unlink(missing_ok=True)
        elif label in ("relion.initialmodel", "relion.refine3d"):
            p = fakes.write_map(proj, job, n=32, with_fsc=label == "relion.refine3d")
            (ctx.path("RELION_JOB_EXIT_SUCCESS")).unlink(missing_ok=True)
            if label == "relion.initialmodel":
                import shutil

                shutil.copy(p, ctx.path("initial_model.mrc"))
        else:  # pragma: no cover - LABELS lists every label
            raise ValueError(label)
        for m in ("RELION_JOB_EXIT_SUCCESS",):
            ctx.path(m).unlink(missing_ok=True)  # run_job writes the marker itself


JOB = FakeJob
