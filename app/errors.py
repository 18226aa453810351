"""Error types the CLI turns into one clear line on stderr and exit status 2."""

from __future__ import annotations

from compute.errors import ComputeError
from metadata.errors import MetadataError


class UserError(Exception):
    """Bad input from the user: a wrong path, value or option. Printed without a traceback."""


class NotImplementedYet(UserError):
    """A command or job type that exists in the design but is not built yet."""


class JobAborted(Exception):
    """Raised inside a job when ``RELION_JOB_ABORT_NOW`` appears in its directory."""


#: Everything the CLI reports as a user error (exit 2, one line, no traceback).
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, MetadataError, ComputeError)
