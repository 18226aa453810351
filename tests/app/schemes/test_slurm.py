"""The slurm executor against a real single-node SLURM started by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest

from app.errors import UserError
from app.executors.slurm import SlurmExecutor, render
from app.schemes import api
from app.schemes.jobstar import read_job_star
from app.schemes.schemer import Schemer
from tests.app.schemes.conftest import FakeClock
from tests.app.schemes.helpers import control, double_log, make_scheme, movies
from tests.app.schemes.test_graph import settings

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
U = "undefined"


def executor(cluster) -> SlurmExecutor:
    env = dict(os.environ, SLURM_CONF=str(cluster.conf))
    return SlurmExecutor(env=env, marker_grace_s=1.0)


def test_template_rendering_refuses_unknown_placeholders():
    assert render("run XXXcommandXXX on XXXqueueXXX", {"command": "a b", "queue": "gpu"}) == \
        "run a b on gpu"
    with pytest.raises(UserError, match="XXXfrobXXX"):
        render("XXXfrobXXX", {})


def test_prep_graph_runs_through_slurm(project, slurm_cluster):
    control(project, ctf_res=[4.0])
    movies(project, 2)
    api.create_project(project, settings(maxtime_hr=0.01, nr_threads=1))
    res = Schemer(project, "prep", executor(slurm_cluster), clock=FakeClock(),
                  poll_s=0.2).run()
    assert res.state == "finished", res.message
    assert res.visited == ["WAIT", "EXIT_maxtime", "importmovies", "motioncorr", "ctffind",
                           "WAIT", "EXIT_maxtime"]
    assert double_log(project) == ["relion.import Import/job001/ new processed=2",
                                   "relion.motioncorr MotionCorr/job002/ new processed=2",
                                   "relion.ctffind CtfFind/job003/ new processed=2"]
    script = (project / "CtfFind/job003/run_submit.script").read_text()
    assert "--job-star CtfFind/job003/job.star --o CtfFind/job003/" in script
    assert read_job_star(project / "CtfFind/job003/job.star").options["input_star_mics"] == \
        "MotionCorr/job002/corrected_micrographs.star"
    assert all(j["state"] == "success" for j in api.status(project, "prep")["jobs"])


@pytest.mark.parametrize("how,reason", [("kill", "ended FAILED"),
                                        ("exception", "double crashed on purpose")])
def test_failure_through_slurm(project, slurm_cluster, how, reason):
    control(project, behaviour={"test.quick": how})
    make_scheme(project, "t", operators={"END": ("exit", U, U, U)},
                jobs={"job": ("new", "test.quick", {})}, edges=[("job", "END")])
    res = Schemer(project, "t", executor(slurm_cluster), poll_s=0.2).run()
    assert res.state == "failed" and "job job (Quick/job001/) failed" in res.message
    assert reason in res.message
    assert (project / "Quick/job001/RELION_JOB_EXIT_FAILURE").exists()


def test_abort_cancels_the_slurm_job(project, slurm_cluster):
    control(project, behaviour={"test.quick": "hang_ignore_abort"})
    make_scheme(project, "t", operators={"END": ("exit", U, U, U)},
                jobs={"job": ("new", "test.quick", {})}, edges=[("job", "END")])
    ex = executor(slurm_cluster)
    schemer = Schemer(project, "t", ex, poll_s=0.2, abort_grace_s=1.0)
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("res", schemer.run()), daemon=True)
    th.start()
    rec = project / "Quick/job001/.scopeside_run.json"
    t0 = time.monotonic()
    while not (rec.exists() and (project / "Quick/job001/note.txt").exists()):
        assert time.monotonic() - t0 < 60, "the SLURM job never started"
        time.sleep(0.1)
    job_id = json.loads(rec.read_text())["ident"]
    assert ex.state(job_id)[0] == "RUNNING"
    t0 = time.monotonic()
    api.abort(project, "t")
    th.join(60)
    assert time.monotonic() - t0 < 30
    assert box["res"].state == "aborted"
    assert "cancelled" in (project / "Quick/job001/RELION_JOB_EXIT_ABORTED").read_text()
    state = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                           text=True, env=ex.env).stdout
    assert "JobState=CANCELLED" in state
