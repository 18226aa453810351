"""Site and project settings (TOML, validated with pydantic).

Site settings live in ``<user config dir>/scopeside/config.toml`` (platformdirs);
a project may override any of them in ``<project>/scopeside.toml``. Microscope
and detector tables are in :mod:`metadata.config` (same TOML file, sections
``[microscopes.*]`` / ``[detectors.*]``); this module holds the rest.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import UserError

CONFIG_ENV = "SCOPESIDE_CONFIG"


class ExecutorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["local", "slurm"] = "local"
    slurm_template: Path | None = Field(None, description="sbatch template with XXXcommandXXX etc.")
    queue: str = "gpu"
    extra1: str = ""
    extra2: str = ""
    max_parallel_jobs: int = Field(2, ge=1, le=64)


class PathSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sessions_root: Path | None = Field(None, description="where EPU/SerialEM sessions appear")
    projects_root: Path | None = Field(None, description="where new projects are made")
    movies_root: Path | None = Field(None, description="EPU movie storage root, if separate")
    #: Windows prefix (as EPU records it) -> local mount point
    path_map: dict[str, Path] = Field(default_factory=dict)


class ComputeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: Literal["auto", "cpu", "gpu"] = "auto"
    threads: int | None = Field(None, ge=1, le=1024)


class WatchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    polling: bool = Field(False, description="poll instead of inotify (network mounts)")
    poll_interval_s: float = Field(5.0, gt=0)
    stable_s: float = Field(10.0, ge=0, description="size unchanged this long = movie complete")


class Settings(BaseModel):
    """Everything that is not acquisition metadata. Unknown keys are errors (typos show)."""

    model_config = ConfigDict(extra="forbid")
    executor: ExecutorSettings = ExecutorSettings()
    paths: PathSettings = PathSettings()
    compute: ComputeSettings = ComputeSettings()
    watch: WatchSettings = WatchSettings()
    #: microscopes / microscope_models / detectors tables are validated by metadata.config
    microscopes: dict[str, Any] = Field(default_factory=dict)
    microscope_models: dict[str, Any] = Field(default_factory=dict)
    detectors: dict[str, Any] = Field(default_factory=dict)


def site_config_path() -> Path:
    import os

    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return Path(platformdirs.user_config_dir("scopeside", appauthor=False)) / "config.toml"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid TOML: not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_settings(project_dir: Path | None = None, site_path: Path | None = None) -> Settings:
    """Site settings merged with the project's ``scopeside.toml``; errors name key and file."""
    site = site_path or site_config_path()
    data = _read_toml(site)
    sources = [site]
    if project_dir is not None:
        proj = Path(project_dir) / "scopeside.toml"
        data = _merge(data, _read_toml(proj))
        sources.append(proj)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        where = " or ".join(str(s) for s in sources if s.exists()) or str(sources[0])
        raise UserError(f"{where}: setting {key!r}: {first['msg']}") from None
