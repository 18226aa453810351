"""inimodel3d and refine3d jobs on a small simulated particles.star: outputs, resume, errors."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from app.jobs.base import ABORT_NOW, exit_status, run_job
from compute.fourier import fsc, resolution_at_threshold
from compute.simulate.molecules import density_map, molecule
from compute.simulate.particles import simulate_particles
from metadata.images import read_mrc, write_mrc
from metadata.star import read_star, write_star

pytestmark = pytest.mark.filterwarnings("ignore:Data array contains NaN values")

BOX = 24


@pytest.fixture(scope="module")
def sim():
    return simulate_particles(300, ("asym",), box=BOX, snr=1.0, seed=31, max_shift_px=1.0)


def _project(root, stk):
    px = stk.truth.pixel_size_a
    write_mrc(root / "Extract" / "job006" / "parts.mrcs", np.asarray(stk.images),
              pixel_size_a=px, float16=True)
    n = len(stk.images)
    c = stk.truth.ctf
    rows = {"rlnImageName": [f"{i + 1:06d}@Extract/job006/parts.mrcs" for i in range(n)],
            "rlnMicrographName": ["mic.mrc"] * n, "rlnOpticsGroup": [1] * n,
            "rlnDefocusU": c.defocus_u_a, "rlnDefocusV": c.defocus_v_a,
            "rlnDefocusAngle": c.defocus_angle_deg, "rlnCtfBfactor": c.bfactor_a2}
    optics = {"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
              "rlnImagePixelSize": [px], "rlnImageSize": [BOX], "rlnImageDimensionality": [2],
              "rlnAmplitudeContrast": [0.1], "rlnVoltage": [300.0],
              "rlnSphericalAberration": [2.7]}
    write_star(root / "particles.star", {"optics": pd.DataFrame(optics),
                                         "particles": pd.DataFrame(rows)})
    return "particles.star", px


@pytest.mark.slow
def test_inimodel3d_job_outputs_and_resume(tmp_path, sim):
    star, px = _project(tmp_path, sim)
    out = "InitialModel/job008"
    opts = {"fn_img": star, "nr_classes": "2", "nr_iter": "12", "particle_diameter":
            str(0.85 * BOX * px), "offset_range": "2", "offset_step": "1", "sym_name": "C1"}
    assert run_job("inimodel3d", out, opts, project_dir=tmp_path) == 0
    job = tmp_path / out
    assert exit_status(job) == "success"
    for it in (10, 12):
        for suffix in ("class001.mrc", "class002.mrc", "model.star", "data.star",
                       "optimiser.star"):
            assert (job / f"run_it{it:03d}_{suffix}").is_file(), suffix
    vol, vpx = read_mrc(job / "initial_model.mrc")
    assert vol.shape == (BOX,) * 3 and vpx == pytest.approx(px, rel=1e-3)
    model = read_star(job / "run_it012_model.star")
    assert len(model["model_classes"]) == 2
    assert model["model_classes"]["rlnClassDistribution"].sum() == pytest.approx(1.0, abs=1e-3)
    data = read_star(job / "run_it012_data.star")["particles"]
    assert len(data) == 300
    for label in ("rlnClassNumber", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
                  "rlnOriginXAngst", "rlnMaxValueProbDistribution"):
        assert label in data.columns
    assert set(data["rlnClassNumber"]) <= {1, 2}
    # the initial model resembles the truth (after the best rotation, either hand)
    from compute.symmetry import align_map_to_reference

    truth = density_map(molecule("asym"), BOX, px)
    _, cc, _ = align_map_to_reference(vol, truth)
    assert cc > 0.6
    # resume: a re-run in the same directory continues from the last state, no new work
    assert run_job("inimodel3d", out, opts, project_dir=tmp_path, is_continue=True) == 0
    assert not (job / "run_it013_model.star").exists()


def test_inimodel3d_job_bad_input(tmp_path, sim):
    star, px = _project(tmp_path, sim)
    assert run_job("inimodel3d", "InitialModel/job001", {"fn_img": "missing.star"},
                   project_dir=tmp_path) == 1
    assert exit_status(tmp_path / "InitialModel/job001") == "failure"
    assert run_job("inimodel3d", "InitialModel/job002", {"fn_img": star, "sym_name": "Q7"},
                   project_dir=tmp_path) == 1
    assert "sym_name" in (tmp_path / "InitialModel/job002/RELION_JOB_EXIT_FAILURE").read_text()


def test_inimodel3d_job_abort(tmp_path, sim):
    star, px = _project(tmp_path, sim)
    import threading

    job = tmp_path / "InitialModel/job003"
    job.mkdir(parents=True)

    t = threading.Timer(3.0, lambda: (job / ABORT_NOW).touch())
    t.start()
    rc = run_job("inimodel3d", "InitialModel/job003",
                 {"fn_img": star, "nr_iter": "500", "nr_classes": "1",
                  "particle_diameter": str(0.85 * BOX * px)}, project_dir=tmp_path)
    t.cancel()
    assert rc == 1 and exit_status(job) == "aborted"


@pytest.mark.slow
def test_refine3d_job_outputs(tmp_path, sim, caplog):
    caplog.set_level(logging.INFO, logger="scopeside.job")
    star, px = _project(tmp_path, sim)
    truth = density_map(molecule("asym"), BOX, px)
    write_mrc(tmp_path / "ref.mrc", truth, pixel_size_a=px)
    out = "Refine3D/job010"
    opts = {"fn_img": star, "fn_ref": "ref.mrc", "ini_high": str(5 * px),
            "particle_diameter": str(0.85 * BOX * px), "offset_range": "2", "offset_step": "1",
            "max_iter": "3"}
    assert run_job("refine3d", out, opts, project_dir=tmp_path) == 0
    job = tmp_path / out
    for name in ("run_class001.mrc", "run_half1_class001_unfil.mrc",
                 "run_half2_class001_unfil.mrc", "run_model.star", "run_data.star"):
        assert (job / name).is_file(), name
    model = read_star(job / "run_model.star")
    tab = model["model_class_1"]
    for label in ("rlnFourierShellCorrelation", "rlnResolution", "rlnAngstromResolution"):
        assert label in tab.columns
    g = model["model_general"]
    claimed = float(g["rlnCurrentResolution"] if isinstance(g, dict)
                    else g["rlnCurrentResolution"].iloc[0])
    vol, _ = read_mrc(job / "run_class001.mrc")
    vs_truth = resolution_at_threshold(fsc(vol, truth), BOX, px, 0.5)
    assert vs_truth < 5 * px
    assert claimed < 5 * px
    data = read_star(job / "run_data.star")["particles"]
    assert len(data) == 300 and set(data["rlnRandomSubset"]) == {1, 2}
    # the log says how many particles changed orientation, not only the (grid-bound) median
    log = caplog.text
    assert "iteration 1: " in log and "first orientations" in log
    assert "% of particles moved" in log and "nan" not in log


def test_refine3d_job_bad_reference(tmp_path, sim):
    star, px = _project(tmp_path, sim)
    (tmp_path / "bad.mrc").write_text("not a map")
    assert run_job("refine3d", "Refine3D/job001", {"fn_img": star, "fn_ref": "bad.mrc"},
                   project_dir=tmp_path) == 1
    assert "fn_ref" in (tmp_path / "Refine3D/job001/RELION_JOB_EXIT_FAILURE").read_text()
