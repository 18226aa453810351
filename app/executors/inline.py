"""In-process executor: runs the job in the calling process (tests, benchmarks, debugging).

No isolation: a crash in a job is caught by :func:`app.jobs.base.run_job` and becomes a
FAILURE marker, but a hard crash takes the caller with it. Use ``local`` for real work.
"""

from __future__ import annotations

from pathlib import Path

from app.executors.base import Executor, JobHandle, JobSpec
from app.jobs.base import exit_status


class InlineExecutor(Executor):
    name = "inline"

    def submit(self, spec: JobSpec) -> JobHandle:
        from app.jobs.base import run_job
        from app.schemes.jobstar import read_job_star

        js = read_job_star(Path(spec.project) / spec.job_star)
        h = JobHandle(self.name, spec.job_dir, "0", project=str(spec.project))
        run_job(js.type_label, spec.job_dir, js.options, is_continue=spec.is_continue,
                project_dir=spec.project, command_line=spec.argv())
        return h

    def poll(self, h: JobHandle) -> str | None:
        return exit_status(Path(h.project) / h.job_dir) or "failure"

    def cancel(self, h: JobHandle) -> None:
        return None
