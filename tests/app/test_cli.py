"""The CLI contract: subcommands exist, user errors are one line + exit 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import COMMANDS, run


def test_help_lists_design_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        run(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("demo", "metadata", "schemer", "job", "rank", "simulate"):
        assert name in out
    assert set(COMMANDS) >= {"demo", "metadata", "schemer", "job", "rank", "simulate", "gui"}


def test_version(capsys):
    with pytest.raises(SystemExit):
        run(["--version"])
    assert capsys.readouterr().out.startswith("scopeside ")


def test_job_unknown_type_is_a_user_error(tmp_path, capsys):
    assert run(["job", "frobnicate", "--o", str(tmp_path / "j")]) == 2
    err = capsys.readouterr().err
    assert "unknown job type 'frobnicate'" in err and "Traceback" not in err


def test_entry_point_runs_as_module_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "app.cli", "job", "nope", "--o", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_settings_error_names_key_and_file(tmp_path, monkeypatch):
    from app.errors import UserError
    from app.settings import load_settings

    cfg = tmp_path / "config.toml"
    cfg.write_text("[executor]\nkind = 'pbs'\n")
    with pytest.raises(UserError) as exc:
        load_settings(site_path=cfg)
    assert "executor.kind" in str(exc.value) and str(cfg) in str(exc.value)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "scopeside.toml").write_text("[compute]\nthreads = 4\n")
    s = load_settings(proj, site_path=tmp_path / "missing.toml")
    assert s.compute.threads == 4 and s.executor.kind == "local"


def test_forced_gpu_without_gpu_is_one_clear_line(tmp_path, monkeypatch):
    from compute import backend as be

    be._reset_for_tests()
    if be.gpu_available():
        pytest.skip("a GPU is present")
    r = subprocess.run([sys.executable, "-m", "app.cli", "job", "import", "--o", str(tmp_path / "j")],
                       capture_output=True, text=True, env={**__import__("os").environ,
                                                            "SCOPESIDE_DEVICE": "gpu"})
    assert r.returncode == 2
    assert "SCOPESIDE_DEVICE=gpu was requested" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0



def test_job_with_project_keeps_its_logs_in_the_project(tmp_path):
    """--o relative to --project: run.out/run.err beside the outputs, nothing in the cwd."""
    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    (proj / "Movies").mkdir(parents=True)
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, "-m", "app.cli", "job", "import", "--o", "Import/job001",
                        "--project", str(proj), "--fn_in_raw", "Movies/*.tiff", "--angpix", "1"],
                       cwd=elsewhere, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert r.returncode == 0, r.stderr
    job = proj / "Import/job001"
    assert (job / "run.out").is_file() and (job / "RELION_JOB_EXIT_SUCCESS").is_file()
    assert "movies" in (job / "run.out").read_text()
    assert list(elsewhere.iterdir()) == []


def test_closed_pipe_is_a_quiet_exit_not_an_internal_error():
    """`scopeside metadata DIR | head`: the reader leaves early; no "internal error" line."""
    code = ("import sys, app.commands.config as c\n"
            "c.main = lambda args: print('x' * 2_000_000)\n"
            "from app.cli import run\n"
            "sys.exit(run(['config']))\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert p.stdout.read(10) == b"x" * 10
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141, err
    assert "internal error" not in err and "Traceback" not in err
