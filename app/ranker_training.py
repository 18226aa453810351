"""Make the class ranker's training data, train it and validate it (the files side).

Usage (the shipped weights in ``resources/ranker`` were made so; exact commands, parts,
times and load in ``resources/ranker/README.md``)::

    python -m app.ranker_training generate --split train --jobs 300 --seed 1    --out DATA
    python -m app.ranker_training generate --split dev   --jobs 16  --seed 4242 --out DATA
    python -m app.ranker_training generate --split val   --jobs 12  --seed 9001 --out DATA
    python -m app.ranker_training generate-class2d --split val --jobs 1 --seed 5 --iter 40 --out DATA
    # stage 1: from scratch (the earlier candidate weights)
    python -m app.ranker_training train --data DATA --out S1 --epochs 8 --modes features,full
    # stage 2: recentred network images, job-relative intensity features (fine-tune)
    python -m app.ranker_training train --data DATA --out S2 --epochs 3 --modes full \
        --recentre --relative-intensity --init S1/ranker.pt --lr 5e-4
    # stage 3: plus clean copies of half the training jobs (fine-tune) = shipped
    python -m app.ranker_training train --data DATA --out OUT --epochs 2 --modes full \
        --recentre --relative-intensity --clean-jobs 0.5 --init S2/ranker.pt --lr 3e-4
    # baselines with the same inputs
    python -m app.ranker_training train --data DATA --out F --epochs 8 --modes features \
        --relative-intensity --clean-jobs 0.5
    python -m app.ranker_training train --data DATA --out I --epochs 4 --modes image --recentre
    python -m app.ranker_training evaluate --data DATA --weights resources/ranker

``generate`` simulates 2D-classification jobs with :mod:`compute.ranker.synth` (class
averages of simulated particles from :mod:`compute.simulate`, with ground-truth labels)
and stores the network images, raw features and labels in ``DATA/<split>.npz``. The
training and dev splits draw from ``TRAIN_POOL`` (the built-in ``TRAIN_MOLECULES``, random
variants of them and fresh random proteins from :mod:`compute.simulate.random_molecules`);
the dev split (other seed) only chooses the epoch to keep (early stopping); the validation
split uses the held-aside ``VAL_MOLECULES`` under independently drawn conditions. ``add-jobs`` adds
labelled real classification outputs (``run_itNNN_model.star`` with ground-truth
particle labels) to a split.

``train`` fits the full network and the two baselines (features only, image only) with
``torch.set_num_threads(1)`` (one thread is fastest on this shared 2-core machine), writes ``ranker.pt`` (full model + feature statistics),
``feature_stats.json`` and ``validation.json``/``validation.md`` (MSE, particle-level
FPR/FNR at the 0.15 threshold for all three).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

log = logging.getLogger("scopeside.ranker_training")

TRAIN_MOLECULES = ["asym", "ribosome", "rod", "small"]
VAL_MOLECULES = ["c4ring", "d2"]
#: molecules drawn for the training and dev splits (:func:`compute.ranker.synth.random_conditions`):
#: a quarter built-in training molecules, a quarter random variants of them, half fresh
#: random proteins (:mod:`compute.simulate.random_molecules`; no C4 or D2 symmetry, nothing
#: derived from the validation molecules)
TRAIN_POOL = (TRAIN_MOLECULES + [f"var:{m}" for m in TRAIN_MOLECULES]
              + ["rand"] * (2 * len(TRAIN_MOLECULES)))
THRESHOLD = 0.15
#: accuracy features blanked in 25 % of training samples (scopeside's and some RELION
#: classifications write no accuracy columns)
DROP_COLUMNS = (0, 1)
CHECKPOINT_NAME = "ranker.pt"


# --- data generation -----------------------------------------------------------------------

def generate(split: str, n_jobs: int, seed: int, out: Path, molecules: list[str] | None = None,
             first: int = 0, count: int | None = None) -> Path:
    """Simulate jobs ``first … first+count-1`` of a seeded series of ``n_jobs`` and write
    ``out/<split>.npz`` (or ``<split>_<first>.npz`` for a part; :func:`load_split` joins
    the parts); returns its path. Parts can run in parallel and give the same jobs."""
    from compute.ranker.features import job_features, network_images
    from compute.ranker.synth import random_conditions, synth_job

    mols = molecules or (VAL_MOLECULES if split == "val" else TRAIN_POOL)
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {k: [] for k in ("images", "features", "scored", "target", "purity",
                                             "frc", "good", "n_particles", "job", "kind")}
    jobs = []
    t0 = time.monotonic()
    last = n_jobs if count is None else min(n_jobs, first + count)
    for j in range(last):
        cond = random_conditions(rng, mols)  # drawn for every job so parts agree
        if j < first:
            continue
        imgs, metas, truth = synth_job(cond, seed * 100003 + j)
        X, scored = job_features(imgs, metas, cond.pixel_size_a, cond.diameter_a)
        net = network_images(imgs, cond.pixel_size_a, cond.diameter_a)
        cols["images"].append(net.astype(np.float16))
        cols["features"].append(X)
        cols["scored"].append(scored)
        cols["target"].append([t.score for t in truth])
        cols["purity"].append([t.purity for t in truth])
        cols["frc"].append([t.frc_score for t in truth])
        cols["good"].append([t.good for t in truth])
        cols["n_particles"].append([m.n_particles for m in metas])
        cols["job"].append([j] * len(truth))
        cols["kind"].append([t.kind for t in truth])
        c = asdict(cond)
        jobs.append(c)
        log.info("%s job %d/%d: %s box %d px %.2f SNR %.3f, %d classes (%.0f s)", split, j + 1,
                 n_jobs, cond.molecule, cond.box, cond.pixel_size_a, cond.snr, len(truth),
                 time.monotonic() - t0)
    out.mkdir(parents=True, exist_ok=True)
    part = "" if (first == 0 and last == n_jobs) else f"_{first:04d}"
    path = out / f"{split}{part}.npz"
    np.savez_compressed(
        path, images=np.concatenate(cols["images"]), features=np.concatenate(cols["features"]),
        scored=np.concatenate(cols["scored"]),
        **{k: np.concatenate([np.asarray(v) for v in cols[k]])
           for k in ("target", "purity", "frc", "good", "n_particles", "job", "kind")})
    (out / f"{split}{part}_jobs.json").write_text(json.dumps(jobs, indent=1), encoding="utf-8")
    return path


#: particle kinds of compute.simulate.particles counted as correctly picked molecules
GOOD_PARTICLE_KINDS = ("particle", "neighbour")


def class2d_job(seed: int, molecule: str, snr: float, junk_fraction: float, n_particles: int,
                n_classes: int, n_iter: int, box: int = 64):
    """Run scopeside's own VDAM 2D classification on a simulated stack and label its classes.

    Returns (class images, ClassMeta list, ClassTruth list, pixel size, diameter). The
    classification reports no accuracies, so those metadata are ``None`` (as for any
    classification without accuracy columns).
    """
    from compute.ranker.features import ClassMeta
    from compute.ranker.synth import ClassTruth, best_match_frc, target_score
    from compute.simulate.molecules import density_map
    from compute.simulate.molecules import molecule as get_molecule
    from compute.simulate.particles import simulate_particles
    from compute.simulate.project import Projector
    from compute.vdam.classify2d import ArraySource, Classify2D, Classify2DParams
    from compute.vdam.estep2d import CtfBatch

    mol = get_molecule(molecule)
    stack = simulate_particles(n_particles, [molecule], box=box, junk_fraction=junk_fraction,
                               snr=snr, seed=seed)
    tr = stack.truth
    px = tr.pixel_size_a
    n = len(tr)
    c = tr.ctf
    ctfb = CtfBatch(c.defocus_u_a, c.defocus_v_a, c.defocus_angle_deg,
                    np.full(n, c.voltage_kv), np.full(n, c.cs_mm), np.full(n, c.amplitude_contrast),
                    c.phase_shift_deg, c.bfactor_a2)
    diameter = 1.1 * mol.diameter_a
    clf = Classify2D(ArraySource(np.asarray(stack.images), px, ctfb),
                     Classify2DParams(n_classes=n_classes, n_iter=n_iter,
                                      particle_diameter_a=diameter, seed=seed))
    clf.initialise()
    while not clf.done:
        clf.step()
    res = clf.final_pass()
    imgs = clf.class_images()
    cres = clf.class_resolution_a()
    cls = res.class_index
    good_particle = np.isin(tr.kind, GOOD_PARTICLE_KINDS)
    proj = Projector(density_map(mol, box, px))
    rots = tr.rotations()
    metas, truth = [], []
    rng = np.random.default_rng(seed)
    for k in range(n_classes):
        members = np.flatnonzero(cls == k)
        cnt = members.size
        metas.append(ClassMeta(float(cnt), None, None,
                               float(cres[k]) if np.isfinite(cres[k]) else None))
        if cnt == 0:
            truth.append(ClassTruth("class2d", 0, 0.0, 0.0, 0.0))
            continue
        purity = float(good_particle[members].mean())
        oriented = members[good_particle[members] & np.isfinite(rots[members, 0, 0])]
        if oriented.size:
            pick = rng.choice(oriented, size=min(8, oriented.size), replace=False)
            refs = proj.project(rots[pick]) * np.asarray(clf.estep.mask)
            frc = best_match_frc(imgs[k], np.asarray(refs), px, diameter)
        else:
            frc = 0.0
        truth.append(ClassTruth("class2d", int(cnt), purity, frc, target_score(purity, frc)))
    return imgs, metas, truth, px, diameter


def generate_class2d(split: str, n_jobs: int, seed: int, out: Path, n_iter: int,
                     molecules: list[str] | None = None) -> Path:
    """Real 2D classifications of simulated stacks -> ``out/class2d_<split>.npz``."""
    from compute.ranker.features import job_features, network_images

    mols = molecules or (TRAIN_MOLECULES if split == "train" else VAL_MOLECULES)
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {k: [] for k in ("images", "features", "scored", "target", "purity",
                                             "frc", "good", "n_particles", "job", "kind")}
    t0 = time.monotonic()
    for j in range(n_jobs):
        mol = str(mols[j % len(mols)])
        snr = float(np.exp(rng.uniform(np.log(0.02), np.log(0.2))))
        junk = float(rng.uniform(0.15, 0.6))
        imgs, metas, truth, px, diam = class2d_job(seed * 1000 + j, mol, snr, junk,
                                                   int(rng.integers(1500, 3000)),
                                                   int(rng.integers(10, 20)), n_iter)
        X, scored = job_features(imgs, metas, px, diam)
        cols["images"].append(network_images(imgs, px, diam).astype(np.float16))
        cols["features"].append(X)
        cols["scored"].append(scored)
        for key, vals in (("target", [t.score for t in truth]),
                          ("purity", [t.purity for t in truth]),
                          ("frc", [t.frc_score for t in truth]),
                          ("good", [t.good for t in truth]),
                          ("n_particles", [m.n_particles for m in metas]),
                          ("job", [10000 + j] * len(truth)), ("kind", [t.kind for t in truth])):
            cols[key].append(vals)
        log.info("class2d %s job %d/%d: %s SNR %.3f junk %.2f, %d classes, %d good (%.0f s)",
                 split, j + 1, n_jobs, mol, snr, junk, len(truth),
                 sum(t.good for t in truth), time.monotonic() - t0)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"class2d_{split}.npz"
    np.savez_compressed(
        path, images=np.concatenate(cols["images"]), features=np.concatenate(cols["features"]),
        scored=np.concatenate(cols["scored"]),
        **{k: np.concatenate([np.asarray(v) for v in cols[k]])
           for k in ("target", "purity", "frc", "good", "n_particles", "job", "kind")})
    return path


def _has_split(data_dir: Path, split: str) -> bool:
    return (data_dir / f"{split}.npz").is_file() or any(data_dir.glob(f"{split}_[0-9]*.npz"))


def load_split(path: Path) -> dict[str, np.ndarray]:
    """Scored classes of ``path`` (or of its parts ``<stem>_NNNN.npz``), labels recomputed."""
    parts = [path] if path.is_file() else sorted(path.parent.glob(f"{path.stem}_[0-9]*.npz"))
    if not parts:
        raise FileNotFoundError(path)
    chunks = []
    for p in parts:
        with np.load(p, allow_pickle=False) as d:
            chunks.append({k: d[k] for k in d.files})
    data = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    keep = data["scored"].astype(bool)
    out = {k: v[keep] for k, v in data.items()}
    # labels from the stored ground truth with the current definition
    from compute.ranker.synth import GOOD_FRC, GOOD_PURITY, target_score

    out["target"] = target_score(out["purity"], out["frc"]).astype(np.float32)
    out["good"] = (out["purity"] >= GOOD_PURITY) & (out["frc"] >= GOOD_FRC)
    return out


#: a class average in particle units (noise sigma 1) whose 25 Å low-pass peaks above this
#: in most classes of a job is not physical (noise amplified where the CTF envelope died)
MAX_MEDIAN_LP_MAX = 5.0


def drop_broken_jobs(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop jobs whose median ``lp_max`` exceeds ``MAX_MEDIAN_LP_MAX`` (a data sanity check;
    data made before the Wiener floor in :mod:`compute.ranker.synth` had a few)."""
    from compute.ranker.features import FEATURE_NAMES

    col = data["features"][:, FEATURE_NAMES.index("lp_max")]
    bad = [j for j in np.unique(data["job"])
           if np.median(col[data["job"] == j]) > MAX_MEDIAN_LP_MAX]
    if bad:
        log.warning("dropping %d job(s) with non-physical class averages: %s", len(bad), bad)
    keep = ~np.isin(data["job"], bad)
    return {k: v[keep] for k, v in data.items()}


#: job ids of the clean copies made by :func:`clean_job_copies` are offset by this
CLEAN_JOB_OFFSET = 1_000_000


def clean_job_copies(data: dict[str, np.ndarray], fraction: float, seed: int = 0,
                     junk_keep: float = 0.15) -> dict[str, np.ndarray]:
    """``data`` plus copies of a random ``fraction`` of its jobs that keep only the
    ground-truth good classes and about ``junk_keep`` of the others, with the job-relative
    features (``JOB_SLICE``) z-scored again among the kept classes.

    A curated data set (the demo's VDAM Class2D: 11 of 12 classes good) has mostly good
    classes, while the simulated jobs mix many junk kinds; the job features of a good class
    then look quite different (in a clean job the weakest good class sits at z = -2). The
    stored job features are z-scores, and z-scoring a subset of z-scores gives the z-scores
    of the raw subset, so the copies are exact. Jobs with fewer than 3 good classes are
    not copied. Intensity scales (:func:`compute.ranker.features.relative_intensity`) are
    per job id, so a copy gets its own.
    """
    from compute.ranker.features import JOB_SLICE

    rng = np.random.default_rng(seed)
    parts = []
    for j in np.unique(data["job"]):
        if rng.random() >= fraction:
            continue
        idx = np.flatnonzero(data["job"] == j)
        good = data["good"][idx].astype(bool)
        if good.sum() < 3:
            continue
        bad = idx[~good]
        keep = np.concatenate([idx[good], bad[rng.random(bad.size) < junk_keep]])
        part = {k: v[keep].copy() for k, v in data.items()}
        J = part["features"][:, JOB_SLICE]
        mu, sd = J.mean(axis=0), J.std(axis=0)
        part["features"][:, JOB_SLICE] = np.where(
            sd > 1e-12, (J - mu) / np.where(sd > 1e-12, sd, 1.0), 0.0)
        part["job"] = part["job"] + CLEAN_JOB_OFFSET
        parts.append(part)
    if not parts:
        return data
    log.info("added %d clean job copies (%d classes)", len(parts), sum(len(p["job"]) for p in parts))
    return {k: np.concatenate([data[k]] + [p[k] for p in parts]) for k in data}


# --- metrics ---------------------------------------------------------------------------------

def selection_rates(pred: np.ndarray, good: np.ndarray, n_particles: np.ndarray,
                    threshold: float = THRESHOLD) -> tuple[float, float]:
    """Particle-level (FPR, FNR) of selecting ``pred >= threshold`` against ground-truth classes.

    FPR: particles in ground-truth bad classes that are selected / particles in bad classes.
    FNR: particles in ground-truth good classes that are not selected / particles in good classes.
    """
    sel = pred >= threshold
    g = good.astype(bool)
    w = n_particles.astype(np.float64)
    fpr = float(w[sel & ~g].sum() / max(w[~g].sum(), 1e-12))
    fnr = float(w[~sel & g].sum() / max(w[g].sum(), 1e-12))
    return fpr, fnr


def evaluate_predictions(pred: np.ndarray, data: dict[str, np.ndarray]) -> dict:
    """MSE, overall FPR/FNR and per-job FPR/FNR of clipped predictions."""
    p = np.clip(pred, 0.0, 1.0)
    fpr, fnr = selection_rates(p, data["good"], data["n_particles"])
    per_job = []
    for j in np.unique(data["job"]):
        m = data["job"] == j
        jf, jn = selection_rates(p[m], data["good"][m], data["n_particles"][m])
        per_job.append({"job": int(j), "fpr": jf, "fnr": jn, "classes": int(m.sum())})
    return {"mse": float(np.mean((p - data["target"]) ** 2)), "fpr": fpr, "fnr": fnr,
            "per_job": per_job}


# --- training --------------------------------------------------------------------------------

def train(data_dir: Path, out: Path, epochs: int, threads: int, modes: list[str],
          seed: int = 0, weight_power: float = 0.5, recentre: bool = False,
          init: Path | None = None, lr: float = 1e-3, relative: bool = False,
          clean_jobs: float = 0.0) -> dict:
    """Train the full model and the baselines; write the checkpoint and validation figures.

    ``recentre``: the stored network images of every split go through
    :func:`compute.ranker.features.recentre_images` (and the checkpoint says so, so that
    inference does the same). ``init``: a checkpoint whose full network is fine-tuned
    (mode ``full`` only) instead of training from scratch. ``relative``: the intensity
    features of every split are divided by their job's scale
    (:func:`compute.ranker.features.relative_intensity`; the checkpoint says so). The
    feature statistics are always fitted on the (transformed) training split.
    ``clean_jobs``: add clean copies of this fraction of the training jobs
    (:func:`clean_job_copies`).
    """
    import torch

    from compute.ranker.features import (
        PREPROCESS_KEY,
        FeatureStats,
        normalise_features,
        recentre_images,
        relative_intensity,
    )
    from compute.ranker.train import TrainConfig, fit, predict

    tr = drop_broken_jobs(load_split(data_dir / "train.npz"))
    if clean_jobs > 0:
        tr = clean_job_copies(tr, clean_jobs, seed=seed)
    va = drop_broken_jobs(load_split(data_dir / "val.npz"))
    if (data_dir / "class2d_train.npz").is_file():  # real classifications, when made
        extra = load_split(data_dir / "class2d_train.npz")
        tr = {k: np.concatenate([tr[k], extra[k]]) for k in tr}
    va2d = load_split(data_dir / "class2d_val.npz") if (data_dir / "class2d_val.npz").is_file() \
        else None
    dev = drop_broken_jobs(load_split(data_dir / "dev.npz")) if _has_split(data_dir, "dev") \
        else None
    if recentre:
        t0 = time.monotonic()
        for d in (tr, va, dev, va2d):
            if d is not None:
                d["images"] = recentre_images(d["images"].astype(np.float32))
        log.info("recentred the network images (%.0f s)", time.monotonic() - t0)
    if relative:
        for d in (tr, va, dev, va2d):
            if d is not None:
                d["features"] = relative_intensity(d["features"], d["job"])
    init_ckpt = torch.load(init, map_location="cpu", weights_only=True) if init else None
    stats = FeatureStats.fit(tr["features"])
    Ztr = normalise_features(tr["features"], stats)
    Zva = normalise_features(va["features"], stats)
    Itr = tr["images"].astype(np.float32)
    Iva = va["images"].astype(np.float32)
    # early stopping on the dev split (training molecules, other jobs) when there is one;
    # the held-aside validation set is only evaluated, never used to choose anything
    mon = (dev["images"].astype(np.float32), normalise_features(dev["features"], stats),
           dev["target"]) if dev is not None else (Iva, Zva, va["target"])
    log.info("training on %d classes (%d jobs), validating on %d classes (%d jobs)",
             len(Itr), len(np.unique(tr["job"])), len(Iva), len(np.unique(va["job"])))
    results: dict = {"train_classes": int(len(Itr)), "val_classes": int(len(Iva)),
                     "train_jobs": int(len(np.unique(tr["job"]))),
                     "val_jobs": int(len(np.unique(va["job"]))),
                     "dev_classes": 0 if dev is None else int(len(dev["target"])),
                     "threshold": THRESHOLD, "models": {}, "recentre": bool(recentre),
                     "init": None if init is None else str(init), "lr": lr,
                     "relative_intensity": bool(relative), "clean_jobs": clean_jobs}
    # big classes weigh more (the acceptance rates count particles), sqrt keeps small ones in
    wtr = np.maximum(tr["n_particles"], 1.0) ** weight_power
    wtr = (wtr / wtr.mean()).astype(np.float32)
    results["weight_power"] = weight_power
    out.mkdir(parents=True, exist_ok=True)
    for mode in modes:
        cfg = TrainConfig(mode=mode, epochs=epochs, threads=threads, seed=seed, lr=lr,
                          drop_columns=DROP_COLUMNS, drop_prob=0.25,
                          select_best=dev is not None)
        t0 = time.monotonic()
        start = init_ckpt["state_dict"] if (init_ckpt is not None and mode == "full") else None
        model, hist = fit(Itr, Ztr, tr["target"], cfg, val=mon, weights=wtr, init_state=start)
        secs = time.monotonic() - t0
        ev = evaluate_predictions(predict(model, Iva, Zva), va)
        ev_tr = evaluate_predictions(predict(model, Itr, Ztr), tr)
        results["models"][mode] = {"val": ev, "train_mse": ev_tr["mse"], "seconds": secs,
                                   "epochs": epochs, "history": hist,
                                   "fine_tuned_from": None if start is None else str(init)}
        if dev is not None:
            results["models"][mode]["dev"] = evaluate_predictions(predict(model, *mon[:2]), dev)
        if mode != "image":
            Zna = Zva.copy()
            Zna[:, list(DROP_COLUMNS)] = 0.0
            results["models"][mode]["val_no_accuracy"] = evaluate_predictions(
                predict(model, Iva, Zna), va)
        if va2d is not None:
            results["models"][mode]["val_class2d"] = evaluate_predictions(
                predict(model, va2d["images"].astype(np.float32),
                        normalise_features(va2d["features"], stats)), va2d)
        log.info("%s: val MSE %.4f FPR %.3f FNR %.3f (%.0f s)", mode, ev["mse"], ev["fpr"],
                 ev["fnr"], secs)
        if mode == "full":
            ckpt = {"config": model.config(), "state_dict": model.state_dict(),
                    "feature_stats": stats.to_dict(),
                    PREPROCESS_KEY: {"recentre": bool(recentre),
                                     "relative_intensity": bool(relative)},
                    "info": {"threshold": THRESHOLD, "val_mse": ev["mse"], "val_fpr": ev["fpr"],
                             "val_fnr": ev["fnr"], "train_molecules": TRAIN_POOL,
                             "val_molecules": VAL_MOLECULES}}
            torch.save(ckpt, out / CHECKPOINT_NAME)
            (out / "feature_stats.json").write_text(json.dumps(stats.to_dict(), indent=1),
                                                    encoding="utf-8")
    (out / "validation.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out / "validation.md").write_text(validation_table(results), encoding="utf-8")
    return results


def validation_table(results: dict) -> str:
    lines = [f"Validation: {results['val_classes']} scored classes from {results['val_jobs']} "
             f"held-aside jobs (molecules {', '.join(VAL_MOLECULES)}); training: "
             f"{results['train_classes']} classes from {results['train_jobs']} jobs "
             f"({', '.join(TRAIN_MOLECULES)}, random variants of them and random proteins); "
             f"early stopping on {results.get('dev_classes', 0)} dev classes of other "
             f"training-pool jobs. Threshold {results['threshold']}.", "",
             "| model | val MSE | train MSE | particle FPR | particle FNR | worst job FPR | "
             "worst job FNR | train time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, r in results["models"].items():
        v = r["val"]
        wf = max(j["fpr"] for j in v["per_job"])
        wn = max(j["fnr"] for j in v["per_job"])
        lines.append(f"| {mode} | {v['mse']:.4f} | {r['train_mse']:.4f} | {v['fpr']:.3f} | "
                     f"{v['fnr']:.3f} | {wf:.3f} | {wn:.3f} | {r['seconds']:.0f} |")
    for mode, r in results["models"].items():
        if "val_no_accuracy" in r:
            v = r["val_no_accuracy"]
            lines.append(f"\n{mode}, accuracy columns absent: val MSE {v['mse']:.4f}, "
                         f"FPR {v['fpr']:.3f}, FNR {v['fnr']:.3f}")
        if "val_class2d" in r:
            v = r["val_class2d"]
            lines.append(f"\n{mode}, VDAM class2d jobs: val MSE {v['mse']:.4f}, "
                         f"FPR {v['fpr']:.3f}, FNR {v['fnr']:.3f}")
    return "\n".join(lines) + "\n"


def evaluate(data_dir: Path, weights_dir: Path) -> dict:
    """Score the validation split with shipped weights (checks the checkpoint round trip)."""
    from app.jobs.rank_select import load_ranker
    from compute.ranker.features import normalise_features, recentre_images, relative_intensity
    from compute.ranker.train import predict

    ranker = load_ranker(weights_dir / CHECKPOINT_NAME)
    va = load_split(data_dir / "val.npz")
    X = relative_intensity(va["features"], va["job"]) if ranker.relative_intensity \
        else va["features"]
    Z = normalise_features(X, ranker.stats)
    img = va["images"].astype(np.float32)
    if ranker.recentre:
        img = recentre_images(img)
    return evaluate_predictions(predict(ranker.model, img, Z), va)


# --- entry point ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.ranker_training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="simulate labelled jobs into DATA/<split>.npz")
    g.add_argument("--split", choices=["train", "dev", "val"], required=True,
                   help="train/dev: TRAIN_POOL (dev = early stopping, other seed); "
                        "val: the held-aside VAL_MOLECULES")
    g.add_argument("--jobs", type=int, required=True)
    g.add_argument("--seed", type=int, required=True)
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--molecules", default="", help="comma-separated (default: per split)")
    g.add_argument("--first", type=int, default=0, help="first job of this part (default 0)")
    g.add_argument("--count", type=int, default=None, help="jobs in this part (default all)")
    c = sub.add_parser("generate-class2d",
                       help="run VDAM 2D classification on simulated stacks, label the classes")
    c.add_argument("--split", choices=["train", "val"], required=True)
    c.add_argument("--jobs", type=int, required=True)
    c.add_argument("--seed", type=int, required=True)
    c.add_argument("--iter", type=int, default=100, help="VDAM mini-batches")
    c.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("train", help="train the network and the two baselines")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--modes", default="full,features,image")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--weight-power", type=float, default=0.5,
                   help="loss weight = particles**power (default 0.5)")
    t.add_argument("--recentre", action="store_true",
                   help="recentre the network images on their density (training and inference)")
    t.add_argument("--init", type=Path, default=None,
                   help="fine-tune the full network from this checkpoint (keeps its feature stats)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    t.add_argument("--clean-jobs", type=float, default=0.0,
                   help="add clean copies (good classes + ~15%% of the rest) of this fraction "
                        "of the training jobs")
    t.add_argument("--relative-intensity", action="store_true",
                   help="intensity features relative to the job's scale (training and inference)")
    e = sub.add_parser("evaluate", help="validation figures of shipped weights")
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--weights", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.cmd == "generate":
        mols = [m for m in args.molecules.split(",") if m] or None
        print(generate(args.split, args.jobs, args.seed, args.out, mols, args.first, args.count))
    elif args.cmd == "generate-class2d":
        print(generate_class2d(args.split, args.jobs, args.seed, args.out, args.iter))
    elif args.cmd == "train":
        res = train(args.data, args.out, args.epochs, args.threads, args.modes.split(","),
                    args.seed, args.weight_power, args.recentre, args.init, args.lr,
                    args.relative_intensity, args.clean_jobs)
        print(validation_table(res))
    else:
        ev = evaluate(args.data, args.weights)
        print(json.dumps({k: v for k, v in ev.items() if k != "per_job"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
