"""Site configuration of microscopes and detectors (TOML, validated with pydantic).

Shipped defaults live in ``resources/config/instruments.toml``; the site's
``config.toml`` (``$SCOPESIDE_CONFIG`` or the user config folder, the same file
:mod:`app.settings` reads) may add or override ``[microscopes.*]``,
``[microscope_models.*]`` and ``[detectors.*]`` entries, merged key by key.

:func:`apply_config` completes a :class:`~metadata.record.MovieRecord` with what no
acquisition file holds (Cs, the microscope's name, the detector model); an instrument the
config does not know gives a warning and leaves the field ``None`` for the operator.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from metadata.errors import MetadataError
from metadata.record import MovieRecord, update_record

CONFIG_ENV = "SCOPESIDE_CONFIG"


def shipped_config_path() -> Path:
    """``resources/config/instruments.toml`` inside the installed package."""
    # metadata/ and resources/ are sibling top-level packages (installed or in the checkout)
    return Path(__file__).resolve().parents[1] / "resources" / "config" / "instruments.toml"


def site_config_path() -> Path:
    """The site's config file (``$SCOPESIDE_CONFIG`` or ``<user config>/scopeside/config.toml``)."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_config_dir("scopeside", appauthor=False)) / "config.toml"


def _check_regex(pat: str) -> None:
    try:
        re.compile(pat)
    except re.error as exc:  # pydantic reports ValueError only
        raise ValueError(f"bad regular expression {pat!r}: {exc}") from None


class MicroscopeModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    cs_mm: float = Field(ge=0, le=10)
    default_voltage_kv: float = Field(gt=0, le=1000)
    match: list[str] = Field(default_factory=list)

    @field_validator("match")
    @classmethod
    def _regex(cls, v: list[str]) -> list[str]:
        for pat in v:
            _check_regex(pat)
        return v


class Microscope(BaseModel):
    """One instrument, keyed by EPU InstrumentID or SerialEM D-number."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    model: str | None = Field(None, description="key of [microscope_models]")
    cs_mm: float | None = Field(None, ge=0, le=10)
    default_voltage_kv: float | None = Field(None, gt=0, le=1000)


class Detector(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    same_as: str | None = Field(None, description="inherit unset fields from this detector")
    match: list[str] = Field(default_factory=list)
    eer: bool | None = None
    min_frame_rate_hz: float | None = Field(None, gt=0)
    super_resolution_factor: int | None = Field(None, ge=1, le=4)
    physical_width: int | None = Field(None, gt=0)
    physical_height: int | None = Field(None, gt=0)
    gain_reference: list[str] | None = None
    gain_rotation: int | None = Field(None, ge=0, le=3)
    gain_flip: int | None = Field(None, ge=0, le=2)
    mtf: dict[str, str] | None = Field(None, description="voltage in kV -> MTF STAR file")
    eer_dose_per_group_e_a2: float | None = Field(None, gt=0)

    @field_validator("match")
    @classmethod
    def _regex(cls, v: list[str]) -> list[str]:
        for pat in v:
            _check_regex(pat)
        return v

    def mtf_for(self, voltage_kv: float | None) -> str | None:
        if not self.mtf or voltage_kv is None:
            return None
        return self.mtf.get(str(int(round(voltage_kv))))


class InstrumentConfig(BaseModel):
    """Validated ``[microscope_models]``, ``[microscopes]`` and ``[detectors]`` tables."""

    model_config = ConfigDict(extra="ignore")
    microscope_models: dict[str, MicroscopeModel] = Field(default_factory=dict)
    microscopes: dict[str, Microscope] = Field(default_factory=dict)
    detectors: dict[str, Detector] = Field(default_factory=dict)
    detector_order: list[str] = Field(default_factory=list)
    sources: list[str] = Field(default_factory=list)

    # ------------------------------------------------------------------ lookups
    def microscope(self, microscope_id: str | None, label: str | None = None
                   ) -> tuple[dict[str, Any] | None, str | None]:
        """Resolve an instrument: ``({name, cs_mm, default_voltage_kv, key}, warning)``."""
        entry = None
        key = None
        if microscope_id:
            for cand in (str(microscope_id), str(microscope_id).upper(), f"D{microscope_id}"):
                if cand in self.microscopes:
                    key, entry = cand, self.microscopes[cand]
                    break
        if entry is not None:
            model = self.microscope_models.get(entry.model) if entry.model else None
            cs = entry.cs_mm if entry.cs_mm is not None else (model.cs_mm if model else None)
            kv = entry.default_voltage_kv or (model.default_voltage_kv if model else None)
            name = entry.name or (model.name if model else None)
            warn = None if cs is not None else (
                f"microscope {microscope_id}: no cs_mm in the site config (set microscopes."
                f"{key}.cs_mm or .model)")
            return {"key": f"microscopes.{key}", "name": name, "cs_mm": cs,
                    "default_voltage_kv": kv}, warn
        # not listed: guess the model from the label, but say so
        for mkey, model in self.microscope_models.items():
            for pat in model.match:
                if label and re.search(pat, label, re.IGNORECASE):
                    return ({"key": f"microscope_models.{mkey}", "name": model.name,
                             "cs_mm": model.cs_mm, "default_voltage_kv": model.default_voltage_kv,
                             "guessed": True},
                            f"microscope {microscope_id or label!r} is not in the site config; "
                            f"assuming a {model.name} (Cs {model.cs_mm} mm) — add "
                            f"[microscopes.\"{microscope_id or 'ID'}\"] to confirm")
        return None, (f"unknown microscope {microscope_id or label!r}: add it to the site config "
                      f"([microscopes.\"{microscope_id or 'ID'}\"]); Cs must be entered")

    def detector(self, names: list[str | None], eer: bool | None = None,
                 frame_rate_hz: float | None = None) -> tuple[str, Detector] | None:
        """First detector in ``detector_order`` whose ``match`` fits one of ``names``."""
        order = self.detector_order or list(self.detectors)
        for key in order:
            det = self.detectors.get(key)
            if det is None:
                continue
            if det.eer is not None and eer is not None and det.eer != eer:
                continue
            if det.eer is True and eer is None:
                continue
            if det.min_frame_rate_hz is not None and (frame_rate_hz is None
                                                      or frame_rate_hz < det.min_frame_rate_hz):
                continue
            for name in names:
                if name and any(re.search(p, name, re.IGNORECASE) for p in det.match):
                    return key, self.resolved_detector(key)
        return None

    def detector_by_size(self, width: int | None, height: int | None) -> tuple[str, Detector] | None:
        """The one detector model whose physical size (either orientation, or its
        super-resolution double, or half of it) is ``width`` x ``height``.

        For cameras the software names only generically (EPU 2.x writes ``EF-CCD`` for a K2
        and a K3 behind an energy filter). ``None`` when no model or more than one fits (the
        Falcons share 4096 x 4096, so size never tells them apart).
        """
        if not width or not height:
            return None
        hits: dict[str, str] = {}
        for key in self.detector_order or list(self.detectors):
            if key not in self.detectors:
                continue
            det = self.resolved_detector(key)
            if not (det.physical_width and det.physical_height):
                continue
            pw, ph = det.physical_width, det.physical_height
            sizes = {(pw * f, ph * f) for f in (0.5, 1, det.super_resolution_factor or 1)}
            if {(width, height), (height, width)} & sizes:
                hits.setdefault(det.model or key, key)
        if len(hits) != 1:
            return None
        key = next(iter(hits.values()))
        return key, self.resolved_detector(key)

    def resolved_detector(self, key: str) -> Detector:
        """A detector with ``same_as`` inheritance applied."""
        det = self.detectors[key]
        seen = {key}
        data = det.model_dump(exclude_none=True)
        parent = det.same_as
        while parent:
            if parent in seen or parent not in self.detectors:
                break
            seen.add(parent)
            pdet = self.detectors[parent]
            for k, v in pdet.model_dump(exclude_none=True).items():
                data.setdefault(k, v)
            parent = pdet.same_as
        return Detector(**data)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise MetadataError(f"not valid TOML: {exc}", path) from None
    except UnicodeDecodeError:
        raise MetadataError("not valid TOML: not UTF-8 text", path) from None
    except OSError as exc:
        raise MetadataError(f"cannot read ({exc.strerror})", path) from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_instruments(site_path: str | Path | None = None, *, shipped: bool = True) -> InstrumentConfig:
    """Shipped defaults merged with the site's config file.

    Parameters
    ----------
    site_path
        The site config TOML (default :func:`site_config_path`); absent file = defaults only.
    shipped
        Start from the shipped defaults (``False``: only the site file).

    Raises
    ------
    MetadataError
        Invalid TOML, or an entry that fails validation (message names file and key).
    """
    site = Path(site_path) if site_path is not None else site_config_path()
    data: dict[str, Any] = {}
    sources = []
    if shipped:
        data = _read_toml(shipped_config_path())
        sources.append(str(shipped_config_path()))
    site_data = _read_toml(site)
    if site_data:
        sources.append(str(site))
    data = _merge(data, {k: v for k, v in site_data.items()
                         if k in ("microscopes", "microscope_models", "detectors")})
    for section in ("microscopes", "microscope_models", "detectors"):
        if not isinstance(data.get(section, {}), dict):
            raise MetadataError(f"instrument config {section!r}: must be a table", site)
    dets = dict(data.get("detectors", {}))
    order = dets.pop("order", None)
    payload = {
        "microscope_models": data.get("microscope_models", {}),
        "microscopes": data.get("microscopes", {}),
        "detectors": dets,
        "detector_order": order or [],
        "sources": sources,
    }
    try:
        cfg = InstrumentConfig.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        where = str(site) if site_data else sources[0] if sources else str(site)
        raise MetadataError(f"instrument config {key!r}: {first['msg']}", where) from None
    for key, det in cfg.detectors.items():
        if det.same_as and det.same_as not in cfg.detectors:
            raise MetadataError(f"detectors.{key}.same_as: no detector {det.same_as!r}", site)
    for key, mic in cfg.microscopes.items():
        if mic.model and mic.model not in cfg.microscope_models:
            raise MetadataError(f"microscopes.{key}.model: no microscope model {mic.model!r}", site)
    return cfg


#: camera names that say nothing about the model (EPU 2.x: "EF-CCD" behind an energy filter)
_GENERIC_CAMERA = re.compile(r"^((EF|BM)[-_ ]?)?(CCD|camera)$", re.IGNORECASE)


def apply_config(record: MovieRecord, cfg: InstrumentConfig) -> MovieRecord:
    """Complete a record from the instrument config (Cs, microscope name, detector model).

    Values read from an acquisition file are never replaced, except ``microscope``, which
    takes the configured name (the file's model string stays in ``instrument_model``).
    Unknown instruments add a
    warning to ``record.warnings`` and leave ``cs_mm`` ``None``.
    """
    read: dict[str, tuple[Any, str]] = {}
    warnings: list[str] = []
    cfg_src = cfg.sources[-1] if cfg.sources else "config"
    label = " ".join(x for x in (record.instrument_model, record.microscope) if x) or None
    mic, warn = cfg.microscope(record.microscope_id, label)
    if warn:
        warnings.append(warn)
    if mic is not None:
        if record.cs_mm is None and mic.get("cs_mm") is not None:
            read["cs_mm"] = (mic["cs_mm"], f"{cfg_src}:{mic['key']}.cs_mm")
        if mic.get("name") and not mic.get("guessed"):
            read["microscope"] = (mic["name"], f"{cfg_src}:{mic['key']}.name")
    derived: dict[str, tuple[Any, str]] = {}
    found = cfg.detector([record.detector_commercial_name, record.camera_name, record.detector],
                         eer=record.eer, frame_rate_hz=record.eer_frame_rate_hz)
    names = [n for n in (record.detector_commercial_name, record.camera_name) if n]
    by_size = None
    if found is None and record.detector is None and all(_GENERIC_CAMERA.match(n) for n in names):
        by_size = cfg.detector_by_size(record.readout_width, record.readout_height)
    if found is not None:
        key, det = found
        if det.model and (record.detector is None or record.detector == record.camera_name):
            read["detector"] = (det.model, f"{cfg_src}:detectors.{key}.match")
    elif by_size is not None and by_size[1].model:
        key, det = by_size
        size = f"{record.readout_width}x{record.readout_height}"
        derived["detector"] = (det.model, f"readout area {size} = {cfg_src}:detectors.{key} "
                                          "physical size")
        warnings.append(f"camera {' / '.join(names) or '(not named)'} is not in the config; "
                        f"detector {det.model} taken from the readout area {size} — check it")
    elif record.detector is None:
        warnings.append(f"unknown detector {' / '.join(names) or '(none recorded)'}: "
                        "add it to the site config or enter it")
    return update_record(record, read=read, derived=derived, warnings=warnings)


def detector_for(record: MovieRecord, cfg: InstrumentConfig) -> Detector | None:
    """The configured :class:`Detector` of a record (gain rule, MTF, rotation/flip), if any:
    by name, else (for generic camera names) by the readout area's size."""
    found = cfg.detector([record.detector_commercial_name, record.camera_name, record.detector],
                         eer=record.eer, frame_rate_hz=record.eer_frame_rate_hz)
    names = [n for n in (record.detector_commercial_name, record.camera_name) if n]
    if found is None and all(_GENERIC_CAMERA.match(n) for n in names):
        found = cfg.detector_by_size(record.readout_width, record.readout_height)
    return found[1] if found else None


def locate_gain_reference(named: str | None, *, movie_path: str | Path | None = None,
                          session_dir: str | Path | None = None, det: Detector | None = None
                          ) -> tuple[Path | None, str | None, str | None]:
    """Where the gain reference is: ``(path, how, warning)``.

    ``named`` is what the metadata says (SerialEM's ``GainReference`` is a bare file name,
    or a Windows path on the camera PC); it is looked up as given, then by its name next to
    the movie and in the session folder. Without a name, the detector's configured rule
    (:func:`find_gain_reference`) is tried. ``path`` is ``None`` when nothing was found;
    ``warning`` then says what to enter.
    """
    from pathlib import PureWindowsPath

    movie_dir = Path(movie_path).parent if movie_path else None
    sess = Path(session_dir) if session_dir else None
    if sess is not None and sess.is_file():
        sess = sess.parent
    if named:
        base = PureWindowsPath(named).name  # either separator: a camera-PC or a local path
        cands = [Path(named)] if Path(named).is_absolute() else []
        cands += [d / base for d in (movie_dir, sess) if d is not None]
        for c in cands:
            if c.is_file():
                return c.resolve(), f"named in the metadata ({named}), found in {c.parent}", None
        where = " or ".join(str(d) for d in (movie_dir, sess) if d is not None) or "here"
        return None, None, (f"the metadata names the gain reference {named}, which is not in "
                            f"{where}: enter its path")
    found = find_gain_reference(det, movie_dir, sess)
    if found is not None:
        return found.resolve(), "detector gain-reference rule of the instrument config", \
            f"gain reference {found.name} found by the detector's rule: check it is this session's"
    return None, None, None


def find_gain_reference(det: Detector | None, movie_dir: str | Path | None,
                        session_dir: str | Path | None = None) -> Path | None:
    """Apply a detector's ``gain_reference`` rule: the newest file matching the first pattern
    that matches anything (``{movie_dir}``, ``{session}`` substituted). ``None`` if none."""
    import glob

    if det is None or not det.gain_reference:
        return None
    subs = {"movie_dir": str(movie_dir) if movie_dir else None,
            "session": str(session_dir) if session_dir else None}
    for pattern in det.gain_reference:
        try:
            filled = pattern.format(**subs)
        except (KeyError, IndexError, ValueError):
            continue
        if "None" in filled.split(os.sep):
            continue
        hits = [Path(h) for h in glob.glob(filled) if Path(h).is_file()]
        if hits:
            return max(hits, key=lambda h: h.stat().st_mtime)
    return None
