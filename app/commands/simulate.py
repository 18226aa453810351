"""Synthetic movies / micrographs / particle stacks / whole sessions with ground truth.

  scopeside simulate particles   --out DIR [--n 1000] [--molecules asym,c4ring] [--snr 0.1] ...
  scopeside simulate micrographs --out DIR [--n 4] [--size 1024] [--pixel-size 1.0] ...
  scopeside simulate movies      --out DIR [--n 2] [--size 1024] [--frames 40] [--format tiff]
  scopeside simulate session     --out DIR [--layout epu|serialem] [--drip SECONDS] ...

Built-in molecules: asym (C1), c4ring (C4), d2 (D2), ribosome (C1, ~210 A), rod (filament),
small (~55 A). --map FILE.mrc adds a user map (resampled to the pixel size asked for).
Ranges are LOW:HIGH (drawn uniformly per image / micrograph / movie) or a single value.
Everything is seeded (--seed): the same command writes the same data. Ground truth goes to
DIR/ground_truth/ (JSON + STAR with RELION labels; scs* columns are scopeside extras).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from app.errors import UserError

log = logging.getLogger(__name__)


def _range(text: str):
    """``"1.5"`` -> 1.5, ``"0.8:2.5"`` -> (0.8, 2.5)."""
    try:
        if ":" in text:
            lo, hi = (float(v) for v in text.split(":", 1))
            if hi < lo:
                raise argparse.ArgumentTypeError(f"range {text!r} has HIGH < LOW")
            return (lo, hi)
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or LOW:HIGH range") from None


def _common(p, *, n: int, pixel: float | None, defocus: str = "0.8:2.5", astig: str = "0:400"):
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--n", type=int, default=n, help=f"how many to make (default {n})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--molecules", default="asym",
                   help="comma-separated built-in molecules (default asym)")
    p.add_argument("--map", type=Path, action="append", default=[],
                   help="user density map (MRC), repeatable; mixed with --molecules")
    p.add_argument("--map-pixel-size", type=float, default=None,
                   help="pixel size of --map in A when its header has none")
    p.add_argument("--pixel-size", type=float, default=pixel,
                   help="pixel size in A/px" + (f" (default {pixel})" if pixel else
                                                " (default: molecule spans 2/3 of the box)"))
    p.add_argument("--defocus", type=_range, default=_range(defocus),
                   help=f"mean defocus in um, underfocus positive (default {defocus})")
    p.add_argument("--astigmatism", type=_range, default=_range(astig),
                   help=f"|DefocusU - DefocusV| in A (default {astig})")
    p.add_argument("--phase-shift", type=_range, default=0.0,
                   help="phase-plate phase shift in degrees (default 0)")
    p.add_argument("--bfactor", type=_range, default=None,
                   help="CTF envelope B-factor in A^2 (default 40 for particles, 60 otherwise)")
    p.add_argument("--voltage", type=float, default=300.0, help="kV (default 300)")
    p.add_argument("--cs", type=float, default=2.7, help="spherical aberration in mm (default 2.7)")
    p.add_argument("--amplitude-contrast", type=float, default=0.1,
                   help="amplitude contrast fraction (default 0.1)")
    p.add_argument("--float16", action="store_true", help="write images as float16 (MRC mode 12)")


def _micrograph_args(p):
    p.add_argument("--size", type=int, default=1024, help="micrograph edge in pixels (default 1024)")
    p.add_argument("--particles", type=int, default=None,
                   help="particles per micrograph (default: ~25%% of the area covered)")
    p.add_argument("--carbon-fraction", type=float, default=0.2,
                   help="fraction of micrographs/movies crossed by a carbon edge (default 0.2)")
    p.add_argument("--aggregates", type=int, default=1,
                   help="up to this many aggregates per micrograph (default 1)")
    p.add_argument("--ice-blobs", type=int, default=1,
                   help="up to this many ice contamination blobs per micrograph (default 1)")
    p.add_argument("--ice-thickness", type=_range, default=(250.0, 450.0),
                   help="mean ice thickness in A (default 250:450)")
    p.add_argument("--thon-contrast", type=float, default=0.3,
                   help="ice scattering power / shot-noise power: Thon-ring strength (default 0.3)")


def _movie_args(p, frames: int = 40):
    p.add_argument("--frames", type=int, default=frames, help=f"frames per movie (default {frames})")
    p.add_argument("--dose-per-frame", type=float, default=1.0,
                   help="exposure per frame in e/A^2 (default 1.0)")
    p.add_argument("--drift", type=_range, default=(2.0, 15.0),
                   help="global drift by the last frame in pixels (default 2:15)")
    p.add_argument("--local", type=float, default=1.5,
                   help="local deformation amplitude in pixels (default 1.5; 0 = none)")
    p.add_argument("--gain-rms", type=float, default=0.05,
                   help="relative rms of detector sensitivity (default 0.05; 0 = ideal)")
    p.add_argument("--hot", type=int, default=10, help="hot pixels (default 10)")
    p.add_argument("--dead", type=int, default=10, help="dead pixels (default 10)")
    p.add_argument("--format", choices=("tiff", "mrc", "eer"), default="tiff",
                   help="movie format: LZW TIFF (uint8 counts), MRC, or EER (electron events; "
                   "RELION reads only 4096x4096 EER) (default tiff)")
    p.add_argument("--eer-per-fraction", type=int, default=20,
                   help="EER frames per simulated fraction (default 20)")


def add_args(parser):
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    p = sub.add_parser("particles", help="a particle stack (protein white) with truth")
    _common(p, n=1000, pixel=None)
    p.add_argument("--box", type=int, default=64, help="box size in pixels (default 64)")
    p.add_argument("--snr", type=float, default=0.1,
                   help="signal variance / noise variance over the box (default 0.1)")
    p.add_argument("--junk-fraction", type=float, default=0.0,
                   help="fraction of junk images (default 0)")
    p.add_argument("--junk-kinds", default="ice,carbon,aggregate,empty,offcentre,wrongsize,"
                   "neighbour", help="comma-separated junk kinds (default: all)")
    p.add_argument("--max-shift", type=float, default=2.0,
                   help="largest particle offset in pixels per axis (default 2)")
    p.add_argument("--structural-noise", type=float, default=0.0,
                   help="fraction of the noise variance that carries the CTF (ice scattering; "
                   "0-1, default 0 = white noise)")
    p.add_argument("--per-micrograph", type=int, default=None,
                   help="images that share one CTF (one 'micrograph'); default: each its own")

    p = sub.add_parser("micrographs", help="micrographs (protein dark) with particle positions")
    _common(p, n=4, pixel=1.0)
    _micrograph_args(p)
    p.add_argument("--dose", type=float, default=40.0, help="total exposure in e/A^2 (default 40)")

    p = sub.add_parser("movies", help="movies with a known drift, dose, gain and defects")
    _common(p, n=2, pixel=1.0)
    _micrograph_args(p)
    _movie_args(p)

    p = sub.add_parser("session", help="an EPU or SerialEM folder of simulated movies")
    _common(p, n=4, pixel=1.0)
    _micrograph_args(p)
    _movie_args(p, frames=20)
    p.add_argument("--layout", choices=("epu", "serialem"), default="epu",
                   help="folder layout (default epu)")
    p.add_argument("--squares", type=int, default=1, help="EPU grid squares (default 1)")
    p.add_argument("--holes", type=int, default=2, help="EPU foil holes per square (default 2)")
    p.add_argument("--shots", type=int, default=2, help="EPU movies per hole (default 2)")
    p.add_argument("--movie-root", type=Path, default=None,
                   help="EPU: write movies under this separate storage root")
    p.add_argument("--drip", type=float, default=0.0,
                   help="seconds between movies, to imitate a running microscope (default 0)")
    p.add_argument("--grow", action="store_true",
                   help="with --drip: movie files grow in place instead of appearing whole")


def _pixel_size_for_maps(args) -> float:
    if args.pixel_size is None:
        raise UserError("--pixel-size is required with --map")
    return float(args.pixel_size)


def _molecules(args, box: int | None):
    """Built-in names plus user maps as (name, volume) resampled to the pixel size (and box)."""
    from compute.simulate.molecules import available_molecules

    names = [m.strip() for m in args.molecules.split(",") if m.strip()]
    known = available_molecules()
    bad = [m for m in names if m not in known]
    if bad:
        raise UserError(f"--molecules: unknown {', '.join(bad)}; built-in: {', '.join(known)}")
    specs: list = list(names)
    for path in args.map:
        from compute.simulate.project import resample_map
        from metadata.images import read_mrc

        vol, px = read_mrc(path)
        px = px or args.map_pixel_size
        if px is None:
            raise UserError(f"{path}: the map header has no pixel size; give --map-pixel-size")
        if vol.ndim != 3 or len(set(vol.shape)) != 1:
            raise UserError(f"{path}: a map must be a cubic 3D volume, got shape {vol.shape}")
        ps = _pixel_size_for_maps(args)
        n_out = box or int(round(vol.shape[0] * px / ps))
        n_out += n_out % 2
        specs.append((path.stem, resample_map(vol, px, ps, n_out)))
    if not specs:
        raise UserError("no molecules: give --molecules and/or --map")
    return specs


def _bfactor(args, default: float):
    return default if args.bfactor is None else args.bfactor


def _progress(what: str):
    def report(done: int, total: int) -> None:
        print(f"  {what} {done}/{total}", file=sys.stderr, flush=True)
    return report


def main(args) -> int:
    cmd = "scopeside simulate " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 2 else None
    if getattr(args, "n", 1) < 1:
        raise UserError("--n must be at least 1")
    t0 = time.perf_counter()
    out: Path = args.out
    if args.what == "particles":
        from app.simulation.writers import write_particle_set
        from compute.simulate.particles import simulate_particles

        stack = simulate_particles(
            args.n, _molecules(args, args.box), box=args.box, pixel_size_a=args.pixel_size,
            junk_fraction=args.junk_fraction,
            junk_kinds=[k.strip() for k in args.junk_kinds.split(",") if k.strip()],
            snr=args.snr, defocus_um=args.defocus, astigmatism_a=args.astigmatism,
            phase_shift_deg=args.phase_shift, bfactor_a2=_bfactor(args, 40.0),
            voltage_kv=args.voltage, cs_mm=args.cs, amplitude_contrast=args.amplitude_contrast,
            max_shift_px=args.max_shift, structural_noise=args.structural_noise,
            group_size=args.per_micrograph, seed=args.seed)
        paths = write_particle_set(out, stack, float16=args.float16, command=cmd)
        what = f"{args.n} particles ({args.box} px, {stack.truth.pixel_size_a:.3f} A/px)"
    elif args.what == "micrographs":
        import numpy as np

        from app.simulation.writers import write_micrograph_set
        from compute.simulate.micrograph import simulate_micrograph

        mols = _molecules(args, None)
        mics = []
        for i in range(args.n):
            rng = np.random.default_rng([args.seed, i, 7])
            mics.append(simulate_micrograph(
                args.size, pixel_size_a=args.pixel_size, molecules=mols,
                n_particles=args.particles, defocus_um=args.defocus,
                astigmatism_a=args.astigmatism, phase_shift_deg=args.phase_shift,
                bfactor_a2=_bfactor(args, 60.0), voltage_kv=args.voltage, cs_mm=args.cs,
                amplitude_contrast=args.amplitude_contrast, dose_e_a2=args.dose,
                ice_thickness_a=args.ice_thickness, thon_contrast=args.thon_contrast,
                carbon=bool(rng.random() < args.carbon_fraction),
                n_aggregates=int(rng.integers(0, args.aggregates + 1)),
                n_ice_blobs=int(rng.integers(0, args.ice_blobs + 1)),
                seed=int(rng.integers(2**31))))
            _progress("micrograph")(i + 1, args.n)
        paths = write_micrograph_set(out, mics, float16=args.float16, command=cmd)
        what = f"{args.n} micrographs ({args.size} px, {args.pixel_size} A/px)"
    elif args.what in ("movies", "session"):
        from app.simulation.session import SessionSpec

        spec = SessionSpec(
            shape=(args.size, args.size), n_frames=args.frames, pixel_size_a=args.pixel_size,
            dose_per_frame_e_a2=args.dose_per_frame, voltage_kv=args.voltage, cs_mm=args.cs,
            amplitude_contrast=args.amplitude_contrast,
            defocus_um=args.defocus if isinstance(args.defocus, tuple) else (args.defocus,) * 2,
            astigmatism_a=args.astigmatism if isinstance(args.astigmatism, tuple)
            else (args.astigmatism,) * 2,
            drift_px=args.drift if isinstance(args.drift, tuple) else (args.drift,) * 2,
            local_px=args.local, carbon_fraction=args.carbon_fraction,
            max_aggregates=args.aggregates, max_ice_blobs=args.ice_blobs,
            gain_rms=args.gain_rms, n_hot=args.hot, n_dead=args.dead, movie_format=args.format,
            eer_frames_per_fraction=args.eer_per_fraction, seed=args.seed,
            movie_kw=dict(molecules=_molecules(args, None), n_particles=args.particles,
                          phase_shift_deg=args.phase_shift, bfactor_a2=_bfactor(args, 60.0),
                          ice_thickness_a=args.ice_thickness, thon_contrast=args.thon_contrast))
        if args.what == "movies":
            from app.simulation.session import _detector, _make_movie
            from app.simulation.writers import write_movie_set

            det = _detector(spec)
            paths = write_movie_set(out, args.n, lambda i: _make_movie(spec, i, det),
                                    fmt=args.format, command=cmd, progress=_progress("movie"),
                                    eer_frames_per_fraction=args.eer_per_fraction)
            what = f"{args.n} movies ({args.size} px x {args.frames} frames, {args.format})"
        elif args.layout == "epu":
            from app.simulation.session import write_epu_session_sim

            movies = write_epu_session_sim(
                out, spec, n_grid_squares=args.squares, holes_per_square=args.holes,
                shots_per_hole=args.shots, movie_root=args.movie_root, interval_s=args.drip,
                grow=args.grow, command=cmd, progress=_progress("movie"))
            paths = {"session": out / "EpuSession.dm"}
            what = f"EPU session with {len(movies)} movies"
        else:
            from app.simulation.session import write_serialem_session_sim

            written = write_serialem_session_sim(out, spec, n_movies=args.n,
                                                 interval_s=args.drip, grow=args.grow,
                                                 command=cmd, progress=_progress("movie"))
            paths = {"folder": out}
            what = f"SerialEM folder with {len(written)} movies"
    else:  # pragma: no cover - argparse restricts the choices
        raise UserError(f"unknown simulation {args.what!r}")
    print(f"wrote {what} to {out} in {time.perf_counter() - t0:.1f} s")
    for k, v in paths.items():
        print(f"  {k}: {v}")
    print(f"  ground truth: {out / 'ground_truth'}")
    return 0
