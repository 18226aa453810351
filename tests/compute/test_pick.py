"""LoG picker against the simulator's ground truth: recall/precision, junk, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from compute import backend as be
from compute.errors import ComputeError
from compute.pick import LogPickerSettings, Picks, log_maps, match_picks, pick_log, search_diameters
from compute.simulate.micrograph import simulate_micrograph
from compute.simulate.molecules import Molecule, molecule


def globular(diameter_a: float) -> Molecule:
    """The simulator's ribosome-like particle scaled to ``diameter_a`` (mass scales with volume,
    so it stays a compact protein of that size)."""
    m = molecule("ribosome")
    f = diameter_a / m.diameter_a
    return Molecule(f"globular{diameter_a:g}", m.coords_a * f, m.weights * f**3, m.sigma_a * f)


def _settings(d, **kw):
    # the relion_it mapping: log_diam_min 0.8 x diameter, log_diam_max 1.1 x diameter
    return LogPickerSettings(0.8 * d, 1.1 * d, **kw)


def _xy(p: Picks) -> np.ndarray:
    return np.stack([p.x_px, p.y_px], axis=1)


def _truth_xy(truth, singles_only=True) -> np.ndarray:
    sel = truth.single_particles() if singles_only else slice(None)
    return np.stack([truth.particles["x_px"][sel], truth.particles["y_px"][sel]], axis=1)


def _sim(d, px, n=1024, seed=0, **kw):
    fill = 0.2 * (n * px) ** 2 / (np.pi * (d / 2) ** 2)
    return simulate_micrograph(n, pixel_size_a=px, molecules=[globular(d)],
                               n_particles=int(fill), seed=seed, **kw)


@pytest.mark.parametrize(("diameter", "px"), [(130.0, 2.0), (180.0, 2.5), (320.0, 4.0)])
def test_log_recovers_simulated_particles(diameter, px):
    mg = _sim(diameter, px, seed=int(diameter))
    truth = _truth_xy(mg.truth)
    picks = pick_log(mg.image, px, _settings(diameter), ctf=mg.truth.ctf)
    tp, n_picks, n_true = match_picks(_xy(picks), truth, 0.2 * diameter / px)
    assert n_true > 25
    assert tp / n_true >= 0.9, (tp, n_picks, n_true)
    assert tp / n_picks >= 0.8, (tp, n_picks, n_true)
    # best first; figures of merit in std-devs above the score map mean
    assert np.all(np.diff(picks.fom) <= 1e-9) and picks.fom.min() > 0
    assert np.all((picks.diameter_a >= 0.8 * diameter - 1e-6)
                  & (picks.diameter_a <= 1.1 * diameter + 1e-6))


def test_particles_at_carbon_edges_and_next_to_junk_are_found():
    """320 Å particles on micrographs with a carbon edge, aggregates and an ice blob (4 seeds,
    4096 Å fields at 4 Å/px). Before the edge-preserving background (issue 6) the carbon step
    hid the particles touching it (carbon-edge recall 17/25, overall 140/152 = 0.92 on these
    seeds); now 20/25 and 145/152."""
    d, px = 320.0, 4.0
    tp = n_true = n_picks = tp_edge = n_edge = 0
    for seed in range(4):
        mg = _sim(d, px, seed=seed, carbon=True, n_aggregates=2, n_ice_blobs=1)
        truth = _truth_xy(mg.truth)
        picks = pick_log(mg.image, px, _settings(d), ctf=mg.truth.ctf)
        t, n, nt = match_picks(_xy(picks), truth, 0.2 * d / px)
        tp, n_picks, n_true = tp + t, n_picks + n, n_true + nt
        c = mg.truth.carbon
        # centre within half a diameter of the carbon edge: the particle overlaps the edge
        near = np.abs(np.hypot(truth[:, 0] - c.centre_x_px, truth[:, 1] - c.centre_y_px)
                      - c.radius_px) < 0.5 * d / px
        tp_edge += match_picks(_xy(picks), truth[near], 0.2 * d / px)[0]
        n_edge += int(near.sum())
    assert n_true > 120 and n_edge >= 20
    assert tp / n_true >= 0.93, (tp, n_picks, n_true)
    assert tp / n_picks >= 0.9, (tp, n_picks, n_true)
    assert tp_edge / n_edge >= 0.72, (tp_edge, n_edge)


def test_edge_background_keeps_a_step_and_drops_particles():
    """The background is a median: a sharp intensity step survives it (so it is removed from
    the picking image), while particle-sized dark blobs do not."""
    from compute.pick import _edge_background

    n, pix = 200, 10.0
    yy, xx = np.mgrid[0:n, 0:n]
    img = np.where(xx < 100, 1.0, 0.0).astype(np.float32)
    blob = ((yy - 50) ** 2 + (xx - 50) ** 2 < 8 ** 2)
    img = img - 2.0 * blob
    bg = _edge_background(img, pix, _settings(180.0))
    assert abs(bg[50, 50] - 1.0) < 0.05          # the particle is not background
    assert abs(bg[150, 20] - 1.0) < 0.05 and abs(bg[150, 180]) < 0.05
    # the step stays within a couple of coarse pixels (36 Å) of where it is
    assert abs(bg[150, 90] - 1.0) < 0.25 and abs(bg[150, 110]) < 0.25


def test_small_ice_blob_excludes_only_its_own_area():
    """A small dark ice blob is found at the first diameter above the maximum; the excluded
    disc is its measured radius plus the minimum radius, not that diameter's radius."""
    from compute.pick import _blob_radii

    n = 120
    yy, xx = np.mgrid[0:n, 0:n]
    img = -1.0 * (np.hypot(yy - 60, xx - 60) < 10).astype(np.float32)
    r = _blob_radii(img, np.array([60]), np.array([60]), np.array([25.0]), 1.0)
    assert 9.0 <= r[0] <= 11.0
    # a blob larger than the scale radius is capped at the scale radius
    r = _blob_radii(img, np.array([60]), np.array([60]), np.array([6.0]), 1.0)
    assert r[0] == pytest.approx(6.0)


def test_recall_without_ctf_is_still_usable():
    d, px = 320.0, 4.0
    mg = _sim(d, px, seed=3)
    picks = pick_log(mg.image, px, _settings(d))
    tp, n_picks, n_true = match_picks(_xy(picks), _truth_xy(mg.truth), 0.2 * d / px)
    assert tp / n_true >= 0.8 and tp / n_picks >= 0.8, (tp, n_picks, n_true)


def _junk_points(truth, n):
    pts = []
    p = truth.particles
    agg = p["kind"] == "aggregate"
    for g in np.unique(p["group"][agg]):
        sel = p["group"] == g
        pts.append((p["x_px"][sel].mean(), p["y_px"][sel].mean()))
    pts += [(bx, by) for bx, by, _ in truth.ice_blobs]
    c = truth.carbon
    if c is not None:
        edge = [(c.centre_x_px + c.radius_px * np.cos(t), c.centre_y_px + c.radius_px * np.sin(t))
                for t in np.linspace(0, 2 * np.pi, 1440, endpoint=False)]
        edge = [(x, y) for x, y in edge if 0 <= x < n and 0 <= y < n]
        pts += edge[:: max(1, len(edge) // 10)]
    return np.array(pts)


def test_junk_is_not_picked():
    d, px, n = 180.0, 1.5, 2048
    mg = _sim(d, px, n=n, seed=1, carbon=True, n_aggregates=3, n_ice_blobs=2)
    truth = _truth_xy(mg.truth)
    picks = pick_log(mg.image, px, _settings(d), ctf=mg.truth.ctf)
    xy = _xy(picks)
    good = np.array([np.hypot(*(truth - q).T).min() < 0.2 * d / px for q in xy])
    bad = xy[~good]
    junk = _junk_points(mg.truth, n)
    assert len(junk) >= 10
    hit = [len(bad) > 0 and np.hypot(*(bad - j).T).min() < 0.5 * d / px for j in junk]
    assert np.mean(hit) <= 0.2, hit
    tp, n_picks, n_true = match_picks(xy, truth, 0.2 * d / px)
    assert tp / n_true >= 0.85 and tp / n_picks >= 0.8, (tp, n_picks, n_true)


def test_empty_micrograph_gives_no_picks():
    s = _settings(180.0)
    assert len(pick_log(np.zeros((512, 512), np.float32), 2.0, s)) == 0
    mg = simulate_micrograph(1024, pixel_size_a=2.0, n_particles=0, seed=5)
    assert len(mg.truth.particles["x_px"]) == 0
    assert len(pick_log(mg.image, 2.0, s, ctf=mg.truth.ctf)) == 0


@pytest.mark.parametrize(("n", "px"), [(768, 2.0), (1024, 2.0), (512, 3.0)])
def test_empty_micrographs_of_several_sizes_give_no_picks(n, px):
    """Ice only (thickness variation, illumination gradient, shot noise), fields of 4.8-6.4
    × 320 Å: the simulator's ice-thickness field has up to 3 periods per image, so on small
    fields its dips are particle-sized. Issue 6: 1024² at 2 Å/px gave 14 picks at 320 Å
    on 6 seeds; now the mass test (a dip is part of a larger dark region) and the floor
    measured far from the candidates reject them."""
    for seed in range(3):
        mg = simulate_micrograph(n, pixel_size_a=px, n_particles=0, seed=seed)
        for d in (130.0, 180.0, 320.0):
            p = pick_log(mg.image, px, _settings(d), ctf=mg.truth.ctf)
            assert len(p) == 0, (n, px, seed, d, p.fom)


def test_aggregates_are_not_picked():
    """Per-kind rejection of aggregates (clumps of 4-10 overlapping particles), 130 Å
    particles at 2 Å/px on 4 seeds: the overlapping-maxima test rejects them (11/12 not
    picked, 10/12 before; recall 0.956 either way)."""
    d, px, n = 130.0, 2.0, 1024
    rejected = total = 0
    tp = n_true = n_picks = 0
    for seed in range(4):
        mg = _sim(d, px, n=n, seed=seed, n_aggregates=3)
        truth = _truth_xy(mg.truth)
        picks = pick_log(mg.image, px, _settings(d), ctf=mg.truth.ctf)
        xy = _xy(picks)
        good = np.array([np.hypot(*(truth - q).T).min() < 0.2 * d / px for q in xy])
        bad = xy[~good]
        p = mg.truth.particles
        for g in np.unique(p["group"][p["kind"] == "aggregate"]):
            sel = p["group"] == g
            c = np.array([p["x_px"][sel].mean(), p["y_px"][sel].mean()])
            total += 1
            rejected += not (len(bad) and np.hypot(*(bad - c).T).min() < 0.5 * d / px)
        t, k, nt = match_picks(xy, truth, 0.2 * d / px)
        tp, n_picks, n_true = tp + t, n_picks + k, n_true + nt
    assert total == 12
    assert rejected / total >= 0.8, (rejected, total)
    assert tp / n_true >= 0.9 and tp / n_picks >= 0.9, (tp, n_picks, n_true)


def test_diameter_larger_than_micrograph_is_a_clear_error():
    mic = np.zeros((256, 256), np.float32)
    with pytest.raises(ComputeError, match="larger than the micrograph"):
        pick_log(mic, 1.0, LogPickerSettings(200.0, 300.0))
    with pytest.raises(ComputeError, match="smaller than log_diam_min"):
        pick_log(mic, 1.0, LogPickerSettings(100.0, 50.0))
    with pytest.raises(ComputeError, match="2D"):
        pick_log(np.zeros((2, 64, 64)), 1.0, LogPickerSettings(10.0, 20.0))


def test_invert_picks_white_particles():
    d, px = 180.0, 2.5
    mg = _sim(d, px, seed=11)
    truth = _truth_xy(mg.truth)
    white = -mg.image
    wrong = pick_log(white, px, _settings(d), ctf=mg.truth.ctf)
    assert match_picks(_xy(wrong), truth, 0.2 * d / px)[0] < 0.3 * len(truth)
    picks = pick_log(white, px, _settings(d, invert=True), ctf=mg.truth.ctf)
    tp, n_picks, n_true = match_picks(_xy(picks), truth, 0.2 * d / px)
    assert tp / n_true >= 0.9 and tp / n_picks >= 0.8


def test_thresholds_change_the_number_of_picks():
    d, px = 180.0, 2.5
    mg = _sim(d, px, seed=12)
    p0 = pick_log(mg.image, px, _settings(d), ctf=mg.truth.ctf)
    t = float(np.median(p0.fom))
    hi = pick_log(mg.image, px, _settings(d, adjust_threshold=t), ctf=mg.truth.ctf)
    up = pick_log(mg.image, px, _settings(d, upper_threshold=t), ctf=mg.truth.ctf)
    # the thresholds act in std-devs above the mean, which is what the figure of merit is
    assert 0 < len(hi) < len(p0) and hi.fom.min() >= t - 1e-6
    assert 0 < len(up) < len(p0) and up.fom.max() <= t + 1e-6


def test_search_diameters_cover_range_and_beyond():
    d_in, d_out = search_diameters(LogPickerSettings(100.0, 150.0))
    assert d_in[0] == pytest.approx(100.0) and d_in[-1] == pytest.approx(150.0)
    assert np.all(np.diff(d_in) > 0) and d_out.min() > 150.0 and d_out.max() <= 750.0 + 1e-6


def test_match_picks_is_one_to_one():
    truth = np.array([[10.0, 10.0], [50.0, 50.0]])
    picks = np.array([[11.0, 10.0], [10.0, 11.0], [80.0, 80.0]])
    assert match_picks(picks, truth, 3.0) == (1, 3, 2)
    assert match_picks(np.zeros((0, 2)), truth, 3.0) == (0, 0, 2)


def test_ice_blob_is_excluded():
    d, px = 180.0, 2.5
    mg = _sim(d, px, seed=2, n_ice_blobs=1)
    m = log_maps(mg.image, px, _settings(d), ctf=mg.truth.ctf)
    bx, by, _ = mg.truth.ice_blobs[0]
    py, pxx = m.pixel_size_yx_a
    iy = min(int(by * px / py), m.score.shape[0] - 1)
    ix = min(int(bx * px / pxx), m.score.shape[1] - 1)
    assert m.excluded[iy, ix] or m.score[iy, ix] < m.big_score[iy, ix]


@pytest.mark.gpu
def test_gpu_matches_cpu():
    if not be.gpu_available():
        pytest.skip("no usable GPU")
    d, px = 180.0, 2.5
    mg = _sim(d, px, seed=5)
    cpu = pick_log(mg.image, px, _settings(d), ctf=mg.truth.ctf)
    gpu = pick_log(be.to_device(mg.image, "gpu"), px, _settings(d), ctf=mg.truth.ctf)
    assert abs(len(gpu) - len(cpu)) <= 1
    tp, _, _ = match_picks(_xy(gpu), _xy(cpu), 1.0)
    assert tp >= len(cpu) - 1
