"""Errors that users can cause, and how unexpected ones are told."""

from __future__ import annotations

import logging


class FlowtapError(Exception):
    """A problem the user can fix; the message names the problem and the fix in one line."""


def log_failure(logger: logging.Logger, what: str, exc: BaseException) -> None:
    """Log an unexpected exception of `what` in one line, with its traceback when debugging."""
    logger.error(
        "%s failed: %s",
        what,
        describe_failure(exc),
        exc_info=exc if logger.isEnabledFor(logging.DEBUG) else None,
    )


def describe_failure(exc: BaseException) -> str:
    """An unexpected exception in a few words: its type and message."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
