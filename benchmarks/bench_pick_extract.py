"""Benchmark: LoG picking + extraction of 4096² micrographs against simulated ground truth.

For particle diameters of about 130, 180 and 320 Å (the simulator's ribosome-like particle
scaled to each size, so its mass matches a compact protein), simulate realistic micrographs
(1 Å/px, 40 e/Å², defocus 0.8–2.5 µm, ice texture and thickness variation, a carbon edge,
aggregates and ice blobs), then time ``pick_log`` (relion_it range 0.8–1.1 × diameter) and
``extract_particles`` (relion_it box and down-scaled box, float16 conversion included) and
score the picks:

- precision / recall: a pick is right within 0.2 × diameter of a true single particle
  (the simulator's kind "particle"; each matched once); picks on aggregates count as wrong;
  ``rec.iso`` is the recall over singles with no other object within one diameter,
  ``rec.carbon`` over singles whose centre is within half a diameter of the carbon edge
  (they overlap it; the simulator puts centres anywhere in the hole);
- junk not picked: aggregate centres, ice-blob centres and points along the carbon edge with
  no wrong pick within 0.5 × diameter, per kind and combined (issue 6 asks ≥ 80 % per kind).

Anchor (issue 6): RELION 4.0's LoG picker, 12 s per 4096² micrograph, precision 0.88.
Goal: ≤ 3 s for picking + extraction with precision at least as good.

Usage::

    .venv/bin/python benchmarks/bench_pick_extract.py [--n 3] [--size 4096] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compute import backend as be  # noqa: E402
from compute.extract import box_sizes, extract_particles  # noqa: E402
from compute.pick import LogPickerSettings, match_picks, pick_log  # noqa: E402
from compute.simulate.micrograph import simulate_micrograph  # noqa: E402
from compute.simulate.molecules import Molecule, molecule  # noqa: E402


def globular(diameter_a: float) -> Molecule:
    m = molecule("ribosome")
    f = diameter_a / m.diameter_a
    return Molecule(f"globular{diameter_a:g}", m.coords_a * f, m.weights * f**3, m.sigma_a * f)


def junk_points(truth, shape) -> dict[str, list[tuple[float, float]]]:
    p = truth.particles
    out: dict[str, list[tuple[float, float]]] = {"aggregate": [], "ice": [], "carbon": []}
    agg = p["kind"] == "aggregate"
    for g in np.unique(p["group"][agg]):
        sel = p["group"] == g
        out["aggregate"].append((p["x_px"][sel].mean(), p["y_px"][sel].mean()))
    out["ice"] = [(bx, by) for bx, by, _ in truth.ice_blobs]
    c = truth.carbon
    if c is not None:
        pts = [(c.centre_x_px + c.radius_px * np.cos(t), c.centre_y_px + c.radius_px * np.sin(t))
               for t in np.linspace(0, 2 * np.pi, 4 * 1440, endpoint=False)]
        pts = [(x, y) for x, y in pts if 0 <= x < shape[1] and 0 <= y < shape[0]]
        out["carbon"] = pts[:: max(1, len(pts) // 20)]
    return out


def run_one(d: float, size: int, px: float, seed: int, spacing: float | None = None) -> dict:
    fill = 0.2 * (size * px) ** 2 / (np.pi * (d / 2) ** 2)
    t0 = time.perf_counter()
    mg = simulate_micrograph(size, pixel_size_a=px, molecules=[globular(d)],
                             n_particles=int(fill), carbon=True, n_aggregates=3, n_ice_blobs=2,
                             seed=seed,
                             min_distance_a=None if spacing is None else spacing * d)
    t_sim = time.perf_counter() - t0
    tr = mg.truth
    img = mg.image.astype(np.float16).astype(np.float32)  # as read from a float16 MRC
    s = LogPickerSettings(0.8 * d, 1.1 * d)
    t0 = time.perf_counter()
    picks = pick_log(img, px, s, ctf=tr.ctf)
    t_pick = time.perf_counter() - t0
    b = box_sizes(d, px)
    t0 = time.perf_counter()
    ex = extract_particles(img, picks.x_px, picks.y_px, b.box_px, px, rescale_box=b.small_box_px)
    stack16 = be.to_numpy(ex.stack).astype(np.float16)
    t_ext = time.perf_counter() - t0
    single = tr.single_particles()
    txy = np.stack([tr.particles["x_px"][single], tr.particles["y_px"][single]], axis=1)
    xy = np.stack([picks.x_px, picks.y_px], axis=1)
    tp, n_picks, n_true = match_picks(xy, txy, 0.2 * d / px)
    # isolated: no other object (particle or aggregate member) within one diameter
    allxy = np.stack([tr.particles["x_px"], tr.particles["y_px"]], axis=1)
    nn = np.array([np.sort(np.hypot(*(allxy - q).T))[1] if len(allxy) > 1 else np.inf
                   for q in txy])
    iso = txy[nn >= d / px]
    tp_iso = match_picks(xy, iso, 0.2 * d / px)[0]
    # singles overlapping the carbon edge (centre within half a diameter of it)
    c = tr.carbon
    on_edge = (np.abs(np.hypot(txy[:, 0] - c.centre_x_px, txy[:, 1] - c.centre_y_px) - c.radius_px)
               < 0.5 * d / px) if c is not None else np.zeros(len(txy), bool)
    tp_edge = match_picks(xy, txy[on_edge], 0.2 * d / px)[0]
    good = (np.array([np.hypot(*(txy - q).T).min() < 0.2 * d / px for q in xy])
            if len(xy) and len(txy) else np.zeros(len(xy), bool))
    bad = xy[~good]
    junk = {}
    for kind, pts in junk_points(tr, img.shape).items():
        hit = [len(bad) > 0 and float(np.hypot(*(bad - np.array(q)).T).min()) < 0.5 * d / px
               for q in pts]
        junk[kind] = (len(pts) - int(np.sum(hit)), len(pts))
    return dict(d=d, seed=seed, t_sim=t_sim, t_pick=t_pick, t_ext=t_ext, tp=tp, picks=n_picks,
                true=n_true, tp_iso=tp_iso, n_iso=len(iso), tp_edge=tp_edge,
                n_edge=int(on_edge.sum()), junk=junk, n_stack=len(stack16), box=b.box_px, small=b.small_box_px)


def extraction_quality(d: float, px: float = 1.0, size: int = 2048) -> dict:
    """Background statistics and centring of particles extracted at the true positions."""
    from compute.fourier import radius_grid

    kw = dict(pixel_size_a=px, molecules=[globular(d)], n_particles=60, seed=7,
              min_distance_a=2.2 * d)
    b = box_sizes(d, px)
    mg = simulate_micrograph(size, **kw)
    t = mg.truth.particles
    ex = extract_particles(mg.image, t["x_px"], t["y_px"], b.box_px, px,
                          rescale_box=b.small_box_px)
    st = be.to_numpy(ex.stack)
    r = radius_grid(st.shape[1:])
    bg = st[:, r > (d / 2) / ex.pixel_size_a]
    clean = simulate_micrograph(size, noise=False, thon_contrast=0.0, ice_variation=0.0,
                                gradient=0.0, defocus_um=0.5, astigmatism_a=0.0,
                                phase_shift_deg=90.0, **kw)
    tc = clean.truth.particles
    ec = be.to_numpy(extract_particles(clean.image, tc["x_px"], tc["y_px"], b.box_px, px,
                                       rescale_box=b.small_box_px).stack)
    n = b.small_box_px
    inside = radius_grid((n, n)) <= 0.75 * n / 2
    yy, xx = np.mgrid[0:n, 0:n]
    err = []
    for img in ec:
        w = np.where(inside, img, 0.0)
        err.append(np.hypot((w * yy).sum() / w.sum() - n // 2, (w * xx).sum() / w.sum() - n // 2))
    return dict(n=len(st), bg_mean=float(bg.mean()), bg_std=float(bg.std()),
                per_particle_mean_max=float(np.abs(bg.mean(axis=1)).max()),
                centre_err_median=float(np.median(err)), centre_err_max=float(np.max(err)),
                box=b.box_px, small=n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3, help="micrographs per diameter")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--pixel", type=float, default=1.0, help="pixel size (Å)")
    ap.add_argument("--threads", type=int, default=None, help="FFT threads (default: all)")
    ap.add_argument("--diameters", default="130,180,320")
    ap.add_argument("--seed0", type=int, default=0, help="first simulation seed")
    ap.add_argument("--spacing", type=float, default=None,
                    help="closest centre distance in diameters (default: the simulator's 0.9; "
                         "1.0 = particles never overlap)")
    a = ap.parse_args()
    if a.threads:
        be.set_workers(a.threads)
    print(f"# {a.size}² micrographs at {a.pixel} Å/px, {a.n} per diameter, FFT threads "
          f"{be.n_workers()}, {os.cpu_count()} CPUs")
    print(f"{'diam':>5} {'seed':>4} {'true':>5} {'picks':>5} {'prec':>6} {'recall':>6} "
          f"{'rec.iso':>7} {'rec.carbon':>10} "
          f"{'pick s':>7} {'extr s':>7} {'total s':>7}  junk not picked (agg, ice, carbon)")
    quality = []
    for d in (float(x) for x in a.diameters.split(",")):
        rows = [run_one(d, a.size, a.pixel, seed, a.spacing)
                for seed in range(a.seed0, a.seed0 + a.n)]
        for r in rows:
            j = r["junk"]
            print(f"{d:5.0f} {r['seed']:4d} {r['true']:5d} {r['picks']:5d} "
                  f"{r['tp'] / max(r['picks'], 1):6.3f} {r['tp'] / max(r['true'], 1):6.3f} "
                  f"{r['tp_iso'] / max(r['n_iso'], 1):7.3f} "
                  f"{r['tp_edge']:4d}/{r['n_edge']:<5d} "
                  f"{r['t_pick']:7.2f} {r['t_ext']:7.2f} {r['t_pick'] + r['t_ext']:7.2f}  "
                  f"{j['aggregate'][0]}/{j['aggregate'][1]}, {j['ice'][0]}/{j['ice'][1]}, "
                  f"{j['carbon'][0]}/{j['carbon'][1]}   (box {r['box']}->{r['small']})")
        tp = sum(r["tp"] for r in rows)
        npk = sum(r["picks"] for r in rows)
        nt = sum(r["true"] for r in rows)
        kinds = {k: (sum(r["junk"][k][0] for r in rows), sum(r["junk"][k][1] for r in rows))
                 for k in ("aggregate", "ice", "carbon")}
        jn = sum(sum(v[0] for v in r["junk"].values()) for r in rows)
        jt = sum(sum(v[1] for v in r["junk"].values()) for r in rows)
        tt = np.mean([r["t_pick"] + r["t_ext"] for r in rows])
        ti = sum(r["tp_iso"] for r in rows)
        ni = sum(r["n_iso"] for r in rows)
        te = sum(r["tp_edge"] for r in rows)
        ne = sum(r["n_edge"] for r in rows)
        q = extraction_quality(d, a.pixel)
        quality.append((d, q))
        print(f"{d:5.0f}  all {nt:5d} {npk:5d} {tp / max(npk, 1):6.3f} {tp / max(nt, 1):6.3f} "
              f"{ti / max(ni, 1):7.3f} {te:4d}/{ne:<5d} "
              f"{np.mean([r['t_pick'] for r in rows]):7.2f} "
              f"{np.mean([r['t_ext'] for r in rows]):7.2f} {tt:7.2f}  "
              f"junk not picked {jn}/{jt} = {jn / max(jt, 1):.2f}; per kind "
              + ", ".join(f"{k} {a}/{b} = {a / max(b, 1):.2f}" for k, (a, b) in kinds.items()))
    print("\n# extraction at the true positions (2048², relion_it boxes, down-scaled)")
    print(f"{'diam':>5} {'box':>9} {'n':>4} {'bg mean':>8} {'bg std':>7} {'max |mean|/ptcl':>15} "
          f"{'centre err median/max (px, small box)':>38}")
    for d, q in quality:
        print(f"{d:5.0f} {q['box']:4d}->{q['small']:<4d} {q['n']:4d} {q['bg_mean']:8.4f} "
              f"{q['bg_std']:7.4f} {q['per_particle_mean_max']:15.2e} "
              f"{q['centre_err_median']:18.2f} / {q['centre_err_max']:.2f}")


if __name__ == "__main__":
    main()
