"""``scopeside rank`` and the select job's class-ranker branch, end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.cli import run
from app.jobs import rank_select
from app.jobs.base import exit_status, run_job
from compute.ranker.features import N_FEATURES, FeatureStats
from compute.ranker.model import RankerNet
from metadata.star import read_star
from tests.compute.ranker.relion_fixture import write_fake_class2d


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(1)
    m = RankerNet()
    p = tmp_path_factory.mktemp("w") / "ranker.pt"
    torch.save({"config": m.config(), "state_dict": m.state_dict(),
                "feature_stats": FeatureStats(np.zeros(N_FEATURES),
                                              np.ones(N_FEATURES)).to_dict()}, p)
    rank_select.load_ranker.cache_clear()
    return p


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return write_fake_class2d(tmp_path_factory.mktemp("proj"), seed=2, n_classes=10,
                              kinds={"good": 1.0, "empty": 0.5, "ice": 0.3, "carbon": 0.3,
                                     "misaligned": 0.3})


def test_rank_command_writes_outputs(job, weights, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(job.project)
    rc = run(["rank", "--model", str(job.optimiser), "--o", str(tmp_path / "r"),
              "--weights", str(weights), "--min_classes", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "selected" in out
    for name in ("rank_model.star", "class_averages.star", "particles.star",
                 "backup_selection.star"):
        assert (tmp_path / "r" / name).is_file()
    assert read_star(tmp_path / "r" / "backup_selection.star")[""]["rlnSelected"].sum() >= 3


def test_rank_command_bad_input_is_one_line(tmp_path, capsys):
    assert run(["rank", "--model", str(tmp_path / "none_optimiser.star")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "Traceback" not in err
    assert run(["rank", "--model", str(tmp_path), "--threshold", "2"]) == 2


def test_select_job_runs_the_ranker(job, weights, monkeypatch):
    monkeypatch.setattr(rank_select, "CHECKPOINT", weights)
    rank_select.load_ranker.cache_clear()
    out = job.project / "Select" / "job008"
    rc = run_job("select", out, {"do_class_ranker": "Yes",
                                 "fn_model": "Class2D/job007/run_it025_optimiser.star",
                                 "rank_threshold": "0.15", "select_nr_parts": "500"},
                 project_dir=job.project, command_line=["test"])
    assert rc == 0, (out / "RELION_JOB_EXIT_FAILURE").read_text() if rc else ""
    assert exit_status(out) == "success"
    parts = read_star(out / "particles.star")["particles"]
    assert len(parts) >= 500
    rank_select.load_ranker.cache_clear()
