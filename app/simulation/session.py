"""Whole simulated acquisition sessions on disk, in EPU or SerialEM layout.

EPU (via :func:`metadata.synth.write_epu_session`)::

    out/EpuSession.dm
    out/Images-Disc1/GridSquare_<gs>/GridSquare_<gs>_<date>_<time>.xml
    out/Images-Disc1/GridSquare_<gs>/FoilHoles/FoilHole_<fh>_<date>_<time>.xml
    out/Images-Disc1/GridSquare_<gs>/Data/FoilHole_<fh>_Data_<d>_<n>_<date>_<time>.xml
    <movie_root or out>/Images-Disc1/GridSquare_<gs>/Data/<same stem>_fractions.tiff | _Fractions.mrc
    <movie_root or out>/gain_reference.mrc (.gain for EER movies), defects.txt

SerialEM (via :func:`metadata.synth.write_mdoc`)::

    out/<prefix>_<nnnnn>.tif and out/<prefix>_<nnnnn>.tif.mdoc   (or .mrc / .mrc.mdoc)
    out/CountRef_<prefix>.dm4 (as SerialEM copies a K2/K3's gain reference; .gain for EER),
    out/defects.txt

Both: ``out/ground_truth/`` with ``movies_truth.star`` (true defocus, drift, ... per movie,
movie paths relative to ``out``), ``coordinates_truth.star`` (every particle's frame-1
position) and per movie ``<stem>.json`` + ``<stem>_shifts.star``.

Movies are written whole under a hidden ``.<name>.part`` name and renamed when complete.
Drip-feeding (``interval_s > 0``): the whole session is first generated in a hidden sibling
folder ``.<out>.staging`` (and ``.<movie_root>.staging``); then the session-level files
(EpuSession.dm, grid-square / foil-hole images, gain, defects, ground truth) appear at once
and the acquisitions follow ``interval_s`` apart, each as its metadata file (XML / mdoc)
and then its movie, renamed into place whole or, with ``grow=True``, growing in place over
``interval_s / 2`` like a camera writing frames (readers must wait for it to stop changing).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from app.errors import UserError
from app.simulation.writers import (
    gain_name_for,
    movie_truth_row,
    write_defects,
    write_gain,
    write_json,
    write_movie,
    write_movie_truth,
)
from compute.backend import to_numpy
from metadata.star import write_star

log = logging.getLogger(__name__)

_EPU_SUFFIX = {"tiff": "_fractions.tiff", "mrc": "_Fractions.mrc", "eer": "_EER.eer"}


@dataclass
class SessionSpec:
    """What every movie of a simulated session shares, and how movies vary.

    Ranges are ``(low, high)``, drawn per movie. ``movie_kw`` goes to
    :func:`compute.simulate.movie.simulate_movie` (molecules, thon_contrast, ...).
    """

    shape: tuple[int, int] = (1024, 1024)
    n_frames: int = 20
    pixel_size_a: float = 1.0
    dose_per_frame_e_a2: float = 1.0
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    defocus_um: tuple[float, float] = (0.8, 2.5)
    astigmatism_a: tuple[float, float] = (0.0, 400.0)
    drift_px: tuple[float, float] = (2.0, 15.0)
    local_px: float = 1.5
    carbon_fraction: float = 0.2
    max_aggregates: int = 2
    max_ice_blobs: int = 1
    gain_rms: float = 0.05
    n_hot: int = 10
    n_dead: int = 10
    movie_format: str = "tiff"
    eer_frames_per_fraction: int = 20
    exposure_time_s: float = 2.0
    seed: int = 0
    movie_kw: dict[str, Any] = field(default_factory=dict)

    def movie_seed(self, i: int) -> int:
        return int(np.random.default_rng([self.seed, i]).integers(2**31))


def _detector(spec: SessionSpec):
    from compute.simulate.movie import make_detector

    return make_detector(spec.shape, np.random.default_rng([spec.seed, 999_983]), spec.gain_rms,
                         spec.n_hot, spec.n_dead)


def _make_movie(spec: SessionSpec, i: int, detector):
    from compute.simulate.movie import simulate_movie

    seed = spec.movie_seed(i)
    rng = np.random.default_rng([seed, 1])
    return simulate_movie(
        spec.shape, spec.n_frames, pixel_size_a=spec.pixel_size_a,
        dose_per_frame_e_a2=spec.dose_per_frame_e_a2,
        drift_px=float(rng.uniform(*spec.drift_px)), local_px=spec.local_px,
        detector=detector, seed=seed, voltage_kv=spec.voltage_kv, cs_mm=spec.cs_mm,
        amplitude_contrast=spec.amplitude_contrast, defocus_um=spec.defocus_um,
        astigmatism_a=spec.astigmatism_a,
        carbon=bool(rng.random() < spec.carbon_fraction),
        n_aggregates=int(rng.integers(0, spec.max_aggregates + 1)),
        n_ice_blobs=int(rng.integers(0, spec.max_ice_blobs + 1)),
        **spec.movie_kw,
    )


def _write_movie_file(path: Path, mv, spec: SessionSpec, seed: int) -> None:
    write_movie(path, to_numpy(mv.frames), spec.pixel_size_a, spec.movie_format,
                eer_frames_per_fraction=spec.eer_frames_per_fraction,
                exposure_time_s=spec.exposure_time_s, seed=seed,
                hot_pixels=mv.truth.hot_pixels)


def _staging(path: Path) -> Path:
    """A hidden sibling folder (same file system, so moves out of it are atomic renames)."""
    return path.with_name(f".{path.name}.staging")


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def _grow(src: Path, dst: Path, seconds: float, steps: int = 4) -> None:
    """Copy ``src`` to ``dst`` in ``steps`` chunks over ``seconds`` (a file being written)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = src.read_bytes()
    step = -(-len(data) // steps)
    with open(dst, "wb") as fh:
        for k in range(steps):
            fh.write(data[k * step:(k + 1) * step])
            fh.flush()
            time.sleep(seconds / steps)
    src.unlink()


def _replay(static: list[tuple[Path, Path]], shots: list[tuple[Path, Path, Path, Path]],
            interval_s: float, grow: bool) -> None:
    """Move staged files into place like a running microscope: ``static`` files at once,
    then per acquisition (``interval_s`` apart) its metadata file, then its movie (renamed
    whole, or grown in place over ``interval_s / 2``)."""
    for src, dst in static:
        _move(src, dst)
    for k, (meta_src, meta_dst, movie_src, movie_dst) in enumerate(shots):
        if k:
            time.sleep(interval_s)
        _move(meta_src, meta_dst)
        if grow:
            _grow(movie_src, movie_dst, interval_s / 2)
        else:
            _move(movie_src, movie_dst)


def _static_files(stage: Path, dest: Path, moving: set[Path]) -> list[tuple[Path, Path]]:
    return [(f, dest / f.relative_to(stage)) for f in sorted(stage.rglob("*"))
            if f.is_file() and f not in moving]


class _Truth:
    """Collects per-movie truth while a session is written."""

    def __init__(self, out: Path):
        self.out = out
        self.rows: list[dict] = []
        self.coords: list[pd.DataFrame] = []

    def add(self, name: str, stem: str, movie) -> None:
        self.rows.append(movie_truth_row(name, movie.truth))
        tab = movie.truth.micrograph.table()
        n = len(tab["rlnCoordinateX"])
        self.coords.append(pd.DataFrame({"rlnMicrographMovieName": [name] * n, **tab}))
        write_movie_truth(self.out / "ground_truth", stem, name, movie)

    def finish(self, spec: SessionSpec, extra: dict) -> None:
        gt = self.out / "ground_truth"
        optics = pd.DataFrame({
            "rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
            "rlnMicrographOriginalPixelSize": [spec.pixel_size_a],
            "rlnVoltage": [spec.voltage_kv], "rlnSphericalAberration": [spec.cs_mm],
            "rlnAmplitudeContrast": [spec.amplitude_contrast]})
        write_star(gt / "movies_truth.star",
                   {"optics": optics, "movies": pd.DataFrame(self.rows)})
        if self.coords:
            write_star(gt / "coordinates_truth.star",
                       {"particles": pd.concat(self.coords, ignore_index=True)})
        spec_js = {k: v for k, v in vars(spec).items()}
        write_json(gt / "session.json", {"spec": spec_js, **extra})


def write_epu_session_sim(
    out: str | Path,
    spec: SessionSpec | None = None,
    *,
    n_grid_squares: int = 1,
    holes_per_square: int = 2,
    shots_per_hole: int = 2,
    movie_root: str | Path | None = None,
    interval_s: float = 0.0,
    grow: bool = False,
    command: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list:
    """Write an EPU session with simulated movies and ground truth.

    Returns the :class:`metadata.synth.SyntheticMovie` list (XML and movie paths).
    ``interval_s`` spaces movies in time (drip-feeding); see the module docstring.
    """
    from metadata.synth import write_epu_movie_xml, write_epu_session

    spec = spec or SessionSpec()
    if spec.movie_format not in _EPU_SUFFIX:
        raise UserError(f"EPU sessions are written with tiff, mrc or eer movies, not "
                        f"{spec.movie_format!r}")
    out = Path(out)
    if interval_s > 0:
        # generate everything first, then let it appear on the microscope's schedule
        stage = _staging(out)
        mstage = _staging(Path(movie_root)) if movie_root is not None else None
        for d in (stage, mstage):
            if d is not None and d.exists():
                shutil.rmtree(d)
        staged = write_epu_session_sim(stage, spec, n_grid_squares=n_grid_squares,
                                       holes_per_square=holes_per_square,
                                       shots_per_hole=shots_per_hole, movie_root=mstage,
                                       command=command, progress=progress)
        mdest = Path(movie_root) if movie_root is not None else out
        mst = mstage if mstage is not None else stage
        final = [dataclasses.replace(m, xml_path=out / m.xml_path.relative_to(stage),
                                     movie_path=mdest / m.movie_path.relative_to(mst))
                 for m in staged]
        moving = {m.xml_path for m in staged} | {m.movie_path for m in staged}
        static = _static_files(stage, out, moving)
        if mstage is not None:
            static += _static_files(mstage, mdest, moving)
        _replay(static, [(a.xml_path, b.xml_path, a.movie_path, b.movie_path)
                         for a, b in zip(staged, final)], interval_s, grow)
        _fix_session_json(out, mdest)
        for d in (stage, mstage):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
        return final
    mroot = Path(movie_root) if movie_root is not None else out
    detector = _detector(spec)
    truth = _Truth(out)
    total = n_grid_squares * holes_per_square * shots_per_hole
    counter = {"i": 0}
    xml_kw = dict(voltage_kv=spec.voltage_kv, pixel_size_a=spec.pixel_size_a,
                  n_fractions=spec.n_frames,
                  dose_e_a2=spec.dose_per_frame_e_a2 * spec.n_frames,
                  exposure_time_s=spec.exposure_time_s,
                  readout_width=spec.shape[1], readout_height=spec.shape[0])
    gain_name = gain_name_for(spec.movie_format)
    if spec.movie_format == "eer":
        xml_kw.update(eer_frame_rate_hz=spec.n_frames * spec.eer_frames_per_fraction
                      / spec.exposure_time_s, eer_gain_reference=gain_name,
                      camera_name="EF-Falcon", detector_commercial_name="Falcon 4i")
    mroot.mkdir(parents=True, exist_ok=True)
    write_gain(mroot / gain_name, detector.gain_reference, pixel_size_a=spec.pixel_size_a)
    write_defects(mroot / "defects.txt", detector.hot_pixels, detector.dead_pixels)

    def writer(mpath: Path, info) -> None:
        i = counter["i"]
        counter["i"] += 1
        mv = _make_movie(spec, i, detector)
        c = mv.truth.micrograph.ctf
        # the XML carries this movie's nominal defocus (EPU writes the applied defocus)
        nominal = -round(c.defocus_mean_a / 1e4 * 4) / 4  # nearest 0.25 um, negative = under
        write_epu_movie_xml(info.xml_path, acquired_at=info.acquired_at, defocus_um=nominal,
                            **xml_kw)
        _write_movie_file(mpath, mv, spec, i)  # whole, under a hidden name, then renamed
        name = _relative(mpath, out)
        truth.add(name, mpath.name.removesuffix(_EPU_SUFFIX[spec.movie_format]), mv)
        if progress:
            progress(i + 1, total)

    movies = write_epu_session(out, n_grid_squares=n_grid_squares,
                               holes_per_square=holes_per_square, shots_per_hole=shots_per_hole,
                               movie_format=spec.movie_format, movie_root=movie_root,
                               movie_writer=writer, **xml_kw)
    truth.finish(spec, {"layout": "epu", "command": command, "movie_root": str(mroot),
                        "gain_reference": gain_name, "defects": "defects.txt",
                        "n_movies": len(movies)})
    return movies


def _fix_session_json(out: Path, movie_root: Path) -> None:
    p = out / "ground_truth" / "session.json"
    js = json.loads(p.read_text(encoding="utf-8"))
    js["movie_root"] = str(movie_root)
    p.write_text(json.dumps(js, indent=1), encoding="utf-8")


def _relative(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


def write_serialem_session_sim(
    out: str | Path,
    spec: SessionSpec | None = None,
    *,
    n_movies: int = 4,
    prefix: str = "sim",
    interval_s: float = 0.0,
    grow: bool = False,
    command: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[Path, Path]]:
    """Write a SerialEM-style folder: ``<prefix>_NNNNN.tif`` + ``.tif.mdoc`` per movie, the
    gain reference ``CountRef_<prefix>.dm4`` and ``defects.txt``; returns (movie, mdoc) paths."""
    from metadata.synth import write_mdoc

    spec = spec or SessionSpec()
    if spec.movie_format not in ("tiff", "mrc", "eer"):
        raise UserError(f"SerialEM sessions are written with tiff, mrc or eer movies, not "
                        f"{spec.movie_format!r}")
    out = Path(out)
    if interval_s > 0:
        stage = _staging(out)
        if stage.exists():
            shutil.rmtree(stage)
        staged = write_serialem_session_sim(stage, spec, n_movies=n_movies, prefix=prefix,
                                            command=command, progress=progress)
        final = [(out / m.name, out / d.name) for m, d in staged]
        moving = {p for pair in staged for p in pair}
        _replay(_static_files(stage, out, moving),
                [(d, fd, m, fm) for (m, d), (fm, fd) in zip(staged, final)], interval_s, grow)
        shutil.rmtree(stage, ignore_errors=True)
        return final
    out.mkdir(parents=True, exist_ok=True)
    detector = _detector(spec)
    # SerialEM copies DigitalMicrograph's gain reference of a K2/K3; a Falcon's EER comes with
    # Thermo Fisher's .gain
    gain_name = (gain_name_for("eer", f"CountRef_{prefix}") if spec.movie_format == "eer"
                 else f"CountRef_{prefix}.dm4")
    write_gain(out / gain_name, detector.gain_reference, pixel_size_a=spec.pixel_size_a)
    write_defects(out / "defects.txt", detector.hot_pixels, detector.dead_pixels)
    truth = _Truth(out)
    ext = {"tiff": "tif", "mrc": "mrc", "eer": "eer"}[spec.movie_format]
    start = _dt.datetime(2024, 5, 17, 10, 30, 0)
    written = []
    for i in range(n_movies):
        mv = _make_movie(spec, i, detector)
        stem = f"{prefix}_{i + 1:05d}"
        mpath = out / f"{stem}.{ext}"
        _write_movie_file(mpath, mv, spec, i)
        c = mv.truth.micrograph.ctf
        mdoc = write_mdoc(
            out / f"{mpath.name}.mdoc", variant="frame", pixel_size_a=spec.pixel_size_a,
            voltage_kv=spec.voltage_kv,
            exposure_dose_e_a2=spec.dose_per_frame_e_a2 * spec.n_frames,
            n_frames=spec.n_frames, gain_reference=gain_name,
            defocus_um=-round(c.defocus_mean_a / 1e4, 2),
            target_defocus_um=-round(c.defocus_mean_a / 1e4 * 4) / 4,
            sub_frame_path=rf"X:\{prefix}\{mpath.name}",
            when=start + _dt.timedelta(seconds=30 * i))
        truth.add(mpath.name, stem, mv)
        written.append((mpath, mdoc))
        if progress:
            progress(i + 1, n_movies)
    truth.finish(spec, {"layout": "serialem", "command": command, "gain_reference": gain_name,
                        "defects": "defects.txt", "n_movies": n_movies})
    return written
