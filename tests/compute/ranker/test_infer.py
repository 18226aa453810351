"""The shipped class-ranker weights on a simulated job of a molecule never used in training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compute import backend
from compute.ranker.features import ClassMeta
from compute.ranker.infer import UNSCORED, ClassRanker
from compute.ranker.synth import JobConditions, synth_job

WEIGHTS = Path(__file__).resolve().parents[3] / "resources" / "ranker" / "ranker.pt"


@pytest.fixture(scope="module")
def ranker():
    return ClassRanker(torch.load(WEIGHTS, map_location="cpu", weights_only=True), device="cpu")


@pytest.fixture(scope="module")
def heldout_job():
    cond = JobConditions(molecule="d2", pixel_size_a=2.2, box=80, diameter_a=125.0, snr=0.04,
                         n_classes=24, n_particles=8000,
                         kind_weights={"good": 1.0, "empty": 0.4, "ice": 0.3, "carbon": 0.3,
                                       "aggregate": 0.3, "offcentre": 0.2})
    return cond, synth_job(cond, seed=2024)


def test_good_classes_outscore_junk(ranker, heldout_job):
    cond, (imgs, metas, truth) = heldout_job
    r = ranker.score(imgs, metas, cond.pixel_size_a, cond.diameter_a)
    s = r.scores
    good = np.array([t.good for t in truth]) & r.scored
    junk = np.array([t.kind in ("empty", "ice", "carbon", "aggregate") for t in truth]) & r.scored
    assert good.sum() >= 4 and junk.sum() >= 4
    # a molecule never seen in training: good classes near their targets, junk near 0
    tgt = np.array([t.score for t in truth])
    assert s[good].mean() > 0.6 and s[junk].mean() < 0.1
    assert np.mean((s[r.scored] - tgt[r.scored]) ** 2) < 0.08
    n = np.array([t.n_particles for t in truth])
    sel = (s >= 0.15) & r.scored
    assert n[sel & junk].sum() / n[junk].sum() <= 0.1
    assert n[~sel & good].sum() / n[good].sum() <= 0.1


def test_scores_ignore_small_centring_errors_and_the_intensity_scale(ranker, heldout_job):
    """The shipped weights recentre the network image and use job-relative intensity
    features: good class averages moved 2-3 px off the box centre (as a classification
    leaves them) or a job written in other intensity units keep their scores."""
    assert ranker.recentre and ranker.relative_intensity
    cond, (imgs, metas, truth) = heldout_job
    base = ranker.score(imgs, metas, cond.pixel_size_a, cond.diameter_a)
    good = np.array([t.good for t in truth]) & base.scored
    rng = np.random.default_rng(5)
    moved = np.stack([np.roll(im, tuple(rng.choice([-3, -2, 2, 3], 2)), axis=(0, 1))
                      for im in imgs])
    s_moved = ranker.score(moved, metas, cond.pixel_size_a, cond.diameter_a).scores
    assert np.abs(s_moved[good] - base.scores[good]).mean() < 0.05
    assert ((s_moved[good] >= 0.15) == (base.scores[good] >= 0.15)).mean() >= 0.9
    s_bright = ranker.score(6.0 * imgs, metas, cond.pixel_size_a, cond.diameter_a).scores
    np.testing.assert_allclose(s_bright[base.scored], base.scores[base.scored], atol=2e-3)


def test_unscored_classes_and_unknown_metadata(ranker, heldout_job):
    cond, (imgs, metas, _) = heldout_job
    metas2 = [ClassMeta(m.n_particles) for m in metas]        # no accuracies, no resolution
    metas2[0] = ClassMeta(10)
    metas2[1] = ClassMeta(0)
    r = ranker.score(imgs, metas2, cond.pixel_size_a, cond.diameter_a)
    assert r.scores[0] == UNSCORED and r.scores[1] == UNSCORED
    ok = r.scores[2:]
    assert ((ok == UNSCORED) | ((ok >= 0) & (ok <= 1))).all()
    assert (ok >= 0).sum() >= 15


def test_bad_checkpoint_and_geometry_are_compute_errors(ranker, heldout_job):
    from compute.errors import ComputeError

    with pytest.raises(ComputeError, match="checkpoint"):
        ClassRanker({"config": {}})
    cond, (imgs, metas, _) = heldout_job
    with pytest.raises(ComputeError, match="pixel size"):
        ranker.score(imgs, metas, 0.0, 100.0)


@pytest.mark.gpu
def test_gpu_scores_match_cpu(heldout_job):
    if not backend.gpu_available() or not torch.cuda.is_available():
        pytest.skip("no usable GPU")
    ck = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    cond, (imgs, metas, _) = heldout_job
    a = ClassRanker(ck, device="cpu").score(imgs, metas, cond.pixel_size_a, cond.diameter_a)
    b = ClassRanker(ck, device="gpu").score(imgs, metas, cond.pixel_size_a, cond.diameter_a)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-3)
