"""The class ranker on RELION-layout Class2D outputs: selection rules, outputs, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from app.errors import UserError
from app.jobs import rank_select
from app.jobs.rank_select import (
    UNSCORED,
    rank_and_select,
    read_classification,
    read_feedback,
    select_classes,
    write_feedback,
)
from compute.ranker.features import N_FEATURES, FeatureStats
from compute.ranker.model import RankerNet
from metadata.star import read_star, write_star
from tests.compute.ranker.relion_fixture import write_fake_class2d

KINDS = {"good": 1.0, "empty": 0.5, "ice": 0.3, "carbon": 0.3, "misaligned": 0.3}


# --- selection rules ------------------------------------------------------------------------

def test_select_threshold_and_unscored():
    s = np.array([0.9, 0.1, UNSCORED, 0.15, 0.149])
    n = np.array([100, 200, 5, 50, 60])
    assert select_classes(s, n, 0.15).tolist() == [True, False, False, True, False]


def test_select_tops_up_with_best_remaining_classes():
    s = np.array([0.9, 0.1, UNSCORED, 0.05, 0.12])
    n = np.array([100, 200, 8, 50, 60])
    # 100 selected; need 150 -> add 0.12 (60) -> 160
    assert select_classes(s, n, 0.15, min_particles=150).tolist() == [True, False, False, False,
                                                                      True]
    # need 3 classes -> 0.9, 0.12, 0.1
    assert select_classes(s, n, 0.15, min_classes=3).tolist() == [True, True, False, False, True]
    # asking for more than exists selects every scored class, never the unscored one
    assert select_classes(s, n, 0.15, min_particles=10**6).tolist() == [True, True, False, True,
                                                                        True]


# --- end to end with a checkpoint ------------------------------------------------------------

@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """An untrained checkpoint: enough to test reading/writing and fallbacks."""
    torch.manual_seed(0)
    m = RankerNet()
    p = tmp_path_factory.mktemp("w") / "ranker.pt"
    torch.save({"config": m.config(), "state_dict": m.state_dict(),
                "feature_stats": FeatureStats(np.zeros(N_FEATURES),
                                              np.ones(N_FEATURES)).to_dict()}, p)
    rank_select.load_ranker.cache_clear()
    return p


@pytest.fixture(scope="module")
def fake_job(tmp_path_factory):
    proj = tmp_path_factory.mktemp("proj")
    return write_fake_class2d(proj, seed=2, n_classes=10, zero_classes=(0,), kinds=KINDS)


def test_outputs_are_consistent(fake_job, random_weights, tmp_path):
    f = fake_job
    res = rank_and_select(f.optimiser, tmp_path / "out", 0.15, min_particles=0,
                          project_dir=f.project, weights=random_weights)
    assert res.scores[0] == UNSCORED                       # zero-particle class
    small = f.counts <= 10
    assert (res.scores[small] == UNSCORED).all()
    assert ((res.scores[~small] >= 0) & (res.scores[~small] <= 1)).all()
    rm = read_star(tmp_path / "out" / "rank_model.star")
    np.testing.assert_allclose(rm["model_classes"]["rlnClassScore"], res.scores, atol=1e-5)
    assert "model_general" in rm
    ca = read_star(tmp_path / "out" / "class_averages.star")[""]
    assert list(ca["rlnPredictedClassScore"]) == sorted(ca["rlnPredictedClassScore"],
                                                       reverse=True)
    assert set(ca["rlnClassNumber"]) == set(range(1, 11))
    bs = read_star(tmp_path / "out" / "backup_selection.star")[""]
    assert bs["rlnSelected"].tolist() == res.selected.astype(int).tolist()
    parts = read_star(tmp_path / "out" / "particles.star")
    assert "optics" in parts
    kept = set(np.flatnonzero(res.selected) + 1)
    assert set(parts["particles"]["rlnClassNumber"]) <= kept
    assert len(parts["particles"]) == res.n_particles_selected == f.counts[res.selected].sum()


def test_min_particles_top_up_end_to_end(fake_job, random_weights, tmp_path):
    res = rank_and_select(fake_job.optimiser, tmp_path, threshold=1.01, min_particles=1000,
                          project_dir=fake_job.project, weights=random_weights)
    assert res.n_particles_selected >= 1000
    # the added classes are the best-scored ones
    scored = res.scores > UNSCORED + 1
    worst_in = res.scores[res.selected].min()
    assert (res.scores[scored & ~res.selected] <= worst_in).all()


def test_no_accuracy_columns_falls_back(tmp_path, random_weights, caplog):
    f = write_fake_class2d(tmp_path, seed=2, n_classes=10, accuracy_columns=False, kinds=KINDS)
    c = read_classification(f.optimiser, f.project)
    assert any("rlnAccuracyRotations" in w for w in c.warnings)
    res = rank_and_select(f.optimiser, tmp_path / "o", project_dir=f.project,
                          weights=random_weights)
    assert np.isfinite(res.scores).all()


def test_missing_class_images(tmp_path, random_weights):
    f = write_fake_class2d(tmp_path, seed=2, n_classes=10, kinds=KINDS)
    # two classes point at a stack that does not exist: they are not scored
    m = read_star(f.model)
    mc = m["model_classes"]
    mc.loc[[1, 2], "rlnReferenceImage"] = ["000001@Class2D/job007/gone.mrcs",
                                           "000002@Class2D/job007/gone.mrcs"]
    write_star(f.model, m)
    res = rank_and_select(f.optimiser, tmp_path / "o", project_dir=f.project,
                          weights=random_weights)
    assert res.scores[1] == UNSCORED and res.scores[2] == UNSCORED
    assert not res.selected[1] and not res.selected[2]
    # no image at all: one clear error
    f.classes_mrcs.unlink()
    with pytest.raises(UserError, match="none of the 10 class images"):
        rank_and_select(f.optimiser, tmp_path / "o2", project_dir=f.project,
                        weights=random_weights)


def test_bad_inputs_are_user_errors(tmp_path, random_weights):
    with pytest.raises(Exception, match="not found"):
        read_classification(tmp_path / "nope_optimiser.star")
    write_star(tmp_path / "x_optimiser.star", {"optimiser_general": {"rlnCurrentIteration": 1}})
    with pytest.raises(UserError, match="not an optimiser.star"):
        read_classification(tmp_path / "x_optimiser.star")
    with pytest.raises(UserError, match="weights not found"):
        rank_select.load_ranker(str(tmp_path / "missing.pt"))


def test_model_star_given_instead_of_optimiser(fake_job, random_weights, tmp_path):
    res = rank_and_select(fake_job.model, tmp_path, project_dir=fake_job.project,
                          weights=random_weights)
    assert len(res.scores) == 10


def test_feedback_round_trip(tmp_path):
    p = write_feedback(tmp_path, "Class2D/job007/run_it025_model.star", [1, 2, 3],
                       ["1@a.mrcs", "2@a.mrcs", "3@a.mrcs"], [0.9, 0.1, UNSCORED],
                       [True, True, False], [True, False, False])
    assert p.name == "ranker_feedback.star"
    gen, tab = read_feedback(p)
    assert gen["rlnModelStarFile"].endswith("run_it025_model.star")
    assert tab["rlnSelected"].tolist() == [1, 1, 0]
    assert tab["rlnAutoSelected"].tolist() == [1, 0, 0]
    assert isinstance(tab, pd.DataFrame)


def test_relion30_translation_accuracy_in_pixels_is_converted(tmp_path):
    """RELION <= 3.0 model.star: rlnAccuracyTranslations in pixels -> Å with the pixel size."""
    f = write_fake_class2d(tmp_path, seed=2, n_classes=10, kinds=KINDS)
    c0 = read_classification(f.optimiser, f.project)
    m = read_star(f.model)
    mc = m["model_classes"]
    angst = pd.to_numeric(mc["rlnAccuracyTranslationsAngst"]).to_numpy()
    px = c0.pixel_size_a
    m["model_classes"] = mc.drop(columns=["rlnAccuracyTranslationsAngst"]).assign(
        rlnAccuracyTranslations=angst / px)
    write_star(f.model, m)
    c = read_classification(f.optimiser, f.project)
    metas = rank_select.class_metas(c)
    np.testing.assert_allclose([mt.acc_trans_a for mt in metas], angst, rtol=1e-5)
    assert not any("no rlnAccuracyTranslationsAngst" in w for w in c.warnings)
    assert any("converted to Å" in w for w in c.warnings)


def test_a_3d_run_is_refused(tmp_path):
    f = write_fake_class2d(tmp_path, seed=2, n_classes=10, kinds=KINDS)
    m = read_star(f.model)
    m["model_general"]["rlnReferenceDimensionality"] = 3
    write_star(f.model, m)
    with pytest.raises(UserError, match="rlnReferenceDimensionality is 3.*2D class averages"):
        read_classification(f.optimiser, f.project)
