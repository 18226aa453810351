"""Class ranker on a RELION-style 2D classification: read, score, select, write.

Used by ``scopeside rank`` (:mod:`app.commands.rank`) and by the select job
(``relion.select`` with ``do_class_ranker``), which calls :func:`run_ranker_selection`.

Input: ``run_itNNN_optimiser.star`` (scopeside's or RELION's own). From it:
``rlnModelStarFile`` (the ``model_classes`` table: ``rlnReferenceImage``,
``rlnClassDistribution``, ``rlnAccuracyRotations``, ``rlnAccuracyTranslationsAngst``,
``rlnEstimatedResolution``; ``model_general``: ``rlnPixelSize``),
``rlnExperimentalDataStarFile`` (particles with ``rlnClassNumber``) and
``rlnParticleDiameter``.

Outputs (in the output directory):

- ``rank_model.star``: the model.star with ``rlnClassScore`` added to ``model_classes``;
- ``class_averages.star``: one row per class, sorted by score (best first):
  ``rlnReferenceImage``, ``rlnClassNumber``, ``rlnPredictedClassScore``,
  ``rlnClassDistribution``, ``rlnClassParticleCount``… plus the accuracy/resolution columns
  present in the model;
- ``particles.star``: the optics table and the particles of the selected classes;
- ``backup_selection.star``: ``rlnSelected`` (1/0) per class, as RELION's selection GUI;
- ``ranker_feedback.star`` is written by the GUI when the operator changes the selection
  (format: :func:`write_feedback`), so the decisions can be added to the training data.

Fallbacks (each logged as a warning naming the file): no accuracy / resolution columns
→ those features take the training mean; a missing or unreadable class image → that class
is not scored (−999); no readable class image at all → a clear error; classes with ≤ 10
particles (including 0) → −999 and never selected; no ``rlnPixelSize`` → the class stack's
MRC header; no ``rlnParticleDiameter`` → 0.9 × box × pixel size.
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import resources
from app.errors import UserError
from metadata.errors import MetadataError
from metadata.star import read_star, resolve_path, split_image_name, write_star

log = logging.getLogger(__name__)

CHECKPOINT = resources.path("ranker", "ranker.pt")
DEFAULT_THRESHOLD = 0.15
UNSCORED = -999.0

NODE_PARTICLES = "ParticlesData.star.relion"
NODE_CLASS_AVERAGES = "ImagesData.star.relion.classaverages"
NODE_OPTIMISER = "ProcessData.star.relion.optimiser.class2d"


# --- the network ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def load_ranker(path: str | Path | None = None, device: str | None = None):
    """The class ranker from a checkpoint (default: the shipped ``resources/ranker/ranker.pt``)."""
    import torch

    from compute.errors import ComputeError
    from compute.ranker.infer import ClassRanker

    p = Path(path) if path else CHECKPOINT
    if not p.is_file():
        raise UserError(f"class-ranker weights not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises assorted unpickling errors
        raise UserError(f"cannot read class-ranker weights {p}: {exc}") from None
    try:
        return ClassRanker(ckpt, device=device)
    except ComputeError as exc:
        raise UserError(f"{p}: {exc}") from None


# --- reading a classification ---------------------------------------------------------------

@dataclass
class Classification:
    """What the ranker needs from one 2D classification."""

    optimiser_path: Path
    model_path: Path
    data_path: Path
    model_blocks: dict[str, pd.DataFrame]
    data_blocks: dict[str, pd.DataFrame]
    classes: pd.DataFrame                 # model_classes rows
    class_numbers: np.ndarray             # 1-based
    counts: np.ndarray                    # particles per class (from the data star)
    images: np.ndarray                    # (K, n, n); nan-filled where unreadable
    image_ok: np.ndarray                  # (K,) bool
    pixel_size_a: float
    diameter_a: float
    warnings: list[str] = field(default_factory=list)


def _find(name: str, star_path: Path, project_dir: Path | None) -> Path:
    """A path named in a STAR file: project dir / cwd / the STAR's folder, else its ancestors."""
    p = resolve_path(name, star_path, project_dir)
    if p.exists():
        return p
    rel = Path(name)
    for anc in Path(star_path).resolve().parents:
        if (anc / rel).exists():
            return anc / rel
    local = Path(star_path).parent / rel.name
    return local if local.exists() else p


def _scalar(blocks: dict[str, pd.DataFrame], label: str):
    for df in blocks.values():
        if label in df.columns and len(df):
            return df[label].iloc[0]
    return None


def _particles_table(blocks: dict[str, pd.DataFrame], path: Path) -> str:
    if "particles" in blocks:
        return "particles"
    cands = [k for k, v in blocks.items() if "rlnClassNumber" in v.columns]
    if not cands:
        raise UserError(f"{path}: no particle table with rlnClassNumber")
    return cands[0]


def read_classification(optimiser: str | Path, project_dir: str | Path | None = None
                        ) -> Classification:
    """Read an optimiser.star and everything it points to (see the module docstring)."""
    from metadata.images import StackReader, mrc_pixel_size

    opt_path = Path(optimiser)
    proj = Path(project_dir) if project_dir else None
    warns: list[str] = []
    if opt_path.name.endswith("_model.star"):
        # a model.star: use its sibling optimiser.star, or the data.star beside it
        sib = opt_path.with_name(opt_path.name[:-len("_model.star")] + "_optimiser.star")
        if sib.is_file():
            opt_path = sib
        else:
            data_sib = opt_path.with_name(opt_path.name[:-len("_model.star")] + "_data.star")
            if not data_sib.is_file():
                raise UserError(f"{opt_path}: no {sib.name} or {data_sib.name} beside it")
            warns.append(f"{sib} not found: particle diameter taken from the box")
            opt = {"optimiser_general": pd.DataFrame({
                "rlnModelStarFile": [str(opt_path.resolve())],
                "rlnExperimentalDataStarFile": [str(data_sib.resolve())]})}
    if opt_path.name.endswith("_optimiser.star") or not opt_path.name.endswith("_model.star"):
        opt = read_star(opt_path)
    model_name = _scalar(opt, "rlnModelStarFile")
    data_name = _scalar(opt, "rlnExperimentalDataStarFile")
    if model_name is None or data_name is None:
        raise UserError(f"{opt_path}: not an optimiser.star (needs rlnModelStarFile and "
                        "rlnExperimentalDataStarFile)")
    model_path = _find(str(model_name), opt_path, proj)
    data_path = _find(str(data_name), opt_path, proj)
    model = read_star(model_path)
    if "model_classes" not in model:
        raise UserError(f"{model_path}: no data_model_classes table")
    dim = _scalar(model, "rlnReferenceDimensionality")
    if dim is not None and str(dim).strip() not in ("2", "2.0"):
        raise UserError(f"{model_path}: rlnReferenceDimensionality is {dim} — a 3D "
                        "classification or refinement; the class ranker scores 2D class averages")
    classes = model["model_classes"].reset_index(drop=True)
    if "rlnReferenceImage" not in classes.columns:
        raise UserError(f"{model_path}: model_classes has no rlnReferenceImage column")
    K = len(classes)
    if K == 0:
        raise UserError(f"{model_path}: model_classes is empty")
    data = read_star(data_path)
    ptab = _particles_table(data, data_path)
    cls_col = pd.to_numeric(data[ptab]["rlnClassNumber"], errors="coerce").fillna(0).astype(int)
    numbers = np.arange(1, K + 1)
    counts = np.bincount(np.clip(cls_col.to_numpy(), 0, K), minlength=K + 1)[1:K + 1]

    # class images
    names = classes["rlnReferenceImage"].astype(str).tolist()
    images: list[np.ndarray | None] = [None] * K
    bad_files: dict[str, str] = {}
    with StackReader(model_path, proj) as reader:
        by_file: dict[str, list[int]] = {}
        for k, nm in enumerate(names):
            try:
                _, f = split_image_name(nm)
            except MetadataError as exc:
                bad_files[nm] = str(exc)
                continue
            by_file.setdefault(f, []).append(k)
        for f, ks in by_file.items():
            fpath = _find(f, model_path, proj)
            try:
                arr = reader.read([f"{split_image_name(names[k])[0] + 1}@{fpath}" for k in ks])
            except MetadataError as exc:
                bad_files[f] = str(exc)
                continue
            for k, im in zip(ks, arr):
                images[k] = im
    for f, why in bad_files.items():
        warns.append(f"class images {f} unreadable ({why}): those classes are not scored")
    if any(im is not None and np.ndim(im) != 2 for im in images):
        raise UserError(f"{model_path}: the class references are not 2D images (a 3D run?); "
                        "the class ranker scores 2D class averages")
    ok = np.array([im is not None for im in images], dtype=bool)
    if not ok.any():
        raise UserError(f"{model_path}: none of the {K} class images could be read "
                        f"({next(iter(bad_files.values()), 'no image names')})")
    shape = next(im.shape for im in images if im is not None)
    stack = np.full((K, *shape), np.nan, dtype=np.float32)
    for k, im in enumerate(images):
        if im is not None:
            if im.shape != shape:
                ok[k] = False
                warns.append(f"class {k + 1}: image size {im.shape} differs from {shape}; "
                             "not scored")
                continue
            stack[k] = im

    # pixel size and diameter
    px = _scalar(model, "rlnPixelSize")
    px = float(px) if px is not None else None
    if not px or px <= 0:
        first = _find(split_image_name(names[int(np.flatnonzero(ok)[0])])[1], model_path, proj)
        px = mrc_pixel_size(first)
        if not px:
            raise UserError(f"{model_path}: no rlnPixelSize and no pixel size in the MRC "
                            f"header of {first}")
        warns.append(f"{model_path}: no rlnPixelSize; using {px:.3f} Å from the MRC header")
    diam = _scalar(opt, "rlnParticleDiameter")
    diam = float(diam) if diam is not None else -1.0
    if not diam > 0:
        diam = 0.9 * shape[-1] * px
        warns.append(f"{opt_path}: no rlnParticleDiameter; using {diam:.0f} Å (0.9 × box)")
    if ("rlnAccuracyTranslationsAngst" not in classes.columns
            and "rlnAccuracyTranslations" in classes.columns):
        # RELION <= 3.0 gives the translational accuracy in pixels
        classes = classes.copy()
        classes["rlnAccuracyTranslationsAngst"] = pd.to_numeric(
            classes["rlnAccuracyTranslations"], errors="coerce") * px
        warns.append(f"{model_path}: rlnAccuracyTranslations in pixels (RELION 3.0) converted "
                     f"to Å with the pixel size {px:.3f} Å")
    for lab in ("rlnAccuracyRotations", "rlnAccuracyTranslationsAngst", "rlnEstimatedResolution"):
        if lab not in classes.columns:
            warns.append(f"{model_path}: no {lab} column; that feature takes the training mean")
    return Classification(opt_path, model_path, data_path, model, data, classes, numbers,
                          counts, stack, ok, px, diam, warns)


def class_metas(c: Classification) -> list:
    """:class:`compute.ranker.features.ClassMeta` per class (``None`` for absent columns)."""
    from compute.ranker.features import ClassMeta

    def col(label: str) -> list[float | None]:
        if label not in c.classes.columns:
            return [None] * len(c.classes)
        v = pd.to_numeric(c.classes[label], errors="coerce")
        return [None if not np.isfinite(x) else float(x) for x in v]

    rot = col("rlnAccuracyRotations")
    tr = col("rlnAccuracyTranslationsAngst")
    res = col("rlnEstimatedResolution")
    return [ClassMeta(float(n), r, t, s) for n, r, t, s in zip(c.counts, rot, tr, res)]


def score_classification(c: Classification, weights: str | Path | None = None) -> np.ndarray:
    """Scores in [0, 1] per class, or −999 for classes not scored."""
    ranker = load_ranker(str(weights) if weights else None)
    metas = class_metas(c)
    # unreadable images: not scored (a zero-particle meta makes job_features skip them)
    from compute.ranker.features import ClassMeta

    metas = [m if ok else ClassMeta(0.0) for m, ok in zip(metas, c.image_ok)]
    imgs = np.where(np.isfinite(c.images), c.images, 0.0).astype(np.float32)
    return ranker.score(imgs, metas, c.pixel_size_a, c.diameter_a).scores


# --- selection ------------------------------------------------------------------------------

def select_classes(scores: np.ndarray, counts: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                   min_particles: int = 0, min_classes: int = 0) -> np.ndarray:
    """Which classes to keep: score ≥ threshold, topped up with the best remaining scored
    classes until ``min_particles`` particles and ``min_classes`` classes are reached.

    Unscored classes (−999, ≤ 10 particles) are never selected.
    """
    s = np.asarray(scores, dtype=np.float64)
    n = np.asarray(counts, dtype=np.int64)
    scored = s > UNSCORED + 1
    sel = scored & (s >= threshold)
    order = [k for k in np.argsort(-s, kind="stable") if scored[k] and not sel[k]]
    for k in order:
        if n[sel].sum() >= (min_particles or 0) and sel.sum() >= (min_classes or 0):
            break
        sel[k] = True
    return sel


# --- writing -----------------------------------------------------------------------------------

@dataclass
class RankResult:
    scores: np.ndarray
    selected: np.ndarray
    counts: np.ndarray
    n_particles_selected: int
    outputs: dict[str, Path]


def write_outputs(c: Classification, scores: np.ndarray, selected: np.ndarray, out_dir: Path
                  ) -> dict[str, Path]:
    """Write rank_model.star, class_averages.star, particles.star and backup_selection.star."""
    out_dir.mkdir(parents=True, exist_ok=True)
    outs: dict[str, Path] = {}
    blocks = dict(c.model_blocks)
    mc = c.classes.copy()
    mc["rlnClassScore"] = scores
    blocks["model_classes"] = mc
    outs["rank_model"] = write_star(out_dir / "rank_model.star", blocks)

    ca = pd.DataFrame({"rlnReferenceImage": c.classes["rlnReferenceImage"].astype(str),
                       "rlnClassNumber": c.class_numbers,
                       "rlnPredictedClassScore": scores,
                       "rlnClassParticleCount": c.counts})
    for lab in ("rlnClassDistribution", "rlnAccuracyRotations", "rlnAccuracyTranslationsAngst",
                "rlnEstimatedResolution"):
        if lab in c.classes.columns:
            ca[lab] = c.classes[lab].to_numpy()
    ca = ca.iloc[np.argsort(-scores, kind="stable")].reset_index(drop=True)
    outs["class_averages"] = write_star(out_dir / "class_averages.star", {"": ca})

    ptab = _particles_table(c.data_blocks, c.data_path)
    parts = c.data_blocks[ptab]
    keep_numbers = set(c.class_numbers[selected].tolist())
    cls = pd.to_numeric(parts["rlnClassNumber"], errors="coerce").fillna(0).astype(int)
    pblocks = {k: v for k, v in c.data_blocks.items() if k != ptab}
    pblocks["particles"] = parts[cls.isin(keep_numbers)].reset_index(drop=True)
    outs["particles"] = write_star(out_dir / "particles.star", pblocks)
    outs["backup_selection"] = write_star(
        out_dir / "backup_selection.star", {"": pd.DataFrame({"rlnSelected": selected.astype(int)})})
    return outs


def rank_and_select(optimiser: str | Path, out_dir: str | Path, threshold: float = DEFAULT_THRESHOLD,
                    min_particles: int = 0, min_classes: int = 0,
                    project_dir: str | Path | None = None, weights: str | Path | None = None,
                    logger: logging.Logger | None = None) -> RankResult:
    """Read, score, select and write (the whole ranker step)."""
    lg = logger or log
    c = read_classification(optimiser, project_dir)
    for w in c.warnings:
        lg.warning(w)
    scores = score_classification(c, weights)
    sel = select_classes(scores, c.counts, threshold, min_particles, min_classes)
    outs = write_outputs(c, scores, sel, Path(out_dir))
    n_sel = int(c.counts[sel].sum())
    n_scored = int((scores > UNSCORED + 1).sum())
    lg.info("class ranker: %d of %d classes scored, %d selected (threshold %.2f) with %d of "
            "%d particles", n_scored, len(scores), int(sel.sum()), threshold, n_sel,
            int(c.counts.sum()))
    return RankResult(scores, sel, c.counts, n_sel, outs)


# --- the select job ------------------------------------------------------------------------

def _opt_float(ctx, name: str, default: float) -> float:
    v = ctx.get(name, default)
    try:
        return float(v)
    except (TypeError, ValueError):
        raise UserError(f"option {name}: {v!r} is not a number") from None


def run_ranker_selection(ctx) -> RankResult:
    """The select job's class-ranker branch (``do_class_ranker = Yes``).

    Reads ``fn_model`` (the optimiser.star), ``rank_threshold`` (0.15), ``select_nr_parts``
    and ``select_nr_classes`` (minimums, −1/0 = none) from ``ctx``; writes the outputs into
    the job directory and registers its nodes.
    """
    fn = ctx.get("fn_model")
    if not fn:
        raise UserError("option fn_model: the class ranker needs a 2D optimiser.star")
    fn_path = Path(fn)
    if not fn_path.is_absolute():
        fn_path = Path(ctx.project_dir) / fn_path
    thr = _opt_float(ctx, "rank_threshold", DEFAULT_THRESHOLD)
    min_p = max(0, int(_opt_float(ctx, "select_nr_parts", -1)))
    min_c = max(0, int(_opt_float(ctx, "select_nr_classes", -1)))
    ctx.add_input_node(fn_path, NODE_OPTIMISER)
    ctx.check_abort()
    res = rank_and_select(fn_path, ctx.out_dir, thr, min_p, min_c, project_dir=ctx.project_dir,
                          logger=ctx.logger)
    ctx.add_output_node(res.outputs["particles"], NODE_PARTICLES)
    ctx.add_output_node(res.outputs["class_averages"], NODE_CLASS_AVERAGES)
    return res


# --- operator feedback ------------------------------------------------------------------------

FEEDBACK_FILE = "ranker_feedback.star"


def write_feedback(job_dir: str | Path, model_star: str | Path, class_numbers, reference_images,
                   predicted_scores, operator_selected, auto_selected) -> Path:
    """Store the operator's include/exclude decisions with the job (``ranker_feedback.star``).

    Format: ``data_feedback_general`` (``rlnModelStarFile``, ``rlnFeedbackTime``) and
    ``data_feedback`` with one row per class: ``rlnClassNumber``, ``rlnReferenceImage``,
    ``rlnPredictedClassScore``, ``rlnSelected`` (the operator's decision, 1/0) and
    ``rlnAutoSelected`` (what the ranker chose). Rewritten whole at each change.
    """
    p = Path(job_dir) / FEEDBACK_FILE
    general = {"rlnModelStarFile": str(model_star),
               "rlnFeedbackTime": _dt.datetime.now().isoformat(timespec="seconds")}
    rows = pd.DataFrame({"rlnClassNumber": np.asarray(class_numbers, dtype=int),
                         "rlnReferenceImage": [str(x) for x in reference_images],
                         "rlnPredictedClassScore": np.asarray(predicted_scores, dtype=float),
                         "rlnSelected": np.asarray(operator_selected, dtype=bool).astype(int),
                         "rlnAutoSelected": np.asarray(auto_selected, dtype=bool).astype(int)})
    return write_star(p, {"feedback_general": general, "feedback": rows})


def read_feedback(path: str | Path) -> tuple[dict, pd.DataFrame]:
    """The general block (as a dict) and the per-class table of a feedback file."""
    b = read_star(path)
    if "feedback" not in b:
        raise UserError(f"{path}: not a ranker feedback file (no data_feedback table)")
    gen = b.get("feedback_general")
    g = {} if gen is None else {k: gen[k].iloc[0] for k in gen.columns}
    return g, b["feedback"]
