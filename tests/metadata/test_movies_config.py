"""Movie headers (no pixels read), settling the pixel size, and the instrument config."""

from __future__ import annotations

import pytest

from metadata import config, epu, movies, synth
from metadata.errors import MetadataError


@pytest.mark.parametrize("name", ["m.mrc", "m.tiff", "m.eer"])
def test_headers(tmp_path, name):
    p = synth.write_movie_stub(tmp_path / name, n_frames=7, shape=(40, 56),
                               pixel_size_a=1.1 if name.endswith(".mrc") else None)
    h = movies.read_movie_header(p)
    assert (h.n_frames, h.width, h.height) == (7, 56, 40)
    assert h.format == name.split(".")[1]
    if name.endswith(".mrc"):
        assert h.pixel_size_a == pytest.approx(1.1, rel=1e-6)
    else:
        assert h.pixel_size_a is None


def test_truncated_and_bad_movies(tmp_path):
    good = synth.write_movie_stub(tmp_path / "g.mrc", n_frames=4, shape=(64, 64))
    bad = tmp_path / "t.mrc"
    bad.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(MetadataError, match="truncated"):
        movies.read_movie_header(bad)
    junk = tmp_path / "j.tiff"
    junk.write_bytes(b"II*\x00garbage")
    with pytest.raises(MetadataError, match="not a readable TIFF|no image pages"):
        movies.read_movie_header(junk)
    other = synth.write_movie_stub(tmp_path / "x.tiff").rename(tmp_path / "x.dat")
    with pytest.raises(MetadataError, match="unknown movie format"):
        movies.read_movie_header(other)
    with pytest.raises(MetadataError, match="not found"):
        movies.read_movie_header(tmp_path / "none.mrc")


@pytest.mark.parametrize("movie_size, expect_px, expect_sr", [
    (128, 0.5, True),    # super-resolution movie: twice the readout area
    (64, 1.0, False),    # same size: as recorded
    (32, 2.0, False),    # binned
])
def test_settle_pixel_size(tmp_path, movie_size, expect_px, expect_sr):
    rec = epu.parse_movie_xml(synth.write_epu_movie_xml(
        tmp_path / "m.xml", pixel_size_a=1.0, readout_width=64, readout_height=64, n_fractions=5))
    h = movies.read_movie_header(synth.write_movie_stub(tmp_path / "m.tiff", n_frames=5,
                                                        shape=(movie_size, movie_size)))
    out = movies.settle_pixel_size(rec, h)
    assert out.pixel_size_a == pytest.approx(expect_px)
    assert out.super_resolution is expect_sr
    assert ("pixel_size_a" in out.derived) is (movie_size != 64)
    assert out.movie_path == str(tmp_path / "m.tiff") and out.n_frames == 5


def test_settle_mismatch_warns_and_keeps(tmp_path):
    rec = epu.parse_movie_xml(synth.write_epu_movie_xml(
        tmp_path / "m.xml", pixel_size_a=1.0, readout_width=64, readout_height=64, n_fractions=5))
    h = movies.read_movie_header(synth.write_movie_stub(tmp_path / "m.tiff", n_frames=6, shape=(50, 64)))
    out = movies.settle_pixel_size(rec, h)
    assert out.pixel_size_a == 1.0 and out.n_frames == 6
    assert any("does not match" in w for w in out.warnings)
    assert any("5 frames" in w for w in out.warnings)


# ----------------------------------------------------------------------------- config

def test_shipped_config_loads_and_resolves():
    cfg = config.load_instruments()
    assert cfg.microscope_models["krios"].cs_mm == 2.7
    assert cfg.microscope_models["krios_cs_corrected"].cs_mm == 0.01
    assert cfg.microscope_models["glacios"].default_voltage_kv == 200
    assert {"K3", "K2", "Falcon 4i", "Falcon 4", "Falcon 3"} <= {
        cfg.resolved_detector(k).model for k in cfg.detectors}
    assert cfg.detector(["BioQuantum K3", "EF-CCD"])[1].model == "K3"
    assert cfg.detector(["BM-Falcon"], eer=True, frame_rate_hz=320)[1].model == "Falcon 4i"
    assert cfg.detector(["BM-Falcon"], eer=True, frame_rate_hz=250)[1].model == "Falcon 4"
    assert cfg.detector(["BM-Falcon"], eer=False)[1].model == "Falcon 3"
    assert cfg.resolved_detector("falcon4i_eer").eer_dose_per_group_e_a2 == 0.8


def test_apply_config_known_and_unknown(tmp_path):
    cfg = config.load_instruments()
    known = config.apply_config(epu.parse_movie_xml(synth.write_epu_movie_xml(
        tmp_path / "a.xml", instrument_id=3299)), cfg)
    assert known.cs_mm == 2.7 and known.microscope == "Titan Krios 3299" and not known.warnings
    unknown = config.apply_config(epu.parse_movie_xml(synth.write_epu_movie_xml(
        tmp_path / "b.xml", instrument_id="X99", instrument_model="MYSTERY")), cfg)
    assert unknown.cs_mm is None and any("unknown microscope" in w for w in unknown.warnings)
    assert "cs_mm" in unknown.missing()


def test_site_config_overrides(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text('[microscopes."X99"]\nname = "Our corrected Krios"\nmodel = "krios_cs_corrected"\n'
                    '[detectors.k3]\ngain_rotation = 1\n')
    cfg = config.load_instruments(site)
    rec = config.apply_config(epu.parse_movie_xml(synth.write_epu_movie_xml(
        tmp_path / "b.xml", instrument_id="X99")), cfg)
    assert rec.cs_mm == 0.01 and rec.microscope == "Our corrected Krios"
    assert cfg.detectors["k3"].gain_rotation == 1 and cfg.detectors["k3"].model == "K3"


@pytest.mark.parametrize("text, match", [
    ("[microscopes.A\nname=1", "not valid TOML"),
    ('[microscopes.A]\ncs_mm = -3\n', "cs_mm"),
    ('[microscopes.A]\nmodel = "nope"\n', "no microscope model"),
    ('[detectors.k3]\nmatch = ["("]\n', "match"),
])
def test_invalid_site_config(tmp_path, text, match):
    site = tmp_path / "site.toml"
    site.write_text(text)
    with pytest.raises(MetadataError, match=match):
        config.load_instruments(site)


def test_gain_reference_rule(tmp_path):
    cfg = config.load_instruments()
    det = cfg.resolved_detector("falcon4i_eer")
    assert config.find_gain_reference(det, tmp_path / "movies", tmp_path) is None
    (tmp_path / "movies").mkdir()
    g = tmp_path / "20240101_gain.gain"
    g.write_bytes(b"x")
    assert config.find_gain_reference(det, tmp_path / "movies", tmp_path) == g
    assert config.find_gain_reference(cfg.resolved_detector("falcon3"), tmp_path, tmp_path) is None


def test_eer_metadata_tag(tmp_path):
    import numpy as np
    import tifffile

    xml = (b'<metadata><item name="exposureTime" unit="s">2.5</item>'
           b'<item name="numberOfFrames">3</item>'
           b'<item name="sensorPixelSize.width" unit="m">8.3e-11</item>'
           b'<item name="totalDose" unit="e/pixel">27.556</item></metadata>')
    p = tmp_path / "m_EER.eer"
    tifffile.imwrite(p, np.zeros((3, 16, 16), np.uint8), photometric="minisblack",
                     extratags=[(65001, 7, len(xml), xml, True)])
    h = movies.read_movie_header(p)
    assert h.n_frames == 3 and h.pixel_size_a == pytest.approx(0.83)
    rec = movies.record_from_movie(p)
    assert rec.eer is True and rec.exposure_time_s == 2.5
    assert rec.total_dose_e_a2 == pytest.approx(27.556 / 0.83**2) and "total_dose_e_a2" in rec.derived


@pytest.mark.parametrize("size, expect", [
    ((5760, 4092), "K3"), ((11520, 8184), "K3"), ((3838, 3710), "K2"), ((3710, 3838), "K2"),
    ((4096, 4096), None),   # Falcon 3 / 4 / 4i share the size: never guessed
    ((1000, 1000), None)])
def test_generic_camera_name_detector_from_readout_size(tmp_path, size, expect):
    """EPU 2.x names a K2 or K3 behind an energy filter only "EF-CCD"; the readout area's
    size tells which (a derived value with a warning)."""
    cfg = config.load_instruments()
    rec = config.apply_config(epu.parse_movie_xml(synth.write_epu_movie_xml(
        tmp_path / "a.xml", camera_name="EF-CCD", readout_width=size[0],
        readout_height=size[1])), cfg)
    assert rec.detector == expect
    if expect:
        assert "detector" in rec.derived and "readout area" in rec.source["detector"]
        assert any(f"detector {expect} taken from the readout area" in w for w in rec.warnings)
        assert config.detector_for(rec, cfg).model == expect
    else:
        assert any("unknown detector EF-CCD" in w for w in rec.warnings)


def test_named_camera_is_never_overridden_by_size(tmp_path):
    cfg = config.load_instruments()
    rec = config.apply_config(epu.parse_movie_xml(synth.write_epu_movie_xml(
        tmp_path / "a.xml", camera_name="BM-Ceta", readout_width=5760, readout_height=4092)), cfg)
    assert rec.detector is None and any("unknown detector BM-Ceta" in w for w in rec.warnings)


@pytest.mark.parametrize("px, mag, warned", [(1.06, 105000, False), (11.3, 105000, True),
                                             (0.5, 31000, False), (656.0, 135, False),
                                             (0.05, 105000, True)])
def test_pixel_size_and_magnification_cross_check(tmp_path, px, mag, warned):
    rec = epu.parse_movie_xml(synth.write_epu_movie_xml(tmp_path / "a.xml", pixel_size_a=px,
                                                        magnification=mag))
    assert any("check the pixel size and magnification" in w for w in rec.warnings) is warned
    assert rec.pixel_size_a == pytest.approx(px)  # faithful to the file either way


@pytest.mark.parametrize("dtype", ["float32", "uint16"])
def test_dm4_gain_reference(tmp_path, dtype):
    """Gatan .dm4 (SerialEM's CountRef_*.dm4) reads through ncempy; a damaged one is a
    MetadataError naming the file, never a traceback."""
    import numpy as np

    from metadata.frames import read_gain

    g = (np.random.default_rng(1).random((12, 20)) * 3 + 1).astype(dtype)
    p = synth.write_dm4_image(tmp_path / "CountRef_a.dm4", g, pixel_size_nm=0.105)
    got = read_gain(p)
    assert got.dtype == np.float32 and got.shape == (12, 20)
    # top-left origin: read flipped in Y, as IMOD's dm2mrc and TIFF movies
    np.testing.assert_array_equal(got, g[::-1].astype(np.float32))
    cut = tmp_path / "cut.dm4"
    cut.write_bytes(p.read_bytes()[:300])
    with pytest.raises(MetadataError, match=r"cut\.dm4.*not a readable gain reference"):
        read_gain(cut)
    with pytest.raises(MetadataError, match="not a readable gain reference"):
        read_gain(synth.write_movie_stub(tmp_path / "x.dm4", n_frames=1))


def test_gain_orientation_follows_relion(tmp_path):
    """MRC as stored; .tif/.tiff flipped in Y (like TIFF movies, as RELION/IMOD read TIFF);
    Thermo Fisher's .gain as stored (RELION's EER convention)."""
    import mrcfile
    import numpy as np
    import tifffile

    from metadata.frames import read_gain

    g = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    with mrcfile.new(tmp_path / "g.mrc") as m:
        m.set_data(g)
    tifffile.imwrite(tmp_path / "g.tif", g)
    tifffile.imwrite(tmp_path / "g.gain", g)
    np.testing.assert_array_equal(read_gain(tmp_path / "g.mrc"), g)
    np.testing.assert_array_equal(read_gain(tmp_path / "g.tif"), g[::-1])
    np.testing.assert_array_equal(read_gain(tmp_path / "g.gain"), g)


def test_tiff_movie_frames_are_flipped_mrc_and_eer_are_not(tmp_path):
    import mrcfile
    import numpy as np
    import tifffile

    from metadata.frames import open_movie

    f = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4)
    tifffile.imwrite(tmp_path / "m.tiff", f, photometric="minisblack")
    with mrcfile.new(tmp_path / "m.mrc") as m:
        m.set_data(f)
    with open_movie(tmp_path / "m.tiff") as mv:
        np.testing.assert_array_equal(mv[1], f[1, ::-1])
    with open_movie(tmp_path / "m.mrc") as mv:
        np.testing.assert_array_equal(mv[1], f[1])
