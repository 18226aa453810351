"""SerialEM / Tomography 5 mdocs: real samples and synthetic variants."""

from __future__ import annotations

import datetime as dt

import pytest

from metadata import mdoc, synth
from metadata.errors import MetadataError


def test_sample_mdcatch_frame_mdoc(samples_dir):
    m = mdoc.parse_mdoc(samples_dir / "mdoc" / "mdcatch__img_h1_s2_i374_movie_00001_Jul30_07.56.47.tif.mdoc")
    assert m.software == "SerialEM" and m.microscope_id == "D3593" and m.is_frame_mdoc
    assert len(m.sections) == 1 and m.parser == "mdocfile"
    r = m.sections[0]
    assert r.voltage_kv == 300 and r.pixel_size_a == pytest.approx(0.50226)
    assert r.binning == 0.5 and r.super_resolution is True and r.camera_mode == "super-resolution"
    assert r.magnification == 31000 and r.spot_size == 3
    assert r.total_dose_e_a2 == 30 and r.n_frames == 40
    assert r.dose_per_frame_e_a2 == pytest.approx(0.75) and "dose_per_frame_e_a2" in r.derived
    assert r.exposure_time_s == 1.0 and r.defocus_um == -2.3
    assert r.gain_reference == "SuperRef_00000_Aug11_14.13.17.mrc"
    assert r.defect_file == "defects_00000_Aug11_14.13.17.txt"
    assert r.cs_mm == 2.7  # the script-added Cs key
    assert r.acquired_at == dt.datetime(2019, 8, 11, 14, 13, 22)
    assert r.movie_path.endswith("mdcatch__img_h1_s2_i374_movie_00001_Jul30_07.56.47.tif")
    assert r.sub_frame_path == r"X:\Data\Gregory\00000_Aug11_14.13.17.tif"


def test_sample_frame_set_single(samples_dir):
    m = mdoc.parse_mdoc(samples_dir / "mdoc" / "mdocfile__frame_set_single.mdoc")
    r = m.sections[0]
    assert m.cameras == {0: "Ceta", 1: "GIF-K3"} and r.camera_name == "GIF-K3"
    assert r.pixel_size_a == pytest.approx(1.2827) and r.binning == 0.5
    assert r.total_dose_e_a2 == pytest.approx(7.65892)
    assert r.dose_per_frame_e_a2 == pytest.approx(0.63824) and "dose_per_frame_e_a2" not in r.derived
    assert r.n_frames == 12 and r.dose_rate == pytest.approx(4.97858)
    assert r.tilt_angle_deg == pytest.approx(32.984) and r.defocus_um == -4.5
    assert r.acquired_at == dt.datetime(2021, 10, 8, 7, 39, 8)


def test_sample_tilt_series(samples_dir):
    m = mdoc.parse_mdoc(samples_dir / "mdoc" / "mdocfile__tilt_series.mdoc")
    assert len(m.sections) == 41 and m.section_kind == "ZValue"
    assert m.scope_label == "Digitized on EMBL Krios" and m.microscope_id is None
    r = m.sections[0]
    assert r.voltage_kv is None  # the file has no Voltage line
    assert r.total_dose_e_a2 is None  # ExposureDose = 0 and no DoseRate
    # PixelSpacing 5.4 belongs to the bin-4 stack image (ImageSize 924 x 958); the frames
    # (SubFramePath) are unbinned: 1.35 A (EMPIAR-10164's pixel size), flagged as derived
    assert r.pixel_size_a == pytest.approx(1.35) and r.binning == 4 and r.n_frames == 8
    assert "pixel_size_a" in r.derived and "PixelSpacing/Binning" in r.source["pixel_size_a"]
    assert (r.readout_width, r.readout_height) == (3696, 3832)
    assert any("bin-4 image" in w for w in r.warnings)
    assert r.acquired_at == dt.datetime(2015, 11, 30, 15, 21, 38)
    assert m.sections[1].tilt_angle_deg == pytest.approx(3.00113)


def test_sample_murfey_derived_dose(samples_dir):
    m = mdoc.parse_mdoc(samples_dir / "mdoc" / "murfey__test_1.mdoc")
    assert m.software_version == "4.0.6" and len(m.sections) == 11
    r = m.sections[0]
    assert r.n_frames == 10  # NumSubFrames; FrameDosesAndNumber "0 7  0 3"
    assert r.acquired_at == dt.datetime(2022, 8, 1, 18, 58, 35)  # 4-digit year
    # ExposureDose 0 -> derived from DoseRate 5.45454 e/px/s * 1.49179 s / (1.94 A)^2
    assert r.total_dose_e_a2 == pytest.approx(5.45454 * 1.49179 / 1.94**2)
    assert "total_dose_e_a2" in r.derived and r.source["total_dose_e_a2"].startswith("derived:")


@pytest.mark.parametrize("variant", ["frame", "frame_bracket", "stack", "tilt_series", "montage", "tomo5"])
@pytest.mark.parametrize("crlf", [True, False])
def test_synthetic_variants(tmp_path, variant, crlf):
    n = 1 if variant.startswith("frame") else 5
    p = synth.write_mdoc(tmp_path / "x.mdoc", variant=variant, crlf=crlf, n_sections=n,
                         pixel_size_a=1.06, voltage_kv=200, exposure_dose_e_a2=3.0, n_frames=10,
                         binning=1, scope_label="Synthetic Glacios D1234", four_digit_year=crlf)
    m = mdoc.parse_mdoc(p)
    assert len(m.sections) == n
    assert m.software == ("Tomography" if variant == "tomo5" else "SerialEM")
    assert m.microscope_id == "D1234"
    r = m.sections[-1]
    assert r.pixel_size_a == pytest.approx(1.06) and r.voltage_kv == 200
    assert r.total_dose_e_a2 == pytest.approx(3.0) and r.n_frames == 10
    assert r.dose_per_frame_e_a2 == pytest.approx(0.3)
    assert r.acquired_at is not None and r.acquired_at.year == 2024
    assert r.eer is (variant == "tomo5")
    assert m.n_montage_sections == (1 if variant == "montage" else 0)


def test_dose_from_dose_rate_with_super_resolution(tmp_path):
    p = synth.write_mdoc(tmp_path / "a.mdoc", exposure_dose_e_a2=0, dose_rate=10.0, exposure_time_s=2.0,
                         pixel_size_a=0.5, binning=0.5, frame_doses_and_number="0 40")
    r = mdoc.parse_mdoc(p).sections[0]
    # unbinned pixel = 0.5 / 0.5 = 1.0 A -> 10 * 2 / 1 = 20 e/A^2
    assert r.total_dose_e_a2 == pytest.approx(20.0) and "total_dose_e_a2" in r.derived


def test_header_with_extra_equals_falls_back_to_own_parser(tmp_path):
    text = synth.mdoc_text(variant="frame").replace("T = SerialEM:", "T = SerialEM: Mode = SPA")
    p = tmp_path / "odd.mdoc"
    p.write_text(text)
    m = mdoc.parse_mdoc(p)
    assert m.parser.startswith("own")
    assert m.sections[0].pixel_size_a == pytest.approx(0.8)


def test_non_utf8_bytes_decode_as_cp1252(tmp_path):
    p = tmp_path / "a.mdoc"
    p.write_bytes(synth.mdoc_text(sub_frame_path=r"X:\Jürgen\m.tif").encode("cp1252"))
    r = mdoc.parse_mdoc(p).sections[0]
    assert r.sub_frame_path == r"X:\Jürgen\m.tif"


def test_unknown_and_missing_keys(tmp_path):
    p = synth.write_mdoc(tmp_path / "a.mdoc", voltage_kv=None, pixel_size_a=None, exposure_dose_e_a2=None,
                         n_frames=None, binning=None, extra={"MyScriptKey": "hello", "Other": "1 2 3"})
    r = mdoc.parse_mdoc(p).sections[0]
    assert r.voltage_kv is None and r.pixel_size_a is None and r.total_dose_e_a2 is None
    assert r.n_frames is None and r.super_resolution is None


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (b"PixelSpacing = 1.0\nVoltage = 300\n", "no \\[ZValue\\]"),
    (b"\x00\x01\x02binary", "binary"),
    (b"[ZValue = 0]\nPixelSpacing = abc\n", "PixelSpacing"),
])
def test_bad_mdoc(tmp_path, content, match):
    p = tmp_path / "bad.mdoc"
    p.write_bytes(content)
    with pytest.raises(MetadataError, match=match):
        mdoc.parse_mdoc(p)


def test_parse_date_variants():
    assert mdoc.parse_date("11-Aug-19  14:13:22") == dt.datetime(2019, 8, 11, 14, 13, 22)
    assert mdoc.parse_date("01-Aug-2022  18:58:35") == dt.datetime(2022, 8, 1, 18, 58, 35)
    assert mdoc.parse_date("nonsense") is None


TOMO5 = """DataMode = 6\r
ImageSize = 4096 4096\r
ImageFile = Position_3.mrc\r
PixelSpacing = 2.13\r
Voltage = 300.00\r
\r
[T = Tomography_5.23.0.10273: TITAN52339070    13-Jan-2025  17:15:32]\r
\r
[T =   TiltAxisAngle = -176.20  Binning = 1  SpotSize = 6]\r
\r
[ZValue = 0]\r
TiltAngle = -0.14\r
ExposureDose = 3.1\r
RotationAngle = 86.20\r
SubFramePath = \\\\store\\tomo\\Position_3_001_-0.14_20250113_171527_EER.eer\r
NumSubFrames = 620\r
\r
[ZValue = 1]\r
TiltAngle = 2.86\r
ExposureDose = 3.1\r
SubFramePath = \\\\store\\tomo\\Position_3_002_2.86_20250113_171617_EER.eer\r
NumSubFrames = 620\r
"""


def test_tomography5_header_version_and_instrument(tmp_path):
    p = tmp_path / "Position_3.mdoc"
    p.write_bytes(TOMO5.encode())
    m = mdoc.parse_mdoc(p)
    assert (m.software, m.software_version, m.microscope_id) == ("Tomography", "5.23.0.10273", "3907")
    r = m.sections[1]
    assert "microscope_id" in r.derived
    assert r.eer is True and r.n_frames == 620 and r.voltage_kv == 300
    assert r.pixel_size_a == pytest.approx(2.13)  # from the header: sections have no PixelSpacing
    assert r.total_dose_e_a2 == pytest.approx(3.1) and r.tilt_angle_deg == pytest.approx(2.86)
    assert r.movie_path.endswith("Position_3_002_2.86_20250113_171617_EER.eer")


# --- shapes of real mdocs found in public repositories (written here from scratch) ---------

_BINNED_TS = """PixelSpacing = 5.4
ImageFile = ts.mrc
ImageSize = 100 120
DataMode = 1

[T = SerialEM: Digitized on a Krios   binning = 4    30-Nov-15  15:21:38    ]

[ZValue = 0]
TiltAngle = 0.0
Magnification = 105000
ExposureDose = 0
PixelSpacing = 5.4
Binning = 4
SubFramePath = D:\\DATA\\frames\\ts_000_0.0.mrc
NumSubFrames = 8
DateTime = 30-Nov-15  15:21:38
"""


@pytest.mark.parametrize("frame_size, expect_px, expect_sr", [
    ((400, 480), 1.35, False),    # frames unbinned (counting): ImageSize x Binning
    ((800, 960), 0.675, True),    # super-resolution frames: half again
])
def test_binned_tilt_series_frames_pixel_size(tmp_path, frame_size, expect_px, expect_sr):
    """PixelSpacing of a bin-4 stack image is not the frames' pixel size (EMPIAR-10164-like)."""
    from metadata.session import read_any

    p = tmp_path / "ts.mrc.mdoc"
    p.write_text(_BINNED_TS)
    r = mdoc.parse_mdoc(p).sections[0]
    assert r.pixel_size_a == pytest.approx(1.35) and "pixel_size_a" in r.derived
    assert any("bin-4 image" in w for w in r.warnings)
    synth.write_movie_stub(tmp_path / "ts_000_0.0.mrc", n_frames=8, shape=frame_size[::-1])
    settled = read_any(p).record
    assert settled.pixel_size_a == pytest.approx(expect_px)
    assert bool(settled.super_resolution) is expect_sr
    assert settled.movie_path == str(tmp_path / "ts_000_0.0.mrc")


def test_binned_image_without_frames_keeps_its_pixel_size(tmp_path):
    p = tmp_path / "ts.mrc.mdoc"
    p.write_text(_BINNED_TS.replace("SubFramePath = D:\\DATA\\frames\\ts_000_0.0.mrc\n", ""))
    r = mdoc.parse_mdoc(p).sections[0]
    assert r.pixel_size_a == 5.4 and "pixel_size_a" not in r.derived and not r.warnings


_FRAME_TS = """T = SerialEM: UMass Krios    08-Oct-21  07:46:46
Voltage = 300

[FrameSet = 0]
TiltAngle = 33
PixelSpacing = 1.28
Binning = 0.5
ExposureDose = {total}
NumSubFrames = 36
FrameDosesAndNumber = 0.5 36
SubFramePath = X:\\frames\\s_01_33.0.tif
DateTime = 08-Oct-21  07:46:46
"""


def test_frame_based_tilt_series_is_one_movie(tmp_path):
    """SerialEM's frame-based tilt series: [ZValue] sections are frame ranges of the movie."""
    text = _FRAME_TS.format(total=18.0)
    for z, (tilt, first) in enumerate(((33, 0), (30, 12), (27, 24))):
        text += (f"\n[ZValue = {z}]\nTiltAngle = {tilt}\nExposureDose = 6\n"
                 f"PriorRecordDose = {6 * z}\nFrameTSStartEndFrames = {first} {first + 11}\n")
    p = tmp_path / "s_01_33.0.tif.mdoc"
    p.write_text(text)
    m = mdoc.parse_mdoc(p)
    assert len(m.sections) == 1 and m.section_kind == "FrameSet" and m.n_montage_sections == 0
    assert [(t["tilt_angle_deg"], t["first_frame"], t["last_frame"]) for t in m.frame_tilts] == \
        [(33, 0, 11), (30, 12, 23), (27, 24, 35)]
    assert m.frame_tilts[2]["prior_dose_e_a2"] == 12 and m.frame_tilts[2]["dose_e_a2"] == 6
    r = m.sections[0]
    assert r.n_frames == 36 and r.dose_per_frame_e_a2 == 0.5
    assert any("frame-based tilt series: 3 tilts" in w and "27 to 33" in w for w in r.warnings)
    assert not any("disagrees" in w for w in r.warnings)  # 0.5 x 36 = 18 = ExposureDose


def test_exposure_dose_disagreeing_with_frame_doses_warns(tmp_path):
    p = tmp_path / "m.tif.mdoc"
    p.write_text(_FRAME_TS.format(total=29.1))
    r = mdoc.parse_mdoc(p).sections[0]
    assert r.total_dose_e_a2 == 29.1 and r.dose_per_frame_e_a2 == 0.5
    assert any("ExposureDose 29.1 e/A^2 disagrees with FrameDosesAndNumber (18 e/A^2 over 36"
               in w for w in r.warnings)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_unicode_mdoc_with_byte_order_mark(tmp_path, encoding):
    """Windows Notepad saves "Unicode" as UTF-16 with a BOM; both BOM kinds read like UTF-8."""
    plain = mdoc.parse_mdoc(synth.write_mdoc(tmp_path / "a.mdoc")).sections[0]
    p = synth.write_mdoc(tmp_path / "b.mdoc", encoding=encoding)
    assert p.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff", b"\xef\xbb")
    r = mdoc.parse_mdoc(p).sections[0]
    assert (r.pixel_size_a, r.n_frames, r.total_dose_e_a2, r.acquired_at) == \
        (plain.pixel_size_a, plain.n_frames, plain.total_dose_e_a2, plain.acquired_at)
