"""CuPy parity of the 2D E-step (skips cleanly without a usable GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from compute import backend as be
from compute.vdam.estep2d import CtfBatch, Estep2D, Sampling2D
from tests.compute.vdam.simdata import fixed_view_stack

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not be.gpu_available(), reason="no usable GPU (CuPy + CUDA device)")
def test_estep2d_gpu_matches_numpy():
    cp = be.get_xp("gpu")
    imgs, _, _, ctf = fixed_view_stack(40, n_mol=2, box=32, snr=0.5, seed=3)
    out = {}
    for name, xp in (("cpu", np), ("gpu", cp)):
        es = Estep2D(32, 4.0, Sampling2D(15, 2, 1), 100, xp=xp)
        es.set_resolution(12)
        rng = np.random.default_rng(0)
        refs = es.to_fourier(xp.asarray(rng.standard_normal((3, 32, 32)).astype(np.float32)
                                        * be.to_numpy(es.mask)))
        X = es.prepare_images(xp.asarray(imgs))
        acc, res = es.run(refs, X, ctf, np.ones(es.n_shells) * 500.0, np.log(np.ones(3) / 3),
                          np.arange(40) % 2 + 1)
        out[name] = (be.to_numpy(acc.data), be.to_numpy(acc.weight), res)
    assert np.array_equal(out["cpu"][2].class_index, out["gpu"][2].class_index)
    assert np.allclose(out["cpu"][2].psi_deg, out["gpu"][2].psi_deg)
    assert np.allclose(out["cpu"][1], out["gpu"][1], rtol=1e-3, atol=1e-6)
    scale = np.abs(out["cpu"][0]).max()
    assert np.abs(out["cpu"][0] - out["gpu"][0]).max() < 1e-3 * scale


def test_ctfbatch_none_is_unit_ctf():
    es = Estep2D(32, 4.0, Sampling2D(30, 1, 1), 100, do_ctf=False)
    es.set_resolution(8)
    assert np.all(es.ctf_values(CtfBatch.none(3)) == 1.0)
