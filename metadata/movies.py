"""Movie headers without reading pixels: MRC (mrcfile), TIFF and EER (tifffile).

:func:`read_movie_header` opens the file, reads the header (and the FEI extended header of
an MRC when present) and the TIFF page directory, never the image data. Then
:func:`settle_pixel_size` decides the movie's pixel size by comparing its frame size with
the readout area the metadata describes (a super-resolution movie is twice the readout
size, a binned one half of it).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metadata.errors import MetadataError
from metadata.record import MovieRecord, update_record

MOVIE_SUFFIXES = (".mrc", ".mrcs", ".tif", ".tiff", ".eer")


@dataclass
class MovieHeader:
    """What a movie file's header says. ``pixel_size_a`` is ``None`` when not stored."""

    path: Path
    format: str  # "mrc", "tiff" or "eer"
    n_frames: int
    width: int
    height: int
    dtype: str
    pixel_size_a: float | None = None
    compression: str | None = None
    extended: dict[str, Any] = field(default_factory=dict)


def read_movie_header(path: str | Path) -> MovieHeader:
    """Read the header of an MRC, TIFF or EER movie.

    Raises
    ------
    MetadataError
        Missing, unreadable or truncated file, or an unknown format.
    """
    p = Path(path)
    if not p.exists():
        raise MetadataError("movie not found", p)
    if p.is_dir():
        raise MetadataError("is a folder, not a movie", p)
    suffix = p.suffix.lower()
    if suffix in (".mrc", ".mrcs"):
        return _mrc_header(p)
    if suffix in (".tif", ".tiff", ".eer"):
        return _tiff_header(p, "eer" if suffix == ".eer" else "tiff")
    raise MetadataError(f"unknown movie format {suffix!r} (expected {', '.join(MOVIE_SUFFIXES)})", p)


def _mrc_header(p: Path) -> MovieHeader:
    import mrcfile
    import mrcfile.utils

    try:
        with mrcfile.open(p, header_only=True, permissive=True) as m:
            h = m.header
            if h is None:
                raise MetadataError("no MRC header", p)
            nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
            try:
                dtype = str(mrcfile.utils.dtype_from_mode(int(h.mode)))
            except ValueError:
                raise MetadataError(f"unknown MRC mode {int(h.mode)}", p) from None
            px = float(m.voxel_size.x)
            ext: dict[str, Any] = {}
            exttyp = bytes(h.exttyp).strip(b"\x00 ")
            if exttyp in (b"FEI1", b"FEI2") and int(h.nsymbt) > 0:
                ext = _fei_extended(m)
    except MetadataError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise MetadataError(f"not a readable MRC movie ({exc})", p) from None
    if nx <= 0 or ny <= 0 or nz <= 0:
        raise MetadataError(f"MRC header gives an empty image ({nx}x{ny}x{nz})", p)
    expected = 1024 + int(h.nsymbt) + nx * ny * nz * _itemsize(dtype)
    if p.stat().st_size < expected:
        raise MetadataError(f"truncated MRC movie ({p.stat().st_size} of {expected} bytes)", p)
    pixel = px if px > 0 and math.isfinite(px) else None
    if pixel is None and ext.get("pixel_size_a"):
        pixel = ext["pixel_size_a"]
    return MovieHeader(p, "mrc", nz, nx, ny, dtype, pixel, None, ext)


def _itemsize(dtype: str) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize


def _fei_extended(m) -> dict[str, Any]:
    """First record of an FEI1/FEI2 extended header (SI units converted)."""
    try:
        rec = m.indexed_extended_header
    except (ValueError, TypeError):
        return {}
    if rec is None or len(rec) == 0:
        return {}
    r = rec[0]
    names = set(r.dtype.names or ())
    out: dict[str, Any] = {}

    def val(name):
        return r[name].item() if name in names else None

    ht = val("HT")
    if ht:
        out["voltage_kv"] = ht / 1000.0
    pxs = val("Pixel size X")
    if pxs and pxs > 0:
        out["pixel_size_a"] = pxs * 1e10
    dose = val("Dose")
    if dose and dose > 0:
        out["dose_e_a2"] = dose * 1e-20
    mag = val("Magnification")
    if mag:
        out["magnification"] = int(round(mag))
    cam = val("Camera name")
    if cam:
        out["camera_name"] = cam.decode(errors="replace").strip("\x00 ") if isinstance(cam, bytes) else str(cam)
    t = val("Integration time")
    if t:
        out["exposure_time_s"] = t
    d = val("D-Number")
    if d:
        out["microscope_id"] = d.decode(errors="replace").strip("\x00 ") if isinstance(d, bytes) else str(d)
    return out


@contextlib.contextmanager
def _quiet(logger_name: str):
    """tifffile logs a warning for each broken IFD before raising; we report the error
    itself (one line), so its logger is muted while it runs (level restored after)."""
    lg = logging.getLogger(logger_name)
    old = lg.level
    lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        lg.setLevel(old)


def _tiff_header(p: Path, fmt: str) -> MovieHeader:
    import tifffile

    try:
        with _quiet("tifffile"), tifffile.TiffFile(p) as tif:
            pages = tif.pages
            if len(pages) == 0:
                raise MetadataError(f"no image pages (truncated or not a {fmt.upper()} file)", p)
            first = pages.first if hasattr(pages, "first") else pages[0]
            # len(pages) walks the IFD chain (offsets only), never decodes pixels
            n = len(pages)
            shape = first.shape
            dtype = str(first.dtype) if first.dtype is not None else "unknown"
            compression = getattr(first.compression, "name", str(first.compression))
            px = _tiff_pixel_size(first)
            ext = _eer_metadata(first, p) if fmt == "eer" else {}
    except MetadataError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError, EOFError, IndexError, KeyError) as exc:
        raise MetadataError(f"not a readable {fmt.upper()} movie ({exc})", p) from None
    if len(shape) < 2:
        raise MetadataError(f"TIFF page has no 2-D image (shape {shape})", p)
    height, width = int(shape[-2]), int(shape[-1])
    if fmt == "tiff" and len(shape) == 3 and n == 1:  # one page holding a 3-D stack
        n, height, width = int(shape[0]), int(shape[1]), int(shape[2])
    if px is None and ext.get("pixel_size_a"):
        px = ext["pixel_size_a"]
    return MovieHeader(p, fmt, n, width, height, dtype, px, compression, ext)


def _eer_metadata(page, p: Path) -> dict[str, Any]:
    """Acquisition items of an EER file (TIFF tag 65001: ``<metadata><item name= unit=>``).

    Parsed with the same no-entities/no-network parser as EPU XML. Values kept: exposure
    time, frame count, sensor pixel size (m → Å) and total dose (e/pixel → e/Å²).
    """
    from metadata.epu import parse_xml_bytes

    tag = page.tags.get(65001)
    if tag is None or not isinstance(tag.value, bytes | str):
        return {}
    raw = tag.value.encode() if isinstance(tag.value, str) else tag.value
    try:
        root = parse_xml_bytes(raw.rstrip(b"\x00"), p)
    except MetadataError:
        return {}  # a damaged metadata tag does not make the movie unreadable
    items: dict[str, tuple[str, str | None]] = {}
    for it in root.iter("item"):
        name = it.get("name")
        if name and it.text:
            items[name] = (it.text.strip(), it.get("unit"))

    def num(name):
        try:
            v = float(items[name][0])
        except (KeyError, ValueError):
            return None
        return v if math.isfinite(v) else None

    out: dict[str, Any] = {}
    t = num("exposureTime")
    if t and t > 0:
        out["exposure_time_s"] = t
    nf = num("numberOfFrames")
    if nf and nf > 0:
        out["n_frames"] = int(nf)
    px_m = num("sensorPixelSize.width")
    if px_m and px_m > 0 and items["sensorPixelSize.width"][1] in (None, "m"):
        out["pixel_size_a"] = px_m * 1e10
    dose = num("totalDose")
    if dose and dose > 0 and out.get("pixel_size_a"):
        out["dose_e_a2"] = dose / out["pixel_size_a"] ** 2
    return out


def _tiff_pixel_size(page) -> float | None:
    """Pixel size from XResolution/ResolutionUnit when the writer stored a physical unit."""
    tags = page.tags
    xres = tags.get("XResolution")
    unit = tags.get("ResolutionUnit")
    if xres is None or unit is None:
        return None
    num, den = xres.value if isinstance(xres.value, tuple) else (xres.value, 1)
    if not num or not den:
        return None
    per_unit = num / den
    u = int(getattr(unit.value, "value", unit.value))
    if u == 3:  # centimetre
        return 1e8 / per_unit
    return None  # inch (2) or none (1): a display resolution, not a pixel size


def settle_pixel_size(record: MovieRecord, header: MovieHeader) -> MovieRecord:
    """Reconcile a metadata record with its movie's header.

    - frames: the movie's frame count is what motion correction sees; for EER it is the raw
      frame count. It replaces ``n_frames`` when they differ (with a warning).
    - pixel size: EPU's pixel size belongs to an image of the readout-area size. A movie
      twice that size is super-resolution (pixel size / 2, ``super_resolution`` True); half
      of it is binned (× 2). Equal size confirms the recorded value.
    - ``movie_path`` and ``eer`` from the file.
    """
    read: dict[str, tuple[Any, str]] = {}
    derived: dict[str, tuple[Any, str]] = {}
    warnings: list[str] = []
    src = f"{header.path}"
    read["movie_path"] = (str(header.path), f"{src}:(file)")
    read["eer"] = (header.format == "eer", f"{src}:(format)")
    if record.n_frames is not None and record.n_frames != header.n_frames:
        warnings.append(f"metadata says {record.n_frames} frames, movie has {header.n_frames}")
    read["n_frames"] = (header.n_frames, f"{src}:header (frames)")
    rw, rh = record.readout_width, record.readout_height
    if record.pixel_size_a is not None and rw and rh:
        ratio_w = header.width / rw
        ratio_h = header.height / rh
        if abs(ratio_w - ratio_h) < 1e-6 and ratio_w in (0.25, 0.5, 1.0, 2.0, 4.0):
            if ratio_w != 1.0:
                derived["pixel_size_a"] = (record.pixel_size_a / ratio_w,
                                           f"pixel_size_a*readout/movie size ({rw}x{rh} -> "
                                           f"{header.width}x{header.height})")
                if ratio_w > 1:
                    derived["super_resolution"] = (True, "movie larger than readout area")
                    derived["camera_mode"] = ("super-resolution", "movie larger than readout area")
            elif record.super_resolution is None:
                derived["super_resolution"] = (False, "movie size equals readout area")
        else:
            warnings.append(f"movie frame size {header.width}x{header.height} does not match "
                            f"readout area {rw}x{rh}; pixel size left as recorded")
    elif record.pixel_size_a is None and header.pixel_size_a is not None:
        read["pixel_size_a"] = (header.pixel_size_a, f"{src}:header (voxel size)")
    dose_per_frame = None
    if record.total_dose_e_a2 is not None and header.n_frames:
        dose_per_frame = record.total_dose_e_a2 / header.n_frames
    if dose_per_frame is not None and (record.dose_per_frame_e_a2 is None
                                       or "dose_per_frame_e_a2" in record.derived):
        derived["dose_per_frame_e_a2"] = (dose_per_frame, "total_dose_e_a2/movie frames")
    return update_record(record, read=read, derived=derived, warnings=warnings)


def record_from_movie(path: str | Path) -> MovieRecord:
    """A record from a movie alone (no metadata): frames, pixel size when stored, EER flag."""
    from metadata.record import RecordBuilder

    h = read_movie_header(path)
    b = RecordBuilder(h.path)
    b.read("movie_path", str(h.path), "(file)")
    b.read("n_frames", h.n_frames, "header (frames)")
    b.read("eer", h.format == "eer", "(format)")
    b.read("pixel_size_a", h.pixel_size_a, "header (voxel size)")
    ext = h.extended
    if h.format == "mrc":
        for fld in ("voltage_kv", "magnification", "exposure_time_s", "camera_name", "microscope_id"):
            b.read(fld, ext.get(fld), f"FEI extended header/{fld}")
    if h.format == "eer":
        b.read("exposure_time_s", ext.get("exposure_time_s"), "EER metadata/exposureTime")
        b.read("pixel_size_a", ext.get("pixel_size_a"), "EER metadata/sensorPixelSize.width")
        b.derive("total_dose_e_a2", ext.get("dose_e_a2"), "EER totalDose/sensorPixelSize^2")
    else:
        b.read("total_dose_e_a2", ext.get("dose_e_a2"), "FEI extended header/Dose")
    b.extra("readout_width", h.width)
    b.extra("readout_height", h.height)
    from metadata.record import fill_dose_per_frame

    fill_dose_per_frame(b)
    return b.build()
