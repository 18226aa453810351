"""RELION options and sub-types that ask for something scopeside does not do: the job fails at
once, naming the option, instead of running as if it were absent (shapes from RELION 4/5's own
job.star files: an import of a reference, a split job, an amyloid picker...)."""

from __future__ import annotations

import pytest

from app.errors import UserError
from app.jobs import find_type
from app.jobs.base import FAILURE, SUCCESS, run_job


@pytest.mark.parametrize("job, option, value, what", [
    ("import", "do_other", "Yes", "importing references, masks"),
    ("import", "do_raw", "No", "an import without raw movies"),
    ("extract", "do_reextract", "Yes", "re-extraction"),
    ("class2d", "dont_skip_align", "No", "classification without alignment"),
    ("class2d", "do_helix", "Yes", "helical 2D classification"),
    ("autopick", "do_amyloid", "Yes", "amyloid picking"),
    ("autopick", "do_topaz_train", "Yes", "training a Topaz model"),
    ("select", "do_split", "Yes", "splitting a STAR file"),
    ("select", "do_remove_duplicates", "true", "removing duplicate particles"),
    ("refine3d", "relax_sym", "C2", "relaxed symmetry"),
])
def test_unsupported_option_value_fails_the_job_naming_it(tmp_path, job, option, value, what):
    assert run_job(job, tmp_path / "J", {option: value}, project_dir=tmp_path) == 1
    reason = (tmp_path / "J" / FAILURE).read_text()
    assert f"option {option}={value!r}: {what}" in reason and "run this job in RELION" in reason


def test_accepted_values_of_those_options_still_run(tmp_path):
    (tmp_path / "Movies").mkdir()
    opts = {"fn_in_raw": "Movies/*.tiff", "angpix": "1", "do_raw": "Yes", "do_other": "No",
            "node_type": "Particle coordinates (*.box, *_pick.star)", "fn_in_other": "ref.mrc"}
    assert run_job("import", tmp_path / "I", opts, project_dir=tmp_path) == 0
    assert (tmp_path / "I" / SUCCESS).exists()


@pytest.mark.parametrize("label, what", [
    ("relion.select.split", "splitting a STAR file"),
    ("relion.autopick.amypick", "amyloid picking"),
    ("relion.import.other", "importing references"),
    ("relion.extract.reextract", "re-extraction"),
])
def test_unsupported_subtypes_are_refused_by_label(label, what):
    with pytest.raises(UserError, match=rf"job type {label}: {what}.*not supported"):
        find_type(label)


@pytest.mark.parametrize("label, name", [("relion.import.movies", "import"),
                                         ("relion.motioncorr.own", "motioncorr"),
                                         ("relion.select.class2dauto", "select"),
                                         ("relion.select.onvalue", "select")])
def test_supported_subtypes_map_to_their_job(label, name):
    assert find_type(label).name == name
