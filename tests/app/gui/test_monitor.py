"""The monitor window (offscreen): outputs on screen, Start with test-double jobs, abort,
closing with schemes running, reopening, and event-loop responsiveness."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PyQt6 import QtCore

from app.gui import backend_adapter as be
from app.gui.monitor_window import MonitorWindow
from app.gui.setup_window import SetupWindow
from metadata.star import read_star
from tests.app.gui import fake_jobs, fakes


def n_points(curve) -> int:
    x = curve.getData()[0]
    return 0 if x is None else len(x)


class StallMeter:
    """Gaps between ticks of a 10 ms timer on the GUI thread (= event-loop stalls).

    For each gap it also records the GUI thread's own CPU time (``time.thread_time``):
    a long gap with little CPU is the operating system running other processes (the
    development machine has 2 cores shared by many), a long gap with much CPU is the GUI's
    own work blocking the loop.
    """

    def __init__(self) -> None:
        self.timer = QtCore.QTimer()
        self.timer.setTimerType(QtCore.Qt.TimerType.PreciseTimer)
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.last: tuple[float, float] | None = None
        self.gaps: list[float] = []
        self.busy: list[float] = []

    def _tick(self) -> None:
        now = (time.perf_counter(), time.thread_time())
        if self.last is not None:
            self.gaps.append(now[0] - self.last[0])
            self.busy.append(now[1] - self.last[1])
        self.last = now

    def start(self) -> None:
        self.last = None
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    def summary(self) -> str:
        g = np.array(self.gaps) * 1000
        return (f"{len(g)} ticks, gap max {g.max():.0f} ms, p99 {np.percentile(g, 99):.0f} ms, "
                f"GUI-thread CPU per gap max {max(self.busy) * 1000:.0f} ms")


def test_monitor_shows_outputs_and_stores_choices(qtbot, tmp_path, rng):
    info = fakes.populate(tmp_path, rng, n_mics=20, n_classes=30)
    win = MonitorWindow(tmp_path, interval_ms=300)
    qtbot.addWidget(win)
    win.show()
    try:
        qtbot.waitUntil(lambda: win.gallery.model.data is not None and not win.gallery.pending,
                        timeout=20000)
        g = win.gallery
        scores = info["scores"]
        assert g.display_order() == [int(i) + 1 for i in np.argsort(-scores, kind="stable")]
        qtbot.waitUntil(lambda: n_points(win.plots.curves["defocus_um"]) == 20,
                        timeout=20000)
        x, y = win.plots.curves["defocus_um"].getData()
        np.testing.assert_allclose(y, info["defocus"] / 1e4, rtol=1e-6)
        np.testing.assert_allclose(x, np.arange(20) * 1.5)
        qtbot.waitUntil(lambda: "run_class001.mrc" in win.maps.rows["Refine3D"][0].text,
                        timeout=20000)
        qtbot.waitUntil(lambda: "picks" in win.viewer.caption.text(), timeout=20000)
        assert f"{info['picks'][-1]} picks" in win.viewer.caption.text()
        assert n_points(win.maps.fsc_curve) == 25  # 48-px map: shells 0..24
        # any micrograph can be chosen; its picks are shown
        first = info["names"][0]
        idx = win.viewer.chooser.findText(first)
        assert idx > 0
        win.viewer.chooser.setCurrentIndex(idx)
        win.viewer.chooser.activated.emit(idx)
        qtbot.waitUntil(lambda: Path(first).name in win.viewer.caption.text(), timeout=20000)
        assert f"{info['picks'][0]} picks" in win.viewer.caption.text()
        assert any("no schemes found" in m for m in win.notes.messages("warning"))

        # clicking a class stores the choice for the select job and as ranker feedback
        worst = g.display_order()[-1]
        g.toggle(worst)  # below threshold -> included by hand
        backup = tmp_path / "Select/job008/backup_selection.star"
        feedback = tmp_path / "Select/job008/ranker_feedback.star"  # written last
        qtbot.waitUntil(feedback.exists, timeout=10000)
        sel = read_star(backup)[""]["rlnSelected"].to_numpy()
        expect = (scores >= g.model.threshold).astype(int)
        expect[worst - 1] = 1
        np.testing.assert_array_equal(sel, expect)
        fb = read_star(feedback)["feedback"]
        assert fb["rlnSelected"].to_numpy().tolist() == expect.tolist()
        assert fb["rlnAutoSelected"].sum() == expect.sum() - 1

        # reopening shows the stored choice and the select job's threshold again
        from app.schemes.jobstar import read_job_star, write_job_star

        js_path = tmp_path / "Select/job008/job.star"
        js = read_job_star(js_path)
        js.options["rank_threshold"] = "0.3"
        write_job_star(js_path, js)
        win2 = MonitorWindow(tmp_path, interval_ms=300)
        qtbot.addWidget(win2)
        qtbot.waitUntil(lambda: win2.gallery.model.data is not None
                        and not win2.gallery.pending, timeout=20000)
        assert win2.gallery.model.overrides == {worst: True}
        assert win2.gallery.tile(worst).selected
        assert win2.gallery.model.threshold == 0.3 and win2.gallery.slider.value() == 30
        win2.close()

        # a damaged file is a message, the window keeps working
        (tmp_path / "CtfFind/job003/micrographs_ctf.star").write_text("data_micrographs\nloop_\n")
        qtbot.waitUntil(lambda: any("micrographs_ctf.star" in m
                                    for m in win.notes.messages("warning")), timeout=20000)
        assert win.isVisible()
    finally:
        win.close()


@pytest.fixture
def fake_jobs_env(monkeypatch):
    monkeypatch.setenv("SCOPESIDE_EXTRA_JOBS", fake_jobs.EXTRA_JOBS)
    monkeypatch.setenv("FAKE_JOB_SECONDS", "0.3")


def _panel_status(win: MonitorWindow, scheme: str, job: str) -> str | None:
    p = win.panels.get(scheme)
    return p.job_status(job) if p else None


def _running(win: MonitorWindow, scheme: str) -> bool | None:
    p = win.panels.get(scheme)
    return p.state.running if p and p.state else None


@pytest.mark.slow
def test_start_watch_abort_close_and_reopen(qtbot, tmp_path, fake_jobs_env):
    setup = SetupWindow(start_schemes=True)
    qtbot.addWidget(setup)
    setup.extra_settings = {"wait_sec": 1.0}
    setup.form.apply_record({"voltage_kv": (300.0, "test", None), "cs_mm": (2.7, "test", None),
                             "pixel_size_a": (1.0, "test", None),
                             "super_resolution": (False, "test", None),
                             "dose_per_frame_e_a2": (1.0, "test", None)}, None, "EPU")
    for key, text in (("particle_diameter_a", "150"), ("min_particles_3d", "100"),
                      ("project_dir", str(tmp_path / "proj"))):
        setup.rows[key].set_text(text)
    assert setup.form.problems() == []
    project: Path | None = None
    try:
        with qtbot.waitSignal(setup.project_started, timeout=30000) as sig:
            setup.start_clicked()
        project = Path(sig.args[0])
        setup.close()

        win = MonitorWindow(project, interval_ms=250)
        qtbot.addWidget(win)
        win.show()
        meter = StallMeter()
        seen: dict[str, set[str]] = {}

        def record(snap) -> None:
            for s in snap.schemes:
                for j in s.jobs:
                    seen.setdefault(j.name, set()).add(j.status)

        win.watcher.snapshot.connect(record)
        meter.start()
        # statuses change while the test-double jobs run and write outputs
        qtbot.waitUntil(lambda: {"running", "success"} <= seen.get("motioncorr", set()),
                        timeout=60000)
        qtbot.waitUntil(lambda: win.gallery.model.data is not None and not win.gallery.pending
                        and np.isfinite(win.gallery.model.data.scores).all(), timeout=90000)
        qtbot.waitUntil(lambda: n_points(win.plots.curves["ctf_max_res_a"]) >= 3,
                        timeout=30000)
        meter.stop()
        print("event loop while jobs write outputs:", meter.summary())
        assert len(meter.gaps) > 100
        # the GUI's own work never blocks the loop for 100 ms ...
        assert max(meter.busy) < 0.100, meter.summary()
        # ... and the loop turns within 100 ms practically always; single longer waits for a
        # CPU happen on the loaded 2-core development machine (benchmarks/bench_gui.py
        # measures them against an idle Qt loop under the same load)
        assert np.percentile(meter.gaps, 99) < 0.100, meter.summary()
        order = win.gallery.display_order()
        sc = dict(zip(win.gallery.model.data.class_numbers.tolist(),
                      win.gallery.model.data.scores.tolist()))
        assert [sc[c] for c in order] == sorted(sc.values(), reverse=True)

        # abort stops the scheme
        win.panels["proc"].abort_btn.click()
        qtbot.waitUntil(lambda: _running(win, "proc") is False, timeout=30000)
        assert (project / "Schemes/proc/RELION_JOB_EXIT_ABORTED").exists()
        assert "aborted" in win.panels["proc"].header.text()
        assert any("scheme proc stopped: aborted" in m for m in win.notes.messages("warning"))
        assert _running(win, "prep") is True

        # closing with a running scheme asks; Cancel keeps the window
        asked: list[list[str]] = []
        win.ask_close = lambda running: (asked.append(running), "cancel")[1]
        win.close()
        assert win.isVisible() and asked == [["prep"]]
        # Keep running: the window closes, the detached schemer carries on
        win.ask_close = lambda running: "keep"
        win.close()
        assert not win.isVisible()
        assert be.scheme_running(project, "prep")

        # reopening the project restores the monitor from the files
        win2 = MonitorWindow(project, interval_ms=250)
        qtbot.addWidget(win2)
        win2.show()
        qtbot.waitUntil(lambda: _running(win2, "prep") is True
                        and _running(win2, "proc") is False, timeout=30000)
        assert _panel_status(win2, "proc", "class2d") == "success"
        qtbot.waitUntil(lambda: win2.gallery.model.data is not None, timeout=30000)
        # Abort and close: every running scheme is aborted, then the window closes
        win2.ask_close = lambda running: "abort"
        win2.close()
        qtbot.waitUntil(lambda: not win2.isVisible(), timeout=40000)
        assert not be.scheme_running(project, "prep")
        assert (project / "Schemes/prep/RELION_JOB_EXIT_ABORTED").exists()
    finally:
        if project is not None:
            for s in ("prep", "proc"):
                if be.scheme_running(project, s):
                    be.abort_scheme(project, s)
            be.wait_schemers_stopped(project, ["prep", "proc"], timeout_s=30)


def test_edit_variable_and_threshold_reach_the_scheme(qtbot, tmp_path):
    from app.schemes import api
    from app.schemes.jobstar import read_job_star

    project = be.create_project({"pixel_size_a": 1.0, "voltage_kv": 300.0, "cs_mm": 2.7,
                                 "dose_per_frame_e_a2": 1.0, "particle_diameter_a": 150.0,
                                 "project_dir": str(tmp_path / "p")}, None)
    win = MonitorWindow(project, interval_ms=300)
    qtbot.addWidget(win)
    win.show()
    try:
        qtbot.waitUntil(lambda: "prep" in win.panels and win.panels["prep"].vars.rowCount() > 0,
                        timeout=20000)
        panel = win.panels["prep"]
        row = next(r for r in range(panel.vars.rowCount())
                   if panel.vars.item(r, 0).text() == "wait_sec")
        panel.vars.item(row, 2).setText("soon")  # an invalid value: a message, no change
        qtbot.waitUntil(lambda: any("wait_sec" in m for m in win.notes.messages("error")),
                        timeout=20000)
        assert api.status(project, "prep")["variables"]["wait_sec"]["value"] == 180
        panel.vars.item(row, 2).setText("5")
        qtbot.waitUntil(lambda: api.status(project, "prep")["variables"]["wait_sec"]["value"]
                        == 5, timeout=20000)
        win.gallery.set_threshold(0.33)
        win.gallery.apply_btn.click()
        js = project / "Schemes/proc/select_parts/job.star"
        qtbot.waitUntil(lambda: read_job_star(js).options["rank_threshold"] == "0.33",
                        timeout=20000)
    finally:
        win.close()
