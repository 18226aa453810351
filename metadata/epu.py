"""EPU metadata: per-movie ``MicroscopeImage`` XML and ``EpuSession.dm``.

EPU (Thermo Fisher) writes one XML per acquisition next to (or apart from) the movie,
serialised by .NET's DataContractSerializer: default namespace
``…/Fei.SharedObjects``, dictionaries as ``a:KeyValueOfstringanyType`` (``Arrays``
namespace) with typed ``a:Value`` elements, SI units (V, m, e/m²). EPU 2.x writes dose
fractions as a ``DoseFractions`` list of frame ranges (``VaridistantFractionation``),
EPU 3.x as ``NumberOffractions`` (``EquidistantFractionation``).

All XML is parsed with :func:`safe_parser`: no DTD loading, no entity resolution, no
network — an external entity in a file is left unresolved, never fetched.
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from metadata.errors import MetadataError
from metadata.record import (
    MovieRecord,
    RecordBuilder,
    SessionRecord,
    check_pixel_vs_magnification,
    fill_dose_per_frame,
)

NS_SO = "http://schemas.datacontract.org/2004/07/Fei.SharedObjects"
NS_ARR = "http://schemas.microsoft.com/2003/10/Serialization/Arrays"
NS_I = "http://www.w3.org/2001/XMLSchema-instance"
NS_DRAW = "http://schemas.datacontract.org/2004/07/System.Drawing"
NS_OMP = "http://schemas.datacontract.org/2004/07/Fei.Applications.Common.Omp.Interface"
NS_SESSION = "http://schemas.datacontract.org/2004/07/Applications.Epu.Persistence"

_SO = f"{{{NS_SO}}}"
_ARR = f"{{{NS_ARR}}}"
_DRAW = f"{{{NS_DRAW}}}"
_OMP = f"{{{NS_OMP}}}"
_NIL = f"{{{NS_I}}}nil"
_KEY = _ARR + "Key"
_VALUE = _ARR + "Value"
_TYPE = f"{{{NS_I}}}type"

#: m² → Å² (dose e/m² → e/Å²)
_M2_TO_A2 = 1e-20

# EPU file names
RE_MOVIE_XML = re.compile(r"^FoilHole_(\d+)_Data_(\d+)_(\d+)_(\d{8})_(\d{6})$")
RE_FOILHOLE_XML = re.compile(r"^FoilHole_(\d+)_(\d{8})_(\d{6})$")
RE_GRIDSQUARE_XML = re.compile(r"^GridSquare_(\d+)_(\d{8})_(\d{6})$")


@functools.cache
def safe_parser() -> etree.XMLParser:
    """The one lxml parser for files from outside: no DTD, no entities, no network.

    ``resolve_entities=False`` keeps ``&ext;`` as an unresolved entity reference,
    ``load_dtd=False`` / ``no_network=True`` stop any fetch, ``huge_tree=False`` keeps
    libxml2's limits against entity-expansion bombs.
    """
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                           dtd_validation=False, huge_tree=False, remove_comments=True,
                           remove_pis=True)


def parse_xml_bytes(data: bytes, path: str | Path | None = None) -> etree._Element:
    """Parse XML bytes safely; malformed/truncated/empty input raises :class:`MetadataError`."""
    if not data.strip():
        raise MetadataError("empty file (not XML)", path)
    try:
        root = etree.fromstring(data, parser=safe_parser())
    except etree.XMLSyntaxError as exc:
        raise MetadataError(f"malformed or truncated XML ({exc.msg})", path) from None
    except (ValueError, etree.LxmlError) as exc:
        raise MetadataError(f"not readable as XML ({exc})", path) from None
    if root is None:
        raise MetadataError("no XML root element", path)
    return root


def read_bytes(path: str | Path) -> bytes:
    """Read a whole file, turning OS errors into :class:`MetadataError`."""
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise MetadataError("file not found", p) from None
    except IsADirectoryError:
        raise MetadataError("is a folder, not a file", p) from None
    except OSError as exc:
        raise MetadataError(f"cannot read ({exc.strerror or exc})", p) from None


# ----------------------------------------------------------------------------- helpers


def _text(el: etree._Element | None) -> str | None:
    """Element text, or ``None`` for a missing, ``i:nil`` or empty element."""
    if el is None or el.get(_NIL) == "true":
        return None
    t = el.text
    if t is None:
        return None
    t = t.strip()
    return t or None


def _num(text: str | None, key: str, path) -> float | None:
    if text is None:
        return None
    try:
        v = float(text)
    except ValueError:
        raise MetadataError(f"{key}: not a number ({text[:40]!r})", path) from None
    if not math.isfinite(v):
        raise MetadataError(f"{key}: not a finite number ({text[:40]!r})", path)
    return v


def _int(text: str | None, key: str, path) -> int | None:
    v = _num(text, key, path)
    if v is None:
        return None
    if v != int(v):
        raise MetadataError(f"{key}: not an integer ({text[:40]!r})", path)
    return int(v)


def _bool(text: str | None) -> bool | None:
    if text is None:
        return None
    t = text.strip().lower()
    if t in ("true", "1"):
        return True
    if t in ("false", "0"):
        return False
    return None


def _positive(v: float | None) -> float | None:
    """EPU writes 0 for values it does not know (dose without calibration…): that is ``None``."""
    return v if v is not None and v > 0 else None


def _kv_dict(parent: etree._Element | None) -> dict[str, etree._Element]:
    """``a:KeyValueOfstringanyType`` children → {key: value element}."""
    out: dict[str, etree._Element] = {}
    if parent is None:
        return out
    # DataContractSerializer always writes <Key> then <Value>; index access is much faster
    # than find() and this runs for every file of a session
    for kv in parent:
        if len(kv) < 2:
            continue
        k, v = kv[0], kv[1]
        if k.tag == _KEY and v.tag == _VALUE and k.text:
            out[k.text.strip()] = v
    return out


def _parse_time(text: str | None, key: str, path) -> _dt.datetime | None:
    if text is None:
        return None
    t = text.strip()
    # .NET writes 7 fractional digits; Python ≥3.11 accepts them, older needs trimming
    m = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)$", t)
    if m and m.group(2) and len(m.group(2)) > 7:
        t = m.group(1) + m.group(2)[:7] + m.group(3)
    if t.endswith("Z"):
        t = t[:-1] + "+00:00"
    try:
        return _dt.datetime.fromisoformat(t)
    except ValueError:
        raise MetadataError(f"{key}: not a date/time ({text[:40]!r})", path) from None


# ----------------------------------------------------------------------------- names


@dataclass(frozen=True)
class EpuName:
    """What an EPU file name says: ``kind`` is ``movie``, ``foilhole``, ``gridsquare`` or ``unknown``."""

    kind: str
    foil_hole_id: int | None = None
    grid_square_id: int | None = None
    data_id: int | None = None
    index: int | None = None
    stamp: str | None = None


def classify_name(name: str) -> EpuName:
    """Classify an EPU XML (or movie) file name by its stem.

    Movie suffixes (``_fractions``, ``_Fractions``, ``_EER``) are stripped first, so a movie
    file name gives the same answer as its XML.
    """
    stem = name
    for suf in (".xml", ".tiff", ".tif", ".mrc", ".eer", ".jpg"):
        if stem.lower().endswith(suf):
            stem = stem[: -len(suf)]
            break
    for suf in ("_fractions", "_Fractions", "_EER"):
        if stem.endswith(suf):
            stem = stem[: -len(suf)]
            break
    m = RE_MOVIE_XML.match(stem)
    if m:
        return EpuName("movie", foil_hole_id=int(m.group(1)), data_id=int(m.group(2)),
                       index=int(m.group(3)), stamp=f"{m.group(4)}_{m.group(5)}")
    m = RE_FOILHOLE_XML.match(stem)
    if m:
        return EpuName("foilhole", foil_hole_id=int(m.group(1)), stamp=f"{m.group(2)}_{m.group(3)}")
    m = RE_GRIDSQUARE_XML.match(stem)
    if m:
        return EpuName("gridsquare", grid_square_id=int(m.group(1)),
                       stamp=f"{m.group(2)}_{m.group(3)}")
    return EpuName("unknown")


# ----------------------------------------------------------------------------- movie XML


def parse_movie_xml(path: str | Path, data: bytes | None = None) -> MovieRecord:
    """Read one EPU per-movie XML into a :class:`~metadata.record.MovieRecord`.

    Parameters
    ----------
    path
        ``FoilHole_<hole>_Data_<…>.xml``. A grid-square or foil-hole *image* XML is refused.
    data
        The file's bytes, when already read.

    Returns
    -------
    MovieRecord
        Values in scopeside units (kV, Å, e/Å², µm, s) with provenance. ``movie_path`` is not
        set (see :mod:`metadata.session`); ``pixel_size_a`` is the XML's pixel size, valid for
        an image of the readout-area size until a movie header settles it.

    Raises
    ------
    MetadataError
        Unreadable/malformed XML, not a ``MicroscopeImage``, or a hole/grid-square image.
    """
    p = Path(path)
    name = classify_name(p.name)
    if name.kind in ("foilhole", "gridsquare"):
        what = "a foil-hole image" if name.kind == "foilhole" else "a grid-square image"
        raise MetadataError(f"not an EPU movie XML ({what}, skipped)", p)
    root = parse_xml_bytes(read_bytes(p) if data is None else data, p)
    if root.tag != _SO + "MicroscopeImage":
        raise MetadataError(
            f"not an EPU MicroscopeImage XML (root element {etree.QName(root).localname!r})", p)
    return _movie_from_root(root, p, name)


def _movie_from_root(root: etree._Element, p: Path, name: EpuName) -> MovieRecord:
    b = RecordBuilder(p)
    b.extra("metadata_path", str(p))
    b.extra("foil_hole_id", name.foil_hole_id)
    gs = re.match(r"^GridSquare_(\d+)$", p.parent.parent.name) if p.parent.name == "Data" else None
    if gs:
        b.extra("grid_square_id", int(gs.group(1)))

    custom = _kv_dict(root.find(_SO + "CustomData"))
    md = root.find(_SO + "microscopeData")
    if md is None:
        raise MetadataError("no microscopeData element (not an EPU acquisition XML)", p)
    acq = md.find(_SO + "acquisition")
    cam = acq.find(_SO + "camera") if acq is not None else None
    csi = _kv_dict(cam.find(_SO + "CameraSpecificInput")) if cam is not None else {}
    core = md.find(_SO + "core")
    gun = md.find(_SO + "gun")
    inst = md.find(_SO + "instrument")
    optics = md.find(_SO + "optics")

    if "FindFoilHoleCenterResults" in custom:
        raise MetadataError("not an EPU movie XML (a foil-hole image, skipped)", p)

    # one pass over each parent's children instead of a find() per field (10,000-file sessions)
    maps: dict = {}

    def child(parent, tag):
        if parent is None:
            return None
        m = maps.get(parent)
        if m is None:
            m = maps[parent] = {c.tag: c for c in parent}
        return m.get(_SO + tag)

    # software
    b.read("software", _text(child(core, "ApplicationSoftware")), "core/ApplicationSoftware")
    b.read("software_version", _text(child(core, "ApplicationSoftwareVersion")),
           "core/ApplicationSoftwareVersion")
    # instrument
    b.read("microscope_id", _text(child(inst, "InstrumentID")), "instrument/InstrumentID")
    model = _text(child(inst, "InstrumentModel"))
    b.read("instrument_model", model, "instrument/InstrumentModel")
    b.read("microscope", model, "instrument/InstrumentModel")
    # optics
    volts = _positive(_num(_text(child(gun, "AccelerationVoltage")), "gun/AccelerationVoltage", p))
    b.read("voltage_kv", volts / 1000.0 if volts else None, "gun/AccelerationVoltage")
    tm = child(optics, "TemMagnification")
    mag = _num(_text(child(tm, "NominalMagnification")), "NominalMagnification", p)
    b.read("magnification", int(round(mag)) if mag and mag > 0 else None,
           "optics/TemMagnification/NominalMagnification")
    b.read("spot_size", _int(_text(child(optics, "SpotIndex")), "optics/SpotIndex", p), "optics/SpotIndex")
    bd = _positive(_num(_text(child(optics, "BeamDiameter")), "optics/BeamDiameter", p))
    b.read("beam_diameter_um", bd * 1e6 if bd else None, "optics/BeamDiameter")
    ef = child(optics, "EnergyFilter")
    if ef is not None and _bool(_text(child(ef, "EnergySelectionSlitInserted"))):
        b.read("slit_width_ev", _num(_text(child(ef, "EnergySelectionSlitWidth")),
                                     "EnergySelectionSlitWidth", p),
               "optics/EnergyFilter/EnergySelectionSlitWidth")
    # pixel size (m → Å)
    ps = root.find(f"{_SO}SpatialScale/{_SO}pixelSize/{_SO}x/{_SO}numericValue")
    px = _positive(_num(_text(ps), "SpatialScale/pixelSize/x", p))
    b.read("pixel_size_a", px * 1e10 if px else None, "SpatialScale/pixelSize/x/numericValue")
    # acquisition
    b.read("acquired_at", _parse_time(_text(child(acq, "acquisitionDateTime")),
                                      "acquisitionDateTime", p), "acquisition/acquisitionDateTime")
    if cam is not None:
        b.read("camera_name", _text(child(cam, "Name")), "camera/Name")
        binning = child(cam, "Binning")
        if binning is not None:
            b.read("binning", _num(_text(binning.find(_DRAW + "x")), "camera/Binning/x", p),
                   "camera/Binning/x")
        ra = child(cam, "ReadoutArea")
        if ra is not None:
            b.read("readout_width", _int(_text(ra.find(_DRAW + "width")), "ReadoutArea/width", p),
                   "camera/ReadoutArea/width")
            b.read("readout_height", _int(_text(ra.find(_DRAW + "height")), "ReadoutArea/height", p),
                   "camera/ReadoutArea/height")
        b.read("exposure_time_s", _positive(_num(_text(child(cam, "ExposureTime")),
                                                 "camera/ExposureTime", p)), "camera/ExposureTime")
    # camera specific input
    srf = csi.get("SuperResolutionFactor")
    b.read("super_resolution_factor", _int(_text(srf), "SuperResolutionFactor", p),
           "CameraSpecificInput/SuperResolutionFactor")
    counting = _bool(_text(csi.get("ElectronCountingEnabled")))
    frac = csi.get("FractionationSettings")
    if frac is not None and frac.get(_NIL) != "true":
        nf = frac.find(_OMP + "NumberOffractions")
        dfs = frac.find(_OMP + "DoseFractions")
        if nf is not None:
            b.read("n_frames", _int(_text(nf), "NumberOffractions", p),
                   "FractionationSettings/NumberOffractions")
        elif dfs is not None:
            entries = list(dfs)
            if entries:
                b.read("n_frames", len(entries), "FractionationSettings/DoseFractions")
                ends = [_int(_text(e.find(_OMP + "EndFrameNumber")), "EndFrameNumber", p) for e in entries]
                ends = [e for e in ends if e is not None]
                if ends:
                    b.read("n_raw_frames", max(ends), "FractionationSettings/DoseFractions/EndFrameNumber")

    # custom data
    cam_name = b.get("camera_name") or _text(custom.get("BinaryResult.Detector"))
    commercial = None
    for key in (f"Detectors[{cam_name}].CommercialName", "DetectorCommercialName"):
        commercial = _text(custom.get(key))
        if commercial:
            b.read("detector_commercial_name", commercial, f"CustomData/{key}")
            break
    if counting is None:
        counting = _bool(_text(custom.get(f"Detectors[{cam_name}].ElectronCounted")))
    dose = _positive(_num(_text(custom.get("Dose")), "CustomData/Dose", p))
    b.read("total_dose_e_a2", dose * _M2_TO_A2 if dose else None, "CustomData/Dose")
    b.read("dose_on_camera", _num(_text(custom.get("DoseOnCamera")), "DoseOnCamera", p),
           "CustomData/DoseOnCamera")
    b.read("dose_rate", _num(_text(custom.get("DoseRate")), "DoseRate", p), "CustomData/DoseRate")
    df = _num(_text(custom.get("AppliedDefocus")), "AppliedDefocus", p)
    b.read("defocus_um", df * 1e6 if df is not None else None, "CustomData/AppliedDefocus")

    # EER: any Detectors[...].EerGainReference marks an EER acquisition (Falcon 4/4i)
    eer_key = next((k for k in custom if k.startswith("Detectors[") and k.endswith("].EerGainReference")),
                   None)
    if eer_key is not None:
        det = eer_key[len("Detectors["):-len("].EerGainReference")]
        b.read("eer", True, f"CustomData/{eer_key}")
        b.read("gain_reference", _text(custom[eer_key]), f"CustomData/{eer_key}")
        rate_key = f"Detectors[{det}].FrameRate"
        rate = _positive(_num(_text(custom.get(rate_key)), rate_key, p))
        b.read("eer_frame_rate_hz", rate, f"CustomData/{rate_key}")
        t = b.get("exposure_time_s")
        if rate and t:
            # EER stores every camera frame: exposure time × frame rate of them
            b.derive("n_frames", int(math.floor(t * rate + 1e-6)), "exposure_time_s*FrameRate")
    elif b.get("camera_name") is not None:
        b.derive("eer", False, "no Detectors[…].EerGainReference in CustomData")

    # camera mode
    sr = b.get("super_resolution_factor")
    binning = b.get("binning")
    if counting is not None:
        if counting and sr and sr > 1 and binning is not None and binning < sr:
            mode = "super-resolution"
        elif counting:
            mode = "counting"
        else:
            mode = "linear"
        b.derive("camera_mode", mode, "ElectronCountingEnabled,SuperResolutionFactor,Binning")
        b.derive("super_resolution", mode == "super-resolution",
                 "SuperResolutionFactor>1 and Binning<SuperResolutionFactor")
    fill_dose_per_frame(b)
    check_pixel_vs_magnification(b, b.get("binning"))
    return b.build()


def read_epu_xml_kind(path: str | Path, data: bytes | None = None) -> str:
    """``movie``, ``foilhole`` or ``gridsquare`` for an EPU ``MicroscopeImage`` XML.

    Uses the file name when it follows EPU's naming, the content otherwise.
    """
    p = Path(path)
    name = classify_name(p.name)
    if name.kind != "unknown":
        return name.kind
    root = parse_xml_bytes(read_bytes(p) if data is None else data, p)
    if root.tag != _SO + "MicroscopeImage":
        raise MetadataError("not an EPU MicroscopeImage XML", p)
    custom = _kv_dict(root.find(_SO + "CustomData"))
    return "foilhole" if "FindFoilHoleCenterResults" in custom else "movie"


# ----------------------------------------------------------------------------- EpuSession.dm


@dataclass
class EpuSessionFile:
    """The facts scopeside takes from ``EpuSession.dm``."""

    path: Path
    name: str | None
    storage_folders: list[str] = field(default_factory=list)
    dose_fractions_output_format: str | None = None
    image_file_format: str | None = None
    started_at: _dt.datetime | None = None
    epu_version: str | None = None
    clustering_mode: str | None = None

    def to_session_record(self) -> SessionRecord:
        src = {}
        f = str(self.path)
        for fld, key, val in (
            ("name", "Name", self.name),
            ("storage_folders", "StorageFolders/StorageFolderXml/Path", self.storage_folders or None),
            ("dose_fractions_output_format", "DoseFractionsOutputFormat", self.dose_fractions_output_format),
            ("image_file_format", "ImageFileFormat", self.image_file_format),
            ("started_at", "StartDateTime", self.started_at),
            ("software_version", "@z:Assembly", self.epu_version),
        ):
            if val is not None:
                src[fld] = f"{f}:{key}"
        return SessionRecord(
            software="EPU", software_version=self.epu_version, name=self.name,
            path=str(self.path.parent), session_file=str(self.path),
            storage_folders=list(self.storage_folders),
            dose_fractions_output_format=self.dose_fractions_output_format,
            image_file_format=self.image_file_format, started_at=self.started_at, source=src)


def parse_session_dm(path: str | Path, data: bytes | None = None) -> EpuSessionFile:
    """Read ``EpuSession.dm`` (``EpuSessionXml``): name, storage folders, output formats.

    Raises
    ------
    MetadataError
        Unreadable or malformed file, or not an ``EpuSessionXml``.
    """
    p = Path(path)
    root = parse_xml_bytes(read_bytes(p) if data is None else data, p)
    if etree.QName(root).localname != "EpuSessionXml":
        raise MetadataError(
            f"not an EpuSession.dm (root element {etree.QName(root).localname!r})", p)
    ns = f"{{{etree.QName(root).namespace}}}" if etree.QName(root).namespace else ""

    def top(tag):
        return _text(root.find(ns + tag))

    folders: list[str] = []
    sf = root.find(ns + "StorageFolders")
    if sf is not None:
        for el in sf.iter(ns + "StorageFolderXml"):
            path_text = _text(el.find(ns + "Path"))
            if path_text:
                folders.append(path_text)
    version = None
    assembly = root.get("{http://schemas.microsoft.com/2003/10/Serialization/}Assembly") or ""
    m = re.search(r"Version=([\d.]+)", assembly)
    if m:
        version = m.group(1)
    return EpuSessionFile(
        path=p, name=top("Name"), storage_folders=folders,
        dose_fractions_output_format=top("DoseFractionsOutputFormat"),
        image_file_format=top("ImageFileFormat"),
        started_at=_parse_time(top("StartDateTime"), "StartDateTime", p),
        epu_version=version, clustering_mode=top("ClusteringMode"))
