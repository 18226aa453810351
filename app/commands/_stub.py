"""Shared helper for subcommands that are designed but not built yet."""

from app.errors import NotImplementedYet


def not_yet(name: str, issue: str) -> NotImplementedYet:
    return NotImplementedYet(f"'{name}' is not implemented yet (tracked in {issue})")
