"""scopeside application layer: CLI, schemes engine, jobs, executors and the Qt GUI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scopeside")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
