"""Confirmed session settings -> scheme variables and job options (RELION 4's relion_it idea).

:func:`settings_to_options` turns a :class:`ProcessingSettings` into relion_it-style keys:
``<scheme>__<job>__<option>`` for a job.star option (``prep__importmovies__angpix``) and
``<scheme>__<variable>`` for a scheme variable (``proc__min_nr_parts_3d``).
:func:`apply_settings` writes them into a project's ``Schemes/``.

Box-size rules (as relion_it): the extraction box is the particle diameter in pixels x 1.5
rounded up to an even number; the down-scaled box is the smallest of
:data:`GOOD_BOX_SIZES` whose pixel size is below 3.75 A (no down-scaling when the box is
already that small); the mask diameter is 1.1 x the particle diameter. Super-resolution
movies are binned by 2 in motion correction, so later pixel sizes are twice the movie's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.errors import UserError
from app.schemes.model import float_text
from compute.extract import MAX_SMALL_PIXEL_A  # noqa: F401  (re-exported for callers)
from compute.extract import SMALL_BOXES as GOOD_BOX_SIZES  # noqa: F401

MASK_FACTOR = 1.1


class ProcessingSettings(BaseModel):
    """What the operator confirmed in the setup form (units in the names)."""

    model_config = ConfigDict(extra="forbid")
    pixel_size_a: float = Field(gt=0, description="movie pixel size (super-resolution pixel if so)")
    voltage_kv: float = Field(gt=0)
    cs_mm: float = Field(ge=0)
    dose_per_frame_e_a2: float = Field(gt=0)
    particle_diameter_a: float = Field(gt=0)
    super_resolution: bool = False
    gain_reference: Path | None = None
    gain_rot: int = Field(0, ge=0, le=3)
    gain_flip: int = Field(0, ge=0, le=2)
    mtf: Path | None = None
    amplitude_contrast: float = Field(0.1, ge=0, le=1)
    eer_grouping: int | None = Field(None, gt=0)
    movies_glob: str = "Movies/*.tiff"
    symmetry: str = "C1"
    picker: Literal["log", "topaz"] = "log"
    topaz_model: Path | None = None
    min_particles_3d: int = Field(5000, ge=0)
    rank_threshold: float = Field(0.15, ge=0, le=1)
    max_ctf_resolution_a: float = Field(6.0, gt=0)
    initial_model: Path | None = None
    executor: Literal["local", "slurm"] = "local"
    queue: str | None = None
    nr_threads: int = Field(1, ge=1)
    use_gpu: bool = False
    do_at_most: int = Field(50, ge=1)
    wait_sec: float = Field(180, ge=0)
    maxtime_hr: float = Field(48, gt=0)
    email: str | None = None


def micrograph_pixel_a(s: ProcessingSettings) -> float:
    return s.pixel_size_a * (2.0 if s.super_resolution else 1.0)


def box_sizes(diameter_a: float, angpix_a: float) -> tuple[int, int | None]:
    """(extraction box in pixels, down-scaled box or None when no down-scaling is needed).

    The rule itself lives in :func:`compute.extract.box_sizes` (one copy for the extract job,
    this mapping and the GUI's live display).
    """
    from compute.errors import ComputeError
    from compute.extract import box_sizes as _rule

    try:
        b = _rule(diameter_a, angpix_a)
    except ComputeError as exc:
        raise UserError(str(exc)) from None
    return b.box_px, (b.small_box_px if b.small_box_px < b.box_px else None)


def _yn(v: bool) -> str:
    return "Yes" if v else "No"


def settings_to_options(s: ProcessingSettings) -> dict[str, str]:
    """relion_it-style keys -> text values for job options and scheme variables."""
    mic_a = micrograph_pixel_a(s)
    box, small = box_sizes(s.particle_diameter_a, mic_a)
    mask = MASK_FACTOR * s.particle_diameter_a
    queue = _yn(s.executor == "slurm")
    o: dict[str, str] = {
        # scheme variables
        "prep__do_at_most": str(s.do_at_most),
        "prep__wait_sec": float_text(s.wait_sec),
        "prep__maxtime_hr": float_text(s.maxtime_hr),
        "proc__wait_sec": float_text(s.wait_sec),
        "proc__maxtime_hr": float_text(s.maxtime_hr),
        "proc__min_nr_parts_3d": str(s.min_particles_3d),
        "proc__do_log": "true" if s.picker == "log" else "false",
        "proc__iniref": str(s.initial_model) if s.initial_model else "None",
        # import
        "prep__importmovies__fn_in_raw": s.movies_glob,
        "prep__importmovies__angpix": float_text(s.pixel_size_a),
        "prep__importmovies__kV": float_text(s.voltage_kv),
        "prep__importmovies__Cs": float_text(s.cs_mm),
        "prep__importmovies__Q0": float_text(s.amplitude_contrast),
        "prep__importmovies__fn_mtf": str(s.mtf) if s.mtf else "",
        # motion correction
        "prep__motioncorr__dose_per_frame": float_text(s.dose_per_frame_e_a2),
        "prep__motioncorr__bin_factor": "2" if s.super_resolution else "1",
        "prep__motioncorr__fn_gain_ref": str(s.gain_reference) if s.gain_reference else "",
        "prep__motioncorr__gain_rot": str(s.gain_rot),
        "prep__motioncorr__gain_flip": str(s.gain_flip),
        "prep__motioncorr__eer_grouping": str(s.eer_grouping or 32),
        # selection of micrographs
        "proc__select_mics__select_maxval": float_text(s.max_ctf_resolution_a),
        # picking
        "proc__autopick__log_diam_min": float_text(round(0.8 * s.particle_diameter_a, 1)),
        "proc__autopick__log_diam_max": float_text(round(1.1 * s.particle_diameter_a, 1)),
        "proc__autopick__topaz_particle_diameter": float_text(s.particle_diameter_a),
        "proc__autopick__topaz_model": str(s.topaz_model) if s.topaz_model else "",
        # extraction
        "proc__extract__extract_size": str(box),
        "proc__extract__do_rescale": _yn(small is not None),
        "proc__extract__rescale": str(small if small is not None else box),
        # classification, ranking, 3D
        "proc__class2d__particle_diameter": float_text(round(mask, 1)),
        "proc__select_parts__rank_threshold": float_text(s.rank_threshold),
        "proc__inimodel3d__particle_diameter": float_text(round(mask, 1)),
        "proc__inimodel3d__sym_name": s.symmetry,
        "proc__refine3d__particle_diameter": float_text(round(mask, 1)),
        "proc__refine3d__sym_name": s.symmetry,
    }
    if s.email:
        o["prep__email"] = s.email
        o["proc__email"] = s.email
    # execution: every job
    for job in ("importmovies", "motioncorr", "ctffind"):
        o[f"prep__{job}__do_queue"] = queue
        if s.queue:
            o[f"prep__{job}__queuename"] = s.queue
    for job in ("select_mics", "autopick", "extract", "class2d", "select_parts", "inimodel3d",
                "refine3d"):
        o[f"proc__{job}__do_queue"] = queue
        if s.queue:
            o[f"proc__{job}__queuename"] = s.queue
    for scheme, job in (("prep", "motioncorr"), ("prep", "ctffind"), ("proc", "autopick"),
                        ("proc", "extract"), ("proc", "class2d"), ("proc", "inimodel3d"),
                        ("proc", "refine3d")):
        o[f"{scheme}__{job}__nr_threads"] = str(s.nr_threads)
    for job in ("class2d", "inimodel3d", "refine3d"):
        o[f"proc__{job}__use_gpu"] = _yn(s.use_gpu)
    return o


def apply_options(project: Path, options: dict[str, str]) -> None:
    """Write relion_it-style keys into ``<project>/Schemes``: variables (value and reset value)
    and job.star options. A key naming an unknown scheme, job or variable is an error."""
    from app.schemes.jobstar import read_job_star, write_job_star
    from app.schemes.model import Scheme, Var

    project = Path(project)
    schemes: dict[str, Scheme] = {}
    jobstars: dict[tuple[str, str], object] = {}
    for key, value in options.items():
        parts = key.split("__")
        if len(parts) not in (2, 3):
            raise UserError(f"setting {key!r}: expected scheme__variable or scheme__job__option")
        name = parts[0]
        if name not in schemes:
            schemes[name] = Scheme.load(project, name, validate=False)
        sch = schemes[name]
        if len(parts) == 2:
            var = parts[1]
            if sch.variable_kind(var) is None:
                if var != "email":  # the one optional variable (RELION's e-mail hook)
                    raise UserError(f"setting {key!r}: scheme {name} has no variable {var!r}")
                sch.strings[var] = Var(value, value)
            sch.set_variable(var, value, also_reset=True)
        else:
            job, opt = parts[1], parts[2]
            if job not in sch.jobs:
                raise UserError(f"setting {key!r}: scheme {name} has no job {job!r}")
            k = (name, job)
            if k not in jobstars:
                jobstars[k] = read_job_star(project / "Schemes" / name / job / "job.star")
            jobstars[k].options[opt] = value  # type: ignore[attr-defined]
    for (name, job), js in jobstars.items():
        write_job_star(project / "Schemes" / name / job / "job.star", js)  # type: ignore[arg-type]
    for sch in schemes.values():
        sch.save()


def apply_settings(project: Path, settings: ProcessingSettings) -> dict[str, str]:
    """Apply :func:`settings_to_options` to a project's schemes; returns the keys applied."""
    opts = settings_to_options(settings)
    apply_options(project, opts)
    return opts
