"""Local executor: each job is a child process started with an argument list (never a shell).

stdout/stderr go to the job's ``run.out``/``run.err``; the child gets
``SCOPESIDE_JOB_REDIRECTED=1`` so it does not add its own log files. A child that ends
without an exit marker (killed, out of memory, segfault) is marked failed with its exit code
or signal. Children run in their own session so an interrupted schemer does not take them
down; a restarted schemer re-adopts a child that is still running.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from app.executors.base import Executor, JobHandle, JobSpec, mark_aborted, mark_failure
from app.jobs.base import exit_status
from app.schemes.pipeline import _pid_alive

log = logging.getLogger(__name__)

REDIRECTED_ENV = "SCOPESIDE_JOB_REDIRECTED"


def describe_returncode(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        hint = " (killed: out of memory or by hand?)" if -rc == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {rc}"


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, env: dict[str, str] | None = None, grace_s: float = 1.0) -> None:
        self.env = env
        self.grace_s = grace_s
        self._procs: dict[str, subprocess.Popen] = {}

    def submit(self, spec: JobSpec) -> JobHandle:
        d = spec.abs_dir
        d.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ if self.env is None else self.env)
        env[REDIRECTED_ENV] = "1"
        env.setdefault("OMP_NUM_THREADS", str(spec.threads()))
        with open(d / "run.out", "a", encoding="utf-8") as out, \
                open(d / "run.err", "a", encoding="utf-8") as err:
            proc = subprocess.Popen(spec.argv(), cwd=spec.project, stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        h = JobHandle(self.name, spec.job_dir, str(proc.pid), project=str(spec.project))
        self._procs[h.ident] = proc
        h.save()
        log.info("started %s as pid %d", spec.job_dir, proc.pid)
        return h

    def _dir(self, h: JobHandle) -> Path:
        return Path(h.project) / h.job_dir

    def poll(self, h: JobHandle) -> str | None:
        proc = self._procs.get(h.ident)
        state = exit_status(self._dir(h))
        if proc is not None:
            rc = proc.poll()
            if rc is None:
                return None
            self._procs.pop(h.ident, None)
            state = exit_status(self._dir(h))
            if state is None:
                mark_failure(self._dir(h), f"job process {h.ident} ended without an exit "
                                           f"marker: {describe_returncode(rc)}")
                return "failure"
            return state
        # adopted (not our child): alive until its pid goes away
        if _pid_alive(int(h.ident)):
            return None
        state = exit_status(self._dir(h))
        if state is None:
            mark_failure(self._dir(h), f"job process {h.ident} vanished without an exit marker")
            return "failure"
        return state

    def cancel(self, h: JobHandle) -> None:
        """Terminate the job's process group (SIGTERM, then SIGKILL) and mark it aborted."""
        pid = int(h.ident)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            deadline = time.monotonic() + self.grace_s
            while self.poll_alive(h) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.poll_alive(h):
                break
        proc = self._procs.pop(h.ident, None)
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("pid %s did not exit after SIGKILL", pid)
        mark_aborted(self._dir(h), "aborted: job process terminated by the schemer")

    def poll_alive(self, h: JobHandle) -> bool:
        proc = self._procs.get(h.ident)
        if proc is not None:
            return proc.poll() is None
        return _pid_alive(int(h.ident))

    def adopt(self, h: JobHandle) -> bool:
        if h.executor != self.name:
            return False
        try:
            pid = int(h.ident)
        except ValueError:
            return False
        if not _pid_alive(pid):
            return False
        try:  # make sure the pid still belongs to this job (pids get reused)
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return h.job_dir.encode() in cmd or h.job_dir.rstrip("/").encode() in cmd
