"""Where a job runs: ``local`` child processes (default) or ``slurm`` (sbatch).

Every executor takes a :class:`~app.executors.base.JobSpec` and returns a handle it can
poll and cancel; the job's own exit marker (``RELION_JOB_EXIT_*``) is the final word, and
a job that ends without writing one is marked failed with the reason the executor saw.
"""

from __future__ import annotations


def make_executor(kind: str = "local", **kwargs):
    """An executor by name: ``local``, ``slurm`` or ``inline`` (in-process; tests, benchmarks)."""
    from app.errors import UserError

    if kind == "local":
        from app.executors.local import LocalExecutor

        return LocalExecutor(**kwargs)
    if kind == "slurm":
        from app.executors.slurm import SlurmExecutor

        return SlurmExecutor(**kwargs)
    if kind == "inline":
        from app.executors.inline import InlineExecutor

        return InlineExecutor(**kwargs)
    raise UserError(f"unknown executor {kind!r} (local, slurm or inline)")
