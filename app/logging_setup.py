"""Logging configuration, done only by entry points (nothing happens at import)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import platformdirs

FMT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"


def configure(verbosity: int = 0, log_file: Path | None = None) -> None:
    """Console logging at WARNING/INFO/DEBUG for verbosity 0/1/2, optionally also to a file."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    for h in list(root.handlers):
        if getattr(h, "_scopeside", False):
            root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbosity <= 1 else FMT))
    console._scopeside = True  # type: ignore[attr-defined]
    root.addHandler(console)
    if log_file is not None:
        add_file(log_file)


def add_file(path: Path, level: int = logging.INFO) -> logging.Handler:
    """Also log to ``path`` (appending), e.g. a project's ``scopeside.log``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(path, encoding="utf-8")
    fh.setLevel(level)
    fh.setFormatter(logging.Formatter(FMT, DATEFMT))
    fh._scopeside = True  # type: ignore[attr-defined]
    logging.getLogger().addHandler(fh)
    return fh


def crash_log_path() -> Path:
    """Where unexpected tracebacks are written (the user log dir)."""
    d = Path(platformdirs.user_log_dir("scopeside", appauthor=False))
    d.mkdir(parents=True, exist_ok=True)
    return d / "crash.log"
