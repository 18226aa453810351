"""Open the GUI: session setup, then the monitor (or monitor an existing project).

  scopeside gui                       the session setup window
  scopeside gui --session DIR         read this EPU/SerialEM session straight away
  scopeside gui --project DIR         monitor an existing project (reopen after closing)

Needs a display (X11/Wayland); without one set QT_QPA_PLATFORM=offscreen (screenshots,
tests) or use the command-line twins (`scopeside schemer`, `scopeside job`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from app.errors import UserError


def add_args(parser):
    parser.add_argument("--project", type=Path, help="monitor this existing project")
    parser.add_argument("--session", type=Path, help="EPU/SerialEM session folder to read")


def display_problem(env: dict[str, str] | None = None, platform: str | None = None) -> str | None:
    """Why Qt could not open a window here, or None (the check runs before Qt is imported)."""
    env = dict(os.environ) if env is None else env
    platform = platform or sys.platform
    if env.get("QT_QPA_PLATFORM") or not platform.startswith("linux"):
        return None
    if env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"):
        return None
    return ("no display: DISPLAY and WAYLAND_DISPLAY are unset. Run the GUI on the "
            "microscope PC's desktop (or ssh -X), set QT_QPA_PLATFORM=offscreen for "
            "screenshots, or use the command line (scopeside schemer / job)")


def main(args) -> int:
    problem = display_problem()
    if problem:
        raise UserError(problem)
    if args.project is not None and not (args.project / "Schemes").is_dir():
        raise UserError(f"{args.project}: not a project (no Schemes folder)")
    if args.session is not None and not args.session.exists():
        raise UserError(f"{args.session}: no such session folder")
    from app.gui.app import run_gui

    return run_gui(project=args.project, session=args.session)
