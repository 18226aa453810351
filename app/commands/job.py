"""Run one job by hand: ``scopeside job TYPE --o DIR --OPTION VALUE ...``.

TYPE is one of import, motioncorr, ctffind, select, autopick, extract, class2d,
inimodel3d, refine3d (or a RELION type label such as relion.class2d). OPTION
names are RELION 4's job.star option names (--fn_img, --nr_classes, ...).
Alternatively ``scopeside job --job-star FILE --o DIR`` takes everything from a
job.star. Output goes to DIR with RELION's exit markers; the exit status is 0
on success and 1 when the job failed or was aborted.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from app.errors import UserError

#: set by executors: stdout/stderr already go to run.out/run.err
REDIRECTED_ENV = "SCOPESIDE_JOB_REDIRECTED"


def add_args(parser):
    parser.add_argument("type", nargs="?", help="job type (e.g. class2d) or RELION label")
    parser.add_argument("--o", dest="out", required=True, metavar="DIR", help="job directory")
    parser.add_argument("--job-star", "--job_star", dest="job_star", metavar="FILE",
                        help="take type and options from this job.star")
    parser.add_argument("--continue", dest="is_continue", action="store_true",
                        help="continue in DIR, processing only what is not done yet")
    parser.add_argument("--project", metavar="DIR", default=None,
                        help="project directory (default: the current directory)")


def parse_extra(tokens: list[str]) -> dict[str, str]:
    """``--name value`` pairs (``--flag`` alone means Yes)."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if not t.startswith("--") or len(t) < 3:
            raise UserError(f"expected --OPTION VALUE, got {t!r}")
        name = t[2:]
        if "=" in name:
            name, val = name.split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            val = tokens[i + 1]
            i += 2
        else:
            val = "Yes"
            i += 1
        opts[name] = val
    return opts


def main(args) -> int:
    from app.jobs.base import run_job
    from app.logging_setup import add_file
    from app.schemes.jobstar import read_job_star

    extra = parse_extra(getattr(args, "extra", []) or [])
    is_continue = args.is_continue
    if args.job_star:
        js = read_job_star(Path(args.job_star))
        type_name = js.type_label
        options = {**js.options, **extra}
        is_continue = is_continue or js.is_continue
    elif args.type:
        type_name = args.type
        options = extra
    else:
        raise UserError("give a job TYPE or --job-star FILE")

    out = Path(args.out)
    if args.project and not out.is_absolute():
        out = Path(args.project) / out  # the logs go where run_job puts the job's outputs
    root = logging.getLogger()
    if not os.environ.get(REDIRECTED_ENV):
        out.mkdir(parents=True, exist_ok=True)
        add_file(out / "run.out", logging.INFO)
        add_file(out / "run.err", logging.WARNING)
    stdout = logging.StreamHandler(sys.stdout)
    stdout.setLevel(logging.INFO)
    stdout.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    stdout._scopeside = True  # type: ignore[attr-defined]
    root.addHandler(stdout)
    return run_job(type_name, out, options, is_continue=is_continue,
                   project_dir=Path(args.project) if args.project else None)
