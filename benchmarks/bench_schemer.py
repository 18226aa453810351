"""Schemer overhead: time per operator node and for 1,000 loop passes of operators.

Each step of the schemer executes the node and saves scheme.star atomically (as it must, so
a killed schemer resumes), so the figure includes the write. The benchmark scheme carries
all of the shipped proc scheme's variables, operators and jobs (a realistic file size) plus a
loop ``WAIT(0 s) -> INC -> CHECK -(fork)-> WAIT`` that runs N passes and then exits.

    .venv/bin/python benchmarks/bench_schemer.py [--passes 1000]

Targets (issue 4): < 50 ms per operator node; 1,000 loop passes < 5 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.executors.inline import InlineExecutor  # noqa: E402
from app.schemes.model import Edge, Operator, Var  # noqa: E402
from app.schemes.schemer import Event, Schemer  # noqa: E402
from app.schemes.templates import build_proc, write_scheme  # noqa: E402


def make_bench_scheme(project: Path, passes: int) -> None:
    sch, jobs = build_proc()
    sch.name, sch.scheme_dir_name = "bench", "Schemes/bench/"
    sch.floats["zero"] = Var(0.0, 0.0)
    sch.floats["count"] = Var(0.0, 0.0)
    sch.floats["passes"] = Var(float(passes), float(passes))
    sch.bools["more"] = Var(True, True)
    sch.operators.update({
        "B_WAIT": Operator("wait", "undefined", "zero", "undefined"),
        "B_INC": Operator("float=plus", "count", "count", "1"),
        "B_CHECK": Operator("bool=lt", "more", "count", "passes"),
        "B_END": Operator("exit", "undefined", "undefined", "undefined"),
    })
    sch.edges = [Edge("B_WAIT", "B_INC"), Edge("B_INC", "B_CHECK"),
                 Edge("B_CHECK", "B_END", True, "B_WAIT", "more"), *sch.edges]
    sch.current_node = "B_WAIT"
    write_scheme(project / "Schemes" / "bench", sch, jobs)


def run_once(root: str | None, passes: int, save_interval_s: float) -> dict:
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        project = Path(tmp)
        make_bench_scheme(project, passes)
        stamps: list[float] = []

        def on_event(e: Event) -> None:
            if e.kind == "node":
                stamps.append(time.perf_counter())

        schemer = Schemer(project, "bench", InlineExecutor(), on_event=on_event,
                          save_interval_s=save_interval_s)
        t0 = time.perf_counter()
        res = schemer.run()
        total = time.perf_counter() - t0
        size = (project / "Schemes/bench/scheme.star").stat().st_size
    assert res.state == "finished", res.message
    steps_ms = sorted(1000 * (b - a) for a, b in zip(stamps, stamps[1:]))
    return {"total": total, "nodes": len(res.visited), "size": size,
            "mean": statistics.mean(steps_ms), "median": statistics.median(steps_ms),
            "p99": steps_ms[int(0.99 * (len(steps_ms) - 1))], "max": steps_ms[-1],
            "ops": len(schemer.scheme.operators), "jobs": len(schemer.scheme.jobs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", type=int, default=1000)
    ap.add_argument("--dir", default=None, help="where the project lives (default: $TMPDIR)")
    args = ap.parse_args()
    rows = [("every step saved, project disk", args.dir, 0.0)]
    if Path("/dev/shm").is_dir():
        rows.append(("every step saved, tmpfs (/dev/shm)", "/dev/shm", 0.0))
    rows.append(("save_interval_s=0.05, project disk", args.dir, 0.05))
    print(f"{args.passes} loop passes of WAIT(0 s) -> INC -> CHECK (targets: < 50 ms per "
          "operator node; 1,000 passes < 5 s)")
    print(f"{'mode':<38} {'total s':>8} {'nodes':>6} {'mean ms':>8} {'median':>7} "
          f"{'p99':>7} {'max':>7}")
    for label, root, interval in rows:
        r = run_once(root, args.passes, interval)
        print(f"{label:<38} {r['total']:8.2f} {r['nodes']:6d} {r['mean']:8.3f} "
              f"{r['median']:7.3f} {r['p99']:7.3f} {r['max']:7.2f}")
    print(f"(scheme.star of {r['size']} bytes: {r['ops']} operators, {r['jobs']} jobs)")


if __name__ == "__main__":
    main()
