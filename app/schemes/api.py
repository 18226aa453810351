"""The schemes API the CLI and the GUI call (no Qt; safe to call from any thread).

================================  ===============================================================
``Scheme.load(project, name)``    read + validate ``Schemes/<name>/scheme.star``
``Schemer(project, name, ex)``    ``.run(stop_event) -> RunResult`` (blocks; run it in a thread)
``status(project, name)``         dict: current node, running?, state, variables, jobs, edges
``abort(project, name)``          ask a running scheme (and its running job) to stop
``reset(project, name)``          variables to reset values, jobs to original names
``set_variable(...)``             set a variable (queued for a running schemer)
``set_job_option(...)``           change a job's job.star option; marks the job not started
``set_current_node(...)``         move the start point (scheme must not be running)
``unlock(project, name)``         clear a lock left behind (refused while the owner lives)
``create_project(dir, settings)`` write prep + proc from the templates with the settings
================================  ===============================================================
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from app.errors import UserError
from app.jobs.base import ABORT_NOW, ABORTED, FAILURE, SUCCESS, exit_status
from app.schemes.jobstar import read_job_star, write_job_star
from app.schemes.model import UNDEF, Scheme
from app.schemes.schemer import (
    RUNNING_FILE,
    _queue_or_apply,
    clear_lock,
    is_running,
    lock_owner,
    scheme_dir,
)

TEMPLATES = Path(__file__).resolve().parents[2] / "resources" / "schemes"


def _scheme_state(project: Path, name: str) -> tuple[str, str]:
    d = scheme_dir(project, name)
    if is_running(project, name):
        return "running", ""
    for marker, state in ((FAILURE, "failed"), (ABORTED, "aborted"), (SUCCESS, "finished")):
        f = d / marker
        if f.exists():
            return state, f.read_text(encoding="utf-8", errors="replace").strip()
    return "idle", ""


def status(project: str | Path, name: str) -> dict[str, Any]:
    """Everything a monitor shows about one scheme, as plain data (JSON-serialisable)."""
    project = Path(project)
    sch = Scheme.load(project, name, validate=False)
    state, message = _scheme_state(project, name)
    running_node = ""
    rec_file = scheme_dir(project, name) / RUNNING_FILE
    if state == "running" and rec_file.exists():
        import json

        try:
            running_node = json.loads(rec_file.read_text(encoding="utf-8")).get("node", "")
        except ValueError:
            running_node = ""
    jobs = []
    for ori, j in sorted(sch.jobs.items()):
        js_path = scheme_dir(project, name) / ori / "job.star"
        label = read_job_star(js_path).type_label if js_path.exists() else ""
        if "/" not in j.current_name:
            jstate = "not started"
        elif ori == running_node:
            jstate = "running"
        else:
            jstate = exit_status(project / j.current_name) or (
                "running" if state == "running" and ori == sch.current_node else "incomplete")
        jobs.append({"name": ori, "current": j.current_name, "mode": j.mode,
                     "mode_ok": j.mode_is_known,
                     "has_started": j.has_started, "type": label, "state": jstate})
    variables = {}
    for kind, table in (("float", sch.floats), ("bool", sch.bools), ("string", sch.strings)):
        for k, v in sorted(table.items()):
            variables[k] = {"type": kind, "value": v.value, "reset": v.reset}
    owner = lock_owner(project, name)
    return {
        "scheme": name,
        "project": str(project),
        "current_node": sch.current_node,
        "state": state,
        "message": message,
        "running": state == "running",
        "pid": int(owner["pid"]) if owner and "pid" in owner else None,
        "variables": variables,
        "operators": {k: {"type": o.type, "output": o.output, "input1": o.input1,
                          "input2": o.input2} for k, o in sorted(sch.operators.items())},
        "jobs": jobs,
        "edges": [{"input": e.input, "output": e.output, "is_fork": e.is_fork,
                   "output_if_true": e.output_if_true, "bool": e.bool_var} for e in sch.edges],
    }


def abort(project: str | Path, name: str) -> bool:
    """Touch the abort files of the scheme and of its running job; False if it is not running."""
    project = Path(project)
    d = scheme_dir(project, name)
    if not (d / "scheme.star").exists():
        raise UserError(f"scheme {name}: {d / 'scheme.star'} not found")
    (d / ABORT_NOW).touch()
    rec = d / RUNNING_FILE
    if rec.exists():
        import json

        try:
            job_dir = json.loads(rec.read_text(encoding="utf-8")).get("job_dir", "")
        except ValueError:
            job_dir = ""
        if job_dir and (project / job_dir).is_dir():
            (project / job_dir / ABORT_NOW).touch()
    running = is_running(project, name)
    if not running:
        (d / ABORT_NOW).unlink(missing_ok=True)
    return running


def _require_idle(project: Path, name: str, what: str) -> None:
    if is_running(project, name):
        raise UserError(f"scheme {name} is running: abort it before you {what}")


def reset(project: str | Path, name: str) -> None:
    """Variables to their reset values, jobs to original names (not started), node to the start."""
    project = Path(project)
    _require_idle(project, name, "reset it")
    sch = Scheme.load(project, name, validate=False)
    sch.reset()
    sch.save()
    d = scheme_dir(project, name)
    for m in (SUCCESS, FAILURE, ABORTED, ABORT_NOW, RUNNING_FILE):
        (d / m).unlink(missing_ok=True)


def set_variable(project: str | Path, name: str, var: str, value: str,
                 also_reset: bool = False) -> None:
    """Set a variable (type-checked); a running schemer picks it up at its next step."""
    _queue_or_apply(Path(project), name, {"kind": "variable", "name": var, "value": str(value),
                                          "reset": also_reset})


def set_job_option(project: str | Path, name: str, job: str, option: str, value: str) -> None:
    """Change one option in ``Schemes/<name>/<job>/job.star`` and mark the job not started,
    so its next visit makes a new job directory."""
    project = Path(project)
    sch = Scheme.load(project, name, validate=False)
    if job not in sch.jobs:
        raise UserError(f"scheme {name}: no job {job!r} (jobs: {', '.join(sorted(sch.jobs))})")
    path = scheme_dir(project, name) / job / "job.star"
    js = read_job_star(path)
    if js.options.get(option) == str(value):
        return
    js.options[option] = str(value)
    write_job_star(path, js)
    _queue_or_apply(project, name, {"kind": "job_not_started", "job": job})


def set_current_node(project: str | Path, name: str, node: str) -> None:
    project = Path(project)
    _require_idle(project, name, "move its current node")
    sch = Scheme.load(project, name, validate=False)
    if node not in sch.operators and node not in sch.jobs:
        raise UserError(f"scheme {name}: no node {node!r} (nodes: "
                        f"{', '.join(sorted([*sch.operators, *sch.jobs]))})")
    sch.current_node = node
    sch.save()


def unlock(project: str | Path, name: str) -> None:
    project = Path(project)
    owner = lock_owner(project, name)
    if owner is None:
        return
    if is_running(project, name) and owner.get("pid"):
        raise UserError(f"scheme {name} is being run by pid {owner['pid']}: abort it instead")
    clear_lock(project, name)


def copy_template(template_dir: Path, project: Path, name: str) -> Path:
    """Copy a scheme folder (scheme.star + job folders) into ``<project>/Schemes/<name>``."""
    dest = scheme_dir(project, name)
    if (dest / "scheme.star").exists():
        raise UserError(f"{dest} already holds a scheme; not overwritten")
    if not (template_dir / "scheme.star").exists():
        raise UserError(f"{template_dir}: no scheme.star in this template")
    shutil.copytree(template_dir, dest, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".*", "__pycache__"))
    sch = Scheme.load(project, name, validate=False)
    sch.scheme_dir_name = f"Schemes/{name}/"
    if sch.current_node == UNDEF:
        sch.current_node = sch.start_node()
    sch.save()
    return dest


def create_project(project_dir: str | Path, settings, templates: Path | None = None) -> Path:
    """Make a project with ``Schemes/prep`` and ``Schemes/proc`` from the shipped templates,
    filled in from confirmed session settings (:class:`app.schemes.relion_it.ProcessingSettings`)."""
    from app.schemes.relion_it import apply_settings

    project = Path(project_dir)
    project.mkdir(parents=True, exist_ok=True)
    src = templates or TEMPLATES
    for name in ("prep", "proc"):
        copy_template(src / name, project, name)
    apply_settings(project, settings)
    for name in ("prep", "proc"):
        Scheme.load(project, name).validate(project)
    return project
