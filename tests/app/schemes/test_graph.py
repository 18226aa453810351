"""The shipped prep and proc graphs walked with test-double jobs (in-process) and a fake clock."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from app.executors.inline import InlineExecutor
from app.schemes import api
from app.schemes.jobstar import read_job_star
from app.schemes.pipeline import load as load_pipeline
from app.schemes.relion_it import ProcessingSettings
from app.schemes.schemer import Schemer
from metadata.star import read_star, write_star
from tests.app.schemes.conftest import FakeClock
from tests.app.schemes.helpers import control, double_log, movies

PASS1_PROC = ["WAIT", "EXIT_maxtime", "HAS_ctffind", "select_mics", "COUNT_mics",
              "HAS_mics_increased", "SET_prev_nr_mics", "SET_do_topaz", "autopick", "extract",
              "class2d", "select_parts", "COUNT_parts", "CHECK_do_3d"]


def settings(**kw) -> ProcessingSettings:
    base = dict(pixel_size_a=1.0, voltage_kv=300, cs_mm=2.7, dose_per_frame_e_a2=1.2,
                particle_diameter_a=150, do_at_most=2, wait_sec=180, maxtime_hr=0.1)
    base.update(kw)
    return ProcessingSettings(**base)


def run(project: Path, name: str, clock=None):
    return Schemer(project, name, InlineExecutor(), clock=clock or FakeClock(),
                   poll_s=0.01, input_wait_s=2).run()


def run_prep(project: Path, n_movies: int = 3, **kw):
    movies(project, n_movies)
    api.create_project(project, settings(**kw))
    return run(project, "prep")


def test_prep_loops_continue_jobs_and_ends_at_maxtime(project):
    control(project, ctf_res=[4.0])
    movies(project, 3)
    api.create_project(project, settings())
    added = []

    def new_movie(clock):  # a movie arrives while the first WAIT sleeps
        if not added:
            movies(project, 1, start=3)
            added.append(clock.now())

    clock = FakeClock(on_sleep=new_movie)
    t0 = clock.now()
    res = run(project, "prep", clock)
    assert res.state == "finished" and "maximum run time" in res.message
    assert res.visited == ["WAIT", "EXIT_maxtime", "importmovies", "motioncorr", "ctffind"] * 2 \
        + ["WAIT", "EXIT_maxtime"]
    assert clock.now() - t0 == pytest.approx(360)  # two waits of wait_sec=180 = maxtime 0.1 h
    log = double_log(project)
    assert log == [
        "relion.import Import/job001/ new processed=3",
        "relion.motioncorr MotionCorr/job002/ new processed=2",  # --do_at_most 2
        "relion.ctffind CtfFind/job003/ new processed=2",
        "relion.import Import/job001/ continue processed=1",     # the new movie only
        "relion.motioncorr MotionCorr/job002/ continue processed=2",
        "relion.ctffind CtfFind/job003/ continue processed=2",
    ]
    sch = api.status(project, "prep")
    assert [j["current"] for j in sch["jobs"]] == ["CtfFind/job003/", "Import/job001/",
                                                   "MotionCorr/job002/"]
    assert all(j["state"] == "success" for j in sch["jobs"]) and sch["state"] == "finished"
    # $$ substitution and path rewriting reached the job.star each job ran with
    mc = read_job_star(project / "MotionCorr/job002/job.star")
    assert mc.options["other_args"] == "--do_at_most 2" and mc.is_continue
    assert mc.options["input_star_mics"] == "Import/job001/movies.star"
    pipe = load_pipeline(project)
    assert [(p.name, p.status) for p in pipe.processes] == [
        ("Import/job001/", "Succeeded"), ("MotionCorr/job002/", "Succeeded"),
        ("CtfFind/job003/", "Succeeded")]
    assert ("Import/job001/movies.star", "MotionCorr/job002/") in pipe.input_edges
    assert ("CtfFind/job003/", "CtfFind/job003/micrographs_ctf.star") in pipe.output_edges


def test_proc_waits_while_prep_has_no_ctffind(project):
    api.create_project(project, settings())
    res = run(project, "proc")
    assert res.visited == ["WAIT", "EXIT_maxtime", "HAS_ctffind"] * 2 + ["WAIT", "EXIT_maxtime"]
    assert double_log(project) == []


def test_proc_without_3d_then_no_new_micrographs(project):
    control(project, ctf_res=[4.0, 8.0, 5.0], parts_per_mic=100, keep_fraction=0.5)
    run_prep(project, 3, do_at_most=5)
    res = run(project, "proc")
    assert res.visited == PASS1_PROC + ["WAIT", "EXIT_maxtime", "HAS_ctffind", "select_mics",
                                        "COUNT_mics", "HAS_mics_increased", "WAIT",
                                        "EXIT_maxtime"]
    st = api.status(project, "proc")
    v = st["variables"]
    assert v["current_nr_mics"]["value"] == 2  # 8 A micrograph rejected (max 6 A)
    assert v["current_nr_parts"]["value"] == 100  # 2 x 100 extracted, half kept by the ranker
    assert v["do_3d"]["value"] is False and v["do_topaz"]["value"] is False
    sel = read_job_star(project / "Select/job004/job.star")
    assert sel.options["fn_mic"] == "CtfFind/job003/micrographs_ctf.star"  # across schemes
    picker = next(project.glob("AutoPick/job*/picker.txt")).read_text()
    assert picker == "do_log=Yes do_topaz=No\n"


def test_proc_new_micrographs_repeat_the_loop(project):
    control(project, ctf_res=[4.0], parts_per_mic=10, keep_fraction=1.0)
    run_prep(project, 2, do_at_most=5)
    ctf = next(project.glob("CtfFind/job*/micrographs_ctf.star"))

    def prep_progress(clock):  # prep finds one more good micrograph during the first wait
        data = read_star(ctf)
        mics = data["micrographs"]
        if len(mics) == 2:
            mics = pd.concat([mics, pd.DataFrame({"rlnMicrographName": ["Movies/new.mrc"],
                                                  "rlnCtfMaxResolution": [3.0]})])
            write_star(ctf, {"micrographs": mics.reset_index(drop=True)})

    res = run(project, "proc", FakeClock(on_sleep=prep_progress))
    assert res.visited == PASS1_PROC * 2 + ["WAIT", "EXIT_maxtime"]
    log = [line for line in double_log(project) if "prep" not in line]
    extract = [line for line in log if line.startswith("relion.extract")]
    assert extract == ["relion.extract Extract/job006/ new processed=2",
                       "relion.extract Extract/job006/ continue processed=1"]
    class2d = [line.split()[1] for line in log if line.startswith("relion.class2d")]
    assert class2d == ["Class2D/job007/", "Class2D/job009/"]  # mode new: a fresh job each time
    assert api.status(project, "proc")["variables"]["current_nr_parts"]["value"] == 30


@pytest.mark.parametrize("with_iniref", [False, True])
def test_proc_3d_branch_both_ways(project, with_iniref):
    control(project, ctf_res=[4.0], parts_per_mic=100, keep_fraction=1.0)
    run_prep(project, 2, do_at_most=5)
    if with_iniref:
        (project / "ref.mrc").write_text("user reference")
    api.set_variable(project, "proc", "min_nr_parts_3d", "150")
    if with_iniref:
        api.set_variable(project, "proc", "iniref", "ref.mrc")
    api.set_variable(project, "proc", "maxtime_hr", "0.01")  # 36 s: one pass only
    res = run(project, "proc")
    tail = ["CHECK_iniref", "SET_myref_user", "refine3d"] if with_iniref else \
        ["CHECK_iniref", "inimodel3d", "SET_myref_inimodel", "refine3d"]
    assert res.visited == PASS1_PROC + tail + ["WAIT", "EXIT_maxtime"]
    ref = read_job_star(next(project.glob("Refine3D/job*/job.star"))).options["fn_ref"]
    if with_iniref:
        assert ref == "ref.mrc"
    else:
        assert ref.startswith("InitialModel/job") and ref.endswith("/initial_model.mrc")
        assert (project / ref).exists()


def test_topaz_setting_flips_the_picker_fork(project):
    control(project, ctf_res=[4.0])
    run_prep(project, 1)
    api.set_variable(project, "proc", "do_log", "false")
    api.set_variable(project, "proc", "maxtime_hr", "0.01")
    run(project, "proc")
    aj = read_job_star(next(project.glob("AutoPick/job*/job.star")))
    assert (aj.options["do_log"], aj.options["do_topaz"]) == ("No", "Yes")


def test_reset_and_restart_from_saved_node(project):
    control(project, ctf_res=[4.0])
    run_prep(project, 2)
    st = api.status(project, "prep")
    assert st["current_node"] == "EXIT_maxtime"
    api.reset(project, "prep")
    st = api.status(project, "prep")
    assert st["current_node"] == "WAIT" and st["state"] == "idle"
    assert {j["current"] for j in st["jobs"]} == {"importmovies", "motioncorr", "ctffind"}
    assert st["variables"]["do_at_most"]["value"] == 2  # the settings set the reset values
    api.set_current_node(project, "prep", "motioncorr")
    res = run(project, "prep")  # motioncorr's input path cannot resolve after a reset
    assert res.state == "failed"
    assert "job motioncorr input Schemes/prep/importmovies/movies.star did not appear" \
        in res.message
    api.set_current_node(project, "prep", "importmovies")
    n = len(double_log(project))
    res = run(project, "prep")
    assert res.visited[:4] == ["importmovies", "motioncorr", "ctffind", "WAIT"]
    assert double_log(project)[n:n + 3] == [  # new jobs after a reset
        "relion.import Import/job005/ new processed=2",
        "relion.motioncorr MotionCorr/job006/ new processed=2",
        "relion.ctffind CtfFind/job007/ new processed=2"]
    assert load_pipeline(project).find("MotionCorr/job004/").status == "Failed"


def test_changing_a_job_option_makes_a_new_job(project):
    control(project, ctf_res=[4.0])
    run_prep(project, 2)
    api.set_job_option(project, "prep", "ctffind", "dfmax", "40000")
    api.set_current_node(project, "prep", "motioncorr")
    n = len(double_log(project))
    run(project, "prep")
    tail = double_log(project)[n:n + 2]
    assert tail[0].startswith("relion.motioncorr MotionCorr/job002/ continue")
    assert tail[1] == "relion.ctffind CtfFind/job004/ new processed=2"
    assert read_job_star(project / "CtfFind/job004/job.star").options["dfmax"] == "40000"
