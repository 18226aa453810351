"""3D benchmarks against simulated ground truth: initial model (asym and D2) and refinement.

Plain script, prints a table. Examples (issue 9 acceptance sizes; hours on a loaded 2-core box)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_3d.py inimodel --mol asym --n 5000 \
        --box 64 --seeds 1-10
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_3d.py inimodel --mol d2 --sym D2 ...
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_3d.py refine --n 20000 --box 64
    # re-measure the maps a run saved with --save DIR:
    .venv/bin/python benchmarks/bench_3d.py evaluate --mol d2 --sym D2 --seeds 1-10 --save DIR

Initial model: K classes from blobs, the largest class aligned (rotation + hand) to the truth,
FSC = 0.5 resolution vs the truth; with ``--sym`` the symmetry axes are found
(``align_to_symmetry``) and their angle to x, y, z reported (the truth's D2 axes are x, y, z).
Refinement: from the truth low-passed to ``--ini-high`` A, half-map FSC = 0.143 resolution,
FSC = 0.5 vs the truth, their ratio, and the data's Nyquist.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compute.fourier import fsc, resolution_at_threshold  # noqa: E402
from compute.inimodel import InitialModel3D, InitialModelParams  # noqa: E402
from compute.refine3d import Refine3D, Refine3DParams  # noqa: E402
from compute.simulate.molecules import density_map, molecule  # noqa: E402
from compute.simulate.particles import simulate_particles  # noqa: E402
from compute.symmetry import (  # noqa: E402
    align_map_to_reference,
    find_symmetry_placement,
    rotate_volume,
)
from compute.vdam.classify2d import ArraySource  # noqa: E402
from compute.vdam.estep2d import CtfBatch  # noqa: E402


def seeds_of(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(t) for t in text.split(",")]


def make_source(n, box, mol, snr, seed):
    stk = simulate_particles(n, (mol,), box=box, snr=snr, seed=seed, max_shift_px=2.0)
    c = stk.truth.ctf
    ctf = CtfBatch(c.defocus_u_a, c.defocus_v_a, c.defocus_angle_deg, np.full(n, c.voltage_kv),
                   np.full(n, c.cs_mm), np.full(n, c.amplitude_contrast), c.phase_shift_deg,
                   c.bfactor_a2)
    return stk, ArraySource(np.asarray(stk.images), stk.truth.pixel_size_a, ctf)


def axes_error_deg(P) -> float:
    """Largest angle between x, y, z and the nearest found 2-fold axis (columns of P)."""
    c = np.abs(P)  # cosines between the standard axes and the found ones
    return float(np.degrees(np.arccos(np.clip(c.max(axis=1), -1, 1))).max())


def evaluate(vol, mol: str, sym: str, px: float) -> tuple[float, float, float]:
    """What the job would write (the map put on the symmetry axes) against the truth:
    (correlation, FSC = 0.5 resolution after rotation/shift/hand alignment, axes error)."""
    box = vol.shape[0]
    err = float("nan")
    if sym != "C1":
        P, _ = find_symmetry_placement(vol, sym)
        vol = rotate_volume(vol, P.T)
        # the truth's axes are x, y, z: after alignment the map's axes must be too
        Q, _ = find_symmetry_placement(vol, sym)
        err = axes_error_deg(Q)
    truth = density_map(molecule(mol), box, px)
    aligned, cc, _ = align_map_to_reference(vol, truth)
    return cc, resolution_at_threshold(fsc(aligned, truth), box, px, 0.5), err


def bench_evaluate(a) -> None:
    """Re-evaluate the models a run saved with ``--save`` (same measurement as the run)."""
    import mrcfile
    print(f"# saved initial models in {a.save}: {a.mol}, sym {a.sym}")
    print("seed  corr   FSC0.5_A  nyq_A  axes_err_deg")
    for seed in seeds_of(a.seeds):
        fn = os.path.join(a.save, f"{a.mol}_s{seed}_model.mrc")
        if not os.path.exists(fn):
            print(f"{seed:4d}  (no saved model)")
            continue
        with mrcfile.open(fn) as f:
            vol, px = np.array(f.data), float(f.voxel_size.x)
        cc, res, err = evaluate(vol, a.mol, a.sym, px)
        print(f"{seed:4d}  {cc:.3f}  {res:8.1f}  {2 * px:5.1f}  {err:6.2f}", flush=True)


def bench_inimodel(a) -> None:
    print(f"# initial model: {a.mol}, {a.n} particles, box {a.box}, SNR {a.snr}, "
          f"{a.iters} mini-batches, K={a.k}, sym {a.sym}; load {os.getloadavg()[0]:.1f}")
    print("seed  wall_s  s/batch  corr   FSC0.5_A  nyq_A  axes_err_deg")
    for seed in seeds_of(a.seeds):
        stk, src = make_source(a.n, a.box, a.mol, a.snr, seed)
        px = src.pixel_size_a
        p = InitialModelParams(n_classes=a.k, n_iter=a.iters, particle_diameter_a=0.85 * a.box * px,
                               offset_range_px=3, offset_step_px=1, seed=seed)
        t0 = time.perf_counter()
        im = InitialModel3D(src, p)
        im.initialise()
        while not im.done:
            info = im.step()
            if a.verbose and info.iteration % 10 == 0:
                print(f"  it {info.iteration} batch {info.batch_size} r_max {info.r_max:.1f} "
                      f"{info.seconds:.1f} s res {im.class_resolution_a().round(1)}", flush=True)
        t_batches = time.perf_counter() - t0
        best = int(np.argmax(im.state.class_frac))
        vol = im.class_volume(best)
        if a.save:
            import mrcfile
            os.makedirs(a.save, exist_ok=True)
            for name, m in ((f"{a.mol}_s{seed}_model.mrc", vol),
                            (f"{a.mol}_truth.mrc", density_map(molecule(a.mol), a.box, px))):
                with mrcfile.new(os.path.join(a.save, name), overwrite=True) as f:
                    f.set_data(np.asarray(m, dtype=np.float32))
                    f.voxel_size = px
        cc, res, err = evaluate(vol, a.mol, a.sym, px)
        wall = time.perf_counter() - t0
        print(f"{seed:4d}  {wall:6.0f}  {t_batches / a.iters:7.2f}  {cc:.3f}  {res:8.1f}  "
              f"{2 * px:5.1f}  {err:6.2f}", flush=True)


def bench_refine(a) -> None:
    print(f"# refine: {a.mol}, {a.n} particles, box {a.box}, SNR {a.snr}, ini_high {a.ini_high} A, "
          f"sym {a.sym}; load {os.getloadavg()[0]:.1f}")
    print("seed  wall_s  iters  s/iter  claimed_A  truth0.5_A  ratio  nyq_A  claimed/nyq")
    for seed in seeds_of(a.seeds):
        stk, src = make_source(a.n, a.box, a.mol, a.snr, seed)
        px = src.pixel_size_a
        truth = density_map(molecule(a.mol), a.box, px)
        p = Refine3DParams(ini_high_a=a.ini_high, particle_diameter_a=0.85 * a.box * px,
                           symmetry=a.sym, offset_range_px=3, offset_step_px=1, seed=seed)
        t0 = time.perf_counter()
        r = Refine3D(src, truth, p)
        while not r.done:
            info = r.iterate()
            if a.verbose:
                # the claim of this iteration against the truth, so a run cut short still
                # tells whether the half-map FSC over-states the resolution
                now = resolution_at_threshold(fsc(r.result().combined, truth), a.box, px, 0.5)
                print(f"  it {info.iteration}: claimed {info.resolution_a:.2f} A, truth FSC0.5 "
                      f"{now:.2f} A (ratio {info.resolution_a / now:.2f}), step "
                      f"{info.step_deg:.2f} deg{' local' if info.local else ''}, r_max "
                      f"{info.r_max:.0f}, change {info.angle_change_deg:.2f} deg, "
                      f"{info.seconds:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
        res = r.result()
        wall = time.perf_counter() - t0
        vt = resolution_at_threshold(fsc(res.combined, truth), a.box, px, 0.5)
        nyq = 2 * px
        print(f"{seed:4d}  {wall:6.0f}  {len(res.history):5d}  {wall / len(res.history):6.1f}  "
              f"{res.resolution_a:9.2f}  {vt:10.2f}  {res.resolution_a / vt:5.2f}  {nyq:5.2f}  "
              f"{res.resolution_a / nyq:6.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["inimodel", "refine", "evaluate"])
    ap.add_argument("--mol", default="asym")
    ap.add_argument("--sym", default="C1")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--k", type=int, default=3,
                    help="initial-model classes (the job's nr_classes default: 3; the largest is kept)")
    ap.add_argument("--ini-high", type=float, default=30.0)
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--save", default="", help="folder for each seed's maps (MRC): the model "
                    "as found, and the truth")
    a = ap.parse_args()
    {"inimodel": bench_inimodel, "refine": bench_refine, "evaluate": bench_evaluate}[a.what](a)


if __name__ == "__main__":
    main()
