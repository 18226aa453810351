"""The executor contract shared by local, SLURM and in-process execution."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from app.jobs.base import ABORTED, FAILURE, exit_status

#: a job directory's record of where its current run lives (read back after a restart)
RUN_RECORD = ".scopeside_run.json"


@dataclass
class JobSpec:
    """One job run: where, from which job.star, and the queue options of that job."""

    project: Path
    job_dir: str  # relative to the project, ends with '/': "CtfFind/job004/"
    job_star: str  # relative to the project
    is_continue: bool = False
    options: dict[str, str] = field(default_factory=dict)
    name: str = ""  # a short name for queues (scheme node)

    @property
    def abs_dir(self) -> Path:
        return Path(self.project) / self.job_dir

    def argv(self) -> list[str]:
        """The job's command line as an argument list (run from the project directory)."""
        cmd = [sys.executable, "-m", "app.cli", "job", "--job-star", self.job_star,
               "--o", self.job_dir]
        if self.is_continue:
            cmd.append("--continue")
        return cmd

    def threads(self) -> int:
        try:
            return max(1, int(float(self.options.get("nr_threads", "1") or 1)))
        except ValueError:
            return 1


@dataclass
class JobHandle:
    executor: str
    job_dir: str
    ident: str  # pid for local, SLURM job id for slurm
    host: str = field(default_factory=socket.gethostname)
    started: float = field(default_factory=time.time)
    project: str = ""

    def save(self) -> None:
        path = Path(self.project) / self.job_dir / RUN_RECORD
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self)), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, project: Path, job_dir: str) -> JobHandle | None:
        path = Path(project) / job_dir / RUN_RECORD
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None


def mark_failure(job_dir: Path, reason: str) -> None:
    """Leave a FAILURE marker with ``reason`` unless the job already left a marker."""
    if exit_status(job_dir) is None:
        (Path(job_dir) / FAILURE).write_text(reason.rstrip() + "\n", encoding="utf-8")
        with open(Path(job_dir) / "run.err", "a", encoding="utf-8") as fh:
            fh.write(f"scopeside executor: {reason}\n")


def mark_aborted(job_dir: Path, reason: str) -> None:
    if exit_status(job_dir) is None:
        (Path(job_dir) / ABORTED).write_text(reason.rstrip() + "\n", encoding="utf-8")


class Executor:
    """Run jobs somewhere. ``poll`` returns None while running, else the job's final state."""

    name = "base"

    def submit(self, spec: JobSpec) -> JobHandle:  # pragma: no cover - abstract
        raise NotImplementedError

    def poll(self, handle: JobHandle) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def cancel(self, handle: JobHandle) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def adopt(self, handle: JobHandle) -> bool:
        """After a schemer restart: True when the run ``handle`` names is still going."""
        return False
