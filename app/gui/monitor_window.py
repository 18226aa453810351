"""The monitor window: scheme status and control, live plots, micrographs, 2D classes, 3D.

Data flow: :class:`app.gui.workers.ProjectWatcher` (own QThread) reads the project and
emits NumPy dataclasses; this window only puts them on screen. Commands (start, abort,
reset, set variable / job option, store class choices) go through one
:class:`app.gui.workers.TaskRunner`; their errors reach the notification area.

Closing while a scheme runs asks the operator: **Keep running** (schemers are detached
processes and carry on; reopening the project restores this window from the files),
**Abort and close** (abort every running scheme, wait until they stopped, then close), or
**Cancel**.
"""

from __future__ import annotations

from pathlib import Path

from PyQt6 import QtCore, QtGui, QtWidgets

from app.gui import backend_adapter as be
from app.gui.gallery import ClassGallery
from app.gui.model import GalleryData, GalleryModel, ProjectSnapshot, SchemeState
from app.gui.plots import LivePlots, MapViewer, MicrographViewer
from app.gui.widgets import NotificationArea, app_icon
from app.gui.workers import Notifier, ProjectWatcher, TaskRunner

STATUS_COLORS = {"success": "#58d68d", "running": "#5dade2", "failure": "#ec7063",
                 "aborted": "#f5b041", "pending": "#95a5a6", "stopped": "#d5d8dc"}
#: the scheme job whose rank_threshold the gallery's threshold sets
SELECT_JOB = ("proc", "select_parts")


class SchemePanel(QtWidgets.QWidget):
    """One scheme: state, current node, buttons, editable variables, jobs and log tail."""

    start_requested = QtCore.pyqtSignal(str)
    abort_requested = QtCore.pyqtSignal(str)
    reset_requested = QtCore.pyqtSignal(str)
    variable_edited = QtCore.pyqtSignal(str, str, str)  # scheme, name, value

    def __init__(self, name: str, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.name = name
        self.state: SchemeState | None = None
        self.header = QtWidgets.QLabel(f"{name}: …")
        self.header.setObjectName("schemeHeader")
        self.header.setWordWrap(True)
        self.graph = QtWidgets.QLabel("")
        self.graph.setObjectName("schemeGraph")
        self.graph.setWordWrap(True)
        self.graph.setToolTip("the scheme's nodes from the start; the current one highlighted")
        self.start_btn = QtWidgets.QPushButton("Start")
        self.abort_btn = QtWidgets.QPushButton("Abort")
        self.reset_btn = QtWidgets.QPushButton("Reset")
        self.abort_btn.setObjectName("danger")
        self.start_btn.clicked.connect(lambda: self.start_requested.emit(self.name))
        self.abort_btn.clicked.connect(lambda: self.abort_requested.emit(self.name))
        self.reset_btn.clicked.connect(lambda: self.reset_requested.emit(self.name))
        self.start_btn.setToolTip("start (or restart) this scheme where it stopped")
        self.reset_btn.setToolTip("variables back to their reset values, jobs not started")
        buttons = QtWidgets.QHBoxLayout()
        for b in (self.start_btn, self.abort_btn, self.reset_btn):
            buttons.addWidget(b)

        self.vars = QtWidgets.QTableWidget(0, 3)
        self.vars.setHorizontalHeaderLabels(["variable", "type", "value"])
        self.vars.verticalHeader().setVisible(False)
        self.vars.horizontalHeader().setStretchLastSection(True)
        self.vars.setToolTip("double-click a value to change the scheme variable")
        self.vars.itemChanged.connect(self._on_var_changed)
        self.jobs = QtWidgets.QTableWidget(0, 3)
        self.jobs.setHorizontalHeaderLabels(["job", "directory", "status"])
        self.jobs.verticalHeader().setVisible(False)
        self.jobs.horizontalHeader().setStretchLastSection(True)
        self.jobs.setEditTriggers(QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers)
        self.jobs.setSelectionBehavior(QtWidgets.QAbstractItemView.SelectionBehavior.SelectRows)
        self.jobs.itemSelectionChanged.connect(self._show_log)
        self.log = QtWidgets.QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setObjectName("logTail")
        self.log.setMaximumBlockCount(400)

        split = QtWidgets.QSplitter(QtCore.Qt.Orientation.Vertical)
        split.addWidget(self.vars)
        split.addWidget(self.jobs)
        split.addWidget(self.log)
        split.setSizes([200, 200, 160])
        lay = QtWidgets.QVBoxLayout(self)
        lay.addWidget(self.header)
        lay.addWidget(self.graph)
        lay.addLayout(buttons)
        lay.addWidget(split, 1)
        self._updating = False

    def set_state(self, st: SchemeState) -> None:
        self.state = st
        run = "running" if st.running else "stopped"
        self.header.setText(f"<b>{st.name}</b> · {run} · current node <b>{st.current_node}</b>"
                            + (f"<br><span style='color:#ec7063'>{st.error}</span>"
                               if st.error else ""))
        self.graph.setText(" → ".join(
            f"<b style='color:#f4d03f'>[{n}]</b>" if n == st.current_node else n
            for n in st.nodes))
        self.start_btn.setEnabled(not st.running)
        self.abort_btn.setEnabled(st.running)
        self.reset_btn.setEnabled(not st.running)
        if self.vars.state() != QtWidgets.QAbstractItemView.State.EditingState:
            self._fill_vars(st)
        self._fill_jobs(st)

    def _fill_vars(self, st: SchemeState) -> None:
        rows = st.variables
        self._updating = True
        self.vars.setRowCount(len(rows))
        for r, (name, kind, value) in enumerate(rows):
            text = (("1" if value else "0") if kind == "bool" else
                    (f"{value:g}" if kind == "float" else str(value)))
            for c, t in enumerate((name, kind, text)):
                item = self.vars.item(r, c)
                if item is None:
                    item = QtWidgets.QTableWidgetItem()
                    self.vars.setItem(r, c, item)
                if item.text() != t:
                    item.setText(t)
                flags = QtCore.Qt.ItemFlag.ItemIsEnabled | QtCore.Qt.ItemFlag.ItemIsSelectable
                if c == 2:
                    flags |= QtCore.Qt.ItemFlag.ItemIsEditable
                item.setFlags(flags)
        self._updating = False

    def _fill_jobs(self, st: SchemeState) -> None:
        self.jobs.setRowCount(len(st.jobs))
        for r, j in enumerate(st.jobs):
            for c, t in enumerate((j.name, j.job_dir, j.status)):
                item = self.jobs.item(r, c)
                if item is None:
                    item = QtWidgets.QTableWidgetItem()
                    self.jobs.setItem(r, c, item)
                if item.text() != t:
                    item.setText(t)
            self.jobs.item(r, 2).setForeground(QtGui.QColor(STATUS_COLORS.get(j.status,
                                                                               "#e5e8e8")))
        self._show_log()

    def _show_log(self) -> None:
        st = self.state
        if st is None or not st.jobs:
            return
        rows = self.jobs.selectionModel().selectedRows()
        if rows:
            job = st.jobs[rows[0].row()]
        else:  # the running job, else the last one that started
            running = [j for j in st.jobs if j.status == "running"]
            started = [j for j in st.jobs if j.has_started]
            job = (running or started or st.jobs)[-1]
        text = f"[{job.name} · {job.job_dir}]\n{job.log_tail}"
        if self.log.toPlainText() != text:
            self.log.setPlainText(text)
            self.log.moveCursor(QtGui.QTextCursor.MoveOperation.End)

    def _on_var_changed(self, item: QtWidgets.QTableWidgetItem) -> None:
        if self._updating or item.column() != 2:
            return
        name = self.vars.item(item.row(), 0).text()
        self.variable_edited.emit(self.name, name, item.text().strip())

    def job_status(self, name: str) -> str | None:
        if self.state is None:
            return None
        return next((j.status for j in self.state.jobs if j.name == name), None)


class MonitorWindow(QtWidgets.QMainWindow):
    """Watches one project; safe to close and reopen at any time."""

    closed = QtCore.pyqtSignal()

    def __init__(self, project: str | Path, interval_ms: int = 2000,
                 parent: QtWidgets.QWidget | None = None, use_process: bool = True) -> None:
        super().__init__(parent)
        self.project = Path(project).resolve()
        self.setWindowTitle(f"scopeside monitor — {self.project}")
        self.setWindowIcon(app_icon())
        self.resize(1400, 900)
        self.notifier = Notifier(self)
        self.notes = NotificationArea()
        self.notifier.message.connect(self.notes.add)
        self.notifier.message.connect(lambda lvl, t: self.statusBar().showMessage(t, 10000))
        self.runner = TaskRunner(self.notifier, "monitor-tasks", self)
        self.watcher = ProjectWatcher(self.project, self.notifier, interval_ms, self,
                                      use_process=use_process)
        self.snapshot: ProjectSnapshot | None = None
        self.panels: dict[str, SchemePanel] = {}
        self._close_after_abort = False

        self.scheme_tabs = QtWidgets.QTabWidget()
        self.scheme_tabs.setMinimumWidth(380)
        self.plots = LivePlots()
        self.viewer = MicrographViewer()
        self.gallery = ClassGallery(GalleryModel())
        self.maps = MapViewer()
        self.tabs = QtWidgets.QTabWidget()
        self.tabs.addTab(self.gallery, "2D classes")
        self.tabs.addTab(self.plots, "Live plots")
        self.tabs.addTab(self.viewer, "Micrograph")
        self.tabs.addTab(self.maps, "3D")
        split = QtWidgets.QSplitter()
        split.addWidget(self.scheme_tabs)
        split.addWidget(self.tabs)
        split.setStretchFactor(1, 3)
        central = QtWidgets.QWidget()
        lay = QtWidgets.QVBoxLayout(central)
        lay.addWidget(split, 1)
        lay.addWidget(QtWidgets.QLabel("Messages"))
        lay.addWidget(self.notes)
        self.setCentralWidget(central)

        self.watcher.snapshot.connect(self.on_snapshot)
        self.watcher.table.connect(self.on_table)
        self.watcher.gallery.connect(self.on_gallery)
        self.watcher.maps.connect(self.maps.set_maps)
        self.watcher.micrograph.connect(self.viewer.set_view)
        self.viewer.micrograph_chosen.connect(self.watcher.show_micrograph)
        self.gallery.choices_changed.connect(self.store_choices)
        self.gallery.threshold_applied.connect(self.apply_threshold)
        self.watcher.start()

    # -- data from the watcher ------------------------------------------------------------
    def on_snapshot(self, snap: ProjectSnapshot) -> None:
        self.snapshot = snap
        if not snap.schemes:
            self.notifier.warning(f"{self.project}: no schemes found (Schemes/*/scheme.star)")
        for st in snap.schemes:
            panel = self.panels.get(st.name)
            if panel is None:
                panel = SchemePanel(st.name)
                panel.start_requested.connect(self.start_scheme)
                panel.abort_requested.connect(self.abort_scheme)
                panel.reset_requested.connect(self.reset_scheme)
                panel.variable_edited.connect(self.set_variable)
                self.panels[st.name] = panel
                self.scheme_tabs.addTab(panel, st.name)
            before = panel.state
            if before is not None and before.running and not st.running:
                msg = f"scheme {st.name} stopped" + (f": {st.error}" if st.error else "")
                (self.notifier.warning if st.error else self.notifier.info)(msg)
            panel.set_state(st)
            idx = self.scheme_tabs.indexOf(panel)
            self.scheme_tabs.setTabText(idx, f"{st.name} {'▶' if st.running else '■'}")

    def on_table(self, table) -> None:  # noqa: ANN001 - MicrographTable
        self.plots.set_table(table)
        self.viewer.set_names(table.names)

    def on_gallery(self, data: GalleryData) -> None:
        self.gallery.set_data(data)

    # -- commands (all through the task runner) -------------------------------------------------
    def _after(self, text: str):
        def done(_result: object) -> None:
            self.notifier.info(text)
            self.watcher.rescan()
        return done

    def start_scheme(self, name: str) -> None:
        self.runner.submit(be.start_scheme, self.project, name,
                           on_result=self._after(f"started scheme {name}"))

    def abort_scheme(self, name: str) -> None:
        self.runner.submit(be.abort_scheme, self.project, name,
                           on_result=self._after(f"abort requested for scheme {name}"))

    def reset_scheme(self, name: str) -> None:
        self.runner.submit(be.reset_scheme, self.project, name,
                           on_result=self._after(f"scheme {name} reset"))

    def set_variable(self, scheme: str, name: str, value: str) -> None:
        self.runner.submit(be.set_variable, self.project, scheme, name, value,
                           on_result=self._after(f"{scheme}: {name} = {value}"),
                           on_error=lambda _m: self.watcher.rescan())

    def apply_threshold(self, value: float) -> None:
        scheme, job = SELECT_JOB
        self.runner.submit(be.set_job_option, self.project, scheme, job, "rank_threshold",
                           f"{value:g}",
                           on_result=self._after(f"{scheme}/{job}: rank_threshold = {value:g}"))

    def store_choices(self) -> None:
        m = self.gallery.model
        d = m.data
        if d is None:
            return
        self.runner.submit(be.store_class_choices, self.project, d.select_job, d.class2d_job,
                           d.iteration, d.class_numbers.copy(), m.selected(), m.auto_selected(),
                           d.scores.copy(), list(d.reference_images),
                           on_result=lambda paths: self.statusBar().showMessage(
                               "class choices stored: " + ", ".join(
                                   str(Path(p).relative_to(self.project)) for p in paths), 8000))

    # -- closing --------------------------------------------------------------------------
    def running_schemes(self) -> list[str]:
        snap = self.snapshot
        return [s.name for s in snap.schemes if s.running] if snap else []

    def ask_close(self, running: list[str]) -> str:
        """'keep', 'abort' or 'cancel' (a dialog; tests replace this method)."""
        box = QtWidgets.QMessageBox(self)
        box.setIcon(QtWidgets.QMessageBox.Icon.Question)
        box.setWindowTitle("Schemes are running")
        box.setText(f"Scheme(s) {', '.join(running)} are still running.")
        box.setInformativeText("Keep them running in the background (reopen the project to "
                               "monitor them again), or abort them before closing?")
        keep = box.addButton("Keep running", QtWidgets.QMessageBox.ButtonRole.AcceptRole)
        abort = box.addButton("Abort and close", QtWidgets.QMessageBox.ButtonRole.DestructiveRole)
        box.addButton(QtWidgets.QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(keep)
        box.exec()
        clicked = box.clickedButton()
        return "keep" if clicked is keep else ("abort" if clicked is abort else "cancel")

    def closeEvent(self, ev: QtGui.QCloseEvent) -> None:  # noqa: N802
        running = self.running_schemes()
        if running and not self._close_after_abort:
            choice = self.ask_close(running)
            if choice == "cancel":
                ev.ignore()
                return
            if choice == "abort":
                ev.ignore()
                self.notifier.info(f"aborting {', '.join(running)} before closing…")
                self.setEnabled(False)
                self.runner.submit(self._abort_all, running, on_result=self._closed_after_abort,
                                   on_error=lambda _m: self.setEnabled(True))
                return
        self.watcher.stop()
        self.runner.stop()
        ev.accept()
        self.closed.emit()

    def _abort_all(self, names: list[str]) -> bool:
        for n in names:
            be.abort_scheme(self.project, n)
        return be.wait_schemers_stopped(self.project, names)

    def _closed_after_abort(self, stopped: bool) -> None:
        if not stopped:
            self.notifier.warning("schemes did not stop within 30 s; closing anyway")
        self._close_after_abort = True
        self.close()
