"""Errors a user can cause. The CLIs turn them into one line on stderr and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, corrupt checkpoint...).

    The message must name the thing that is wrong and say how to fix it.
    """


EXIT_USER_ERROR = 2


def shorten(text: str, limit: int = 240) -> str:
    """``text`` on one line, at most ``limit`` characters, cut at a word boundary with ``...`` (never mid-word).

    Used wherever a third-party exception's message goes into one of ours: those can be long and multi-line.
    """
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    cut = flat[: max(1, limit - 4)]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:(") + " ..."
