"""Test configuration shared by every test module.

- Qt runs offscreen unless a platform is set (no display in CI).
- ``SAMPLES`` points at ``../shared/samples`` (tests using it skip cleanly when absent).
- Compute uses one FFT thread unless a test says otherwise (2-core machines).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("SCOPESIDE_DEVICE", "cpu")
os.environ.setdefault("SCOPESIDE_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("SCOPESIDE_SAMPLES", REPO.parent / "shared" / "samples"))


@pytest.fixture
def samples_dir() -> Path:
    """The real metadata samples folder; skips the test when it is absent."""
    if not SAMPLES.is_dir():
        pytest.skip(f"real samples not found at {SAMPLES}")
    return SAMPLES


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(12345)


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path_factory, monkeypatch):
    """Never read the developer's own site config during tests."""
    cfg = tmp_path_factory.getbasetemp() / "site-config.toml"
    monkeypatch.setenv("SCOPESIDE_CONFIG", str(cfg))
