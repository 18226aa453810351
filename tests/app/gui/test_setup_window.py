"""The setup window (offscreen): real and synthetic sessions, bad input, Start."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import pytest

from app.gui.setup_window import SetupWindow


@pytest.fixture
def win(qtbot):
    w = SetupWindow(start_schemes=False)
    qtbot.addWidget(w)
    w.show()
    yield w
    w.close()


def read_session(qtbot, win, path) -> None:
    win.session_edit.setText(str(path))
    win.parse_clicked()
    qtbot.waitUntil(lambda: not win.runner.busy, timeout=20000)


def test_form_from_a_real_epu_sample(qtbot, win, samples_dir):
    xml = samples_dir / "epu" / "mdcatch__FoilHole_18890345_Data_18881924_18881926_20200320_090200.xml"
    read_session(qtbot, win, xml)
    f = win.form
    assert f.value("voltage_kv") == 300.0
    assert f.value("pixel_size_a") == pytest.approx(1.0685, abs=1e-4)  # samples/README
    assert f.value("n_frames") == 40 and f.value("magnification") == 75000
    # the tooltip names the file and the key each value came from
    tip = win.rows["voltage_kv"].editor.toolTip()
    assert "mdcatch__FoilHole_18890345" in tip and "from " in tip
    assert win.rows["pixel_size_a"].editor.text().startswith("1.068")
    # operator values are still missing: highlighted, Start blocked, the reason shown
    assert win.rows["particle_diameter_a"].editor.property("state") == "missing"
    assert not win.start_btn.isEnabled()
    assert "Particle diameter is missing" in win.problems.text()
    win.rows["particle_diameter_a"].set_text("160")
    # 160 Å / 1.0685 Å × 1.5 = 224.6 → 226 px; 64 px would be 3.77 Å/px, so 96 px
    assert "Extraction box 226 px" in win.boxes_label.text()
    assert "down-scaled to 96 px" in win.boxes_label.text()
    assert "EPU session" in win.session_info.text()


def test_form_from_a_real_serialem_sample(qtbot, win, samples_dir):
    mdoc = samples_dir / "mdoc" / "mdcatch__img_h1_s2_i374_movie_00001_Jul30_07.56.47.tif.mdoc"
    read_session(qtbot, win, mdoc)
    assert win.form.value("super_resolution") is True  # Binning 0.5
    assert win.form.value("pixel_size_a") == pytest.approx(0.50226)
    assert win.rows["super_resolution"].editor.currentText() == "yes"
    # the unknown detector is reported in the window, not hidden
    assert any("detector" in m for m in win.notes.messages("warning"))


def test_form_from_a_synthetic_session_and_start(qtbot, win, tmp_path):
    from metadata.synth import write_epu_session, write_movie_stub

    session = tmp_path / "Supervisor_20240517_synthetic_EPU"
    movies = write_epu_session(session, n_grid_squares=1, holes_per_square=2, shots_per_hole=2,
                               movie_writer=lambda p, _m: write_movie_stub(p, n_frames=50),
                               voltage_kv=200.0, pixel_size_a=0.83, n_fractions=50,
                               dose_e_a2=50.0, exposure_time_s=3.0, magnification=130000,
                               start=_dt.datetime(2024, 5, 17, 10, 30))
    read_session(qtbot, win, session)
    f = win.form
    assert (f.value("voltage_kv"), f.value("pixel_size_a"), f.value("n_frames")) == \
        (200.0, pytest.approx(0.83), 50)
    assert f.value("dose_per_frame_e_a2") == pytest.approx(1.0)
    assert f.value("exposure_time_s") == pytest.approx(3.0)
    assert f"{len(movies)} movies" in win.session_info.text()
    assert f.value("project_dir") == str(tmp_path / "Supervisor_20240517_synthetic_EPU_scopeside")
    win.rows["particle_diameter_a"].set_text("150")
    qtbot.waitUntil(win.start_btn.isEnabled, timeout=5000)
    with qtbot.waitSignal(win.project_started, timeout=30000) as sig:
        win.start_clicked()
    project = Path(sig.args[0])
    assert (project / "Schemes/prep/scheme.star").exists()
    assert (project / "Movies").resolve() == session.resolve()
    from app.schemes.jobstar import read_job_star

    imp = read_job_star(project / "Schemes/prep/importmovies/job.star").options
    assert imp["angpix"] == "0.83" and imp["kV"] == "200"
    assert imp["fn_in_raw"] == "Movies/Images-Disc*/GridSquare_*/Data/*_fractions.tiff"
    ext = read_job_star(project / "Schemes/proc/extract/job.star").options
    assert ext["extract_size"] == str(win.form.boxes().box_px)


def test_bad_inputs_give_messages_not_crashes(qtbot, win, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    read_session(qtbot, win, empty)
    assert win.isVisible()
    errs = win.notes.messages("error")
    assert errs and "empty or unknown folder" in errs[0]
    assert "Could not read" in win.session_info.text()

    broken = tmp_path / "FoilHole_1_Data_2_3_20240101_101010.xml"
    broken.write_text("<MicroscopeImage><not closed")
    read_session(qtbot, win, broken)
    assert "FoilHole_1_Data_2_3_20240101_101010.xml" in win.notes.messages("error")[0]

    read_session(qtbot, win, tmp_path / "does-not-exist")
    assert "no such file or folder" in win.notes.messages("error")[0]

    win.rows["voltage_kv"].set_text("three hundred")
    assert win.rows["voltage_kv"].editor.property("state") == "implausible"
    assert "not a number" in win.problems.text() and not win.start_btn.isEnabled()
    win.rows["voltage_kv"].set_text("3000")
    assert win.rows["voltage_kv"].confirm.isVisible()  # offered for an implausible value
    assert "outside the plausible range" in win.problems.text()
    win.rows["voltage_kv"].confirm.setChecked(True)
    assert "Voltage" not in win.problems.text()

    # Start refuses an existing project with a message
    win.start_clicked()
    assert "cannot start" in win.notes.messages("error")[0]


def test_open_project_that_is_not_one(qtbot, win, tmp_path):
    with qtbot.waitSignal(win.notifier.message, timeout=5000):
        win.open_project(str(tmp_path))
    assert "not a scopeside/RELION project" in win.notes.messages("error")[0]


def test_newest_session_of_the_configured_root_is_offered(qtbot, tmp_path, monkeypatch):
    import os

    root = tmp_path / "sessions"
    for i, name in enumerate(("old_session", "new_session")):
        (root / name).mkdir(parents=True)
        os.utime(root / name, (1_700_000_000 + i * 100, 1_700_000_000 + i * 100))
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[paths]\nsessions_root = "{root}"\n')
    monkeypatch.setenv("SCOPESIDE_CONFIG", str(cfg))
    w = SetupWindow(start_schemes=False)
    qtbot.addWidget(w)
    qtbot.waitUntil(lambda: w.session_edit.text() != "", timeout=10000)
    assert w.session_edit.text() == str(root / "new_session")
    assert "Newest session" in w.session_info.text()
    w.close()
