from __future__ import annotations

import logging

import numpy as np
import pytest

from compute import backend as be
from compute.errors import BackendError


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    be._reset_for_tests()
    yield
    be._reset_for_tests()


def test_cpu_is_numpy(monkeypatch):
    monkeypatch.setenv("SCOPESIDE_DEVICE", "cpu")
    assert be.select_device() == "cpu"
    assert be.get_xp() is np


def test_auto_falls_back_and_logs_once(monkeypatch, caplog):
    monkeypatch.setenv("SCOPESIDE_DEVICE", "auto")
    monkeypatch.setattr(be, "gpu_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="compute.backend"):
        assert be.select_device() == "cpu"
        assert be.select_device() == "cpu"
    msgs = [r.message for r in caplog.records if "compute device" in r.message]
    assert msgs == ["compute device: cpu (requested auto)"]


def test_forced_gpu_without_gpu_is_a_clear_error(monkeypatch):
    if be.gpu_available():
        pytest.skip("a GPU is present")
    monkeypatch.setenv("SCOPESIDE_DEVICE", "gpu")
    with pytest.raises(BackendError, match="SCOPESIDE_DEVICE=gpu was requested"):
        be.select_device()


def test_bad_device_name(monkeypatch):
    monkeypatch.setenv("SCOPESIDE_DEVICE", "tpu")
    with pytest.raises(BackendError, match="not a device"):
        be.select_device()


def test_xp_of_and_to_numpy():
    a = np.ones(3)
    assert be.xp_of(a, [1, 2]) is np
    assert be.to_numpy(a) is a or np.shares_memory(be.to_numpy(a), a)


def test_fft_facade_matches_numpy(rng):
    x = rng.standard_normal((3, 32, 48)).astype(np.float32)
    np.testing.assert_allclose(be.rfft2(x), np.fft.rfft2(x), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(be.irfft2(be.rfft2(x), s=x.shape[-2:]), x, atol=1e-5)
    np.testing.assert_allclose(be.fftn(x[0]), np.fft.fftn(x[0]), rtol=1e-4, atol=1e-3)
    with be.workers(1):
        assert be.n_workers() == 1
    assert be.next_fast_len(97) >= 97


def test_bad_threads_env(monkeypatch):
    monkeypatch.setenv("SCOPESIDE_THREADS", "many")
    with pytest.raises(BackendError, match="whole number"):
        be.n_workers()


@pytest.mark.gpu
def test_gpu_parity(rng):
    if not be.gpu_available():
        pytest.skip("no CUDA GPU")
    x = rng.standard_normal((4, 64, 64)).astype(np.float32)
    g = be.to_device(x, "gpu")
    assert be.xp_of(g) is not np
    np.testing.assert_allclose(be.to_numpy(be.rfft2(g)), be.rfft2(x), rtol=1e-4, atol=1e-3)
