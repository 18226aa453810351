"""EPU folder discovery, movie <-> XML matching, path map, summaries, and the metadata CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import run
from metadata import session, synth
from metadata.errors import MetadataError
from metadata.record import JSON_KEYS


def _stub(path, info):
    synth.write_movie_stub(path, n_frames=40, shape=(32, 32))


@pytest.fixture
def epu_session(tmp_path):
    movies = synth.write_epu_session(tmp_path / "sess", movie_root=tmp_path / "store" / "sess",
                                     movie_writer=_stub, storage_folder=r"Z:\DoseFractions\sess",
                                     readout_width=32, readout_height=32, n_grid_squares=2,
                                     holes_per_square=2, shots_per_hole=2)
    return tmp_path, movies


def test_map_windows_path(tmp_path):
    m = {"Z:\\DoseFractions": tmp_path / "df", "z:/": tmp_path / "z"}
    assert session.map_windows_path(r"Z:\DoseFractions\cm1\Images-Disc1", m) == tmp_path / "df" / "cm1" / "Images-Disc1"
    assert session.map_windows_path(r"z:\other", m) == tmp_path / "z" / "other"
    assert session.map_windows_path(r"Y:\x", m) is None
    assert session.map_windows_path(r"\\server\share\x", {r"\\server\share": "/mnt/s"}) == Path("/mnt/s/x")


def test_discovery_with_path_map(epu_session):
    tmp, movies = epu_session
    idx = session.index_epu_session(tmp / "sess", path_map={"Z:\\DoseFractions": tmp / "store"})
    assert idx.n_movies == 8 and idx.skipped_images == 0  # image XMLs are not in Data/
    assert idx.session.storage_folders_local == [str(tmp / "store" / "sess")]
    assert not idx.metadata_without_movie and not idx.movies_without_metadata
    by_xml = {i.metadata_path: i for i in idx.items}
    for m in movies:
        item = by_xml[m.xml_path]
        assert item.movie_path == m.movie_path
        assert (item.grid_square_id, item.foil_hole_id) == (m.grid_square_id, m.foil_hole_id)
    assert idx.session.n_grid_squares == 2 and idx.session.n_foil_holes == 4


def test_discovery_unmatched_both_ways(epu_session):
    tmp, movies = epu_session
    movies[0].movie_path.unlink()  # metadata without movie
    movies[1].xml_path.unlink()    # movie without metadata
    stray = movies[2].xml_path.with_name("FoilHole_1_20240101_120000.xml")  # an image XML in Data/
    synth.write_epu_image_xml(stray)
    idx = session.index_epu_session(tmp / "sess", movie_roots=[tmp / "store" / "sess"])
    assert idx.n_movies == 7
    assert idx.metadata_without_movie == [movies[0].xml_path]
    assert idx.movies_without_metadata == [movies[1].movie_path]
    assert idx.skipped_images == 1


def test_unmapped_storage_folder_warns(epu_session):
    tmp, _ = epu_session
    idx = session.index_epu_session(tmp / "sess")
    assert idx.session.storage_folders_local == [None]
    assert any("not mapped" in w for w in idx.session.warnings)
    assert idx.session.n_metadata_without_movie == 8


def test_item_record_settles_with_movie(epu_session):
    tmp, movies = epu_session
    idx = session.index_epu_session(tmp / "sess", movie_roots=[tmp / "store" / "sess"])
    rec = session.item_record(idx.items[0])
    assert rec.movie_path == str(idx.items[0].movie_path) and rec.n_frames == 40
    assert rec.grid_square_id == movies[0].grid_square_id


def test_empty_and_unknown_folders(tmp_path):
    with pytest.raises(MetadataError, match="empty or unknown folder"):
        session.open_session(tmp_path)
    with pytest.raises(MetadataError, match="no such"):
        session.read_any(tmp_path / "nope")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(MetadataError, match="unknown kind of file"):
        session.read_any(tmp_path / "a.txt")


def test_summary_writer(epu_session):
    tmp, _ = epu_session
    res = session.read_any(tmp / "sess", movie_roots=[tmp / "store" / "sess"])
    txt, js = session.write_session_summary(tmp / "project", res.session, res.record)
    data = json.loads(js.read_text())
    assert data["n_movies"] == 8 and data["voltage_kv"] == 300.0
    assert data["session_name"] == "Supervisor_20240517_103000_synthetic_EPU"
    lines = dict(ln.split(" = ", 1) for ln in txt.read_text().splitlines() if " = " in ln and not ln.startswith("#"))
    assert lines["n_movies"] == "8" and lines["pixel_size_a"] == "1.0"


def test_serialem_folder(tmp_path):
    for k in range(3):
        synth.write_mdoc(tmp_path / f"movie_{k:05d}.tif.mdoc", variant="frame")
    synth.write_movie_stub(tmp_path / "movie_00000.tif", n_frames=40)
    res = session.read_any(tmp_path)
    assert res.kind == "serialem-session" and res.n_movies == 3
    assert res.session.n_metadata_without_movie == 2
    assert res.record.movie_path == str(tmp_path / "movie_00000.tif")


# ----------------------------------------------------------------------------- CLI

def test_cli_json_keys_exact_for_xml(tmp_path, capsys):
    p = synth.write_epu_movie_xml(tmp_path / "FoilHole_1_Data_2_3_20240101_120000.xml")
    assert run(["metadata", str(p), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data) == list(JSON_KEYS)
    assert data["voltage_kv"] == 300.0 and data["cs_mm"] == 2.7 and data["microscope_id"] == "3299"
    assert "dose_per_frame_e_a2" in data["derived"]
    assert data["source"]["voltage_kv"].endswith(":gun/AccelerationVoltage")


def test_cli_folder_prints_summary_first_movie_and_count(epu_session, capsys):
    tmp, _ = epu_session
    assert run(["metadata", str(tmp / "sess"), "--movies", str(tmp / "store" / "sess")]) == 0
    out = capsys.readouterr().out
    assert "session_name = Supervisor_20240517_103000_synthetic_EPU" in out
    assert "# first movie:" in out and "# movies: 8" in out
    assert run(["metadata", str(tmp / "sess"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n_movies"] == 8 and list(data["first_movie"]) == list(JSON_KEYS)


def test_cli_write_summary(epu_session, capsys):
    tmp, _ = epu_session
    assert run(["metadata", str(tmp / "sess"), "--write-summary", str(tmp / "proj")]) == 0
    data = json.loads((tmp / "proj" / "session_summary.json").read_text())
    assert data["n_movies"] == 8 and data["cs_mm"] == 2.7
    assert "n_movies = 8" in (tmp / "proj" / "session_summary.txt").read_text()


def test_cli_mdoc_and_movie(tmp_path, capsys):
    p = synth.write_mdoc(tmp_path / "m.tif.mdoc", variant="frame")
    assert run(["metadata", str(p), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["software"] == "SerialEM"
    mv = synth.write_movie_stub(tmp_path / "alone.mrc", n_frames=3, pixel_size_a=1.3)
    assert run(["metadata", str(mv), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n_frames"] == 3 and data["pixel_size_a"] == pytest.approx(1.3, rel=1e-6)
    assert data["voltage_kv"] is None


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make", [
    lambda d: d,                                                        # empty folder
    lambda d: _write(d / "t.xml", b"<MicroscopeImage"),                 # truncated XML
    lambda d: synth.write_epu_image_xml(d / "FoilHole_1_20240101_120000.xml"),  # hole as movie
    lambda d: _write(d / "x.mdoc", b"Voltage = 300\n"),                # no sections
    lambda d: d / "missing.xml",
    lambda d: _write(d / "m.tiff", b"II*\x00junk"),                     # unreadable movie
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, make):
    target = make(tmp_path)
    assert run(["metadata", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(target.name) in err


def test_cli_subprocess_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "app.cli", "metadata", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_session_file_saved_as_xml_reads_as_session(tmp_path, capsys):
    """MDCatch and others keep EpuSession.dm copies as .xml: the root element decides."""
    p = synth.write_epu_session_dm(tmp_path / "EpuSession-copy.xml", name="copy_session",
                                   epu_version="2.3.0.79")
    assert session.is_epu_session_file(p)
    assert not session.is_epu_session_file(synth.write_epu_movie_xml(tmp_path / "m.xml"))
    res = session.read_any(p)
    assert res.kind == "epu-session" and res.session.name == "copy_session"
    assert res.session.session_file == str(p)
    assert run(["metadata", str(p)]) == 0
    assert "session_name = copy_session" in capsys.readouterr().out


def test_summary_takes_epu_version_from_the_movie_xml(epu_session):
    """EpuSession.dm's z:Assembly is the persistence assembly's version (EPU 2.3.0.79 wrote
    1.12.0.79); the movie XML's ApplicationSoftwareVersion is EPU's own."""
    tmp, _ = epu_session
    res = session.read_any(tmp / "sess", movie_roots=[tmp / "store" / "sess"])
    res.session.software_version = "1.12.0.79"
    first = res.record.model_copy(update={"software_version": "2.3.0.79"})
    out = session.session_summary(res.session, first)
    assert out["software_version"] == "2.3.0.79" and out["session_file_version"] == "1.12.0.79"
    same = session.session_summary(res.session, first.model_copy(
        update={"software_version": "1.12.0.79"}))
    assert same["software_version"] == "1.12.0.79" and "session_file_version" not in same


def test_serialem_folder_skips_montage_and_image_stacks(tmp_path):
    """Navigator maps (montage mdocs) and frame-less image stacks share the folder with the
    frame mdocs in real sessions; they sort first here and must not become movies."""
    synth.write_mdoc(tmp_path / "gm.mrc.mdoc", variant="montage", n_sections=6,
                     pixel_size_a=76.8, sub_frame_path=None, magnification=2250)
    synth.write_mdoc(tmp_path / "anchor.mrc.mdoc", variant="stack", n_sections=2,
                     pixel_size_a=20.0, sub_frame_path=None)
    for i in (1, 2):
        synth.write_mdoc(tmp_path / f"movie_{i:03d}.tif.mdoc", pixel_size_a=0.83)
        synth.write_movie_stub(tmp_path / f"movie_{i:03d}.tif", n_frames=40)
    # one image and no frame path cannot be told from an old-style frame mdoc: kept
    synth.write_mdoc(tmp_path / "zz_single.tif.mdoc", variant="stack", n_sections=1,
                     pixel_size_a=0.83, sub_frame_path=None)
    res = session.read_any(tmp_path)
    assert res.kind == "serialem-session" and res.n_movies == 3
    assert res.record.pixel_size_a == pytest.approx(0.83)
    assert res.index.skipped_images == 8
    warns = " | ".join(res.session.warnings)
    assert "gm.mrc.mdoc: a montage with 6 image(s)" in warns
    assert "anchor.mrc.mdoc: an image stack with 2 image(s)" in warns


@pytest.mark.parametrize("fmt, warned", [("Tiff Lzw Non-Gain normalized", True),
                                         ("Tiff Lzw Gain normalized", False),
                                         ("EER", True), ("Mrc", False)])
def test_session_warns_when_movies_need_a_gain_reference(tmp_path, fmt, warned):
    """EPU says in EpuSession.dm whether the movies are gain-normalised."""
    synth.write_epu_session_dm(tmp_path / "s" / "EpuSession.dm", dose_fractions_output_format=fmt)
    synth.write_epu_movie_xml(tmp_path / "s/Images-Disc1/GridSquare_1/Data/"
                              "FoilHole_2_Data_3_4_20240517_103000.xml")
    res = session.read_any(tmp_path / "s")
    assert any("without gain normalisation" in w for w in res.session.warnings) is warned
    assert session.movies_need_gain(fmt) is warned
