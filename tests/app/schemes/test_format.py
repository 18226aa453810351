"""scheme.star / job.star / default_pipeline.star: RELION 4 layout, round trips, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.errors import UserError
from app.schemes import starfmt
from app.schemes.jobstar import format_job_star, parse_job_star, read_job_star
from app.schemes.model import Scheme
from app.schemes.pipeline import Pipeline
from app.schemes.templates import build_prep, build_proc, write_templates

REPO = Path(__file__).resolve().parents[3]
SHIPPED = REPO / "resources" / "schemes"

# Written here in RELION 4's exact layout (label padding, %12.6f floats, width-10 cells,
# " \n" block ends), with the awkward cases: quoted values, empty strings, negative and
# e-format floats, a fork, a started job.
RELION_SCHEME = (
    "\n# version 30001\n\ndata_scheme_general\n\n"
    "_rlnSchemeName                       Schemes/test/\n"
    "_rlnSchemeCurrentNodeName            WAIT\n \n"
    "\n# version 30001\n\ndata_scheme_floats\n\nloop_ \n"
    "_rlnSchemeFloatVariableName #1 \n_rlnSchemeFloatVariableValue #2 \n"
    "_rlnSchemeFloatVariableResetValue #3 \n"
    "     small 1.000000e-04 1.000000e-04 \n"
    "      tiny     -2.50000     -2.50000 \n"
    "  wait_sec    45.000000    45.000000 \n \n"
    "\n# version 30001\n\ndata_scheme_bools\n\nloop_ \n"
    "_rlnSchemeBooleanVariableName #1 \n_rlnSchemeBooleanVariableValue #2 \n"
    "_rlnSchemeBooleanVariableResetValue #3 \n"
    "   is_done            1            0 \n \n"
    "\n# version 30001\n\ndata_scheme_strings\n\nloop_ \n"
    "_rlnSchemeStringVariableName #1 \n_rlnSchemeStringVariableValue #2 \n"
    "_rlnSchemeStringVariableResetValue #3 \n"
    "     empty         \"\"         \"\" \n"
    "    spaced    \"a b c\"    \"a b c\" \n"
    "     where Schemes/test/step/out.star Schemes/test/step/out.star \n \n"
    "\n# version 30001\n\ndata_scheme_operators\n\nloop_ \n"
    "_rlnSchemeOperatorName #1 \n_rlnSchemeOperatorType #2 \n_rlnSchemeOperatorOutput #3 \n"
    "_rlnSchemeOperatorInput1 #4 \n_rlnSchemeOperatorInput2 #5 \n"
    "  CHECK_it bool=file_exists    is_done      where  undefined \n"
    "      WAIT       wait  undefined   wait_sec  undefined \n \n"
    "\n# version 30001\n\ndata_scheme_jobs\n\nloop_ \n"
    "_rlnSchemeJobNameOriginal #1 \n_rlnSchemeJobName #2 \n_rlnSchemeJobMode #3 \n"
    "_rlnSchemeJobHasStarted #4 \n"
    "      step Import/job001/   continue            1 \n \n"
    "\n# version 30001\n\ndata_scheme_edges\n\nloop_ \n"
    "_rlnSchemeEdgeInputNodeName #1 \n_rlnSchemeEdgeOutputNodeName #2 \n"
    "_rlnSchemeEdgeIsFork #3 \n_rlnSchemeEdgeOutputNodeNameIfTrue #4 \n"
    "_rlnSchemeEdgeBooleanVariable #5 \n"
    "      WAIT   CHECK_it            0  undefined  undefined \n"
    "  CHECK_it       step            1       WAIT    is_done \n"
    "      step       WAIT            0  undefined  undefined \n \n")

RELION_JOB = (
    "\n# version 30001\n\ndata_job\n\n"
    "_rlnJobTypeLabel             relion.class2d\n"
    "_rlnJobIsContinue                       1\n"
    "_rlnJobIsTomo                           0\n \n"
    "\n# version 30001\n\ndata_joboptions_values\n\nloop_ \n"
    "_rlnJobOptionVariable #1 \n_rlnJobOptionValue #2 \n"
    "   fn_cont         \"\" \n"
    "    fn_img Schemes/proc/extract/particles.star \n"
    "nr_classes        100 \n"
    "other_args \"--do_at_most $$do_at_most\" \n"
    "  sampling \"7.5 degrees\" \n \n")

RELION_PIPELINE = (
    "\n# version 30001\n\ndata_pipeline_general\n\n"
    "_rlnPipeLineJobCounter                       3\n \n"
    "\n# version 30001\n\ndata_pipeline_processes\n\nloop_ \n"
    "_rlnPipeLineProcessName #1 \n_rlnPipeLineProcessAlias #2 \n"
    "_rlnPipeLineProcessTypeLabel #3 \n_rlnPipeLineProcessStatusLabel #4 \n"
    "Import/job001/       None relion.import  Succeeded \n"
    "MotionCorr/job002/       None relion.motioncorr    Running \n \n"
    "\n# version 30001\n\ndata_pipeline_nodes\n\nloop_ \n"
    "_rlnPipeLineNodeName #1 \n_rlnPipeLineNodeTypeLabel #2 \n"
    "_rlnPipeLineNodeTypeLabelDepth #3 \n"
    "Import/job001/movies.star MicrographMovieGroupMetadata.star.relion            1 \n \n"
    "\n# version 30001\n\ndata_pipeline_input_edges\n\nloop_ \n"
    "_rlnPipeLineEdgeFromNode #1 \n_rlnPipeLineEdgeProcess #2 \n"
    "Import/job001/movies.star MotionCorr/job002/ \n \n"
    "\n# version 30001\n\ndata_pipeline_output_edges\n\nloop_ \n"
    "_rlnPipeLineEdgeProcess #1 \n_rlnPipeLineEdgeToNode #2 \n"
    "Import/job001/ Import/job001/movies.star \n \n")


def shipped_files() -> list[Path]:
    files = sorted(SHIPPED.rglob("*.star"))
    assert len(files) == 2 + 3 + 7, files
    return files


@pytest.mark.parametrize("path", shipped_files(), ids=lambda p: str(p.relative_to(SHIPPED)))
def test_shipped_files_round_trip_byte_identical(path):
    text = path.read_text()
    if path.name == "scheme.star":
        out = Scheme.from_text(text, path).to_text()
    else:
        out = format_job_star(read_job_star(path))
    assert out == text


def test_relion_layout_scheme_round_trips_byte_identical():
    sch = Scheme.from_text(RELION_SCHEME, "Schemes/test/scheme.star")
    assert sch.floats["small"].value == pytest.approx(1e-4)
    assert sch.floats["tiny"].value == -2.5
    assert sch.bools["is_done"].value is True and sch.bools["is_done"].reset is False
    assert sch.strings["empty"].value == "" and sch.strings["spaced"].value == "a b c"
    assert sch.jobs["step"].current_name == "Import/job001/" and sch.jobs["step"].has_started
    assert sch.edges[1].is_fork and sch.edges[1].output_if_true == "WAIT"
    assert sch.to_text() == RELION_SCHEME


def test_relion_layout_job_star_round_trips_byte_identical():
    js = parse_job_star(RELION_JOB)
    assert js.type_label == "relion.class2d" and js.is_continue
    assert js.options["fn_cont"] == "" and js.options["sampling"] == "7.5 degrees"
    assert js.options["other_args"] == "--do_at_most $$do_at_most"
    assert format_job_star(js) == RELION_JOB


def test_relion_layout_pipeline_round_trips_byte_identical():
    p = Pipeline.from_text(RELION_PIPELINE)
    assert p.job_counter == 3 and p.processes[1].status == "Running"
    assert p.input_edges == [("Import/job001/movies.star", "MotionCorr/job002/")]
    assert p.to_text() == RELION_PIPELINE


def test_reader_tolerates_other_whitespace_and_keeps_text():
    squashed = "data_job\n_rlnJobTypeLabel relion.select\n_rlnJobIsContinue 0\n" \
               "data_joboptions_values\nloop_\n_rlnJobOptionVariable\n_rlnJobOptionValue\n" \
               "select_minval 007\nfn_mic 'C:\\data\\x y.star'\n"
    js = parse_job_star(squashed)
    assert js.options == {"select_minval": "007", "fn_mic": "C:\\data\\x y.star"}
    again = parse_job_star(format_job_star(js))
    assert again == js
    assert starfmt.normalise(format_job_star(again)) == starfmt.normalise(format_job_star(js))


def test_templates_in_resources_match_the_builder(tmp_path):
    write_templates(tmp_path)
    for f in shipped_files():
        rel = f.relative_to(SHIPPED)
        assert (tmp_path / rel).read_text() == f.read_text(), rel


def test_shipped_graphs_have_the_spec_shape():
    prep, pjobs = build_prep()
    assert [(e.input, e.output) for e in prep.edges] == [
        ("WAIT", "EXIT_maxtime"), ("EXIT_maxtime", "importmovies"),
        ("importmovies", "motioncorr"), ("motioncorr", "ctffind"), ("ctffind", "WAIT")]
    assert {j.mode for j in prep.jobs.values()} == {"continue"}
    assert prep.floats["do_at_most"].value == 50 and prep.floats["maxtime_hr"].value == 48
    assert prep.floats["wait_sec"].value == 180
    proc, jobs = build_proc()
    modes = {k: j.mode for k, j in proc.jobs.items()}
    assert modes == {"select_mics": "continue", "autopick": "continue", "extract": "continue",
                     "class2d": "new", "select_parts": "new", "inimodel3d": "new",
                     "refine3d": "new"}
    forks = {e.input: (e.bool_var, e.output_if_true, e.output) for e in proc.edges if e.is_fork}
    assert forks == {"HAS_ctffind": ("has_ctffind", "select_mics", "WAIT"),
                     "HAS_mics_increased": ("has_larger_nr_mics", "SET_prev_nr_mics", "WAIT"),
                     "CHECK_do_3d": ("do_3d", "CHECK_iniref", "WAIT"),
                     "CHECK_iniref": ("has_iniref", "SET_myref_user", "inimodel3d")}
    assert jobs["select_mics"].options["select_label"] == "rlnCtfMaxResolution"
    assert jobs["select_mics"].options["select_maxval"] == "6"
    assert jobs["class2d"].options["nr_classes"] == "100"
    assert jobs["class2d"].options["do_grad"] == "Yes"
    assert jobs["class2d"].options["nr_iter_grad"] == "200"
    assert jobs["select_parts"].options["rank_threshold"] == "0.15"
    assert jobs["inimodel3d"].options["nr_classes"] == "3"
    assert proc.floats["min_nr_parts_3d"].value == 5000


def _proj_with(tmp_path, text: str, jobs=("step",)) -> Path:
    d = tmp_path / "Schemes" / "test"
    d.mkdir(parents=True)
    (d / "scheme.star").write_text(text)
    for j in jobs:
        (d / j).mkdir()
        (d / j / "job.star").write_text(RELION_JOB)
    return tmp_path


@pytest.mark.parametrize("old,new,expect", [
    ("  CHECK_it       step            1       WAIT    is_done",
     "  CHECK_it      nosuch            1       WAIT    is_done",
     "scheme test, table scheme_edges row 2 (CHECK_it -> nosuch): unknown node 'nosuch'"),
    ("bool=file_exists", "bool=frobnicate",
     "scheme test, table scheme_operators row 1 (CHECK_it): unknown operator type "
     "'bool=frobnicate'"),
    ("  CHECK_it bool=file_exists    is_done      where",
     "  CHECK_it bool=file_exists   wait_sec      where",
     "scheme test, table scheme_operators row 1 (CHECK_it): output 'wait_sec' must be a "
     "boolean variable (it is a float variable)"),
    ("      WAIT       wait  undefined   wait_sec",
     "      WAIT       wait  undefined      where",
     "scheme test, table scheme_operators row 2 (WAIT): input1 'where' must be a float "
     "variable or a number"),
    ("  wait_sec    45.000000    45.000000", "  wait_sec    lots    45.000000",
     "scheme test: table scheme_floats row 3: 'lots' is not a number"),
])
def test_validation_names_scheme_table_and_row(tmp_path, old, new, expect):
    assert old in RELION_SCHEME
    proj = _proj_with(tmp_path, RELION_SCHEME.replace(old, new))
    with pytest.raises(UserError) as exc:
        Scheme.load(proj, "test")
    assert expect in str(exc.value)


def test_validation_missing_job_star(tmp_path):
    proj = _proj_with(tmp_path, RELION_SCHEME, jobs=())
    with pytest.raises(UserError, match=r"table scheme_jobs row 1 \(step\): .*job.star is missing"):
        Scheme.load(proj, "test")


def test_validation_operator_cycle_without_wait(tmp_path):
    text = RELION_SCHEME.replace("      WAIT       wait  undefined   wait_sec  undefined",
                                 "      WAIT  float=set   wait_sec   wait_sec  undefined")
    text = text.replace("  CHECK_it       step            1       WAIT    is_done",
                        "  CHECK_it       WAIT            0  undefined  undefined")
    proj = _proj_with(tmp_path, text)
    with pytest.raises(UserError, match=r"scheme test, table scheme_edges: the operators "
                                        r"CHECK_it -> WAIT -> CHECK_it form a loop"):
        Scheme.load(proj, "test")


@pytest.mark.parametrize("supported", [True, False])
def test_atomic_write_by_exchange_or_rename(tmp_path, monkeypatch, supported):
    if not supported:
        monkeypatch.setattr(starfmt, "_EXCHANGE", [None])
    target = tmp_path / "scheme.star"
    starfmt.atomic_write(target, "one\n", exchange=True)  # first write: plain rename
    assert target.read_text() == "one\n"
    inode = target.stat().st_ino
    starfmt.atomic_write(target, "two\n", exchange=True)
    assert target.read_text() == "two\n" and target.stat().st_ino != inode
    prev = tmp_path / ".scheme.star.prev"
    assert prev.exists() == supported
    if supported:
        assert prev.read_text() == "one\n"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == \
        ["scheme.star"]
