"""The new-movie watcher: completion by stable size, metadata gating, persistence across
restarts (including a SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from metadata import synth
from metadata.watcher import MovieWatcher, epu_metadata_for


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_chunked_write_emitted_once_complete(tmp_path):
    clock = FakeClock()
    root = tmp_path / "movies"
    root.mkdir()
    w = MovieWatcher(root, tmp_path / "state.txt", stable_s=5.0, polling=True, clock=clock,
                     rescan_interval_s=0.0)
    w.start()
    try:
        movie = root / "a_fractions.tiff"
        emitted = []
        for _chunk in range(6):
            with open(movie, "ab") as fh:
                fh.write(os.urandom(1000))
            clock.t += 2.0  # less than stable_s between chunks
            emitted += w.check()
        assert emitted == []  # still growing
        clock.t += 4.0
        assert w.check() == []  # unchanged for 4 s only
        clock.t += 2.0
        out = w.check()
        assert out == [movie.resolve()] and movie.stat().st_size == 6000
        clock.t += 100.0
        assert w.check() == []  # never twice
        assert (tmp_path / "state.txt").read_text().splitlines() == [str(movie.resolve())]
    finally:
        w.stop()


def test_waits_for_metadata_and_ignores_empty(tmp_path):
    clock = FakeClock()
    sess = tmp_path / "sess"
    store = tmp_path / "store"
    rel = Path("Images-Disc1/GridSquare_1/Data")
    movie = store / rel / "FoilHole_1_Data_2_3_20240101_120000_fractions.tiff"
    synth.write_movie_stub(movie)
    (store / rel / "empty.tiff").touch()
    w = MovieWatcher(store, tmp_path / "s.txt", stable_s=1.0, polling=True, clock=clock,
                     metadata_for=epu_metadata_for(sess, store), rescan_interval_s=0.0)
    with w:
        w.check()
        clock.t += 5
        assert w.check() == []  # no XML yet
        synth.write_epu_movie_xml(sess / rel / "FoilHole_1_Data_2_3_20240101_120000.xml")
        clock.t += 1
        assert w.check() == [movie.resolve()]
        clock.t += 10
        assert w.check() == []  # the empty file is never complete


def test_restart_neither_repeats_nor_loses(tmp_path):
    clock = FakeClock()
    root = tmp_path / "m"
    for k in range(5):
        synth.write_movie_stub(root / f"m{k}.mrc")
    state = tmp_path / "state.txt"
    with MovieWatcher(root, state, stable_s=1, polling=True, clock=clock) as w:
        w.check()
        clock.t += 2
        first = w.check()
    assert len(first) == 5
    for k in range(5, 8):
        synth.write_movie_stub(root / f"m{k}.mrc")
    with open(state, "ab") as fh:  # a torn line from a crash mid-write
        fh.write(str(root / "m9.mrc").encode())
    synth.write_movie_stub(root / "m9.mrc")
    with MovieWatcher(root, state, stable_s=1, polling=True, clock=clock) as w:
        w.check()
        clock.t += 2
        second = w.check()
    assert sorted(p.name for p in second) == ["m5.mrc", "m6.mrc", "m7.mrc", "m9.mrc"]
    lines = state.read_text().splitlines()
    assert len(lines) == len(set(lines)) == 9


def test_native_events_discover_new_files(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    with MovieWatcher(root, tmp_path / "s.txt", stable_s=0.0, rescan_interval_s=None) as w:
        assert w.mode in ("events", "polling")
        synth.write_movie_stub(root / "sub" / "x.eer")
        deadline = time.monotonic() + 10
        got = []
        while time.monotonic() < deadline and not got:
            time.sleep(0.1)
            got = w.check()
        assert [p.name for p in got] == ["x.eer"]


def test_kill_and_restart(tmp_path):
    """A watcher process killed with SIGKILL mid-stream, then restarted: every movie is in the
    state file exactly once."""
    root = tmp_path / "m"
    n = 60
    for k in range(n):
        synth.write_movie_stub(root / f"d{k // 20}" / f"m{k:03d}.tiff", n_frames=1, shape=(8, 8))
    state = tmp_path / "state.txt"
    cmd = [sys.executable, "-m", "metadata.watcher", str(root), "--state", str(state),
           "--stable", "0.3", "--interval", "0.05", "--polling"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    # add more files while it runs, then kill it hard
    for k in range(n, n + 40):
        synth.write_movie_stub(root / "late" / f"m{k:03d}.tiff", n_frames=1, shape=(8, 8))
        time.sleep(0.01)
    time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    first_out = p.communicate()[0].decode().split()
    p2 = subprocess.run(cmd + ["--seconds", "3"], capture_output=True, env=env, timeout=60)
    second_out = p2.stdout.decode().split()
    lines = state.read_text().splitlines()
    assert len(lines) == len(set(lines)) == n + 40
    assert not set(first_out) & set(second_out)  # nothing handed out twice
    assert set(second_out) | set(first_out) <= set(lines)
