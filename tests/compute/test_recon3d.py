"""Back-projection is the adjoint of projection; reconstruction recovers a known map."""

from __future__ import annotations

import numpy as np

from compute.fourier import fsc, resolution_at_threshold
from compute.geometry import random_rotations
from compute.recon3d import reconstruct
from compute.simulate.molecules import density_map, molecule
from compute.simulate.particles import ctf_batch, draw_ctf
from compute.simulate.project import Projector


def test_reconstruct_noise_free_projections():
    vol = density_map(molecule("asym"), 24, 6.0)
    R = random_rotations(800, 3)
    imgs = Projector(vol).project(R)
    rec = reconstruct(np.asarray(imgs, dtype=np.float32), R)
    c = np.corrcoef(rec.ravel(), vol.ravel())[0, 1]
    assert c > 0.98
    scale = float((rec * vol).sum() / (vol * vol).sum())
    assert 0.9 < scale < 1.1


def test_reconstruct_with_ctf_and_origins():
    box, px = 24, 6.0
    vol = density_map(molecule("asym"), box, px)
    rng = np.random.default_rng(4)
    R = random_rotations(1200, 5)
    origins = rng.uniform(-2, 2, (1200, 2))
    ctf = draw_ctf(rng, 1200, bfactor_a2=0.0)
    c = ctf_batch((box, box), px, ctf)
    from compute import backend as be
    from compute.recon3d import centre_phase

    F = be.rfft2(np.asarray(Projector(vol).project(R, origins_px=origins), dtype=np.float32))
    imgs = be.irfft2(F * c, s=(box, box)).astype(np.float32)
    assert centre_phase(box).shape == (box, box // 2 + 1)
    rec = reconstruct(imgs, R, ctf=c, origins_px=origins, regulariser=1.0)
    curve = fsc(rec, vol)
    assert resolution_at_threshold(curve, box, px, 0.5) < 2.0 * px * 1.3
    # wrong origins lose the high resolution
    bad = reconstruct(imgs, R, ctf=c, origins_px=-origins, regulariser=1.0)
    assert resolution_at_threshold(fsc(bad, vol), box, px, 0.5) > \
        resolution_at_threshold(curve, box, px, 0.5)
