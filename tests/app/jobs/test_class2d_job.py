"""The class2d job on a small simulated particles.star: outputs, resume, abort, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from app.jobs.base import ABORT_NOW, ABORTED, FAILURE, SUCCESS, exit_status, run_job
from metadata.images import read_mrc, write_mrc
from metadata.star import read_star, write_star
from tests.compute.vdam.simdata import fixed_view_stack

pytestmark = pytest.mark.filterwarnings("ignore:Data array contains NaN values")

N = 240
OPTS = {"nr_classes": "4", "nr_iter_grad": "20", "particle_diameter": "100",
        "psi_sampling": "15", "offset_range": "2", "offset_step": "1"}


def _write_project(root, imgs, ctf, with_ctf=True, name="particles.star"):
    stack = root / "Extract" / "job006" / "parts.mrcs"
    write_mrc(stack, imgs, pixel_size_a=4.0, float16=True)
    n = len(imgs)
    rows = {"rlnImageName": [f"{i + 1:06d}@Extract/job006/parts.mrcs" for i in range(n)],
            "rlnMicrographName": ["mic.mrc"] * n, "rlnOpticsGroup": [1] * n,
            "rlnOriginXAngst": [0.0] * n, "rlnOriginYAngst": [0.0] * n}
    if with_ctf:
        rows.update(rlnDefocusU=ctf.defocus_u_a[:n], rlnDefocusV=ctf.defocus_v_a[:n],
                    rlnDefocusAngle=ctf.defocus_angle_deg[:n], rlnCtfBfactor=ctf.bfactor_a2[:n])
    optics = {"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
              "rlnImagePixelSize": [4.0], "rlnImageSize": [imgs.shape[-1]],
              "rlnImageDimensionality": [2], "rlnAmplitudeContrast": [0.1]}
    if with_ctf:
        optics.update(rlnVoltage=[300.0], rlnSphericalAberration=[2.7])
    write_star(root / name, {"optics": pd.DataFrame(optics), "particles": pd.DataFrame(rows)})
    return name


@pytest.fixture(scope="module")
def sim():
    return fixed_view_stack(N, n_mol=2, box=32, snr=0.2, seed=11)


def test_class2d_vdam_outputs_and_resume(tmp_path, sim, caplog):
    imgs, mol, psi, ctf = sim
    star = _write_project(tmp_path, imgs, ctf)
    out = "Class2D/job007"
    assert run_job("class2d", out, {"fn_img": star, **OPTS}, project_dir=tmp_path) == 0
    job = tmp_path / out
    assert exit_status(job) == "success"
    for it in (10, 20):
        for suffix in ("classes.mrcs", "model.star", "data.star", "optimiser.star"):
            assert (job / f"run_it{it:03d}_{suffix}").is_file()
    classes, px = read_mrc(job / "run_it020_classes.mrcs")
    assert classes.shape == (4, 32, 32) and px == pytest.approx(4.0)
    model = read_star(job / "run_it020_model.star")
    mc = model["model_classes"]
    for label in ("rlnReferenceImage", "rlnClassDistribution", "rlnAccuracyRotations",
                  "rlnAccuracyTranslationsAngst", "rlnEstimatedResolution",
                  "rlnOverallFourierCompleteness", "rlnClassPriorOffsetX",
                  "rlnClassPriorOffsetY"):
        assert label in mc.columns
    assert mc["rlnClassDistribution"].sum() == pytest.approx(1.0, abs=1e-3)
    assert "model_class_1" in model and "rlnGoldStandardFsc" in model["model_class_1"].columns
    data = read_star(job / "run_it020_data.star")
    parts = data["particles"]
    assert len(parts) == N and "optics" in data
    for label in ("rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                  "rlnMaxValueProbDistribution", "rlnNrOfSignificantSamples",
                  "rlnLogLikeliContribution"):
        assert label in parts.columns
    cls = parts["rlnClassNumber"].to_numpy()
    for k in np.unique(cls):
        lab = mol[cls == k]
        if len(lab) > 0.05 * N:
            assert np.bincount(lab + 1).max() / len(lab) >= 0.9
    opt = read_star(job / "run_it020_optimiser.star")["optimiser_general"]
    assert opt["rlnModelStarFile"].iloc[0] == f"{out}/run_it020_model.star"
    log = (job / "note.txt").read_text()
    assert "class2d" in log or "Executing" in log

    # a kill after iteration 10: the re-run continues from run_it010
    for p in job.glob("run_it020_*"):
        p.unlink()
    (job / SUCCESS).unlink()
    caplog.clear()
    with caplog.at_level("INFO"):
        assert run_job("class2d", out, {"fn_img": star, **OPTS}, project_dir=tmp_path,
                       is_continue=True) == 0
    assert "continuing from run_it010_vdam_state.npz" in caplog.text
    assert "mini-batch 20/20" in caplog.text
    assert (job / "run_it020_data.star").is_file()
    assert not (job / "run_it001_data.star").exists()


def test_class2d_em(tmp_path, sim):
    imgs, mol, _, ctf = sim
    star = _write_project(tmp_path, imgs, ctf)
    opts = {**OPTS, "do_em": "Yes", "do_grad": "No", "nr_iter_em": "3"}
    assert run_job("class2d", "Class2D/job008", {"fn_img": star, **opts},
                   project_dir=tmp_path) == 0
    assert (tmp_path / "Class2D/job008/run_it003_model.star").is_file()
    assert (tmp_path / "Class2D/job008/run_it001_data.star").is_file()


def test_class2d_bad_inputs(tmp_path, sim):
    imgs, _, _, ctf = sim
    no_ctf = _write_project(tmp_path, imgs[:40], ctf, with_ctf=False, name="noctf.star")
    assert run_job("class2d", "Class2D/job010", {"fn_img": no_ctf, **OPTS},
                   project_dir=tmp_path) == 1
    msg = (tmp_path / "Class2D/job010" / FAILURE).read_text()
    assert "CTF columns missing" in msg and "noctf.star" in msg

    few = _write_project(tmp_path, imgs[:3], ctf, name="few.star")
    assert run_job("class2d", "Class2D/job011", {"fn_img": few, **OPTS},
                   project_dir=tmp_path) == 1
    assert "only 3 particles" in (tmp_path / "Class2D/job011" / FAILURE).read_text()

    assert run_job("class2d", "Class2D/job012", {"fn_img": "missing.star", **OPTS},
                   project_dir=tmp_path) == 1
    assert (tmp_path / "Class2D/job012" / FAILURE).exists()


def test_class2d_skips_nan_images_and_aborts(tmp_path, sim):
    imgs, _, _, ctf = sim
    bad = imgs[:60].copy()
    bad[5, 4, 4] = np.nan
    star = _write_project(tmp_path, bad, ctf, name="nan.star")
    opts = {**OPTS, "nr_classes": "2", "nr_iter_grad": "4"}
    assert run_job("class2d", "Class2D/job013", {"fn_img": star, **opts},
                   project_dir=tmp_path) == 0
    parts = read_star(tmp_path / "Class2D/job013/run_it004_data.star")["particles"]
    assert len(parts) == 59 and "000006@" not in " ".join(parts["rlnImageName"])

    job = tmp_path / "Class2D/job014"
    job.mkdir(parents=True)
    (job / ABORT_NOW).touch()
    star2 = _write_project(tmp_path, imgs[:60], ctf, name="ok.star")
    # run_job clears old markers first, so ask for the abort from the first progress call
    import app.jobs.base as base

    orig = base.JobContext.check_abort

    def abort_now(self):
        (self.out_dir / ABORT_NOW).touch()
        return orig(self)

    base.JobContext.check_abort = abort_now
    try:
        assert run_job("class2d", "Class2D/job014", {"fn_img": star2, **opts},
                       project_dir=tmp_path) == 1
    finally:
        base.JobContext.check_abort = orig
    assert (job / ABORTED).exists()


def test_class2d_allow_coarser(tmp_path, sim):
    """allow_coarser (RELION's option name) switches the coarse low-resolution grid on; the
    written angles are still on the user's psi grid (the final pass uses it)."""
    imgs, mol, _, ctf = sim
    star = _write_project(tmp_path, imgs, ctf)
    opts = {**OPTS, "allow_coarser": "Yes", "nr_iter_grad": "10"}
    assert run_job("class2d", "Class2D/job009", {"fn_img": star, **opts},
                   project_dir=tmp_path) == 0
    data = read_star(tmp_path / "Class2D/job009/run_it010_data.star")["particles"]
    psi = np.asarray(data["rlnAnglePsi"], dtype=float) % 360.0
    assert np.allclose(np.round(psi / 15.0), psi / 15.0, atol=1e-3)
    # the classes are still mostly one molecule each
    cls = np.asarray(data["rlnClassNumber"], dtype=int)
    big = [k for k in np.unique(cls) if (cls == k).sum() >= 0.05 * len(cls)]
    assert np.mean([np.bincount(mol[cls == k] + 1).max() / (cls == k).sum() for k in big]) >= 0.8
