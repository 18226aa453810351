"""Faults: crashes, aborts, a second schemer, and kill -9 of the schemer (local executor)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.errors import UserError
from app.executors.inline import InlineExecutor
from app.executors.local import LocalExecutor
from app.schemes import api
from app.schemes.schemer import Schemer
from tests.app.schemes.helpers import control, double_log, make_scheme

U = "undefined"


def one_job_scheme(project: Path, label: str = "test.quick", mode: str = "new",
                   validate: bool = True, **opts):
    return make_scheme(
        project, "t", floats={"wait_sec": 60},
        operators={"START": ("float=set", "wait_sec", "wait_sec", U), "END": ("exit", U, U, U)},
        jobs={"job": (mode, label, opts)},
        edges=[("START", "job"), ("job", "END")], validate=validate)


def wait_for(cond, timeout=20.0, what="condition"):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def in_thread(schemer: Schemer):
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("res", schemer.run()), daemon=True)
    th.start()
    return th, box


@pytest.mark.parametrize("how,reason", [("kill", "killed by SIGKILL"),
                                        ("exception", "RuntimeError: test.quick double crashed")])
def test_crashing_job_is_a_failure_and_the_scheme_names_it(project, how, reason):
    control(project, behaviour={"test.quick": how})
    one_job_scheme(project)
    res = Schemer(project, "t", LocalExecutor(), poll_s=0.05).run()
    assert res.state == "failed"
    assert "job job (Quick/job001/) failed" in res.message and reason in res.message
    assert (project / "Quick/job001/RELION_JOB_EXIT_FAILURE").exists()
    assert (project / "Schemes/t/RELION_JOB_EXIT_FAILURE").exists()
    st = api.status(project, "t")
    assert st["state"] == "failed" and st["jobs"][0]["state"] == "failure"
    assert st["current_node"] == "job"
    if how == "kill":
        assert "without an exit marker" in (project / "Quick/job001/run.err").read_text()


def test_job_type_not_implemented_stops_the_scheme_before_any_job(project, monkeypatch):
    # a registered type whose module does not exist: refused when the run starts (scheme
    # validation), not when the node is reached
    monkeypatch.setenv("SCOPESIDE_EXTRA_JOBS", "test.missing=tests.app.schemes.no_such_module")
    one_job_scheme(project, label="test.missing", validate=False)
    res = Schemer(project, "t", InlineExecutor(), poll_s=0.05).run()
    assert res.state == "failed"
    assert "scheme t: the scheme reaches 1 job(s) whose type scopeside does not implement: " \
           "job (test.missing: not implemented yet)" in res.message
    assert res.visited == []
    assert not (project / "Missing").exists()


def test_abort_during_wait_stops_within_seconds(project):
    make_scheme(project, "t", floats={"wait_sec": 60},
                operators={"WAIT": ("wait", U, "wait_sec", U)},
                jobs={"job": ("new", "test.quick", {})},
                edges=[("WAIT", "job"), ("job", "WAIT")])
    schemer = Schemer(project, "t", InlineExecutor(), poll_s=0.05)
    th, box = in_thread(schemer)
    wait_for(lambda: schemer.visited.count("WAIT") >= 2, what="the second WAIT")
    time.sleep(0.3)
    t0 = time.monotonic()
    assert api.abort(project, "t") is True
    th.join(10)
    assert time.monotonic() - t0 < 3.0
    assert box["res"].state == "aborted" and "WAIT was waiting" in box["res"].message
    assert (project / "Schemes/t/RELION_JOB_EXIT_ABORTED").exists()
    assert not (project / "Schemes/t/RELION_JOB_ABORT_NOW").exists()
    assert api.status(project, "t")["state"] == "aborted"


def test_exit_marker_is_written_before_the_lock_goes(project, monkeypatch):
    """A monitor that sees the scheme stopped (no live lock) must also see why (the marker):
    the GUI once showed 'stopped' without 'aborted' for one refresh."""
    from app.schemes import schemer as schemer_mod

    make_scheme(project, "t", floats={"wait_sec": 60},
                operators={"WAIT": ("wait", U, "wait_sec", U)},
                jobs={"job": ("new", "test.quick", {})},
                edges=[("WAIT", "job"), ("job", "WAIT")])
    seen: list[tuple[bool, str]] = []
    release = schemer_mod.SchemeLock.release

    def spy(self) -> None:
        st = api.status(project, "t")
        seen.append(((project / "Schemes/t/RELION_JOB_EXIT_ABORTED").exists(), st["state"]))
        release(self)

    monkeypatch.setattr(schemer_mod.SchemeLock, "release", spy)
    schemer = Schemer(project, "t", InlineExecutor(), poll_s=0.05)
    th, box = in_thread(schemer)
    wait_for(lambda: schemer.visited.count("WAIT") >= 2, what="the second WAIT")
    api.abort(project, "t")
    th.join(10)
    assert box["res"].state == "aborted"
    assert seen == [(True, "running")]
    assert api.status(project, "t")["state"] == "aborted"


@pytest.mark.parametrize("behaviour", ["hang", "hang_ignore_abort"])
def test_abort_during_job_and_second_schemer_refused(project, behaviour):
    control(project, behaviour={"test.quick": behaviour})
    one_job_scheme(project)
    schemer = Schemer(project, "t", LocalExecutor(), poll_s=0.05, abort_grace_s=1.0)
    th, box = in_thread(schemer)
    wait_for(lambda: (project / "Quick/job001/.scopeside_run.json").exists(), what="job start")
    time.sleep(1.0)  # let the child process get going
    # a second schemer on the same scheme is refused, in-process and from the command line
    with pytest.raises(UserError, match=r"scheme t is already being run by pid \d+"):
        Schemer(project, "t", InlineExecutor()).run()
    r = subprocess.run([sys.executable, "-m", "app.cli", "schemer", "--project", str(project),
                        "--scheme", "t", "--run"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "already being run" in r.stderr
    assert api.status(project, "t")["jobs"][0]["state"] == "running"
    t0 = time.monotonic()
    api.abort(project, "t")
    th.join(20)
    assert time.monotonic() - t0 < 5.0
    res = box["res"]
    assert res.state == "aborted" and "job job (Quick/job001/) was aborted" in res.message
    marker = project / "Quick/job001/RELION_JOB_EXIT_ABORTED"
    assert marker.exists()
    if behaviour == "hang_ignore_abort":
        assert "terminated by the schemer" in marker.read_text()
    pid = json.loads((project / "Quick/job001/.scopeside_run.json").read_text())["ident"]
    assert not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    assert (project / "Schemes/t/RELION_JOB_EXIT_ABORTED").exists()


def _start_cli(project: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.cli", "schemer", "--project",
                             str(project), "--scheme", "t", "--run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("job_survives", [True, False])
def test_kill_9_of_the_schemer_then_run_again(project, job_survives):
    control(project, sleep=0.3)
    make_scheme(project, "t", operators={"END": ("exit", U, U, U)},
                jobs={"slow": ("continue", "test.slow", {"items": 6}),
                      "after": ("new", "test.quick", {})},
                edges=[("slow", "after"), ("after", "END")])
    proc = _start_cli(project)
    done = project / "Slow/job001/done.txt"
    wait_for(lambda: done.exists() and len(done.read_text().split()) >= 2, timeout=60,
             what="two items done")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    job_pid = int(json.loads((project / "Slow/job001/.scopeside_run.json").read_text())["ident"])
    if not job_survives:
        os.killpg(job_pid, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{job_pid}").exists() or
                 Path(f"/proc/{job_pid}/stat").read_text().split(")")[1].split()[0] == "Z",
                 what="job death")
        n_before = len(done.read_text().split())
    assert (project / ".relion_lock_scheme_t").exists()  # left behind by the killed schemer
    r = subprocess.run([sys.executable, "-m", "app.cli", "schemer", "--project", str(project),
                        "--scheme", "t", "--run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    items = done.read_text().split()
    assert items == [f"item{i:02d}" for i in range(6)]  # nothing lost, nothing done twice
    log = double_log(project)
    if job_survives:  # re-adopted: it ran once, to the end
        assert log == ["test.slow Slow/job001/ new processed=6",
                       "test.quick Quick/job002/ new processed=0"]
    else:  # re-run in its own directory, continuing where it stopped
        assert log == [f"test.slow Slow/job001/ continue processed={6 - n_before}",
                       "test.quick Quick/job002/ new processed=0"]
    st = api.status(project, "t")
    assert st["state"] == "finished" and not (project / ".relion_lock_scheme_t").exists()
    assert [j["state"] for j in st["jobs"]] == ["success", "success"]


def test_coalesced_saves_end_in_a_consistent_state(project):
    make_scheme(project, "t", floats={"zero": 0, "n": 0, "stop": 200}, bools={"more": True},
                operators={"WAIT": ("wait", U, "zero", U), "INC": ("float=plus", "n", "n", "1"),
                           "CHECK": ("bool=lt", "more", "n", "stop"), "END": ("exit", U, U, U)},
                edges=[("WAIT", "INC"), ("INC", "CHECK"), ("CHECK", "END", "WAIT", "more")])
    res = Schemer(project, "t", InlineExecutor(), save_interval_s=60).run()
    assert res.state == "finished" and len(res.visited) == 3 * 200 + 1
    st = api.status(project, "t")
    assert st["current_node"] == "END" and st["variables"]["n"]["value"] == 200
