"""EPU per-movie XML and EpuSession.dm: real samples (values checked by reading the files)
and synthetic variants from metadata.synth."""

from __future__ import annotations

import datetime as dt

import pytest

from metadata import epu, synth
from metadata.errors import MetadataError

EPU = "epu"


# ----------------------------------------------------------------------------- real samples

def test_sample_epu26_falcon3_varidistant(samples_dir):
    # EPU 2.6.1.69, Krios 3299, BM-Falcon counting, 40 VaridistantFractionation ranges ending at 2734
    r = epu.parse_movie_xml(samples_dir / EPU /
                            "mdcatch__FoilHole_18890345_Data_18881924_18881926_20200320_090200.xml")
    assert r.software == "EPU" and r.software_version == "2.6.1.69"
    assert r.microscope_id == "3299" and r.instrument_model == "TITAN52332990"
    assert r.voltage_kv == 300.0
    assert r.magnification == 75000
    assert r.pixel_size_a == pytest.approx(1.0684707979491392)
    assert r.binning == 1 and r.super_resolution_factor == 1 and r.super_resolution is False
    assert r.readout_width == 4096 and r.readout_height == 4096
    assert r.exposure_time_s == pytest.approx(70.36)
    assert r.n_frames == 40 and r.n_raw_frames == 2734
    assert r.total_dose_e_a2 == pytest.approx(40.054052480334315)  # 4.0054e21 e/m²
    assert r.dose_per_frame_e_a2 == pytest.approx(40.054052480334315 / 40)
    assert "dose_per_frame_e_a2" in r.derived
    assert r.dose_on_camera == pytest.approx(45.726901767606584)
    assert r.defocus_um == pytest.approx(-3.25)
    assert r.camera_name == "BM-Falcon" and r.camera_mode == "counting"
    assert r.eer is False
    assert r.slit_width_ev is None  # EnergyFilter i:nil
    assert r.spot_size == 10 and r.beam_diameter_um == pytest.approx(1.0)
    assert r.acquired_at == dt.datetime(2020, 3, 20, 9, 2, 1, 574587, tzinfo=dt.UTC)
    assert r.source["voltage_kv"].endswith(":gun/AccelerationVoltage")
    assert r.source["total_dose_e_a2"].endswith(":CustomData/Dose")


def test_sample_epu39_k3_pretty_printed(samples_dir):
    r = epu.parse_movie_xml(samples_dir / EPU /
                            "smartem__FoilHole_9015883_Data_9017347_6_20250108_154915.xml")
    assert r.software_version == "3.9.1.8206" and r.microscope_id == "3632"
    assert r.detector_commercial_name == "BioQuantum K3" and r.camera_name == "EF-CCD"
    assert r.super_resolution_factor == 2 and r.binning == 2
    assert r.readout_width == 2880 and r.readout_height == 2046
    assert r.magnification == 165000
    assert r.pixel_size_a == pytest.approx(1.0558814239614023)
    assert r.exposure_time_s == pytest.approx(0.89)
    assert r.n_frames == 50 and r.n_raw_frames is None
    assert r.total_dose_e_a2 == pytest.approx(14.410836806690226)
    assert r.dose_rate == pytest.approx(1.11751258756987)
    assert r.slit_width_ev == 20
    assert r.defocus_um == pytest.approx(-2.7)
    assert r.spot_size == 5
    assert r.camera_mode == "counting" and r.super_resolution is False


def test_sample_epu31_k3_single_line(samples_dir):
    r = epu.parse_movie_xml(samples_dir / EPU /
                            "emtestdata__FoilHole_5850127_Data_5798426_5798428_20221104_061329.xml")
    assert r.software_version == "3.1.0.4506" and r.microscope_id == "3788"
    assert r.pixel_size_a == pytest.approx(1.2851950059733497)
    assert r.magnification == 130000 and r.exposure_time_s == 2 and r.n_frames == 70
    assert r.total_dose_e_a2 == pytest.approx(63.993040352787363)
    assert r.defocus_um == pytest.approx(-1.4)
    assert r.acquired_at.utcoffset() == dt.timedelta(hours=-5)


def test_sample_foilhole_image_is_refused(samples_dir):
    p = samples_dir / EPU / "smartem__FoilHoles__FoilHole_9015889_20250108_154715.xml"
    with pytest.raises(MetadataError, match="foil-hole image"):
        epu.parse_movie_xml(p)
    assert epu.read_epu_xml_kind(p) == "foilhole"


def test_sample_session_dm(samples_dir):
    s = epu.parse_session_dm(samples_dir / EPU / "smartem__EpuSession.dm")
    assert s.name == "Supervisor_20250108_101446_62_cm40593-1_EPU"
    assert s.storage_folders == [r"Z:\DoseFractions\cm40593-1"]
    assert s.dose_fractions_output_format == "Tiff Lzw Non-Gain normalized"
    assert s.image_file_format == "Mrc"
    assert s.epu_version == "3.9.1.8206"
    assert s.started_at == dt.datetime(2025, 1, 8, 15, 10, 39, 480727, tzinfo=dt.UTC)


# ----------------------------------------------------------------------------- synthetic

@pytest.mark.parametrize("pretty", [False, True])
@pytest.mark.parametrize("fractionation", ["equidistant", "varidistant"])
def test_synthetic_roundtrip(tmp_path, pretty, fractionation):
    p = synth.write_epu_movie_xml(
        tmp_path / "FoilHole_1_Data_2_3_20240101_120000.xml", voltage_kv=200, pixel_size_a=0.83,
        n_fractions=48, n_raw_frames=1200, dose_e_a2=52.5, exposure_time_s=3.2, magnification=130000,
        defocus_um=-1.8, slit_width_ev=10, spot_size=7, beam_diameter_um=0.7,
        fractionation=fractionation, pretty=pretty, instrument_id=4001, epu_version="3.5.0.1")
    r = epu.parse_movie_xml(p)
    assert (r.voltage_kv, r.magnification, r.n_frames, r.spot_size) == (200, 130000, 48, 7)
    assert r.pixel_size_a == pytest.approx(0.83)
    assert r.total_dose_e_a2 == pytest.approx(52.5)
    assert r.dose_per_frame_e_a2 == pytest.approx(52.5 / 48)
    assert r.defocus_um == pytest.approx(-1.8) and r.slit_width_ev == 10
    assert r.beam_diameter_um == pytest.approx(0.7) and r.exposure_time_s == pytest.approx(3.2)
    assert r.microscope_id == "4001" and r.software_version == "3.5.0.1"
    assert r.foil_hole_id == 1
    assert r.n_raw_frames == (1200 if fractionation == "varidistant" else None)


def test_synthetic_eer_frames_from_rate(tmp_path):
    p = synth.write_epu_movie_xml(tmp_path / "m.xml", camera_name="EF-Falcon",
                                  detector_commercial_name="Falcon 4i", eer_frame_rate_hz=320.0,
                                  eer_gain_reference="20240101_gain.gain", exposure_time_s=2.5,
                                  fractionation=None, dose_e_a2=40.0)
    r = epu.parse_movie_xml(p)
    assert r.eer is True and r.gain_reference == "20240101_gain.gain"
    assert r.eer_frame_rate_hz == 320.0
    assert r.n_frames == 800 and "n_frames" in r.derived
    assert r.dose_per_frame_e_a2 == pytest.approx(40 / 800)


def test_synthetic_super_resolution_and_linear(tmp_path):
    r = epu.parse_movie_xml(synth.write_epu_movie_xml(
        tmp_path / "a.xml", super_resolution_factor=2, binning=1, counting=True))
    assert r.camera_mode == "super-resolution" and r.super_resolution is True
    r = epu.parse_movie_xml(synth.write_epu_movie_xml(tmp_path / "b.xml", counting=False))
    assert r.camera_mode == "linear" and r.super_resolution is False


def test_missing_values_are_none_never_zero(tmp_path):
    p = synth.write_epu_movie_xml(tmp_path / "m.xml", voltage_kv=None, pixel_size_a=None,
                                  dose_e_a2=None, defocus_um=None, magnification=None,
                                  exposure_time_s=None, fractionation=None, spot_size=None,
                                  beam_diameter_um=None, epu_version=None, instrument_id=None)
    r = epu.parse_movie_xml(p)
    for f in ("voltage_kv", "pixel_size_a", "total_dose_e_a2", "dose_per_frame_e_a2", "defocus_um",
              "magnification", "exposure_time_s", "n_frames", "spot_size", "software_version",
              "microscope_id", "beam_diameter_um"):
        assert getattr(r, f) is None, f
        assert f not in r.source


def test_zero_dose_is_unknown(tmp_path):
    r = epu.parse_movie_xml(synth.write_epu_movie_xml(tmp_path / "m.xml", dose_e_a2=0.0))
    assert r.total_dose_e_a2 is None


def test_image_xmls_by_name_are_refused(tmp_path):
    with pytest.raises(MetadataError, match="grid-square image"):
        epu.parse_movie_xml(synth.write_epu_image_xml(
            tmp_path / "GridSquare_5_20240101_120000.xml", kind="gridsquare"))
    with pytest.raises(MetadataError, match="foil-hole image"):
        epu.parse_movie_xml(synth.write_epu_image_xml(
            tmp_path / "FoilHole_5_20240101_120000.xml", kind="foilhole"))


def test_classify_name():
    n = epu.classify_name("FoilHole_9015883_Data_9017347_6_20250108_154915_fractions.tiff")
    assert (n.kind, n.foil_hole_id, n.data_id, n.index) == ("movie", 9015883, 9017347, 6)
    assert epu.classify_name("FoilHole_9015889_20250108_154715.xml").kind == "foilhole"
    assert epu.classify_name("GridSquare_8999138_20250108_154000.xml").kind == "gridsquare"


# ----------------------------------------------------------------------------- bad input

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE MicroscopeImage [ <!ENTITY ext SYSTEM "file://%s"> ]>
<MicroscopeImage xmlns="http://schemas.datacontract.org/2004/07/Fei.SharedObjects"
 xmlns:i="http://www.w3.org/2001/XMLSchema-instance">
<microscopeData><core><ApplicationSoftware>&ext;</ApplicationSoftware></core></microscopeData>
</MicroscopeImage>"""


def test_external_entity_is_not_resolved(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    p = tmp_path / "evil.xml"
    p.write_bytes(XXE % str(secret).encode())
    r = epu.parse_movie_xml(p)
    assert r.software is None or "TOPSECRET" not in r.software
    assert "TOPSECRET" not in r.model_dump_json()


def test_network_entity_is_not_fetched(tmp_path):
    p = tmp_path / "evil.xml"
    p.write_bytes(XXE.replace(b"file://%s", b"http://127.0.0.1:9/x"))
    r = epu.parse_movie_xml(p)  # must return quickly without a connection attempt failing it
    assert r.software is None


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (b"<MicroscopeImage xmlns='x'><a>", "malformed or truncated"),
    (b"<root/>", "not an EPU MicroscopeImage"),
    (b"\xff\xfe\x00garbage", "malformed|not readable"),
])
def test_bad_xml(tmp_path, content, match):
    p = tmp_path / "x.xml"
    p.write_bytes(content)
    with pytest.raises(MetadataError, match=match):
        epu.parse_movie_xml(p)


def test_truncated_real_like_xml(tmp_path):
    text = synth.epu_movie_xml()
    p = tmp_path / "t.xml"
    p.write_text(text[: len(text) // 2])
    with pytest.raises(MetadataError, match="truncated"):
        epu.parse_movie_xml(p)


def test_bad_number_names_key(tmp_path):
    p = tmp_path / "b.xml"
    p.write_text(synth.epu_movie_xml().replace("<AccelerationVoltage>300000", "<AccelerationVoltage>abc"))
    with pytest.raises(MetadataError, match="AccelerationVoltage"):
        epu.parse_movie_xml(p)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(MetadataError, match="not found"):
        epu.parse_movie_xml(tmp_path / "none.xml")
    with pytest.raises(MetadataError, match="folder"):
        epu.parse_session_dm(tmp_path)


def test_session_dm_synthetic_and_wrong_root(tmp_path):
    p = synth.write_epu_session_dm(tmp_path / "EpuSession.dm", name="S1",
                                   storage_folders=[r"Z:\a", r"Y:\b"], image_file_format="Tiff")
    s = epu.parse_session_dm(p)
    assert s.name == "S1" and s.storage_folders == [r"Z:\a", r"Y:\b"] and s.image_file_format == "Tiff"
    q = tmp_path / "x.dm"
    q.write_text(synth.epu_movie_xml())
    with pytest.raises(MetadataError, match="not an EpuSession.dm"):
        epu.parse_session_dm(q)
