"""The normalised acquisition records: one per movie, one per session.

Every parser (:mod:`metadata.epu`, :mod:`metadata.mdoc`, :mod:`metadata.movies`) fills a
:class:`MovieRecord` through a :class:`RecordBuilder`, which keeps per-field provenance:

- ``source[field] = "<file>:<key>"`` — where the value was read (or, for a derived value,
  what it was computed from);
- ``derived`` — the fields computed rather than read (e.g. dose per frame from the total
  dose and the number of frames; the movie pixel size settled against the movie header).

A value no file holds is ``None`` (never 0), so the GUI can highlight it for entry.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: The keys of ``scopeside metadata --json`` for one movie, in order (the CLI contract).
JSON_KEYS: tuple[str, ...] = (
    "software",
    "software_version",
    "microscope_id",
    "microscope",
    "voltage_kv",
    "cs_mm",
    "magnification",
    "pixel_size_a",
    "super_resolution",
    "binning",
    "detector",
    "camera_mode",
    "exposure_time_s",
    "n_frames",
    "total_dose_e_a2",
    "dose_per_frame_e_a2",
    "defocus_um",
    "eer",
    "gain_reference",
    "movie_path",
    "acquired_at",
    "source",
    "derived",
)

CameraMode = Literal["counting", "super-resolution", "linear"]


class MovieRecord(BaseModel):
    """Everything known about one movie (one EPU XML, one mdoc section, or one movie header).

    The first block of fields are the CLI/JSON contract (:data:`JSON_KEYS`); the rest are
    further facts some files hold. Units are in the field names.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    software: str | None = None
    software_version: str | None = None
    microscope_id: str | None = Field(None, description="EPU InstrumentID or SerialEM D-number")
    microscope: str | None = None
    voltage_kv: float | None = None
    cs_mm: float | None = None
    magnification: int | None = Field(None, description="nominal magnification")
    pixel_size_a: float | None = Field(None, description="pixel size of the movie frames")
    super_resolution: bool | None = None
    binning: float | None = Field(None, description="as recorded (SerialEM 0.5 = super-resolution)")
    detector: str | None = Field(None, description="detector model (e.g. 'K3', 'Falcon 4i')")
    camera_mode: CameraMode | None = None
    exposure_time_s: float | None = None
    n_frames: int | None = Field(None, description="frames (fractions) in the movie; raw frames for EER")
    total_dose_e_a2: float | None = None
    dose_per_frame_e_a2: float | None = None
    defocus_um: float | None = Field(None, description="applied/target defocus, sign as recorded")
    eer: bool | None = None
    gain_reference: str | None = None
    movie_path: str | None = None
    acquired_at: _dt.datetime | None = None
    source: dict[str, str] = Field(default_factory=dict)
    derived: list[str] = Field(default_factory=list)

    # further facts (not part of the JSON contract)
    metadata_path: str | None = None
    camera_name: str | None = Field(None, description="camera as the software names it (BM-Falcon, EF-CCD)")
    detector_commercial_name: str | None = None
    instrument_model: str | None = None
    super_resolution_factor: int | None = None
    readout_width: int | None = None
    readout_height: int | None = None
    n_raw_frames: int | None = Field(None, description="raw camera frames (EPU DoseFractions end frame)")
    eer_frame_rate_hz: float | None = None
    dose_on_camera: float | None = Field(None, description="EPU DoseOnCamera (e/px/s at the camera)")
    dose_rate: float | None = Field(None, description="EPU DoseRate / SerialEM DoseRate (e/unbinned px/s)")
    slit_width_ev: float | None = None
    spot_size: int | None = None
    beam_diameter_um: float | None = None
    tilt_angle_deg: float | None = None
    defect_file: str | None = None
    camera_index: int | None = None
    sub_frame_path: str | None = None
    grid_square_id: int | None = None
    foil_hole_id: int | None = None
    warnings: list[str] = Field(default_factory=list)

    def to_json_dict(self) -> dict[str, Any]:
        """The record as the ``--json`` contract: exactly :data:`JSON_KEYS`, JSON-ready values."""
        data = self.model_dump(mode="json", include=set(JSON_KEYS))
        return {k: data[k] for k in JSON_KEYS}

    def missing(self, fields: tuple[str, ...] | None = None) -> list[str]:
        """Names of contract fields that are still ``None`` (for the GUI to ask for)."""
        names = fields or tuple(k for k in JSON_KEYS if k not in ("source", "derived"))
        return [k for k in names if getattr(self, k) is None]


class SessionRecord(BaseModel):
    """What is known about a whole acquisition session (EPU or SerialEM)."""

    model_config = ConfigDict(extra="forbid")

    software: str | None = None
    software_version: str | None = None
    name: str | None = None
    path: str | None = Field(None, description="session (metadata) folder")
    session_file: str | None = Field(None, description="EpuSession.dm, when there is one")
    storage_folders: list[str] = Field(default_factory=list, description="as recorded (Windows paths)")
    storage_folders_local: list[str | None] = Field(
        default_factory=list, description="storage_folders through the prefix map (None: unmapped)")
    dose_fractions_output_format: str | None = None
    image_file_format: str | None = None
    started_at: _dt.datetime | None = None
    n_movies: int = 0
    n_movies_without_metadata: int = 0
    n_metadata_without_movie: int = 0
    n_grid_squares: int = 0
    n_foil_holes: int = 0
    source: dict[str, str] = Field(default_factory=dict)
    derived: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


class RecordBuilder:
    """Collects field values with their provenance, then builds a record.

    Parameters
    ----------
    path
        The file the values come from (used in ``source`` entries).
    """

    def __init__(self, path: str | Path | None = None):
        self.path = str(path) if path is not None else "?"
        self.values: dict[str, Any] = {}
        self.source: dict[str, str] = {}
        self.derived: list[str] = []
        self.warnings: list[str] = []

    def read(self, field: str, value: Any, key: str, path: str | Path | None = None) -> Any:
        """Set ``field`` from ``key`` of the file (ignored when ``value`` is ``None``)."""
        if value is None:
            return None
        self.values[field] = value
        self.source[field] = f"{path if path is not None else self.path}:{key}"
        if field in self.derived:
            self.derived.remove(field)
        return value

    def derive(self, field: str, value: Any, how: str) -> Any:
        """Set ``field`` to a computed value; ``how`` says from what (stored in ``source``)."""
        if value is None:
            return None
        self.values[field] = value
        self.source[field] = f"derived:{how}"
        if field not in self.derived:
            self.derived.append(field)
        return value

    def extra(self, field: str, value: Any) -> None:
        """Set a field without provenance (paths, ids taken from names)."""
        if value is not None:
            self.values[field] = value

    def get(self, field: str) -> Any:
        return self.values.get(field)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def build(self) -> MovieRecord:
        return MovieRecord(**self.values, source=dict(self.source), derived=list(self.derived),
                           warnings=list(self.warnings))


def update_record(record: MovieRecord, *, read: dict[str, tuple[Any, str]] | None = None,
                  derived: dict[str, tuple[Any, str]] | None = None,
                  extra: dict[str, Any] | None = None, warnings: list[str] | None = None) -> MovieRecord:
    """A copy of ``record`` with fields set as read (``value, "file:key"``) or derived
    (``value, how``). ``None`` values are skipped."""
    data = record.model_dump()
    src = dict(record.source)
    der = list(record.derived)
    for field, (value, where) in (read or {}).items():
        if value is None:
            continue
        data[field] = value
        src[field] = where
        if field in der:
            der.remove(field)
    for field, (value, how) in (derived or {}).items():
        if value is None:
            continue
        data[field] = value
        src[field] = f"derived:{how}"
        if field not in der:
            der.append(field)
    for field, value in (extra or {}).items():
        if value is not None:
            data[field] = value
    data["source"] = src
    data["derived"] = der
    data["warnings"] = list(record.warnings) + list(warnings or [])
    return MovieRecord(**data)


def fill_dose_per_frame(b: RecordBuilder) -> None:
    """Derive dose per frame from total dose and frame count when not read (shared rule)."""
    total = b.get("total_dose_e_a2")
    n = b.get("n_frames")
    if b.get("dose_per_frame_e_a2") is None and total is not None and n:
        b.derive("dose_per_frame_e_a2", total / n, "total_dose_e_a2/n_frames")


#: pixel size x nominal magnification at the camera, per unbinned camera pixel, in um: real
#: cameras and projector/energy-filter magnifications give ~1.5-25 (K2 super-resolution on a
#: Polara 1.6, Falcon 3 on a Krios 8, K3 behind a GIF 9-17); a value far outside means one
#: of the two numbers is off (a 10x pixel-size error gives 120)
CAMERA_PIXEL_UM = (0.8, 60.0)


def check_pixel_vs_magnification(b: RecordBuilder, binning: float | None = None) -> None:
    """Warn when pixel size x magnification cannot be a real camera pixel (shared rule)."""
    px, mag = b.get("pixel_size_a"), b.get("magnification")
    if not px or not mag:
        return
    um = px * 1e-4 * mag / (binning if binning and binning >= 1 else 1.0)
    lo, hi = CAMERA_PIXEL_UM
    if not lo <= um <= hi:
        b.warn(f"pixel size {px:.4g} A at {mag}x magnification puts {um:.3g} um on a camera "
               f"pixel (real cameras: {lo:g}-{hi:g} um): check the pixel size and magnification")
