"""RELION reads what scopeside writes: one 2D iteration of RELION 3.1's relion_refine on an
extracted float32 particles.star (Debian's ``relion`` package; apt-installed by
``installers/setup.sh test``)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from app.jobs.base import FAILURE, run_job
from compute.simulate.micrograph import simulate_micrograph
from compute.simulate.molecules import Molecule, molecule
from metadata.images import write_mrc
from metadata.star import read_star, write_star

RELION_REFINE = shutil.which("relion_refine")
D, PX, N = 180.0, 2.5, 768


def globular(diameter_a: float) -> Molecule:
    m = molecule("ribosome")
    f = diameter_a / m.diameter_a
    return Molecule(f"globular{diameter_a:g}", m.coords_a * f, m.weights * f**3, m.sigma_a * f)


@pytest.mark.skipif(RELION_REFINE is None, reason="relion_refine (Debian package 'relion', "
                    "installed by installers/setup.sh test) is not on PATH")
def test_relion_refine_reads_our_particles(tmp_path):
    mics, coords = [], []
    for i in range(2):
        mg = simulate_micrograph(N, pixel_size_a=PX, molecules=[globular(D)], n_particles=25,
                                 seed=300 + i)
        name = f"MotionCorr/job002/Movies/mic{i + 1}.mrc"
        write_mrc(tmp_path / name, mg.image, pixel_size_a=PX)
        c = mg.truth.ctf
        mics.append({"rlnMicrographName": name, "rlnOpticsGroup": 1,
                     "rlnDefocusU": c.defocus_u_a, "rlnDefocusV": c.defocus_v_a,
                     "rlnDefocusAngle": c.defocus_angle_deg, "rlnCtfMaxResolution": 5.0,
                     "rlnCtfFigureOfMerit": 0.2})
        t = mg.truth.particles
        cf = f"AutoPick/job005/Movies/mic{i + 1}_autopick.star"
        write_star(tmp_path / cf, {"": pd.DataFrame({"rlnCoordinateX": t["x_px"],
                                                      "rlnCoordinateY": t["y_px"]})})
        coords.append({"rlnMicrographName": name, "rlnMicrographCoordinates": cf})
    optics = pd.DataFrame([{"rlnOpticsGroupName": "opticsGroup1", "rlnOpticsGroup": 1,
                            "rlnMicrographOriginalPixelSize": PX, "rlnVoltage": 300.0,
                            "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1,
                            "rlnMicrographPixelSize": PX}])
    write_star(tmp_path / "CtfFind/job003/micrographs_ctf.star",
               {"optics": optics, "micrographs": pd.DataFrame(mics)})
    write_star(tmp_path / "AutoPick/job005/autopick.star",
               {"coordinate_files": pd.DataFrame(coords)})
    opts = {"star_mics": "CtfFind/job003/micrographs_ctf.star",
            "coords_suffix": "AutoPick/job005/autopick.star", "extract_size": "108",
            "do_rescale": "Yes", "rescale": "64", "do_float16": "No"}
    code = run_job("extract", "Extract/job006", opts, project_dir=tmp_path)
    assert code == 0, (tmp_path / "Extract/job006" / FAILURE).read_text()
    n_parts = len(read_star(tmp_path / "Extract/job006/particles.star")["particles"])
    assert n_parts >= 30

    out = tmp_path / "Class2D/job007"
    out.mkdir(parents=True)
    cmd = [RELION_REFINE, "--i", "Extract/job006/particles.star", "--o", "Class2D/job007/run",
           "--iter", "1", "--K", "2", "--tau2_fudge", "2", "--particle_diameter", str(D * 1.1),
           "--ctf", "--zero_mask", "--flatten_solvent", "--psi_step", "30",
           "--offset_range", "3", "--offset_step", "3", "--oversampling", "0",
           "--j", "1", "--pool", "10", "--random_seed", "1"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240,
                         check=False)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-2000:])
    data = read_star(out / "run_it001_data.star")
    parts = data["particles"]
    assert len(parts) == n_parts
    assert set(parts["rlnClassNumber"].astype(int)) <= {1, 2}
    # RELION took our pixel size and image size from the optics table
    opt = data["optics"]
    assert float(opt["rlnImagePixelSize"].iloc[0]) == pytest.approx(PX * 108 / 64, rel=1e-4)
    assert int(opt["rlnImageSize"].iloc[0]) == 64
    assert np.isfinite(parts["rlnLogLikeliContribution"].astype(float)).all()
