"""Score the classes of a RELION-style 2D classification with the class ranker.

Not implemented yet (issue 8).
"""

from app.commands._stub import not_yet


def add_args(parser):
    parser.add_argument("rest", nargs="*", help="arguments (not implemented yet)")


def main(args) -> int:
    raise not_yet("rank", "issue 8")
