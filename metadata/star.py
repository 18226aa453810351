"""RELION STAR tables: a thin layer over :mod:`starfile` with RELION conventions.

- :func:`read_star` returns ``{block_name: DataFrame}`` (key/value blocks become one-row
  frames) and turns every failure into :class:`MetadataError` naming the file.
- :func:`write_star` writes atomically (temporary file, then rename) so a reader never sees
  half a file, with floats at full precision.
- :func:`particles_with_optics` merges the optics table into the particle rows (RELION 3.1+
  split layout), :func:`split_image_name` parses ``000012@Extract/job006/mic.mrcs``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import starfile

from metadata.errors import MetadataError

#: labels every RELION 4 optics table carries for particles
OPTICS_PARTICLE_LABELS = (
    "rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize", "rlnVoltage",
    "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize",
    "rlnImageDimensionality",
)


def read_star(path: str | Path, blocks: int | None = None) -> dict[str, pd.DataFrame]:
    """Read every data block of a STAR file as DataFrames (key/value blocks as one row)."""
    p = Path(path)
    if not p.is_file():
        raise MetadataError("STAR file not found" if not p.exists() else "not a file", p)
    try:
        data = starfile.read(p, read_n_blocks=blocks, always_dict=True)
    except Exception as exc:  # starfile raises assorted parser errors
        raise MetadataError(f"not a readable STAR file ({type(exc).__name__}: {exc})", p) from None
    out: dict[str, pd.DataFrame] = {}
    for name, block in data.items():
        if isinstance(block, pd.DataFrame):
            out[name] = block
        elif isinstance(block, Mapping):
            out[name] = pd.DataFrame({k: [v] for k, v in block.items()})
        else:  # pragma: no cover - starfile only returns the two kinds
            raise MetadataError(f"unexpected block {name!r}", p)
    return out


def read_table(path: str | Path, block: str) -> pd.DataFrame:
    """One named block; a missing block is a :class:`MetadataError` listing the blocks present."""
    data = read_star(path)
    if block not in data:
        have = ", ".join(data) or "none"
        raise MetadataError(f"no data_{block} table (tables present: {have})", path)
    return data[block]


def write_star(path: str | Path, blocks: Mapping[str, pd.DataFrame | Mapping],
               float_format: str = "%.6f") -> Path:
    """Write ``{name: DataFrame | dict}`` atomically; dict blocks are written as key/value."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    payload = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in blocks.items()}
    starfile.write(payload, tmp, float_format=float_format, sep=" ")
    os.replace(tmp, p)
    return p


def split_image_name(name: str) -> tuple[int, str]:
    """``"000012@stack.mrcs"`` -> ``(11, "stack.mrcs")`` (0-based index); a bare file is index 0."""
    s = str(name)
    if "@" in s:
        idx, _, f = s.partition("@")
        try:
            return int(idx) - 1, f
        except ValueError:
            raise MetadataError(f"bad image name {s!r} (expected N@file)") from None
    return 0, s


def join_image_name(index0: int, path: str | Path) -> str:
    """0-based index and stack path -> RELION's ``000012@stack.mrcs``."""
    return f"{index0 + 1:06d}@{path}"


def particles_with_optics(blocks: Mapping[str, pd.DataFrame], table: str = "particles",
                          path: str | Path | None = None) -> pd.DataFrame:
    """Particle (or micrograph) rows with their optics-group columns merged in.

    Works for RELION 3.1+ files (``data_optics`` + ``data_particles``) and for pre-3.1 files
    with a single table (returned as is).
    """
    if table not in blocks:
        if len(blocks) == 1:
            return next(iter(blocks.values())).copy()
        raise MetadataError(f"no data_{table} table", path)
    rows = blocks[table].copy()
    optics = blocks.get("optics")
    if optics is None or "rlnOpticsGroup" not in rows.columns:
        return rows
    extra = [c for c in optics.columns if c not in rows.columns or c == "rlnOpticsGroup"]
    return rows.merge(optics[extra], on="rlnOpticsGroup", how="left")


def resolve_path(name: str | Path, star_path: str | Path | None = None,
                 project_dir: str | Path | None = None) -> Path:
    """Find a file named in a STAR file: absolute, relative to the project (cwd), or to the STAR."""
    p = Path(name)
    if p.is_absolute():
        return p
    candidates = []
    if project_dir is not None:
        candidates.append(Path(project_dir) / p)
    candidates.append(Path.cwd() / p)
    if star_path is not None:
        candidates.append(Path(star_path).parent / p)
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]
