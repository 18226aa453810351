"""RELION-4-compatible Schemes: scheme.star/job.star model, operators, the schemer loop (no Qt).

The public API (see :mod:`app.schemes.api` and docs/schemes.md)::

    from app.schemes import Scheme, Schemer, status, abort, reset, set_variable, \
        set_job_option, set_current_node, create_project, ProcessingSettings

Names are resolved lazily so that importing :mod:`app.schemes.jobstar` (done by every job)
stays cheap.
"""

from __future__ import annotations

_EXPORTS = {
    "Scheme": "app.schemes.model",
    "Schemer": "app.schemes.schemer",
    "RunResult": "app.schemes.schemer",
    "Event": "app.schemes.schemer",
    "status": "app.schemes.api",
    "abort": "app.schemes.api",
    "reset": "app.schemes.api",
    "set_variable": "app.schemes.api",
    "set_job_option": "app.schemes.api",
    "set_current_node": "app.schemes.api",
    "unlock": "app.schemes.api",
    "create_project": "app.schemes.api",
    "ProcessingSettings": "app.schemes.relion_it",
    "settings_to_options": "app.schemes.relion_it",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'app.schemes' has no attribute {name!r}")
