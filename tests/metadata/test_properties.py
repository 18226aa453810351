"""Property tests: random and mutated XML / mdoc / TOML input never lets anything but
MetadataError escape the parsers."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metadata import config, epu, mdoc, synth
from metadata.errors import MetadataError

_XML = synth.epu_movie_xml(fractionation="varidistant", n_fractions=4, n_raw_frames=20,
                           slit_width_ev=20, eer_frame_rate_hz=250.0, eer_gain_reference="g.gain")
_DM = synth.epu_session_dm()
_MDOC = synth.mdoc_text(variant="tilt_series", n_sections=3)
_FRAME = synth.mdoc_text(variant="frame")

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def mutated(draw, base: str):
    """Text with a few random edits: deletions, insertions, replacements, truncation."""
    data = bytearray(base.encode())
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["del", "ins", "rep", "trunc", "dup"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "del":
            j = min(len(data), i + draw(st.integers(1, 50)))
            del data[i:j]
        elif op == "ins":
            data[i:i] = draw(st.binary(min_size=1, max_size=20))
        elif op == "rep":
            data[i] = draw(st.integers(0, 255))
        elif op == "trunc":
            del data[i:]
        else:
            j = min(len(data), i + draw(st.integers(1, 200)))
            data[i:i] = data[i:j]
    return bytes(data)


def _only_metadata_error(fn, data: bytes, name: str):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_bytes(data)
        try:
            fn(p)
        except MetadataError:
            pass


@SETTINGS
@given(mutated(_XML))
def test_mutated_epu_xml(data):
    _only_metadata_error(epu.parse_movie_xml, data, "FoilHole_1_Data_2_3_20240101_120000.xml")


@SETTINGS
@given(mutated(_DM))
def test_mutated_session_dm(data):
    _only_metadata_error(epu.parse_session_dm, data, "EpuSession.dm")


@SETTINGS
@given(st.one_of(mutated(_MDOC), mutated(_FRAME)))
def test_mutated_mdoc(data):
    _only_metadata_error(mdoc.parse_mdoc, data, "x.mdoc")


@SETTINGS
@given(st.binary(max_size=400))
def test_random_bytes_everywhere(data):
    _only_metadata_error(epu.parse_movie_xml, data, "a.xml")
    _only_metadata_error(mdoc.parse_mdoc, data, "a.mdoc")
    _only_metadata_error(epu.parse_session_dm, data, "EpuSession.dm")


@SETTINGS
@given(st.text(alphabet=st.sampled_from(list("[]=TZValue FrameSet 0123456789.-\r\nSerialEM:abc")),
               max_size=300))
def test_random_mdoc_like_text(text):
    _only_metadata_error(mdoc.parse_mdoc, text.encode(), "b.mdoc")


@SETTINGS
@given(mutated('[microscopes."1"]\nname = "x"\nmodel = "krios"\ncs_mm = 2.7\n'
               '[detectors.k3]\nmatch = ["K3"]\ngain_rotation = 1\n'))
def test_mutated_site_config(data):
    _only_metadata_error(config.load_instruments, data, "site.toml")
