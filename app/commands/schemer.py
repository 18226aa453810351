"""Run, abort, reset, inspect or edit a RELION-4 Scheme.

Not implemented yet (issue 4).
"""

from app.commands._stub import not_yet


def add_args(parser):
    parser.add_argument("rest", nargs="*", help="arguments (not implemented yet)")


def main(args) -> int:
    raise not_yet("schemer", "issue 4")
