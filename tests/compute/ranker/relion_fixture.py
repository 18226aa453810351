"""Test helper: a RELION-4-style Class2D output on disk, made from simulated class averages.

Writes ``Class2D/job007/run_it025_{optimiser,model,data}.star`` and
``run_it025_classes.mrcs`` under a project directory, with ground truth returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from compute.ranker.synth import JobConditions, synth_job
from metadata.images import write_mrc
from metadata.star import write_star


@dataclass
class FakeClass2D:
    project: Path
    optimiser: Path
    model: Path
    data: Path
    classes_mrcs: Path
    images: np.ndarray
    counts: np.ndarray
    truth: list
    cond: JobConditions


_CACHE: dict = {}


def _job(cond: JobConditions, seed: int):
    """Simulated classes, memoised per process (several tests write the same job)."""
    key = (repr(cond), seed)
    if key not in _CACHE:
        _CACHE[key] = synth_job(cond, seed)
    return _CACHE[key]


def write_fake_class2d(project: Path, seed: int = 0, n_classes: int = 12, box: int = 64,
                       molecule: str = "c4ring", accuracy_columns: bool = True,
                       n_particles: int = 3000, kinds: dict | None = None,
                       zero_classes: tuple[int, ...] = ()) -> FakeClass2D:
    """Simulate one job and write it in RELION layout; classes in ``zero_classes``
    (0-based) get no particles."""
    from compute.simulate.molecules import molecule as get_mol

    mol = get_mol(molecule)
    px = mol.diameter_a / (box / 1.5)
    cond = JobConditions(molecule=molecule, pixel_size_a=px, box=box,
                         diameter_a=mol.diameter_a * 1.05, snr=0.05, n_classes=n_classes,
                         n_particles=n_particles, kind_weights=kinds or {})
    imgs, metas, truth = _job(cond, seed)
    counts = np.array([int(m.n_particles) for m in metas])
    for k in zero_classes:
        counts[k] = 0
    job = project / "Class2D" / "job007"
    job.mkdir(parents=True, exist_ok=True)
    mrcs = write_mrc(job / "run_it025_classes.mrcs", imgs, pixel_size_a=px)
    rel_mrcs = "Class2D/job007/run_it025_classes.mrcs"
    classes = pd.DataFrame({
        "rlnReferenceImage": [f"{k + 1:06d}@{rel_mrcs}" for k in range(n_classes)],
        "rlnClassDistribution": counts / max(counts.sum(), 1),
    })
    if accuracy_columns:
        classes["rlnAccuracyRotations"] = [m.acc_rot_deg for m in metas]
        classes["rlnAccuracyTranslationsAngst"] = [m.acc_trans_a for m in metas]
        classes["rlnEstimatedResolution"] = [m.resolution_a for m in metas]
    classes["rlnOverallFourierCompleteness"] = 1.0
    model = write_star(job / "run_it025_model.star", {
        "model_general": {"rlnReferenceDimensionality": 2, "rlnDataDimensionality": 2,
                          "rlnOriginalImageSize": box, "rlnCurrentResolution": 10.0,
                          "rlnCurrentImageSize": box, "rlnPaddingFactor": 2,
                          "rlnNrClasses": n_classes, "rlnPixelSize": px},
        "model_classes": classes})
    cls = np.repeat(np.arange(1, n_classes + 1), counts)
    n = cls.size
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnMicrographOriginalPixelSize": [px], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [px], "rlnImageSize": [box],
                           "rlnImageDimensionality": [2]})
    parts = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@Extract/job006/parts.mrcs"
                                           for i in range(n)],
                          "rlnOpticsGroup": 1, "rlnClassNumber": cls,
                          "rlnAnglePsi": 0.0, "rlnOriginXAngst": 0.0, "rlnOriginYAngst": 0.0})
    data = write_star(job / "run_it025_data.star", {"optics": optics, "particles": parts})
    opt = write_star(job / "run_it025_optimiser.star", {"optimiser_general": {
        "rlnOutputRootName": "Class2D/job007/run",
        "rlnModelStarFile": "Class2D/job007/run_it025_model.star",
        "rlnExperimentalDataStarFile": "Class2D/job007/run_it025_data.star",
        "rlnCurrentIteration": 25, "rlnParticleDiameter": cond.diameter_a}})
    return FakeClass2D(project, opt, model, data, mrcs, imgs, counts, truth, cond)
