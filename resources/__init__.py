"""Shipped data: scheme templates, ranker weights, default config, icons, Qt style sheet."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def path(*parts: str) -> Path:
    """Path of a shipped resource file."""
    return ROOT.joinpath(*parts)
