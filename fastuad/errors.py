"""One base class for every error a user can cause.

Data, model, backbone, checkpoint and backend errors all derive from :class:`FastUADError`, so
the CLI turns exactly these into a one-line ``fastuad: error:`` message while bugs (any other
exception) keep their traceback. Each subclass also derives from the builtin that fits it
(``ValueError``, ``RuntimeError``) so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["FastUADError", "DataError"]


class FastUADError(Exception):
    """Base of the user-facing errors: bad input, missing files, a backend that cannot run."""


class DataError(FastUADError, ValueError):
    """A data set that cannot be read as asked: missing root or class, bad layout, missing mask."""
