"""`scopeside gui` without a display, the controller, and the worker idiom."""

from __future__ import annotations

import threading

import pytest

from app.cli import run
from app.commands.gui import display_problem
from app.errors import UserError
from app.gui.workers import Notifier, TaskRunner


def test_display_problem_rules():
    assert "no display" in display_problem({}, "linux")
    assert display_problem({"DISPLAY": ":0"}, "linux") is None
    assert display_problem({"WAYLAND_DISPLAY": "wayland-0"}, "linux") is None
    assert display_problem({"QT_QPA_PLATFORM": "offscreen"}, "linux") is None
    assert display_problem({}, "win32") is None


def test_gui_command_without_display_is_one_clear_line(monkeypatch, capsys):
    for var in ("QT_QPA_PLATFORM", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(var, raising=False)
    assert run(["gui"]) == 2
    err = capsys.readouterr().err
    assert "no display" in err and "QT_QPA_PLATFORM=offscreen" in err
    assert "Traceback" not in err


def test_gui_command_refuses_a_folder_that_is_not_a_project(tmp_path, capsys):
    assert run(["gui", "--project", str(tmp_path)]) == 2
    assert "not a project" in capsys.readouterr().err


def test_controller_opens_monitor_and_returns_to_setup(qtbot, tmp_path, rng):
    from app.gui.app import Controller
    from tests.app.gui import fakes

    fakes.populate(tmp_path, rng, n_mics=3, n_classes=4)
    (tmp_path / "Schemes").mkdir()
    ctl = Controller(interval_ms=500)
    qtbot.addWidget(ctl.setup)
    ctl.setup.show()
    ctl.setup.open_project(str(tmp_path))
    qtbot.waitUntil(lambda: tmp_path.resolve() in ctl.monitors, timeout=10000)
    win = ctl.monitors[tmp_path.resolve()]
    assert win.isVisible() and not ctl.setup.isVisible()
    qtbot.waitUntil(lambda: win.gallery.model.data is not None, timeout=20000)
    win.close()  # nothing running: closes without asking
    assert ctl.setup.isVisible() and not ctl.monitors
    ctl.setup.close()


def test_task_runner_results_and_errors_reach_the_gui_thread(qtbot):
    notifier = Notifier()
    runner = TaskRunner(notifier, "test")
    gui_thread = threading.get_ident()
    seen: dict[str, object] = {}

    def work(x: int) -> tuple[int, int]:
        return x * 2, threading.get_ident()

    def fail() -> None:
        raise UserError("bad.star: no rlnMicrographName column")

    runner.submit(work, 21, on_result=lambda r: seen.update(result=r,
                                                             where=threading.get_ident()))
    with qtbot.waitSignal(notifier.message, timeout=5000) as sig:
        runner.submit(fail, on_error=lambda m: seen.update(error=m))
    assert sig.args == ["error", "bad.star: no rlnMicrographName column"]
    qtbot.waitUntil(lambda: "error" in seen and "result" in seen, timeout=5000)
    value, worker_thread = seen["result"]
    assert value == 42 and worker_thread != gui_thread and seen["where"] == gui_thread
    assert not runner.busy
    runner.stop()
    with pytest.raises(RuntimeError):
        runner.submit(work, 1)
