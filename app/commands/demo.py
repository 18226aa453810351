"""Make a small synthetic EPU session and run prep+proc end to end.

Not implemented yet (issue 11).
"""

from app.commands._stub import not_yet


def add_args(parser):
    parser.add_argument("rest", nargs="*", help="arguments (not implemented yet)")


def main(args) -> int:
    raise not_yet("demo", "issue 11")
