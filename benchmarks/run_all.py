"""Run every ``benchmarks/bench_*.py`` and tabulate medians: wall time, peak memory, quality.

    .venv/bin/python benchmarks/run_all.py [--size small|standard] [--repeat 3]
                                           [--only motion,ctffind] [--out FILE.md]

Each benchmark runs as its own process (``OMP_NUM_THREADS`` as given, default 1) ``--repeat``
times; the table gives the median wall time, the median peak resident memory of that process
(``wait4`` rusage, children included), and the median of each benchmark's quality figure,
read from its printed table by the pattern in :data:`SPECS`. A benchmark this file does not
know yet runs with no arguments and its quality column says so. Full outputs are kept in
``--logs`` (default ``/tmp/scopeside-bench-logs``). The machine and its load average are
printed with the table (the development machine is shared: say so with the figures).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclass
class Spec:
    """How to call one benchmark and what to read from its output."""

    small: list[str]
    standard: list[str]
    #: (label, regex with one group) -> the quality figure(s), first match in stdout
    quality: list[tuple[str, str]] = field(default_factory=list)
    what: str = ""


SPECS: dict[str, Spec | dict[str, Spec]] = {
    "bench_3d": {
        "inimodel": Spec(
            ["inimodel", "--mol", "asym", "--n", "600", "--box", "32", "--iters", "40"],
            ["inimodel", "--mol", "asym", "--n", "5000", "--box", "64"],
            [("FSC0.5 vs truth Å", r"^\s*\d+\s+\d+\s+[\d.]+\s+[\d.]+\s+([\d.]+)"),
             ("Nyquist Å", r"^\s*\d+\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)")],
            "3D initial model (VDAM) vs truth"),
        "refine": Spec(
            ["refine", "--mol", "asym", "--n", "1000", "--box", "32"],
            ["refine", "--mol", "asym", "--n", "20000", "--box", "64"],
            [("half-map FSC0.143 Å", r"^\s*\d+\s+\d+\s+\d+\s+[\d.]+\s+([\d.]+)"),
             ("FSC0.5 vs truth Å", r"^\s*\d+\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+\s+([\d.]+)"),
             ("Nyquist Å", r"^\s*\d+\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+"
                           r"\s+([\d.]+)")],
            "3D gold-standard refinement vs truth"),
    },
    "bench_motion": Spec(
        ["--size", "1024", "--frames", "16", "--threads", "1"], ["--threads", "2"],
        [("drift-only trajectory RMS px", r"trajectory RMS error ([\d.]+) px \(frame-0"),
         ("5x5 patches CPU s", r"5x5 patches\s+[\d.]+\s+([\d.]+)"),
         ("5x5 patches FRC 1/50-1/4", r"5x5 patches\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)")],
        "motion correction of a simulated movie (4096² x 40 standard)"),
    "bench_ctffind": Spec(
        ["--n", "6", "--n-phase", "2", "--size", "512", "--threads", "1"], ["--threads", "2"],
        [("defocus within tolerance %", r"within max\(0\.5 %, 50 A\): \d+/\d+ = ([\d.]+) %"),
         ("4096² spectrum+fit s", r"= ([\d.]+) s")],
        "CTF estimation accuracy and speed"),
    "bench_pick_extract": Spec(
        ["--n", "1", "--size", "1024", "--threads", "1", "--diameters", "130"], ["--threads", "1"],
        [("precision", r"\n\s*\d+\s+all\s+\d+\s+\d+\s+([\d.]+)"),
         ("recall", r"\n\s*\d+\s+all\s+\d+\s+\d+\s+[\d.]+\s+([\d.]+)")],
        "LoG picking + extraction vs truth"),
    "bench_class2d": Spec(
        ["--set", "standard", "--n", "1000", "--k", "10", "--iters", "30", "--em-iters", "5",
         "--skip-noreplace"],
        ["--set", "standard"],
        [("VDAM good in matching classes",
          r"\n\| VDAM \| [\d.]+ \| [\d.]+ \| [^|]+ \| ([^|]+) \|"),
         ("EM good in matching classes", r"\n\| EM \| [\d.]+ \| [\d.]+ \| [^|]+ \| ([^|]+) \|")],
        "VDAM vs EM 2D classification vs truth"),
    "bench_ranker": Spec(
        ["--jobs", "2"], [],
        [("200-class scoring s", r"scoring 200 classes[^:]*: ([\d.]+) s"),
         ("held-aside MSE", r"held-aside jobs: MSE ([\d.]+)")],
        "class ranker speed and accuracy on unseen molecules"),
    "bench_schemer": Spec(
        ["--passes", "300"], [],
        [("total s (saved every step)", r"every step saved, project disk\s+([\d.]+)"),
         ("p99 ms per node", r"every step saved, project disk\s+[\d.]+\s+\d+\s+[\d.]+\s+[\d.]+"
                             r"\s+([\d.]+)")],
        "schemer loop overhead"),
    "bench_metadata": Spec(
        ["--n", "1000"], [],
        [("XML parse wall s", r"^parse \d+ EPU XMLs.*?\s([\d.]+)\s+<"),
         ("XML parse CPU s", r"same, CPU time of this process\s+([\d.]+)"),
         ("watcher (events) s", r"watcher, \d+ files in one folder \(events\)\s+([\d.]+)")],
        "EPU XML parsing, session discovery, watcher"),
    "bench_gui": Spec(
        ["--seconds", "5", "--classes", "100"], [],
        [("gallery fresh s (min/median)", r"fresh \(min/median\)\s+(\S+)"),
         ("largest event-loop gap ms", r"largest gap of a 10 ms timer\s+([\d.]+) ms")],
        "GUI gallery paint and event-loop stalls (offscreen)"),
}


def _run_once(script: Path, args: list[str], env: dict, log_path: Path, timeout: float
              ) -> tuple[float, float, int, str]:
    """(wall s, peak RSS MiB, exit code, stdout+stderr) of one run.

    The peak comes from ``wait4``'s rusage of that process: the largest resident set of the
    process or of any descendant it waited for (subprocess jobs included)."""
    import threading

    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    killed = False
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline and not killed:
            proc.kill()
            killed = True
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)
    wall = time.perf_counter() - t
    text = b"".join(chunks).decode("utf-8", "replace")
    if killed:
        text += "\n[run_all: killed after the time limit]\n"
    log_path.write_text(text, encoding="utf-8")
    log_path.with_suffix(".json").write_text(json.dumps(
        {"wall_s": wall, "peak_mib": ru.ru_maxrss / 1024.0, "exit": proc.returncode}))
    return wall, ru.ru_maxrss / 1024.0, proc.returncode, text


def _quality(spec: Spec | None, text: str) -> dict[str, str]:
    if spec is None:
        return {}
    out = {}
    for label, pat in spec.quality:
        m = re.search(pat, text, re.M)
        out[label] = m.group(1).strip() if m else "?"
    return out


def _median_text(vals: list[str]) -> str:
    nums = []
    for v in vals:
        try:
            nums.append(float(v.split("/")[0]))
        except ValueError:
            return vals[-1]
    return f"{statistics.median(nums):.4g}" if nums else "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=("small", "standard"), default="small")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated names (motion,ctffind,...)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the runs")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--logs", type=Path, default=Path("/tmp/scopeside-bench-logs"))
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    a = ap.parse_args(argv)
    scripts = sorted(HERE.glob("bench_*.py"))
    if a.only:
        want = {w.strip().removeprefix("bench_") for w in a.only.split(",") if w.strip()}
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in want]
        if not scripts:
            print(f"run_all: no benchmark matches --only {a.only}", file=sys.stderr)
            return 2
    a.logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "SCOPESIDE_THREADS": str(a.threads),
           "SCOPESIDE_DEVICE": os.environ.get("SCOPESIDE_DEVICE", "cpu"),
           "QT_QPA_PLATFORM": "offscreen", "PYTHONPATH": str(REPO)}
    load0 = os.getloadavg()
    rows = []
    runs: list[tuple[Path, str, Spec | None]] = []
    for script in scripts:
        spec = SPECS.get(script.stem)
        if isinstance(spec, dict):
            runs += [(script, f"{script.stem}:{k}", v) for k, v in spec.items()]
        else:
            runs.append((script, script.stem, spec))
    for script, name, spec in runs:
        args = (spec.small if a.size == "small" else spec.standard) if spec else []
        walls, peaks, quals, codes = [], [], [], []
        for k in range(a.repeat):
            log_path = a.logs / f"{name.replace(':', '.')}.{a.size}.{k + 1}.log"
            print(f"run_all: {script.name} {' '.join(args)} (run {k + 1}/{a.repeat})",
                  flush=True)
            wall, peak, code, text = _run_once(script, args, env, log_path, a.timeout)
            walls.append(wall)
            peaks.append(peak)
            codes.append(code)
            quals.append(_quality(spec, text))
            if code != 0:
                print(f"run_all: {script.name} exited {code}; see {log_path}", flush=True)
                break
        q = {}
        for label in (quals[0] if quals else {}):
            q[label] = _median_text([qq.get(label, "?") for qq in quals])
        quality = "; ".join(f"{k} {v}" for k, v in q.items()) if spec else (
            "(not known to run_all.py: see its log)")
        rows.append((name, " ".join(args) or "(defaults)", len(walls),
                     statistics.median(walls), max(peaks), quality,
                     "ok" if all(c == 0 for c in codes) else f"exit {codes[-1]}"))
    load1 = os.getloadavg()
    lines = [
        f"Benchmarks ({a.size} sizes), {a.repeat} runs each, OMP_NUM_THREADS={a.threads}, "
        f"{_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.python_implementation()} {platform.python_version()}; load average "
        f"{load0[0]:.1f} at start, {load1[0]:.1f} at end",
        "",
        "| benchmark | arguments | runs | median wall s | peak RSS MiB | quality (median) | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, args, n, wall, peak, quality, status in rows:
        lines.append(f"| {name} | `{args}` | {n} | {wall:.1f} | {peak:.0f} | {quality} | "
                     f"{status} |")
    table = "\n".join(lines)
    print("\n" + table)
    if a.out:
        a.out.write_text(table + "\n", encoding="utf-8")
    return 0 if all(r[-1] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
