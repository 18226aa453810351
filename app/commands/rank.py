"""Score the classes of a RELION-style 2D classification with the class ranker.

Works on scopeside's and RELION's own Class2D outputs. Reads the
run_itNNN_optimiser.star (and the model.star / data.star it names) and writes into
--o: rank_model.star (rlnClassScore), class_averages.star (rlnPredictedClassScore,
best first), particles.star (the particles of the selected classes) and
backup_selection.star (rlnSelected per class).

Selection: score >= --threshold (default 0.15), topped up with the best remaining
classes until --min_parts particles and --min_classes classes are selected. Classes
with 10 particles or fewer are not scored (-999), as in RELION.

Example:
  scopeside rank --model Class2D/job007/run_it200_optimiser.star --o Select/rank
"""

from __future__ import annotations

from pathlib import Path


def add_args(parser):
    parser.add_argument("--model", required=True, type=Path,
                        help="run_itNNN_optimiser.star of a 2D classification")
    parser.add_argument("--o", dest="out", type=Path, default=None,
                        help="output directory (default: the optimiser's folder + /rank)")
    parser.add_argument("--threshold", type=float, default=0.15,
                        help="minimum score of a selected class (default 0.15)")
    parser.add_argument("--min_parts", type=int, default=0,
                        help="select at least this many particles (top-up; default 0 = off)")
    parser.add_argument("--min_classes", type=int, default=0,
                        help="select at least this many classes (top-up; default 0 = off)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="ranker checkpoint (default: the shipped resources/ranker/ranker.pt)")
    parser.add_argument("--project", type=Path, default=None,
                        help="project directory the STAR paths are relative to (default: cwd)")


def main(args) -> int:
    import logging

    from app.errors import UserError
    from app.jobs.rank_select import UNSCORED, rank_and_select

    if not args.model.is_file():
        raise UserError(f"--model {args.model}: file not found")
    out = args.out or (args.model.parent / "rank")
    if not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold {args.threshold}: must be between 0 and 1")
    res = rank_and_select(args.model, out, args.threshold, max(0, args.min_parts),
                          max(0, args.min_classes), project_dir=args.project,
                          weights=args.weights, logger=logging.getLogger("scopeside.rank"))
    order = sorted(range(len(res.scores)), key=lambda k: -res.scores[k])
    print(f"{'class':>5} {'score':>7} {'particles':>9} selected")
    for k in order:
        s = res.scores[k]
        txt = "   -   " if s <= UNSCORED + 1 else f"{s:7.3f}"
        print(f"{k + 1:5d} {txt} {int(res.counts[k]):9d} {'yes' if res.selected[k] else ''}")
    print(f"selected {int(res.selected.sum())} classes, {res.n_particles_selected} of "
          f"{int(res.counts.sum())} particles; outputs in {out}")
    return 0
