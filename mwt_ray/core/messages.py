"""Error lines: what every command prints when it fails is one line of bounded length.

The cap lives here, in the lowest layer, so that the commands (``mwt_ray.cli``), the config's
argument parser and the sweep's report of a trial's error all cut the same way. Messages quote what
was given (a path, a value), and what was given can be huge: a YAML alias bomb's value made an
8 MB line.
"""
from __future__ import annotations

__all__ = ["MAX_ERROR_CHARS", "one_line"]

MAX_ERROR_CHARS = 2000  # the longest error line a command prints


def one_line(text: str) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``MAX_ERROR_CHARS``."""
    head = text[:MAX_ERROR_CHARS * 4]  # never split megabytes only to keep a few thousand characters
    line = " ".join(head.split())
    if len(line) > MAX_ERROR_CHARS or len(text) > len(head):
        line = f"{line[:MAX_ERROR_CHARS - 50]}... (cut short: the message has {len(text)} characters)"
    return line
