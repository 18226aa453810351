"""Make a small synthetic EPU (or SerialEM) session and run prep + proc end to end.

  scopeside demo [--headless] [--out DIR] [--movies N] [--live] [--software epu|serialem]

Runs the real schemes through the local executor and writes ``DIR/report/report.html``.
Running it again with the same ``--out`` continues where the last run stopped.
See docs/demo.md.
"""

from __future__ import annotations

from pathlib import Path

from app.errors import UserError


def add_args(parser):
    parser.add_argument("--out", type=Path, default=Path("scopeside-demo"),
                        help="folder for the session, the project and the report "
                             "(default ./scopeside-demo; the same folder again continues)")
    parser.add_argument("--movies", type=int, default=16, help="number of movies (default 16)")
    parser.add_argument("--live", action="store_true",
                        help="drip the movies in at a microscope-like rate while processing")
    parser.add_argument("--interval", type=float, default=15.0,
                        help="--live: seconds between movies (default 15)")
    parser.add_argument("--software", choices=("epu", "serialem"), default="epu",
                        help="session layout to simulate (default epu)")
    parser.add_argument("--headless", action="store_true",
                        help="terminal only (no GUI monitor even when a display exists)")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")


def main(args) -> int:
    from app.commands.gui import display_problem
    from app.demo import DemoConfig, run_demo

    if args.movies < 2:
        raise UserError("--movies: at least 2 movies are needed")
    if args.interval <= 0:
        raise UserError("--interval: must be positive")
    gui = False
    if not args.headless:
        problem = display_problem()
        if problem:
            print(f"scopeside demo: no GUI monitor ({problem.split('.')[0]}); "
                  "terminal progress only (use --headless to skip this check)")
        else:
            gui = True
    cfg = DemoConfig(out=args.out, n_movies=args.movies, software=args.software,
                     live=args.live, interval_s=args.interval, report=not args.no_report,
                     gui=gui)
    try:
        res = run_demo(cfg)
    except KeyboardInterrupt:
        print(f"\nscopeside demo interrupted: a job that was running goes on by itself; run the "
              f"same command again (same --out {args.out}) to continue where it stopped")
        return 130
    return 0 if res.state == "finished" else 1
