"""The shipped ``prep`` and ``proc`` schemes, built in code (the files in resources/schemes are
written by :func:`write_templates`; a test checks they have not drifted apart).

Same shape as RELION 4's own prep/proc (see docs/schemes.md for the graphs). Values that depend
on the session (pixel size, diameter, box sizes...) are placeholders that
:mod:`app.schemes.relion_it` fills in when a project is created.
"""

from __future__ import annotations

from pathlib import Path

from app.schemes.jobstar import JobStar, write_job_star
from app.schemes.model import Edge, Operator, Scheme, SchemeJob, Var

QUEUE = {"do_queue": "No", "queuename": "openmpi", "qsub": "sbatch", "qsubscript": "",
         "min_dedicated": "1", "nr_mpi": "1", "other_args": ""}


def _job(label: str, **opts: str) -> JobStar:
    merged = {**QUEUE, **{k: str(v) for k, v in opts.items()}}
    return JobStar(label, False, False, dict(sorted(merged.items())))


def _chain(*nodes: str) -> list[Edge]:
    return [Edge(a, b) for a, b in zip(nodes, nodes[1:])]


def build_prep() -> tuple[Scheme, dict[str, JobStar]]:
    s = Scheme("prep", current_node="WAIT", scheme_dir_name="Schemes/prep/")
    s.floats = {"do_at_most": Var(50.0, 50.0), "maxtime_hr": Var(48.0, 48.0),
                "wait_sec": Var(180.0, 180.0)}
    s.operators = {"WAIT": Operator("wait", "undefined", "wait_sec", "undefined"),
                   "EXIT_maxtime": Operator("exit_maxtime", "undefined", "maxtime_hr",
                                            "undefined")}
    s.jobs = {j: SchemeJob(j, "continue", False) for j in ("importmovies", "motioncorr",
                                                            "ctffind")}
    s.edges = _chain("WAIT", "EXIT_maxtime", "importmovies", "motioncorr", "ctffind", "WAIT")
    jobs = {
        "importmovies": _job(
            "relion.import", fn_in_raw="Movies/*.tiff", is_multiframe="Yes",
            optics_group_name="opticsGroup1", fn_mtf="", angpix="1.0", kV="300", Cs="2.7",
            Q0="0.1", beamtilt_x="0", beamtilt_y="0"),
        "motioncorr": _job(
            "relion.motioncorr", input_star_mics="Schemes/prep/importmovies/movies.star",
            first_frame_sum="1", last_frame_sum="-1", dose_per_frame="1", pre_exposure="0",
            eer_grouping="32", do_float16="Yes", do_dose_weighting="Yes", do_save_noDW="No",
            do_save_ps="Yes", group_for_ps="4", bfactor="150", group_frames="1",
            bin_factor="1", fn_gain_ref="", gain_rot="0", gain_flip="0", fn_defect="",
            patch_x="5", patch_y="5", nr_threads="1",
            other_args="--do_at_most $$do_at_most"),
        "ctffind": _job(
            "relion.ctffind", input_star_mics="Schemes/prep/motioncorr/corrected_micrographs.star",
            use_noDW="No", do_phaseshift="No", phase_min="0", phase_max="180", phase_step="10",
            dast="100", box="512", resmin="30", resmax="5", dfmin="5000", dfmax="50000",
            dfstep="500", use_given_ps="Yes", nr_threads="1"),
    }
    return s, jobs


def build_proc() -> tuple[Scheme, dict[str, JobStar]]:
    s = Scheme("proc", current_node="WAIT", scheme_dir_name="Schemes/proc/")
    s.floats = {"current_nr_mics": Var(0.0, 0.0), "current_nr_parts": Var(0.0, 0.0),
                "maxtime_hr": Var(48.0, 48.0), "min_nr_parts_3d": Var(5000.0, 5000.0),
                "prev_nr_mics": Var(0.0, 0.0), "wait_sec": Var(180.0, 180.0)}
    s.bools = {k: Var(False, False) for k in ("do_3d", "do_topaz", "has_ctffind", "has_iniref",
                                              "has_larger_nr_mics")}
    s.bools["do_log"] = Var(True, True)
    s.strings = {
        "ctffind_mics": Var("Schemes/prep/ctffind/micrographs_ctf.star",
                            "Schemes/prep/ctffind/micrographs_ctf.star"),
        "inimodel_output": Var("Schemes/proc/inimodel3d/initial_model.mrc",
                               "Schemes/proc/inimodel3d/initial_model.mrc"),
        "iniref": Var("None", "None"),
        "micrographs": Var("micrographs", "micrographs"),
        "myref": Var("undefined", "undefined"),
        "particles": Var("particles", "particles"),
        "selected_mics": Var("Schemes/proc/select_mics/micrographs.star",
                             "Schemes/proc/select_mics/micrographs.star"),
        "selected_parts": Var("Schemes/proc/select_parts/particles.star",
                              "Schemes/proc/select_parts/particles.star"),
    }
    u = "undefined"
    s.operators = {
        "WAIT": Operator("wait", u, "wait_sec", u),
        "EXIT_maxtime": Operator("exit_maxtime", u, "maxtime_hr", u),
        "HAS_ctffind": Operator("bool=file_exists", "has_ctffind", "ctffind_mics", u),
        "COUNT_mics": Operator("float=count_images", "current_nr_mics", "selected_mics",
                               "micrographs"),
        "HAS_mics_increased": Operator("bool=gt", "has_larger_nr_mics", "current_nr_mics",
                                       "prev_nr_mics"),
        "SET_prev_nr_mics": Operator("float=set", "prev_nr_mics", "current_nr_mics", u),
        "SET_do_topaz": Operator("bool=not", "do_topaz", "do_log", u),
        "COUNT_parts": Operator("float=count_images", "current_nr_parts", "selected_parts",
                                "particles"),
        "CHECK_do_3d": Operator("bool=ge", "do_3d", "current_nr_parts", "min_nr_parts_3d"),
        "CHECK_iniref": Operator("bool=file_exists", "has_iniref", "iniref", u),
        "SET_myref_user": Operator("string=set", "myref", "iniref", u),
        "SET_myref_inimodel": Operator("string=set", "myref", "inimodel_output", u),
    }
    s.jobs = {j: SchemeJob(j, m, False) for j, m in (
        ("select_mics", "continue"), ("autopick", "continue"), ("extract", "continue"),
        ("class2d", "new"), ("select_parts", "new"), ("inimodel3d", "new"),
        ("refine3d", "new"))}
    s.edges = [
        *_chain("WAIT", "EXIT_maxtime", "HAS_ctffind"),
        Edge("HAS_ctffind", "WAIT", True, "select_mics", "has_ctffind"),
        *_chain("select_mics", "COUNT_mics", "HAS_mics_increased"),
        Edge("HAS_mics_increased", "WAIT", True, "SET_prev_nr_mics", "has_larger_nr_mics"),
        *_chain("SET_prev_nr_mics", "SET_do_topaz", "autopick", "extract", "class2d",
                "select_parts", "COUNT_parts", "CHECK_do_3d"),
        Edge("CHECK_do_3d", "WAIT", True, "CHECK_iniref", "do_3d"),
        Edge("CHECK_iniref", "inimodel3d", True, "SET_myref_user", "has_iniref"),
        *_chain("inimodel3d", "SET_myref_inimodel", "refine3d"),
        *_chain("SET_myref_user", "refine3d"),
        *_chain("refine3d", "WAIT"),
    ]
    jobs = {
        "select_mics": _job(
            "relion.select", fn_mic="Schemes/prep/ctffind/micrographs_ctf.star", fn_data="",
            fn_model="", do_select_values="Yes", select_label="rlnCtfMaxResolution",
            select_minval="-9999", select_maxval="6", do_class_ranker="No",
            rank_threshold="0.5", select_nr_parts="-1", select_nr_classes="-1"),
        "autopick": _job(
            "relion.autopick", fn_input_autopick="Schemes/proc/select_mics/micrographs.star",
            do_log="$$do_log", log_diam_min="150", log_diam_max="180", log_invert="No",
            log_maxres="20", log_adjust_thr="0", log_upper_thr="999", do_topaz="$$do_topaz",
            topaz_model="", topaz_particle_diameter="150", topaz_nr_particles="300",
            nr_threads="1"),
        "extract": _job(
            "relion.extract", star_mics="Schemes/proc/select_mics/micrographs.star",
            coords_suffix="Schemes/proc/autopick/autopick.star", extract_size="256",
            do_rescale="Yes", rescale="64", do_invert="Yes", do_norm="Yes", bg_diameter="-1",
            white_dust="-1", black_dust="-1", do_float16="Yes", do_fom_threshold="No",
            minimum_pick_fom="0", nr_threads="1"),
        "class2d": _job(
            "relion.class2d", fn_img="Schemes/proc/extract/particles.star", nr_classes="100",
            tau_fudge="2", do_ctf_correction="Yes", ctf_intact_first_peak="No",
            particle_diameter="200", do_zero_mask="Yes", highres_limit="-1", do_em="No",
            nr_iter_em="25", do_grad="Yes", nr_iter_grad="200", psi_sampling="6",
            offset_range="5", offset_step="1", nr_threads="1", gpu_ids="", use_gpu="No",
            class_inactivity_threshold="0.1"),
        "select_parts": _job(
            "relion.select", fn_mic="", fn_data="",
            fn_model="Schemes/proc/class2d/run_it200_optimiser.star", do_select_values="No",
            select_label="rlnCtfMaxResolution", select_minval="-9999", select_maxval="9999",
            do_class_ranker="Yes", rank_threshold="0.15", select_nr_parts="-1",
            select_nr_classes="-1"),
        "inimodel3d": _job(
            "relion.initialmodel", fn_img="Schemes/proc/select_parts/particles.star",
            nr_classes="3", nr_iter="200", tau_fudge="4", sym_name="C1",
            particle_diameter="200", do_solvent="Yes", offset_range="6", offset_step="2",
            sampling="15 degrees", nr_threads="1", gpu_ids="", use_gpu="No"),
        "refine3d": _job(
            "relion.refine3d", fn_img="Schemes/proc/select_parts/particles.star",
            fn_ref="$$myref", fn_mask="", ref_correct_greyscale="No", ini_high="40",
            sym_name="C1", particle_diameter="200", do_zero_mask="Yes",
            sampling="7.5 degrees", offset_range="5", offset_step="1",
            auto_local_sampling="1.8 degrees", do_solvent_fsc="No", nr_threads="1",
            gpu_ids="", use_gpu="No"),
    }
    return s, jobs


def write_scheme(dest: Path, scheme: Scheme, jobs: dict[str, JobStar]) -> None:
    """Write ``dest/scheme.star`` and ``dest/<job>/job.star``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    scheme.save(dest / "scheme.star")
    for name, js in jobs.items():
        (dest / name).mkdir(exist_ok=True)
        write_job_star(dest / name / "job.star", js)


def write_templates(root: Path) -> None:
    """Write both shipped schemes under ``root`` (``root/prep``, ``root/proc``)."""
    write_scheme(Path(root) / "prep", *build_prep())
    write_scheme(Path(root) / "proc", *build_proc())
