"""The schemer loop: walk a scheme's graph, run operators and jobs, save state after every step.

Behaviour follows RELION 4's ``relion_schemer --run`` (see docs/schemes.md):

- one schemer per scheme, guarded by the lock directory
  ``<project>/.relion_lock_scheme_<name>/lock_scheme`` (ours records pid and host, so a
  lock left by a killed schemer on this host is cleared automatically);
- start at the saved current node; the next node is the output of the last edge leaving it
  (a fork follows its boolean); no edge, ``exit`` or a passed ``exit_maxtime`` ends the run;
- at a job node: re-read its job.star, substitute ``$$var``, rewrite ``Schemes/<s>/<job>/``
  paths to current job directories, make a new ``<Type>/jobNNN/`` (mode ``new`` or not yet
  started) or continue in the current one, wait (bounded) for input files, run it through the
  executor and wait for its exit marker; failure or abort stops the scheme naming the job;
- the current node is written to scheme.star (atomically) after every step, so a killed
  schemer resumes where it was; a job still running from before is re-adopted, a finished
  one is not run again, an interrupted one is run again in its directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import UserError
from app.executors.base import RUN_RECORD, Executor, JobHandle, JobSpec, mark_aborted
from app.jobs.base import ABORT_NOW, ABORTED, FAILURE, SUCCESS, clear_markers, exit_status
from app.schemes import pipeline
from app.schemes.jobstar import JobStar, read_job_star, write_job_star
from app.schemes.model import UNDEF, Scheme
from app.schemes.operators import AbortRequested, Clock, OpContext, StopScheme, execute

log = logging.getLogger(__name__)

#: scheme-dir sidecar: which job node is running where (ignored by RELION)
RUNNING_FILE = ".scopeside_running.json"
#: scheme-dir queue of edits made while a schemer runs (applied at its next step)
EDITS_FILE = ".scopeside_edits.jsonl"
LOCK_TEXT = "lock mechanism from Schemer"
#: operators with effects outside the scheme: their step is always saved at once
SIDE_EFFECTS = {"touch_file", "copy_file", "move_file", "delete_file", "email", "exit",
                "exit_maxtime"}

_SCHEME_PATH = re.compile(r"Schemes/([^/\s,;:\"']+)/([^/\s,;:\"']+)/")
_VAR = re.compile(r"\$\$([A-Za-z0-9_]+)")


def scheme_dir(project: Path, name: str) -> Path:
    return Path(project) / "Schemes" / name


def lock_dir(project: Path, name: str) -> Path:
    return Path(project) / f".relion_lock_scheme_{name}"


# -- lock -------------------------------------------------------------------------------------
def lock_owner(project: Path, name: str) -> dict[str, str] | None:
    """The lock's recorded owner (``pid``, ``host``) or None when unlocked; {} if unknown."""
    f = lock_dir(project, name) / "lock_scheme"
    if not lock_dir(project, name).exists():
        return None
    try:
        text = f.read_text(encoding="utf-8")
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def is_running(project: Path, name: str) -> bool:
    """True when a live schemer on this host holds the scheme's lock (or a foreign lock exists)."""
    owner = lock_owner(project, name)
    if owner is None:
        return False
    if owner.get("host") == socket.gethostname() and "pid" in owner:
        return pipeline._pid_alive(int(owner["pid"]))
    return True


class SchemeLock:
    """RELION's lock directory for one scheme, with stale-lock clearing for our own locks."""

    def __init__(self, project: Path, name: str) -> None:
        self.project, self.name = Path(project), name
        self.dir = lock_dir(project, name)
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):
            try:
                self.dir.mkdir()
            except FileExistsError:
                owner = lock_owner(self.project, self.name) or {}
                if (owner.get("host") == socket.gethostname() and "pid" in owner
                        and not pipeline._pid_alive(int(owner["pid"]))):
                    log.warning("clearing stale lock %s left by dead pid %s", self.dir,
                                owner["pid"])
                    clear_lock(self.project, self.name)
                    continue
                who = (f"pid {owner['pid']} on {owner.get('host', '?')}" if "pid" in owner
                       else "another program (e.g. RELION)")
                raise UserError(
                    f"scheme {self.name} is already being run by {who}: lock directory "
                    f"{self.dir} exists. If no schemer is running, clear it with "
                    f"`scopeside schemer --project {self.project} --scheme {self.name} "
                    "--unlock`") from None
            (self.dir / "lock_scheme").write_text(
                f"{LOCK_TEXT}\npid={os.getpid()} host={socket.gethostname()} "
                f"started={time.strftime('%Y-%m-%dT%H:%M:%S')}\n", encoding="utf-8")
            self.held = True
            return
        raise UserError(f"could not take the lock {self.dir}")

    def release(self) -> None:
        if self.held:
            clear_lock(self.project, self.name)
            self.held = False


def clear_lock(project: Path, name: str) -> None:
    d = lock_dir(project, name)
    (d / "lock_scheme").unlink(missing_ok=True)
    try:
        d.rmdir()
    except FileNotFoundError:
        pass


# -- result and events --------------------------------------------------------------------------
@dataclass
class RunResult:
    state: str  # finished | aborted | failed
    message: str
    visited: list[str] = field(default_factory=list)


@dataclass
class Event:
    kind: str  # node | job_started | job_finished | state | message
    node: str = ""
    detail: str = ""


class Schemer:
    """Runs one scheme of one project.

    Parameters
    ----------
    project, name
        Project directory and scheme name (``prep``, ``proc``).
    executor
        Where jobs run (:func:`app.executors.make_executor`); default local processes.
    clock
        Time source for ``wait``/``exit_maxtime`` (tests pass a fake clock).
    poll_s
        How often a running job's state is checked (seconds).
    input_wait_s
        How long a job may wait for its input files before the scheme stops.
    abort_grace_s
        After an abort, how long a job gets to stop by itself before it is killed/cancelled.
    on_event
        Called with an :class:`Event` for every step (the GUI's progress hook).
    save_interval_s
        0 (default, as RELION): scheme.star is written after every step. > 0: consecutive
        steps of operators that only change variables are written at most this often (jobs,
        waits that slept, file/e-mail operators, edits and the end are always written at
        once), so a killed schemer resumes from a consistent state at most this much older.
    """

    def __init__(self, project: str | Path, name: str, executor: Executor | None = None,
                 clock: Clock | None = None, poll_s: float = 0.5, input_wait_s: float = 60.0,
                 abort_grace_s: float = 10.0,
                 on_event: Callable[[Event], None] | None = None,
                 save_interval_s: float = 0.0) -> None:
        if executor is None:
            from app.executors.local import LocalExecutor

            executor = LocalExecutor()
        self.project = Path(project).resolve()
        self.name = name
        self.executor = executor
        self.clock = clock or Clock()
        self.poll_s = poll_s
        self.input_wait_s = input_wait_s
        self.abort_grace_s = abort_grace_s
        self.on_event = on_event
        self.save_interval_s = save_interval_s
        self._last_save = 0.0
        self._dirty = False
        self.dir = scheme_dir(self.project, name)
        self.scheme: Scheme | None = None
        self.stop_event: threading.Event | None = None
        self._other_jobs: dict[str, tuple[float, dict[str, str]]] = {}
        self.visited: list[str] = []

    # -- helpers ----------------------------------------------------------------------------
    def _emit(self, kind: str, node: str = "", detail: str = "") -> None:
        if self.on_event is not None:
            try:
                self.on_event(Event(kind, node, detail))
            except Exception:  # noqa: BLE001 - a GUI callback must never stop the schemer
                log.exception("scheme event callback failed")

    def abort_requested(self) -> bool:
        if self.stop_event is not None and self.stop_event.is_set():
            return True
        return (self.dir / ABORT_NOW).exists()

    def _save(self, force: bool = True) -> None:
        """Write scheme.star atomically. With ``save_interval_s`` > 0, a step that only changed
        variables (``force=False``) may be written together with the next one within that
        interval; everything else is written at once."""
        assert self.scheme is not None
        now = time.monotonic()
        if not force and self.save_interval_s > 0 and now - self._last_save < self.save_interval_s:
            self._dirty = True
            return
        self.scheme.save(self.dir / "scheme.star")
        self._last_save = now
        self._dirty = False

    def _apply_edits(self) -> None:
        """Apply variable/job edits queued by :func:`set_variable` etc. while we run."""
        f = self.dir / EDITS_FILE
        if not f.exists():
            return
        tmp = f.with_name(f.name + f".{os.getpid()}")
        try:
            os.replace(f, tmp)
        except FileNotFoundError:
            return
        assert self.scheme is not None
        for line in tmp.read_text(encoding="utf-8").splitlines():
            try:
                e = json.loads(line)
                _apply_edit(self.scheme, e)
                log.info("applied edit %s", e)
            except (ValueError, KeyError, UserError) as exc:
                log.warning("ignored edit %r: %s", line, exc)
        tmp.unlink(missing_ok=True)
        self._save()

    # -- path rewriting ---------------------------------------------------------------------
    def _jobs_of(self, other: str) -> dict[str, str]:
        f = scheme_dir(self.project, other) / "scheme.star"
        if not f.exists():
            raise UserError(f"scheme {self.name}: a path names scheme {other!r} but {f} does "
                            "not exist")
        mtime = f.stat().st_mtime
        cached = self._other_jobs.get(other)
        if cached and cached[0] == mtime:
            return cached[1]
        for _ in range(5):  # the other schemer may be replacing the file this instant
            try:
                sch = Scheme.from_text(f.read_text(encoding="utf-8"), f)
                break
            except (UserError, OSError):
                time.sleep(0.2)
        else:
            raise UserError(f"cannot read the jobs of scheme {other} from {f}")
        jobs = {k: j.current_name for k, j in sch.jobs.items()}
        self._other_jobs[other] = (mtime, jobs)
        return jobs

    def rewrite(self, text: str) -> str:
        """Replace ``Schemes/<s>/<job>/`` by that job's current directory (when it has one)."""
        if "Schemes/" not in text:
            return text
        assert self.scheme is not None

        def sub(m: re.Match) -> str:
            s, job = m.group(1), m.group(2)
            if s == self.name:
                if job not in self.scheme.jobs:
                    return m.group(0)  # e.g. a file inside the scheme dir itself
                cur = self.scheme.jobs[job].current_name
            else:
                jobs = self._jobs_of(s)
                if job not in jobs:
                    raise UserError(f"scheme {self.name}: {m.group(0)} names job {job!r}, "
                                    f"which scheme {s} does not have")
                cur = jobs[job]
            if "/" not in cur:  # never run yet: keep the template path (it does not exist)
                return m.group(0)
            return cur if cur.endswith("/") else cur + "/"

        return _SCHEME_PATH.sub(sub, text)

    def substitute(self, node: str, value: str) -> str:
        assert self.scheme is not None

        def sub(m: re.Match) -> str:
            var = m.group(1)
            if self.scheme.variable_kind(var) is None:
                raise UserError(f"scheme {self.name}, job {node}: $${var} is not a variable "
                                "of this scheme")
            return self.scheme.variable_text(var)

        return self.rewrite(_VAR.sub(sub, value))

    # -- the run ----------------------------------------------------------------------------
    def run(self, stop_event: threading.Event | None = None) -> RunResult:
        """Run until the scheme ends, fails or is aborted. Raises UserError if already running."""
        self.stop_event = stop_event
        if not (self.dir / "scheme.star").is_file():
            raise UserError(f"scheme {self.name}: {self.dir / 'scheme.star'} not found")
        lock = SchemeLock(self.project, self.name)
        lock.acquire()
        try:
            self.scheme = Scheme.load(self.project, self.name)
            for m in (SUCCESS, FAILURE, ABORTED, ABORT_NOW):
                (self.dir / m).unlink(missing_ok=True)
            result = self._loop()
        except UserError as exc:
            result = RunResult("failed", str(exc), self.visited)
            if self.scheme is not None and self._dirty:
                self._save()
        except BaseException:
            lock.release()
            raise
        # the exit marker is written before the lock goes, so whoever sees the scheme stopped
        # (no live lock) also sees why it stopped
        try:
            marker = {"finished": SUCCESS, "failed": FAILURE, "aborted": ABORTED}[result.state]
            (self.dir / marker).write_text(result.message + "\n", encoding="utf-8")
            (self.dir / ABORT_NOW).unlink(missing_ok=True)
        finally:
            lock.release()
        log.info("scheme %s %s: %s", self.name, result.state, result.message)
        self._emit("state", detail=result.state)
        if result.state != "aborted":
            from app.schemes.operators import send_email

            if self.scheme is not None and "email" in self.scheme.strings:
                send_email(self.scheme, f"Scheme: {self.name}", result.message)
        return result

    def _loop(self) -> RunResult:
        sch = self.scheme
        assert sch is not None
        if sch.current_node == UNDEF:
            sch.current_node = sch.start_node()
            if sch.current_node == UNDEF:
                return RunResult("failed", f"scheme {self.name} has no edges", self.visited)
        ctx = OpContext(sch, self.project, clock=self.clock,
                        abort_requested=self.abort_requested, rewrite=self.rewrite)
        log.info("scheme %s: starting at %s", self.name, sch.current_node)
        node = sch.current_node
        while True:
            self._apply_edits()
            if self.abort_requested():
                self._save()
                return RunResult("aborted", f"scheme {self.name} aborted at {node}",
                                 self.visited)
            self.visited.append(node)
            self._emit("node", node)
            pure = False
            if sch.is_operator(node):
                t_op = time.monotonic()
                try:
                    execute(ctx, node)
                except StopScheme as exc:
                    self._save()
                    return RunResult("finished", f"scheme {self.name}: {exc} (at {node})",
                                     self.visited)
                except AbortRequested:
                    self._save()
                    return RunResult("aborted", f"scheme {self.name} aborted while {node} "
                                                "was waiting", self.visited)
                pure = (sch.operators[node].type not in SIDE_EFFECTS
                        and time.monotonic() - t_op < 0.01)
            else:
                outcome = self._run_job(node)
                if outcome is not None:
                    return outcome
            nxt = sch.next_node(node)
            sch.current_node = nxt
            self._save(force=not pure or nxt == UNDEF)
            if nxt == UNDEF:
                return RunResult("finished", f"scheme {self.name}: no edge leaves {node}",
                                 self.visited)
            node = nxt

    # -- one job ----------------------------------------------------------------------------
    def _running_record(self) -> dict | None:
        try:
            return json.loads((self.dir / RUNNING_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _set_running(self, node: str | None, job_dir: str = "") -> None:
        f = self.dir / RUNNING_FILE
        if node is None:
            f.unlink(missing_ok=True)
            return
        tmp = f.with_name(f.name + ".tmp")
        tmp.write_text(json.dumps({"node": node, "job_dir": job_dir}), encoding="utf-8")
        os.replace(tmp, f)

    def _prepare(self, node: str) -> tuple[JobStar, dict[str, str]]:
        assert self.scheme is not None
        src = self.dir / node / "job.star"
        js = read_job_star(src)
        opts = {k: self.substitute(node, v) for k, v in js.options.items()}
        return js, opts

    def _run_job(self, node: str) -> RunResult | None:
        from app.jobs import find_type, load_job_class

        sch = self.scheme
        assert sch is not None
        job = sch.jobs[node]
        rec = self._running_record()
        handle: JobHandle | None = None
        resumed = False
        if rec and rec.get("node") == node and rec.get("job_dir") == job.current_name:
            # we were killed while this job ran: take its result, re-adopt it, or re-run it
            job_dir = job.current_name
            state = exit_status(self.project / job_dir)
            old = JobHandle.load(self.project, job_dir)
            if state is not None:
                log.info("%s (%s) finished while the schemer was down: %s", node, job_dir, state)
                return self._finish(node, job_dir, state)
            if old is not None and self.executor.adopt(old):
                log.info("re-adopting %s (%s, %s %s)", node, job_dir, old.executor, old.ident)
                handle = old
                resumed = True
        js, opts = self._prepare(node)
        jt = find_type(js.type_label)
        if handle is None:
            if rec and rec.get("node") == node and rec.get("job_dir") == job.current_name:
                job_dir = job.current_name
                is_continue = job.mode == "continue"
                log.info("re-running interrupted %s in %s", node, job_dir)
            elif not job.has_started or job.mode == "new":
                job_dir = pipeline.new_process(self.project, jt.process_dir, js.type_label)
                job.current_name = job_dir
                is_continue = False
                log.info("%s: new job %s", node, job_dir)
            else:
                job_dir = job.current_name
                is_continue = True
                log.info("%s: continuing %s", node, job_dir)
            abs_dir = self.project / job_dir
            abs_dir.mkdir(parents=True, exist_ok=True)
            write_job_star(abs_dir / "job.star", JobStar(js.type_label, is_continue, js.is_tomo,
                                                         opts))
            # record the job before waiting for its inputs: a schemer killed from here on
            # resumes in this directory instead of creating a second job
            self._set_running(node, job_dir)
            self._save()
            waited = self._wait_for_inputs(node, load_job_class(jt), opts)
            if waited is not None:
                from app.executors.base import mark_failure

                (mark_failure if waited.state == "failed" else mark_aborted)(
                    abs_dir, waited.message)
                pipeline.set_status(self.project, job_dir,
                                    "failure" if waited.state == "failed" else "aborted")
                self._save()
                return waited
            clear_markers(abs_dir)
            (abs_dir / RUN_RECORD).unlink(missing_ok=True)
            self._set_running(node, job_dir)
            job.has_started = True
            self._save()
            pipeline.set_status(self.project, job_dir, "running", js.type_label)
            spec = JobSpec(self.project, job_dir, f"{job_dir}job.star", is_continue, opts, node)
            self._emit("job_started", node, job_dir)
            try:
                handle = self.executor.submit(spec)
            except UserError as exc:
                from app.executors.base import mark_failure

                mark_failure(abs_dir, f"could not start: {exc}")
                return self._finish(node, job_dir, "failure")
        assert handle is not None
        job_dir = handle.job_dir
        if resumed:
            self._emit("job_started", node, job_dir)
        state = self._wait_for_job(handle)
        return self._finish(node, job_dir, state)

    def _wait_for_inputs(self, node: str, job_cls, opts: dict[str, str]) -> RunResult | None:
        names = [n for n in getattr(job_cls, "input_options", []) if opts.get(n)]
        missing = [opts[n] for n in names if not (self.project / opts[n]).exists()]
        t0 = time.monotonic()
        while missing:
            if self.abort_requested():
                return RunResult("aborted", f"scheme {self.name} aborted while {node} waited "
                                            f"for {missing[0]}", self.visited)
            if time.monotonic() - t0 > self.input_wait_s:
                return RunResult("failed", f"scheme {self.name} stopped: job {node} input "
                                           f"{missing[0]} did not appear within "
                                           f"{self.input_wait_s:.0f} s", self.visited)
            time.sleep(min(1.0, self.poll_s))
            missing = [m for m in missing if not (self.project / m).exists()]
        return None

    def _wait_for_job(self, handle: JobHandle) -> str:
        abs_dir = self.project / handle.job_dir
        abort_at: float | None = None
        while True:
            state = self.executor.poll(handle)
            if state is not None:
                return state
            if abort_at is None and self.abort_requested():
                (abs_dir / ABORT_NOW).touch()
                abort_at = time.monotonic()
                log.info("abort: asked %s to stop", handle.job_dir)
            if abort_at is not None and time.monotonic() - abort_at > self.abort_grace_s:
                log.warning("abort: %s did not stop within %.0f s; cancelling", handle.job_dir,
                            self.abort_grace_s)
                self.executor.cancel(handle)
                mark_aborted(abs_dir, "aborted by the schemer")
                return exit_status(abs_dir) or "aborted"
            time.sleep(self.poll_s)

    def _finish(self, node: str, job_dir: str, state: str) -> RunResult | None:
        self._set_running(None)
        (self.project / job_dir / ABORT_NOW).unlink(missing_ok=True)
        pipeline.set_status(self.project, job_dir, state)
        pipeline.record_nodes(self.project, job_dir)
        self._emit("job_finished", node, f"{job_dir} {state}")
        if state == "success":
            return None
        reason = ""
        marker = self.project / job_dir / (FAILURE if state == "failure" else ABORTED)
        try:
            reason = marker.read_text(encoding="utf-8").strip().splitlines()[-1]
        except (OSError, IndexError):
            pass
        self._save()
        if state == "aborted":
            return RunResult("aborted", f"scheme {self.name} stopped: job {node} ({job_dir}) "
                                        f"was aborted" + (f": {reason}" if reason else ""),
                             self.visited)
        return RunResult("failed", f"scheme {self.name} stopped: job {node} ({job_dir}) failed"
                         + (f": {reason}" if reason else ""), self.visited)


# -- edits (safe while a schemer runs) ---------------------------------------------------------
def _apply_edit(sch: Scheme, e: dict) -> None:
    kind = e["kind"]
    if kind == "variable":
        sch.set_variable(e["name"], e["value"], also_reset=bool(e.get("reset")))
    elif kind == "job_not_started":
        if e["job"] not in sch.jobs:
            raise UserError(f"scheme {sch.name}: no job {e['job']!r}")
        sch.jobs[e["job"]].has_started = False
    else:
        raise UserError(f"unknown edit {kind!r}")


def _queue_or_apply(project: Path, name: str, edit: dict) -> None:
    """Queue ``edit`` for a running schemer, or apply it (after any edits still queued by a
    schemer that stopped before it could apply them, so the order is kept)."""
    sch = Scheme.load(project, name, validate=False)
    queue = scheme_dir(project, name) / EDITS_FILE
    owner = lock_owner(project, name)
    if owner is not None and "pid" not in owner:
        raise UserError(f"scheme {name} is locked by another program (e.g. RELION): "
                        f"{lock_dir(project, name)} exists; change it there or clear the lock")
    if is_running(project, name):
        _apply_edit(sch, edit)  # checks the edit now, so a bad one fails here, not later
        with open(queue, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(edit) + "\n")
        return
    if queue.exists():
        for line in queue.read_text(encoding="utf-8").splitlines():
            try:
                _apply_edit(sch, json.loads(line))
            except (ValueError, KeyError, UserError) as exc:
                log.warning("ignored queued edit %r: %s", line, exc)
    _apply_edit(sch, edit)
    sch.save()
    queue.unlink(missing_ok=True)
