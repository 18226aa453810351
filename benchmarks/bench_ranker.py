"""Class-ranker acceptance figures with the shipped weights (plain script, prints tables).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ranker.py [--jobs 6] [--seed 777]
        [--weights OTHER.pt]   # default: resources/ranker/ranker.pt

1. Speed: scoring 200 classes (box 128) with :class:`compute.ranker.infer.ClassRanker`
   on the CPU (features + network), best of 3.
2. Held-aside jobs: ``--jobs`` simulated 2D-classification jobs of the validation
   molecules (``c4ring``, ``d2``: never seen in training) under freshly drawn conditions
   (seed not used for training), scored through the full inference path (raw class
   averages -> features -> network). Per job: MSE against the ground-truth score and the
   particle-level FPR/FNR of selecting score >= 0.15 against ground-truth good classes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.jobs.rank_select import load_ranker  # noqa: E402
from app.ranker_training import VAL_MOLECULES, selection_rates  # noqa: E402
from compute.ranker.synth import JobConditions, random_conditions, synth_job  # noqa: E402


def bench_speed(ranker) -> float:
    cond = JobConditions(molecule="asym", pixel_size_a=1.6, box=128, diameter_a=130.0, snr=0.05,
                         n_classes=200, n_particles=100000)
    imgs, metas, _ = synth_job(cond, seed=5)
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        ranker.score(imgs, metas, cond.pixel_size_a, cond.diameter_a)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_heldout(ranker, n_jobs: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for j in range(n_jobs):
        cond = random_conditions(rng, VAL_MOLECULES)
        imgs, metas, truth = synth_job(cond, seed * 7919 + j)
        r = ranker.score(imgs, metas, cond.pixel_size_a, cond.diameter_a)
        m = r.scored
        pred = r.scores[m]
        tgt = np.array([t.score for t in truth])[m]
        good = np.array([t.good for t in truth])[m]
        n = np.array([t.n_particles for t in truth])[m]
        fpr, fnr = selection_rates(pred, good, n)
        rows.append({"job": j, "molecule": cond.molecule, "box": cond.box,
                     "px": cond.pixel_size_a, "snr": cond.snr, "classes": int(m.sum()),
                     "good": int(good.sum()), "mse": float(np.mean((pred - tgt) ** 2)),
                     "fpr": fpr, "fnr": fnr, "pred": pred, "tgt": tgt, "is_good": good, "n": n})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--weights", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    ranker = load_ranker(args.weights)
    t = bench_speed(ranker)
    print(f"scoring 200 classes (box 128, CPU, 1 thread): {t:.2f} s  (acceptance: < 5 s)")
    rows = bench_heldout(ranker, args.jobs, args.seed)
    print("\n| job | molecule | box | px (Å) | SNR | classes | GT good | MSE | FPR | FNR |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['job']} | {r['molecule']} | {r['box']} | {r['px']:.2f} | {r['snr']:.3f} | "
              f"{r['classes']} | {r['good']} | {r['mse']:.4f} | {r['fpr']:.3f} | {r['fnr']:.3f} |")
    pred = np.concatenate([r["pred"] for r in rows])
    tgt = np.concatenate([r["tgt"] for r in rows])
    good = np.concatenate([r["is_good"] for r in rows])
    n = np.concatenate([r["n"] for r in rows])
    fpr, fnr = selection_rates(pred, good, n)
    print(f"\nall {len(rows)} held-aside jobs: MSE {np.mean((pred - tgt) ** 2):.4f}, "
          f"particle FPR {fpr:.3f}, FNR {fnr:.3f} at threshold 0.15 (acceptance: both <= 0.25)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
