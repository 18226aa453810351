"""Errors for files the user pointed us at (caught by the CLI as one clear line, exit 2)."""

from __future__ import annotations

from pathlib import Path


class MetadataError(Exception):
    """A metadata file is missing, unreadable, malformed or not what it claims to be.

    The message names the file and the problem, e.g.
    ``FoilHole_1.xml: not an EPU movie XML (a foil-hole image)``.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)
