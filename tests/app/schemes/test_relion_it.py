"""Session settings -> scheme variables and job options (relion_it mapping, box-size rules)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.errors import UserError
from app.schemes import api
from app.schemes.jobstar import read_job_star
from app.schemes.model import Scheme
from app.schemes.relion_it import (
    GOOD_BOX_SIZES,
    ProcessingSettings,
    apply_options,
    box_sizes,
    settings_to_options,
)


def s(**kw) -> ProcessingSettings:
    base = dict(pixel_size_a=1.0, voltage_kv=300, cs_mm=2.7, dose_per_frame_e_a2=1.0,
                particle_diameter_a=150)
    base.update(kw)
    return ProcessingSettings(**base)


@pytest.mark.parametrize("diam,angpix,box,small", [
    (150, 1.0, 226, 64),     # 225 px -> even 226; 226 px x 1 A / 64 = 3.53 A < 3.75
    (300, 0.83, 544, 128),   # 542.2 -> 544; 0.83 x 544 / 120.4 -> first good size 128
    (150, 4.0, 58, None),    # box already small: no down-scaling
    (100, 1.0, 150, 48),     # 150 x 1 / 48 = 3.125 A
    (400, 0.5, 1200, 192),   # 0.5 x 1200 / 160 = 3.75 is not below 3.75 -> 192
])
def test_box_size_rules(diam, angpix, box, small):
    assert box_sizes(diam, angpix) == (box, small)
    if small is not None:
        assert angpix * box / small < 3.75
        smaller = [b for b in GOOD_BOX_SIZES if b < small]
        assert all(angpix * box / b >= 3.75 for b in smaller)


def test_super_resolution_bins_by_two_and_sizes_follow():
    o = settings_to_options(s(pixel_size_a=0.5, super_resolution=True))
    assert o["prep__motioncorr__bin_factor"] == "2"
    assert o["prep__importmovies__angpix"] == "0.5"
    assert (o["proc__extract__extract_size"], o["proc__extract__rescale"]) == ("226", "64")
    assert o["proc__class2d__particle_diameter"] == "165"  # mask = 1.1 x 150 A


def test_settings_validate_units_and_choices():
    with pytest.raises(ValidationError):
        s(pixel_size_a=0)
    with pytest.raises(ValidationError):
        s(picker="template")
    with pytest.raises(ValidationError):
        ProcessingSettings(voltage_kv=300, cs_mm=2.7, dose_per_frame_e_a2=1,
                           particle_diameter_a=150)  # pixel size missing


def test_create_project_writes_both_schemes_with_settings(tmp_path):
    gain = tmp_path / "gain.mrc"
    proj = api.create_project(tmp_path / "p", s(
        gain_reference=gain, picker="topaz", symmetry="D2", min_particles_3d=2000,
        rank_threshold=0.2, executor="slurm", queue="gpu", do_at_most=20, wait_sec=60,
        email="op@example.org"))
    prep, proc = Scheme.load(proj, "prep"), Scheme.load(proj, "proc")
    assert prep.floats["do_at_most"].value == 20 and prep.floats["do_at_most"].reset == 20
    assert prep.floats["wait_sec"].value == 60
    assert proc.floats["min_nr_parts_3d"].value == 2000
    assert proc.bools["do_log"].value is False and proc.bools["do_log"].reset is False
    assert proc.strings["email"].value == "op@example.org"
    mc = read_job_star(proj / "Schemes/prep/motioncorr/job.star").options
    assert mc["fn_gain_ref"] == str(gain) and mc["dose_per_frame"] == "1"
    assert mc["do_queue"] == "Yes" and mc["queuename"] == "gpu"
    sel = read_job_star(proj / "Schemes/proc/select_parts/job.star").options
    assert sel["rank_threshold"] == "0.2" and sel["do_class_ranker"] == "Yes"
    ref = read_job_star(proj / "Schemes/proc/refine3d/job.star").options
    assert ref["sym_name"] == "D2" and ref["fn_ref"] == "$$myref"
    ex = read_job_star(proj / "Schemes/proc/extract/job.star").options
    assert (ex["extract_size"], ex["do_rescale"], ex["rescale"]) == ("226", "Yes", "64")
    ap = read_job_star(proj / "Schemes/proc/autopick/job.star").options
    assert (ap["log_diam_min"], ap["log_diam_max"]) == ("120", "165")
    assert ap["topaz_particle_diameter"] == "150"
    with pytest.raises(UserError, match="already holds a scheme"):
        api.create_project(proj, s())


def test_unknown_keys_are_errors(tmp_path):
    proj = api.create_project(tmp_path / "p", s())
    with pytest.raises(UserError, match="scheme proc has no job 'nosuch'"):
        apply_options(proj, {"proc__nosuch__x": "1"})
    with pytest.raises(UserError, match="scheme prep has no variable 'frob'"):
        apply_options(proj, {"prep__frob": "1"})
    with pytest.raises(UserError, match="float variable; 'many' is not a number"):
        apply_options(proj, {"prep__do_at_most": "many"})
