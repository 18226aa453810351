"""The 2D class gallery: class averages in a grid, sorted by ranker score (or size, resolution).

One :class:`QGraphicsScene` holds one tile item per class; new data updates the tiles in
place (pixmap, text, outline, position) so the operator's scroll position survives a
refresh. The images arrive as uint8 arrays (scaled on the worker); this widget only wraps
them in QImages. Rules (order, threshold selection, overrides) live in the Qt-free
:class:`app.gui.model.GalleryModel`.
"""

from __future__ import annotations

import math

import numpy as np
from PyQt6 import QtCore, QtGui, QtWidgets

from app.gui.model import SORT_KEYS, GalleryData, GalleryModel

SELECTED = QtGui.QColor("#2ecc71")
REJECTED = QtGui.QColor("#5d6d7e")
OVERRIDE = QtGui.QColor("#f39c12")


def _fmt(v: float, spec: str, unknown: str = "–") -> str:
    return unknown if not np.isfinite(v) else format(v, spec)


class ClassTile(QtWidgets.QGraphicsItem):
    """One class: image, outline (selected / not / operator override) and three text lines."""

    TEXT_H = 30

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.class_number = 0
        self.pixmap = QtGui.QPixmap()
        self.lines = ("", "")
        self.selected = False
        self.overridden = False
        self.setAcceptedMouseButtons(QtCore.Qt.MouseButton.LeftButton)

    def boundingRect(self) -> QtCore.QRectF:  # noqa: N802 - Qt override
        return QtCore.QRectF(-3, -3, self.size + 6, self.size + self.TEXT_H + 6)

    def set_content(self, number: int, image: np.ndarray, lines: tuple[str, str]) -> None:
        self.class_number = number
        h, w = image.shape
        img = np.ascontiguousarray(image)
        qimg = QtGui.QImage(img.data, w, h, w, QtGui.QImage.Format.Format_Grayscale8).copy()
        if w != self.size or h != self.size:
            qimg = qimg.scaled(self.size, self.size, QtCore.Qt.AspectRatioMode.IgnoreAspectRatio,
                               QtCore.Qt.TransformationMode.FastTransformation)
        self.pixmap = QtGui.QPixmap.fromImage(qimg)
        self.lines = lines
        self.setToolTip(f"class {number}\n{lines[0]}\n{lines[1]}\nclick: include / exclude")
        self.update()

    def set_state(self, selected: bool, overridden: bool) -> None:
        if (selected, overridden) != (self.selected, self.overridden):
            self.selected, self.overridden = selected, overridden
            self.update()

    def paint(self, p: QtGui.QPainter, option, widget=None) -> None:  # noqa: ANN001
        p.drawPixmap(0, 0, self.pixmap)
        color = OVERRIDE if self.overridden else (SELECTED if self.selected else REJECTED)
        pen = QtGui.QPen(color, 3 if self.selected else 1)
        if not self.selected:
            pen.setStyle(QtCore.Qt.PenStyle.DashLine)
        p.setPen(pen)
        p.setBrush(QtCore.Qt.BrushStyle.NoBrush)
        p.drawRect(QtCore.QRectF(-1.5, -1.5, self.size + 3, self.size + 3))
        p.setPen(QtGui.QColor("#e5e8e8") if self.selected else QtGui.QColor("#95a5a6"))
        f = p.font()
        f.setPointSizeF(7.5)
        p.setFont(f)
        r = QtCore.QRectF(-2, self.size + 2, self.size + 4, self.TEXT_H / 2)
        p.drawText(r, QtCore.Qt.AlignmentFlag.AlignHCenter, self.lines[0])
        p.drawText(r.translated(0, self.TEXT_H / 2), QtCore.Qt.AlignmentFlag.AlignHCenter,
                   self.lines[1])


class _View(QtWidgets.QGraphicsView):
    clicked = QtCore.pyqtSignal(int)
    resized = QtCore.pyqtSignal()

    def mousePressEvent(self, ev: QtGui.QMouseEvent) -> None:  # noqa: N802
        item = self.itemAt(ev.position().toPoint())
        if isinstance(item, ClassTile) and ev.button() == QtCore.Qt.MouseButton.LeftButton:
            self.clicked.emit(item.class_number)
            ev.accept()
            return
        super().mousePressEvent(ev)

    def resizeEvent(self, ev: QtGui.QResizeEvent) -> None:  # noqa: N802
        super().resizeEvent(ev)
        self.resized.emit()


class ClassGallery(QtWidgets.QWidget):
    """Gallery with sort choice, threshold slider and click-to-toggle.

    Signals
    -------
    choices_changed
        The operator clicked a class (the monitor stores the choice in a worker).
    threshold_applied(float)
        "Use for the scheme" was pressed: the monitor sets the select job's threshold.
    """

    choices_changed = QtCore.pyqtSignal()
    threshold_applied = QtCore.pyqtSignal(float)

    def __init__(self, model: GalleryModel | None = None, tile_px: int = 80,
                 parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model or GalleryModel()
        self.tile_px = tile_px
        self.gap = 8
        self._tiles: dict[int, ClassTile] = {}
        self._work = None
        self._work_data: GalleryData | None = None
        self._threshold_touched = False

        self.sort_box = QtWidgets.QComboBox()
        self.sort_box.addItems([f"by {k}" for k in SORT_KEYS])
        self.sort_box.setCurrentIndex(SORT_KEYS.index(self.model.sort_key))
        self.sort_box.currentIndexChanged.connect(self._on_sort)
        self.slider = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal)
        self.slider.setRange(0, 100)
        self.slider.setValue(round(self.model.threshold * 100))
        self.slider.setToolTip("ranker score threshold: classes at or above it are selected")
        self.slider.valueChanged.connect(self._on_threshold)
        self.slider.sliderMoved.connect(lambda _v: setattr(self, "_threshold_touched", True))
        self.threshold_label = QtWidgets.QLabel()
        self.threshold_label.setMinimumWidth(110)
        self.summary = QtWidgets.QLabel("no classes yet")
        self.summary.setObjectName("gallerySummary")
        self.apply_btn = QtWidgets.QPushButton("Use threshold in scheme")
        self.apply_btn.setToolTip("set the select job's rank_threshold to this value")
        self.apply_btn.clicked.connect(lambda: self.threshold_applied.emit(self.model.threshold))
        self.title = QtWidgets.QLabel("")
        self.title.setObjectName("galleryTitle")

        bar = QtWidgets.QHBoxLayout()
        bar.addWidget(self.title)
        bar.addStretch(1)
        bar.addWidget(QtWidgets.QLabel("Sort"))
        bar.addWidget(self.sort_box)
        bar.addSpacing(12)
        bar.addWidget(QtWidgets.QLabel("Threshold"))
        bar.addWidget(self.slider, 2)
        bar.addWidget(self.threshold_label)
        bar.addWidget(self.apply_btn)

        self.scene = QtWidgets.QGraphicsScene(self)
        self.scene.setItemIndexMethod(QtWidgets.QGraphicsScene.ItemIndexMethod.NoIndex)
        self.view = _View(self.scene)
        self.view.setAlignment(QtCore.Qt.AlignmentFlag.AlignLeft
                               | QtCore.Qt.AlignmentFlag.AlignTop)
        self.view.setBackgroundBrush(QtGui.QColor("#1c2833"))
        self.view.setHorizontalScrollBarPolicy(QtCore.Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.view.setVerticalScrollBarPolicy(QtCore.Qt.ScrollBarPolicy.ScrollBarAlwaysOn)
        self.view.setViewportUpdateMode(
            QtWidgets.QGraphicsView.ViewportUpdateMode.MinimalViewportUpdate)
        self.view.clicked.connect(self.toggle)
        self.view.resized.connect(self._layout)

        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(bar)
        lay.addWidget(self.view, 1)
        lay.addWidget(self.summary)
        self._update_threshold_label()

    # -- data -------------------------------------------------------------------------------
    #: tiles updated per event-loop turn, so a 200-class refresh never blocks the loop long
    CHUNK = 100

    def set_data(self, data: GalleryData) -> None:
        """Show (or refresh in place) the classes of one Class2D iteration.

        Tiles are updated :attr:`CHUNK` at a time from the event loop; :attr:`pending` is
        True until the last chunk is done (then the grid is laid out and outlined).
        """
        first = self.model.data is None
        self.model.set_data(data)
        numbers = [int(c) for c in data.class_numbers]
        for c in set(self._tiles) - set(numbers):
            self.scene.removeItem(self._tiles.pop(c))
        self._work = iter(range(len(numbers)))
        self._work_data = data
        if first and data.threshold is not None and not self._threshold_touched:
            self.set_threshold(data.threshold)  # the scheme's value until the operator moves it
        sel = data.select_job or "no ranker output yet"
        self.title.setText(f"{data.class2d_job} iteration {data.iteration} · {sel}")
        self._next_chunk()

    @property
    def pending(self) -> bool:
        return self._work is not None

    def _next_chunk(self) -> None:
        data, work = self._work_data, self._work
        if work is None or data is None:
            return
        for _ in range(self.CHUNK):
            i = next(work, None)
            if i is None:
                self._work = None
                self._layout()
                self._restyle()
                return
            c = int(data.class_numbers[i])
            tile = self._tiles.get(c)
            if tile is None:
                tile = ClassTile(self.tile_px)
                self.scene.addItem(tile)
                self._tiles[c] = tile
            n = int(data.n_particles[i])
            size = (f"{n} ptcls" if n >= 0 else
                    _fmt(100 * float(data.distribution[i]), ".1f") + " %")
            tile.set_content(c, data.images[i], (
                f"#{c}  score {_fmt(float(data.scores[i]), '.2f')}",
                f"{size}  {_fmt(float(data.resolution_a[i]), '.1f')} Å"))
        QtCore.QTimer.singleShot(0, self._next_chunk)

    def _layout(self) -> None:
        d = self.model.data
        if d is None or self._work is not None:
            return
        cell_w = self.tile_px + self.gap + 6
        cell_h = self.tile_px + ClassTile.TEXT_H + self.gap + 6
        width = max(cell_w, self.view.viewport().width())
        cols = max(1, width // cell_w)
        for pos, row in enumerate(self.model.order()):
            tile = self._tiles[int(d.class_numbers[row])]
            tile.setPos(self.gap + (pos % cols) * cell_w, self.gap + (pos // cols) * cell_h)
        rows = math.ceil(len(d) / cols)
        self.scene.setSceneRect(0, 0, cols * cell_w + self.gap, rows * cell_h + self.gap)

    def _restyle(self) -> None:
        d = self.model.data
        if d is None or self._work is not None:
            return
        sel = self.model.selected()
        for i, c in enumerate(d.class_numbers):
            self._tiles[int(c)].set_state(bool(sel[i]), int(c) in self.model.overrides)
        n_sel, n, parts = self.model.summary()
        p = f", {parts} particles" if parts >= 0 else ""
        self.summary.setText(f"{n_sel} of {n} classes selected{p} · "
                             f"{len(self.model.overrides)} chosen by hand "
                             "(click a class to include / exclude it)")

    # -- operator ----------------------------------------------------------------------------
    def toggle(self, class_number: int) -> None:
        self.model.toggle(class_number)
        self._restyle()
        self.choices_changed.emit()

    def set_threshold(self, value: float) -> None:
        self.slider.setValue(round(value * 100))

    def _on_threshold(self, v: int) -> None:
        self.model.threshold = v / 100.0
        self._update_threshold_label()
        self._restyle()

    def _update_threshold_label(self) -> None:
        self.threshold_label.setText(f"score ≥ {self.model.threshold:.2f}")

    def _on_sort(self, idx: int) -> None:
        self.model.sort_key = SORT_KEYS[idx]
        self._layout()

    def display_order(self) -> list[int]:
        """Class numbers left-to-right, top-to-bottom as shown (for tests and screenshots)."""
        tiles = sorted(self._tiles.values(), key=lambda t: (t.pos().y(), t.pos().x()))
        return [t.class_number for t in tiles]

    def tile(self, class_number: int) -> ClassTile:
        return self._tiles[class_number]
