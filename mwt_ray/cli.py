"""What every command does with a failure: one ``error:`` line on stderr and an exit status.

Exit 2: bad input (``ValueError``: ``ConfigError``, ``SetupError``, ``TrackingError``, ...) found
before anything was trained or written. Exit 1: a job that started and could not finish
(``JobFailed``, a non-finite loss, an I/O error).
"""
from __future__ import annotations

import sys
from typing import Callable

from .jobs import JobFailed

__all__ = ["run_command"]


def run_command(action: Callable[[], object]) -> int:
    """Run ``action`` and turn its failure into one line and an exit status (0 when it succeeds)."""
    try:
        action()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (JobFailed, FloatingPointError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
