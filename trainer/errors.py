"""Errors a user can cause. The CLIs turn them into one line on stderr and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, corrupt checkpoint...).

    The message must name the thing that is wrong and say how to fix it.
    """


EXIT_USER_ERROR = 2
