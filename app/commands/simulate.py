"""Synthetic movies, micrographs and particle stacks with ground truth.

Not implemented yet (issue 5).
"""

from app.commands._stub import not_yet


def add_args(parser):
    parser.add_argument("rest", nargs="*", help="arguments (not implemented yet)")


def main(args) -> int:
    raise not_yet("simulate", "issue 5")
