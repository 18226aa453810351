"""Write simulated data and its ground truth (RELION STAR / MRC / TIFF / JSON).

Layout written by the ``write_*_set`` functions (``out`` is the folder given)::

    out/particles.mrcs, out/particles.star            a RELION 4 extraction-like stack
    out/Micrographs/mic_00001.mrc, out/micrographs.star
    out/Movies/movie_00001.tiff|.mrc|.eer, out/movies.star, out/gain_reference.mrc (.gain for
    EER), out/defects.txt
    out/ground_truth/...                              truth JSON + STAR (see each function)

Movies hold raw electron counts (``uint8`` LZW TIFF, MRC mode 0 (int8) / mode 6 (uint16), or
EER with ``eer_frames_per_fraction`` EER frames per simulated fraction);
multiply by ``gain_reference.mrc`` to gain-normalise (RELION's and MotionCor2's convention).
``defects.txt`` lists defective pixels as ``x y 1 1`` (MotionCor2 / RELION defect-file format).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from app.errors import UserError
from compute.backend import to_numpy
from metadata.images import write_mrc
from metadata.star import write_star

log = logging.getLogger(__name__)

MOVIE_FORMATS = ("tiff", "mrc", "eer")
MOVIE_SUFFIX = {"tiff": ".tiff", "mrc": ".mrc", "eer": ".eer"}


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | Path, data: dict) -> Path:
    """Write ``data`` as indented JSON (NumPy values converted; NaN written as null)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)

    def clean(x):
        if isinstance(x, float) and not np.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        if isinstance(x, np.ndarray):
            return clean(x.tolist())
        if isinstance(x, np.generic):
            return clean(x.item())
        return x

    p.write_text(json.dumps(clean(data), indent=1, default=_json_default), encoding="utf-8")
    return p


def write_movie(path: str | Path, frames: np.ndarray, pixel_size_a: float | None = None,
                fmt: str | None = None, *, eer_frames_per_fraction: int = 20,
                exposure_time_s: float | None = 2.0, seed: int | None = 0,
                hot_pixels: np.ndarray | None = None) -> Path:
    """Write a movie ``(n, ny, nx)`` of counts.

    Parameters
    ----------
    path : output file; the format follows ``fmt`` or the suffix (``.tif``/``.tiff`` ->
        multi-page LZW TIFF, ``.mrc`` -> MRC stack, ``.eer`` -> EER, see
        :mod:`app.simulation.eer`).
    frames : integer counts (uint8/uint16) or float frames.
    pixel_size_a : written into the MRC header / EER metadata (TIFF has no standard field).
    eer_frames_per_fraction, exposure_time_s, seed, hot_pixels : EER only: each fraction is
        split into this many EER frames (random, seeded); hot pixels fire in every EER frame.
    """
    p = Path(path)
    fmt = (fmt or p.suffix.lstrip(".")).lower()
    fmt = {"tif": "tiff"}.get(fmt, fmt)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = to_numpy(frames)
    if data.ndim != 3:
        raise UserError(f"{p}: a movie needs (frames, y, x) data, got shape {data.shape}")
    if fmt == "tiff":
        import tifffile

        tmp = p.with_name(f".{p.name}.part")
        # stored flipped in Y: readers of TIFF movies (RELION, MotionCor2, IMOD, ours) flip
        # them back, so the frames read are ``frames`` and the ground truth holds
        tifffile.imwrite(tmp, np.ascontiguousarray(data[:, ::-1]), compression="lzw",
                         photometric="minisblack", metadata=None)
        tmp.replace(p)
    elif fmt == "mrc":
        import mrcfile

        if data.dtype == np.uint8 and int(data.max(initial=0)) <= 127:
            data = data.astype(np.int8)  # MRC mode 0, as counting cameras write
        tmp = p.with_name(f".{p.name}.part")
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(data)
            m.set_image_stack()
            if pixel_size_a:
                m.voxel_size = float(pixel_size_a)
        tmp.replace(p)
    elif fmt == "eer":
        from app.simulation.eer import write_eer

        write_eer(p, data, eer_frames_per_fraction=eer_frames_per_fraction,
                  pixel_size_a=pixel_size_a, exposure_time_s=exposure_time_s, seed=seed,
                  hot_pixels=hot_pixels)
    else:
        raise UserError(f"{p}: unknown movie format {fmt!r}; use one of {', '.join(MOVIE_FORMATS)}")
    return p


def write_gain(path: str | Path, gain, pixel_size_a: float | None = None) -> Path:
    """Write a multiplicative gain reference in the format its suffix names, so that
    :func:`metadata.frames.read_gain` (RELION's conventions) returns ``gain`` again:

    - ``.mrc``: as is;
    - ``.gain`` (Thermo Fisher, for EER movies): a float32 TIFF, as stored (multiplicative);
    - ``.dm4`` (DigitalMicrograph, as SerialEM copies a K2/K3's): flipped in Y on disk, since
      IMOD/RELION read top-left-origin images flipped.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    g = to_numpy(gain).astype(np.float32)
    suf = p.suffix.lower()
    if suf == ".gain":
        import tifffile

        tifffile.imwrite(p, g, photometric="minisblack", metadata=None)
        return p
    if suf == ".dm4":
        from metadata.synth import write_dm4_image

        return write_dm4_image(p, np.ascontiguousarray(g[::-1]),
                               pixel_size_nm=(pixel_size_a or 10.0) / 10.0)
    return write_mrc(p, g, pixel_size_a=pixel_size_a)


def gain_name_for(fmt: str, stem: str = "gain_reference") -> str:
    """EER movies come with Thermo Fisher's multiplicative ``.gain``; others with an MRC."""
    return f"{stem}.gain" if fmt == "eer" else f"{stem}.mrc"


def write_defects(path: str | Path, hot_yx: np.ndarray, dead_yx: np.ndarray) -> Path:
    """Defective pixels as ``x y 1 1`` lines (the MotionCor2 / RELION defect-file format)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{int(x)} {int(y)} 1 1" for y, x in np.concatenate([hot_yx, dead_yx]).reshape(-1, 2)]
    p.write_text("\n".join(rows) + ("\n" if rows else ""), encoding="utf-8")
    return p


def _optics(name: str, pixel_size_a: float, voltage_kv: float, cs_mm: float, q: float,
            kind: str, box: int | None = None) -> pd.DataFrame:
    row: dict[str, Any] = {"rlnOpticsGroupName": [name], "rlnOpticsGroup": [1]}
    if kind == "movies":
        row["rlnMicrographOriginalPixelSize"] = [pixel_size_a]
    elif kind == "micrographs":
        row["rlnMicrographOriginalPixelSize"] = [pixel_size_a]
        row["rlnMicrographPixelSize"] = [pixel_size_a]
    row.update({"rlnVoltage": [voltage_kv], "rlnSphericalAberration": [cs_mm],
                "rlnAmplitudeContrast": [q]})
    if kind == "particles":
        row["rlnMicrographOriginalPixelSize"] = [pixel_size_a]
        row["rlnImagePixelSize"] = [pixel_size_a]
        row["rlnImageSize"] = [int(box or 0)]
        row["rlnImageDimensionality"] = [2]
    return pd.DataFrame(row)


# --- particles -----------------------------------------------------------------------------

def write_particle_set(out: str | Path, stack, *, float16: bool = False,
                       command: str | None = None) -> dict[str, Path]:
    """Write a simulated :class:`compute.simulate.particles.ParticleStack`.

    Writes ``particles.mrcs``, ``particles.star`` (optics + particles tables as RELION 4's
    Extract writes them: image name, micrograph name, CTF, optics group; no angles) and
    ``ground_truth/particles_truth.star`` (the same rows plus rlnAngleRot/Tilt/Psi,
    rlnOriginX/YAngst, scsKind, scsMolecule) and ``ground_truth/particles_truth.json``.
    """
    out = Path(out)
    t = stack.truth
    n = len(t)
    paths: dict[str, Path] = {}
    paths["stack"] = write_mrc(out / "particles.mrcs", to_numpy(stack.images),
                               pixel_size_a=t.pixel_size_a, float16=float16, is_stack=True)
    tab = t.table()
    names = [f"{i + 1:06d}@particles.mrcs" for i in range(n)]
    mics = [f"Micrographs/sim_{int(m) + 1:05d}.mrc" for m in t.micrograph]
    base = {
        "rlnImageName": names, "rlnMicrographName": mics,
        "rlnDefocusU": tab["rlnDefocusU"], "rlnDefocusV": tab["rlnDefocusV"],
        "rlnDefocusAngle": tab["rlnDefocusAngle"], "rlnPhaseShift": tab["rlnPhaseShift"],
        "rlnCtfBfactor": tab["rlnCtfBfactor"], "rlnCtfScalefactor": np.ones(n),
        "rlnOpticsGroup": np.ones(n, dtype=int),
    }
    optics = _optics("opticsGroup1", t.pixel_size_a, t.ctf.voltage_kv, t.ctf.cs_mm,
                     t.ctf.amplitude_contrast, "particles", t.box)
    paths["star"] = write_star(out / "particles.star",
                               {"optics": optics, "particles": pd.DataFrame(base)})
    truth = dict(base)
    for k in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
              "rlnOriginYAngst", "scsKind", "scsMolecule", "scsMicrographIndex"):
        truth[k] = tab[k]
    paths["truth_star"] = write_star(out / "ground_truth" / "particles_truth.star",
                                     {"optics": optics, "particles": pd.DataFrame(truth)})
    js = t.to_json()
    js["command"] = command
    js["files"] = {"stack": "particles.mrcs", "star": "particles.star"}
    paths["truth_json"] = write_json(out / "ground_truth" / "particles_truth.json", js)
    return paths


# --- micrographs ---------------------------------------------------------------------------

def _coords_rows(name: str, t) -> dict[str, Any]:
    tab = t.table()
    n = len(tab["rlnCoordinateX"])
    return {"rlnMicrographName": [name] * n, **tab}


def write_micrograph_set(out: str | Path, micrographs: Sequence, *, float16: bool = False,
                         command: str | None = None) -> dict[str, Path]:
    """Write simulated micrographs.

    Writes ``Micrographs/mic_NNNNN.mrc``, ``micrographs.star`` (optics + micrographs, as
    input to CTF estimation / picking), ``ground_truth/micrographs_truth.star`` (true
    rlnDefocusU/V/Angle, rlnPhaseShift, rlnCtfBfactor, ice thickness, carbon, counts),
    ``ground_truth/coordinates_truth.star`` (every particle: micrograph, rlnCoordinateX/Y,
    angles, scsKind ``particle``/``aggregate``) and one JSON per micrograph.
    """
    out = Path(out)
    if not micrographs:
        raise UserError("no micrographs to write")
    t0 = micrographs[0].truth
    rows, truth_rows, coords = [], [], []
    for i, mic in enumerate(micrographs):
        name = f"Micrographs/mic_{i + 1:05d}.mrc"
        write_mrc(out / name, to_numpy(mic.image), pixel_size_a=mic.truth.pixel_size_a,
                  float16=float16)
        t = mic.truth
        rows.append({"rlnMicrographName": name, "rlnOpticsGroup": 1})
        truth_rows.append({
            "rlnMicrographName": name, "rlnDefocusU": t.ctf.defocus_u_a,
            "rlnDefocusV": t.ctf.defocus_v_a, "rlnDefocusAngle": t.ctf.defocus_angle_deg,
            "rlnPhaseShift": t.ctf.phase_shift_deg, "rlnCtfBfactor": t.ctf.bfactor_a2,
            "scsIceThicknessA": t.ice_thickness_mean_a, "scsDoseEA2": t.dose_e_a2,
            "scsHasCarbon": int(t.carbon is not None), "scsNumIceBlobs": len(t.ice_blobs),
            "scsNumParticles": int((t.particles["kind"] == "particle").sum()),
        })
        coords.append(pd.DataFrame(_coords_rows(name, t)))
        js = t.to_json()
        js["micrograph"] = name
        write_json(out / "ground_truth" / f"mic_{i + 1:05d}.json", js)
    optics = _optics("opticsGroup1", t0.pixel_size_a, t0.ctf.voltage_kv, t0.ctf.cs_mm,
                     t0.ctf.amplitude_contrast, "micrographs")
    paths = {
        "star": write_star(out / "micrographs.star",
                           {"optics": optics, "micrographs": pd.DataFrame(rows)}),
        "truth_star": write_star(out / "ground_truth" / "micrographs_truth.star",
                                 {"optics": optics, "micrographs": pd.DataFrame(truth_rows)}),
        "coords_star": write_star(out / "ground_truth" / "coordinates_truth.star",
                                  {"particles": pd.concat(coords, ignore_index=True)}),
    }
    write_json(out / "ground_truth" / "run.json", {"command": command, "n": len(micrographs)})
    return paths


# --- movies --------------------------------------------------------------------------------

def movie_truth_row(name: str, truth) -> dict[str, Any]:
    """One row of ``movies_truth.star`` for a :class:`compute.simulate.movie.MovieTruth`."""
    m = truth.micrograph
    g = truth.global_shifts_px
    return {
        "rlnMicrographMovieName": name, "rlnDefocusU": m.ctf.defocus_u_a,
        "rlnDefocusV": m.ctf.defocus_v_a, "rlnDefocusAngle": m.ctf.defocus_angle_deg,
        "rlnPhaseShift": m.ctf.phase_shift_deg, "rlnCtfBfactor": m.ctf.bfactor_a2,
        # RELION's label is in Å: path length of the global trajectory x pixel size
        "rlnAccumMotionTotal": float(np.hypot(*np.diff(g, axis=0).T).sum()) * m.pixel_size_a
        if len(g) > 1 else 0.0,
        "scsFinalShiftX": float(g[-1, 0]), "scsFinalShiftY": float(g[-1, 1]),
        "scsNumFrames": truth.n_frames, "scsDosePerFrame": truth.dose_per_frame_e_a2,
        "scsIceThicknessA": m.ice_thickness_mean_a, "scsHasCarbon": int(m.carbon is not None),
        "scsNumParticles": int((m.particles["kind"] == "particle").sum()),
    }


def write_movie_truth(truth_dir: Path, stem: str, name: str, movie) -> Path:
    """Per-movie truth: ``<stem>.json`` (everything) and ``<stem>_shifts.star`` (per-frame
    global shifts, RELION's rlnMicrographFrameNumber / rlnMicrographShiftX/Y, frames from 1,
    shifts in pixels of the specimen motion relative to frame 1)."""
    js = movie.truth.to_json()
    js["movie"] = name
    g = movie.truth.global_shifts_px
    write_star(truth_dir / f"{stem}_shifts.star", {
        "global_shift": pd.DataFrame({
            "rlnMicrographFrameNumber": np.arange(1, len(g) + 1),
            "rlnMicrographShiftX": g[:, 0], "rlnMicrographShiftY": g[:, 1]})})
    return write_json(truth_dir / f"{stem}.json", js)


def write_movie_set(out: str | Path, n: int, make_movie: Callable[[int], Any], *,
                    fmt: str = "tiff", float16_truth: bool = True,
                    eer_frames_per_fraction: int = 20,
                    command: str | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, Path]:
    """Generate and write ``n`` movies one at a time (``make_movie(i)`` returns a
    :class:`compute.simulate.movie.Movie`; all share one detector, i.e. gain and defects).

    Writes ``Movies/movie_NNNNN.<fmt>``, ``movies.star`` (optics + movies, as input to
    motion correction), ``gain_reference.mrc`` (``.gain`` for EER), ``defects.txt`` and ``ground_truth/``:
    ``movies_truth.star``, per movie ``movie_NNNNN.json`` + ``movie_NNNNN_shifts.star``
    and the noise-free, undamaged frame-0 image ``movie_NNNNN_truth.mrc`` (e/px/frame).
    """
    if fmt not in MOVIE_FORMATS:
        raise UserError(f"unknown movie format {fmt!r}; use one of {', '.join(MOVIE_FORMATS)}")
    out = Path(out)
    rows, truth_rows = [], []
    first = None
    for i in range(n):
        mv = make_movie(i)
        first = first or mv
        name = f"Movies/movie_{i + 1:05d}{MOVIE_SUFFIX[fmt]}"
        t = mv.truth
        write_movie(out / name, to_numpy(mv.frames), t.micrograph.pixel_size_a, fmt,
                    eer_frames_per_fraction=eer_frames_per_fraction, seed=i,
                    hot_pixels=t.hot_pixels)
        rows.append({"rlnMicrographMovieName": name, "rlnOpticsGroup": 1})
        truth_rows.append(movie_truth_row(name, t))
        write_movie_truth(out / "ground_truth", f"movie_{i + 1:05d}", name, mv)
        if mv.truth_image is not None:
            write_mrc(out / "ground_truth" / f"movie_{i + 1:05d}_truth.mrc",
                      to_numpy(mv.truth_image), pixel_size_a=t.micrograph.pixel_size_a,
                      float16=float16_truth)
        if progress:
            progress(i + 1, n)
    t = first.truth
    c = t.micrograph.ctf
    optics = _optics("opticsGroup1", t.micrograph.pixel_size_a, c.voltage_kv, c.cs_mm,
                     c.amplitude_contrast, "movies")
    paths = {
        "star": write_star(out / "movies.star",
                           {"optics": optics, "movies": pd.DataFrame(rows)}),
        "truth_star": write_star(out / "ground_truth" / "movies_truth.star",
                                 {"optics": optics, "movies": pd.DataFrame(truth_rows)}),
        "gain": write_gain(out / gain_name_for(fmt), first.gain,
                           pixel_size_a=t.micrograph.pixel_size_a),
        "defects": write_defects(out / "defects.txt", t.hot_pixels, t.dead_pixels),
    }
    write_json(out / "ground_truth" / "run.json", {"command": command, "n": n, "format": fmt})
    return paths
