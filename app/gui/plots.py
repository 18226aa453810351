"""Live pyqtgraph views: per-micrograph plots, the micrograph viewer, 3D slices and FSC.

Every view creates its plot items once and updates them with ``setData``/``setImage``
(pyqtgraph's in-place update), so a refresh never rebuilds the scene. All inputs are the
NumPy dataclasses of :mod:`app.gui.model`, computed on the watcher thread.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PyQt6 import QtCore, QtWidgets

from app.gui.model import Map3D, MicrographTable, MicrographView


def configure_pyqtgraph() -> None:
    """Row-major images (NumPy order) and no antialiasing; called when a window is built."""
    pg.setConfigOptions(antialias=False, imageAxisOrder="row-major")


PLOTS = (  # key, title, y label
    ("defocus_um", "Defocus", "µm"),
    ("ctf_max_res_a", "CTF max resolution", "Å"),
    ("total_motion_a", "Total drift", "Å"),
    ("n_picked", "Particles picked", "per micrograph"),
)
PEN = pg.mkPen("#5dade2", width=1)
BRUSH = pg.mkBrush("#5dade2")


class LivePlots(pg.GraphicsLayoutWidget):
    """Four time series (per micrograph over acquisition time) and their histograms."""

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        configure_pyqtgraph()
        super().__init__(parent)
        self.setBackground("#1c2833")
        self.curves: dict[str, pg.PlotDataItem] = {}
        self.hists: dict[str, pg.PlotDataItem] = {}
        self.plots: dict[str, pg.PlotItem] = {}
        for i, (key, title, unit) in enumerate(PLOTS):
            p = self.addPlot(row=i, col=0, title=title)
            p.setLabel("left", unit)
            p.setLabel("bottom", "acquisition time", units="min")
            p.showGrid(x=True, y=True, alpha=0.2)
            self.curves[key] = p.plot([], [], pen=None, symbol="o", symbolSize=4,
                                      symbolBrush=BRUSH, symbolPen=None)
            self.plots[key] = p
            h = self.addPlot(row=i, col=1, title=f"{title} histogram")
            h.setLabel("bottom", unit)
            self.hists[key] = h.plot([0, 1], [0], stepMode="center", fillLevel=0,
                                     brush=pg.mkBrush(93, 173, 226, 120), pen=PEN)
        self.ci.layout.setColumnStretchFactor(0, 3)
        self.ci.layout.setColumnStretchFactor(1, 1)
        self.count_label = self.addLabel("no micrographs yet", row=len(PLOTS), col=0, colspan=2)

    def set_table(self, t: MicrographTable) -> None:
        x = t.time_min
        for key, _, _ in PLOTS:
            y = getattr(t, key)
            ok = np.isfinite(y)
            self.curves[key].setData(x[ok], y[ok])
            if key in t.hists:
                edges, counts = t.hists[key]
                self.hists[key].setData(edges, counts)
        axis = "micrograph" if t.time_is_index else "acquisition time"
        for p in self.plots.values():
            p.setLabel("bottom", axis, units=None if t.time_is_index else "min")
        self.count_label.setText(f"{len(t.names)} micrographs")


class MicrographViewer(QtWidgets.QWidget):
    """The latest (or a chosen) micrograph with picks, and its power spectrum + CTF fit."""

    micrograph_chosen = QtCore.pyqtSignal(str)

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        configure_pyqtgraph()
        super().__init__(parent)
        self.chooser = QtWidgets.QComboBox()
        self.chooser.addItem("latest")
        self.chooser.setMinimumContentsLength(24)
        self.chooser.activated.connect(self._on_choose)
        self.caption = QtWidgets.QLabel("no micrograph yet")
        self.caption.setSizePolicy(QtWidgets.QSizePolicy.Policy.Ignored,
                                   QtWidgets.QSizePolicy.Policy.Preferred)
        top = QtWidgets.QHBoxLayout()
        top.addWidget(QtWidgets.QLabel("Micrograph"))
        top.addWidget(self.chooser, 1)
        top.addWidget(self.caption, 2)
        self.glw = pg.GraphicsLayoutWidget()
        self.glw.setBackground("#1c2833")
        self.mic_box = self.glw.addViewBox(row=0, col=0, lockAspect=True, invertY=True)
        self.ps_box = self.glw.addViewBox(row=0, col=1, lockAspect=True, invertY=True)
        self.glw.ci.layout.setColumnStretchFactor(0, 2)
        self.mic_img = pg.ImageItem()
        self.mic_box.addItem(self.mic_img)
        self.picks = pg.ScatterPlotItem(pen=pg.mkPen("#f4d03f", width=1.5), brush=None,
                                        symbol="o", size=12, pxMode=False)
        self.mic_box.addItem(self.picks)
        self.ps_img = pg.ImageItem()
        self.ps_box.addItem(self.ps_img)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(top)
        lay.addWidget(self.glw, 1)

    def set_names(self, names: list[str]) -> None:
        if self.chooser.count() - 1 == len(names):
            return
        current = self.chooser.currentText()
        self.chooser.blockSignals(True)
        self.chooser.clear()
        self.chooser.addItem("latest")
        self.chooser.addItems(list(reversed(names)))
        idx = self.chooser.findText(current)
        self.chooser.setCurrentIndex(max(0, idx))
        self.chooser.blockSignals(False)

    def _on_choose(self, idx: int) -> None:
        self.micrograph_chosen.emit("" if idx == 0 else self.chooser.itemText(idx))

    def set_view(self, v: MicrographView) -> None:
        self.mic_img.setImage(v.image, levels=v.levels, autoLevels=False)
        size = v.pick_diameter_px if v.pick_diameter_px > 0 else max(v.image.shape) / 40
        self.picks.setData(pos=v.picks_xy, size=size)
        self.ps_img.setImage(v.spectrum, levels=(0, 1), autoLevels=False)
        self.caption.setText(f"{v.name.rsplit('/', 1)[-1]} · {len(v.picks_xy)} picks · "
                             f"binned ×{v.bin_factor:g} · spectrum: left CTF fit, right data")
        self.mic_box.autoRange(padding=0)
        self.ps_box.autoRange(padding=0)


class MapViewer(pg.GraphicsLayoutWidget):
    """Central slices (z, y, x) of the initial model and the refined map, and the FSC curve."""

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        configure_pyqtgraph()
        super().__init__(parent)
        self.setBackground("#1c2833")
        self.rows: dict[str, tuple[pg.LabelItem, list[pg.ImageItem]]] = {}
        for r, kind in enumerate(("InitialModel", "Refine3D")):
            label = self.addLabel(f"{kind}: no map yet", row=2 * r, col=0, colspan=3)
            items = []
            for c in range(3):
                vb = self.addViewBox(row=2 * r + 1, col=c, lockAspect=True, invertY=True)
                im = pg.ImageItem()
                vb.addItem(im)
                items.append(im)
            self.rows[kind] = (label, items)
        self.fsc_plot = self.addPlot(row=4, col=0, colspan=3, title="Gold-standard FSC")
        self.fsc_plot.setLabel("bottom", "spatial frequency (1/Å)")
        self.fsc_plot.setYRange(-0.05, 1.05)
        self.fsc_plot.addLine(y=0.143, pen=pg.mkPen("#e74c3c", style=QtCore.Qt.PenStyle.DashLine))
        self.fsc_curve = self.fsc_plot.plot([], [], pen=pg.mkPen("#5dade2", width=2))

    def set_maps(self, maps: tuple[Map3D | None, Map3D | None]) -> None:
        for kind, m in zip(("InitialModel", "Refine3D"), maps):
            if m is None:
                continue
            label, items = self.rows[kind]
            for im, s in zip(items, m.slices):
                lo, hi = (float(s.min()), float(s.max())) if s.size else (0.0, 1.0)
                im.setImage(s, levels=(lo, hi if hi > lo else lo + 1), autoLevels=False)
                im.getViewBox().autoRange(padding=0.02)
            res = f" · {m.resolution_a:.2f} Å" if m.resolution_a else ""
            label.setText(f"{kind}: {m.job}{m.name}{res}  (central slices z, y, x)")
            if kind == "Refine3D" and m.fsc.size:
                k = np.where(np.isfinite(m.fsc_resolution_a), 1.0 / m.fsc_resolution_a, 0.0)
                self.fsc_curve.setData(k, m.fsc)
