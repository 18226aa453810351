"""Simulated training data carry the right ground truth; the training loop learns."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from compute.ranker.synth import (
    JobConditions,
    best_match_frc,
    class_sizes,
    synth_job,
    target_score,
)
from compute.ranker.train import TrainConfig, fit, predict


@pytest.fixture(scope="module")
def small_job():
    cond = JobConditions(molecule="asym", pixel_size_a=3.0, box=64, diameter_a=130.0, snr=0.05,
                         n_classes=22, n_particles=6000,
                         kind_weights={"good": 1.0, "empty": 0.6, "ice": 0.4, "misaligned": 0.4})
    return cond, synth_job(cond, seed=4)


def test_synth_job_is_seeded_and_labelled(small_job):
    cond, (imgs, metas, truth) = small_job
    small = JobConditions(**{**cond.__dict__, "n_classes": 3})
    a, _, ta = synth_job(small, seed=4)
    b, _, tb = synth_job(small, seed=4)
    np.testing.assert_array_equal(a, b)
    assert [t.score for t in ta] == [t.score for t in tb]
    assert imgs.shape == (22, 64, 64) and np.isfinite(imgs).all()
    for t in truth:
        assert 0.0 <= t.score <= 1.0
        assert t.score == pytest.approx(target_score(t.purity, t.frc_score))


def test_ground_truth_separates_good_from_junk(small_job):
    _, (_, metas, truth) = small_job
    kinds = {t.kind for t in truth}
    assert {"good", "empty"} <= kinds
    good = [t for t in truth if t.kind == "good" and t.n_particles > 50]
    empty = [t for t in truth if t.kind == "empty"]
    assert min(t.frc_score for t in good) > max(t.frc_score for t in empty)
    assert all(t.good for t in good) and not any(t.good for t in empty)
    assert all(t.purity == 0.0 and t.score == 0.0 for t in empty)
    # metadata: empty classes are aligned far worse than good ones
    m_good = [m for m, t in zip(metas, truth) if t.kind == "good" and t.n_particles > 50]
    m_empty = [m for m, t in zip(metas, truth) if t.kind == "empty"]
    assert max(m.acc_rot_deg for m in m_good) < min(m.acc_rot_deg for m in m_empty)


def test_best_match_frc_finds_rotated_and_shifted_copies(rng):
    yy, xx = np.mgrid[0:64, 0:64] - 32
    ref = np.exp(-0.5 * (((yy - 5) / 4.0) ** 2 + (xx / 9.0) ** 2)) + \
        0.6 * np.exp(-0.5 * (((yy + 8) / 3.0) ** 2 + ((xx - 6) / 3.0) ** 2))
    img = ndimage.shift(ndimage.rotate(ref, 30, reshape=False, order=3), (1.0, -2.0), order=3)
    assert best_match_frc(img, ref[None], 2.0, 100.0) > 0.9
    assert best_match_frc(rng.normal(size=(64, 64)), ref[None], 2.0, 100.0) < 0.35


def test_class_sizes_sum_and_tiny_classes():
    s = class_sizes(200, 50000, np.random.default_rng(1))
    assert s.sum() <= 50000 and (s >= 0).all() and (s <= 10).sum() >= 3


def _feature_rule_data(n: int, seed: int):
    """Blank images, random features, target a sigmoid of the first feature."""
    rng = np.random.default_rng(seed)
    F = rng.normal(size=(n, 25)).astype(np.float32)
    y = (1 / (1 + np.exp(-2 * F[:, 0]))).astype(np.float32)
    return np.zeros((n, 64, 64), dtype=np.float32), F, y


def test_fit_learns_a_feature_rule():
    imgs, F, y = _feature_rule_data(400, 0)
    cfg = TrainConfig(mode="features", epochs=30, batch_size=32, lr=3e-3, threads=1)
    model, hist = fit(imgs[:300], F[:300], y[:300], cfg, val=(imgs[300:], F[300:], y[300:]))
    assert hist[-1]["val_mse"] < 0.2 * float(np.var(y[300:]))
    p = predict(model, imgs[300:], F[300:])
    assert np.corrcoef(p, y[300:])[0, 1] > 0.85


def test_fit_keeps_the_best_dev_epoch():
    imgs, F, y = _feature_rule_data(200, 1)
    cfg = TrainConfig(mode="features", epochs=6, batch_size=32, lr=3e-3, threads=1,
                      select_best=True)
    model, hist = fit(imgs[:150], F[:150], y[:150], cfg, val=(imgs[150:], F[150:], y[150:]))
    epochs = [h for h in hist if "epoch" in h]
    best = min(epochs, key=lambda h: h["val_mse"])
    assert hist[-1]["selected_epoch"] == best["epoch"]
    p = np.clip(predict(model, imgs[150:], F[150:]), 0, 1)
    assert np.isclose(np.mean((p - y[150:]) ** 2), best["val_mse"], rtol=1e-5)


def test_random_training_molecules_in_conditions():
    from compute.ranker.synth import random_conditions

    rng = np.random.default_rng(3)
    names = [random_conditions(rng, ["rand", "var:asym", "small"]).molecule for _ in range(30)]
    assert any(n.startswith("rand:") for n in names)
    assert any(n.startswith("var:asym:") for n in names)
    assert "small" in names
    # a job of a random molecule simulates like any other
    cond = random_conditions(np.random.default_rng(4), ["rand"])
    cond = JobConditions(cond.molecule, cond.pixel_size_a, min(cond.box, 64), cond.diameter_a,
                         0.05, n_classes=4, n_particles=400)
    imgs, metas, truth = synth_job(cond, 0)
    assert imgs.shape[0] == 4 and len(truth) == 4
