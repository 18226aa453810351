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


def _fake_split(path, n_jobs, rng, job0=0):
    """A tiny labelled split in the ``generate`` format: bright centred blobs are good,
    noise is bad; each job has its own intensity scale."""
    from compute.ranker.features import JOB_SLICE

    yy, xx = np.mgrid[0:64, 0:64] - 32
    imgs, feats, tgt, job = [], [], [], []
    for j in range(n_jobs):
        gain = float(np.exp(rng.uniform(-1, 1)))
        for k in range(12):
            good = k % 2 == 0
            sh = rng.integers(-4, 5, 2)
            img = rng.normal(0, 0.3, (64, 64))
            if good:
                img += np.exp(-((yy - sh[0]) ** 2 + (xx - sh[1]) ** 2) / 60.0)
            imgs.append((img - img.mean()) / img.std())
            f = rng.normal(0, 1, N_FEATURES)
            f[:5] = np.abs(f[:5]) + 1.0
            f[5:JOB_SLICE.start] *= gain
            feats.append(f)
            tgt.append(0.9 if good else 0.0)
            job.append(job0 + j)
    n = len(tgt)
    good = np.array(tgt) > 0.5
    np.savez_compressed(path, images=np.array(imgs, np.float16), features=np.array(feats),
                        scored=np.ones(n, bool), target=np.array(tgt),
                        purity=np.where(good, 1.0, 0.0), frc=np.where(good, 0.9, 0.0),
                        good=good, n_particles=np.full(n, 100.0), job=np.array(job),
                        kind=np.where(good, "good", "empty"))


def test_training_writes_preprocessing_and_fine_tunes(tmp_path):
    """``train --recentre --relative-intensity`` records both in the checkpoint (so that
    inference does the same), ``--init`` fine-tunes from a checkpoint, and ``evaluate``
    of the result reproduces the training run's validation MSE."""
    from app.ranker_training import evaluate, train

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    _fake_split(data / "train.npz", 6, rng)
    _fake_split(data / "val.npz", 2, rng, job0=100)
    res = train(data, tmp_path / "a", epochs=2, threads=1, modes=["full"], recentre=True,
                relative=True, lr=3e-3)
    ck = torch.load(tmp_path / "a" / "ranker.pt", map_location="cpu", weights_only=True)
    assert ck["preprocess"] == {"recentre": True, "relative_intensity": True}
    rank_select.load_ranker.cache_clear()
    r = rank_select.load_ranker(tmp_path / "a" / "ranker.pt")
    assert r.recentre and r.relative_intensity
    ev = evaluate(data, tmp_path / "a")
    assert ev["mse"] == pytest.approx(res["models"]["full"]["val"]["mse"], rel=1e-4)
    res2 = train(data, tmp_path / "b", epochs=1, threads=1, modes=["full"], recentre=True,
                 relative=True, init=tmp_path / "a" / "ranker.pt", lr=1e-8)
    assert res2["models"]["full"]["fine_tuned_from"] == str(tmp_path / "a" / "ranker.pt")
    # a (negligible-rate) fine-tune starts from the given weights, not from scratch
    assert res2["models"]["full"]["val"]["mse"] == pytest.approx(
        res["models"]["full"]["val"]["mse"], rel=1e-3)


def test_clean_job_copies_keep_good_classes_and_rescore_job_features():
    from app.ranker_training import CLEAN_JOB_OFFSET, clean_job_copies
    from compute.ranker.features import JOB_SLICE

    rng = np.random.default_rng(3)
    n = 40
    X = rng.normal(size=(n, N_FEATURES))
    data = {"features": X, "good": np.arange(n) % 4 == 0, "job": np.repeat([0, 1], n // 2),
            "target": rng.random(n), "n_particles": np.full(n, 50.0)}
    out = clean_job_copies(data, fraction=1.0, seed=0, junk_keep=0.0)
    np.testing.assert_array_equal(out["features"][:n], X)          # originals untouched
    copy = out["job"] >= CLEAN_JOB_OFFSET
    assert out["good"][copy].all() and copy.sum() == data["good"].sum()
    for j in (0, 1):
        m = out["job"] == j + CLEAN_JOB_OFFSET
        J = out["features"][m][:, JOB_SLICE]
        np.testing.assert_allclose(J.mean(axis=0), 0, atol=1e-9)
        np.testing.assert_allclose(J.std(axis=0), 1, atol=1e-9)
        # z-scoring the stored z-scores = z-scoring the raw subset: same order
        raw = X[(data["job"] == j) & data["good"]][:, JOB_SLICE]
        np.testing.assert_array_equal(np.argsort(J[:, 0]), np.argsort(raw[:, 0]))
        # the other features are copied unchanged
        np.testing.assert_array_equal(out["features"][m][:, :JOB_SLICE.start],
                                      X[(data["job"] == j) & data["good"]][:, :JOB_SLICE.start])
