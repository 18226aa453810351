"""Parse an EPU session/XML, a SerialEM mdoc or a movie and print the record.

Not implemented yet (issue 3).
"""

from app.commands._stub import not_yet


def add_args(parser):
    parser.add_argument("rest", nargs="*", help="arguments (not implemented yet)")


def main(args) -> int:
    raise not_yet("metadata", "issue 3")
