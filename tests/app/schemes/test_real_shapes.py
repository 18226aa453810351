"""Shapes found in real public RELION files, rebuilt here from scratch: a RELION 3.1
default_pipeline.star (integer types), a RELION 5 scheme.star (``# version 50001``, a job
with an empty mode), and schemes holding job types scopeside does not implement."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from app.errors import UserError
from app.executors.inline import InlineExecutor
from app.schemes import pipeline, starfmt
from app.schemes.jobstar import JobStar
from app.schemes.model import Scheme
from app.schemes.pipeline import Pipeline
from app.schemes.schemer import Schemer
from app.schemes.templates import build_prep, build_proc, write_scheme
from tests.app.schemes.helpers import double_log, make_scheme

U = "undefined"


def _loop(name: str, labels: list[str], rows: list[str], version: int = 30001) -> str:
    head = "".join(f"_{lab} #{i} \n" for i, lab in enumerate(labels))  # RELION 3.1: #0...
    return (f"\n# version {version}\n\ndata_{name}\n\nloop_ \n{head}"
            + "".join(r + " \n" for r in rows) + " \n")


def relion31_pipeline(processes: list[str], nodes: list[str]) -> str:
    """A default_pipeline.star as RELION 3.1 writes it: integer type and status columns."""
    return ("\n# version 30001\n\ndata_pipeline_general\n\n"
            "_rlnPipeLineJobCounter                       7\n \n"
            + _loop("pipeline_processes", ["rlnPipeLineProcessName", "rlnPipeLineProcessAlias",
                                           "rlnPipeLineProcessType", "rlnPipeLineProcessStatus"],
                    processes)
            + _loop("pipeline_nodes", ["rlnPipeLineNodeName", "rlnPipeLineNodeType"], nodes)
            + _loop("pipeline_input_edges", ["rlnPipeLineEdgeFromNode", "rlnPipeLineEdgeProcess"],
                    ["Import/job001/movies.star MotionCorr/job002/"])
            + _loop("pipeline_output_edges", ["rlnPipeLineEdgeProcess", "rlnPipeLineEdgeToNode"],
                    ["Import/job001/ Import/job001/movies.star"]))


RELION31 = relion31_pipeline(
    ["Import/job001/ Import/movies/            0            2",
     "MotionCorr/job002/       None            1            2",
     "Class3D/job003/ Class3D/first/            9            3",
     "PostProcess/job004/       None           15            4",
     "CtfFind/job005/       None            2            0",
     "External/job006/       None           99            1"],
    ["Import/job001/movies.star            0",
     "MotionCorr/job002/corrected_micrographs.star            1",
     "MotionCorr/job002/logfile.pdf           13",
     "Class3D/job003/run_it025_data.star            3",
     "Class3D/job003/run_it025_class001.mrc            6",
     "PostProcess/job004/postprocess.star           14"])


# -- defect 1: RELION 3.1 pipeline ------------------------------------------------------------

def test_relion31_pipeline_is_converted_and_the_next_write_keeps_types_and_statuses(
        tmp_path, caplog):
    (tmp_path / pipeline.PIPELINE).write_text(RELION31)
    with caplog.at_level(logging.WARNING, logger="app.schemes.pipeline"):
        p = pipeline.load(tmp_path)
    assert [(q.name, q.alias, q.type_label, q.status) for q in p.processes] == [
        ("Import/job001/", "Import/movies/", "relion.import", "Succeeded"),
        ("MotionCorr/job002/", "None", "relion.motioncorr", "Succeeded"),
        ("Class3D/job003/", "Class3D/first/", "relion.class3d", "Failed"),
        ("PostProcess/job004/", "None", "relion.postprocess", "Aborted"),
        ("CtfFind/job005/", "None", "relion.ctffind", "Running"),
        ("External/job006/", "None", "relion.external", "Scheduled")]
    assert p.nodes == [
        ("Import/job001/movies.star", "MicrographMoviesData.star.relion", 1),
        ("MotionCorr/job002/corrected_micrographs.star", "MicrographsData.star.relion", 1),
        ("MotionCorr/job002/logfile.pdf", "LogFile.pdf.relion", 1),
        ("Class3D/job003/run_it025_data.star", "ParticlesData.star.relion", 1),
        ("Class3D/job003/run_it025_class001.mrc", "DensityMap.mrc", 1),
        ("PostProcess/job004/postprocess.star", "ProcessData.star.relion.postprocess", 1)]
    assert p.converted_from == "3.1"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "RELION 3.1 pipeline" in warnings[0]

    # what a scheme run does first: reserve a new job; the file is then RELION 4's format
    assert pipeline.new_process(tmp_path, "Class2D", "relion.class2d") == "Class2D/job007/"
    text = (tmp_path / pipeline.PIPELINE).read_text()
    blocks = starfmt.parse(text)
    assert blocks["pipeline_processes"].labels == [
        "rlnPipeLineProcessName", "rlnPipeLineProcessAlias", "rlnPipeLineProcessTypeLabel",
        "rlnPipeLineProcessStatusLabel"]
    assert blocks["pipeline_nodes"].labels == [
        "rlnPipeLineNodeName", "rlnPipeLineNodeTypeLabel", "rlnPipeLineNodeTypeLabelDepth"]
    assert "Import/job001/ Import/movies/ relion.import Succeeded" in " ".join(text.split())
    again = Pipeline.from_text(text)
    assert again.converted_from == ""
    assert [(q.type_label, q.status) for q in again.processes] == [
        (q.type_label, q.status) for q in p.processes] + [("relion.class2d", "Running")]
    assert again.nodes == p.nodes
    assert again.input_edges == p.input_edges and again.output_edges == p.output_edges


def test_relion31_unknown_numbers_are_kept_recognisable_and_warned(caplog):
    text = relion31_pipeline(
        ["Sort/job001/       None            6            2",
         "Class3D/job002/       None           77            2",
         "Import/job003/       None            0            9"],
        ["Sort/job001/sorted.star            4",
         "Import/job003/movies.star            0"])
    with caplog.at_level(logging.WARNING, logger="app.schemes.pipeline"):
        p = Pipeline.from_text(text)
    assert [(q.type_label, q.status) for q in p.processes] == [
        ("6", "Succeeded"),            # no such type, no known folder: the number is kept
        ("relion.class3d", "Succeeded"),  # unknown number, RELION folder Class3D/
        ("relion.import", "Failed")]   # RELION 4 cannot write an unknown status
    assert p.nodes[0][1] == "4" and p.nodes[1][1] == "MicrographMoviesData.star.relion"
    msg = caplog.records[-1].getMessage()
    assert "process Sort/job001/ type 6 (kept as '6')" in msg
    assert "process Class3D/job002/ type 77 (labelled relion.class3d from its folder)" in msg
    assert "process Import/job003/ status 9 (recorded as Failed)" in msg
    assert "node Sort/job001/sorted.star type 4 (kept as '4')" in msg


def test_pipeline_without_type_columns_is_refused():
    text = ("\n# version 30001\n\ndata_pipeline_processes\n\nloop_ \n"
            "_rlnPipeLineProcessName #1 \n_rlnPipeLineProcessAlias #2 \n"
            "Import/job001/ None \n \n")
    with pytest.raises(UserError, match="neither _rlnPipeLineProcessTypeLabel"):
        Pipeline.from_text(text, "P/default_pipeline.star")


def test_relion5_pipeline_is_written_back_as_30001_so_relion5_converts_our_labels():
    # RELION 5 converts node labels only in files below version 50001 (PipeLine::read),
    # and the nodes we add carry RELION 4 labels: the version line must stay ours
    text = ("\n# version 50001\n\ndata_pipeline_general\n\n"
            "_rlnPipeLineJobCounter                       2\n \n"
            + _loop("pipeline_processes", ["rlnPipeLineProcessName", "rlnPipeLineProcessAlias",
                                           "rlnPipeLineProcessTypeLabel",
                                           "rlnPipeLineProcessStatusLabel"],
                    ["Import/job001/ None relion.import.movies Succeeded"], 50001))
    out = Pipeline.from_text(text).to_text()
    assert "# version 50001" not in out and "# version 30001" in out


# -- RELION 5 scheme.star: version line and an unused job with an empty mode ------------------

AMY_LIKE = (
    "\n# version 50001\n\ndata_scheme_general\n\n"
    "_rlnSchemeName                       Schemes/amy/\n"
    "_rlnSchemeCurrentNodeName            WAIT\n \n"
    "\n# version 50001\n\ndata_scheme_floats\n\nloop_ \n"
    "_rlnSchemeFloatVariableName #1 \n_rlnSchemeFloatVariableValue #2 \n"
    "_rlnSchemeFloatVariableResetValue #3 \n"
    "  wait_sec    45.000000    45.000000 \n \n"
    "\n# version 50001\n\ndata_scheme_operators\n\nloop_ \n"
    "_rlnSchemeOperatorName #1 \n_rlnSchemeOperatorType #2 \n_rlnSchemeOperatorOutput #3 \n"
    "_rlnSchemeOperatorInput1 #4 \n_rlnSchemeOperatorInput2 #5 \n"
    "      WAIT       wait  undefined   wait_sec  undefined \n \n"
    "\n# version 50001\n\ndata_scheme_jobs\n\nloop_ \n"
    "_rlnSchemeJobNameOriginal #1 \n_rlnSchemeJobName #2 \n_rlnSchemeJobMode #3 \n"
    "_rlnSchemeJobHasStarted #4 \n"
    "    import     import   continue            0 \n"
    "importmovies importmovies         \"\"            0 \n \n"
    "\n# version 50001\n\ndata_scheme_edges\n\nloop_ \n"
    "_rlnSchemeEdgeInputNodeName #1 \n_rlnSchemeEdgeOutputNodeName #2 \n"
    "_rlnSchemeEdgeIsFork #3 \n_rlnSchemeEdgeOutputNodeNameIfTrue #4 \n"
    "_rlnSchemeEdgeBooleanVariable #5 \n"
    "      WAIT     import            0  undefined  undefined \n"
    "    import       WAIT            0  undefined  undefined \n \n")


def _amy_project(tmp_path: Path, text: str = AMY_LIKE) -> Path:
    d = tmp_path / "Schemes" / "amy"
    d.mkdir(parents=True)
    (d / "scheme.star").write_text(text)
    for job in ("import", "importmovies"):
        (d / job).mkdir()
        (d / job / "job.star").write_text(
            "\n# version 50001\n\ndata_job\n\n_rlnJobTypeLabel             relion.import.movies\n"
            "_rlnJobIsContinue                       0\n_rlnJobIsTomo                           0\n"
            " \n")
    return tmp_path


def test_relion5_scheme_keeps_its_version_line():
    sch = Scheme.from_text(AMY_LIKE, "Schemes/amy/scheme.star")
    assert sch.star_version == 50001
    assert sch.to_text() == AMY_LIKE          # byte for byte, `""` mode included
    sch.current_node = "import"              # a step of the schemer
    out = sch.to_text()
    assert out.count("# version 50001") == 5 and "30001" not in out


def test_unreached_job_with_empty_mode_is_accepted_with_a_warning(tmp_path, caplog):
    proj = _amy_project(tmp_path)
    with caplog.at_level(logging.WARNING, logger="app.schemes.model"):
        sch = Scheme.load(proj, "amy")
    assert sch.jobs["importmovies"].mode == "" and not sch.jobs["importmovies"].mode_is_known
    assert any("row 2 (importmovies): mode '' is neither 'new' nor 'continue'; no edge "
               "reaches this job" in r.getMessage() for r in caplog.records)


def test_reached_job_with_empty_mode_is_refused(tmp_path):
    text = AMY_LIKE.replace("    import       WAIT            0", "    import importmovies       "
                            "     0")
    proj = _amy_project(tmp_path, text)
    with pytest.raises(UserError, match=r"scheme amy, table scheme_jobs row 2 \(importmovies\): "
                                        r"mode '' is neither 'new' nor 'continue', and the "
                                        r"scheme reaches this job"):
        Scheme.load(proj, "amy")


def test_scheme_with_an_unused_empty_mode_job_runs(project):
    make_scheme(project, "t",
                operators={"END": ("exit", U, U, U)},
                jobs={"job": ("new", "test.quick", {}), "unused": ("", "test.quick", {})},
                edges=[("job", "END")], validate=False)
    res = Schemer(project, "t", InlineExecutor(), poll_s=0.05).run()
    assert res.state == "finished", res.message
    assert res.visited == ["job", "END"]
    assert len(double_log(project)) == 1
    again = Scheme.load(project, "t", validate=False)
    assert again.jobs["unused"].mode == ""    # written back as RELION wrote it


# -- defect 8: job types checked at validation ------------------------------------------------

def _typed_scheme(tmp_path: Path, labels: dict[str, str], edges: list[tuple[str, str]]) -> Path:
    sch = Scheme("t", scheme_dir_name="Schemes/t/")
    from app.schemes.model import Edge, SchemeJob

    sch.jobs = {k: SchemeJob(k, "continue", False) for k in labels}
    sch.edges = [Edge(a, b) for a, b in edges]
    sch.current_node = edges[0][0]
    write_scheme(tmp_path / "Schemes" / "t", sch,
                 {k: JobStar(lab, False, False, {}) for k, lab in labels.items()})
    return tmp_path


def test_reachable_unimplemented_job_types_are_refused_in_one_message(tmp_path):
    proj = _typed_scheme(tmp_path, {"class2d": "relion.class2d", "class3d": "relion.class3d",
                                    "post": "relion.postprocess"},
                         [("class2d", "class3d"), ("class3d", "post"), ("post", "class2d")])
    with pytest.raises(UserError) as exc:
        Scheme.load(proj, "t")
    msg = str(exc.value)
    assert msg.startswith("scheme t: the scheme reaches 2 job(s) whose type scopeside does "
                          "not implement: class3d (relion.class3d), post (relion.postprocess).")
    assert "relion.class2d (" not in msg and "Implemented types: relion.import" in msg
    Scheme.load(proj, "t", validate=False)    # still readable, e.g. for --status


def test_unreachable_unimplemented_job_type_only_warns(tmp_path, caplog):
    proj = _typed_scheme(tmp_path, {"class2d": "relion.class2d", "ctf": "relion.ctffind",
                                    "mask": "relion.maskcreate"},
                         [("class2d", "ctf"), ("mask", "class2d"), ("ctf", "class2d")])
    # "mask" -> class2d is an edge, but nothing leads to mask: never run
    with caplog.at_level(logging.WARNING, logger="app.schemes.model"):
        Scheme.load(proj, "t")
    assert any("job type not implemented by scopeside for mask (relion.maskcreate); no edge "
               "reaches" in r.getMessage() for r in caplog.records)


def test_only_the_last_edge_leaving_a_node_counts_for_reachability(tmp_path):
    # as next_node: the earlier edge class2d -> class3d is never taken
    proj = _typed_scheme(tmp_path, {"class2d": "relion.class2d", "class3d": "relion.class3d",
                                    "ctf": "relion.ctffind"},
                         [("class2d", "class3d"), ("class2d", "ctf"), ("ctf", "class2d")])
    assert "class3d" not in Scheme.load(proj, "t").reachable_nodes()


@pytest.mark.parametrize("build", [build_prep, build_proc])
def test_relion_templates_validate_without_warnings(tmp_path, caplog, build):
    sch, jobs = build()
    write_scheme(tmp_path / "Schemes" / sch.name, sch, jobs)
    with caplog.at_level(logging.WARNING, logger="app.schemes.model"):
        loaded = Scheme.load(tmp_path, sch.name)
    assert set(jobs) <= loaded.reachable_nodes()
    assert caplog.records == []


def test_status_marks_an_unknown_mode_instead_of_a_blank(tmp_path, capsys):
    from app.cli import run
    from app.schemes import api

    proj = _amy_project(tmp_path)
    jobs = {j["name"]: j for j in api.status(proj, "amy")["jobs"]}
    assert jobs["importmovies"]["mode"] == "" and jobs["importmovies"]["mode_ok"] is False
    assert all(j["mode_ok"] for n, j in jobs.items() if n != "importmovies")
    assert run(["schemer", "--project", str(proj), "--scheme", "amy", "--status"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "importmovies" in ln)
    assert "''?" in line and "mode is neither new nor continue" in line
