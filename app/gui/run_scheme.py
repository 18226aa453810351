"""Detached schemer process started by the GUI: ``python -m app.gui.run_scheme PROJECT SCHEME``.

Runs :class:`app.schemes.schemer.Schemer` for one scheme until it ends, is aborted or
fails, with the executor from the project's settings (``scopeside.toml``, site config).
No Qt is imported here; the GUI only watches the files this process and its jobs write.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from app import logging_setup
    from app.errors import USER_ERRORS
    from app.executors import make_executor
    from app.schemes.schemer import Schemer
    from app.settings import load_settings

    p = argparse.ArgumentParser(prog="python -m app.gui.run_scheme")
    p.add_argument("project")
    p.add_argument("scheme")
    args = p.parse_args(argv)
    logging_setup.configure(1)
    log = logging.getLogger("scopeside.gui.run_scheme")
    project = Path(args.project)
    try:
        kind = load_settings(project).executor.kind
        result = Schemer(project, args.scheme, executor=make_executor(kind)).run()
    except USER_ERRORS as exc:
        log.error("scheme %s: %s", args.scheme, exc)
        return 2
    log.info("scheme %s ended: %s %s", args.scheme, result.state, result.message)
    return 0 if result.state == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
