"""finn_flow's errors: both are bad-input errors (exit status 2 in the CLI) naming what to do."""

from brevitas_a2q.errors import A2QInputError

__all__ = ["FinnBuildError", "FinnUnavailableError"]


class FinnUnavailableError(A2QInputError):
    """FINN (or a part of it the requested step needs) cannot be used on this machine."""


class FinnBuildError(A2QInputError):
    """A FINN step failed; the message names the step and the build log."""
