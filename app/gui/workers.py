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
    """Lives on the watcher thread: asks the loader for what changed and emits it.

    The loading itself (STAR parsing, images, spectra) runs in a separate **loader
    process** (:func:`app.gui.readers.scan_step` on a one-worker spawn pool), so it never
    holds the GUI process's GIL: this thread only waits for the answer. With
    ``use_process=False`` the same step runs on this thread (tests, debugging).
    """

    snapshot = QtCore.pyqtSignal(object)
    table = QtCore.pyqtSignal(object)
    gallery = QtCore.pyqtSignal(object)
    maps = QtCore.pyqtSignal(object)
    micrograph = QtCore.pyqtSignal(object)
    error = QtCore.pyqtSignal(str)

    def __init__(self, project: Path, interval_ms: int, use_process: bool) -> None:
        super().__init__()
        self.project = project
        self.interval_ms = interval_ms
        self.use_process = use_process
        self._pool = None
        self._local = None
        self._timer: QtCore.QTimer | None = None
        self._debounce: QtCore.QTimer | None = None
        self._observer = None
        self._errors_seen: set[str] = set()
        self._want_mic: str | None = None
        self._set_mic = False
        self._stopping = False
        self._poke_pending = threading.Event()
        self._handler = None
        self._watched: set[str] = set()

    @QtCore.pyqtSlot()
    def start(self) -> None:
        self._timer = QtCore.QTimer(self)
        self._timer.timeout.connect(self.scan)
        self._timer.start(self.interval_ms)
        self._debounce = QtCore.QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(150)
        self._debounce.timeout.connect(self.scan)
        self._start_observer()
        self.scan()

    def _step(self) -> dict[str, Any]:
        from app.gui import readers

        set_mic, self._set_mic = self._set_mic, False
        if not self.use_process:
            if self._local is None:
                self._local = readers.ProjectScanner(self.project)
            if set_mic:
                self._local.want_micrograph(self._want_mic)
            return self._local.step()
        from concurrent.futures.process import BrokenProcessPool

        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=readers.loader_init)
            set_mic = True
        try:
            return self._pool.submit(readers.scan_step, str(self.project), self._want_mic,
                                     set_mic).result()
        except BrokenProcessPool:
            self._pool = None  # the loader died (e.g. out of memory): a new one next time
            raise

    def _start_observer(self) -> None:
        """Watch the project folder, ``Schemes/*`` and each job folder, not recursively.

        Jobs write their STAR outputs at the top of their folder; the thousands of
        per-micrograph files in sub-folders would only cost the GUI process Python time
        (and the GIL) per event. New job folders are added by :meth:`_watch_more`.
        """
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:  # the slow timer still refreshes
            return
        scanner = self
        flag = self._poke_pending

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event):  # noqa: ANN001 - watchdog's signature
                # watchdog's own thread: post at most one wake-up until the scan ran
                if not flag.is_set():
                    flag.set()
                    QtCore.QMetaObject.invokeMethod(scanner, "poke",
                                                    QtCore.Qt.ConnectionType.QueuedConnection)

        try:
            obs = Observer()
            obs.daemon = True
            obs.start()
            self._observer, self._handler = obs, _Handler()
            self._watch_more([self.project, *sorted((self.project / "Schemes").glob("*/"))])
        except OSError as exc:  # e.g. inotify watch limit: fall back to the timer
            self._observer = None
            self.error.emit(f"file watching unavailable ({exc}); refreshing every "
                            f"{self.interval_ms / 1000:g} s")

    def _watch_more(self, dirs: list[Path]) -> None:
        if self._observer is None:
            return
        for d in dirs:
            key = str(d)
            if key in self._watched or not d.is_dir():
                continue
            try:
                self._observer.schedule(self._handler, key, recursive=False)
            except OSError as exc:
                self._report(f"not watching {d} ({exc}); the timer still refreshes it")
            self._watched.add(key)

    @QtCore.pyqtSlot()
    def poke(self) -> None:
        self._poke_pending.clear()
        if self._debounce is not None and not self._debounce.isActive():
            self._debounce.start()

    @QtCore.pyqtSlot(str)
    def want_micrograph(self, name: str) -> None:
        self._want_mic = name or None
        self._set_mic = True
        self.scan()

    def _report(self, text: str) -> None:
        if text not in self._errors_seen:  # one message per distinct problem, not per scan
            self._errors_seen.add(text)
            self.error.emit(text)

    @QtCore.pyqtSlot()
    def scan(self) -> None:
        if self._stopping or self._timer is None:
            return
        try:
            out = self._step()
        except Exception as exc:  # noqa: BLE001 - shown in the notification area
            self._report(f"project loader: {describe_error(exc)}")
            return
        for text in out.get("errors", []):
            self._report(text)
        self._watch_more([self.project / d for d in out.get("job_dirs", [])])
        for key in ("snapshot", "table", "gallery", "maps", "micrograph"):
            if key in out:
                getattr(self, key).emit(out[key])

    @QtCore.pyqtSlot()
    def shutdown(self) -> None:
        self._stopping = True
        for t in (self._timer, self._debounce):
            if t is not None:
                t.stop()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
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
                 parent: QtCore.QObject | None = None, use_process: bool = True) -> None:
        super().__init__(parent)
        self.project = Path(project)
        self._thread = QtCore.QThread()
        self._thread.setObjectName("scopeside-watcher")
        self._scanner = _Scanner(self.project, interval_ms, use_process)
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
