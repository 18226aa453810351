"""Fixtures for the schemes tests: a project with the test-double jobs, a fake clock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.app.schemes.doubles import extra_jobs_env

REPO = Path(__file__).resolve().parents[3]


class FakeClock:
    """now()/sleep() without real time passing; ``on_sleep`` runs after every sleep."""

    def __init__(self, start: float = 1_000_000.0, on_sleep=None) -> None:
        self.t = start
        self.slept: list[float] = []
        self.on_sleep = on_sleep

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)
        self.slept.append(seconds)
        if self.on_sleep is not None:
            self.on_sleep(self)


@pytest.fixture
def doubles_env(monkeypatch):
    """Register the test doubles (in this process and in child processes)."""
    monkeypatch.setenv("SCOPESIDE_EXTRA_JOBS", extra_jobs_env())
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{path}" if path else str(REPO))
    return os.environ.copy()


@pytest.fixture
def project(tmp_path, doubles_env) -> Path:
    p = tmp_path / "proj"
    p.mkdir()
    return p


@pytest.fixture
def fake_clock():
    return FakeClock()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A private single-node SLURM for the whole session; skips with the reason if impossible."""
    from tests.app.schemes.slurm_cluster import SlurmCluster, why_unavailable

    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()
