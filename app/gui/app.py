"""The GUI application: one QApplication, the setup window, monitor windows.

``run_gui(project=None, session=None)`` is what ``scopeside gui`` (and the desktop launcher)
calls. Starting a project or opening one shows its monitor; closing the monitor returns to
the setup window, from which the same project can be reopened.
"""

from __future__ import annotations

import logging
from pathlib import Path

from PyQt6 import QtWidgets

from app.gui.monitor_window import MonitorWindow
from app.gui.setup_window import SetupWindow
from app.gui.widgets import app_icon, load_style_sheet

log = logging.getLogger(__name__)


class Controller:
    """Shows the setup window and opens/closes monitor windows (one per project)."""

    def __init__(self, interval_ms: int = 2000) -> None:
        self.interval_ms = interval_ms
        self.setup = SetupWindow()
        self.monitors: dict[Path, MonitorWindow] = {}
        self.setup.project_started.connect(self.open_monitor)
        self.setup.project_opened.connect(self.open_monitor)

    def open_monitor(self, project: str | Path) -> MonitorWindow:
        p = Path(project).resolve()
        win = self.monitors.get(p)
        if win is None:
            win = MonitorWindow(p, self.interval_ms)
            win.closed.connect(lambda p=p: self._monitor_closed(p))
            self.monitors[p] = win
        win.show()
        win.raise_()
        self.setup.hide()
        return win

    def shutdown(self) -> None:
        """Stop every worker without asking (Ctrl-C / SIGTERM): schemers keep running."""
        for win in list(self.monitors.values()):
            win.watcher.stop()
            win.runner.stop()
        self.setup.runner.stop()

    def _monitor_closed(self, p: Path) -> None:
        win = self.monitors.pop(p, None)
        if win is not None:
            win.deleteLater()
        if not self.monitors:
            self.setup.show()


def make_app(argv: list[str] | None = None) -> QtWidgets.QApplication:
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(argv or ["scopeside"])
    app.setApplicationName("scopeside")
    app.setWindowIcon(app_icon())
    app.setStyleSheet(load_style_sheet())
    return app  # type: ignore[return-value]


def run_gui(project: str | Path | None = None, session: str | Path | None = None) -> int:
    """Open the GUI and run the event loop until the last window closes.

    Ctrl-C and SIGTERM quit cleanly: worker threads and the loader process stop; detached
    schemers keep running (reopen the project to monitor them).
    """
    import signal

    from PyQt6 import QtCore

    app = make_app()
    ctl = Controller()
    if project is not None:
        ctl.open_monitor(project)
    else:
        ctl.setup.show()
        if session is not None:
            ctl.setup.session_edit.setText(str(session))
            ctl.setup.parse_clicked()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: app.quit())
    wake = QtCore.QTimer()  # lets Python run its signal handlers while Qt waits
    wake.timeout.connect(lambda: None)
    wake.start(300)
    try:
        return int(app.exec())
    finally:
        wake.stop()
        ctl.shutdown()
