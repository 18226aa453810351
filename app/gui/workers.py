"""The one worker idiom of the GUI, the notifier, and the project watcher thread.

- :class:`Notifier` — every error and notice from any worker goes through its ``message``
  signal to the one notification area of the window.
- :class:`TaskRunner` — a long-lived QThread that runs short tasks (parse a session,
  create a project, run a schemer command) one after another. ``submit(fn, *args,
  on_result=...)`` returns at once; the result (plain Python / NumPy) comes back on the GUI
  thread through a queued signal; an exception becomes a notifier message.
- :class:`ProjectWatcher` — a QObject living on its own QThread that rescans a project
  directory when watchdog reports a change (debounced) and on a slow timer, and emits the
  snapshot, plot table, gallery and maps only when their files changed.

Both threads are stopped with :meth:`stop` (quit + wait), which every window calls from
``closeEvent``: a QThread still running when Python collects it aborts the process.
"""

from __future__ import annotations

import itertools
import logging
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PyQt6 import QtCore

from app.errors import USER_ERRORS

log = logging.getLogger(__name__)

#: job folder (lower case) -> canonical RELION type folder
_KIND = {k.lower(): k for k in ("Import", "MotionCorr", "CtfFind", "Select", "AutoPick",
                                "Extract", "Class2D", "InitialModel", "Refine3D")}


def describe_error(exc: BaseException) -> str:
    """One line for the operator: user errors as they are, others with their type."""
    if isinstance(exc, USER_ERRORS):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class Notifier(QtCore.QObject):
    """The one place errors and notices go (``level`` is info | warning | error)."""

    message = QtCore.pyqtSignal(str, str)

    def info(self, text: str) -> None:
        self.message.emit("info", text)

    def warning(self, text: str) -> None:
        self.message.emit("warning", text)

    def error(self, text: str) -> None:
        self.message.emit("error", text)


class _Executor(QtCore.QObject):
    done = QtCore.pyqtSignal(int, object)
    failed = QtCore.pyqtSignal(int, str)

    @QtCore.pyqtSlot(int, object)
    def execute(self, token: int, call: object) -> None:
        fn, args, kwargs = call  # type: ignore[misc]
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none is fatal
            if not isinstance(exc, USER_ERRORS):
                log.error("task %s failed:\n%s", getattr(fn, "__name__", fn),
                          traceback.format_exc())
            self.failed.emit(token, describe_error(exc))
            return
        self.done.emit(token, result)


class TaskRunner(QtCore.QObject):
    """Runs callables on one worker QThread; results come back on the GUI thread."""

    _request = QtCore.pyqtSignal(int, object)
    busy_changed = QtCore.pyqtSignal(bool)

    def __init__(self, notifier: Notifier, name: str = "tasks",
                 parent: QtCore.QObject | None = None) -> None:
        super().__init__(parent)
        self.notifier = notifier
        self._thread = QtCore.QThread()
        self._thread.setObjectName(f"scopeside-{name}")
        self._exec = _Executor()
        self._exec.moveToThread(self._thread)
        self._request.connect(self._exec.execute, QtCore.Qt.ConnectionType.QueuedConnection)
        self._exec.done.connect(self._on_done, QtCore.Qt.ConnectionType.QueuedConnection)
        self._exec.failed.connect(self._on_failed, QtCore.Qt.ConnectionType.QueuedConnection)
        self._pending: dict[int, tuple[Callable | None, Callable | None]] = {}
        self._tokens = itertools.count(1)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def submit(self, fn: Callable, *args: Any, on_result: Callable[[Any], None] | None = None,
               on_error: Callable[[str], None] | None = None, **kwargs: Any) -> int:
        """Queue ``fn(*args, **kwargs)``; ``on_result``/``on_error`` run on the GUI thread."""
        if not self._thread.isRunning():
            raise RuntimeError("task runner is stopped")
        token = next(self._tokens)
        self._pending[token] = (on_result, on_error)
        if len(self._pending) == 1:
            self.busy_changed.emit(True)
        self._request.emit(token, (fn, args, kwargs))
        return token

    def _finish(self, token: int) -> tuple[Callable | None, Callable | None]:
        cbs = self._pending.pop(token, (None, None))
        if not self._pending:
            self.busy_changed.emit(False)
        return cbs

    def _on_done(self, token: int, result: object) -> None:
        on_result, _ = self._finish(token)
        if on_result is not None:
            try:
                on_result(result)
            except Exception as exc:  # noqa: BLE001 - a display bug must not kill the app
                log.error("result handler failed:\n%s", traceback.format_exc())
                self.notifier.error(describe_error(exc))

    def _on_failed(self, token: int, message: str) -> None:
        _, on_error = self._finish(token)
        self.notifier.error(message)
        if on_error is not None:
            on_error(message)

    def stop(self, timeout_ms: int = 30000) -> None:
        """Quit the thread after the running task; wait for it."""
        if self._thread.isRunning():
            self._thread.quit()
            if not self._thread.wait(timeout_ms):
                log.warning("task thread did not stop within %d ms", timeout_ms)


class _Scanner(QtCore.QObject):
    """Lives on the watcher thread: rescans and loads; emits only what changed."""

    snapshot = QtCore.pyqtSignal(object)
    table = QtCore.pyqtSignal(object)
    gallery = QtCore.pyqtSignal(object)
    maps = QtCore.pyqtSignal(object)
    micrograph = QtCore.pyqtSignal(object)
    error = QtCore.pyqtSignal(str)

    def __init__(self, project: Path, interval_ms: int) -> None:
        super().__init__()
        self.project = project
        self.interval_ms = interval_ms
        self._reader = None
        self._timer: QtCore.QTimer | None = None
        self._debounce: QtCore.QTimer | None = None
        self._last_snapshot_key: object = None
        self._last_stamps: dict[str, tuple[str | None, float]] = {}
        self._observer = None
        self._errors_seen: set[str] = set()
        self._want_mic: str | None = None
        self._last_mic_key: object = None

    @QtCore.pyqtSlot()
    def start(self) -> None:
        from app.gui.readers import ProjectReader

        self._reader = ProjectReader(self.project)
        self._timer = QtCore.QTimer(self)
        self._timer.timeout.connect(self.scan)
        self._timer.start(self.interval_ms)
        self._debounce = QtCore.QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(150)
        self._debounce.timeout.connect(self.scan)
        self._start_observer()
        self.scan()

    def _start_observer(self) -> None:
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:  # the slow timer still refreshes
            return
        scanner = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event):  # noqa: ANN001 - watchdog's signature
                # called on watchdog's own thread: only post an event to ours
                QtCore.QMetaObject.invokeMethod(scanner, "poke",
                                                QtCore.Qt.ConnectionType.QueuedConnection)

        try:
            obs = Observer()
            obs.schedule(_Handler(), str(self.project), recursive=True)
            obs.daemon = True
            obs.start()
            self._observer = obs
        except OSError as exc:  # e.g. inotify watch limit: fall back to the timer
            self.error.emit(f"file watching unavailable ({exc}); refreshing every "
                            f"{self.interval_ms / 1000:g} s")

    @QtCore.pyqtSlot()
    def poke(self) -> None:
        if self._debounce is not None and not self._debounce.isActive():
            self._debounce.start()

    @QtCore.pyqtSlot(str)
    def want_micrograph(self, name: str) -> None:
        self._want_mic = name or None
        self._last_mic_key = None
        self.scan()

    def _report(self, what: str, exc: BaseException) -> None:
        from app.gui.workers import describe_error as _d

        text = f"{what}: {_d(exc)}"
        if text not in self._errors_seen:  # one message per distinct problem, not per scan
            self._errors_seen.add(text)
            self.error.emit(text)

    @QtCore.pyqtSlot()
    def scan(self) -> None:
        r = self._reader
        if r is None:
            return
        try:
            snap = r.snapshot()
        except Exception as exc:  # noqa: BLE001
            self._report("reading the project", exc)
            return
        key = repr([(s.name, s.current_node, s.running, s.floats, s.bools, s.strings,
                     [(j.job_dir, j.status, len(j.log_tail), j.log_tail[-200:]) for j in s.jobs],
                     s.error) for s in snap.schemes])
        if key != self._last_snapshot_key:
            self._last_snapshot_key = key
            self.snapshot.emit(snap)
        changed = {k for k, v in snap.job_stamps.items() if self._last_stamps.get(k) != v}
        changed |= set(self._last_stamps) - set(snap.job_stamps)
        self._last_stamps = dict(snap.job_stamps)
        kinds = {_KIND.get(c.split("/")[0].lower(), "") for c in changed}
        if kinds & {"CtfFind", "MotionCorr", "AutoPick"}:
            self._load("micrograph table", r.micrograph_table, self.table)
            self._last_mic_key = None
        if kinds & {"Class2D", "Select"}:
            self._load("2D classes", r.gallery, self.gallery)
        if kinds & {"InitialModel", "Refine3D"}:
            self._load("3D maps", lambda: (r.map3d("InitialModel"), r.map3d("Refine3D")),
                       self.maps)
        mic_key = (self._want_mic, kinds & {"CtfFind", "MotionCorr", "AutoPick"} != set())
        if self._last_mic_key is None or mic_key[1]:
            self._last_mic_key = mic_key
            self._load("micrograph", lambda: r.micrograph_view(self._want_mic), self.micrograph)

    def _load(self, what: str, fn: Callable[[], Any], signal: QtCore.pyqtBoundSignal) -> None:
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - shown in the notification area
            self._report(what, exc)
            return
        if value is not None:
            signal.emit(value)

    @QtCore.pyqtSlot()
    def shutdown(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self._debounce is not None:
            self._debounce.stop()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        # hand the object (and its timers) back to the GUI thread, which will delete it:
        # a timer must be stopped and destroyed by the thread that owns it
        app = QtCore.QCoreApplication.instance()
        if app is not None:
            self.moveToThread(app.thread())


class ProjectWatcher(QtCore.QObject):
    """Owns the scanner thread for one project; re-emits its signals on the GUI thread."""

    snapshot = QtCore.pyqtSignal(object)
    table = QtCore.pyqtSignal(object)
    gallery = QtCore.pyqtSignal(object)
    maps = QtCore.pyqtSignal(object)
    micrograph = QtCore.pyqtSignal(object)
    _want_mic = QtCore.pyqtSignal(str)
    _rescan = QtCore.pyqtSignal()

    def __init__(self, project: str | Path, notifier: Notifier, interval_ms: int = 2000,
                 parent: QtCore.QObject | None = None) -> None:
        super().__init__(parent)
        self.project = Path(project)
        self._thread = QtCore.QThread()
        self._thread.setObjectName("scopeside-watcher")
        self._scanner = _Scanner(self.project, interval_ms)
        self._scanner.moveToThread(self._thread)
        q = QtCore.Qt.ConnectionType.QueuedConnection
        self._thread.started.connect(self._scanner.start)
        for name in ("snapshot", "table", "gallery", "maps", "micrograph"):
            getattr(self._scanner, name).connect(getattr(self, name), q)
        self._scanner.error.connect(notifier.warning, q)
        self._want_mic.connect(self._scanner.want_micrograph, q)
        self._rescan.connect(self._scanner.scan, q)
        self._stopped = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def show_micrograph(self, name: str) -> None:
        self._want_mic.emit(name)

    def rescan(self) -> None:
        self._rescan.emit()

    def stop(self, timeout_ms: int = 30000) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._thread.isRunning():
            QtCore.QMetaObject.invokeMethod(self._scanner, "shutdown",
                                            QtCore.Qt.ConnectionType.BlockingQueuedConnection)
            self._thread.quit()
            if not self._thread.wait(timeout_ms):
                log.warning("watcher thread did not stop within %d ms", timeout_ms)
