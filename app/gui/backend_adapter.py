"""The one place the GUI calls the rest of scopeside (metadata, schemes engine, jobs).

Everything here is Qt-free and blocking; the GUI calls it through
:class:`app.gui.workers.TaskRunner`, never on the GUI thread. When an upstream API changes,
only this module changes.

Schemer processes
-----------------
The GUI starts each scheme's schemer as a **detached child process**
(``python -m app.cli schemer --project P --scheme S --run``, new session, output to
``Schemes/<S>/schemer.log``) instead of on a QThread in the GUI process:

- the schemer sleeps in ``wait`` operators and polls job exit files for hours; in its own
  process it never competes with the GUI thread for the Python GIL (responsiveness);
- closing the window cannot kill or corrupt a running scheme: the operator chooses to keep
  it running (the default) or to abort it; reopening the project finds the live schemer
  through the scheme's lock (``.relion_lock_scheme_<S>/lock_scheme``) and restores the
  monitor from the files, exactly as for a schemer started from the command line;
- the control commands (abort, reset, set variable, set job option) are the same
  ``scopeside schemer`` command lines users script.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import UserError
from metadata.errors import MetadataError

log = logging.getLogger(__name__)

#: acquisition form keys filled from a MovieRecord (same names as the record's fields)
RECORD_KEYS = ("voltage_kv", "cs_mm", "pixel_size_a", "super_resolution", "dose_per_frame_e_a2",
               "total_dose_e_a2", "n_frames", "exposure_time_s", "detector", "gain_reference",
               "magnification")


@dataclass
class ParsedSession:
    """What the setup form needs from a session folder (Qt-free, plain values)."""

    path: Path
    kind: str | None  # "EPU" | "SerialEM"
    values: dict[str, tuple[Any, str | None, str | None]]  # key -> (value, source, derived)
    warnings: list[str] = field(default_factory=list)
    n_movies: int | None = None
    movie_path: str | None = None


def _record_values(rec: Any) -> dict[str, tuple[Any, str | None, str | None]]:
    """``{key: (value, source, derived-how)}`` from a :class:`metadata.record.MovieRecord`."""
    source: dict[str, str] = dict(getattr(rec, "source", {}) or {})
    derived = set(getattr(rec, "derived", []) or [])
    out: dict[str, tuple[Any, str | None, str | None]] = {}
    for key in RECORD_KEYS:
        v = getattr(rec, key, None)
        src = source.get(key)
        if key in derived:
            how = src.removeprefix("derived:") if src else "computed"
            out[key] = (v, None, how)
        else:
            out[key] = (v, src, None)
    mtf = getattr(rec, "mtf_file", None)
    if mtf is not None:
        out["mtf_file"] = (mtf, source.get("mtf_file"), None)
    return out


def parse_session(path: str | Path) -> ParsedSession:
    """Parse an EPU session folder, a SerialEM folder, or one metadata file / movie.

    Uses :func:`metadata.session.read_any` with the instrument config
    (:func:`metadata.config.load_instruments`) and the site's Windows path map; the MTF comes
    from the configured detector at the session's voltage.

    Raises
    ------
    UserError, MetadataError
        The path does not exist, holds no EPU/SerialEM metadata, or a file cannot be read.
    """
    from metadata.config import detector_for, load_instruments, locate_gain_reference
    from metadata.session import read_any

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: no such file or folder")
    if p.is_dir() and not os.access(p, os.R_OK | os.X_OK):
        raise UserError(f"{p}: permission denied")
    path_map: dict[str, Any] = {}
    try:
        from app.settings import load_settings

        path_map = dict(load_settings().paths.path_map)
    except UserError as exc:
        log.warning("site settings not used: %s", exc)
    cfg = load_instruments()
    try:
        res = read_any(p, cfg=cfg, path_map=path_map)
    except PermissionError as exc:
        raise UserError(f"{exc.filename or p}: permission denied") from None
    except OSError as exc:
        raise UserError(f"{exc.filename or p}: cannot read ({exc.strerror})") from None
    rec = res.record
    warnings = list(res.session.warnings) if res.session is not None else []
    if rec is None:
        raise MetadataError("no movie metadata found in this session (yet): no EPU movie XML "
                            "or mdoc with a movie", p)
    values = _record_values(rec)
    det = detector_for(rec, cfg)
    mtf = det.mtf_for(rec.voltage_kv) if det is not None else None
    if mtf:
        values["mtf_file"] = (mtf, "instrument config: detector MTF", None)
    warnings += list(rec.warnings)
    # the gain reference as a file that exists: SerialEM names it without a folder
    gain, how, gain_warning = locate_gain_reference(
        rec.gain_reference, movie_path=rec.movie_path,
        session_dir=p if p.is_dir() else p.parent, det=det)
    if gain is not None:
        src = (rec.source or {}).get("gain_reference")
        values["gain_reference"] = ((str(gain), f"{src} ({how})", None) if rec.gain_reference
                                    else (str(gain), None, how))
    if gain_warning:
        warnings.append(gain_warning)
    elif gain is None and not rec.gain_reference and res.session is not None:
        from metadata.session import movies_need_gain

        if movies_need_gain(res.session.dose_fractions_output_format):
            warnings.append("no gain reference found for these non-gain-normalised movies: "
                            "enter it (without it motion correction sums raw counts)")
    sw = (rec.software or (res.session.software if res.session else None) or "")
    kind = ("EPU" if res.kind.startswith("epu") or "epu" in sw.lower() else
            "SerialEM" if "serialem" in res.kind or res.kind == "mdoc" else res.kind)
    return ParsedSession(p, kind, values, warnings, res.n_movies, rec.movie_path)


def topaz_available() -> bool:
    """Whether the optional Topaz picker is installed (``scopeside[topaz]``)."""
    import importlib.util

    return importlib.util.find_spec("topaz") is not None


def newest_session(root: str | Path) -> Path | None:
    """The most recently modified folder directly under ``root`` (sessions root setting)."""
    r = Path(root)
    try:
        dirs = [d for d in r.iterdir() if d.is_dir() and not d.name.startswith(".")]
    except OSError:
        return None
    return max(dirs, key=lambda d: d.stat().st_mtime) if dirs else None


def sessions_root() -> Path | None:
    from app.settings import load_settings

    try:
        return load_settings().paths.sessions_root
    except UserError:
        return None


# ------------------------------------------------------------------------------------------
# Project creation
# ------------------------------------------------------------------------------------------

def default_project_dir(session_path: Path) -> Path:
    """``<projects_root or the session's parent>/<session name>_scopeside``."""
    from app.settings import load_settings

    try:
        root = load_settings().paths.projects_root
    except UserError:
        root = None
    base = Path(root) if root else Path(session_path).parent
    name = Path(session_path).name if Path(session_path).is_dir() else Path(session_path).stem
    return base / f"{name}_scopeside"


def movies_glob(session_path: Path | None, movie_path: str | None) -> str | None:
    """The import glob under ``Movies/`` (a link to the session folder) for the session's movies.

    EPU keeps movies in ``Images-Disc*/GridSquare_*/Data/``; the recorded movie's path with
    its grid-square folder and file stem replaced by wildcards covers every movie.
    """
    if session_path is None or not movie_path:
        return None
    sp, mp = Path(session_path), Path(movie_path)
    try:
        rel = mp.relative_to(sp) if mp.is_absolute() else mp
    except ValueError:
        rel = Path(mp.name)
    parts = ["GridSquare_*" if p.startswith("GridSquare_") else
             ("Images-Disc*" if p.startswith("Images-Disc") else p) for p in rel.parts[:-1]]
    name = rel.name
    for suffix in ("_fractions.tiff", "_Fractions.mrc", "_EER.eer", ".tiff", ".tif", ".mrc",
                   ".eer"):
        if name.endswith(suffix):
            return "/".join(["Movies", *parts, "*" + suffix])
    return "/".join(["Movies", *parts, "*" + Path(name).suffix])


def processing_settings(settings: dict[str, Any], session_path: Path | None,
                        movie_path: str | None = None):
    """The form's values as :class:`app.schemes.relion_it.ProcessingSettings`."""
    from pydantic import ValidationError

    from app.schemes.relion_it import ProcessingSettings

    known = ProcessingSettings.model_fields
    data = {k: v for k, v in settings.items() if k in known and v not in (None, "")}
    data["picker"] = str(settings.get("picker") or "LoG").lower()
    if settings.get("mtf_file"):
        data["mtf"] = settings["mtf_file"]
    glob = movies_glob(session_path, movie_path)
    if glob:
        data["movies_glob"] = glob
    try:
        return ProcessingSettings(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(x) for x in first["loc"])
        raise UserError(f"setting {key}: {first['msg']}") from None


def create_project(settings: dict[str, Any], session_path: Path | None,
                   movie_path: str | None = None) -> Path:
    """Create the project (``Schemes/prep`` + ``Schemes/proc`` with the settings applied).

    ``Movies`` in the project links to the session folder (RELION's convention). Uses
    :func:`app.schemes.api.create_project`.
    """
    from app.schemes import api

    if not settings.get("project_dir"):
        raise UserError("Project directory is missing")
    project = Path(settings["project_dir"]).expanduser().resolve()
    if (project / "Schemes").exists():
        raise UserError(f"{project}: already a project; use 'Open project' to monitor it")
    ps = processing_settings(settings, session_path, movie_path)
    gain = settings.get("gain_reference")
    if gain and not Path(str(gain)).expanduser().is_file():
        raise UserError(f"Gain reference {gain}: file not found (give its full path, or clear "
                        "the field if the movies are gain-corrected)")
    template = settings.get("slurm_template")
    if settings.get("executor") == "slurm" and not (template and Path(template).is_file()):
        raise UserError(f"SLURM template {template!r} is not a file")
    try:
        project.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{project}: cannot create the project folder ({exc.strerror})") from None
    if session_path is not None and not (project / "Movies").exists():
        src = Path(session_path)
        (project / "Movies").symlink_to(src if src.is_dir() else src.parent,
                                        target_is_directory=True)
    api.create_project(project, ps)
    if settings.get("executor") == "slurm":
        _write_executor_settings(project, str(template))
    return project


def _write_executor_settings(project: Path, template: str) -> None:
    """The project's ``scopeside.toml``: run this project's jobs through SLURM."""
    import tomli_w

    data = {"executor": {"kind": "slurm", "slurm_template": str(Path(template).resolve())}}
    (project / "scopeside.toml").write_text(tomli_w.dumps(data), encoding="utf-8")


def create_and_start(settings: dict[str, Any], session_path: Path | None,
                     start: bool = True, movie_path: str | None = None) -> Path:
    project = create_project(settings, session_path, movie_path)
    if start:
        for name in ("prep", "proc"):
            start_scheme(project, name)
    return project


# ------------------------------------------------------------------------------------------
# Schemer control (app.schemes.api; the run itself in a detached process)
# ------------------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


_children: list[subprocess.Popen] = []


def start_scheme(project: Path, scheme: str) -> int:
    """Start the schemer for ``scheme`` as a detached process; returns its pid.

    The process is ``python -m app.cli -v schemer --project P --scheme S --run`` (the same
    command line a user scripts) in its own session, so closing the GUI does not stop it;
    its output goes to ``Schemes/<S>/schemer.log``. The executor is the project's setting
    (``scopeside.toml``, written by :func:`create_project`).
    """
    from app.schemes import api

    reap_children()
    project = Path(project)
    if not (project / "Schemes" / scheme / "scheme.star").exists():
        raise UserError(f"{project}: no scheme {scheme!r}")
    if scheme_running(project, scheme):
        raise UserError(f"scheme {scheme} is already running")
    api.status(project, scheme)  # fails early (clear message) on a broken scheme.star
    log_path = project / "Schemes" / scheme / "schemer.log"
    cmd = [sys.executable, "-m", "app.cli", "-v", "schemer", "--project", str(project),
           "--scheme", scheme, "--run"]
    with open(log_path, "ab") as fh:
        proc = subprocess.Popen(cmd, cwd=project, env=_env(), stdin=subprocess.DEVNULL,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    _children.append(proc)
    return proc.pid


def reap_children() -> list[tuple[int, int]]:
    """Collect schemers this process started that have ended: [(pid, exit status)]."""
    done = []
    for p in list(_children):
        rc = p.poll()
        if rc is not None:
            _children.remove(p)
            done.append((p.pid, rc))
    return done


def scheme_running(project: Path, scheme: str) -> bool:
    from app.schemes.schemer import is_running

    return is_running(Path(project), scheme)


def scheme_status(project: Path, scheme: str) -> dict[str, Any]:
    """:func:`app.schemes.api.status` (plain data)."""
    from app.schemes import api

    return api.status(Path(project), scheme)


def abort_scheme(project: Path, scheme: str) -> bool:
    from app.schemes import api

    return api.abort(Path(project), scheme)


def reset_scheme(project: Path, scheme: str) -> None:
    from app.schemes import api

    api.reset(Path(project), scheme)


def set_variable(project: Path, scheme: str, name: str, value: str) -> None:
    from app.schemes import api

    api.set_variable(Path(project), scheme, name, value)


def set_job_option(project: Path, scheme: str, job: str, option: str, value: str) -> None:
    from app.schemes import api

    api.set_job_option(Path(project), scheme, job, option, value)


def wait_schemers_stopped(project: Path, schemes: list[str], timeout_s: float = 30.0) -> bool:
    """After an abort: wait (in a worker) until none of ``schemes`` runs any more."""
    import time

    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        reap_children()
        if not any(scheme_running(project, s) for s in schemes):
            return True
        time.sleep(0.2)
    return False


# ------------------------------------------------------------------------------------------
# Operator's class choices: for the Select job and as ranker feedback
# ------------------------------------------------------------------------------------------

def store_class_choices(project: Path, select_job: str | None, class2d_job: str,
                        iteration: int, class_numbers: np.ndarray, selected: np.ndarray,
                        auto_selected: np.ndarray, scores: np.ndarray,
                        reference_images: list[str]) -> list[Path]:
    """Write the operator's selection where the select job and the ranker read it.

    - ``<Select job>/backup_selection.star``: RELION's manual-selection file, one
      ``rlnSelected`` (1/0) per class in class order (as ``relion_display`` and the ranker's
      select job write it), so re-running the select job or opening it in RELION keeps the
      operator's choice;
    - ``<Select job>/ranker_feedback.star``: every class with the ranker's score, its own
      decision and the operator's (:func:`app.jobs.rank_select.write_feedback`), training
      data for the class ranker.
    Without a Select job yet (classes not ranked) both go to ``Select/manual/``.
    Returns the files written.
    """
    import pandas as pd

    from app.jobs.rank_select import write_feedback
    from metadata.star import write_star

    sel_dir = Path(project) / (select_job or "Select/manual")
    sel_dir.mkdir(parents=True, exist_ok=True)
    order = np.argsort(class_numbers)
    backup = write_star(sel_dir / "backup_selection.star",
                        {"": pd.DataFrame({"rlnSelected": selected[order].astype(int)})})
    refs = reference_images or [f"{int(c):06d}@{class2d_job}" for c in class_numbers]
    model = f"{class2d_job.rstrip('/')}/run_it{iteration:03d}_model.star"
    fb = write_feedback(sel_dir, model, class_numbers[order], [refs[i] for i in order],
                        scores[order], selected[order], auto_selected[order])
    return [backup, Path(fb)]
