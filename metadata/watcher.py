"""New-movie watcher for on-the-fly processing.

A :class:`MovieWatcher` finds movies appearing under a folder and *emits* each one once it
is complete:

- discovery: a watchdog observer (inotify etc.) feeds candidate paths; with
  ``polling=True`` (network mounts, where file-system events do not arrive) watchdog's
  polling observer is used instead, and if the native observer cannot start (inotify
  limits) the watcher falls back to polling by itself. A full rescan runs at start and
  every ``rescan_interval_s`` in any case, so a missed event only delays a movie.
- completion: the file size (and mtime) must stay unchanged for ``stable_s`` seconds, and,
  when ``metadata_for`` is given, the movie's metadata file (EPU XML, mdoc) must exist.
- memory: every emitted path is appended to ``state_file`` (one absolute path per line,
  flushed and fsync'ed in one write per batch) *before* it is handed out, and read back at
  start. A restart therefore neither repeats nor loses movies; a line torn by a crash is
  cut off at start and its movie emitted again (it had not been handed out).

The watcher never raises for a bad file: it logs and carries on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_SUFFIXES = (".tiff", ".tif", ".mrc", ".eer")


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    changed_at: float
    seen: int = 1
    waiting_metadata_logged: bool = False


def _load_state(path: Path) -> list[str]:
    """Emitted paths from the state file; a torn last line (no newline) is cut off."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    end = data.rfind(b"\n")
    if end + 1 != len(data):
        log.warning("%s: cutting a torn last line (crash while writing)", path)
        with open(path, "r+b") as fh:
            fh.truncate(end + 1)
        data = data[: end + 1]
    return [ln for ln in data.decode("utf-8", errors="surrogateescape").split("\n") if ln]


class MovieWatcher:
    """Emit complete new movies under ``root`` exactly once across restarts.

    Parameters
    ----------
    root
        Folder to watch (recursively).
    state_file
        Where emitted movies are remembered (in the project, e.g. ``<project>/.watcher/movies.txt``).
    suffixes
        File name endings that are movies.
    stable_s
        Size and mtime unchanged this long ⇒ the movie is complete.
    polling
        Poll instead of using native file-system events (network mounts).
    poll_interval_s
        Polling observer period.
    metadata_for
        ``metadata_for(movie) -> Path | None``: the metadata file the movie needs before it is
        emitted (``None``: no metadata required for this movie).
    rescan_interval_s
        Full rescan period (``None``: only at start).
    clock
        Monotonic clock (tests pass a fake one).
    """

    def __init__(self, root: str | Path, state_file: str | Path, *,
                 suffixes: Iterable[str] = DEFAULT_SUFFIXES, stable_s: float = 10.0,
                 polling: bool = False, poll_interval_s: float = 5.0,
                 metadata_for: Callable[[Path], Path | None] | None = None,
                 rescan_interval_s: float | None = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.root = Path(root)
        self.state_file = Path(state_file)
        self.suffixes = tuple(s.lower() for s in suffixes)
        self.stable_s = float(stable_s)
        self.polling = bool(polling)
        self.poll_interval_s = float(poll_interval_s)
        self.metadata_for = metadata_for
        self.rescan_interval_s = rescan_interval_s
        self.clock = clock
        self._pending: dict[str, _Pending] = {}
        self._events: set[str] = set()
        self._lock = threading.Lock()
        self._observer = None
        self._last_rescan: float | None = None
        self.emitted: set[str] = set()
        self.mode: str | None = None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> MovieWatcher:
        """Load the state, scan once, start the observer."""
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.emitted = set(_load_state(self.state_file))
        self.rescan()
        self._start_observer()
        return self

    def stop(self) -> None:
        obs, self._observer = self._observer, None
        if obs is not None:
            obs.stop()
            obs.join(timeout=5)

    def __enter__(self) -> MovieWatcher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start_observer(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.is_directory:
                    return
                for p in (getattr(event, "dest_path", None), event.src_path):
                    if p:
                        watcher._event(os.fsdecode(p))

        if not self.root.is_dir():
            log.warning("%s: folder does not exist (yet); only rescans will find movies", self.root)
            self.mode = "rescan"
            return
        if not self.polling:
            try:
                obs = Observer()
                obs.schedule(Handler(), str(self.root), recursive=True)
                obs.start()
                self._observer, self.mode = obs, "events"
                return
            except OSError as exc:  # inotify watch/instance limits, unsupported file system
                log.warning("%s: file-system events unavailable (%s); polling instead", self.root, exc)
        obs = PollingObserver(timeout=self.poll_interval_s)
        obs.schedule(Handler(), str(self.root), recursive=True)
        obs.start()
        self._observer, self.mode = obs, "polling"

    # ------------------------------------------------------------------ discovery
    def _is_movie(self, path: str) -> bool:
        return path.lower().endswith(self.suffixes) and not os.path.basename(path).startswith(".")

    def _event(self, path: str) -> None:
        if self._is_movie(path):
            with self._lock:
                self._events.add(os.path.abspath(path))

    def rescan(self) -> int:
        """Walk the folder and queue every movie not yet emitted; returns how many were queued."""
        n = 0
        self._last_rescan = self.clock()
        for dirpath, _dirs, files in os.walk(self.root, onerror=lambda e: log.warning("%s", e)):
            for name in files:
                p = os.path.abspath(os.path.join(dirpath, name))
                if self._is_movie(p) and p not in self.emitted and p not in self._pending:
                    with self._lock:
                        self._events.add(p)
                    n += 1
        return n

    # ------------------------------------------------------------------ completion
    def check(self) -> list[Path]:
        """Emit the movies that are complete now (persisted before they are returned)."""
        now = self.clock()
        if (self.rescan_interval_s is not None and self._last_rescan is not None
                and now - self._last_rescan >= self.rescan_interval_s):
            self.rescan()
        with self._lock:
            events, self._events = self._events, set()
        for p in events:
            if p not in self.emitted and p not in self._pending:
                st = self._stat(p)
                if st is not None:
                    self._pending[p] = _Pending(st.st_size, st.st_mtime_ns, now)
        ready: list[str] = []
        for p, pend in list(self._pending.items()):
            st = self._stat(p)
            if st is None:
                del self._pending[p]
                continue
            if (st.st_size, st.st_mtime_ns) != (pend.size, pend.mtime_ns):
                pend.size, pend.mtime_ns, pend.changed_at = st.st_size, st.st_mtime_ns, now
                pend.seen += 1
                continue
            pend.seen += 1
            if st.st_size == 0 or now - pend.changed_at < self.stable_s:
                continue
            if self.metadata_for is not None:
                try:
                    meta = self.metadata_for(Path(p))
                except Exception as exc:  # a user callback: log, keep waiting
                    log.warning("%s: metadata check failed: %s", p, exc)
                    continue
                if meta is not None and not Path(meta).exists():
                    if not pend.waiting_metadata_logged:
                        log.info("%s: complete, waiting for its metadata %s", p, meta)
                        pend.waiting_metadata_logged = True
                    continue
            ready.append(p)
        if not ready:
            return []
        ready.sort()
        self._persist(ready)
        for p in ready:
            self.emitted.add(p)
            del self._pending[p]
        return [Path(p) for p in ready]

    def _stat(self, p: str):
        try:
            return os.stat(p)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("%s: cannot stat (%s); will retry", p, exc.strerror)
            return None

    def _persist(self, paths: list[str]) -> None:
        data = "".join(p + "\n" for p in paths).encode("utf-8", errors="surrogateescape")
        with open(self.state_file, "ab") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    @property
    def n_pending(self) -> int:
        return len(self._pending) + len(self._events)

    def run(self, on_movies: Callable[[list[Path]], None], stop: threading.Event,
            interval_s: float = 1.0) -> None:
        """Check every ``interval_s`` until ``stop`` is set, handing batches to ``on_movies``."""
        while not stop.is_set():
            try:
                batch = self.check()
            except OSError as exc:
                log.warning("%s: watcher check failed (%s); carrying on", self.root, exc)
                batch = []
            if batch:
                on_movies(batch)
            stop.wait(interval_s)


def epu_metadata_for(session_root: str | Path, movie_root: str | Path | None = None
                     ) -> Callable[[Path], Path | None]:
    """``metadata_for`` for EPU: a movie under ``movie_root`` needs the XML with the same stem
    at the same relative path under ``session_root``."""
    from metadata.session import _movie_stem

    sroot = Path(session_root)
    mroot = Path(movie_root) if movie_root is not None else sroot

    def metadata_for(movie: Path) -> Path | None:
        ms = _movie_stem(movie.name)
        if ms is None:
            return None
        try:
            rel = movie.parent.relative_to(mroot)
        except ValueError:
            rel = Path()
        return sroot / rel / (ms[0] + ".xml")

    return metadata_for


def _main(argv: list[str] | None = None) -> int:
    """``python -m metadata.watcher ROOT --state FILE``: print emitted movies (for tests/tools)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m metadata.watcher")
    ap.add_argument("root", type=Path)
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--stable", type=float, default=1.0)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--polling", action="store_true")
    ap.add_argument("--seconds", type=float, default=None, help="stop after this long")
    a = ap.parse_args(argv)
    stop = threading.Event()
    if a.seconds is not None:
        threading.Timer(a.seconds, stop.set).start()
    with MovieWatcher(a.root, a.state, stable_s=a.stable, polling=a.polling,
                      poll_interval_s=a.interval) as w:
        w.run(lambda b: (print("\n".join(map(str, b))), sys.stdout.flush()), stop, a.interval)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
