"""Open the GUI (session setup and monitor).

Not implemented yet (issue 10).
"""

from app.commands._stub import not_yet


def add_args(parser):
    parser.add_argument("rest", nargs="*", help="arguments (not implemented yet)")


def main(args) -> int:
    raise not_yet("gui", "issue 10")
