"""Qt-free GUI models and readers: form rules, gallery rules, project files → arrays."""

from __future__ import annotations

import numpy as np
import pytest

from app.errors import UserError
from app.gui import backend_adapter as be
from app.gui.model import (
    CONFIRMED,
    IMPLAUSIBLE,
    MISSING,
    GalleryData,
    GalleryModel,
    SetupForm,
    box_sizes,
)
from app.gui.readers import ProjectReader
from metadata.star import read_star
from tests.app.gui import fakes


@pytest.mark.parametrize("diam,px,sr", [(150, 1.0, False), (100, 0.5, True), (300, 0.83, False),
                                        (60, 1.2, False), (400, 1.06, False)])
def test_box_sizes_follow_relion_it(diam, px, sr):
    b = box_sizes(diam, px, sr)
    mic_px = px * (2 if sr else 1)
    # the box holds 1.5 x the diameter, even, and no more than one pixel beyond
    assert b.box_px % 2 == 0 and b.box_px >= diam / mic_px * 1.5 > b.box_px - 2
    assert b.mask_diameter_a == pytest.approx(1.1 * diam, abs=0.05)
    assert mic_px * b.box_px / b.downscaled_px < 3.75 or b.downscaled_px == b.box_px
    # the same numbers the schemes engine writes into the extract job
    from app.schemes.relion_it import box_sizes as upstream

    box, small = upstream(diam, mic_px)
    assert (box, small or box) == (b.box_px, b.downscaled_px)


def test_box_sizes_hand_example():
    b = box_sizes(150.0, 1.0, False)  # 225 px -> 226; 226/64 * 1 Å = 3.53 Å < 3.75
    assert (b.box_px, b.downscaled_px, b.mask_diameter_a) == (226, 64, 165.0)


def test_form_states_and_problems():
    f = SetupForm()
    assert f["voltage_kv"].state == MISSING
    probs = f.problems()
    assert any("Voltage is missing" in p for p in probs)
    f["voltage_kv"].set_text("abc")
    assert f["voltage_kv"].state == IMPLAUSIBLE and "not a number" in f["voltage_kv"].error
    f["voltage_kv"].set_text("1000")
    assert f["voltage_kv"].state == IMPLAUSIBLE
    assert any("outside the plausible range" in p for p in f.problems())
    f["voltage_kv"].confirmed = True
    assert f["voltage_kv"].state == CONFIRMED
    assert not any("Voltage" in p for p in f.problems())
    f["n_frames"].set_text("12.5")
    assert f["n_frames"].error
    f["symmetry"].set_text("X9")
    assert any("point group" in p for p in f.problems())


def test_form_apply_record_keeps_provenance_and_clears_old_values():
    f = SetupForm()
    f.apply_record({"voltage_kv": (300.0, "a.xml:HT", None),
                    "dose_per_frame_e_a2": (1.0, None, "total_dose_e_a2/n_frames")},
                   None, "EPU")
    assert f["voltage_kv"].value == 300.0 and "a.xml:HT" in f["voltage_kv"].tooltip()
    assert "derived: total_dose_e_a2/n_frames" in f["dose_per_frame_e_a2"].tooltip()
    f.apply_record({"cs_mm": (2.7, "b.mdoc:Cs", None)}, None, "SerialEM")
    assert f["voltage_kv"].value is None and f["voltage_kv"].state == MISSING


def _gallery(scores, dist=None, res=None) -> GalleryData:
    n = len(scores)
    return GalleryData("Class2D/job007/", 25, np.arange(1, n + 1),
                       np.zeros((n, 4, 4), np.uint8), np.asarray(scores, float),
                       np.asarray(dist if dist is not None else np.full(n, 1 / n)),
                       np.full(n, 10), np.asarray(res if res is not None else np.full(n, 8.0)))


def test_gallery_model_order_threshold_overrides():
    m = GalleryModel(threshold=0.5)
    m.set_data(_gallery([0.2, np.nan, 0.9, 0.5], dist=[0.1, 0.4, 0.2, 0.3],
                        res=[5, 20, 7, np.nan]))
    assert m.data.class_numbers[m.order()].tolist() == [3, 4, 1, 2]  # NaN score last
    m.sort_key = "size"
    assert m.data.class_numbers[m.order()].tolist() == [2, 4, 3, 1]
    m.sort_key = "resolution"
    assert m.data.class_numbers[m.order()].tolist() == [1, 3, 2, 4]
    assert m.selected().tolist() == [False, False, True, True]
    m.threshold = 0.1
    assert m.selected().tolist() == [True, False, True, True]
    assert m.toggle(3) is False and m.overrides == {3: False}
    assert m.toggle(2) is True and m.overrides == {3: False, 2: True}
    assert m.toggle(3) is True and 3 not in m.overrides  # back to the automatic choice
    assert m.summary() == (4, 4, 40)
    m.set_data(_gallery([0.3, 0.3, 0.3, 0.3]))  # same job refreshed: choices kept
    assert m.overrides == {2: True}


def test_readers_return_what_was_written(tmp_path, rng):
    info = fakes.populate(tmp_path, rng, n_mics=12, n_classes=10)
    r = ProjectReader(tmp_path)
    t = r.micrograph_table()
    assert t.names == info["names"] and not t.time_is_index
    np.testing.assert_allclose(t.time_min, np.arange(12) * 1.5)
    np.testing.assert_allclose(t.defocus_um, info["defocus"] / 1e4, rtol=1e-6)
    np.testing.assert_allclose(t.ctf_max_res_a, info["maxres"], rtol=1e-5)
    np.testing.assert_allclose(t.total_motion_a, info["motion"], rtol=1e-5)
    np.testing.assert_array_equal(t.n_picked, info["picks"])
    assert t.hists["defocus_um"][1].sum() == 12
    g = r.gallery()
    assert g.class2d_job == "Class2D/job007/" and g.select_job == "Select/job008/"
    assert g.iteration == 200 and g.images.shape == (10, 64, 64) and g.images.dtype == np.uint8
    np.testing.assert_allclose(g.scores, info["scores"], rtol=1e-5)
    np.testing.assert_array_equal(g.n_particles, info["counts"])
    np.testing.assert_allclose(g.resolution_a, info["resolution_a"], rtol=1e-5)
    m = r.map3d("Refine3D")
    assert m.name == "run_class001.mrc" and m.resolution_a == pytest.approx(4.2)
    vol = fakes.blob_volume(48)
    np.testing.assert_allclose(m.slices[0], vol[24], rtol=1e-6)
    # FSC crosses 0.5 at the resolution the file states (logistic centred at 1/4.2)
    k = 1 / m.fsc_resolution_a[1:]
    assert 1 / np.interp(0.5, m.fsc[1:][::-1], k[::-1]) == pytest.approx(4.2, rel=0.05)
    v = r.micrograph_view()
    assert v.name == info["names"][-1] and v.bin_factor == 1.0
    np.testing.assert_allclose(v.picks_xy, info["blobs"][v.name], rtol=1e-5)
    assert v.pick_diameter_px == pytest.approx(24.0)  # log_diam_max 24 Å at 1 Å/px
    assert v.spectrum.shape == (256, 256) and np.isfinite(v.spectrum).all()


def test_reader_errors_name_the_file(tmp_path, rng):
    fakes.populate(tmp_path, rng, n_mics=3, n_classes=4)
    (tmp_path / "Class2D/job007/run_it200_model.star").write_text("data_\nloop_\n_rlnX #1\n1 2 3")
    with pytest.raises(Exception) as ei:
        ProjectReader(tmp_path).gallery()
    assert "run_it200_model.star" in str(ei.value)


def test_store_class_choices_for_select_job_and_ranker(tmp_path):
    from app.jobs.rank_select import read_feedback

    numbers = np.array([3, 1, 2])
    sel = np.array([True, False, True])
    auto = np.array([True, True, False])
    refs = [f"{c:06d}@Class2D/job007/run_it200_classes.mrcs" for c in numbers]
    paths = be.store_class_choices(tmp_path, "Select/job008/", "Class2D/job007/", 200, numbers,
                                   sel, auto, np.array([0.9, 0.4, 0.1]), refs)
    assert paths[0] == tmp_path / "Select/job008/backup_selection.star"
    assert read_star(paths[0])[""]["rlnSelected"].tolist() == [0, 1, 1]  # classes 1, 2, 3
    general, fb = read_feedback(paths[1])
    assert general["rlnModelStarFile"] == "Class2D/job007/run_it200_model.star"
    assert fb["rlnClassNumber"].tolist() == [1, 2, 3]
    assert fb["rlnSelected"].tolist() == [0, 1, 1]
    assert fb["rlnAutoSelected"].tolist() == [1, 0, 1]
    np.testing.assert_allclose(fb["rlnPredictedClassScore"], [0.4, 0.1, 0.9])
    assert fb["rlnReferenceImage"].tolist()[0].startswith("000001@")


def test_movies_glob_from_epu_layout(tmp_path):
    movie = tmp_path / "Images-Disc1/GridSquare_123/Data/FoilHole_1_Data_2_3_20240101_101010_fractions.tiff"
    assert be.movies_glob(tmp_path, str(movie)) == \
        "Movies/Images-Disc*/GridSquare_*/Data/*_fractions.tiff"
    assert be.movies_glob(None, str(movie)) is None


def test_scores_only_from_the_ranker_of_that_class2d_job(tmp_path, rng):
    fakes.populate(tmp_path, rng, n_mics=3, n_classes=6)
    fakes.write_class2d(tmp_path, 6, rng, job="Class2D/job011")
    g = ProjectReader(tmp_path).gallery()
    # the newest Class2D job is not ranked yet: no scores from job007's ranker
    assert g.class2d_job == "Class2D/job011/" and g.select_job is None
    assert np.isnan(g.scores).all()
    fakes.write_rank(tmp_path, np.linspace(0, 1, 6), class2d_job="Class2D/job011",
                     job="Select/job012", job_star=False)
    g = ProjectReader(tmp_path).gallery()
    assert g.select_job == "Select/job012/"
    np.testing.assert_allclose(g.scores, np.linspace(0, 1, 6), atol=1e-6)


def test_create_project_with_slurm_writes_the_project_executor(tmp_path):
    from app.settings import load_settings

    base = {"pixel_size_a": 1.0, "voltage_kv": 300.0, "cs_mm": 2.7, "dose_per_frame_e_a2": 1.0,
            "particle_diameter_a": 150.0, "executor": "slurm"}
    with pytest.raises(UserError, match="SLURM template"):
        be.create_project({**base, "project_dir": str(tmp_path / "p1"),
                           "slurm_template": str(tmp_path / "missing.sh")}, None)
    assert not (tmp_path / "p1").exists()  # nothing half-made
    tpl = tmp_path / "sbatch.sh"
    tpl.write_text("#!/bin/bash\n#SBATCH -p XXXqueueXXX\nXXXcommandXXX\n")
    p = be.create_project({**base, "project_dir": str(tmp_path / "p2"),
                           "slurm_template": str(tpl)}, None)
    s = load_settings(p)
    assert s.executor.kind == "slurm" and s.executor.slurm_template == tpl
    from app.schemes.jobstar import read_job_star

    assert read_job_star(p / "Schemes/proc/class2d/job.star").options["do_queue"] == "Yes"


def test_node_order_follows_edges_and_forks():
    from app.gui.readers import node_order

    edges = [{"input": "WAIT", "output": "HAS", "is_fork": False},
             {"input": "HAS", "output": "WAIT", "is_fork": True, "output_if_true": "select"},
             {"input": "select", "output": "WAIT", "is_fork": False}]
    assert node_order(edges) == ["WAIT", "HAS", "select"]
    assert node_order([]) == []


def test_topaz_choice_needs_topaz():
    f = SetupForm()
    f["picker"].set_text("Topaz")
    f.topaz_available = False
    assert any("Topaz is not installed" in p for p in f.problems())
    f.topaz_available = True
    assert not any("Topaz" in p for p in f.problems())


def test_parse_session_finds_the_gain_reference_serialem_names(tmp_path):
    """SerialEM's GainReference is a bare name (CountRef_*.dm4 beside the frames): the form
    gets the file's full path; a name that is nowhere gives a warning and blocks Start."""
    from metadata import synth

    sess = tmp_path / "sess"
    synth.write_mdoc(sess / "m_001.tif.mdoc", gain_reference="CountRef_A.dm4")
    synth.write_movie_stub(sess / "m_001.tif", n_frames=40)
    synth.write_dm4_image(sess / "CountRef_A.dm4", np.ones((64, 64), np.float32))
    ps = be.parse_session(sess)
    value, source, derived = ps.values["gain_reference"]
    assert value == str((sess / "CountRef_A.dm4").resolve()) and derived is None
    assert "GainReference" in source and "found in" in source
    (sess / "CountRef_A.dm4").unlink()
    ps = be.parse_session(sess)
    assert ps.values["gain_reference"][0] == "CountRef_A.dm4"
    assert any("names the gain reference CountRef_A.dm4, which is not in" in w
               for w in ps.warnings)
    base = {"pixel_size_a": 1.0, "voltage_kv": 300.0, "cs_mm": 2.7, "dose_per_frame_e_a2": 1.0,
            "particle_diameter_a": 150.0, "gain_reference": "CountRef_A.dm4"}
    with pytest.raises(UserError, match="Gain reference CountRef_A.dm4: file not found"):
        be.create_project({**base, "project_dir": str(tmp_path / "p")}, sess)
    assert not (tmp_path / "p").exists()


def test_parse_session_uses_the_detector_gain_rule_when_the_metadata_names_none(tmp_path):
    """EPU writes no gain name for a K3; the config's K3 rule finds {session}/*.gain."""
    from metadata import synth

    sess = tmp_path / "epu"
    synth.write_epu_session(sess, n_grid_squares=1, holes_per_square=1, shots_per_hole=1,
                            camera_name="EF-CCD", detector_commercial_name="BioQuantum K3",
                            readout_width=5760, readout_height=4092)
    synth.write_movie_stub(sess / "K3_gain.gain", n_frames=1, shape=(8, 8))
    ps = be.parse_session(sess)
    value, source, derived = ps.values["gain_reference"]
    assert value == str((sess / "K3_gain.gain").resolve())
    assert source is None and "gain-reference rule" in derived
    assert any("found by the detector's rule" in w for w in ps.warnings)


def test_parse_session_warns_when_non_normalised_movies_have_no_gain(tmp_path):
    from metadata import synth

    sess = tmp_path / "epu"
    synth.write_epu_session(sess, n_grid_squares=1, holes_per_square=1, shots_per_hole=1,
                            movie_format="tiff")
    ps = be.parse_session(sess)
    assert ps.values["gain_reference"][0] is None
    assert any("no gain reference found for these non-gain-normalised movies" in w
               for w in ps.warnings)
