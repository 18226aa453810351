"""select -> autopick -> extract jobs on simulated micrographs in a RELION-style project."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from app.jobs.autopick import relion_post_name
from app.jobs.base import FAILURE, SUCCESS, run_job
from compute.pick import match_picks
from compute.simulate.micrograph import simulate_micrograph
from compute.simulate.molecules import Molecule, molecule
from metadata.images import write_mrc
from metadata.star import read_star, write_star

D, PX, N = 180.0, 2.5, 768
MAXRES = [4.0, 5.5, 8.0, 3.5]  # micrograph 3 (index 2) fails the <= 6 A selection


def globular(diameter_a: float) -> Molecule:
    m = molecule("ribosome")
    f = diameter_a / m.diameter_a
    return Molecule(f"globular{diameter_a:g}", m.coords_a * f, m.weights * f**3, m.sigma_a * f)


@pytest.fixture(scope="module")
def sims():
    out = []
    for i in range(len(MAXRES)):
        mg = simulate_micrograph(N, pixel_size_a=PX, molecules=[globular(D)], seed=100 + i,
                                 n_particles=int(0.2 * (N * PX) ** 2 / (np.pi * (D / 2) ** 2)))
        out.append(mg)
    return out


def _mics_table(sims, n):
    rows = []
    for i, mg in enumerate(sims[:n]):
        c = mg.truth.ctf
        rows.append({"rlnMicrographName": f"MotionCorr/job002/Movies/mic{i + 1}.mrc",
                     "rlnOpticsGroup": 1,
                     "rlnCtfImage": f"CtfFind/job003/Movies/mic{i + 1}.ctf:mrc",
                     "rlnDefocusU": c.defocus_u_a, "rlnDefocusV": c.defocus_v_a,
                     "rlnCtfAstigmatism": abs(c.defocus_u_a - c.defocus_v_a),
                     "rlnDefocusAngle": c.defocus_angle_deg, "rlnCtfFigureOfMerit": 0.2,
                     "rlnCtfMaxResolution": MAXRES[i]})
    return pd.DataFrame(rows)


OPTICS = pd.DataFrame([{"rlnOpticsGroupName": "opticsGroup1", "rlnOpticsGroup": 1,
                        "rlnMicrographOriginalPixelSize": PX, "rlnVoltage": 300.0,
                        "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1,
                        "rlnMicrographPixelSize": PX}])


@pytest.fixture
def project(tmp_path, sims):
    for i, mg in enumerate(sims):
        write_mrc(tmp_path / f"MotionCorr/job002/Movies/mic{i + 1}.mrc", mg.image,
                  pixel_size_a=PX, float16=True)
    write_ctf_star(tmp_path, sims, 3)
    return tmp_path


def write_ctf_star(root: Path, sims, n: int) -> Path:
    return write_star(root / "CtfFind/job003/micrographs_ctf.star",
                      {"optics": OPTICS, "micrographs": _mics_table(sims, n)})


def _ok(job_dir: Path) -> None:
    fail = job_dir / FAILURE
    assert not fail.exists(), fail.read_text()
    assert (job_dir / SUCCESS).exists()


def test_micrograph_ctf_from_star_row(sims):
    from app.jobs.autopick import micrograph_ctf

    row = _mics_table(sims, 1).iloc[0].to_dict() | OPTICS.iloc[0].to_dict()
    c = micrograph_ctf(pd.Series(row))
    t = sims[0].truth.ctf
    assert c.defocus_u_a == pytest.approx(t.defocus_u_a)
    assert c.defocus_angle_deg == pytest.approx(t.defocus_angle_deg)
    assert c.voltage_kv == 300.0 and c.cs_mm == 2.7 and c.amplitude_contrast == 0.1
    row.pop("rlnDefocusU")
    assert micrograph_ctf(pd.Series(row)) is None


def test_relion_post_name():
    assert relion_post_name("MotionCorr/job002/Movies/a.mrc") == "Movies/a"
    assert relion_post_name("Movies/a.tiff") == "Movies/a"
    assert relion_post_name("/abs/Import/job001/x/y.mrc") == "x/y"


def test_select_by_value_and_continue(project, sims):
    opts = {"fn_mic": "CtfFind/job003/micrographs_ctf.star", "do_select_values": "Yes",
            "select_label": "rlnCtfMaxResolution", "select_maxval": "6"}
    assert run_job("select", "Select/job004", opts, project_dir=project) == 0
    out = read_star(project / "Select/job004/micrographs.star")
    assert list(out) == ["optics", "micrographs"]
    assert out["micrographs"]["rlnMicrographName"].str[-8:].tolist() == ["mic1.mrc", "mic2.mrc"]
    assert out["optics"]["rlnMicrographPixelSize"].iloc[0] == pytest.approx(PX)
    # a new micrograph arrives: continue adds only it (mic3 stays out)
    write_ctf_star(project, sims, 4)
    assert run_job("select", "Select/job004", opts, is_continue=True, project_dir=project) == 0
    names = read_star(project / "Select/job004/micrographs.star")["micrographs"][
        "rlnMicrographName"].str[-8:].tolist()
    assert names == ["mic1.mrc", "mic2.mrc", "mic4.mrc"]
    bad = dict(opts, select_label="rlnNoSuchLabel")
    assert run_job("select", "Select/job009", bad, project_dir=project) == 1
    assert "rlnNoSuchLabel" in (project / "Select/job009" / FAILURE).read_text()


def test_select_particles_by_value(tmp_path):
    parts = pd.DataFrame({"rlnImageName": [f"{i:06d}@Extract/job006/a.mrcs" for i in (1, 2, 3)],
                          "rlnAutopickFigureOfMerit": [0.5, 2.0, 3.5], "rlnOpticsGroup": 1})
    write_star(tmp_path / "Extract/job006/particles.star", {"optics": OPTICS, "particles": parts})
    opts = {"fn_data": "Extract/job006/particles.star", "do_select_values": "Yes",
            "select_label": "rlnAutopickFigureOfMerit", "select_minval": "1",
            "select_maxval": "3"}
    assert run_job("select", "Select/job012", opts, project_dir=tmp_path) == 0
    out = read_star(tmp_path / "Select/job012/particles.star")
    assert out["particles"]["rlnImageName"].tolist() == ["000002@Extract/job006/a.mrcs"]
    assert "optics" in out
    assert run_job("select", "Select/job013", {"fn_data": "Extract/job006/particles.star"},
                   project_dir=tmp_path) == 1


def test_select_calls_the_class_ranker(project, monkeypatch):
    seen = {}
    fake = types.ModuleType("app.jobs.rank_select")
    fake.run_ranker_selection = lambda ctx: seen.setdefault("model", ctx.get("fn_model"))
    monkeypatch.setitem(sys.modules, "app.jobs.rank_select", fake)
    opts = {"fn_model": "Class2D/job007/run_it200_optimiser.star", "do_class_ranker": "Yes"}
    assert run_job("select", "Select/job008", opts, project_dir=project) == 0
    assert seen["model"] == "Class2D/job007/run_it200_optimiser.star"
    monkeypatch.setitem(sys.modules, "app.jobs.rank_select", None)
    assert run_job("select", "Select/job010", opts, project_dir=project) == 1
    assert "class ranker not available" in (project / "Select/job010" / FAILURE).read_text()


def _autopick(project, out="AutoPick/job005", cont=False, **kw):
    opts = {"fn_input_autopick": "CtfFind/job003/micrographs_ctf.star", "log_diam_min": D * 0.8,
            "log_diam_max": D * 1.1, "log_maxres": 20}
    opts.update(kw)
    return run_job("autopick", out, {k: str(v) for k, v in opts.items()}, is_continue=cont,
                   project_dir=project)


def test_autopick_writes_relion4_coordinates_and_continues(project, sims):
    assert _autopick(project) == 0
    job = project / "AutoPick/job005"
    _ok(job)
    table = read_star(job / "autopick.star")["coordinate_files"]
    assert table["rlnMicrographCoordinates"].tolist() == [
        f"AutoPick/job005/Movies/mic{i}_autopick.star" for i in (1, 2, 3)]
    for i in range(3):
        coords = read_star(project / table["rlnMicrographCoordinates"].iloc[i])
        tab = next(iter(coords.values()))
        assert {"rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"} <= set(tab)
        t = sims[i].truth.particles
        tp, n_picks, n_true = match_picks(tab[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(),
                                          np.stack([t["x_px"], t["y_px"]], 1), 0.2 * D / PX)
        assert tp / n_true >= 0.85 and tp / n_picks >= 0.8, (i, tp, n_picks, n_true)
    first = (job / "Movies/mic1_autopick.star").stat().st_mtime_ns
    write_ctf_star(project, sims, 4)
    assert _autopick(project, cont=True) == 0
    assert (job / "Movies/mic1_autopick.star").stat().st_mtime_ns == first
    assert (job / "Movies/mic4_autopick.star").exists()
    assert len(read_star(job / "autopick.star")["coordinate_files"]) == 4
    nodes = (job / "job_nodes.json").read_text()
    assert "autopick.star" in nodes


def test_autopick_empty_micrograph_and_errors(project, sims):
    write_mrc(project / "MotionCorr/job002/Movies/mic1.mrc",
              np.full((N, N), 100.0, np.float32), pixel_size_a=PX)
    assert _autopick(project) == 0
    tab = next(iter(read_star(project / "AutoPick/job005/Movies/mic1_autopick.star").values()))
    assert len(tab) == 0
    assert _autopick(project, out="AutoPick/job006", log_diam_min=3000, log_diam_max=3500) == 1
    msg = (project / "AutoPick/job006" / FAILURE).read_text()
    assert "larger than the micrograph" in msg
    if "topaz" not in sys.modules:
        assert _autopick(project, out="AutoPick/job007", do_topaz="Yes",
                         topaz_model="model.sav") == 1
        assert "topaz" in (project / "AutoPick/job007" / FAILURE).read_text().lower()
        # RELION 4/5's job.star names the switch do_topaz_pick: the same Topaz path
        assert _autopick(project, out="AutoPick/job008", do_log="No", do_topaz_pick="Yes",
                         topaz_model="model.sav") == 1
        msg = (project / "AutoPick/job008" / FAILURE).read_text()
        assert "topaz" in msg.lower() and "set do_log or do_topaz" not in msg


def _extract(project, out="Extract/job006", cont=False, **kw):
    opts = {"star_mics": "CtfFind/job003/micrographs_ctf.star",
            "coords_suffix": "AutoPick/job005/autopick.star", "extract_size": 108,
            "do_rescale": "Yes", "rescale": 96, "do_invert": "Yes", "do_norm": "Yes"}
    opts.update(kw)
    return run_job("extract", out, {k: str(v) for k, v in opts.items()}, is_continue=cont,
                   project_dir=project)


def test_extract_writes_stacks_star_and_continues(project, sims):
    assert _autopick(project) == 0
    assert _extract(project) == 0
    job = project / "Extract/job006"
    _ok(job)
    blocks = read_star(job / "particles.star")
    opt, parts = blocks["optics"], blocks["particles"]
    assert opt["rlnImagePixelSize"].iloc[0] == pytest.approx(PX * 108 / 96)
    assert int(opt["rlnImageSize"].iloc[0]) == 96 and int(opt["rlnImageDimensionality"].iloc[0]) == 2
    assert opt["rlnVoltage"].iloc[0] == pytest.approx(300.0)
    assert opt["rlnSphericalAberration"].iloc[0] == pytest.approx(2.7)
    assert opt["rlnAmplitudeContrast"].iloc[0] == pytest.approx(0.1)
    mics = _mics_table(sims, 3)
    for _, m in mics.iterrows():
        rows = parts[parts["rlnMicrographName"] == m["rlnMicrographName"]]
        assert len(rows) > 5
        assert np.allclose(rows["rlnDefocusU"], m["rlnDefocusU"], rtol=1e-5)
        assert np.allclose(rows["rlnDefocusV"], m["rlnDefocusV"], rtol=1e-5)
        assert np.allclose(rows["rlnDefocusAngle"], m["rlnDefocusAngle"], atol=1e-4)
    stack = job / "Movies/mic1.mrcs"
    with mrcfile.open(stack) as f:
        assert f.data.dtype == np.float16 and f.data.shape[1:] == (96, 96)
        assert f.voxel_size.x == pytest.approx(PX * 108 / 96, rel=1e-4)
        n1 = f.data.shape[0]
        assert abs(float(f.data.astype(np.float32)[:, :8, :].mean())) < 0.2
    assert (parts["rlnImageName"].str.endswith("Extract/job006/Movies/mic1.mrcs")).sum() == n1
    assert parts["rlnImageName"].iloc[0] == "000001@Extract/job006/Movies/mic1.mrcs"
    summary = (job / "extract_summary.txt").read_text()
    assert "dropped_outside" in summary
    # continue with a new micrograph: only its stack is written
    t0 = stack.stat().st_mtime_ns
    write_ctf_star(project, sims, 4)
    assert _autopick(project, cont=True) == 0
    assert _extract(project, cont=True) == 0
    assert stack.stat().st_mtime_ns == t0
    parts2 = read_star(job / "particles.star")["particles"]
    assert set(parts2["rlnMicrographName"].str[-8:]) == {"mic1.mrc", "mic2.mrc", "mic3.mrc",
                                                          "mic4.mrc"}
    assert len(parts2) > len(parts)


def test_extract_float32_fom_threshold_and_dropped_count(project):
    assert _autopick(project) == 0
    # a box as big as 3/4 of the micrograph drops most picks; float32 as RELION 3.1 needs
    assert _extract(project, out="Extract/job011", extract_size=576, rescale=64,
                    do_float16="No") == 0
    job = project / "Extract/job011"
    lines = dict(ln.split() for ln in (job / "extract_summary.txt").read_text().splitlines())
    parts = read_star(job / "particles.star")["particles"]
    assert int(lines["dropped_outside"]) > 0
    assert int(lines["particles"]) == len(parts)
    with mrcfile.open(job / "Movies/mic1.mrcs") as f:
        assert f.data.dtype == np.float32
    assert _extract(project, out="Extract/job012", do_fom_threshold="Yes",
                    minimum_pick_fom=1e6) == 0
    assert len(read_star(project / "Extract/job012/particles.star")["particles"]) == 0
    assert _extract(project, out="Extract/job013", extract_size=107) == 1
    assert _extract(project, out="Extract/job014", bg_diameter=200) == 1
    assert "bg_diameter" in (project / "Extract/job014" / FAILURE).read_text()


def test_cli_runs_autopick_and_extract(project, monkeypatch):
    from app.cli import run

    monkeypatch.chdir(project)
    assert run(["job", "autopick", "--o", "AutoPick/job020", "--fn_input_autopick",
                "CtfFind/job003/micrographs_ctf.star", "--log_diam_min", "144",
                "--log_diam_max", "198"]) == 0
    assert (project / "AutoPick/job020/autopick.star").exists()
    assert run(["job", "extract", "--o", "Extract/job021", "--star_mics",
                "CtfFind/job003/micrographs_ctf.star", "--coords_suffix",
                "AutoPick/job020/autopick.star", "--extract_size", "108"]) == 0
    assert (project / "Extract/job021/particles.star").exists()
