"""The job contract every scopeside job honours (RELION 4 compatible).

A job runs in a job directory ``<Type>/jobNNN/`` relative to the project
directory (the current directory, as in RELION). It

- writes ``job.star`` (type label and every option value), appends the command
  line, version and time to ``note.txt``;
- logs to stdout/stderr (the executor sends them to ``run.out``/``run.err``;
  ``scopeside job`` run by hand also copies them there);
- checks for ``RELION_JOB_ABORT_NOW`` between units of work;
- ends by touching exactly one of ``RELION_JOB_EXIT_SUCCESS``, ``_FAILURE``
  (its text is the reason) or ``_ABORTED``;
- records its input and output nodes in ``job_nodes.json`` for the pipeline.

Subclasses declare ``options`` (RELION job.star names with defaults) and
implement :meth:`Job.run`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from app.errors import USER_ERRORS, JobAborted, UserError

log = logging.getLogger(__name__)

SUCCESS = "RELION_JOB_EXIT_SUCCESS"
FAILURE = "RELION_JOB_EXIT_FAILURE"
ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
EXIT_MARKERS = (SUCCESS, FAILURE, ABORTED)

#: options every job accepts (read by executors; RELION's queue options)
COMMON_OPTIONS: dict[str, str] = {
    "do_queue": "No",
    "queuename": "openmpi",
    "qsub": "sbatch",
    "qsubscript": "",
    "min_dedicated": "1",
    "nr_mpi": "1",
    "nr_threads": "1",
    "other_args": "",
}


@dataclass(frozen=True)
class Option:
    """One job option: RELION job.star name, default (as job.star text), kind and help with units."""

    name: str
    default: str
    kind: str = "str"  # str | float | int | bool | path
    help: str = ""

    def parse(self, text: str) -> Any:
        t = str(text).strip()
        try:
            if self.kind == "bool":
                low = t.lower()
                if low in ("yes", "true", "1", "y"):
                    return True
                if low in ("no", "false", "0", "n", ""):
                    return False
                raise ValueError(t)
            if self.kind == "float":
                return float(t) if t else None
            if self.kind == "int":
                return int(round(float(t))) if t else None
        except ValueError:
            raise UserError(f"option {self.name}: {t!r} is not a valid {self.kind}") from None
        return t


@dataclass(frozen=True)
class Unsupported:
    """A RELION option whose other values ask for something scopeside does not do.

    ``ok`` are the accepted values (lower case; ``yes``/``no`` for booleans); an empty
    value is always accepted. Anything else makes the job fail at once with ``what`` in
    the message, instead of running as if the option were absent.
    """

    name: str
    ok: tuple[str, ...]
    what: str

    def check(self, value: str) -> None:
        v = str(value).strip()
        low = v.lower()
        low = {"true": "yes", "1": "yes", "y": "yes", "false": "no", "0": "no", "n": "no"}.get(
            low, low)
        if v and low not in self.ok:
            hint = f" (set {self.name} to {self.ok[0]!r})" if self.ok else ""
            raise UserError(f"option {self.name}={v!r}: {self.what} is not supported by "
                            f"scopeside; run this job in RELION{hint}")


def format_value(value: Any) -> str:
    """A Python value as job.star text (bools as Yes/No, floats in shortest form)."""
    if isinstance(value, bool):
        return "Yes" if value else "No"
    if isinstance(value, float):
        return f"{value:g}" if value == value else "nan"
    return str(value)


def exit_status(job_dir: Path) -> str | None:
    """``"success"``, ``"failure"``, ``"aborted"`` or ``None`` (still running / never ran)."""
    for marker, state in ((FAILURE, "failure"), (ABORTED, "aborted"), (SUCCESS, "success")):
        if (Path(job_dir) / marker).exists():
            return state
    return None


def clear_markers(job_dir: Path) -> None:
    for m in (*EXIT_MARKERS, ABORT_NOW):
        try:
            (Path(job_dir) / m).unlink()
        except FileNotFoundError:
            pass


@dataclass
class JobContext:
    """What a running job sees: its directory, typed options, logging, progress and abort checks."""

    out_dir: Path
    options: dict[str, Any]
    raw_options: dict[str, str]
    is_continue: bool = False
    project_dir: Path = field(default_factory=Path.cwd)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("scopeside.job"))
    #: compute device chosen for this job ("cpu" or "gpu", from SCOPESIDE_DEVICE / auto)
    device: str = "cpu"
    input_nodes: list[tuple[str, str]] = field(default_factory=list)
    output_nodes: list[tuple[str, str]] = field(default_factory=list)
    _t0: float = field(default_factory=lambda: time.monotonic())
    _last_progress: float = 0.0
    #: the current progress phase (its label) and its (time, done) samples for the ETA
    _phase: str | None = None
    _phase_samples: list[tuple[float, int]] = field(default_factory=list)
    _last_call: float | None = None

    # -- options ----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        return self.options[name]

    def get(self, name: str, default: Any = None) -> Any:
        v = self.options.get(name)
        return default if v is None or v == "" else v

    @property
    def threads(self) -> int:
        try:
            return max(1, int(float(self.raw_options.get("nr_threads", "1") or 1)))
        except ValueError:
            return 1

    # -- paths ------------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        """A path inside the job directory."""
        return self.out_dir.joinpath(*parts)

    def rel(self, p: str | Path) -> str:
        """``p`` relative to the project directory when inside it (as RELION writes paths)."""
        p = Path(p)
        try:
            return str(p.resolve().relative_to(self.project_dir.resolve()))
        except ValueError:
            return str(p)

    # -- reporting --------------------------------------------------------------------------
    def info(self, msg: str, *args: Any) -> None:
        self.logger.info(msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self.logger.warning(msg, *args)

    def progress(self, done: int, total: int, what: str = "", force: bool = False) -> None:
        """Log ``what: done/total (pct) elapsed, ETA`` at most every 2 s (and at the end).

        Each label (``what``) is a phase with its own clock: a new label (the next refinement
        iteration, the final pass after the mini-batches) starts where the previous progress
        call left off, so its ETA is not polluted by earlier phases. The ETA uses the *recent*
        rate (the last third of the phase, at least 30 s) rather than the phase average, so
        work that slows down as it goes (VDAM mini-batches at a rising resolution) is not
        under-estimated as much.
        """
        now = time.monotonic()
        if what != self._phase:
            start = self._last_call if self._last_call is not None else self._t0
            self._phase = what
            self._phase_samples = [(start, 0)]
        self._last_call = now
        samples = self._phase_samples
        if done > samples[-1][1] and (now - samples[-1][0] >= 0.5 or done >= total):
            samples.append((now, done))  # thinned: at most two samples a second
        if not force and done < total and now - self._last_progress < 2.0:
            return
        self._last_progress = now
        el = now - self._t0
        eta = self._eta(now, done, total)
        pct = 100.0 * done / total if total else 100.0
        self.logger.info("%s %d/%d (%.0f%%) elapsed %s, ETA %s", what or "progress", done, total,
                         pct, _hms(el), _hms(eta) if eta == eta else "?")

    def _eta(self, now: float, done: int, total: int) -> float:
        """Seconds left in the current phase from its recent rate (NaN before any progress)."""
        samples = self._phase_samples
        t_start, d_start = samples[0]
        if done <= d_start:
            return float("nan")
        window = max(30.0, (now - t_start) / 3.0)
        t_ref, d_ref = t_start, d_start
        for t, d in samples:
            if now - t <= window and d < done:
                t_ref, d_ref = t, d
                break
        rate = (done - d_ref) / max(now - t_ref, 1e-9)
        return max(total - done, 0) / rate

    def check_abort(self) -> None:
        """Raise :class:`JobAborted` if the user or the schemer asked this job to stop."""
        if (self.out_dir / ABORT_NOW).exists():
            raise JobAborted(f"{self.out_dir}: abort requested")

    def add_input_node(self, path: str | Path, node_type: str) -> None:
        self.input_nodes.append((self.rel(path), node_type))

    def add_output_node(self, path: str | Path, node_type: str) -> None:
        self.output_nodes.append((self.rel(path), node_type))


def _hms(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


class Job:
    """Base class of every job type. Subclasses set the class attributes and implement ``run``."""

    #: RELION-named options with defaults; COMMON_OPTIONS are always added
    options: ClassVar[list[Option]] = []
    #: option names whose values are input files the job waits for (pipeline edges)
    input_options: ClassVar[list[str]] = []
    #: RELION options this job cannot honour when set (see :class:`Unsupported`)
    unsupported: ClassVar[list[Unsupported]] = []

    def __init__(self, jobtype) -> None:
        self.jobtype = jobtype

    @classmethod
    def option_map(cls) -> dict[str, Option]:
        m = {name: Option(name, default) for name, default in COMMON_OPTIONS.items()}
        m.update({o.name: o for o in cls.options})
        return m

    def run(self, ctx: JobContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def not_implemented_job(jt) -> type[Job]:
    class _NotImplemented(Job):
        def run(self, ctx: JobContext) -> None:
            raise UserError(f"job type {jt.name} ({jt.label}) is not implemented yet")

    return _NotImplemented


def parse_options(job_cls: type[Job], raw: Mapping[str, str], logger: logging.Logger
                  ) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge ``raw`` over the defaults; warn about unknown names; refuse :class:`Unsupported`
    values (UserError); return (typed, raw-merged)."""
    spec = job_cls.option_map()
    merged = {name: o.default for name, o in spec.items()}
    refused = {u.name: u for u in job_cls.unsupported}
    for k, v in raw.items():
        if k in refused:
            refused[k].check(v)
        elif k not in spec:
            logger.warning("unknown option %s=%s ignored", k, v)
        merged[k] = str(v)
    typed = {k: (spec[k].parse(v) if k in spec else v) for k, v in merged.items()}
    return typed, merged


def run_job(type_name: str, out_dir: str | Path, raw_options: Mapping[str, str] | None = None,
            is_continue: bool = False, project_dir: str | Path | None = None,
            command_line: list[str] | None = None) -> int:
    """Run one job to completion in ``out_dir``; returns 0 on success, 1 otherwise.

    Never raises for a job failure: the reason goes to the log and into the
    ``RELION_JOB_EXIT_FAILURE`` file.
    """
    from app import __version__
    from app.jobs import find_type, load_job_class
    from app.schemes.jobstar import JobStar, write_job_star

    jt = find_type(type_name)
    job_cls = load_job_class(jt)
    project = Path(project_dir) if project_dir else Path.cwd()
    out = Path(out_dir)
    if not out.is_absolute():
        out = project / out
    out.mkdir(parents=True, exist_ok=True)
    clear_markers(out)
    logger = logging.getLogger(f"scopeside.job.{jt.name}")

    cmd = " ".join(command_line if command_line is not None else sys.argv)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    with open(out / "note.txt", "a", encoding="utf-8") as fh:
        fh.write(f"++++ Executing new job on {stamp} (scopeside {__version__}, pid {os.getpid()})\n"
                 f"++++ with the following command(s):\n{cmd}\n++++\n")

    t0 = time.monotonic()
    try:
        typed, merged = parse_options(job_cls, raw_options or {}, logger)
        write_job_star(out / "job.star", JobStar(jt.label, is_continue, False, merged))
        from compute.backend import select_device

        ctx = JobContext(out_dir=out, options=typed, raw_options=merged, is_continue=is_continue,
                         project_dir=project, logger=logger, device=select_device())
        logger.info("%s job in %s (%s)", jt.name, ctx.rel(out), "continue" if is_continue else "new")
        job = job_cls(jt)
        job.run(ctx)
        _write_nodes(out, jt, ctx)
    except JobAborted as exc:
        logger.warning("aborted: %s", exc)
        (out / ABORTED).write_text(f"{exc}\n", encoding="utf-8")
        return 1
    except USER_ERRORS as exc:
        logger.error("job failed: %s", exc)
        print(f"ERROR: {exc}", file=sys.stderr)
        (out / FAILURE).write_text(f"{exc}\n", encoding="utf-8")
        return 1
    except BaseException as exc:  # noqa: BLE001 - any crash must leave a FAILURE marker
        tb = traceback.format_exc()
        logger.error("job crashed: %s: %s", type(exc).__name__, exc)
        print(tb, file=sys.stderr)
        (out / FAILURE).write_text(f"{type(exc).__name__}: {exc}\n", encoding="utf-8")
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        return 1
    logger.info("%s job finished in %s", jt.name, _hms(time.monotonic() - t0))
    (out / SUCCESS).touch()
    return 0


def _write_nodes(out: Path, jt, ctx: JobContext) -> None:
    data = {
        "process": ctx.rel(out).rstrip("/") + "/",
        "type_label": jt.label,
        "inputs": [{"name": n, "type": t} for n, t in ctx.input_nodes],
        "outputs": [{"name": n, "type": t} for n, t in ctx.output_nodes],
    }
    tmp = out / "job_nodes.json.tmp"
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, out / "job_nodes.json")
