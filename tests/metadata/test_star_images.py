from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
import pytest

from metadata.errors import MetadataError
from metadata.images import StackReader, read_mrc, write_mrc
from metadata.star import (
    join_image_name,
    particles_with_optics,
    read_star,
    read_table,
    split_image_name,
    write_star,
)


def test_star_roundtrip_with_optics(tmp_path):
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnImagePixelSize": [1.5, 2.0],
                           "rlnVoltage": [300.0, 200.0]})
    parts = pd.DataFrame({"rlnImageName": [join_image_name(0, "a.mrcs"), "000002@a.mrcs"],
                          "rlnOpticsGroup": [2, 1], "rlnDefocusU": [12000.25, 20000.5]})
    p = write_star(tmp_path / "p.star", {"optics": optics, "particles": parts})
    blocks = read_star(p)
    merged = particles_with_optics(blocks)
    assert list(merged["rlnImagePixelSize"]) == [2.0, 1.5]
    assert merged["rlnDefocusU"].tolist() == [12000.25, 20000.5]
    assert split_image_name(merged["rlnImageName"][1]) == (1, "a.mrcs")


def test_star_errors_name_the_file(tmp_path):
    with pytest.raises(MetadataError, match="missing.star"):
        read_star(tmp_path / "missing.star")
    bad = tmp_path / "bad.star"
    write_star(bad, {"x": pd.DataFrame({"rlnA": [1]})})
    with pytest.raises(MetadataError, match="tables present: x"):
        read_table(bad, "particles")


def test_float16_stack_and_reader(tmp_path, rng):
    stack = rng.standard_normal((5, 16, 16)).astype(np.float32)
    write_mrc(tmp_path / "s.mrcs", stack, pixel_size_a=2.5, float16=True)
    with mrcfile.open(tmp_path / "s.mrcs") as m:
        assert m.header.mode == 12 and m.data.shape == (5, 16, 16)
        assert float(m.voxel_size.x) == pytest.approx(2.5)
    with StackReader(project_dir=tmp_path) as r:
        got = r.read(["000004@s.mrcs", "000001@s.mrcs"])
    np.testing.assert_allclose(got, stack[[3, 0]], atol=2e-3)
    with pytest.raises(MetadataError, match="holds 5"), StackReader(project_dir=tmp_path) as r:
        r.read(["000009@s.mrcs"])
    data, px = read_mrc(tmp_path / "s.mrcs")
    assert data.dtype == np.float32 and px == pytest.approx(2.5)
