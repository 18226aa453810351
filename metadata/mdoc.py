"""SerialEM and Tomography 5 ``.mdoc`` files.

An mdoc is ``key = value`` lines: a global header (``PixelSpacing``, ``Voltage``,
``ImageFile``…, title lines ``[T = SerialEM: <label> <date>]``) then sections
``[ZValue = n]`` (stacks, tilt series), ``[MontSection = n]`` (montages) or
``[FrameSet = n]`` (single-movie frame mdocs, whose header title has no brackets:
``T = SerialEM: …``). Tomography 5 writes the same format with ``[T = Tomography: …]``.

Parsing goes through :mod:`mdocfile` when it copes, and through :func:`_parse_sections`
(our own) when a real variant breaks it:

- mdocfile's global header parser unpacks ``line.split('=')`` into two names, so any
  header line with a second ``=`` (an unbracketed ``T = SerialEM: … = …`` label, a
  ``Version`` string with ``=``) or without ``=`` raises ``ValueError``;
- mdocfile validates values with pydantic: one unparsable value (``Binning = ?``, ``NaN``
  tuples, truncated lines) rejects the whole file instead of that one key;
- mdocfile opens files with the platform's default encoding; SerialEM on Windows writes
  the ANSI code page (cp1252: ``ä``/``µ`` in user folder names). We decode ourselves
  (UTF-8, else cp1252/latin-1) and hand mdocfile text.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PureWindowsPath
from typing import Any

from metadata.errors import MetadataError
from metadata.record import (
    MovieRecord,
    RecordBuilder,
    check_pixel_vs_magnification,
    fill_dose_per_frame,
)

log = logging.getLogger(__name__)

_SECTION_RE = re.compile(r"^\[\s*(ZValue|MontSection|FrameSet)\s*=\s*([^\]]*)\]\s*$")
_TITLE_RE = re.compile(r"^\[?\s*T\s*=\s*(.*?)\]?\s*$")
# "SerialEM: <label>", "Tomography: <label>", "Tomography 5: …", "Tomography_5.23.0.10273: …"
_SOFTWARE_RE = re.compile(r"^\s*(SerialEM|Tomography)(?:[ _]+(\d[\d.]*))?\s*:\s*(.*)$", re.IGNORECASE)
# Thermo Fisher computer/instrument names "TITAN5233<ID>0" carry the EPU InstrumentID
# (TITAN52332990 <-> 3299, TITAN52336320 <-> 3632, TITAN52337880 <-> 3788 in the samples)
_TITAN_RE = re.compile(r"\bTITAN\d{3}(\d{4})\d\b")
_DATE_RE = re.compile(r"(\d{1,2})-([A-Za-z]{3})-(\d{2}|\d{4})\s+(\d{1,2}):(\d{2}):(\d{2})")
_DNUMBER_RE = re.compile(r"\bD(\d{3,5})\b")
_MONTHS = {m: i + 1 for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"))}

MOVIE_SUFFIXES = (".tif", ".tiff", ".mrc", ".eer", ".mrcs")


@dataclass
class MdocFile:
    """A parsed mdoc: header facts plus one :class:`MovieRecord` per section."""

    path: Path
    software: str | None
    software_version: str | None
    scope_label: str | None
    microscope_id: str | None
    titles: list[str]
    global_data: dict[str, str]
    sections: list[MovieRecord]
    section_kind: str
    parser: str  # "mdocfile" or "own (<reason>)"
    cameras: dict[int, str] = field(default_factory=dict)
    n_montage_sections: int = 0
    #: frame-based tilt series: the ``[ZValue]`` sections that are frame ranges of the
    #: ``[FrameSet]`` movie (``FrameTSStartEndFrames``), as ``{"z", "tilt_angle_deg",
    #: "first_frame", "last_frame", "dose_e_a2", "prior_dose_e_a2"}``; empty otherwise
    frame_tilts: list[dict[str, float | int | None]] = field(default_factory=list)
    #: a navigator montage (``Montage = 1``, ``[MontSection]`` or ``PieceCoordinates``)
    is_montage: bool = False

    @property
    def is_frame_mdoc(self) -> bool:
        return self.section_kind == "FrameSet"


def decode_text(data: bytes, path: str | Path | None = None) -> str:
    """Decode mdoc bytes: UTF-16 with a byte-order mark (Notepad's "Unicode"), else UTF-8
    (with or without BOM), else Windows cp1252, else latin-1 (never fails)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise MetadataError("starts with a UTF-16 byte-order mark but is not valid UTF-16",
                                path) from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if b"\x00" in data[:4096]:
        raise MetadataError("binary file (NUL bytes), not a text mdoc", path)
    for enc in ("utf-8", "cp1252"):
        try:
            return data.decode(enc)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


def parse_date(text: str | None) -> _dt.datetime | None:
    """SerialEM dates: ``11-Aug-19  14:13:22`` or ``01-Aug-2022  18:58:35`` (naive, scope local)."""
    if not text:
        return None
    m = _DATE_RE.search(text)
    if not m:
        return None
    day, mon, year, hh, mm, ss = m.groups()
    month = _MONTHS.get(mon.lower())
    if month is None:
        return None
    y = int(year)
    if len(year) == 2:
        y += 2000 if y < 70 else 1900
    try:
        return _dt.datetime(y, month, int(day), int(hh), int(mm), int(ss))
    except ValueError:
        return None


# ----------------------------------------------------------------------------- raw parsing


@contextlib.contextmanager
def _quiet_mdocfile():
    """mdocfile logs a warning per section for the FrameDosesAndNumber alias and unknown keys;
    they are not problems for us, so they are hidden while it runs (level restored after)."""
    lg = logging.getLogger("mdocfile")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)


def _str_value(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, tuple):
        return " ".join(_str_value(x) or "" for x in v)
    if isinstance(v, list):  # FrameDosesAndNumbers [(dose, n), ...]
        return "  ".join(" ".join(str(x) for x in pair) for pair in v)
    if isinstance(v, PurePath):
        return str(v)
    return str(v)


def _via_mdocfile(text: str) -> tuple[list[str], dict[str, str], list[tuple[str, dict[str, str]]]]:
    import mdocfile.data_models as dm

    with _quiet_mdocfile():
        mdoc = dm.Mdoc.from_string(text)
    glob = {k: s for k, v in mdoc.global_data.model_dump().items() if (s := _str_value(v)) is not None}
    sections = []
    for sec in mdoc.section_data:
        data = sec.model_dump(by_alias=False)
        data.update(sec.model_extra or {})
        kind = next((k for k in ("FrameSet", "ZValue", "MontSection") if data.get(k) is not None), "ZValue")
        vals = {}
        for k, v in data.items():
            s = _str_value(v)
            if s is not None:
                vals["FrameDosesAndNumber" if k == "FrameDosesAndNumbers" else k] = s
        sections.append((kind, vals))
    # mdocfile folds an unbracketed header "T = SerialEM: …" into global data as key "T"
    titles = list(mdoc.titles)
    if "T" in glob:
        titles.insert(0, "T = " + glob.pop("T"))
    # SubFramePath went through PureWindowsPath/Path; keep the text exactly as written
    raw_sfp = re.findall(r"^\s*SubFramePath\s*=\s*(.*?)\s*$", text, flags=re.MULTILINE)
    if len(raw_sfp) == len(sections):
        for (_, vals), raw in zip(sections, raw_sfp):
            vals["SubFramePath"] = raw
    return titles, glob, sections


def _parse_sections(text: str) -> tuple[list[str], dict[str, str], list[tuple[str, dict[str, str]]]]:
    """Our own tolerant reader: every ``key = value`` kept as text, odd lines skipped."""
    titles: list[str] = []
    glob: dict[str, str] = {}
    sections: list[tuple[str, dict[str, str]]] = []
    current: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        m = _SECTION_RE.match(line)
        if m:
            current = {m.group(1): m.group(2).strip()}
            sections.append((m.group(1), current))
            continue
        if re.match(r"^\[?\s*T\s*=", line):
            titles.append(line)
            continue
        if "=" not in line:
            continue
        k, v = line.split("=", 1)
        k = k.strip()
        if not k or " " in k:
            continue
        (current if current is not None else glob)[k] = v.strip()
    return titles, glob, sections


def read_raw(path: str | Path, data: bytes | None = None):
    """(titles, global, sections, parser) of an mdoc; sections are ``(kind, {key: text})``."""
    p = Path(path)
    if data is None:
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise MetadataError("file not found", p) from None
        except IsADirectoryError:
            raise MetadataError("is a folder, not a file", p) from None
        except OSError as exc:
            raise MetadataError(f"cannot read ({exc.strerror or exc})", p) from None
    text = decode_text(data, p)
    if not text.strip():
        raise MetadataError("empty mdoc", p)
    try:
        titles, glob, sections = _via_mdocfile(text)
        parser = "mdocfile"
    except Exception as exc:  # mdocfile raises ValueError/ValidationError/IndexError/TypeError…
        # any failure in the library falls back to our reader; the reason is kept for the record
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
        log.debug("%s: mdocfile failed (%s); using own parser", p, reason)
        titles, glob, sections = _parse_sections(text)
        parser = f"own ({reason})"
    if not sections:
        raise MetadataError("no [ZValue]/[FrameSet]/[MontSection] sections (not an mdoc?)", p)
    return titles, glob, sections, parser


# ----------------------------------------------------------------------------- records


def _f(vals: dict[str, str], key: str, p: Path) -> float | None:
    t = vals.get(key)
    if t is None or not t.strip():
        return None
    tok = t.split()[0]
    try:
        v = float(tok)
    except ValueError:
        raise MetadataError(f"{key}: not a number ({t[:40]!r})", p) from None
    return v if math.isfinite(v) else None


def _i(vals: dict[str, str], key: str, p: Path) -> int | None:
    v = _f(vals, key, p)
    if v is None:
        return None
    if v != int(v):
        raise MetadataError(f"{key}: not an integer ({vals[key][:40]!r})", p)
    return int(v)


def _frame_doses(text: str | None, p: Path) -> list[tuple[float, int]]:
    if not text:
        return []
    parts = text.split()
    out = []
    try:
        for k in range(0, len(parts) - 1, 2):
            out.append((float(parts[k]), int(float(parts[k + 1]))))
    except ValueError:
        raise MetadataError(f"FrameDosesAndNumber: not 'dose count' pairs ({text[:40]!r})", p) from None
    return out


def parse_mdoc(path: str | Path, data: bytes | None = None) -> MdocFile:
    """Read a SerialEM / Tomography 5 mdoc: one :class:`MovieRecord` per section.

    Returns
    -------
    MdocFile
        ``sections[i]`` is the record of section *i* (a movie for frame mdocs, one tilt or
        montage piece otherwise), with provenance ``"<mdoc>:[ZValue = i]/Key"``.

    Raises
    ------
    MetadataError
        Unreadable, empty or binary file; no sections; a value of the wrong type.
    """
    p = Path(path)
    titles, glob, raw_sections, parser = read_raw(p, data)
    software = scope_label = date_text = header_version = None
    for t in titles:
        m = _TITLE_RE.match(t)
        body = m.group(1) if m else t
        sm = _SOFTWARE_RE.match(body)
        if sm:
            software = "Tomography" if sm.group(1).lower() == "tomography" else "SerialEM"
            header_version = sm.group(2)
            label = sm.group(3)
            dm = _DATE_RE.search(label)
            if dm:
                date_text = dm.group(0)
                label = label[: dm.start()]
            scope_label = re.sub(r"\s+", " ", label).strip() or None
            break
    version = None
    if glob.get("Version"):
        vm = re.search(r"(\d+\.\d+(?:\.\d+)*)", glob["Version"])
        if vm:
            version = vm.group(1)
        if software is None and "serialem" in glob["Version"].lower():
            software = "SerialEM"
    if version is None and header_version:
        version = header_version
    d_number = None
    if scope_label:
        dm = _DNUMBER_RE.search(scope_label)
        tm = _TITAN_RE.search(scope_label)
        if dm:
            d_number = f"D{dm.group(1)}"
        elif tm:
            d_number = tm.group(1)
    microscope = scope_label
    if microscope:
        microscope = re.sub(r"^(Acquired|Digitized)\s+on\s+", "", microscope, flags=re.IGNORECASE)
        microscope = re.sub(r"\s*Camera\s*->.*$", "", microscope).strip() or None
    cameras: dict[int, str] = {}
    if scope_label and "->" in scope_label:
        for idx, name in re.findall(r"(\d+)\s*:\s*(\S+)", scope_label.split("->", 1)[1]):
            cameras[int(idx)] = name

    # [MontSection = n] sections of a montage describe the assembled overview, not images
    image_sections = [(k, v) for k, v in raw_sections if k != "MontSection"] or raw_sections
    # a frame-based tilt series (SerialEM 4.1+): one [FrameSet] movie whose tilts are
    # [ZValue] sections holding frame ranges of it, not movies of their own
    frame_tilts: list[dict[str, float | int | None]] = []
    if any(k == "FrameSet" for k, _ in image_sections):
        ranges = [(k, v) for k, v in image_sections
                  if k == "ZValue" and v.get("FrameTSStartEndFrames") and not v.get("SubFramePath")]
        if ranges:
            for _, v in ranges:
                se = v["FrameTSStartEndFrames"].split()
                try:
                    first, last = int(float(se[0])), int(float(se[1]))
                except (IndexError, ValueError):
                    raise MetadataError("FrameTSStartEndFrames: not 'first last' frame numbers "
                                        f"({v['FrameTSStartEndFrames'][:40]!r})", p) from None
                frame_tilts.append({"z": v.get("ZValue"), "tilt_angle_deg": _f(v, "TiltAngle", p),
                                    "first_frame": first, "last_frame": last,
                                    "dose_e_a2": _f(v, "ExposureDose", p),
                                    "prior_dose_e_a2": _f(v, "PriorRecordDose", p)})
            taken = {id(v) for _, v in ranges}
            image_sections = [(k, v) for k, v in image_sections if id(v) not in taken]
    records = []
    for kind, vals in image_sections:
        rec = _section_record(p, kind, vals, glob, software, version, d_number,
                              microscope, cameras, date_text)
        if frame_tilts and kind == "FrameSet":
            angles = [t["tilt_angle_deg"] for t in frame_tilts if t["tilt_angle_deg"] is not None]
            span = ("" if not angles else f", tilt {angles[0]:g} deg" if min(angles) == max(angles)
                    else f", tilts {min(angles):g} to {max(angles):g} deg")
            rec = rec.model_copy(update={"warnings": [*rec.warnings, (
                f"frame-based tilt series: {len(frame_tilts)} tilts recorded as frame ranges of "
                f"this one movie (FrameTSStartEndFrames{span}); single-particle processing "
                "would treat it as one untilted movie")]})
        records.append(rec)
    return MdocFile(path=p, software=software, software_version=version, scope_label=scope_label,
                    microscope_id=d_number, titles=titles, global_data=glob, sections=records,
                    section_kind=image_sections[0][0], parser=parser, cameras=cameras,
                    n_montage_sections=len(raw_sections) - len(image_sections) - len(frame_tilts),
                    frame_tilts=frame_tilts,
                    is_montage=(str(glob.get("Montage", "")).strip() == "1"
                                or any(k == "MontSection" or "PieceCoordinates" in v
                                       for k, v in raw_sections)))


def _section_record(p: Path, kind: str, vals: dict[str, str], glob: dict[str, str], software,
                    version, d_number, microscope, cameras, header_date) -> MovieRecord:
    b = RecordBuilder(p)
    b.extra("metadata_path", str(p))
    sec = f"[{kind} = {vals.get(kind, '?')}]"

    def key(k: str, where: str | None = None) -> str:
        return f"{where or sec}/{k}"

    b.read("software", software, "T")
    b.read("software_version", version, "Version")
    if d_number and d_number.startswith("D"):
        b.read("microscope_id", d_number, "T (D-number)")
    else:
        b.derive("microscope_id", d_number, "T: instrument name TITAN5233<ID>0")
    b.read("microscope", microscope, "T")
    # Voltage: section first, then the header
    v = _f(vals, "Voltage", p)
    if v is not None and v > 0:
        b.read("voltage_kv", v, key("Voltage"))
    else:
        gv = _f(glob, "Voltage", p)
        b.read("voltage_kv", gv if gv and gv > 0 else None, "Voltage")
    cs = _f(vals, "Cs", p)  # not a SerialEM key; some sites' scripts add it
    b.read("cs_mm", cs if cs is not None and cs >= 0 else None, key("Cs"))
    mag = _f(vals, "Magnification", p)
    b.read("magnification", int(round(mag)) if mag and mag > 0 else None, key("Magnification"))
    spot = _f(vals, "SpotSize", p)
    b.read("spot_size", int(spot) if spot is not None else None, key("SpotSize"))
    px = _f(vals, "PixelSpacing", p)
    if px is not None and px > 0:
        b.read("pixel_size_a", px, key("PixelSpacing"))
    else:
        gpx = _f(glob, "PixelSpacing", p)
        b.read("pixel_size_a", gpx if gpx and gpx > 0 else None, "PixelSpacing")
    binning = _f(vals, "Binning", p)
    b.read("binning", binning, key("Binning"))
    if binning is not None:
        b.derive("super_resolution", binning < 1.0, "Binning<1")
    sfp = vals.get("SubFramePath")
    stack_px = b.get("pixel_size_a")
    if sfp and binning is not None and binning > 1.0 and stack_px is not None:
        # PixelSpacing belongs to the binned image in the stack; SerialEM saves a K2/K3's
        # frames unbinned (counting) or in super-resolution, so the frames' pixel is
        # PixelSpacing/Binning (or half of it: the movie's frame size settles that)
        b.derive("pixel_size_a", stack_px / binning,
                 f"PixelSpacing/Binning ({stack_px:g} A of the bin-{binning:g} image)")
        b.warn(f"the mdoc's pixel size {stack_px:g} A is of the bin-{binning:g} image; the "
               f"frames are taken as unbinned ({stack_px / binning:g} A/px) — check it, or "
               "let the movie's frame size settle it")
        size = (glob.get("ImageSize") or vals.get("ImageSize") or "").split()
        if len(size) == 2:
            try:
                w, h = (int(round(float(x) * binning)) for x in size)
            except ValueError:
                w = h = 0
            if w > 0 and h > 0:
                b.derive("readout_width", w, "ImageSize*Binning")
                b.derive("readout_height", h, "ImageSize*Binning")
    t = _f(vals, "ExposureTime", p)
    b.read("exposure_time_s", t if t and t > 0 else None, key("ExposureTime"))
    b.read("tilt_angle_deg", _f(vals, "TiltAngle", p), key("TiltAngle"))
    b.read("camera_index", _i(vals, "CameraIndex", p), key("CameraIndex"))
    cam = b.get("camera_index")
    if cam is not None and cam in cameras:
        b.read("camera_name", cameras[cam], "T (Camera -> list)")
    mode = vals.get("OperatingMode")
    # frames
    n = _i(vals, "NumSubFrames", p)
    fdn = _frame_doses(vals.get("FrameDosesAndNumber"), p)
    if n is not None and n > 0:
        b.read("n_frames", n, key("NumSubFrames"))
    elif fdn:
        b.derive("n_frames", sum(c for _, c in fdn), "FrameDosesAndNumber counts")
    # dose
    dose = _f(vals, "ExposureDose", p)
    if dose is not None and dose > 0:
        b.read("total_dose_e_a2", dose, key("ExposureDose"))
    rate = _f(vals, "DoseRate", p)
    b.read("dose_rate", rate, key("DoseRate"))
    if fdn and all(d > 0 for d, _ in fdn):
        if len({round(d, 9) for d, _ in fdn}) == 1:
            b.read("dose_per_frame_e_a2", fdn[0][0], key("FrameDosesAndNumber"))
        if b.get("total_dose_e_a2") is None:
            b.derive("total_dose_e_a2", sum(d * c for d, c in fdn), "FrameDosesAndNumber")
    if b.get("total_dose_e_a2") is None and rate and t and stack_px:
        # DoseRate is electrons per *unbinned* camera pixel per second; PixelSpacing is for
        # the binned image, so the unbinned pixel is PixelSpacing / Binning.
        unbinned = stack_px / (binning if binning else 1.0)
        b.derive("total_dose_e_a2", rate * t / unbinned**2,
                 "DoseRate*ExposureTime/(PixelSpacing/Binning)^2")
    fill_dose_per_frame(b)
    check_pixel_vs_magnification(b, binning if b.get("pixel_size_a") == stack_px else None)
    if fdn and all(d > 0 for d, _ in fdn) and "total_dose_e_a2" not in b.derived:
        total, from_frames = b.get("total_dose_e_a2"), sum(d * c for d, c in fdn)
        per_frame = b.get("dose_per_frame_e_a2")
        if total and abs(from_frames - total) > 0.1 * total:
            b.warn(f"ExposureDose {total:g} e/A^2 disagrees with FrameDosesAndNumber "
                   f"({from_frames:.4g} e/A^2 over {sum(c for _, c in fdn)} frames)"
                   + (f"; dose weighting will use {per_frame:.4g} e/A^2 per frame"
                      if per_frame else "") + " — check which is right")
    # defocus: the target is what the operator set; Defocus is the scope reading
    td = _f(vals, "TargetDefocus", p)
    if td is not None:
        b.read("defocus_um", td, key("TargetDefocus"))
    else:
        b.read("defocus_um", _f(vals, "Defocus", p), key("Defocus"))
    # files
    gain = vals.get("GainReference")
    b.read("gain_reference", gain or None, key("GainReference"))
    b.read("defect_file", vals.get("DefectFile") or None, key("DefectFile"))
    b.read("sub_frame_path", sfp or None, key("SubFramePath"))
    movie = _movie_path_for(p, kind, sfp)
    if movie is not None:
        b.read("movie_path", movie[0], movie[1])
    is_eer = None
    for cand in (sfp, movie[0] if movie else None):
        if cand:
            is_eer = cand.lower().endswith(".eer")
            break
    if is_eer is not None:
        b.derive("eer", is_eer, "SubFramePath suffix")
    if gain and gain.lower().endswith(".gain") and is_eer is None:
        b.derive("eer", True, "GainReference .gain")
    # mode: OperatingMode 1 = counting on K2/K3 (SerialEM); super-resolution from Binning 0.5
    if binning is not None and binning < 1.0:
        b.derive("camera_mode", "super-resolution", "Binning<1")
    elif mode is not None and mode.strip() == "1":
        b.derive("camera_mode", "counting", "OperatingMode=1")
    elif mode is not None and mode.strip() == "0":
        b.derive("camera_mode", "linear", "OperatingMode=0")
    # time
    when = parse_date(vals.get("DateTime"))
    if when is not None:
        b.read("acquired_at", when, key("DateTime"))
    elif kind == "FrameSet":
        b.read("acquired_at", parse_date(header_date), "T (date)")
    return b.build()


def _movie_path_for(p: Path, kind: str, sfp: str | None) -> tuple[str, str] | None:
    """Where the movie of a section is: next to the mdoc when there, else as recorded."""
    if kind == "FrameSet":
        # frame mdocs are named <movie>.mdoc
        stem = p.name[: -len(".mdoc")] if p.name.lower().endswith(".mdoc") else None
        if stem and stem.lower().endswith(MOVIE_SUFFIXES):
            return str(p.with_name(stem)), f"{p.name} (file name)"
    if sfp:
        base = PureWindowsPath(sfp).name if ("\\" in sfp or ":" in sfp) else Path(sfp).name
        for cand in (p.parent / base, p.parent / "frames" / base):
            if cand.exists():
                return str(cand), "SubFramePath (found next to the mdoc)"
        return sfp, "SubFramePath"
    return None


def first_record(path: str | Path) -> MovieRecord:
    """The record of the first section of an mdoc."""
    return parse_mdoc(path).sections[0]
