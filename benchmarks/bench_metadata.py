"""Metadata benchmarks (issue 3 acceptance figures).

    .venv/bin/python benchmarks/bench_metadata.py [--n 10000] [--keep DIR]

1. parse N EPU movie XMLs (copies of a real EPU 3.9 sample when ../shared/samples is
   present, else synthetic ones of the same schema)             target: N=10,000 < 10 s
2. discover an EPU session of N movies (XML + movie each) and match them
3. watcher: N movie files appearing in one folder, all emitted    target: N=10,000 < 30 s
   (native events, then polling mode)

Prints a table; timings depend on the machine's load (the development machine is shared).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metadata import epu, session, synth  # noqa: E402
from metadata.watcher import MovieWatcher  # noqa: E402

SAMPLE = (Path(__file__).resolve().parents[2] / "shared" / "samples" / "epu"
          / "emtestdata__FoilHole_5850127_Data_5798426_5798428_20221104_061329.xml")


def bench_parse(work: Path, n: int) -> tuple[float, float, str]:
    d = work / "xml"
    d.mkdir()
    data = SAMPLE.read_bytes() if SAMPLE.exists() else synth.epu_movie_xml().encode()
    what = "real EPU 3.1 sample (11 KB)" if SAMPLE.exists() else "synthetic"
    paths = []
    for k in range(n):
        p = d / f"FoilHole_{k}_Data_1_1_20240101_120000.xml"
        p.write_bytes(data)
        paths.append(p)
    t0 = time.perf_counter()
    c0 = time.process_time()
    for p in paths:
        r = epu.parse_movie_xml(p)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    assert r.voltage_kv == 300.0
    return dt, cpu, what


def bench_discovery(work: Path, n: int) -> float:
    root = work / "sess"
    per_square = 250
    squares = max(1, n // per_square)
    text = synth.epu_movie_xml()
    # write the tree directly (faster than write_epu_session for 10,000 files)
    for g in range(squares):
        d = root / "Images-Disc1" / f"GridSquare_{g}" / "Data"
        d.mkdir(parents=True)
        for k in range(per_square):
            stem = f"FoilHole_{g * 1000 + k}_Data_1_{k}_20240101_120000"
            (d / f"{stem}.xml").write_text(text)
            (d / f"{stem}_fractions.tiff").write_bytes(b"II*\x00")
    synth.write_epu_session_dm(root / "EpuSession.dm")
    t0 = time.perf_counter()
    idx = session.index_epu_session(root)
    dt = time.perf_counter() - t0
    assert idx.n_movies == squares * per_square and not idx.metadata_without_movie
    return dt


def bench_watcher(work: Path, n: int, polling: bool) -> float:
    root = work / ("watch_poll" if polling else "watch_events")
    root.mkdir()
    state = work / f"state_{polling}.txt"
    got = 0
    stop = threading.Event()
    with MovieWatcher(root, state, stable_s=0.5, polling=polling, poll_interval_s=1.0,
                      rescan_interval_s=None) as w:
        t0 = time.perf_counter()
        for k in range(n):
            (root / f"movie_{k:05d}_fractions.tiff").write_bytes(b"II*\x00" + b"\x00" * 60)
        t_written = time.perf_counter() - t0
        deadline = time.perf_counter() + 120
        while got < n and time.perf_counter() < deadline and not stop.is_set():
            got += len(w.check())
            time.sleep(0.1)
        dt = time.perf_counter() - t0
    lines = state.read_text().splitlines()
    assert got == n == len(set(lines)), (got, n, len(lines))
    print(f"    (writing the {n} files took {t_written:.1f} s of that; mode {w.mode})")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep")
    a = ap.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="bench_metadata_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        dt, cpu, what = bench_parse(work, a.n)
        rows.append((f"parse {a.n} EPU XMLs ({what})", dt, 10.0 * a.n / 10000))
        rows.append(("  same, CPU time of this process", cpu, 10.0 * a.n / 10000))
        rows.append((f"discover + match EPU session, {a.n} movies", bench_discovery(work, a.n), None))
        rows.append((f"watcher, {a.n} files in one folder (events)", bench_watcher(work, a.n, False),
                     30.0 * a.n / 10000))
        rows.append((f"watcher, {a.n} files in one folder (polling)", bench_watcher(work, a.n, True),
                     30.0 * a.n / 10000))
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'benchmark':<58} {'seconds':>8} {'target':>8}  ok")
    ok_all = True
    for name, dt, target in rows:
        ok = target is None or dt < target
        ok_all &= ok
        tgt = f"< {target:.0f}" if target else "-"
        print(f"{name:<58} {dt:8.2f} {tgt:>8}  {'yes' if ok else 'NO'}")
    print(f"(cpu count {os.cpu_count()}, load {os.getloadavg()[0]:.1f})")
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
