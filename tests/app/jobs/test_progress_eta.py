"""JobContext.progress: per-phase clocks and an ETA from the recent rate."""

from __future__ import annotations

import logging
import re

import pytest

import app.jobs.base as base
from app.jobs.base import JobContext


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _eta_s(text: str) -> int:
    h, m, s = re.search(r"ETA (\d+):(\d\d):(\d\d)", text).groups()
    return int(h) * 3600 + int(m) * 60 + int(s)


@pytest.fixture()
def ctx(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(base.time, "monotonic", clock)
    c = JobContext(out_dir=tmp_path, options={}, raw_options={},
                   logger=logging.getLogger("test.progress"))
    return c, clock


def test_eta_follows_a_slowing_rate(ctx, caplog):
    """Mini-batches that get slower (2 s, then 10 s each): the ETA at half-way must be near
    the truth at the current rate (100 x 10 s), not the run-average estimate."""
    c, clock = ctx
    caplog.set_level(logging.INFO, logger="test.progress")
    for i in range(1, 101):
        clock.t += 2.0 if i <= 50 else 10.0
        c.progress(i, 200, "mini-batch")
    last = [r.getMessage() for r in caplog.records if "mini-batch 100/200" in r.getMessage()][-1]
    eta = _eta_s(last)
    true_remaining = 100 * 10.0
    average_estimate = (50 * 2.0 + 50 * 10.0)  # elapsed/done * remaining = 600 s
    assert abs(eta - true_remaining) < 0.1 * true_remaining, last
    assert abs(eta - true_remaining) < abs(average_estimate - true_remaining)


def test_a_new_label_starts_its_own_clock(ctx, caplog):
    """The final pass after 10 minutes of mini-batches: its ETA depends on its own speed only
    (before the fix, elapsed-since-job-start / done gave a huge ETA)."""
    c, clock = ctx
    caplog.set_level(logging.INFO, logger="test.progress")
    for i in range(1, 61):
        clock.t += 10.0
        c.progress(i, 60, "mini-batch")
    for d in range(100, 1001, 100):
        clock.t += 1.0  # 100 particles a second
        c.progress(d, 5000, "final pass", force=True)
    msg = [r.getMessage() for r in caplog.records if "final pass 1000/5000" in r.getMessage()][-1]
    assert abs(_eta_s(msg) - 40) <= 2, msg  # 4,000 particles left at 100/s
    assert "elapsed 0:10:10" in msg  # the elapsed time is still the job's


def test_no_progress_yet_gives_unknown_eta(ctx, caplog):
    c, clock = ctx
    caplog.set_level(logging.INFO, logger="test.progress")
    c.progress(0, 10, "movies", force=True)
    assert "ETA ?" in caplog.records[-1].getMessage()
