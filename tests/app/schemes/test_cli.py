"""`scopeside schemer`: every flag, in-process, plus edits made while a scheme runs."""

from __future__ import annotations

import json
import threading
import time

import pytest

from app.cli import run
from app.executors.inline import InlineExecutor
from app.schemes import api
from app.schemes.jobstar import read_job_star
from app.schemes.schemer import Schemer
from tests.app.schemes.helpers import make_scheme
from tests.app.schemes.test_graph import settings

U = "undefined"


@pytest.fixture
def proj(project):
    api.create_project(project, settings())
    return project


def cli(proj, *args):
    return run(["schemer", "--project", str(proj), "--scheme", "prep", *args])


def test_status_json_and_text(proj, capsys):
    assert cli(proj, "--status", "--json") == 0
    st = json.loads(capsys.readouterr().out)
    assert st["scheme"] == "prep" and st["current_node"] == "WAIT" and st["state"] == "idle"
    assert st["variables"]["do_at_most"] == {"type": "float", "value": 2.0, "reset": 2.0}
    assert [j["name"] for j in st["jobs"]] == ["ctffind", "importmovies", "motioncorr"]
    assert {j["state"] for j in st["jobs"]} == {"not started"}
    assert st["edges"][0] == {"input": "WAIT", "output": "EXIT_maxtime", "is_fork": False,
                              "output_if_true": U, "bool": U}
    assert cli(proj, "--status") == 0
    out = capsys.readouterr().out
    assert "current node: WAIT" in out and "importmovies" in out and "relion.import" in out


def test_set_reset_and_current_node(proj, capsys):
    assert cli(proj, "--set", "wait_sec=30", "--set", "do_at_most=7") == 0
    st = api.status(proj, "prep")
    assert st["variables"]["wait_sec"]["value"] == 30
    assert st["variables"]["wait_sec"]["reset"] == 180
    assert cli(proj, "--set-current-node", "ctffind") == 0
    assert api.status(proj, "prep")["current_node"] == "ctffind"
    assert cli(proj, "--reset") == 0
    st = api.status(proj, "prep")
    assert st["current_node"] == "WAIT" and st["variables"]["wait_sec"]["value"] == 180
    assert cli(proj, "--set-job-option", "ctffind", "dfmax=40000") == 0
    assert read_job_star(proj / "Schemes/prep/ctffind/job.star").options["dfmax"] == "40000"
    assert cli(proj, "--abort") == 0
    assert "is not running" in capsys.readouterr().out


@pytest.mark.parametrize("args,msg", [
    (["--set", "nosuch=1"], "no variable 'nosuch'"),
    (["--set", "wait_sec=soon"], "'soon' is not a number"),
    (["--set", "wait_sec"], "expected NAME=VALUE"),
    (["--set-current-node", "NOPE"], "no node 'NOPE'"),
    (["--set-job-option", "nojob", "a=1"], "no job 'nojob'"),
])
def test_bad_input_is_one_line_exit_2(proj, capsys, args, msg):
    assert cli(proj, *args) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_missing_scheme_is_a_user_error(tmp_path, capsys):
    assert run(["schemer", "--project", str(tmp_path), "--scheme", "prep", "--status"]) == 2
    assert "no scheme 'prep'" in capsys.readouterr().err


def test_edits_while_running_reach_the_schemer(project):
    make_scheme(project, "t", floats={"wait_sec": 60, "x": 0},
                operators={"WAIT": ("wait", U, "wait_sec", U),
                           "INC": ("float=plus", "x", "x", "1")},
                jobs={"job": ("new", "test.quick", {})},
                edges=[("WAIT", "INC"), ("INC", "job"), ("job", "WAIT")])
    schemer = Schemer(project, "t", InlineExecutor(), poll_s=0.05)
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("r", schemer.run()), daemon=True)
    th.start()
    t0 = time.monotonic()
    while schemer.visited.count("WAIT") < 2:
        assert time.monotonic() - t0 < 20
        time.sleep(0.05)
    api.set_variable(project, "t", "wait_sec", "0")  # queued: the scheme is running
    with pytest.raises(Exception, match="is running"):
        api.reset(project, "t")
    api.abort(project, "t")
    th.join(10)
    assert box["r"].state == "aborted"
    # the running WAIT was interrupted by the abort; the queued edit was applied on the way out
    # or is applied by the next run, never lost
    api.set_current_node(project, "t", "WAIT")
    res = Schemer(project, "t", InlineExecutor(), poll_s=0.05)
    res.abort_requested = lambda: res.visited.count("job") >= 3
    out = res.run()
    assert out.state == "aborted" and api.status(project, "t")["variables"]["wait_sec"][
        "value"] == 0


def test_queued_edits_keep_their_order_after_a_stop(project):
    make_scheme(project, "t", floats={"wait_sec": 60},
                operators={"WAIT": ("wait", U, "wait_sec", U)},
                jobs={"job": ("new", "test.quick", {})},
                edges=[("WAIT", "job"), ("job", "WAIT")])
    (project / "Schemes/t/.scopeside_edits.jsonl").write_text(
        json.dumps({"kind": "variable", "name": "wait_sec", "value": "1"}) + "\n")
    api.set_variable(project, "t", "wait_sec", "5")  # newer than the queued one: it wins
    assert api.status(project, "t")["variables"]["wait_sec"]["value"] == 5
    assert not (project / "Schemes/t/.scopeside_edits.jsonl").exists()


def test_foreign_lock_refuses_edits_and_runs(proj, capsys):
    lock = proj / ".relion_lock_scheme_prep"
    lock.mkdir()
    (lock / "lock_scheme").write_text("lock mechanism from Schemer\n")  # RELION's own text
    assert cli(proj, "--set", "wait_sec=5") == 2
    assert "locked by another program" in capsys.readouterr().err
    assert cli(proj, "--run") == 2
    assert "another program (e.g. RELION)" in capsys.readouterr().err
    assert cli(proj, "--unlock") == 0 and not lock.exists()
