"""Errors that users can cause."""


class FlowtapError(Exception):
    """A problem the user can fix; the message names the problem and the fix in one line."""
