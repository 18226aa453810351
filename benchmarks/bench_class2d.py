"""2D classification acceptance runs (issue 7): quality against ground truth, speed, memory.

Plain Python, prints a table. Sets (pick with --set, default: standard anchor):

- ``standard``: 10,000 particles of 64 px at 4 A/px, three molecules (asym, c4ring, d2) plus
  20 % junk, SNR 0.1, defocus 0.8-3 um; K = 50, 200 VDAM mini-batches (replacement on and
  off) and 25 EM iterations.
- ``anchor``: 5,000 70S-ribosome-like particles of 64 px at 5.08 A/px, K = 20, psi 12 deg,
  offsets +-5 px in steps of 2; 200 VDAM mini-batches and 25 EM iterations (RELION 4.0 CPU,
  2 threads, on this machine kind: 875 s VDAM, 1,293 s EM).
- ``memory``: 100,000 particles of 64 px (float16 stack on disk, memory-mapped), K = 100:
  peak resident memory of the class2d job over a few mini-batches.

Usage::

    .venv/bin/python benchmarks/bench_class2d.py --set anchor [--n 5000] [--iters 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compute.geometry import projection_direction  # noqa: E402
from compute.simulate.particles import simulate_particles  # noqa: E402
from compute.vdam.classify2d import ArraySource, Classify2D, Classify2DParams  # noqa: E402
from compute.vdam.estep2d import CtfBatch  # noqa: E402


def ctf_of(truth) -> CtfBatch:
    c = truth.ctf
    n = len(truth)
    return CtfBatch(c.defocus_u_a, c.defocus_v_a, c.defocus_angle_deg, np.full(n, c.voltage_kv),
                    np.full(n, c.cs_mm), np.full(n, c.amplitude_contrast), c.phase_shift_deg,
                    c.bfactor_a2)


def run(src, params, label):
    clf = Classify2D(src, params)
    t0 = time.perf_counter()
    c0 = time.process_time()
    clf.initialise()
    # CPU seconds and particle visits per phase (cost per visit: VDAM vs EM)
    phases: dict[str, list[float]] = {}
    n_replaced = 0
    while not clf.done:
        c1 = time.process_time()
        info = clf.step()
        ph = phases.setdefault(info.phase, [0.0, 0])
        ph[0] += time.process_time() - c1
        ph[1] += info.batch_size
        n_replaced += len(info.replaced)
    if not params.use_em:
        c1 = time.process_time()
        clf.final_pass()
        phases["final pass"] = [time.process_time() - c1, clf.source.n_particles]
    wall = time.perf_counter() - t0
    clf.cpu_seconds = time.process_time() - c0
    visits = sum(v[1] for v in phases.values())
    print(f"  {label}: {visits} particle visits, {n_replaced} class replacements; CPU ms per "
          "visit by phase: " + ", ".join(f"{k} {1000 * c / max(n, 1):.2f} ({n} visits)"
                                        for k, (c, n) in phases.items()), flush=True)
    print(f"  {label}: {wall:.0f} s wall, {clf.cpu_seconds:.0f} s CPU (all threads; the "
          f"machine is shared, so CPU time is the figure to compare), "
          f"E-step {clf.estep_seconds:.0f} s wall "
          f"({100 * clf.estep_seconds / wall:.0f} %), final r_max {clf.r_max:.0f} shells; "
          f"E-step parts: " + ", ".join(f"{k} {v:.0f}" for k, v in clf.estep.timings.items()),
          flush=True)
    return clf, wall


def rotate_to_reference(img, psi_deg):
    """ref(r) = img(A r): undo the in-plane rotation of a centred projection."""
    from scipy.ndimage import map_coordinates

    n = img.shape[0]
    yy, xx = np.mgrid[:n, :n].astype(np.float64) - n // 2
    c, s = np.cos(np.deg2rad(psi_deg)), np.sin(np.deg2rad(psi_deg))
    sx = c * xx + s * yy
    sy = -s * xx + c * yy
    return map_coordinates(img, [sy + n // 2, sx + n // 2], order=1, mode="constant")


def best_shift_corr(a, b, mask, max_shift=4):
    """Max normalised correlation of a and b (masked) over integer shifts up to max_shift."""
    best = -1.0
    am = (a - a[mask > 0.5].mean()) * mask
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            bs = np.roll(b, (dy, dx), axis=(0, 1))
            bm = (bs - bs[mask > 0.5].mean()) * mask
            c = float((am * bm).sum() / np.sqrt((am * am).sum() * (bm * bm).sum() + 1e-30))
            best = max(best, c)
    return best


def quality(clf, truth, clean_centred, n_check=400, seed=0):
    """Acceptance figures against the simulator's ground truth."""
    from compute.fourier import lowpass

    res = clf.results
    cls = res.class_index
    n = len(cls)
    K = clf.params.n_classes
    good = ~truth.is_junk
    mols = np.where(good, truth.molecule, "junk")
    classes = clf.class_images()
    mask = np.asarray(clf.estep.mask)
    # 1. good particles whose class average correlates >= 0.8 with their own true projection
    rng = np.random.default_rng(seed)
    idx = rng.choice(np.nonzero(good & (cls >= 0))[0], size=min(n_check, int(good.sum())),
                     replace=False)
    res_a = clf.class_resolution_a()
    ok = 0
    for i in idx:
        k = cls[i]
        lp = max(res_a[k], 2.5 * truth.pixel_size_a)
        ref = lowpass(classes[k], lp, truth.pixel_size_a)
        proj = rotate_to_reference(clean_centred[i], res.psi_deg[i])
        proj = lowpass(proj.astype(np.float32), lp, truth.pixel_size_a)
        ok += best_shift_corr(ref, proj, mask) >= 0.8
    frac_good_classes = ok / len(idx)
    # 2. purity
    big = [k for k in range(K) if (cls == k).sum() >= 0.01 * n]
    pure, junky, junk_in_junk_classes, contam = purity(cls, mols, big, K, truth.kind)
    # the same with `neighbour` images (a centred molecule with neighbours cut by the box
    # edge) counted as their molecule rather than as junk (docs/class2d.md, "Purity")
    nb = truth.kind == "neighbour"
    mols_nb = np.where(good | nb, truth.molecule, "junk")
    pure_nb, _, junk_nb, _ = purity(cls, mols_nb, big, K, truth.kind)
    empty = int(sum((cls == k).sum() == 0 for k in range(K)))
    # 3. view and psi consistency per class (ground-truth grouping)
    dirs = projection_direction(truth.rot_deg, truth.tilt_deg)
    view_spread, psi_spread = [], []
    for k in big:
        sel = (cls == k) & good
        if sel.sum() < 10:
            continue
        d = dirs[sel]
        mean = d.mean(0)
        mean /= np.linalg.norm(mean) + 1e-12
        view_spread.append(np.rad2deg(np.arccos(np.clip(d @ mean, -1, 1))).mean())
        dpsi = np.deg2rad(truth.psi_deg[sel] - res.psi_deg[sel])
        r = np.abs(np.mean(np.exp(1j * dpsi)))
        psi_spread.append(np.rad2deg(np.sqrt(-2 * np.log(max(r, 1e-9)))))
    return {
        "good_in_matching_classes": frac_good_classes,
        "n_big_classes": len(big),
        "min_purity_good_classes": min(pure) if pure else float("nan"),
        "frac_classes_pure90": float(np.mean(np.array(pure) >= 0.9)) if pure else float("nan"),
        "junk_in_junk_classes": junk_in_junk_classes,
        "junk_kinds_in_molecule_classes": contam,
        "frac_classes_pure90_neighbour_as_molecule":
            float(np.mean(np.array(pure_nb) >= 0.9)) if pure_nb else float("nan"),
        "min_purity_neighbour_as_molecule": min(pure_nb) if pure_nb else float("nan"),
        "junk_in_junk_classes_neighbour_as_molecule": junk_nb,
        "min_junk_frac_junk_classes": min(junky) if junky else float("nan"),
        "empty_classes": empty,
        "empty_frac": empty / K,
        "view_spread_deg": float(np.mean(view_spread)) if view_spread else float("nan"),
        "psi_spread_deg": float(np.mean(psi_spread)) if psi_spread else float("nan"),
    }


def purity(cls, mols, big, K, kinds):
    """Purity of the big classes against the labels ``mols`` (a molecule name or "junk").

    Returns (majority fraction of each molecule-majority class, of each junk-majority class,
    fraction of the junk in classes that are >= 70 % junk, {junk kind: number of such
    particles in molecule-majority big classes}).
    """
    pure, junky = [], []
    contam: dict[str, int] = {}
    for k in big:
        in_k = cls == k
        names, counts = np.unique(mols[in_k], return_counts=True)
        top = names[np.argmax(counts)]
        if top == "junk":
            junky.append(counts.max() / counts.sum())
        else:
            pure.append(counts.max() / counts.sum())
            for kind in kinds[in_k & (mols == "junk")]:
                contam[str(kind)] = contam.get(str(kind), 0) + 1
    junk = mols == "junk"
    jc = [k for k in range(K) if (cls == k).any() and np.mean(junk[cls == k]) >= 0.7]
    junk_in_junk_classes = float(np.isin(cls[junk], jc).mean()) if junk.any() else 0.0
    return pure, junky, junk_in_junk_classes, dict(sorted(contam.items()))


def simulate(n, mols, px, junk, snr, seed, cache=None):
    """The particle stack and the clean centred projections (pickled to ``cache`` if given)."""
    import pickle

    if cache and Path(cache).exists():
        with open(cache, "rb") as fh:
            st, clean, key = pickle.load(fh)
        if key == (n, tuple(mols), px, junk, snr, seed):
            print(f"  simulated set read from {cache}", flush=True)
            return st, clean
    t0 = time.perf_counter()
    st = simulate_particles(n, mols, box=64, pixel_size_a=px, junk_fraction=junk, snr=snr,
                            defocus_um=(0.8, 3.0), seed=seed)
    tr = st.truth
    good = ~tr.is_junk
    # noise-free, CTF-free, centred projections of the good particles (their own views)
    clean = np.zeros_like(st.images)
    for name in np.unique(tr.molecule[good]):
        sel = np.nonzero(good & (tr.molecule == name))[0]
        rots = np.stack([tr.rot_deg[sel], tr.tilt_deg[sel], tr.psi_deg[sel]], 1)
        c = simulate_particles(len(sel), (str(name),), box=64, pixel_size_a=px, snr=1e12,
                               rotations=rots, origins_a=np.zeros((len(sel), 2)),
                               apply_ctf=False, seed=seed + 1)
        clean[sel] = c.images
    print(f"  simulated {n} particles in {time.perf_counter() - t0:.0f} s", flush=True)
    if cache:
        with open(cache, "wb") as fh:
            pickle.dump((st, clean, (n, tuple(mols), px, junk, snr, seed)), fh)
    return st, clean


def load_note():
    la = os.getloadavg()
    return f"load average {la[0]:.1f} {la[1]:.1f} {la[2]:.1f} on {os.cpu_count()} cores"


def bench_standard(args):
    print(f"standard set: {args.n} particles, K={args.k}, {args.iters} mini-batches "
          f"({load_note()})", flush=True)
    st, clean = simulate(args.n, ("asym", "c4ring", "d2"), 4.0, 0.2, args.snr, 1, args.cache)
    src = ArraySource(st.images, 4.0, ctf_of(st.truth))
    base = dict(n_classes=args.k, n_iter=args.iters, particle_diameter_a=160,
                psi_step_deg=args.psi, offset_range_px=5, offset_step_px=args.step, seed=1)
    rows = []
    for label, extra in (("VDAM", {}), ("VDAM no replacement", {"inactivity_threshold": 0.0}),
                         ("VDAM no resolution cap", {"grad_ini_resol_a": None,
                                                     "grad_fin_resol_a": None}),
                         ("EM", {"use_em": True, "n_iter_em": args.em_iters})):
        if label == "VDAM no replacement" and args.skip_noreplace:
            continue
        if args.runs and label not in args.runs.split(","):
            continue
        clf, wall = run(src, Classify2DParams(**base, **extra), label)
        q = quality(clf, st.truth, clean)
        q["cpu_s"] = clf.cpu_seconds
        rows.append((label, wall, clf.estep_seconds, q))
        print(f"    {q}", flush=True)
    table(rows)


def bench_anchor(args):
    print(f"anchor: {args.n} ribosome particles 64 px 5.08 A/px, K={args.k}, psi 12, "
          f"offsets +-5 step 2 ({load_note()})", flush=True)
    st, clean = simulate(args.n, ("ribosome",), 5.08, 0.0, args.snr, 2, args.cache)
    src = ArraySource(st.images, 5.08, ctf_of(st.truth))
    base = dict(n_classes=args.k, n_iter=args.iters, particle_diameter_a=260, psi_step_deg=12,
                offset_range_px=5, offset_step_px=2, seed=1)
    rows = []
    for label, extra, relion in (("VDAM", {}, 875.0),
                                 ("EM", {"use_em": True, "n_iter_em": args.em_iters}, 1293.0)):
        clf, wall = run(src, Classify2DParams(**base, **extra), label)
        q = quality(clf, st.truth, clean)
        q["relion_s"] = relion
        q["cpu_s"] = clf.cpu_seconds
        rows.append((label, wall, clf.estep_seconds, q))
        print(f"    {q}", flush=True)
    table(rows)


def bench_memory(args):
    import pandas as pd

    from metadata.images import write_mrc
    from metadata.star import write_star

    n = args.n
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        stack = root / "parts.mrcs"
        chunk = 10_000
        data = np.empty((n, 64, 64), dtype=np.float16)
        for c0 in range(0, n, chunk):
            data[c0:c0 + chunk] = rng.standard_normal((min(chunk, n - c0), 64, 64))
        write_mrc(stack, data, pixel_size_a=4.0, float16=True)
        del data
        rows = pd.DataFrame({
            "rlnImageName": [f"{i + 1:06d}@parts.mrcs" for i in range(n)],
            "rlnOpticsGroup": 1, "rlnDefocusU": rng.uniform(8000, 30000, n),
            "rlnDefocusV": rng.uniform(8000, 30000, n), "rlnDefocusAngle": 0.0})
        optics = pd.DataFrame({"rlnOpticsGroupName": ["g1"], "rlnOpticsGroup": [1],
                               "rlnImagePixelSize": [4.0], "rlnImageSize": [64],
                               "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                               "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
        write_star(root / "particles.star", {"optics": optics, "particles": rows})
        del rows
        # the job runs in its own process, as the executors run it, so its peak RSS is its own
        import subprocess

        t0 = time.perf_counter()
        cmd = [sys.executable, "-c", "import sys; from app.cli import run; sys.exit(run(sys.argv[1:]))",
               "job", "class2d", "--o", "Class2D/job001", "--fn_img", "particles.star",
               "--nr_classes", str(args.k), "--nr_iter_grad", str(args.iters),
               "--particle_diameter", "160", "--psi_sampling", "12", "--offset_range", "5",
               "--offset_step", "2"]
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # VmHWM of the job itself (ru_maxrss of children would include the pre-exec fork of
        # this process, which holds the generated stack)
        peak, anon = 0, 0
        while proc.poll() is None:
            try:
                st = dict(line.split(":", 1) for line in
                          Path(f"/proc/{proc.pid}/status").read_text().splitlines() if ":" in line)
                peak = max(peak, int(st["VmHWM"].split()[0]) // 1024)
                anon = max(anon, int(st.get("RssAnon", "0 kB").split()[0]) // 1024)
            except (OSError, KeyError, ValueError):
                pass
            if args.max_seconds and time.perf_counter() - t0 > args.max_seconds:
                proc.terminate()
                proc.wait()
                break
            time.sleep(1.0)
        rc = proc.returncode
        log = (root / "Class2D/job001/run.out")
        last = log.read_text().strip().splitlines()[-1] if log.exists() else ""
        print(f"memory: {n} particles, K={args.k}, {args.iters} mini-batches + final pass: "
              f"rc {rc}, {time.perf_counter() - t0:.0f} s, peak RSS of the job process "
              f"{peak} MiB (anonymous at most {anon} MiB; the rest are pages of the "
              f"memory-mapped stack, {n * 64 * 64 * 2 / 2**20:.0f} MiB on disk) "
              f"({load_note()}); last progress line: {last}")


def table(rows):
    print("\n| run | wall s | CPU s | E-step s (share) | good in matching classes | classes >=90% pure "
          "| junk in junk classes | same, neighbour = molecule | empty classes | view spread deg "
          "| psi spread deg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, wall, es, q in rows:
        print(f"| {label} | {wall:.0f} | {q['cpu_s']:.0f} | {es:.0f} ({100 * es / wall:.0f} %) "
              f"| {100 * q['good_in_matching_classes']:.0f} % "
              f"| {100 * q['frac_classes_pure90']:.0f} % (min {100 * q['min_purity_good_classes']:.0f} %) "
              f"| {100 * q['junk_in_junk_classes']:.0f} % "
              f"| {100 * q['frac_classes_pure90_neighbour_as_molecule']:.0f} % pure (min "
              f"{100 * q['min_purity_neighbour_as_molecule']:.0f} %), junk "
              f"{100 * q['junk_in_junk_classes_neighbour_as_molecule']:.0f} % "
              f"| {q['empty_classes']} "
              f"({100 * q['empty_frac']:.0f} %) | {q['view_spread_deg']:.1f} "
              f"| {q['psi_spread_deg']:.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=("standard", "anchor", "memory"), default="anchor")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--em-iters", type=int, default=25)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--psi", type=float, default=12.0)
    ap.add_argument("--step", type=float, default=2.0)
    ap.add_argument("--skip-noreplace", action="store_true")
    ap.add_argument("--runs", default="", help="standard set: comma list of runs to do "
                    "(VDAM, VDAM no replacement, VDAM no resolution cap (E-step resolution "
                    "from the FSC rule alone), EM); default all")
    ap.add_argument("--cache", default="", help="pickle the simulated set here and reuse it "
                    "when the same set is asked for again")
    ap.add_argument("--max-seconds", type=float, default=0.0,
                    help="memory set: stop the job after this long (the peak is reached early)")
    args = ap.parse_args()
    defaults = {"standard": (10_000, 50, 200), "anchor": (5_000, 20, 200),
                "memory": (100_000, 100, 3)}[args.set]
    args.n = args.n or defaults[0]
    args.k = args.k or defaults[1]
    args.iters = args.iters or defaults[2]
    {"standard": bench_standard, "anchor": bench_anchor, "memory": bench_memory}[args.set](args)


if __name__ == "__main__":
    main()
