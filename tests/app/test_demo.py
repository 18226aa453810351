"""The demo end to end on a small simulated session (8 movies 640² x 4 frames, ~360 particles),
checked against the ground truth.

One module-scoped run serves every test: the demo is started in a child process, killed
(SIGKILL) once prep's motion correction is running, then run again with the same ``--out``
in this process; it must continue (no job re-created from scratch) and finish.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from app.demo import DemoConfig, align_maps, ranker_weights, run_demo, stem_of
from metadata.star import read_star

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                        else None)
HAS_3D = all(importlib.util.find_spec(m) is not None
             for m in ("app.jobs.inimodel3d", "app.jobs.refine3d"))


def small_config(out: Path) -> DemoConfig:
    return DemoConfig(out=out, n_movies=8, shape=640, n_frames=4, pixel_size_a=2.0,
                      dose_per_frame_e_a2=10.0, particles_per_movie=45, nr_classes=4,
                      nr_iter_grad=20, inimodel_iter=40, seed=3,
                      stop_after="refine3d" if HAS_3D else "select_parts",
                      progress=False)


_CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.app.test_demo import small_config
from app.demo import run_demo
run_demo(small_config(Path({out!r})))
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(repo=str(REPO), out=str(out))],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
    killed_during = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and child.poll() is None:
        # kill once motion correction is really running (its run.out reports the movies):
        # between creating a job folder and starting its process the schemer has not saved
        # its state yet, and a resumed run makes a new job (see the issue-11 report)
        run_out = out / "project" / "MotionCorr" / "job002" / "run.out"
        if run_out.exists() and "to process" in run_out.read_text(errors="replace"):
            killed_during = "MotionCorr/job002"
            break
        time.sleep(0.2)
    if child.poll() is None:
        os.kill(child.pid, signal.SIGKILL)  # the demo only; its running job lives on
    child.wait()
    assert killed_during, f"the first run never reached motion correction: " \
                          f"{child.stderr.read().decode()[-2000:]}"
    t = time.monotonic()
    res = run_demo(small_config(out))
    res.resumed_after_kill_s = time.monotonic() - t
    res.killed_during = killed_during
    return res


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_resumes_and_is_right(demo):
    p = demo.project
    assert demo.state == "finished", demo.message
    # continued, not restarted: one import, one motion correction job (the killed one, re-adopted
    # or run again in place), the session simulated once
    assert sorted(x.name for x in (p / "Import").iterdir()) == ["job001"]
    assert sorted(x.name for x in (p / "MotionCorr").iterdir()) == ["job002"]

    # CTF: every movie, defocus within 500 Å of the simulated truth
    truth = read_star(demo.session / "ground_truth" / "movies_truth.star")["movies"]
    tdef = {stem_of(r.rlnMicrographMovieName): (r.rlnDefocusU + r.rlnDefocusV) / 2
            for r in truth.itertuples()}
    ctf = read_star(next((p / "CtfFind").glob("job*/micrographs_ctf.star")))["micrographs"]
    assert len(ctf) == 8
    for r in ctf.itertuples():
        est = (r.rlnDefocusU + r.rlnDefocusV) / 2
        assert abs(est - tdef[stem_of(r.rlnMicrographMovieName)]) < 500, r

    # picks: most simulated particles found on the micrographs
    coords = read_star(demo.session / "ground_truth" / "coordinates_truth.star")["particles"]
    coords = coords[coords["scsKind"] == "particle"]
    auto = read_star(next((p / "AutoPick").glob("job*/autopick.star")))["coordinate_files"]
    found = total = 0
    for r in auto.itertuples():
        picks = next(iter(read_star(p / r.rlnMicrographCoordinates).values()))
        tt = coords[[stem_of(m) == stem_of(r.rlnMicrographName)
                     for m in coords["rlnMicrographMovieName"]]]
        pxy = np.c_[picks["rlnCoordinateX"], picks["rlnCoordinateY"]]
        for x, y in zip(tt["rlnCoordinateX"], tt["rlnCoordinateY"]):
            total += 1
            found += bool(len(pxy)) and np.min(np.hypot(*(pxy - [x, y]).T)) < 15
    assert total > 250 and found / total > 0.6, (found, total)

    # 2D classes, then the particle selection (class ranker when its weights are shipped,
    # else every particle) feeding 3D
    assert len(list((p / "Class2D").glob("job*/run_it020_model.star"))) == 1
    sel = sorted((p / "Select").glob("job*/particles.star"))
    assert sel, "select_parts wrote no particles.star"
    parts = read_star(sel[-1])["particles"]
    assert len(parts) > 200
    if ranker_weights().exists():
        assert (sel[-1].parent / "class_averages.star").exists()

    if not HAS_3D:
        pytest.xfail("app.jobs.inimodel3d / refine3d are not in the tree yet: the demo stops "
                     "after the ranked 2D selection (checked above)")
    t = demo.truth
    assert t.get("resolution_fsc05_a") is not None, t
    # The figure is FSC 0.5 vs the truth at 2 x Nyquist of the down-scaled particles
    # (14.7 Å here). The default 1,600-particle demo meets it (9.2 Å vs the truth, half-map
    # 9.3 Å; docs/demo.md); this ~310-particle run is data-limited: measured 20.0 Å vs the
    # truth with a 40-mini-batch initial model (half-map 14.0 Å), 21.9 Å with 20 (half-map
    # 18.0 Å). Guard with room for seed variation:
    assert t["resolution_fsc05_a"] <= 1.8 * t["target_a"], t
    assert t["refine3d"]["resolution_fsc05_a"] <= t["inimodel3d"]["resolution_fsc05_a"] + 1.0
    # the refinement's own claim must agree with the truth: a map in a wrong basin (a drifted
    # or hand-mixed initial model, issue 11) was self-consistent at 10 Å but 20 Å vs the truth
    # (ratio 2); measured here 1.43 and 1.21
    model = sorted((p / "Refine3D").glob("job*/run_model.star"))[-1]
    half = float(read_star(model)["model_general"]["rlnCurrentResolution"].iloc[0])
    assert t["resolution_fsc05_a"] <= 1.7 * half, (t["resolution_fsc05_a"], half)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not HAS_3D, reason="3D jobs are not in the tree")
def test_default_demo_meets_the_resolution_target(tmp_path):
    """The README's demo itself (16 movies, ~1,600 particles, default options), uninterrupted:
    its refined map must match the simulated molecule at 2 x Nyquist of the down-scaled
    particles or better (issue 11). Measured 9.2 and 9.6 Å against a 14.7 Å target, 6.5 min
    on an idle 2-core machine."""
    t0 = time.monotonic()
    res = run_demo(DemoConfig(out=tmp_path / "default", report=False, progress=False))
    wall = time.monotonic() - t0
    assert res.state == "finished", res.message
    t = res.truth
    print(f"default demo: {wall:.0f} s wall, vs truth {t.get('resolution_fsc05_a')} Å, "
          f"target {t.get('target_a')} Å")
    assert t["resolution_fsc05_a"] <= t["target_a"], t
    # the refinement's own claim agrees with the truth (no wrong basin, no over-fitting)
    model = sorted((res.project / "Refine3D").glob("job*/run_model.star"))[-1]
    half = float(read_star(model)["model_general"]["rlnCurrentResolution"].iloc[0])
    assert t["resolution_fsc05_a"] <= 1.3 * half, (t["resolution_fsc05_a"], half)


def test_align_maps_recovers_a_rotated_mirrored_map(rng):
    """The truth check's map alignment: a rotated, shifted, mirrored copy is found again."""
    from compute.geometry import euler_to_matrix
    from compute.simulate.molecules import density_map, molecule
    from compute.symmetry import rotate_volume

    vol = density_map(molecule("asym"), 32, 6.0).astype(np.float32)
    moved = rotate_volume(vol, euler_to_matrix(40.0, 70.0, -25.0))[::-1]
    moved = np.roll(moved, (1, -2, 1), axis=(0, 1, 2))
    aligned, cc = align_maps(vol, np.ascontiguousarray(moved), step_deg=15.0)
    assert cc > 0.9
    # compared after a mild blur: two linear-interpolation rotations soften the fine detail
    from scipy.ndimage import gaussian_filter

    a, b = gaussian_filter(aligned, 1.0), gaussian_filter(vol, 1.0)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95
    wrong = gaussian_filter(np.ascontiguousarray(moved), 1.0)
    assert np.corrcoef(wrong.ravel(), b.ravel())[0, 1] < 0.8  # the unaligned copy is far off


def _chromium(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=5000",
         *extra, url],
        capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_report_opens_in_headless_chromium(demo, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (installers/setup.sh test installs it)")
    report = demo.report
    assert report is not None and report.exists()
    text = report.read_text(encoding="utf-8")
    n_img = len(re.findall(r"<img ", text))
    assert n_img >= 4  # CTF/drift, picks, classes, job times (+ maps and FSC with 3D)
    dom = _chromium(report.as_uri(), tmp_path, "--dump-dom")
    m = re.search(r"<title>report: images (\d+)/(\d+) loaded</title>", dom.stdout)
    assert m, dom.stdout[-500:] + dom.stderr[-1500:]
    assert int(m.group(1)) == int(m.group(2)) == n_img
    shot = report.parent / "report_screenshot.png"
    _chromium(report.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1200,2400")
    assert shot.exists() and shot.stat().st_size > 10_000
    print(f"report screenshot: {shot}")


def test_demo_helpers(tmp_path):
    from app.demo import _epu_layout, job_progress, movies_glob

    for n in range(2, 41):
        sq, holes, shots = _epu_layout(n)
        assert sq * holes * shots == n
    # a movie and its micrograph share the acquisition's stem
    assert stem_of("MotionCorr/job002/Movies/a/FoilHole_1_Data_2_3_x_fractions.mrc") == \
        "FoilHole_1_Data_2_3_x"
    assert stem_of("/s/Images-Disc1/GridSquare_1/Data/FoilHole_1_Data_2_3_x_fractions.tiff") == \
        "FoilHole_1_Data_2_3_x"
    assert stem_of("sim_00001.tif") == stem_of("CtfFind/job003/sim_00001.ctf:mrc") == "sim_00001"
    sess = tmp_path / "s"
    mv = sess / "Images-Disc1" / "GridSquare_7" / "Data" / "FoilHole_1_Data_2_3_x_fractions.tiff"
    mv.parent.mkdir(parents=True)
    mv.touch()
    assert movies_glob(sess, str(mv), "epu") == \
        "Movies/Images-Disc*/GridSquare_*/Data/*_fractions.tiff"
    assert movies_glob(sess, str(sess / "sim_00001.tif"), "serialem") == "Movies/*.tif"
    job = tmp_path / "MotionCorr" / "job002"
    job.mkdir(parents=True)
    (job / "run.out").write_text("x\n07:22:05 movies 1/4 (25%) elapsed 0:00:12, ETA 0:00:36\n"
                                 "07:22:12 movies 2/4 (50%) elapsed 0:00:19, ETA 0:00:19\n")
    assert job_progress(tmp_path, "MotionCorr/job002") == "2/4 (50%) ETA 0:00:19"
    # an auto-refine iteration's ETA is that iteration's: shown as progress, not as the job's
    ref = tmp_path / "Refine3D" / "job010"
    ref.mkdir(parents=True)
    (ref / "run.out").write_text("08:35:06 iteration 10 particles 400/1598 (25%) elapsed "
                                 "0:01:13, ETA 0:00:23\n")
    p = job_progress(tmp_path, "Refine3D/job010")
    assert p == "iteration 10 particles 400/1598 (25%) elapsed 0:01:13"
    from app.demo import NOMINAL_S, _elapsed_seconds, _eta_seconds
    assert _eta_seconds(p) is None and _elapsed_seconds(p) == 73 < NOMINAL_S["refine3d"]


def test_demo_command_rejects_bad_options(tmp_path, capsys):
    from app.cli import run

    assert run(["demo", "--movies", "1", "--out", str(tmp_path / "d")]) == 2
    assert "--movies" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
