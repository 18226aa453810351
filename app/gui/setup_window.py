"""The session setup window (MDCatch-style): choose a session, confirm values, Start.

Parsing the session and creating the project run on the window's
:class:`app.gui.workers.TaskRunner`; the form itself is the Qt-free
:class:`app.gui.model.SetupForm` (validation, box sizes, what blocks Start).
"""

from __future__ import annotations

from pathlib import Path

from PyQt6 import QtCore, QtGui, QtWidgets

from app.gui import backend_adapter as be
from app.gui.model import ACQUISITION_FIELDS, CONFIRMED, DERIVED, IMPLAUSIBLE, MISSING, SetupForm
from app.gui.widgets import NotificationArea, app_icon
from app.gui.workers import Notifier, TaskRunner

STATE_STYLE = {MISSING: "missing", IMPLAUSIBLE: "implausible", DERIVED: "derived",
               CONFIRMED: "confirmed"}


def _newest_in_root() -> tuple[Path, Path] | None:
    """(sessions root, its newest session folder) when a root is configured (worker)."""
    root = be.sessions_root()
    if root is None:
        return None
    newest = be.newest_session(root)
    return (Path(root), newest) if newest is not None else None


class FieldRow:
    """Editor, unit, source and confirm box of one form field."""

    def __init__(self, window: SetupWindow, key: str) -> None:
        self.window = window
        self.key = key
        f = window.form[key]
        self.label = QtWidgets.QLabel(f.label)
        if f.kind == "choice" or f.kind == "bool":
            self.editor: QtWidgets.QWidget = QtWidgets.QComboBox()
            items = [""] + list(f.choices) if f.kind == "choice" else ["", "yes", "no"]
            self.editor.addItems(items)
            self.editor.currentTextChanged.connect(self._edited)
        else:
            self.editor = QtWidgets.QLineEdit()
            self.editor.textEdited.connect(self._edited)
        self.editor.setObjectName(f"field_{key}")
        self.unit = QtWidgets.QLabel(f.unit)
        self.unit.setObjectName("unit")
        self.source = QtWidgets.QLabel("")
        self.source.setObjectName("source")
        self.source.setMaximumWidth(330)
        self.confirm = QtWidgets.QCheckBox("confirm")
        self.confirm.setToolTip("the value is outside the usual range; tick to use it anyway")
        self.confirm.toggled.connect(self._confirmed)
        self.confirm.setVisible(False)
        self.browse: QtWidgets.QPushButton | None = None
        if f.kind == "path":
            self.browse = QtWidgets.QPushButton("…")
            self.browse.setMaximumWidth(30)
            self.browse.clicked.connect(self._browse)

    def _edited(self, text: str) -> None:
        if self.window._filling:
            return
        self.window.form[self.key].set_text(text)
        self.window.refresh()

    def _confirmed(self, on: bool) -> None:
        if self.window._filling:
            return
        self.window.form[self.key].confirmed = on
        self.window.refresh()

    def _browse(self) -> None:
        if self.key == "project_dir":
            path = QtWidgets.QFileDialog.getExistingDirectory(self.window, "Project directory")
        else:
            path, _ = QtWidgets.QFileDialog.getOpenFileName(self.window, self.label.text())
        if path:
            self.set_text(path)

    def set_text(self, text: str) -> None:
        """Type ``text`` into the editor as the operator would."""
        if isinstance(self.editor, QtWidgets.QComboBox):
            self.editor.setCurrentText(text)
        else:
            self.editor.setText(text)
            self._edited(text)

    def show(self) -> None:
        f = self.window.form[self.key]
        if isinstance(self.editor, QtWidgets.QComboBox):
            if self.editor.currentText() != f.text():
                self.editor.setCurrentText(f.text())
        elif not self.editor.hasFocus() and self.editor.text() != f.text() and not f.error:
            self.editor.setText(f.text())
        state = f.state
        self.editor.setProperty("state", STATE_STYLE.get(state, "ok"))
        self.editor.style().unpolish(self.editor)
        self.editor.style().polish(self.editor)
        self.editor.setToolTip(f.tooltip())
        self.source.setText(f.short_source())
        self.source.setToolTip(f.tooltip())
        self.confirm.setVisible(state in (IMPLAUSIBLE, CONFIRMED) and not f.error)
        self.confirm.blockSignals(True)
        self.confirm.setChecked(f.confirmed)
        self.confirm.blockSignals(False)


class SetupWindow(QtWidgets.QMainWindow):
    """Session folder → parsed values → operator inputs → Start (creates and starts the project).

    Signals
    -------
    project_started(str)
        The project was created and its schemes started (the app opens the monitor).
    project_opened(str)
        The operator chose an existing project to monitor.
    """

    project_started = QtCore.pyqtSignal(str)
    project_opened = QtCore.pyqtSignal(str)

    def __init__(self, parent: QtWidgets.QWidget | None = None, start_schemes: bool = True
                 ) -> None:
        super().__init__(parent)
        self.setWindowTitle("scopeside — session setup")
        self.setWindowIcon(app_icon())
        self.resize(980, 860)
        self.form = SetupForm()
        self.start_schemes = start_schemes
        self.movie_path: str | None = None
        #: further ProcessingSettings values not on the form (site defaults, tests: wait_sec)
        self.extra_settings: dict[str, object] = {}
        self._filling = False
        self.notifier = Notifier(self)
        self.notes = NotificationArea()
        self.notifier.message.connect(self.notes.add)
        self.runner = TaskRunner(self.notifier, "setup-tasks", self)
        self.runner.busy_changed.connect(self._busy)

        # session chooser
        self.session_edit = QtWidgets.QLineEdit()
        self.session_edit.setPlaceholderText("EPU session folder, SerialEM folder or one "
                                             "metadata file")
        self.session_edit.returnPressed.connect(self.parse_clicked)
        browse = QtWidgets.QPushButton("Browse…")
        browse.clicked.connect(self._browse_session)
        self.newest_btn = QtWidgets.QPushButton("Newest session")
        self.newest_btn.setToolTip("the newest folder in the configured sessions root")
        self.newest_btn.clicked.connect(self.offer_newest)
        self.parse_btn = QtWidgets.QPushButton("Read session")
        self.parse_btn.clicked.connect(self.parse_clicked)
        self.open_btn = QtWidgets.QPushButton("Open project…")
        self.open_btn.setToolTip("monitor an existing project (reopen after closing)")
        self.open_btn.clicked.connect(self._open_project)
        top = QtWidgets.QHBoxLayout()
        top.addWidget(QtWidgets.QLabel("Session"))
        top.addWidget(self.session_edit, 1)
        for b in (browse, self.newest_btn, self.parse_btn, self.open_btn):
            top.addWidget(b)
        self.session_info = QtWidgets.QLabel("Choose a session folder to read its metadata.")
        self.session_info.setObjectName("sessionInfo")
        self.session_info.setWordWrap(True)

        # the form
        self.rows: dict[str, FieldRow] = {}
        acq = self._group("Acquisition (from the session files)",
                          [k for k, *_ in ACQUISITION_FIELDS])
        ops = self._group("Processing (operator)",
                          ["particle_diameter_a", "symmetry", "picker", "min_particles_3d",
                           "rank_threshold", "executor", "slurm_template", "project_dir"])
        self.boxes_label = QtWidgets.QLabel("")
        self.boxes_label.setObjectName("boxes")
        ops.layout().addWidget(self.boxes_label, ops.layout().rowCount(), 0, 1, 5)
        self.problems = QtWidgets.QLabel("")
        self.problems.setObjectName("problems")
        self.problems.setWordWrap(True)
        self.start_btn = QtWidgets.QPushButton("Start")
        self.start_btn.setObjectName("primary")
        self.start_btn.clicked.connect(self.start_clicked)
        self.busy = QtWidgets.QProgressBar()
        self.busy.setRange(0, 0)
        self.busy.setMaximumWidth(120)
        self.busy.setVisible(False)
        bottom = QtWidgets.QHBoxLayout()
        bottom.addWidget(self.problems, 1)
        bottom.addWidget(self.busy)
        bottom.addWidget(self.start_btn)

        body = QtWidgets.QWidget()
        lay = QtWidgets.QVBoxLayout(body)
        lay.addLayout(top)
        lay.addWidget(self.session_info)
        lay.addWidget(acq)
        lay.addWidget(ops)
        lay.addLayout(bottom)
        lay.addWidget(QtWidgets.QLabel("Messages"))
        lay.addWidget(self.notes)
        scroll = QtWidgets.QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(body)
        self.setCentralWidget(scroll)
        self.refresh()
        self.runner.submit(_newest_in_root, on_result=self._offer)
        self.runner.submit(be.topaz_available, on_result=self._set_topaz)

    def _set_topaz(self, available: bool) -> None:
        self.form.topaz_available = available
        combo = self.rows["picker"].editor
        idx = combo.findText("Topaz")
        combo.setItemData(idx, "installed" if available else "not installed (pip install "
                          "'scopeside[topaz]')", QtCore.Qt.ItemDataRole.ToolTipRole)
        self.refresh()

    def _offer(self, found: tuple[Path, Path] | None) -> None:
        """Prefill the newest session of the configured sessions root (not read yet)."""
        if found is None or self.session_edit.text().strip():
            return
        root, newest = found
        self.session_edit.setText(str(newest))
        self.session_info.setText(f"Newest session in {root}: {newest.name}. Press "
                                  "'Read session' to read it, or choose another.")

    def _group(self, title: str, keys: list[str]) -> QtWidgets.QGroupBox:
        box = QtWidgets.QGroupBox(title)
        grid = QtWidgets.QGridLayout(box)
        grid.setColumnStretch(1, 1)
        for r, key in enumerate(keys):
            row = FieldRow(self, key)
            self.rows[key] = row
            grid.addWidget(row.label, r, 0)
            grid.addWidget(row.editor, r, 1)
            if row.browse is not None:
                grid.addWidget(row.browse, r, 2)
            grid.addWidget(row.unit, r, 3)
            grid.addWidget(row.source, r, 4)
            grid.addWidget(row.confirm, r, 5)
        return box

    # -- display ---------------------------------------------------------------------------
    def refresh(self) -> None:
        self._filling = True
        try:
            for row in self.rows.values():
                row.show()
        finally:
            self._filling = False
        b = self.form.boxes()
        if b is None:
            self.boxes_label.setText("Box sizes appear when the particle diameter and pixel "
                                     "size are known.")
        else:
            small = (f"down-scaled to {b.downscaled_px} px ({b.pixel_size_a * b.box_px / b.downscaled_px:.2f} Å/px)"
                     if b.downscaled_px < b.box_px else "no down-scaling")
            self.boxes_label.setText(
                f"Extraction box {b.box_px} px at {b.pixel_size_a:.3f} Å/px · {small} · "
                f"mask diameter {b.mask_diameter_a:g} Å")
        probs = self.form.problems()
        self.problems.setText("Ready to start." if not probs else
                              "Before Start: " + "; ".join(probs[:4])
                              + (f" (+{len(probs) - 4} more)" if len(probs) > 4 else ""))
        self.problems.setProperty("state", "ok" if not probs else "missing")
        self.problems.style().unpolish(self.problems)
        self.problems.style().polish(self.problems)
        self.start_btn.setEnabled(not probs and not self.runner.busy)

    def _busy(self, on: bool) -> None:
        self.busy.setVisible(on)
        self.parse_btn.setEnabled(not on)
        self.refresh()

    # -- session -----------------------------------------------------------------------------
    def _browse_session(self) -> None:
        path = QtWidgets.QFileDialog.getExistingDirectory(self, "Session folder")
        if path:
            self.session_edit.setText(path)
            self.parse_clicked()

    def offer_newest(self) -> None:
        def found(path: Path | None) -> None:
            if path is None:
                self.notifier.warning("no sessions root configured (paths.sessions_root) or "
                                      "it holds no session folder")
                return
            self.session_edit.setText(str(path))
            self.parse_clicked()

        self.runner.submit(lambda: (f[1] if (f := _newest_in_root()) else None), on_result=found)

    def parse_clicked(self) -> None:
        text = self.session_edit.text().strip()
        if not text:
            self.notifier.warning("enter or choose a session folder first")
            return
        self.session_info.setText(f"Reading {text} …")
        self.runner.submit(be.parse_session, text, on_result=self.apply_session,
                           on_error=lambda m: self.session_info.setText(f"Could not read: {m}"))

    def apply_session(self, parsed: be.ParsedSession) -> None:
        self.form.apply_record(parsed.values, parsed.path, parsed.kind, parsed.warnings)
        self.movie_path = parsed.movie_path
        n = f", {parsed.n_movies} movies" if parsed.n_movies is not None else ""
        missing = [f.label for f in self.form.fields.values()
                   if f.key in dict((k, 1) for k, *_ in ACQUISITION_FIELDS) and f.needs_attention]
        self.session_info.setText(
            f"{parsed.kind or 'unknown'} session {parsed.path}{n}. "
            + (f"To fill or confirm: {', '.join(missing)}." if missing else
               "All acquisition values found."))
        for w in parsed.warnings:
            self.notifier.warning(w)
        if not self.form.value("project_dir"):
            self.rows["project_dir"].set_text(str(be.default_project_dir(parsed.path)))
        self.refresh()

    # -- start / open ----------------------------------------------------------------------
    def start_clicked(self) -> None:
        probs = self.form.problems()
        if probs:
            self.notifier.error("cannot start: " + "; ".join(probs))
            return
        settings = {**self.form.settings_dict(), **self.extra_settings}
        self.start_btn.setEnabled(False)
        self.runner.submit(be.create_and_start, settings, self.form.session_path,
                           self.start_schemes, self.movie_path, on_result=self._started)

    def _started(self, project: Path) -> None:
        self.notifier.info(f"project {project} created" +
                           (" and its schemes started" if self.start_schemes else ""))
        self.project_started.emit(str(project))

    def _open_project(self) -> None:
        path = QtWidgets.QFileDialog.getExistingDirectory(self, "Open project")
        if path:
            self.open_project(path)

    def open_project(self, path: str) -> None:
        """Monitor an existing project (checked on the worker: the folder may be remote)."""
        def check(p: str) -> str:
            if not (Path(p) / "Schemes").is_dir():
                raise be.UserError(f"{p}: not a scopeside/RELION project (no Schemes folder)")
            return p

        self.runner.submit(check, str(path), on_result=self.project_opened.emit)

    def closeEvent(self, ev: QtGui.QCloseEvent) -> None:  # noqa: N802
        self.runner.stop()
        ev.accept()
