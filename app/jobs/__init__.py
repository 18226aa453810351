"""Job types: RELION 4 type labels mapped to scopeside's implementations.

Each job module defines ``JOB``, a :class:`app.jobs.base.Job` subclass. A type
whose module does not exist yet resolves to a job that fails with a clear
"not implemented yet" reason, so a scheme stops and names it.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class JobType:
    name: str          # scopeside CLI name: `scopeside job NAME`
    label: str         # RELION 4 _rlnJobTypeLabel
    module: str        # implementation module (defines JOB)
    process_dir: str   # RELION output folder type, e.g. MotionCorr


JOB_TYPES: dict[str, JobType] = {
    t.name: t
    for t in [
        JobType("import", "relion.import", "app.jobs.importmovies", "Import"),
        JobType("motioncorr", "relion.motioncorr", "app.jobs.motioncorr", "MotionCorr"),
        JobType("ctffind", "relion.ctffind", "app.jobs.ctffind", "CtfFind"),
        JobType("select", "relion.select", "app.jobs.select", "Select"),
        JobType("autopick", "relion.autopick", "app.jobs.autopick", "AutoPick"),
        JobType("extract", "relion.extract", "app.jobs.extract", "Extract"),
        JobType("class2d", "relion.class2d", "app.jobs.class2d", "Class2D"),
        JobType("inimodel3d", "relion.initialmodel", "app.jobs.inimodel3d", "InitialModel"),
        JobType("refine3d", "relion.refine3d", "app.jobs.refine3d", "Refine3D"),
    ]
}

#: RELION 4/5 sub-type labels whose job scopeside does not do: refused by name, so a scheme
#: holding one fails at validation, not hours later. Other sub-types map to their base type:
#: ``relion.motioncorr.motioncor2`` / ``relion.ctffind.gctf`` run scopeside's own motion
#: correction / CTF estimation (same outputs), with a warning from the job's options.
UNSUPPORTED_SUBTYPES: dict[str, str] = {
    "relion.import.other": "importing references, masks, coordinates or half-maps",
    "relion.autopick.ref2d": "template picking with 2D references",
    "relion.autopick.ref3d": "template picking with projections of a 3D reference",
    "relion.autopick.topaz.train": "training a Topaz model",
    "relion.autopick.amypick": "amyloid picking (RELION 5)",
    "relion.extract.reextract": "re-extraction of refined particles",
    "relion.select.split": "splitting a STAR file into subsets",
    "relion.select.discard": "discarding images by their statistics",
    "relion.select.removeduplicates": "removing duplicate particles",
    "relion.select.interactive": "interactive selection",
}

#: Extra types (e.g. test doubles): SCOPESIDE_EXTRA_JOBS="label=module,label2=module2"
EXTRA_JOBS_ENV = "SCOPESIDE_EXTRA_JOBS"


def _extra_types() -> dict[str, JobType]:
    out: dict[str, JobType] = {}
    for item in filter(None, os.environ.get(EXTRA_JOBS_ENV, "").split(",")):
        label, _, module = item.partition("=")
        name = label.strip()
        base = ".".join(name.lower().split(".")[:2])
        builtin = next((t for t in JOB_TYPES.values() if t.label == base), None)
        folder = builtin.process_dir if builtin else name.split(".")[-1].capitalize()
        out[name] = JobType(name, name, module.strip(), folder)
    return out


def find_type(name_or_label: str) -> JobType:
    """Resolve a CLI name (``class2d``) or a RELION label (``relion.class2d``,
    ``relion.motioncorr.own``, ``relion.select.class2dauto``) to its :class:`JobType`."""
    from app.errors import UserError

    key = name_or_label.strip()
    extra = _extra_types()
    if key in extra:
        return extra[key]
    if key in JOB_TYPES:
        return JOB_TYPES[key]
    parts = key.lower().split(".")
    if key.lower() in UNSUPPORTED_SUBTYPES:
        raise UserError(f"job type {key}: {UNSUPPORTED_SUBTYPES[key.lower()]} is not supported "
                        "by scopeside; run this job in RELION")
    if len(parts) >= 2 and parts[0] == "relion":
        base = ".".join(parts[:2])
        for t in JOB_TYPES.values():
            if t.label == base:
                return t
    known = ", ".join(JOB_TYPES)
    raise UserError(f"unknown job type {name_or_label!r}; known types: {known}")


def load_job_class(jt: JobType):
    """The job class for a type; a failing placeholder when the module is not written yet."""
    from app.jobs.base import not_implemented_job

    try:
        mod = importlib.import_module(jt.module)
    except ModuleNotFoundError as exc:
        if exc.name == jt.module:
            return not_implemented_job(jt)
        raise
    return mod.JOB
