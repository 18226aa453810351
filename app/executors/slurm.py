"""SLURM executor: an sbatch script rendered from a user-editable template, polled, cancelled.

Placeholders (RELION's qsub-template names): ``XXXcommandXXX`` (the job's command line,
shell-quoted), ``XXXqueueXXX``, ``XXXthreadsXXX``, ``XXXcoresXXX``, ``XXXmpinodesXXX``,
``XXXdedicatedXXX``, ``XXXnodesXXX``, ``XXXgpuXXX``, ``XXXnameXXX`` (job directory),
``XXXoutfileXXX``, ``XXXerrfileXXX``, ``XXXprojectXXX`` and ``XXXextra1XXX`` ...
``XXXextra4XXX``. The rendered script is kept as ``<job>/run_submit.script``, as RELION does.

Submission is ``sbatch --parsable``; polling uses ``scontrol show job -o ID`` while SLURM
remembers the job and ``sacct`` after that; the job's own exit marker has the last word. A
job that SLURM reports finished but that left no marker (time limit, out of memory, node
failure, cancelled) is marked failed with SLURM's state and exit code.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from app.errors import UserError
from app.executors.base import Executor, JobHandle, JobSpec, mark_aborted, mark_failure
from app.jobs.base import exit_status

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = """#!/bin/bash
#SBATCH --job-name=XXXnameXXX
#SBATCH --partition=XXXqueueXXX
#SBATCH --ntasks=XXXmpinodesXXX
#SBATCH --cpus-per-task=XXXthreadsXXX
#SBATCH --output=XXXoutfileXXX
#SBATCH --error=XXXerrfileXXX
XXXextra1XXX
cd XXXprojectXXX
export SCOPESIDE_JOB_REDIRECTED=1
export OMP_NUM_THREADS=XXXthreadsXXX
XXXcommandXXX
"""

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"}


def render(template: str, values: dict[str, str]) -> str:
    """Replace every ``XXXkeyXXX``; an unknown placeholder left in the script is an error."""
    out = template
    for k, v in values.items():
        out = out.replace(f"XXX{k}XXX", v)
    left = sorted(set(re.findall(r"XXX[A-Za-z0-9]+XXX", out)))
    if left:
        raise UserError(f"sbatch template: unknown placeholder(s) {', '.join(left)}")
    return out


class SlurmExecutor(Executor):
    name = "slurm"

    def __init__(self, template: str | Path | None = None, queue: str = "",
                 extra: dict[str, str] | None = None, env: dict[str, str] | None = None,
                 marker_grace_s: float = 5.0) -> None:
        if template is None:
            self.template = DEFAULT_TEMPLATE
        elif isinstance(template, Path) or "\n" not in str(template):
            try:
                self.template = Path(template).read_text(encoding="utf-8")
            except OSError as exc:
                raise UserError(f"sbatch template {template}: {exc.strerror}") from None
        else:
            self.template = str(template)
        self.queue = queue
        self.extra = extra or {}
        self.env = env
        self.marker_grace_s = marker_grace_s
        self._ended_at: dict[str, float] = {}

    # -- helpers ----------------------------------------------------------------------------
    def _run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        if shutil.which(argv[0]) is None:
            raise UserError(f"{argv[0]} not found: is SLURM installed on this machine?")
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=self.env)

    def script_for(self, spec: JobSpec) -> str:
        o = spec.options
        d = spec.abs_dir.resolve()
        threads = str(spec.threads())
        mpi = str(max(1, int(float(o.get("nr_mpi", "1") or 1))))
        gpu = "1" if str(o.get("use_gpu", "No")).lower() in ("yes", "true", "1") else "0"
        values = {
            "command": shlex.join(spec.argv()),
            # RELION: the job's queue name counts only when the job says do_queue=Yes
            "queue": str((o.get("queuename") if str(o.get("do_queue", "No")).lower()
                          in ("yes", "true", "1") else "") or self.queue or ""),
            "threads": threads,
            "cores": str(int(threads) * int(mpi)),
            "mpinodes": mpi,
            "dedicated": str(o.get("min_dedicated", "1") or "1"),
            "nodes": "1",
            "gpu": gpu,
            "name": spec.job_dir.rstrip("/"),
            "outfile": str(d / "run.out"),
            "errfile": str(d / "run.err"),
            "project": shlex.quote(str(Path(spec.project).resolve())),
        }
        for i in range(1, 5):
            values[f"extra{i}"] = str(o.get(f"qsub_extra{i}", self.extra.get(f"extra{i}", "")))
        script = render(self.template, values)
        # an empty partition line would make sbatch fail: drop it
        return "\n".join(line for line in script.splitlines()
                         if line.strip() != "#SBATCH --partition=") + "\n"

    # -- contract ---------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> JobHandle:
        d = spec.abs_dir
        d.mkdir(parents=True, exist_ok=True)
        script = d / "run_submit.script"
        script.write_text(self.script_for(spec), encoding="utf-8")
        r = self._run(["sbatch", "--parsable", str(script)])
        if r.returncode != 0:
            raise UserError(f"sbatch refused {script}: {r.stderr.strip() or r.stdout.strip()}")
        job_id = r.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise UserError(f"sbatch gave no job id for {script}: {r.stdout.strip()!r}")
        h = JobHandle(self.name, spec.job_dir, job_id, project=str(spec.project))
        h.save()
        log.info("submitted %s as SLURM job %s", spec.job_dir, job_id)
        return h

    def state(self, job_id: str) -> tuple[str | None, str]:
        """(SLURM state or None when unknown, exit code text)."""
        r = self._run(["scontrol", "show", "job", "-o", job_id])
        if r.returncode == 0:
            m = re.search(r"JobState=(\S+)", r.stdout)
            ec = re.search(r"ExitCode=(\S+)", r.stdout)
            if m:
                return m.group(1), ec.group(1) if ec else ""
        for argv in (["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,ExitCode"],
                     ["sacct", "-c", "-n", "-P", "-X", "-j", job_id, "-o",
                      "JobID,State,ExitCode"]):
            try:
                r = self._run(argv)
            except (UserError, subprocess.TimeoutExpired):
                continue
            for line in r.stdout.splitlines():
                parts = line.split("|")
                if len(parts) >= 3 and parts[0].split(".")[0] == job_id and parts[1]:
                    return parts[1].split()[0], parts[2]
        return None, ""

    def poll(self, h: JobHandle) -> str | None:
        d = Path(h.project) / h.job_dir
        st = exit_status(d)
        if st is not None:
            return st
        state, code = self.state(h.ident)
        if state is None or state not in TERMINAL:
            if state is None and h.ident in self._ended_at:
                pass  # forgotten by SLURM after it ended: fall through to the grace check
            else:
                return None
        # ended: give a shared file system a moment to show the marker
        t_end = self._ended_at.setdefault(h.ident, time.monotonic())
        if time.monotonic() - t_end < self.marker_grace_s:
            return None
        st = exit_status(d)
        if st is not None:
            return st
        mark_failure(d, f"SLURM job {h.ident} ended {state or 'UNKNOWN'} (exit code {code or '?'})"
                        " without an exit marker")
        return "failure"

    def cancel(self, h: JobHandle) -> None:
        r = self._run(["scancel", h.ident])
        if r.returncode != 0:
            log.warning("scancel %s: %s", h.ident, r.stderr.strip())
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            state, _ = self.state(h.ident)
            if state is None or state in TERMINAL:
                break
            time.sleep(0.5)
        mark_aborted(Path(h.project) / h.job_dir, f"aborted: SLURM job {h.ident} cancelled")

    def adopt(self, h: JobHandle) -> bool:
        if h.executor != self.name:
            return False
        state, _ = self.state(h.ident)
        return state is not None and state not in TERMINAL
