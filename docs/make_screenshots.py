"""Screenshots of the setup and monitor windows (offscreen), written to docs/screenshots/.

    QT_QPA_PLATFORM=offscreen .venv/bin/python docs/make_screenshots.py

The setup window reads a real EPU movie XML from ../shared/samples when present (else a
synthetic EPU session); the monitor watches a synthetic project made with the test
fixtures' RELION file writers (schemes from the shipped templates, outputs of every job).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "docs" / "screenshots"
SAMPLE = (REPO.parent / "shared" / "samples" / "epu"
          / "mdcatch__FoilHole_18890345_Data_18881924_18881926_20200320_090200.xml")


def wait_for(app, cond, timeout_s: float = 60.0) -> None:
    from PyQt6 import QtCore

    t_end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > t_end:
            raise TimeoutError("the window did not load in time")
        app.processEvents(QtCore.QEventLoop.ProcessEventsFlag.AllEvents, 50)
        time.sleep(0.01)


def settle(app, seconds: float = 0.5) -> None:
    from PyQt6 import QtCore

    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        app.processEvents(QtCore.QEventLoop.ProcessEventsFlag.AllEvents, 50)


def setup_shot(app, tmp: Path) -> Path:
    from app.gui.setup_window import SetupWindow

    win = SetupWindow(start_schemes=False)
    win.resize(1100, 900)
    win.show()
    if SAMPLE.exists():
        session = SAMPLE
    else:
        from metadata.synth import write_epu_session

        session = tmp / "Supervisor_synthetic_EPU"
        write_epu_session(session, n_grid_squares=1)
    win.session_edit.setText(str(session))
    win.parse_clicked()
    wait_for(app, lambda: win.form.value("voltage_kv") is not None and not win.runner.busy)
    win.rows["particle_diameter_a"].set_text("160")
    win.rows["project_dir"].set_text(str(tmp / "apoferritin_scopeside"))
    settle(app)
    path = OUT / "setup.png"
    win.grab().save(str(path))
    win.close()
    return path


def monitor_shots(app, tmp: Path) -> list[Path]:
    import numpy as np

    from app.gui.backend_adapter import create_project
    from app.gui.monitor_window import MonitorWindow
    from tests.app.gui import fakes

    project = tmp / "project"
    create_project({"pixel_size_a": 1.0, "voltage_kv": 300.0, "cs_mm": 2.7,
                    "dose_per_frame_e_a2": 1.0, "particle_diameter_a": 150.0,
                    "project_dir": str(project)}, None)
    rng = np.random.default_rng(3)
    fakes.populate(project, rng, n_mics=80, n_classes=60,
                   scores=np.clip(rng.beta(2, 3, 60), 0, 1))
    win = MonitorWindow(project, interval_ms=500)
    win.resize(1500, 950)
    win.show()
    wait_for(app, lambda: win.gallery.model.data is not None and not win.gallery.pending
             and "picks" in win.viewer.caption.text()
             and "run_class001" in win.maps.rows["Refine3D"][0].text and win.panels)
    win.gallery.set_threshold(0.4)
    win.gallery.toggle(win.gallery.display_order()[-1])
    settle(app, 1.0)
    paths = []
    for i, name in enumerate(("monitor_classes", "monitor_plots", "monitor_micrograph",
                              "monitor_3d")):
        win.tabs.setCurrentIndex(i)
        settle(app, 0.8)
        p = OUT / f"{name}.png"
        win.grab().save(str(p))
        paths.append(p)
    win.close()
    return paths


def main() -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("SCOPESIDE_CONFIG", str(Path(tempfile.mkdtemp()) / "none.toml"))
    from app.gui.app import make_app

    app = make_app()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="scopeside-shots-") as d:
        tmp = Path(d)
        shots = [setup_shot(app, tmp), *monitor_shots(app, tmp)]
    for p in shots:
        print(p.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
