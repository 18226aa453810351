"""import -> motioncorr -> ctffind on a tiny synthetic project, bad movies included."""

from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
import pytest
import tifffile

from app.jobs.base import SUCCESS, exit_status, run_job
from compute import ctf, fourier
from metadata.star import read_star

pytestmark = pytest.mark.filterwarnings("ignore:Data array contains NaN values")

PX = 1.0
N = 256
NF = 8
DEFOCUS = 15000.0


def _frames(rng, shifts):
    obj = fourier.lowpass(rng.standard_normal((N, N)).astype(np.float32), 2.5, PX)
    img = ctf.apply_ctf(obj, PX, ctf.CtfParams(DEFOCUS + 150, DEFOCUS - 150, 30.0))
    img = 0.4 * img / img.std()
    fr = fourier.shift_image(np.repeat(img[None], len(shifts), 0), shifts)
    return rng.poisson(np.clip(20.0 * (1 + fr), 0, None)).astype(np.uint16)


@pytest.fixture
def project(tmp_path, rng):
    mov = tmp_path / "Movies"
    mov.mkdir()
    t = np.arange(NF)
    shifts = np.stack([1.5 * t, -1.0 * t], -1).astype(float)
    good = []
    for i in range(2):
        f = _frames(rng, shifts)
        p = mov / f"good_{i}.tiff"
        tifffile.imwrite(p, f[:, ::-1], compression="lzw")  # TIFF: stored flipped in Y
        good.append(f)
    # truncated MRC
    with mrcfile.new(mov / "trunc.mrc") as m:
        m.set_data(good[0].astype(np.int16))
    raw = (mov / "trunc.mrc").read_bytes()
    (mov / "trunc.mrc").write_bytes(raw[: len(raw) // 2])
    # a NaN frame and an all-zero frame
    bad = good[1].astype(np.float32)
    bad[3, 10, 10] = np.nan
    with mrcfile.new(mov / "nan.mrc") as m:
        m.set_data(bad)
    zero = good[1].astype(np.float32)
    zero[2] = 0
    with mrcfile.new(mov / "zero.mrc") as m:
        m.set_data(zero)
    return tmp_path, shifts


def test_prep_chain_with_bad_movies(project):
    root, shifts = project
    assert run_job("import", root / "Import/job001", {"fn_in_raw": "Movies/*", "angpix": "1.0"},
                   project_dir=root) == 0
    movies = read_star(root / "Import/job001/movies.star")
    assert len(movies["movies"]) == 5
    assert float(movies["optics"]["rlnMicrographOriginalPixelSize"][0]) == 1.0

    opts = {"input_star_mics": "Import/job001/movies.star", "dose_per_frame": "1",
            "patch_x": "1", "patch_y": "1", "other_args": "--do_at_most 4"}
    assert run_job("motioncorr", root / "MotionCorr/job002", opts, project_dir=root) == 0
    out = read_star(root / "MotionCorr/job002/corrected_micrographs.star")
    mics, failed = out["micrographs"], out["failed"]
    assert len(mics) + len(failed) == 4  # do_at_most
    reasons = dict(zip(failed["rlnMicrographMovieName"], failed["scopesideFailureReason"]))
    assert "truncated" in reasons["Movies/trunc.mrc"]
    assert "NaN" in reasons["Movies/nan.mrc"]
    # continue picks up the fifth movie only
    assert run_job("motioncorr", root / "MotionCorr/job002", opts, is_continue=True,
                   project_dir=root) == 0
    out = read_star(root / "MotionCorr/job002/corrected_micrographs.star")
    mics, failed = out["micrographs"], out["failed"]
    assert sorted(mics["rlnMicrographMovieName"]) == ["Movies/good_0.tiff", "Movies/good_1.tiff"]
    assert "all_zeros" in dict(zip(failed["rlnMicrographMovieName"],
                                   failed["scopesideFailureReason"]))["Movies/zero.mrc"]
    mic = root / mics["rlnMicrographName"].iloc[0]
    with mrcfile.open(mic) as m:
        assert m.data.dtype == np.float16 and m.data.shape == (N, N)
    meta = read_star(root / mics["rlnMicrographMetadata"].iloc[0])
    gs = meta["global_shift"]
    got = np.stack([gs["rlnMicrographShiftY"], gs["rlnMicrographShiftX"]], -1)
    assert np.sqrt(((got - shifts) ** 2).sum(1).mean()) < 0.2
    expect_total = np.linalg.norm(np.diff(shifts, axis=0), axis=1).sum() * PX
    assert float(mics["rlnAccumMotionTotal"].iloc[0]) == pytest.approx(expect_total, rel=0.1)

    copts = {"input_star_mics": "MotionCorr/job002/corrected_micrographs.star", "box": "256",
             "resmin": "30", "resmax": "4", "other_args": "--do_at_most 1"}
    assert run_job("ctffind", root / "CtfFind/job003", copts, project_dir=root) == 0
    assert exit_status(root / "CtfFind/job003") == "success"
    c1 = read_star(root / "CtfFind/job003/micrographs_ctf.star")["micrographs"]
    assert len(c1) == 1
    assert run_job("ctffind", root / "CtfFind/job003", copts, is_continue=True,
                   project_dir=root) == 0
    c = read_star(root / "CtfFind/job003/micrographs_ctf.star")["micrographs"]
    assert len(c) == 2
    mean = 0.5 * (c["rlnDefocusU"] + c["rlnDefocusV"])
    assert np.all(np.abs(mean - DEFOCUS) < 150)
    for col in ("rlnCtfImage", "rlnCtfAstigmatism", "rlnDefocusAngle", "rlnCtfFigureOfMerit",
                "rlnCtfMaxResolution", "rlnAccumMotionTotal"):
        assert col in c.columns
    img = c["rlnCtfImage"].iloc[0]
    assert img.endswith(".ctf:mrc") and (root / img[:-4]).is_file()
    assert (root / "CtfFind/job003" / SUCCESS).exists()


def test_gain_of_wrong_size_fails_that_movie_only(project):
    root, _ = project
    run_job("import", root / "Import/job001", {"fn_in_raw": "Movies/good_*.tiff", "angpix": "1"},
            project_dir=root)
    with mrcfile.new(root / "gain.mrc") as m:
        m.set_data(np.ones((N, N // 2), np.float32))
    opts = {"input_star_mics": "Import/job001/movies.star", "fn_gain_ref": "gain.mrc",
            "patch_x": "1", "patch_y": "1"}
    assert run_job("motioncorr", root / "MotionCorr/job002", opts, project_dir=root) == 1
    out = read_star(root / "MotionCorr/job002/corrected_micrographs.star")
    assert len(out["failed"]) == 2
    assert all("gain_reference_is" in r for r in out["failed"]["scopesideFailureReason"])


def test_dm4_gain_reference_as_serialem_copies_it(project):
    """SerialEM copies a K2/K3's gain reference as CountRef_*.dm4: the job reads it like the
    same gain in MRC, and names an MRC copy in its outputs (RELION cannot read .dm4)."""
    from metadata.synth import write_dm4_image

    root, _ = project
    run_job("import", root / "Import/job001", {"fn_in_raw": "Movies/good_0.tiff", "angpix": "1"},
            project_dir=root)
    gain = (0.8 + 0.4 * np.random.default_rng(5).random((N, N))).astype(np.float32)
    with mrcfile.new(root / "gain.mrc") as m:
        m.set_data(gain)
    # DigitalMicrograph stores top-left first: the same gain is flipped in Y on disk
    write_dm4_image(root / "CountRef_x.dm4", np.ascontiguousarray(gain[::-1]))
    mics = {}
    for job, name in (("job002", "gain.mrc"), ("job003", "CountRef_x.dm4")):
        opts = {"input_star_mics": "Import/job001/movies.star", "fn_gain_ref": name,
                "patch_x": "1", "patch_y": "1", "do_float16": "false"}
        assert run_job("motioncorr", root / f"MotionCorr/{job}", opts, project_dir=root) == 0
        row = read_star(root / f"MotionCorr/{job}/corrected_micrographs.star")["micrographs"]
        with mrcfile.open(root / row["rlnMicrographName"].iloc[0]) as m:
            mics[job] = m.data.copy()
        meta = read_star(root / row["rlnMicrographMetadata"].iloc[0])
        gain_name = meta["general"]["rlnMicrographGainName"]
        if isinstance(gain_name, pd.Series):
            gain_name = gain_name.iloc[0]
        mics[job + "_gain"] = str(gain_name)
    np.testing.assert_array_equal(mics["job002"], mics["job003"])
    assert mics["job002_gain"] == "gain.mrc"
    assert mics["job003_gain"] == "MotionCorr/job003/gain_reference.mrc"
    with mrcfile.open(root / mics["job003_gain"]) as m:
        np.testing.assert_array_equal(m.data, gain)
    # an on-the-fly continue does not rewrite the copy (a K3 gain is ~90 MB)
    stamp = (root / mics["job003_gain"]).stat().st_mtime_ns
    opts["fn_gain_ref"] = "CountRef_x.dm4"
    assert run_job("motioncorr", root / "MotionCorr/job003", opts, is_continue=True,
                   project_dir=root) == 0
    assert (root / mics["job003_gain"]).stat().st_mtime_ns == stamp


def test_import_skips_serialem_montages_and_image_stacks(tmp_path, caplog):
    """A SerialEM folder holds navigator montages and image stacks as .mrc beside .mrc movies:
    'Movies/*.mrc' must not import them as movies (their mdoc has [ZValue] sections)."""
    from metadata.synth import write_mdoc, write_movie_stub

    mov = tmp_path / "Movies"
    for name in ("m_001.mrc", "m_002.mrc", "gm.mrc", "ts.mrc", "single.mrc"):
        write_movie_stub(mov / name, n_frames=4, shape=(32, 32))
    for name in ("m_001.mrc", "m_002.mrc"):
        write_mdoc(mov / f"{name}.mdoc", sub_frame_path=rf"X:\f\{name}")
    write_mdoc(mov / "gm.mrc.mdoc", variant="montage", n_sections=4, sub_frame_path=None)
    write_mdoc(mov / "ts.mrc.mdoc", variant="tilt_series", n_sections=3)
    # a one-image stack mdoc that does not say where its frames are: kept (cannot be told)
    write_mdoc(mov / "single.mrc.mdoc", variant="stack", n_sections=1, sub_frame_path=None)
    opts = {"fn_in_raw": "Movies/*.mrc", "angpix": "1"}
    assert run_job("import", tmp_path / "Import/job001", opts, project_dir=tmp_path) == 0
    names = read_star(tmp_path / "Import/job001/movies.star")["movies"]["rlnMicrographMovieName"]
    assert sorted(names) == ["Movies/m_001.mrc", "Movies/m_002.mrc", "Movies/single.mrc"]
    log = (tmp_path / "Import/job001/skipped_not_movies.txt").read_text().split()
    assert log == ["Movies/gm.mrc", "Movies/ts.mrc"]
    # continue: a new movie is added, the skipped files are not looked at again
    write_movie_stub(mov / "m_003.mrc", n_frames=4, shape=(32, 32))
    write_mdoc(mov / "m_003.mrc.mdoc", sub_frame_path=r"X:\f\m_003.mrc")
    caplog.clear()
    assert run_job("import", tmp_path / "Import/job001", opts, is_continue=True,
                   project_dir=tmp_path) == 0
    names = read_star(tmp_path / "Import/job001/movies.star")["movies"]["rlnMicrographMovieName"]
    assert list(names)[-1] == "Movies/m_003.mrc" and len(names) == 4
    assert not any("skipped" in r.getMessage() for r in caplog.records)


def _simulated_micrograph(tmp_path, fmt, gain_name=None, gain_data=None):
    """One simulated movie (seed fixed) through import + motioncorr; the summed micrograph."""
    from app.cli import run

    root = tmp_path / fmt
    assert run(["simulate", "movies", "--out", str(root), "--n", "1", "--size", "128",
                "--frames", "4", "--format", fmt, "--particles", "4", "--seed", "7"]) == 0
    gain_file = gain_name or next(p.name for p in root.iterdir() if p.stem == "gain_reference")
    if gain_data is not None:
        with mrcfile.new(root / gain_name, overwrite=True) as m:
            m.set_data(gain_data(root).astype(np.float32))
    assert run_job("import", root / "Import/job001",
                   {"fn_in_raw": f"Movies/*.{fmt}", "angpix": "1"}, project_dir=root) == 0
    opts = {"input_star_mics": "Import/job001/movies.star", "fn_gain_ref": gain_file,
            "patch_x": "1", "patch_y": "1", "do_float16": "false", "eer_grouping": "20",
            "do_dose_weighting": "false"}
    assert run_job("motioncorr", root / "MotionCorr/job002", opts, project_dir=root) == 0
    row = read_star(root / "MotionCorr/job002/corrected_micrographs.star")["micrographs"]
    with mrcfile.open(root / row["rlnMicrographName"].iloc[0]) as m:
        return m.data.astype(np.float64)


def test_tiff_and_mrc_movies_with_an_mrc_gain_give_the_same_micrograph(tmp_path):
    """TIFF movies are read flipped in Y (RELION/MotionCor2/IMOD's convention) and the MRC
    gain as stored: the same simulated movie as TIFF or as MRC gives the same micrograph."""
    a = _simulated_micrograph(tmp_path, "tiff")
    b = _simulated_micrograph(tmp_path, "mrc")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3 * np.abs(b).max())


def test_eer_gain_as_thermo_fisher_gain_or_as_counts_gives_the_same_micrograph(tmp_path):
    """RELION's EER rules: the .gain is multiplicative; another gain file holds counts (its
    inverse) and is inverted."""
    from metadata.frames import read_gain

    a = _simulated_micrograph(tmp_path, "eer")
    b = _simulated_micrograph(tmp_path / "b", "eer", gain_name="counts.mrc",
                              gain_data=lambda root: 1.0 / read_gain(root / "gain_reference.gain"))
    assert (tmp_path / "eer" / "gain_reference.gain").is_file()
    np.testing.assert_allclose(a / a.mean(), b / b.mean(), rtol=1e-3, atol=1e-3)
