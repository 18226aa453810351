"""Writers of synthetic acquisition metadata in the real EPU / SerialEM formats.

Used by the metadata tests and by the simulator to build synthetic sessions with
known ground truth. The EPU files follow the real schema (default namespace
``http://schemas.datacontract.org/2004/07/Fei.SharedObjects`` with the
``Serialization/Arrays``, ``System.Drawing``, ``Fei.Types``, ``Fei.Common.Types``
and ``Fei.Applications.Common.Omp.Interface`` namespaces, element order as EPU 2.x/3.x
writes it), so :mod:`metadata.epu` reads them exactly like files from a microscope.

Public API
----------
- :func:`epu_movie_xml` / :func:`write_epu_movie_xml` : per-movie ``FoilHole_*_Data_*.xml``
- :func:`write_epu_image_xml` : grid-square / foil-hole image XML (not a movie)
- :func:`write_epu_session_dm` : ``EpuSession.dm``
- :func:`write_epu_session` : a whole EPU folder tree (``Images-Disc1/GridSquare_*/Data``),
  optional movie files via a callback, optional separate movie storage root
- :func:`epu_movie_stem` : the EPU name of one acquisition (``FoilHole_<hole>_Data_…``)
- :func:`mdoc_text` / :func:`write_mdoc` : SerialEM / Tomography 5 mdoc variants
- :func:`write_movie_stub` : a tiny MRC / TIFF movie with the right header (zeros)
- :func:`write_dm4_image` : a Gatan DigitalMicrograph 4 image (SerialEM's K2/K3 gain
  references, ``CountRef_*.dm4``), enough of the tag tree for DM readers
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

__all__ = [
    "SyntheticMovie",
    "epu_movie_stem",
    "epu_movie_xml",
    "write_epu_movie_xml",
    "write_epu_image_xml",
    "epu_session_dm",
    "write_epu_session_dm",
    "write_epu_session",
    "mdoc_text",
    "write_mdoc",
    "write_dm4_image",
    "write_movie_stub",
    "MOVIE_SUFFIXES",
]

NS_SO = "http://schemas.datacontract.org/2004/07/Fei.SharedObjects"
NS_I = "http://www.w3.org/2001/XMLSchema-instance"
NS_ARR = "http://schemas.microsoft.com/2003/10/Serialization/Arrays"
NS_XSD = "http://www.w3.org/2001/XMLSchema"
NS_DRAW = "http://schemas.datacontract.org/2004/07/System.Drawing"
NS_TYPES = "http://schemas.datacontract.org/2004/07/Fei.Types"
NS_CTYPES = "http://schemas.datacontract.org/2004/07/Fei.Common.Types"
NS_OMP = "http://schemas.datacontract.org/2004/07/Fei.Applications.Common.Omp.Interface"
NS_MEDIA = "http://schemas.datacontract.org/2004/07/System.Windows.Media"

#: movie file suffix EPU appends to the XML stem, by output format
MOVIE_SUFFIXES = {
    "tiff": "_fractions.tiff",
    "mrc": "_Fractions.mrc",
    "eer": "_EER.eer",
}

_DEFAULT_TIME = _dt.datetime(2024, 5, 17, 10, 30, 0, tzinfo=_dt.UTC)


def _fmt(x: float) -> str:
    """Format a float the way .NET's DataContractSerializer does (R format, E+ exponent)."""
    r = repr(float(x))
    if "e" in r:
        mant, exp = r.split("e")
        sign = "-" if exp.startswith("-") else "+"
        return f"{mant.upper()}E{sign}{int(exp.lstrip('+-')):02d}"
    if r.endswith(".0"):
        r = r[:-2]
    return r


def _kv(key: str, value: object, xsd_type: str) -> str:
    return (
        "<a:KeyValueOfstringanyType>"
        f"<a:Key>{escape(key)}</a:Key>"
        f'<a:Value xmlns:b="{NS_XSD}" i:type="b:{xsd_type}">{escape(str(value))}</a:Value>'
        "</a:KeyValueOfstringanyType>"
    )


def _bool(v: bool) -> str:
    return "true" if v else "false"


def _unit() -> str:
    return (
        f'<unit xmlns:a="{NS_CTYPES}">'
        "<a:_x003C_PrefixExponent_x003E_k__BackingField>1</a:_x003C_PrefixExponent_x003E_k__BackingField>"
        "<a:_x003C_Symbol_x003E_k__BackingField>m</a:_x003C_Symbol_x003E_k__BackingField></unit>"
    )


def _fractionation(kind: str | None, n_fractions: int | None, n_raw_frames: int | None) -> str:
    if kind is None or n_fractions is None:
        return (
            "<a:KeyValueOfstringanyType><a:Key>FractionationSettings</a:Key>"
            '<a:Value i:nil="true"/></a:KeyValueOfstringanyType>'
        )
    if kind == "equidistant":
        body = f"<b:NumberOffractions>{int(n_fractions)}</b:NumberOffractions>"
        typ = "EquidistantFractionation"
    elif kind == "varidistant":
        total = int(n_raw_frames) if n_raw_frames else int(n_fractions)
        if total < n_fractions:
            raise ValueError("n_raw_frames must be >= n_fractions")
        # split total raw frames into n_fractions contiguous ranges, the remainder in the last
        per = total // n_fractions
        defs = []
        start = 1
        for k in range(n_fractions):
            end = total if k == n_fractions - 1 else start + per - 1
            defs.append(
                '<a:anyType i:type="b:DoseFractionDefinition">'
                f"<b:EndFrameNumber>{end}</b:EndFrameNumber>"
                f"<b:StartFrameNumber>{start}</b:StartFrameNumber></a:anyType>"
            )
            start = end + 1
        body = f"<b:DoseFractions>{''.join(defs)}</b:DoseFractions>"
        typ = "VaridistantFractionation"
    else:
        raise ValueError(f"unknown fractionation kind {kind!r}")
    return (
        "<a:KeyValueOfstringanyType><a:Key>FractionationSettings</a:Key>"
        f'<a:Value xmlns:b="{NS_OMP}" i:type="b:{typ}">{body}</a:Value>'
        "</a:KeyValueOfstringanyType>"
    )


def epu_movie_xml(
    *,
    voltage_kv: float | None = 300.0,
    pixel_size_a: float | None = 1.0,
    n_fractions: int | None = 40,
    dose_e_a2: float | None = 40.0,
    exposure_time_s: float | None = 2.0,
    magnification: int | None = 105000,
    defocus_um: float | None = -1.5,
    readout_width: int = 4096,
    readout_height: int = 4096,
    binning: int = 1,
    super_resolution_factor: int | None = 1,
    camera_name: str = "BM-Falcon",
    detector_commercial_name: str | None = None,
    counting: bool | None = True,
    fractionation: str | None = "equidistant",
    n_raw_frames: int | None = None,
    eer_frame_rate_hz: float | None = None,
    eer_gain_reference: str | None = None,
    dose_on_camera: float | None = None,
    dose_rate: float | None = None,
    slit_width_ev: float | None = None,
    spot_size: int | None = 5,
    beam_diameter_um: float | None = 1.0,
    instrument_id: str | int | None = 3299,
    instrument_model: str | None = None,
    epu_version: str | None = "3.1.0.4506",
    acquired_at: _dt.datetime | None = None,
    kind: str = "movie",
    extra_custom: dict[str, tuple[object, str]] | None = None,
    pretty: bool = False,
) -> str:
    """Text of an EPU ``MicroscopeImage`` XML in the real schema.

    Parameters
    ----------
    voltage_kv, pixel_size_a, dose_e_a2, defocus_um, exposure_time_s, magnification
        Written in EPU's SI units (V, m, e/m², m); ``None`` leaves the element out
        (``i:nil`` where EPU writes nil) so the parser must report ``None``.
    n_fractions
        Number of dose fractions. ``fractionation`` picks how EPU records it:
        ``"equidistant"`` (``NumberOffractions``, EPU 3), ``"varidistant"``
        (``DoseFractions`` list of frame ranges, EPU 2 / Falcon 3) or ``None``.
    readout_width, readout_height, binning, super_resolution_factor
        ``camera/ReadoutArea``, ``camera/Binning`` and ``SuperResolutionFactor``.
    camera_name, detector_commercial_name
        ``camera/Name`` (e.g. ``BM-Falcon``, ``EF-CCD``, ``EF-Falcon``) and
        ``Detectors[<name>].CommercialName`` (e.g. ``BioQuantum K3``).
    eer_frame_rate_hz, eer_gain_reference
        When given, written as ``Detectors[<camera_name>].FrameRate`` and
        ``…EerGainReference`` (EER acquisition, Falcon 4/4i).
    kind
        ``"movie"`` (default), ``"foilhole"`` (adds ``FindFoilHoleCenterResults``,
        no fractionation) or ``"gridsquare"``.
    pretty
        Pretty-print (as some repositories store them); EPU itself writes one line.

    Returns
    -------
    str
        The XML document (no XML declaration, as EPU writes it).
    """
    when = acquired_at or _DEFAULT_TIME
    custom = []
    if dose_on_camera is not None:
        custom.append(_kv("DoseOnCamera", _fmt(dose_on_camera), "double"))
    custom.append(_kv("Aperture[C2].Name", "50", "string"))
    custom.append(_kv("Aperture[OBJ].Name", "100", "string"))
    if detector_commercial_name:
        custom.append(_kv(f"Detectors[{camera_name}].CommercialName", detector_commercial_name, "string"))
    if counting is not None:
        custom.append(_kv(f"Detectors[{camera_name}].ElectronCounted", _bool(counting), "boolean"))
    if eer_frame_rate_hz is not None:
        custom.append(_kv(f"Detectors[{camera_name}].FrameRate", _fmt(eer_frame_rate_hz), "double"))
    if eer_gain_reference is not None:
        custom.append(_kv(f"Detectors[{camera_name}].EerGainReference", eer_gain_reference, "string"))
    if dose_rate is not None:
        custom.append(_kv("DoseRate", _fmt(dose_rate), "double"))
    if dose_e_a2 is not None:
        custom.append(_kv("Dose", _fmt(dose_e_a2 * 1e20), "double"))
    custom.append(_kv("PhasePlateUsed", "false", "boolean"))
    custom.append(_kv("BinaryResult.Detector", camera_name, "string"))
    if detector_commercial_name:
        custom.append(_kv("DetectorCommercialName", detector_commercial_name, "string"))
    if kind == "foilhole":
        custom.append(
            "<a:KeyValueOfstringanyType><a:Key>FindFoilHoleCenterResults</a:Key>"
            f'<a:Value xmlns:b="{NS_OMP}" i:type="b:FindFoilHoleCenterResults">'
            "<b:Center><b:x>1500.5</b:x><b:y>1275.3</b:y></b:Center><b:Quality>0.8</b:Quality>"
            "</a:Value></a:KeyValueOfstringanyType>"
        )
    if defocus_um is not None:
        custom.append(_kv("AppliedDefocus", _fmt(defocus_um * 1e-6), "double"))
    for key, (value, typ) in (extra_custom or {}).items():
        custom.append(_kv(key, value, typ))

    csi = [_kv("AlignIntegratedImageEnabled", "false", "boolean")]
    if super_resolution_factor is not None:
        csi.append(_kv("SuperResolutionFactor", int(super_resolution_factor), "int"))
    if kind == "movie":
        csi.append(_fractionation(fractionation, n_fractions, n_raw_frames))
    else:
        csi.append(_fractionation(None, None, None))
    if counting is not None:
        csi.append(_kv("ElectronCountingEnabled", _bool(counting), "boolean"))
    csi.append(_kv("CetaFramesSummed", 1, "int"))

    px = "" if pixel_size_a is None else _fmt(pixel_size_a * 1e-10)
    pixel_xml = (
        "<pixelSize>"
        f"<x><numericValue>{px}</numericValue>{_unit()}</x>"
        f"<y><numericValue>{px}</numericValue>{_unit()}</y></pixelSize>"
        if pixel_size_a is not None
        else ""
    )
    energy = (
        "<EnergyFilter><AccelerationVoltageOffset>0</AccelerationVoltageOffset>"
        "<DriftTubeVoltage>0</DriftTubeVoltage>"
        "<EnergySelectionSlitInserted>true</EnergySelectionSlitInserted>"
        f"<EnergySelectionSlitWidth>{_fmt(slit_width_ev)}</EnergySelectionSlitWidth>"
        "<EnergyShift>0</EnergyShift></EnergyFilter>"
        if slit_width_ev is not None
        else '<EnergyFilter i:nil="true"/>'
    )
    model = instrument_model or (f"TITAN5233{int(instrument_id):04d}" if str(instrument_id).isdigit() else "")
    parts = [
        f'<MicroscopeImage xmlns="{NS_SO}" xmlns:i="{NS_I}">',
        "<name>Empty</name><uniqueID>00000000-0000-0000-0000-000000000000</uniqueID>",
        f'<CustomData xmlns:a="{NS_ARR}">{"".join(custom)}</CustomData>',
        '<IntensityScale i:nil="true"/>',
        f"<SpatialScale>{pixel_xml}</SpatialScale>",
        "<microscopeData><acquisition>",
        f"<acquisitionDateTime>{when.isoformat()}</acquisitionDateTime><analyticalDetectors/>",
        "<camera>",
        f'<Binning xmlns:a="{NS_DRAW}"><a:x>{int(binning)}</a:x><a:y>{int(binning)}</a:y></Binning>',
        f"<CameraLocation>{'EnergyFilter' if camera_name.startswith('EF') else 'BottomMounted'}</CameraLocation>",
        f'<CameraSpecificInput xmlns:a="{NS_ARR}">{"".join(csi)}</CameraSpecificInput>',
        "<DarkGainCorrection>None</DarkGainCorrection>",
        f"<ExposureTime>{_fmt(exposure_time_s)}</ExposureTime>" if exposure_time_s is not None else "",
        f"<Inserted>true</Inserted><Name>{escape(camera_name)}</Name>",
        "<PreExposurePauseTime>0</PreExposurePauseTime><PreExposureSupported>false</PreExposureSupported>"
        "<PreExposureTime>0</PreExposureTime>",
        f'<ReadoutArea xmlns:a="{NS_DRAW}"><a:height>{int(readout_height)}</a:height>'
        f"<a:width>{int(readout_width)}</a:width><a:x>0</a:x><a:y>0</a:y></ReadoutArea>",
        "<Shutter>PreSpecimen</Shutter></camera></acquisition>",
        "<core><ApplicationSoftware>EPU</ApplicationSoftware>",
        f"<ApplicationSoftwareVersion>{escape(epu_version)}</ApplicationSoftwareVersion>"
        if epu_version
        else '<ApplicationSoftwareVersion i:nil="true"/>',
        "<Guid>00000000-0000-0000-0000-000000000001</Guid></core>",
        "<gun>",
        f"<AccelerationVoltage>{_fmt(voltage_kv * 1000.0)}</AccelerationVoltage>" if voltage_kv is not None else "",
        "<Sourcetype>FieldEmission</Sourcetype></gun>",
        '<instrument><AcquisitionSoftware i:nil="true"/><AcquisitionSoftwareVersion i:nil="true"/>',
        f"<ComputerName>{escape(model)}</ComputerName>",
        f"<InstrumentID>{escape(str(instrument_id))}</InstrumentID>" if instrument_id is not None else "",
        f"<InstrumentModel>{escape(model)}</InstrumentModel></instrument>",
        "<optics>",
        f"<BeamDiameter>{_fmt(beam_diameter_um * 1e-6)}</BeamDiameter>" if beam_diameter_um is not None else "",
        f'<BeamShift xmlns:a="{NS_TYPES}"><a:_x>0</a:_x><a:_y>0</a:_y></BeamShift>',
        "<ColumnOperatingMode>TEM</ColumnOperatingMode>",
        f"<Defocus>{_fmt((defocus_um or 0.0) * 1e-6 * 0.9)}</Defocus>",
        f"<EFTEMOn>{_bool(slit_width_ev is not None)}</EFTEMOn>",
        energy,
        "<IlluminationMode>Parallel</IlluminationMode><ProbeMode>NanoProbe</ProbeMode>",
        "<ProjectorMode>Imaging</ProjectorMode>",
        f"<SpotIndex>{int(spot_size)}</SpotIndex>" if spot_size is not None else "",
        "<TemMagnification>",
        f"<NominalMagnification>{int(magnification)}</NominalMagnification>" if magnification is not None else "",
        "</TemMagnification></optics>",
        "<stage><Holder>Unspecified</Holder><Position><A>0</A><B>0</B><X>0</X><Y>0</Y><Z>0</Z></Position></stage>",
        "</microscopeData></MicroscopeImage>",
    ]
    text = "".join(parts)
    if pretty:
        from lxml import etree

        text = etree.tostring(etree.fromstring(text.encode()), pretty_print=True).decode()
    return text


def write_epu_movie_xml(path: str | Path, **kwargs) -> Path:
    """Write :func:`epu_movie_xml` ``(**kwargs)`` to ``path`` (UTF-8, with BOM-less bytes as EPU).

    Returns
    -------
    Path
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(epu_movie_xml(**kwargs), encoding="utf-8")
    return path


def write_epu_image_xml(path: str | Path, *, kind: str = "foilhole", **kwargs) -> Path:
    """Write a grid-square or foil-hole image XML (``kind`` ``"gridsquare"``/``"foilhole"``).

    These share the ``MicroscopeImage`` schema but are not movies: no fractionation,
    and hole images carry ``FindFoilHoleCenterResults``.
    """
    kwargs.setdefault("magnification", 11500 if kind == "foilhole" else 2250)
    kwargs.setdefault("pixel_size_a", 16.36 if kind == "foilhole" else 85.0)
    kwargs.setdefault("exposure_time_s", 1.0)
    return write_epu_movie_xml(path, kind=kind, **kwargs)


def epu_movie_stem(foil_hole_id: int, data_id: int, index: int, when: _dt.datetime) -> str:
    """EPU 3 name of one acquisition: ``FoilHole_<hole>_Data_<data>_<index>_<YYYYMMDD>_<HHMMSS>``."""
    return f"FoilHole_{foil_hole_id}_Data_{data_id}_{index}_{when:%Y%m%d_%H%M%S}"


def epu_session_dm(
    *,
    name: str = "Supervisor_20240517_103000_synthetic_EPU",
    storage_folders: Sequence[str] = (r"Z:\DoseFractions\synthetic",),
    dose_fractions_output_format: str = "Tiff Lzw Non-Gain normalized",
    image_file_format: str = "Mrc",
    epu_version: str = "3.9.1.8206",
    start: _dt.datetime | None = None,
    clustering_mode: str = "ClusteringWithImageBeamShift",
) -> str:
    """Text of an ``EpuSession.dm`` (``EpuSessionXml``, as EPU 3 writes it).

    ``storage_folders`` are Windows paths, one ``StorageFolderXml`` each (``DiscId`` 1, 2…).
    """
    start = start or _DEFAULT_TIME
    z = "http://schemas.microsoft.com/2003/10/Serialization/"
    folders = "".join(
        f'<StorageFolderXml z:Id="{100 + k}">'
        '<Id xmlns="http://schemas.datacontract.org/2004/07/Fei.Applications.Common.Types">'
        f"{9000 + k}</Id><DiscId>{k + 1}</DiscId><Path z:Id=\"{200 + k}\">{escape(p)}</Path>"
        '<SessionName z:Ref="5" i:nil="true"/></StorageFolderXml>'
        for k, p in enumerate(storage_folders)
    )
    major, minor, *_ = (epu_version.split(".") + ["0", "0"])
    return (
        '<?xml version="1.0"?>\n'
        '<EpuSessionXml xmlns="http://schemas.datacontract.org/2004/07/Applications.Epu.Persistence" '
        f'xmlns:i="{NS_I}" xmlns:z="{z}" z:Id="1" z:Type="Applications.Epu.Persistence.EpuSessionXml" '
        f'z:Assembly="Applications.Epu.Persistence, Version={escape(epu_version)}, Culture=neutral, '
        'PublicKeyToken=null">\n'
        '  <Id xmlns="http://schemas.datacontract.org/2004/07/Fei.Applications.Common.Types">1</Id>\n'
        f"  <ClusteringMode>{escape(clustering_mode)}</ClusteringMode>\n"
        f'  <DoseFractionsOutputFormat z:Id="4">{escape(dose_fractions_output_format)}</DoseFractionsOutputFormat>\n'
        f"  <ImageFileFormat>{escape(image_file_format)}</ImageFileFormat>\n"
        '  <MicroscopeName i:nil="true"/>\n'
        f'  <Name z:Id="5">{escape(name)}</Name>\n'
        f"  <StartDateTime>{start.isoformat()}</StartDateTime>\n"
        f'  <StorageFolders z:Id="789"><_items z:Id="790" z:Size="4">{folders}'
        '<StorageFolderXml i:nil="true"/></_items>'
        f"<_size>{len(storage_folders)}</_size><_version>1</_version></StorageFolders>\n"
        f'  <Version xmlns:a="http://schemas.datacontract.org/2004/07/System" z:Id="793"><a:_Build>0</a:_Build>'
        f"<a:_Major>{escape(major)}</a:_Major><a:_Minor>{escape(minor)}</a:_Minor>"
        "<a:_Revision>0</a:_Revision></Version>\n"
        "</EpuSessionXml>"
    )


def write_epu_session_dm(path: str | Path, **kwargs) -> Path:
    """Write :func:`epu_session_dm` ``(**kwargs)`` to ``path`` (a file or a folder → ``EpuSession.dm``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "EpuSession.dm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(epu_session_dm(**kwargs), encoding="utf-8")
    return path


@dataclass(frozen=True)
class SyntheticMovie:
    """One acquisition written by :func:`write_epu_session`."""

    xml_path: Path
    movie_path: Path
    grid_square_id: int
    foil_hole_id: int
    acquired_at: _dt.datetime


def write_epu_session(
    root: str | Path,
    *,
    n_grid_squares: int = 2,
    holes_per_square: int = 2,
    shots_per_hole: int = 2,
    movie_format: str = "tiff",
    movie_root: str | Path | None = None,
    movie_writer: Callable[[Path, SyntheticMovie], None] | None = None,
    session_name: str = "Supervisor_20240517_103000_synthetic_EPU",
    storage_folder: str | None = None,
    with_image_xmls: bool = True,
    start: _dt.datetime | None = None,
    seconds_per_movie: float = 30.0,
    **xml_kwargs,
) -> list[SyntheticMovie]:
    """Write a complete synthetic EPU session folder.

    Layout (as EPU writes it)::

        root/EpuSession.dm
        root/Images-Disc1/GridSquare_<gs>/GridSquare_<gs>_<date>_<time>.xml     (image, not a movie)
        root/Images-Disc1/GridSquare_<gs>/FoilHoles/FoilHole_<fh>_<date>_<time>.xml  (image)
        root/Images-Disc1/GridSquare_<gs>/Data/FoilHole_<fh>_Data_<d>_<n>_<date>_<time>.xml
        <movie_root or root>/Images-Disc1/GridSquare_<gs>/Data/<same stem><suffix>

    Parameters
    ----------
    root
        Session (metadata) folder.
    movie_format
        ``"tiff"`` (``_fractions.tiff``), ``"mrc"`` (``_Fractions.mrc``) or ``"eer"`` (``_EER.eer``).
    movie_root
        Separate movie storage root (EPU writes movies to another disk); default ``root``.
    movie_writer
        ``movie_writer(movie_path, info)`` is called for each movie; ``None`` writes no movies
        (use :func:`write_movie_stub` for tiny placeholder files).
    storage_folder
        Windows path recorded in ``EpuSession.dm`` (default ``Z:\\DoseFractions\\<root name>``).
    **xml_kwargs
        Passed to :func:`epu_movie_xml` for every movie (voltage_kv, pixel_size_a, ...).

    Returns
    -------
    list of SyntheticMovie
        In acquisition order.
    """
    root = Path(root)
    mroot = Path(movie_root) if movie_root is not None else root
    suffix = MOVIE_SUFFIXES[movie_format]
    start = start or _DEFAULT_TIME
    write_epu_session_dm(
        root / "EpuSession.dm",
        name=session_name,
        storage_folders=[storage_folder or rf"Z:\DoseFractions\{root.name}"],
        dose_fractions_output_format="EER" if movie_format == "eer" else (
            "Tiff Lzw Non-Gain normalized" if movie_format == "tiff" else "Mrc"),
        start=start,
    )
    out: list[SyntheticMovie] = []
    t = start
    for g in range(n_grid_squares):
        gs = 1000000 + g
        gdir = root / "Images-Disc1" / f"GridSquare_{gs}"
        if with_image_xmls:
            write_epu_image_xml(gdir / f"GridSquare_{gs}_{t:%Y%m%d_%H%M%S}.xml", kind="gridsquare",
                                acquired_at=t)
        for h in range(holes_per_square):
            fh = 2000000 + g * 1000 + h
            if with_image_xmls:
                write_epu_image_xml(gdir / "FoilHoles" / f"FoilHole_{fh}_{t:%Y%m%d_%H%M%S}.xml",
                                    kind="foilhole", acquired_at=t)
            for s in range(shots_per_hole):
                t = t + _dt.timedelta(seconds=seconds_per_movie)
                stem = epu_movie_stem(fh, 3000000 + g, s + 1, t)
                xml = write_epu_movie_xml(gdir / "Data" / f"{stem}.xml", acquired_at=t, **xml_kwargs)
                mpath = mroot / "Images-Disc1" / f"GridSquare_{gs}" / "Data" / f"{stem}{suffix}"
                info = SyntheticMovie(xml, mpath, gs, fh, t)
                if movie_writer is not None:
                    mpath.parent.mkdir(parents=True, exist_ok=True)
                    movie_writer(mpath, info)
                out.append(info)
    return out


def write_movie_stub(
    path: str | Path,
    *,
    n_frames: int = 4,
    shape: tuple[int, int] = (64, 64),
    pixel_size_a: float | None = None,
    dtype: str = "uint8",
) -> Path:
    """Write a tiny zero-filled movie (MRC via mrcfile, TIFF/EER via tifffile).

    The header is right (frames, size, dtype, voxel size for MRC); the pixels are zeros.
    An ``.eer`` stub is a plain multi-page TIFF with that suffix (enough for header reads).
    """
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros((n_frames, *shape), dtype=dtype)
    if path.suffix.lower() == ".mrc":
        import mrcfile

        if dtype == "uint8":
            data = data.astype(np.int8)
        with mrcfile.new(path, overwrite=True) as m:
            m.set_data(data)
            if pixel_size_a is not None:
                m.voxel_size = pixel_size_a
    else:
        import tifffile

        tifffile.imwrite(path, data, photometric="minisblack")
    return path


# ----------------------------------------------------------------------------- SerialEM mdoc


def _sem_date(when: _dt.datetime, four_digit_year: bool) -> str:
    return when.strftime("%d-%b-%Y  %H:%M:%S" if four_digit_year else "%d-%b-%y  %H:%M:%S")


def mdoc_text(
    *,
    variant: str = "frame",
    pixel_size_a: float | None = 0.8,
    voltage_kv: float | None = 300.0,
    exposure_dose_e_a2: float | None = 40.0,
    dose_rate: float | None = None,
    n_frames: int | None = 40,
    exposure_time_s: float | None = 2.0,
    binning: float | None = 1.0,
    magnification: int | None = 105000,
    spot_size: int | None = 5,
    target_defocus_um: float | None = -1.5,
    defocus_um: float | None = -1.4,
    gain_reference: str | None = "CountRef_synthetic.dm4",
    defect_file: str | None = None,
    camera_index: int | None = 1,
    scope_label: str = "Synthetic Krios D3593",
    sub_frame_path: str | None = r"X:\frames\movie_00001.tif",
    n_sections: int = 1,
    tilt_step_deg: float = 3.0,
    four_digit_year: bool = False,
    when: _dt.datetime | None = None,
    crlf: bool = True,
    frame_doses_and_number: str | None = None,
    extra: dict[str, str] | None = None,
) -> str:
    """Text of a SerialEM (or Tomography 5) mdoc.

    Parameters
    ----------
    variant
        ``"frame"``: single-movie frame mdoc, header ``T = SerialEM: …`` without brackets
        and one ``[FrameSet = 0]``; ``"frame_bracket"``: the same with ``[T = SerialEM: …]``;
        ``"stack"``: image-stack mdoc with ``[ZValue = n]`` sections;
        ``"tilt_series"``: like stack with tilt angles and a tilt-axis title line;
        ``"montage"``: ``[ZValue]`` + ``PieceCoordinates``, ``Montage = 1``;
        ``"tomo5"``: Thermo Fisher Tomography 5 (``[T = Tomography: …]``, EER sub-frames).
    pixel_size_a, voltage_kv, exposure_dose_e_a2, dose_rate, n_frames, exposure_time_s, binning
        ``PixelSpacing``, ``Voltage``, ``ExposureDose``, ``DoseRate``, ``NumSubFrames``,
        ``ExposureTime``, ``Binning`` (0.5 = super-resolution); ``None`` omits the key.
    scope_label
        Text after ``SerialEM:`` in the header (``… D3593`` carries the D-number).
    four_digit_year
        ``DateTime`` as ``01-Aug-2022`` (SerialEM 4) instead of ``01-Aug-22``.
    crlf
        Windows line endings (as SerialEM writes them).
    """
    when = when or _DEFAULT_TIME.replace(tzinfo=None)
    nl = "\r\n" if crlf else "\n"
    software = "Tomography" if variant == "tomo5" else "SerialEM"
    if variant == "tomo5":
        four_digit_year = True  # Tomography 5 writes 13-Jan-2025
    header_t = f"{software}: {scope_label}                {_sem_date(when, four_digit_year)}    "
    lines: list[str] = []
    glob: list[str] = []
    if variant in ("stack", "tilt_series", "montage", "tomo5"):
        if pixel_size_a is not None:
            glob.append(f"PixelSpacing = {pixel_size_a:g}")
        if voltage_kv is not None:
            glob.append(f"Voltage = {voltage_kv:g}")
        glob.append("ImageFile = stack.mrc")
        glob.append("ImageSize = 4096 4096")
        if variant == "montage":
            glob.append("Montage = 1")
        glob.append("DataMode = 1")
        lines += glob + ["", f"[T = {header_t}]", ""]
        if variant == "tomo5":
            lines += ["[T =   TiltAxisAngle = -176.20  Binning = 1  SpotSize = 6]", ""]
        if variant == "tilt_series":
            lines += ["[T =     Tilt axis angle = 85.3, binning = 1  spot = 8  camera = 1]", ""]
        section = "ZValue"
    else:
        first = f"[T = {header_t}]" if variant == "frame_bracket" else f"T = {header_t}"
        lines.append(first)
        if voltage_kv is not None:
            lines.append(f"Voltage = {voltage_kv:g}")
        lines.append("")
        section = "FrameSet"
    for k in range(max(1, n_sections)):
        t = when + _dt.timedelta(seconds=60 * k)
        tilt = 0.0 if variant not in ("tilt_series", "tomo5") else tilt_step_deg * ((k + 1) // 2) * (
            1 if k % 2 else -1) + 0.0
        sec = [f"[{section} = {k}]", f"TiltAngle = {tilt:g}", "StagePosition = 10.5 -20.25",
               "StageZ = 1.5"]
        if variant == "montage":
            sec.append(f"PieceCoordinates = {k * 3686} 0 0")
        if magnification is not None:
            sec.append(f"Magnification = {magnification}")
        sec.append("Intensity = 0.11")
        if exposure_dose_e_a2 is not None:
            sec.append(f"ExposureDose = {exposure_dose_e_a2:g}")
        if dose_rate is not None:
            sec.append(f"DoseRate = {dose_rate:g}")
        if pixel_size_a is not None:
            sec.append(f"PixelSpacing = {pixel_size_a:g}")
        if spot_size is not None:
            sec.append(f"SpotSize = {spot_size}")
        if defocus_um is not None:
            sec.append(f"Defocus = {defocus_um:g}")
        sec.append("ImageShift = 0 0")
        sec.append("RotationAngle = 175.3")
        if exposure_time_s is not None:
            sec.append(f"ExposureTime = {exposure_time_s:g}")
        if binning is not None:
            sec.append(f"Binning = {binning:g}")
        if camera_index is not None:
            sec.append(f"CameraIndex = {camera_index}")
        sec.append("DividedBy2 = 0")
        sec.append("MagIndex = 31")
        if target_defocus_um is not None:
            sec.append(f"TargetDefocus = {target_defocus_um:g}")
        if sub_frame_path is not None:
            sfp = sub_frame_path
            if variant == "tomo5":
                sfp = rf"X:\tomo5\Position_1_{k:03d}_{tilt:.2f}_fractions.eer"
            elif n_sections > 1:
                stem, dot, ext = sfp.rpartition(".")
                sfp = f"{stem}_{k:03d}.{ext}" if dot else f"{sfp}_{k:03d}"
            sec.append(f"SubFramePath = {sfp}")
        if n_frames is not None:
            sec.append(f"NumSubFrames = {n_frames}")
            fdn = frame_doses_and_number or (
                f"{exposure_dose_e_a2 / n_frames:g} {n_frames}" if exposure_dose_e_a2 else f"0 {n_frames}")
            sec.append(f"FrameDosesAndNumber = {fdn}")
        sec.append(f"DateTime = {_sem_date(t, four_digit_year)}")
        if gain_reference is not None:
            sec.append(f"GainReference = {gain_reference}")
        if defect_file is not None:
            sec.append(f"DefectFile = {defect_file}")
        for key, value in (extra or {}).items():
            sec.append(f"{key} = {value}")
        lines += sec + [""]
    if variant == "montage":
        lines += ["[MontSection = 0]", "TiltAngle = 0", "StagePosition = 10.5 -20.25",
                  f"Magnification = {magnification}" if magnification is not None else "Intensity = 0.11",
                  "BufISXY = 0 0", "ProbeMode = 1", "MoveStage = 1", "ConSetUsed = 0 1",
                  "MontBacklash = 0 0", "ValidBacklash = 0 0", "DriftSettling = 0", ""]
    return nl.join(lines) + nl


def write_mdoc(path: str | Path, *, encoding: str = "utf-8", **kwargs) -> Path:
    """Write :func:`mdoc_text` ``(**kwargs)`` to ``path`` byte-exact (line endings preserved)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(mdoc_text(**kwargs).encode(encoding))
    return path


# ----------------------------------------------------------------------------- DM4 images

_DM_TAG_TYPES = {np_name: code for np_name, code in (
    ("int16", 2), ("int32", 3), ("uint16", 4), ("uint32", 5), ("float32", 6), ("float64", 7))}
_DM_IMAGE_TYPES = {"int16": 1, "float32": 2, "uint8": 6, "int32": 7, "int8": 9, "uint16": 10,
                   "uint32": 11, "float64": 12}


def write_dm4_image(path: str | Path, data, *, pixel_size_nm: float = 1.0) -> Path:
    """Write a 2D image as a DigitalMicrograph 4 file (little-endian data, as DM writes on a PC).

    The tag tree holds what DM readers use (``ImageList/<1>/ImageData`` with ``Data``,
    ``DataType``, ``Dimensions`` and ``Calibrations/Dimension`` scale and units); no
    thumbnail. For tests and synthetic SerialEM sessions (K2/K3 gain references are .dm4).
    """
    import struct

    import numpy as np

    arr = np.ascontiguousarray(data)
    if arr.ndim != 2 or arr.dtype.name not in _DM_IMAGE_TYPES:
        raise ValueError(f"write_dm4_image: a 2D array of {sorted(_DM_IMAGE_TYPES)}, not "
                         f"{arr.ndim}D {arr.dtype}")

    def label(name: str) -> bytes:
        b = name.encode("ascii")
        return struct.pack(">H", len(b)) + b

    def value(name: str, v, np_type: str) -> bytes:
        body = (b"%%%%" + struct.pack(">QQ", 1, _DM_TAG_TYPES[np_type])
                + np.array([v], dtype=np_type).astype("<" + np.dtype(np_type).str[1:]).tobytes())
        return b"\x15" + label(name) + struct.pack(">Q", len(body)) + body

    def array(name: str, values: np.ndarray, type_code: int) -> bytes:
        raw = np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<")).tobytes()
        body = b"%%%%" + struct.pack(">QQQQ", 3, 20, type_code, values.size) + raw
        return b"\x15" + label(name) + struct.pack(">Q", len(body)) + body

    def group(name: str, entries: list[bytes]) -> bytes:
        body = b"\x00\x00" + struct.pack(">Q", len(entries)) + b"".join(entries)
        return b"\x14" + label(name) + struct.pack(">Q", len(body)) + body

    units = np.frombuffer("nm".encode("utf-16-le"), dtype="<u2")
    dims = [group("", [value("Origin", 0.0, "float32"), value("Scale", pixel_size_nm, "float32"),
                       array("Units", units, 4)]) for _ in range(2)]
    pixel_type = {"int16": 2, "float32": 6, "uint8": 8, "int32": 3, "int8": 9, "uint16": 4,
                  "uint32": 5, "float64": 7}[arr.dtype.name]
    image = group("", [group("ImageData", [
        group("Calibrations", [group("Dimension", dims)]),
        array("Data", arr.ravel(), pixel_type),
        value("DataType", _DM_IMAGE_TYPES[arr.dtype.name], "int32"),
        group("Dimensions", [value("", arr.shape[1], "uint32"), value("", arr.shape[0], "uint32")]),
    ])])
    root = b"\x00\x00" + struct.pack(">Q", 1) + group("ImageList", [image])
    out = struct.pack(">IQI", 4, 16 + len(root) + 8, 1) + root + b"\x00" * 8
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out)
    return path
