"""``scopeside`` command-line entry point.

Each subcommand lives in its own module under :mod:`app.commands` with
``add_args(parser)`` and ``main(args) -> int``; the module docstring is its
``--help`` text. Heavy imports happen inside ``main`` so ``--help`` stays fast.

Exit status: 0 success, 1 the work itself failed (e.g. a job failed),
2 bad input (one clear line on stderr), 3 an unexpected internal error
(short message; full traceback in the crash log).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from app import __version__
from app.errors import USER_ERRORS

#: subcommand name -> module under app.commands
COMMANDS: dict[str, str] = {
    "gui": "gui",
    "demo": "demo",
    "metadata": "metadata",
    "schemer": "schemer",
    "job": "job",
    "rank": "rank",
    "simulate": "simulate",
    "config": "config",
}

#: subcommands that compute: the device choice (SCOPESIDE_DEVICE) is checked before they start
DEVICE_COMMANDS = ("demo", "job", "rank", "simulate")

log = logging.getLogger("scopeside")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scopeside",
        description="Microscope-side cryo-EM processing: EPU/SerialEM session -> 3D structure. "
        "Run without a subcommand to open the GUI.",
    )
    parser.add_argument("--version", action="version", version=f"scopeside {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more output (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in COMMANDS.items():
        mod = importlib.import_module(f"app.commands.{modname}")
        doc = (mod.__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else name
        p = sub.add_parser(name, help=summary, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_args(p)
        p.set_defaults(_module=mod)
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; returns the exit status (never raises for user errors)."""
    from app import logging_setup

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) != "job":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    logging_setup.configure(args.verbose)
    mod = getattr(args, "_module", None)
    if mod is None:  # no subcommand: the GUI
        mod = importlib.import_module("app.commands.gui")
        args = parser.parse_args(["gui", *(argv or [])])
        args.extra = []
    try:
        if args.command in DEVICE_COMMANDS:
            from compute.backend import select_device

            select_device()  # SCOPESIDE_DEVICE=gpu without a GPU: one clear line, exit 2
        return int(mod.main(args) or 0)
    except USER_ERRORS as exc:
        print(f"scopeside {args.command or 'gui'}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scopeside: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`scopeside metadata DIR | head`): stop quietly, as Unix tools do;
        # stdout is pointed at /dev/null so the interpreter's final flush cannot fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as exc:  # an internal error: short message, traceback to the crash log
        path = logging_setup.crash_log_path()
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"--- scopeside {__version__} {' '.join(sys.argv)}\n")
            traceback.print_exc(file=fh)
        print(f"scopeside: internal error: {type(exc).__name__}: {exc}\n"
              f"  (full traceback in {path}; please report it)", file=sys.stderr)
        return 3


def main() -> None:
    sys.exit(run(sys.argv[1:]))


def gui_main() -> None:
    sys.exit(run(["gui", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
