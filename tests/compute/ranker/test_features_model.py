"""Class-ranker features and network: behaviour on images with known structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compute.fourier import radius_grid
from compute.ranker.features import (
    FEATURE_NAMES,
    IMAGE_FEATURES,
    INTENSITY_FEATURES,
    JOB_SLICE,
    META_FEATURES,
    N_FEATURES,
    ClassMeta,
    FeatureStats,
    density_centres,
    image_features,
    job_features,
    network_images,
    normalise_features,
    relative_intensity,
)
from compute.ranker.model import RankerNet

PX, DIAM, BOX = 2.0, 120.0, 96   # particle radius 30 px


def _feat(img, name):
    return image_features(img, PX, DIAM)[IMAGE_FEATURES.index(name)]


def _blob(cy=0.0, cx=0.0, sigma=6.0, amp=1.0):
    yy, xx = np.mgrid[0:BOX, 0:BOX] - BOX // 2
    return amp * np.exp(-0.5 * ((yy - cy) ** 2 + (xx - cx) ** 2) / sigma ** 2)


def test_feature_list_matches_the_spec():
    assert N_FEATURES == len(FEATURE_NAMES) == 25
    assert {"acc_rot_deg", "acc_trans_a", "resolution_a", "weighted_resolution",
            "relative_resolution"} == set(META_FEATURES)
    assert sum(n.startswith("granulo_r") for n in FEATURE_NAMES) == 6
    assert FEATURE_NAMES[JOB_SLICE] == ("protein_sum", "solvent_sum", "relative_signal")


def test_compact_centred_blob_is_not_scattered_and_off_the_edge(rng):
    img = _blob(sigma=8) + rng.normal(0, 0.01, (BOX, BOX))
    assert _feat(img, "scattered_fraction") < 0.05
    assert _feat(img, "edge_signal") < 0.05
    # a big compact blob survives openings with small discs
    assert _feat(img, "granulo_r3") > 0.8


def test_separate_blobs_are_scattered_and_edge_blob_touches_the_edge(rng):
    two = _blob(0, -18, 4) + _blob(0, 18, 4) + _blob(-18, 0, 3) + rng.normal(0, 0.01, (BOX, BOX))
    assert _feat(two, "scattered_fraction") > 0.3
    edge = _blob(0, 28, 5) + rng.normal(0, 0.01, (BOX, BOX))
    assert _feat(edge, "edge_signal") > _feat(_blob(sigma=5), "edge_signal") + 0.05


def test_thin_lines_vanish_under_granulometry(rng):
    yy, xx = np.mgrid[0:BOX, 0:BOX] - BOX // 2
    lines = ((np.abs(yy % 12) < 1) & (radius_grid((BOX, BOX)) < 28)).astype(float)
    lines += rng.normal(0, 0.01, lines.shape)
    assert _feat(lines, "granulo_r4") < 0.3
    assert _feat(_blob(sigma=9), "granulo_r4") > 0.6


def test_lowpass_and_ring_statistics_follow_the_image():
    img = _blob(sigma=8, amp=3.0)
    assert _feat(img, "lp_max") == pytest.approx(3.0, rel=0.25)
    assert abs(_feat(img, "ring_mean")) < 0.05
    assert _feat(img, "protein_std") > _feat(img, "solvent_std")


def test_job_features_unscored_classes_and_zscores(rng):
    imgs = np.stack([_blob(sigma=s, amp=a) + rng.normal(0, 0.05, (BOX, BOX))
                     for s, a in [(6, 1), (8, 2), (10, 0.5), (7, 1.5), (9, 1)]]).astype(np.float32)
    metas = [ClassMeta(100, 2.0, 1.0, 12.0), ClassMeta(10, 2.0, 1.0, 12.0),
             ClassMeta(0), ClassMeta(50, None, None, None), ClassMeta(11, 3.0, 2.0, 20.0)]
    X, scored = job_features(imgs, metas, PX, DIAM)
    assert scored.tolist() == [True, False, False, True, True]
    assert np.isnan(X[~scored]).all()
    J = X[scored, JOB_SLICE]
    np.testing.assert_allclose(J.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(J.std(axis=0), 1, atol=1e-9)
    # unknown metadata stays nan and normalises to the training mean (0)
    assert np.isnan(X[3, :2]).all()
    stats = FeatureStats.fit(X[scored])
    Z = normalise_features(X[scored], stats)
    assert np.isfinite(Z).all() and (Z[1, :3] == 0).all()
    # relative resolution: best class of the job is 1
    assert X[0, META_FEATURES.index("relative_resolution")] == pytest.approx(1.0)


def test_network_images_are_standardised_64px_windows(rng):
    img = (_blob(sigma=8) + rng.normal(0, 0.1, (BOX, BOX)))[None].astype(np.float32)
    net = network_images(img, PX, DIAM)
    assert net.shape == (1, 64, 64)
    assert abs(net.mean()) < 1e-4 and net.std() == pytest.approx(1.0, rel=1e-3)
    # the window is the particle diameter: the blob (8 px of 30 px radius) fills ~1/4 of it
    assert np.argmax(net[0].sum(axis=0)) in range(30, 34)


def _particle(cy=0.0, cx=0.0):
    """An asymmetric two-lobe particle (radius ~ 20 px of the 30 px mask radius)."""
    return _blob(cy - 4, cx - 3, 6) + 0.7 * _blob(cy + 7, cx + 5, 4)


def test_recentring_removes_a_small_centring_error(rng):
    """A class average a few pixels off-centre gives (nearly) the network image of the
    centred one; the density centre lands on the image centre."""
    noise = rng.normal(0, 0.01, (BOX, BOX))
    centred = network_images((_particle() + noise)[None].astype(np.float32), PX, DIAM)
    # 3 and -2 box px = 6.4 and -4.3 network px (window 60 px -> 64 px)
    off = network_images((_particle(3, -2) + noise)[None].astype(np.float32), PX, DIAM)
    c0 = density_centres(centred)[0]
    c1 = density_centres(off)[0]
    assert np.allclose(c1 - c0, [3 * 64 / 60, -2 * 64 / 60], atol=0.4)
    a = network_images((_particle() + noise)[None].astype(np.float32), PX, DIAM, recentre=True)
    b = network_images((_particle(3, -2) + noise)[None].astype(np.float32), PX, DIAM,
                       recentre=True)
    assert np.abs(density_centres(a)[0]).max() < 0.3 and np.abs(density_centres(b)[0]).max() < 0.3
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98
    assert np.corrcoef(centred.ravel(), off.ravel())[0, 1] < 0.9   # without: quite different
    assert abs(b.mean()) < 1e-4 and b.std() == pytest.approx(1.0, rel=1e-3)


def test_recentring_keeps_an_off_centre_pick_partial():
    """A particle half outside the window (an off-centre pick) is moved by at most
    RECENTRE_MAX_SHIFT_PX and stays truncated: the cut-off half is not brought back."""
    img = _blob(0, 26, 7)[None].astype(np.float32)   # centre 26 box px = 28 network px out
    net = network_images(img, PX, DIAM, recentre=True)
    c = density_centres(net)[0]
    assert c[1] > 12                                  # still far off-centre
    full = network_images(_blob(0, 0, 7)[None].astype(np.float32), PX, DIAM)
    assert net[0].max() < 0.9 * full[0].max() or net[0][:, :20].std() < 0.2


def test_relative_intensity_removes_the_job_scale(rng):
    imgs = np.stack([_blob(sigma=s, amp=a) + rng.normal(0, 0.05, (BOX, BOX))
                     for s, a in [(6, 1), (8, 2), (10, 0.5), (7, 1.5)]]).astype(np.float32)
    metas = [ClassMeta(100, 2.0, 1.0, 12.0)] * 4
    Xa, _ = job_features(imgs, metas, PX, DIAM, relative=True)
    Xb, _ = job_features(7.0 * imgs, metas, PX, DIAM, relative=True)
    np.testing.assert_allclose(Xa, Xb, rtol=1e-4, atol=1e-6)
    raw_a, _ = job_features(imgs, metas, PX, DIAM)
    raw_b, _ = job_features(7.0 * imgs, metas, PX, DIAM)
    idx = [FEATURE_NAMES.index(n) for n in INTENSITY_FEATURES]
    np.testing.assert_allclose(raw_b[:, idx], 7.0 * raw_a[:, idx], rtol=1e-4, atol=1e-6)
    other = [i for i in range(N_FEATURES) if i not in idx]
    np.testing.assert_allclose(Xa[:, other], raw_a[:, other], rtol=1e-9)
    # the job's median lp_std becomes 1; several jobs at once = each job on its own
    assert np.median(Xa[:, FEATURE_NAMES.index("lp_std")]) == pytest.approx(1.0)
    two = relative_intensity(np.concatenate([raw_a, raw_b]), np.repeat([0, 1], 4))
    np.testing.assert_allclose(two[:4], two[4:], rtol=1e-4, atol=1e-6)


def test_feature_stats_round_trip():
    X = np.random.default_rng(0).normal(size=(20, N_FEATURES))
    X[:, 0] = np.abs(X[:, 0]) + 0.1
    s = FeatureStats.fit(X)
    s2 = FeatureStats.from_dict(s.to_dict())
    np.testing.assert_array_equal(s.mean, s2.mean)
    with pytest.raises(ValueError):
        FeatureStats.from_dict({"names": ["x"], "mean": [0], "std": [1]})


@pytest.mark.parametrize("mode", ["full", "image", "features"])
def test_network_shapes_and_size(mode):
    torch.manual_seed(0)
    net = RankerNet(mode=mode)
    out = net(torch.zeros(3, 1, 64, 64), torch.zeros(3, N_FEATURES))
    assert out.shape == (3,)
    if mode != "features":
        fm = net.cnn(torch.zeros(1, 1, 64, 64))
        assert fm.shape == (1, 128, 8, 8)   # three strided blocks: 64 -> 8, 1 -> 128 channels
        n_par = sum(p.numel() for p in net.parameters())
        assert 4 * n_par < 8e6               # a few MB of float32 weights
