"""Small RELION-4 output files with known content, for the GUI tests, benchmark and screenshots.

Each writer produces the files a real job writes (same tables and labels), with values the
caller chooses, so a test can assert what the GUI shows against what was written.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
import pandas as pd

from metadata.images import write_mrc
from metadata.star import write_star

PIXEL_A = 1.0


def optics(pixel_a: float = PIXEL_A) -> pd.DataFrame:
    return pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                         "rlnMicrographOriginalPixelSize": [pixel_a], "rlnVoltage": [300.0],
                         "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                         "rlnMicrographPixelSize": [pixel_a]})


def mic_names(n: int, start: int = 0, t0: _dt.datetime | None = None,
              step_s: float = 90.0, job: str = "MotionCorr/job002") -> list[str]:
    """EPU-style names with acquisition time stamps ``_YYYYMMDD_HHMMSS``."""
    t0 = t0 or _dt.datetime(2024, 5, 17, 10, 0, 0)
    out = []
    for i in range(start, start + n):
        t = t0 + _dt.timedelta(seconds=i * step_s)
        out.append(f"{job}/Movies/FoilHole_{1000 + i}_Data_1_1_{t:%Y%m%d_%H%M%S}.mrc")
    return out


def micrograph_image(rng: np.random.Generator, size: int = 256, defocus_a: float = 15000.0,
                     n_blobs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A noisy micrograph with dark blobs at known positions; returns (image, xy)."""
    from compute.ctf import CtfParams, ctf_2d

    img = rng.normal(0, 1, (size, size)).astype(np.float32)
    n_blobs = int(rng.integers(8, 20)) if n_blobs is None else n_blobs
    xy = rng.uniform(20, size - 20, (n_blobs, 2))
    yy, xx = np.mgrid[:size, :size]
    for x, y in xy:
        img -= 3.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 4.0 ** 2))
    ctf = ctf_2d((size, size), PIXEL_A, CtfParams(defocus_a, defocus_a))
    img = np.fft.ifft2(np.fft.fft2(img) * ctf).real.astype(np.float32)
    return img, xy


def write_motioncorr(project: Path, names: list[str], motion_a: np.ndarray,
                     rng: np.random.Generator, size: int = 256,
                     job: str = "MotionCorr/job002", defocus_a: np.ndarray | None = None
                     ) -> dict[str, np.ndarray]:
    """Micrographs (blobs at random places) and ``corrected_micrographs.star``; returns
    the blob positions of the micrographs written now."""
    blobs = {}
    for i, nm in enumerate(names):
        p = project / nm
        if not p.exists():
            df = 15000.0 if defocus_a is None else float(defocus_a[i])
            img, blobs[nm] = micrograph_image(rng, size, df)
            write_mrc(p, img, PIXEL_A)
    mics = pd.DataFrame({"rlnCtfPowerSpectrum": [n.replace(".mrc", "_PS.mrc") for n in names],
                         "rlnMicrographName": names, "rlnMicrographMetadata": [
                             n.replace(".mrc", ".star") for n in names],
                         "rlnOpticsGroup": 1, "rlnAccumMotionTotal": motion_a,
                         "rlnAccumMotionEarly": motion_a * 0.6,
                         "rlnAccumMotionLate": motion_a * 0.4})
    write_star(project / job / "corrected_micrographs.star",
               {"optics": optics(), "micrographs": mics})
    return blobs


def write_ctffind(project: Path, names: list[str], defocus_a: np.ndarray, maxres_a: np.ndarray,
                  job: str = "CtfFind/job003") -> Path:
    mics = pd.DataFrame({"rlnMicrographName": names, "rlnOpticsGroup": 1,
                         "rlnCtfImage": [n.replace(".mrc", ".ctf:mrc") for n in names],
                         "rlnDefocusU": defocus_a + 200, "rlnDefocusV": defocus_a - 200,
                         "rlnCtfAstigmatism": 400.0, "rlnDefocusAngle": 30.0,
                         "rlnCtfFigureOfMerit": 0.2, "rlnCtfMaxResolution": maxres_a})
    return write_star(project / job / "micrographs_ctf.star",
                      {"optics": optics(), "micrographs": mics})


def write_autopick(project: Path, names: list[str], counts: list[int],
                   rng: np.random.Generator, job: str = "AutoPick/job005",
                   positions: dict[str, np.ndarray] | None = None) -> Path:
    """Coordinate files (at ``positions`` when given, else random) and ``autopick.star``."""
    coord_files = []
    for nm, n in zip(names, counts):
        rel = f"{job}/Movies/{Path(nm).stem}_autopick.star"
        xy = positions[nm] if positions and nm in positions else rng.uniform(10, 246, (n, 2))
        write_star(project / rel, {"": pd.DataFrame({
            "rlnCoordinateX": xy[:, 0], "rlnCoordinateY": xy[:, 1],
            "rlnClassNumber": 0, "rlnAutopickFigureOfMerit": 1.0, "rlnAnglePsi": -999.0})})
        coord_files.append(rel)
    from app.schemes.jobstar import JobStar, write_job_star

    if not (project / job / "job.star").exists():
        write_job_star(project / job / "job.star", JobStar("relion.autopick", False, False, {
            "do_log": "Yes", "log_diam_max": "24", "do_topaz": "No"}))
    return write_star(project / job / "autopick.star", {"coordinate_files": pd.DataFrame({
        "rlnMicrographName": names, "rlnMicrographCoordinates": coord_files})})


def class_images(n: int, box: int, rng: np.random.Generator) -> np.ndarray:
    """Class averages: a disc of varying radius with a class-specific blob, plus noise."""
    yy, xx = np.mgrid[:box, :box] - box / 2
    out = np.empty((n, box, box), np.float32)
    for i in range(n):
        r = box * (0.15 + 0.2 * ((i * 37) % 11) / 10)
        img = (np.hypot(yy, xx) < r).astype(np.float32)
        a = 2 * np.pi * i / max(n, 1)
        img += np.exp(-((xx - r * np.cos(a)) ** 2 + (yy - r * np.sin(a)) ** 2) / 8.0)
        out[i] = img + rng.normal(0, 0.3, (box, box))
    return out


def write_class2d(project: Path, n_classes: int, rng: np.random.Generator, box: int = 64,
                  job: str = "Class2D/job007", iteration: int = 200,
                  particles_per_class: np.ndarray | None = None,
                  resolution_a: np.ndarray | None = None) -> dict:
    """``run_itNNN_{classes.mrcs,model.star,data.star}``; returns what was written."""
    d = project / job
    counts = (particles_per_class if particles_per_class is not None
              else rng.integers(5, 60, n_classes))
    res = resolution_a if resolution_a is not None else rng.uniform(6, 30, n_classes)
    stem = f"run_it{iteration:03d}"
    write_mrc(d / f"{stem}_classes.mrcs", class_images(n_classes, box, rng), 3.0)
    refs = [f"{i + 1:06d}@{job}/{stem}_classes.mrcs" for i in range(n_classes)]
    classes = pd.DataFrame({"rlnReferenceImage": refs,
                            "rlnClassDistribution": counts / counts.sum(),
                            "rlnAccuracyRotations": 5.0, "rlnAccuracyTranslationsAngst": 2.0,
                            "rlnEstimatedResolution": res,
                            "rlnOverallFourierCompleteness": 0.9})
    write_star(d / f"{stem}_model.star", {
        "model_general": {"rlnReferenceDimensionality": 2, "rlnOriginalImageSize": box,
                          "rlnCurrentResolution": float(res.min()), "rlnNrClasses": n_classes},
        "model_classes": classes})
    cls = np.repeat(np.arange(1, n_classes + 1), counts)
    write_star(d / f"{stem}_data.star", {"optics": optics(3.0), "particles": pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@Extract/job006/particles.mrcs" for i in range(len(cls))],
        "rlnClassNumber": cls, "rlnOpticsGroup": 1})})
    (d / "RELION_JOB_EXIT_SUCCESS").touch()
    return {"counts": counts, "resolution_a": res, "refs": refs}


def write_rank(project: Path, scores: np.ndarray, class2d_job: str = "Class2D/job007",
               job: str = "Select/job008", iteration: int = 200, job_star: bool = True) -> Path:
    from app.schemes.jobstar import JobStar, write_job_star

    d = project / job
    d.mkdir(parents=True, exist_ok=True)
    if job_star:
        write_job_star(d / "job.star", JobStar("relion.select", False, False, {
            "fn_model": f"{class2d_job}/run_it{iteration:03d}_optimiser.star",
            "do_class_ranker": "Yes", "rank_threshold": "0.15"}))
    refs = [f"{i + 1:06d}@{class2d_job}/run_it{iteration:03d}_classes.mrcs"
            for i in range(len(scores))]
    p = write_star(d / "rank_model.star", {"model_classes": pd.DataFrame({
        "rlnReferenceImage": refs, "rlnClassScore": scores})})
    (d / "RELION_JOB_EXIT_SUCCESS").touch()
    return p


def blob_volume(n: int = 48) -> np.ndarray:
    zz, yy, xx = np.mgrid[:n, :n, :n] - n / 2
    v = np.exp(-(xx ** 2 + (yy / 0.6) ** 2 + (zz / 0.8) ** 2) / (2 * (n / 8) ** 2))
    v += 0.6 * np.exp(-((xx - n / 5) ** 2 + yy ** 2 + (zz - n / 6) ** 2) / (2 * (n / 14) ** 2))
    return v.astype(np.float32)


def write_map(project: Path, job: str, n: int = 48, resolution_a: float = 4.2,
              with_fsc: bool = True) -> Path:
    d = project / job
    vol = blob_volume(n)
    name = "run_class001.mrc" if job.lower().startswith("refine3d") else "run_it100_class001.mrc"
    write_mrc(d / name, vol, 2.0)
    if with_fsc:
        k = np.arange(n // 2 + 1) / (n * 2.0)
        fsc = 1.0 / (1.0 + np.exp((k - 1.0 / resolution_a) * 400.0))
        write_star(d / "run_model.star", {
            "model_general": {"rlnCurrentResolution": resolution_a},
            "model_class_1": pd.DataFrame({"rlnSpectralIndex": np.arange(len(k)),
                                           "rlnResolution": k, "rlnGoldStandardFsc": fsc})})
    (d / "RELION_JOB_EXIT_SUCCESS").touch()
    return d / name


def populate(project: Path, rng: np.random.Generator, n_mics: int = 30, n_classes: int = 40,
             scores: np.ndarray | None = None) -> dict:
    """A project folder with every output the monitor shows (no schemes)."""
    names = mic_names(n_mics)
    motion = rng.uniform(5, 40, n_mics)
    defocus = rng.uniform(8000, 25000, n_mics)
    maxres = rng.uniform(3, 9, n_mics)
    blobs = write_motioncorr(project, names, motion, rng, defocus_a=defocus)
    picks = [len(blobs[n]) for n in names]
    write_ctffind(project, names, defocus, maxres)
    write_autopick(project, names, picks, rng, positions=blobs)
    c2d = write_class2d(project, n_classes, rng)
    sc = scores if scores is not None else rng.uniform(0, 1, n_classes)
    write_rank(project, sc)
    write_map(project, "InitialModel/job009", with_fsc=False)
    write_map(project, "Refine3D/job010")
    return {"names": names, "motion": motion, "defocus": defocus, "maxres": maxres,
            "picks": picks, "blobs": blobs, "scores": sc, **c2d}
