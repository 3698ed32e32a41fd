"""Error lines: what every command prints when it fails is one line of bounded length.

The cap lives here, in the lowest layer, so that the commands (``mwt_ray.cli``), the config's
argument parser and the sweep's report of a trial's error all cut the same way. Messages quote what
was given (a path, a value), and what was given can be huge: a YAML alias bomb's value made an
8 MB line.
"""
from __future__ import annotations

__all__ = ["MAX_ERROR_CHARS", "one_line", "error_line", "first_line", "last_line"]

MAX_ERROR_CHARS = 2000  # the longest error line a command prints


def one_line(text: str) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``MAX_ERROR_CHARS``."""
    head = text[:MAX_ERROR_CHARS * 4]  # never split megabytes only to keep a few thousand characters
    line = " ".join(head.split())
    if len(line) > MAX_ERROR_CHARS or len(text) > len(head):
        line = f"{line[:MAX_ERROR_CHARS - 50]}... (cut short: the message has {len(text)} characters)"
    return line


def error_line(error: BaseException, limit: int = MAX_ERROR_CHARS) -> str:
    """An error's whole message on one line, cut to ``limit`` characters; its class name when it
    has no message."""
    return _cut(str(error), limit) or type(error).__name__


def first_line(error: BaseException | str, limit: int = MAX_ERROR_CHARS) -> str:
    """The first non-blank line of an error's message, cut to ``limit`` characters; an exception
    without a message gives its class name. For messages whose first line says what went wrong and
    the rest is detail (MLflow's, PyTorch's)."""
    return _line_of(error, limit, last=False)


def last_line(error: BaseException | str, limit: int = MAX_ERROR_CHARS) -> str:
    """The last non-blank line of an error's message, cut to ``limit`` characters: where Ray puts the
    exception's own message, below the traceback it wraps it in."""
    return _line_of(error, limit, last=True)


def _line_of(error: BaseException | str, limit: int, last: bool) -> str:
    text = str(error)
    part = text[-limit * 4:] if last else text[:limit * 4]  # never split megabytes to keep one line
    lines = [line for line in part.splitlines() if line.strip()]
    line = (lines[-1] if last else lines[0]) if lines else ""
    return _cut(line, limit) or ("" if isinstance(error, str) else type(error).__name__)


def _cut(text: str, limit: int) -> str:
    line = one_line(text)
    return line if len(line) <= limit else f"{line[:limit - 3]}..."
