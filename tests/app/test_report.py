"""The HTML report's acquisition section."""

from __future__ import annotations

import json

from app.report import _section_acquisition


def test_values_missing_from_the_metadata_are_named_so_and_the_confirmed_value_is_shown(tmp_path):
    # EPU's XML holds no Cs: the metadata table must not call it "(unknown)" while the
    # confirmed settings (from the operator) give 2.7 mm
    (tmp_path / "session_summary.json").write_text(json.dumps(
        {"software": "EPU", "voltage_kv": 300.0, "cs_mm": None, "pixel_size_a": 0.83}))
    (tmp_path / "demo_settings.json").write_text(json.dumps(
        {"settings": {"cs_mm": 2.7, "pixel_size_a": 0.83},
         "provenance": {"cs_mm": "operator (not in the metadata)",
                        "pixel_size_a": "metadata: /data/x/FoilHole_1_Data_2_3.xml:pixelSize"}}))
    html = _section_acquisition(tmp_path, None)
    assert "<td>cs_mm</td><td>(unknown)</td>" not in html
    assert "<td>cs_mm</td><td>not in the metadata</td>" in html
    assert "<td>cs_mm</td><td>2.7</td><td>operator (not in the metadata)</td>" in html
    assert "metadata: FoilHole_1_Data_2_3.xml:pixelSize" in html
