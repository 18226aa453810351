"""Run, abort, reset, inspect or edit a RELION-4 Scheme.

  scopeside schemer --project DIR --scheme NAME --run [--executor local|slurm]
  scopeside schemer --project DIR --scheme NAME --status [--json]
  scopeside schemer --project DIR --scheme NAME --abort | --reset | --unlock
  scopeside schemer --project DIR --scheme NAME --set VAR=VALUE [--set VAR=VALUE ...]
  scopeside schemer --project DIR --scheme NAME --set-job-option JOB OPTION=VALUE
  scopeside schemer --project DIR --scheme NAME --set-current-node NODE

Files are RELION 4's (Schemes/NAME/scheme.star, one job.star per job), so a scheme runs in
either program. --run exits 0 when the scheme ends normally, 1 when a job failed or the run
was aborted. The executor defaults to the site/project setting ``[executor] kind``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from app.errors import UserError


def add_args(parser):
    parser.add_argument("--project", required=True, metavar="DIR", help="project directory")
    parser.add_argument("--scheme", required=True, metavar="NAME", help="scheme name (prep, proc)")
    act = parser.add_mutually_exclusive_group(required=True)
    act.add_argument("--run", action="store_true", help="run the scheme until it ends")
    act.add_argument("--abort", action="store_true", help="ask a running scheme to stop")
    act.add_argument("--reset", action="store_true", help="variables and jobs back to the start")
    act.add_argument("--status", action="store_true", help="current node, variables, jobs")
    act.add_argument("--set", action="append", metavar="VAR=VALUE", help="set a variable")
    act.add_argument("--set-job-option", "--set_job_option", nargs=2,
                     metavar=("JOB", "OPTION=VALUE"),
                     help="change a job's option (the job's next visit makes a new job)")
    act.add_argument("--set-current-node", "--set_current_node", metavar="NODE",
                     help="where the next --run starts")
    act.add_argument("--unlock", action="store_true",
                     help="remove a lock left by a schemer that is no longer running")
    parser.add_argument("--json", action="store_true", help="with --status: print JSON")
    parser.add_argument("--executor", choices=["local", "slurm"], default=None,
                        help="where jobs run (default: the [executor] setting)")


def _split_assignment(text: str, what: str) -> tuple[str, str]:
    if "=" not in text:
        raise UserError(f"{what}: expected NAME=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    if not k.strip():
        raise UserError(f"{what}: empty name in {text!r}")
    return k.strip(), v


def _make_executor(kind: str | None, project: Path):
    from app.executors import make_executor
    from app.settings import load_settings

    s = load_settings(project)
    kind = kind or s.executor.kind
    if kind == "slurm":
        return make_executor("slurm", template=s.executor.slurm_template, queue=s.executor.queue,
                             extra={"extra1": s.executor.extra1, "extra2": s.executor.extra2})
    return make_executor(kind)


def _print_status(st: dict) -> None:
    print(f"scheme {st['scheme']} ({st['project']}): {st['state']}"
          + (f" (pid {st['pid']})" if st["running"] and st["pid"] else ""))
    if st["message"]:
        print(f"  last message: {st['message']}")
    print(f"  current node: {st['current_node']}")
    print("  variables:")
    for k, v in st["variables"].items():
        print(f"    {k:<22} {v['type']:<6} {v['value']!s:<40} (reset {v['reset']})")
    print("  jobs:")
    for j in st["jobs"]:
        mode = j["mode"] if j.get("mode_ok", True) else f"{j['mode']!r}?"  # '' -> ''? not blank
        print(f"    {j['name']:<14} {j['current']:<22} {mode:<8} {j['type']:<22} "
              f"{j['state']}" + ("" if j.get("mode_ok", True) else
                                 "  (mode is neither new nor continue)"))


def main(args) -> int:
    from app.schemes import api
    from app.schemes.schemer import Schemer

    project = Path(args.project)
    name = args.scheme
    if not (project / "Schemes" / name / "scheme.star").exists():
        raise UserError(f"no scheme {name!r} in {project} "
                        f"({project / 'Schemes' / name / 'scheme.star'} not found)")
    if args.status:
        st = api.status(project, name)
        if args.json:
            json.dump(st, sys.stdout, indent=1)
            print()
        else:
            _print_status(st)
        return 0
    if args.abort:
        running = api.abort(project, name)
        print(f"abort requested for scheme {name}" if running
              else f"scheme {name} is not running")
        return 0
    if args.reset:
        api.reset(project, name)
        print(f"scheme {name} reset")
        return 0
    if args.unlock:
        api.unlock(project, name)
        return 0
    if args.set:
        for item in args.set:
            k, v = _split_assignment(item, "--set")
            api.set_variable(project, name, k, v)
        return 0
    if args.set_job_option:
        job, assignment = args.set_job_option
        k, v = _split_assignment(assignment, "--set-job-option")
        api.set_job_option(project, name, job, k, v)
        return 0
    if args.set_current_node:
        api.set_current_node(project, name, args.set_current_node)
        return 0
    # --run
    import logging

    from app.logging_setup import add_file

    add_file(project / "Schemes" / name / "schemer.log", logging.INFO)
    result = Schemer(project, name, _make_executor(args.executor, project)).run()
    print(f"scheme {name} {result.state}: {result.message}")
    return 0 if result.state == "finished" else 1
