"""Small shared widgets: the notification area and helpers for resources."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from PyQt6 import QtGui, QtWidgets

RESOURCES = Path(__file__).resolve().parents[2] / "resources" / "gui"
COLORS = {"info": "#aed6f1", "warning": "#f8c471", "error": "#f1948a"}


class NotificationArea(QtWidgets.QListWidget):
    """Every worker error and notice, newest first (the one place the operator looks)."""

    MAX_ITEMS = 300

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("notifications")
        self.setMaximumHeight(110)
        self.setWordWrap(True)
        self.setToolTip("messages from background work, newest first")

    def add(self, level: str, text: str) -> None:
        stamp = _dt.datetime.now().strftime("%H:%M:%S")
        item = QtWidgets.QListWidgetItem(f"{stamp}  {level.upper():7s} {text}")
        item.setForeground(QtGui.QColor(COLORS.get(level, "#e5e8e8")))
        item.setData(0x0100, level)  # Qt.UserRole
        self.insertItem(0, item)
        while self.count() > self.MAX_ITEMS:
            self.takeItem(self.count() - 1)

    def messages(self, level: str | None = None) -> list[str]:
        out = []
        for i in range(self.count()):
            it = self.item(i)
            if level is None or it.data(0x0100) == level:
                out.append(it.text())
        return out


def load_style_sheet() -> str:
    """The application style sheet ('' when the resource is missing)."""
    p = RESOURCES / "style.qss"
    try:
        return p.read_text(encoding="utf-8")
    except OSError:
        return ""


def app_icon() -> QtGui.QIcon:
    p = RESOURCES.parent / "icons" / "scopeside.svg"
    return QtGui.QIcon(str(p)) if p.exists() else QtGui.QIcon()
