"""Sessions: EPU folder discovery, movie ↔ metadata matching, SerialEM folders, summaries.

EPU layout (metadata folder; movies may live under a separate storage root with the same
relative layout, recorded in ``EpuSession.dm`` as a Windows path)::

    <session>/EpuSession.dm
    <session>/Images-Disc1/GridSquare_<gs>/GridSquare_<gs>_<date>_<time>.xml      image, skipped
    <session>/Images-Disc1/GridSquare_<gs>/FoilHoles/FoilHole_<fh>_<date>_<time>.xml  image, skipped
    <session>/Images-Disc1/GridSquare_<gs>/Data/FoilHole_<fh>_Data_<…>.xml         one per movie
    <movies>/Images-Disc1/GridSquare_<gs>/Data/<same stem>_fractions.tiff | _Fractions.mrc | _EER.eer

Windows paths (``Z:\\DoseFractions\\…``) become local paths through a prefix map
(:func:`map_windows_path`), configured in the site settings (``paths.path_map``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

from metadata import epu, mdoc, movies
from metadata.config import InstrumentConfig, apply_config
from metadata.errors import MetadataError
from metadata.record import MovieRecord, SessionRecord

#: movie suffixes after the XML stem, in order of preference
EPU_MOVIE_SUFFIXES: tuple[str, ...] = ("_fractions.tiff", "_Fractions.tiff", "_Fractions.mrc",
                                       "_fractions.mrc", "_EER.eer", "_fractions.eer", ".mrc",
                                       ".tiff", ".tif")
_SUFFIX_RANK = {s.lower(): k for k, s in enumerate(EPU_MOVIE_SUFFIXES)}
_MOVIE_EXTS = (".tiff", ".tif", ".mrc", ".eer")
_DISC_RE = re.compile(r"^Images-Disc\d+$")
_GS_RE = re.compile(r"^GridSquare_(\d+)$")


# ----------------------------------------------------------------------------- paths


def map_windows_path(path: str, path_map: Mapping[str, str | Path] | None) -> Path | None:
    """Turn a path as the acquisition PC wrote it into the path where this machine sees it.

    Parameters
    ----------
    path
        e.g. ``Z:\\DoseFractions\\cm40593-1`` or ``\\\\server\\share\\x``.
    path_map
        Windows prefix → local folder, e.g. ``{"Z:\\\\DoseFractions": "/mnt/dosefractions"}``.
        Matching ignores case and slash direction; the longest matching prefix wins.

    Returns
    -------
    Path or None
        The local path, or ``None`` when no prefix matches (a POSIX path is returned as is).
    """
    if not path:
        return None
    if "\\" not in path and not re.match(r"^[A-Za-z]:", path):
        return Path(path)
    norm = path.replace("/", "\\")
    best = None
    for prefix, local in (path_map or {}).items():
        p = str(prefix).replace("/", "\\").rstrip("\\")
        if not p:
            continue
        if norm.lower() == p.lower() or norm.lower().startswith(p.lower() + "\\"):
            if best is None or len(p) > len(best[0]):
                best = (p, Path(local))
    if best is None:
        return None
    rest = norm[len(best[0]):].strip("\\")
    parts = [x for x in rest.split("\\") if x]
    return best[1].joinpath(*parts) if parts else best[1]


# ----------------------------------------------------------------------------- index


@dataclass
class SessionItem:
    """One movie's metadata file and, when found, its movie file."""

    metadata_path: Path
    movie_path: Path | None
    grid_square_id: int | None = None
    foil_hole_id: int | None = None
    section: int | None = None  # mdoc section index


@dataclass
class SessionIndex:
    """What discovery found in a session folder."""

    kind: str  # "epu" or "serialem"
    root: Path
    session: SessionRecord
    items: list[SessionItem] = field(default_factory=list)
    movies_without_metadata: list[Path] = field(default_factory=list)
    metadata_without_movie: list[Path] = field(default_factory=list)
    skipped_images: int = 0
    movie_roots: list[Path] = field(default_factory=list)

    @property
    def n_movies(self) -> int:
        return len(self.items)


def _scandir(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except PermissionError as exc:
        raise MetadataError(f"cannot list folder ({exc.strerror})", path) from None


def _movie_stem(name: str) -> tuple[str, int] | None:
    """(xml stem, preference rank) of an EPU movie file name, or ``None`` if not a movie."""
    low = name.lower()
    if not low.endswith(_MOVIE_EXTS):
        return None
    for suf in EPU_MOVIE_SUFFIXES:
        if low.endswith(suf.lower()):
            return name[: -len(suf)], _SUFFIX_RANK[suf.lower()]
    return None


def epu_data_dirs(root: Path) -> list[tuple[Path, int]]:
    """``(relative Data folder, grid square id)`` for every ``Images-Disc*/GridSquare_*/Data``."""
    out = []
    for disc in _scandir(root):
        if not (disc.is_dir() and _DISC_RE.match(disc.name)):
            continue
        for gs in _scandir(Path(disc.path)):
            m = _GS_RE.match(gs.name)
            if m and gs.is_dir():
                out.append((Path(disc.name) / gs.name / "Data", int(m.group(1))))
    out.sort()
    return out


def index_epu_session(root: str | Path, *, movie_roots: Iterable[str | Path] = (),
                      path_map: Mapping[str, str | Path] | None = None,
                      session_file: str | Path | None = None) -> SessionIndex:
    """Discover an EPU session: movie XMLs, their movies, and what does not pair up.

    Parameters
    ----------
    root
        The EPU session folder (holding ``EpuSession.dm`` and ``Images-Disc*``).
    movie_roots
        Extra folders with the same ``Images-Disc*/GridSquare_*/Data`` layout holding movies.
        The ``EpuSession.dm`` storage folders, through ``path_map``, are added automatically.
    path_map
        Windows prefix → local folder (see :func:`map_windows_path`).
    session_file
        The session file when it is not ``root/EpuSession.dm`` (e.g. a copy saved as .xml).

    Raises
    ------
    MetadataError
        Not a folder, unreadable, or neither ``EpuSession.dm`` nor ``Images-Disc*`` in it.
    """
    root = Path(root)
    if not root.is_dir():
        raise MetadataError("not a folder", root)
    dm_path = Path(session_file) if session_file is not None else root / "EpuSession.dm"
    data_dirs = epu_data_dirs(root)
    if not dm_path.exists() and not data_dirs:
        raise MetadataError("not an EPU session folder (no EpuSession.dm, no Images-Disc*/GridSquare_*)",
                            root)
    if dm_path.exists():
        sess_file = epu.parse_session_dm(dm_path)
        session = sess_file.to_session_record()
        if movies_need_gain(session.dose_fractions_output_format):
            session.warnings.append(
                f"EPU saved the movies without gain normalisation (DoseFractionsOutputFormat "
                f"'{session.dose_fractions_output_format}'): motion correction needs the gain "
                "reference EPU wrote with them")
    else:
        session = SessionRecord(software="EPU", name=root.name, path=str(root),
                                warnings=["no EpuSession.dm: session name, formats and storage "
                                          "folders unknown"])
    session.path = str(root)
    roots: list[Path] = []
    local = []
    for folder in session.storage_folders:
        mapped = map_windows_path(folder, path_map)
        local.append(str(mapped) if mapped is not None else None)
        if mapped is None:
            session.warnings.append(f"storage folder {folder} is not mapped to a local path "
                                    "(add it to paths.path_map)")
        elif mapped.is_dir():
            roots.append(mapped)
    session.storage_folders_local = local
    roots = [Path(r) for r in movie_roots] + roots
    roots = [r for k, r in enumerate(roots) if r.resolve() != root.resolve() and r not in roots[:k]]
    all_roots = [root, *roots]

    idx = SessionIndex("epu", root, session, movie_roots=roots)
    grid_squares: set[int] = set()
    holes: set[int] = set()
    for rel, gs in data_dirs:
        xmls: dict[str, Path] = {}
        for e in _scandir(root / rel):
            if not e.name.endswith(".xml"):
                continue
            name = epu.classify_name(e.name)
            if name.kind != "movie":
                idx.skipped_images += 1
                continue
            xmls[e.name[:-4]] = Path(e.path)
        found: dict[str, tuple[int, Path]] = {}
        for mroot in all_roots:
            for e in _scandir(mroot / rel):
                ms = _movie_stem(e.name)
                if ms is None:
                    continue
                stem, rank = ms
                if stem not in found or rank < found[stem][0]:
                    found[stem] = (rank, Path(e.path))
        for stem in sorted(xmls):
            name = epu.classify_name(stem)
            movie = found.pop(stem, (0, None))[1]
            idx.items.append(SessionItem(xmls[stem], movie, gs, name.foil_hole_id))
            grid_squares.add(gs)
            if name.foil_hole_id is not None:
                holes.add(name.foil_hole_id)
            if movie is None:
                idx.metadata_without_movie.append(xmls[stem])
        idx.movies_without_metadata.extend(
            p for _, p in sorted(found.values(), key=lambda x: str(x[1]))
            if epu.classify_name(p.name).kind == "movie")
        # skipped image folders (FoilHoles/, GridSquare xml) are never under Data/
    session.n_movies = len(idx.items)
    session.n_movies_without_metadata = len(idx.movies_without_metadata)
    session.n_metadata_without_movie = len(idx.metadata_without_movie)
    session.n_grid_squares = len(grid_squares)
    session.n_foil_holes = len(holes)
    session.derived = ["n_movies", "n_movies_without_metadata", "n_metadata_without_movie",
                       "n_grid_squares", "n_foil_holes"]
    return idx


def index_serialem_folder(root: str | Path) -> SessionIndex:
    """A folder of SerialEM/Tomography mdocs: one item per movie (frame mdoc or section)."""
    root = Path(root)
    mdocs = sorted(p for p in root.glob("*.mdoc") if p.is_file())
    if not mdocs:
        raise MetadataError("no EPU session and no .mdoc files here", root)
    session = SessionRecord(software="SerialEM", name=root.name, path=str(root))
    idx = SessionIndex("serialem", root, session)
    first = None
    for p in mdocs:
        try:
            m = mdoc.parse_mdoc(p)
        except MetadataError as exc:
            session.warnings.append(str(exc))
            continue
        # a navigator montage (grid/square maps) or an image stack saved without frames lives
        # in the same folder as the frame mdocs: its sections are images, not movies
        movie_sections = [k for k, rec in enumerate(m.sections)
                          if m.is_frame_mdoc or rec.sub_frame_path]
        if not movie_sections and not m.is_montage and len(m.sections) == 1:
            movie_sections = [0]  # one image, no frame path: may be an old frame mdoc; kept
        if len(movie_sections) < len(m.sections):
            n_img = len(m.sections) - len(movie_sections)
            idx.skipped_images += n_img
            what = "a montage" if m.is_montage else "an image stack"
            session.warnings.append(f"{p.name}: {what} with {n_img} image(s) without frames "
                                    "(not movies), skipped")
        if not movie_sections:
            continue
        first = first or m
        for k in movie_sections:
            rec = m.sections[k]
            movie = Path(rec.movie_path) if rec.movie_path and Path(rec.movie_path).exists() else None
            idx.items.append(SessionItem(p, movie, section=k))
            if movie is None:
                idx.metadata_without_movie.append(p)
    if first is not None:
        session.software = first.software
        session.software_version = first.software_version
        session.source["software"] = f"{first.path}:T"
    session.n_movies = len(idx.items)
    session.n_metadata_without_movie = len(idx.metadata_without_movie)
    session.derived = ["n_movies", "n_metadata_without_movie"]
    return idx


def movies_need_gain(dose_fractions_output_format: str | None) -> bool:
    """EpuSession.dm's ``DoseFractionsOutputFormat`` says the movies are not gain-normalised
    (``Tiff Lzw Non-Gain normalized``; EER is never gain-normalised)."""
    f = (dose_fractions_output_format or "").lower().replace("-", " ")
    return "non gain" in f or "eer" in f


_SESSION_ROOT = re.compile(rb"<(?:[\w.-]+:)?EpuSessionXml[\s/>]")


def is_epu_session_file(path: str | Path) -> bool:
    """True when a file's root element is ``EpuSessionXml`` (an EpuSession.dm, whatever its
    name: MDCatch and others keep copies as ``EpuSession.xml``). Reads the first 4 KB only."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        head = head.decode("utf-16", errors="ignore").encode("utf-8")
    return _SESSION_ROOT.search(head) is not None


def open_session(path: str | Path, *, movie_roots: Iterable[str | Path] = (),
                 path_map: Mapping[str, str | Path] | None = None) -> SessionIndex:
    """Index an EPU session (folder or its ``EpuSession.dm``) or a folder of mdocs."""
    p = Path(path)
    if p.is_file() and (p.name.lower().endswith(".dm") or is_epu_session_file(p)):
        epu.parse_session_dm(p)  # a clear error if it is not one
        return index_epu_session(p.parent, movie_roots=movie_roots, path_map=path_map,
                                 session_file=p)
    if not p.exists():
        raise MetadataError("no such file or folder", p)
    if not p.is_dir():
        raise MetadataError("not a session folder", p)
    if (p / "EpuSession.dm").exists() or epu_data_dirs(p):
        return index_epu_session(p, movie_roots=movie_roots, path_map=path_map)
    if any(p.glob("*.mdoc")):
        return index_serialem_folder(p)
    raise MetadataError("empty or unknown folder: no EpuSession.dm, Images-Disc*/GridSquare_* "
                        "or .mdoc files", p)


# ----------------------------------------------------------------------------- records


def item_record(item: SessionItem, *, cfg: InstrumentConfig | None = None,
                read_header: bool = True) -> MovieRecord:
    """The full record of one session item: metadata, settled by its movie header, completed
    from the instrument config."""
    if item.metadata_path.suffix.lower() == ".mdoc":
        rec = mdoc.parse_mdoc(item.metadata_path).sections[item.section or 0]
    else:
        rec = epu.parse_movie_xml(item.metadata_path)
        if rec.grid_square_id is None and item.grid_square_id is not None:
            rec = rec.model_copy(update={"grid_square_id": item.grid_square_id})
    if item.movie_path is not None:
        if read_header:
            try:
                rec = movies.settle_pixel_size(rec, movies.read_movie_header(item.movie_path))
            except MetadataError as exc:
                rec = rec.model_copy(update={"movie_path": str(item.movie_path),
                                             "warnings": [*rec.warnings, str(exc)]})
        else:
            rec = rec.model_copy(update={"movie_path": str(item.movie_path)})
    if cfg is not None:
        rec = apply_config(rec, cfg)
    return rec


@dataclass
class ReadResult:
    """What ``scopeside metadata PATH`` found."""

    kind: str  # "epu-xml", "epu-session", "serialem-session", "mdoc", "movie"
    record: MovieRecord | None
    session: SessionRecord | None = None
    n_movies: int = 1
    index: SessionIndex | None = None


def read_any(path: str | Path, *, cfg: InstrumentConfig | None = None,
             path_map: Mapping[str, str | Path] | None = None,
             movie_roots: Iterable[str | Path] = ()) -> ReadResult:
    """Read a movie XML, an ``EpuSession.dm`` or session folder, an mdoc, or a movie.

    Raises
    ------
    MetadataError
        Anything unreadable or not of a known kind; the message names the file.
    """
    p = Path(path)
    if not p.exists():
        raise MetadataError("no such file or folder", p)
    suffix = p.suffix.lower()
    if p.is_dir() or suffix == ".dm" or (suffix == ".xml" and is_epu_session_file(p)):
        idx = open_session(p, movie_roots=movie_roots, path_map=path_map)
        first = item_record(idx.items[0], cfg=cfg) if idx.items else None
        if not idx.items:
            idx.session.warnings.append("no movies with metadata found (yet)")
        kind = "epu-session" if idx.kind == "epu" else "serialem-session"
        return ReadResult(kind, first, idx.session, idx.n_movies, idx)
    if suffix == ".xml":
        rec = epu.parse_movie_xml(p)
        stem = p.name[:-4]
        for suf in EPU_MOVIE_SUFFIXES:
            cand = p.with_name(stem + suf)
            if cand.exists():
                return ReadResult("epu-xml", item_record(SessionItem(p, cand), cfg=cfg))
        return ReadResult("epu-xml", apply_config(rec, cfg) if cfg is not None else rec)
    if suffix == ".mdoc":
        m = mdoc.parse_mdoc(p)
        rec = m.sections[0]
        if rec.movie_path and Path(rec.movie_path).exists():
            try:
                rec = movies.settle_pixel_size(rec, movies.read_movie_header(rec.movie_path))
            except MetadataError as exc:
                rec = rec.model_copy(update={"warnings": [*rec.warnings, str(exc)]})
        return ReadResult("mdoc", apply_config(rec, cfg) if cfg is not None else rec,
                          n_movies=len(m.sections))
    if suffix in movies.MOVIE_SUFFIXES:
        # metadata next to the movie wins: EPU XML (same stem) or <movie>.mdoc
        ms = _movie_stem(p.name)
        if ms is not None and (p.with_name(ms[0] + ".xml")).exists():
            return ReadResult("epu-xml", item_record(SessionItem(p.with_name(ms[0] + ".xml"), p),
                                                     cfg=cfg))
        if p.with_name(p.name + ".mdoc").exists():
            return ReadResult("mdoc", item_record(SessionItem(p.with_name(p.name + ".mdoc"), p,
                                                              section=0), cfg=cfg))
        rec = movies.record_from_movie(p)
        rec = rec.model_copy(update={"warnings": [*rec.warnings, "no metadata file found next to "
                                                  "the movie: voltage, dose, pixel size must be entered"]})
        return ReadResult("movie", apply_config(rec, cfg) if cfg is not None else rec)
    raise MetadataError(f"unknown kind of file {suffix or '(no suffix)'!r}: expected an EPU .xml, "
                        "EpuSession.dm, .mdoc, a movie (.tiff/.mrc/.eer) or a session folder", p)


# ----------------------------------------------------------------------------- summary


def session_summary(session: SessionRecord, first: MovieRecord | None) -> dict:
    """A flat summary (MDCatch-style): session facts plus the first movie's values."""
    out: dict = {
        "session_name": session.name,
        "session_path": session.path,
        "software": session.software,
        "software_version": session.software_version,
        "storage_folders": session.storage_folders,
        "storage_folders_local": session.storage_folders_local,
        "dose_fractions_output_format": session.dose_fractions_output_format,
        "image_file_format": session.image_file_format,
        "started_at": session.started_at.isoformat() if session.started_at else None,
        "n_movies": session.n_movies,
        "n_movies_without_metadata": session.n_movies_without_metadata,
        "n_metadata_without_movie": session.n_metadata_without_movie,
        "n_grid_squares": session.n_grid_squares,
        "n_foil_holes": session.n_foil_holes,
    }
    if first is not None:
        for k, v in first.to_json_dict().items():
            if k in ("source", "derived"):
                continue
            if k == "software_version" and v and out.get(k) and v != out[k]:
                # the movie XML's ApplicationSoftwareVersion is EPU's own version; the
                # session file's is its persistence assembly's (EPU 2.3.0.79 writes 1.12.0.79)
                out["session_file_version"] = out[k]
                out[k] = v
                continue
            if k in ("software", "software_version") and out.get(k) is not None:
                continue  # the session file's value stands
            out[k] = v
        out["source"] = first.source
        out["derived"] = first.derived
    out["warnings"] = list(session.warnings) + (list(first.warnings) if first else [])
    return out


def _kv_line(k: str, v) -> str:
    if v is None:
        v = "(unknown)"
    elif isinstance(v, list | dict):
        v = json.dumps(v)
    return f"{k} = {v}"


def write_session_summary(project_dir: str | Path, session: SessionRecord,
                          first: MovieRecord | None) -> tuple[Path, Path]:
    """Write ``session_summary.txt`` (``key = value``) and ``session_summary.json`` into the project.

    Written atomically (temporary file + rename) so a reader never sees half a file.
    """
    d = Path(project_dir)
    d.mkdir(parents=True, exist_ok=True)
    summary = session_summary(session, first)
    summary["written_at"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    txt = d / "session_summary.txt"
    js = d / "session_summary.json"
    lines = [_kv_line(k, v) for k, v in summary.items() if k not in ("source",)]
    if first is not None:
        lines.append("")
        lines.append("# where each value came from")
        lines += [f"# {k}: {v}" for k, v in first.source.items()]
    for path, text in ((txt, "\n".join(lines) + "\n"), (js, json.dumps(summary, indent=2) + "\n")):
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return txt, js


def windows_basename(path: str) -> str:
    """File name of a Windows or POSIX path string."""
    return PureWindowsPath(path).name if "\\" in path else Path(path).name
