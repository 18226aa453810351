"""The class gallery widget (offscreen): order, threshold, clicks, in-place refresh, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PyQt6 import QtCore, QtWidgets

from app.gui.gallery import ClassGallery
from app.gui.model import GalleryData, GalleryModel


def make_data(rng, n: int, box: int = 64, scores=None, job="Class2D/job007/") -> GalleryData:
    scores = rng.uniform(0, 1, n) if scores is None else np.asarray(scores, float)
    dist = rng.dirichlet(np.ones(n))
    return GalleryData(job, 25, np.arange(1, n + 1),
                       rng.integers(0, 255, (n, box, box), dtype=np.uint8), scores, dist,
                       (dist * 10000).astype(int), rng.uniform(5, 30, n), "Select/job008/")


def show(qtbot, g: ClassGallery, data: GalleryData) -> None:
    g.set_data(data)
    qtbot.waitUntil(lambda: not g.pending, timeout=5000)


@pytest.fixture
def gallery(qtbot):
    g = ClassGallery(GalleryModel(threshold=0.5), tile_px=64)
    qtbot.addWidget(g)
    g.resize(900, 600)
    g.show()
    qtbot.waitExposed(g)
    return g


def test_sorted_by_score_and_threshold_selects(qtbot, gallery, rng):
    d = make_data(rng, 30)
    show(qtbot, gallery, d)
    expect = [int(c) for c in d.class_numbers[np.argsort(-d.scores, kind="stable")]]
    assert gallery.display_order() == expect
    for thr in (0.2, 0.5, 0.8):
        gallery.slider.setValue(round(thr * 100))
        shown = {c: gallery.tile(c).selected for c in expect}
        assert shown == {int(c): bool(s >= thr) for c, s in zip(d.class_numbers, d.scores)}
    assert "selected" in gallery.summary.text()
    gallery.sort_box.setCurrentIndex(1)  # by size
    assert gallery.display_order() == [int(c) for c in
                                       d.class_numbers[np.argsort(-d.distribution)]]


def test_click_toggles_and_emits(gallery, qtbot, rng):
    d = make_data(rng, 12, scores=np.linspace(0.05, 0.95, 12))
    show(qtbot, gallery, d)
    best = gallery.display_order()[0]  # score 0.95, selected at 0.5
    tile = gallery.tile(best)
    assert tile.selected
    pos = gallery.view.mapFromScene(tile.scenePos() + QtCore.QPointF(20, 20))
    with qtbot.waitSignal(gallery.choices_changed, timeout=2000):
        qtbot.mouseClick(gallery.view.viewport(), QtCore.Qt.MouseButton.LeftButton, pos=pos)
    assert not tile.selected and gallery.model.overrides == {best: False}
    # the threshold no longer decides this class; others still follow the slider
    gallery.slider.setValue(0)
    assert not tile.selected and all(gallery.tile(c).selected for c in range(1, 13) if c != best)


def test_refresh_in_place_keeps_scroll_position(qtbot, gallery, rng):
    show(qtbot, gallery, make_data(rng, 200))
    bar = gallery.view.verticalScrollBar()
    assert bar.maximum() > 0
    bar.setValue(bar.maximum() // 2)
    before = bar.value()
    tiles = {c: gallery.tile(c) for c in range(1, 201)}
    show(qtbot, gallery, make_data(rng, 200))  # the next iteration of the same job
    assert bar.value() == before
    assert all(gallery.tile(c) is tiles[c] for c in range(1, 201))  # updated, not rebuilt


def test_200_classes_render_fast(qtbot, rng):
    """Acceptance: a gallery of 200 classes (64 px) renders in under 0.5 s."""
    times = []
    for i in range(3):
        g = ClassGallery(GalleryModel(), tile_px=64)
        g.resize(1200, 800)
        g.show()
        d = make_data(rng, 200, job=f"Class2D/job{i:03d}/")
        t0 = time.perf_counter()
        g.set_data(d)
        while g.pending:
            QtWidgets.QApplication.processEvents()
        g.view.viewport().repaint()
        times.append(time.perf_counter() - t0)
        g.close()
        g.deleteLater()
    assert min(times) < 0.5, times
