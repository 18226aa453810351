"""Parse an EPU session/XML, a SerialEM mdoc or a movie and print the record.

PATH may be an EPU per-movie XML, an EpuSession.dm or EPU session folder, a folder of
SerialEM mdocs, an .mdoc, or a movie (.tiff/.mrc/.eer). For a session it prints the
session summary, the first movie's record and the number of movies.

With --json a single file prints one JSON object with exactly the keys software,
software_version, microscope_id, microscope, voltage_kv, cs_mm, magnification,
pixel_size_a, super_resolution, binning, detector, camera_mode, exposure_time_s,
n_frames, total_dose_e_a2, dose_per_frame_e_a2, defocus_um, eer, gain_reference,
movie_path, acquired_at, source, derived. A session prints
{"session": {...}, "first_movie": {those keys} or null, "n_movies": N}.

Windows storage paths in EpuSession.dm are mapped with the site setting paths.path_map;
--movies adds a movie storage root.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_args(parser):
    parser.add_argument("path", type=Path, help="movie XML, EpuSession.dm, session folder, .mdoc or movie")
    parser.add_argument("--json", action="store_true", help="print JSON (keys as documented above)")
    parser.add_argument("--movies", type=Path, action="append", default=[],
                        help="extra movie storage root (same Images-Disc*/GridSquare_*/Data layout)")
    parser.add_argument("--write-summary", type=Path, default=None, metavar="PROJECT",
                        help="also write session_summary.txt/.json into this project folder")


def _print_record(rec) -> None:
    data = rec.to_json_dict()
    width = max(len(k) for k in data)
    for k, v in data.items():
        if k in ("source", "derived"):
            continue
        where = rec.source.get(k, "")
        mark = " (derived)" if k in rec.derived else ""
        shown = "(unknown - please enter)" if v is None else v
        print(f"  {k:<{width}} = {shown}{mark}" + (f"    [{where}]" if where else ""))
    for w in rec.warnings:
        print(f"  warning: {w}")


def main(args) -> int:
    from app.errors import UserError
    from app.settings import load_settings
    from metadata.config import load_instruments
    from metadata.session import read_any, session_summary

    settings = load_settings()
    cfg = load_instruments()
    roots = list(args.movies)
    if settings.paths.movies_root is not None:
        roots.append(settings.paths.movies_root)
    result = read_any(args.path, cfg=cfg, path_map=settings.paths.path_map, movie_roots=roots)
    if args.write_summary is not None:
        from metadata.record import SessionRecord
        from metadata.session import write_session_summary

        sess = result.session or SessionRecord(software=result.record.software if result.record else None,
                                               path=str(args.path), n_movies=result.n_movies)
        try:
            write_session_summary(args.write_summary, sess, result.record)
        except OSError as exc:
            raise UserError(f"{args.write_summary}: cannot write the session summary "
                            f"({exc.strerror or exc})") from None

    if args.json:
        if result.session is None:
            print(json.dumps(result.record.to_json_dict(), indent=2))
        else:
            summary = session_summary(result.session, None)
            print(json.dumps({
                "session": summary,
                "first_movie": result.record.to_json_dict() if result.record else None,
                "n_movies": result.n_movies,
            }, indent=2))
        return 0

    if result.session is not None:
        print(f"# session ({result.kind}): {args.path}")
        for k, v in session_summary(result.session, None).items():
            if k == "warnings":
                continue
            print(f"  {k} = {'(unknown)' if v is None else v}")
        for w in result.session.warnings:
            print(f"  warning: {w}")
        print("# first movie" + (f": {result.record.metadata_path}" if result.record else ": none"))
        if result.record is not None:
            _print_record(result.record)
        print(f"# movies: {result.n_movies}")
    else:
        print(f"# {result.kind}: {args.path}")
        _print_record(result.record)
        if result.kind == "mdoc" and result.n_movies > 1:
            print(f"# sections: {result.n_movies} (first shown)")
    return 0
