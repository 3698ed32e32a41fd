"""What every command does with a failure: one ``error:`` line on stderr and an exit status.

Exit 2: bad input (``ValueError``: ``ConfigError``, ``SetupError``, ``TrackingError``, ...) found
before anything was trained or written. Exit 1: a job that started and could not finish
(``JobFailed``, a non-finite loss, an I/O error, or any other error: set ``MWT_RAY_TRACEBACK=1``
to see its traceback). Exit 130 / 143: stopped by SIGINT (Ctrl-C) / SIGTERM; the job's MLflow run
is marked KILLED and its checkpoints are kept.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from typing import Callable

from .jobs import JobFailed

__all__ = ["run_command", "Terminated", "one_line", "MAX_ERROR_CHARS"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt so that every ``with``
    block (the MLflow run, temporary folders) ends on the way out."""


# The longest error line a command prints. Messages quote what was given (a path, a value), and
# what was given can be huge: a YAML alias bomb's value made an 8 MB line. Every error line of
# every command goes through ``one_line``, so this is the one place the cap lives.
MAX_ERROR_CHARS = 2000


def one_line(text: str) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``MAX_ERROR_CHARS``."""
    head = text[:MAX_ERROR_CHARS * 4]  # never split megabytes only to keep a few thousand characters
    line = " ".join(head.split())
    if len(line) > MAX_ERROR_CHARS or len(text) > len(head):
        line = f"{line[:MAX_ERROR_CHARS - 50]}... (cut short: the message has {len(text)} characters)"
    return line


def _one_line(error: BaseException) -> str:
    return one_line(str(error)) or type(error).__name__


_sigterm_received = False


def _on_sigterm(signum, frame):
    global _sigterm_received
    _sigterm_received = True  # libraries may turn the exception into a plain KeyboardInterrupt on its way up
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
    raise Terminated()


def run_command(action: Callable[[], object], interrupted_hint: str = "") -> int:
    """Run ``action`` and turn its failure into one line and an exit status (0 when it succeeds)."""
    global _sigterm_received
    _sigterm_received = False
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        action()
    except ValueError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    except (JobFailed, FloatingPointError, OSError) as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        terminated = isinstance(error, Terminated) or _sigterm_received
        print(f"error: stopped by {'SIGTERM' if terminated else 'SIGINT (Ctrl-C)'}{interrupted_hint}", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as error:  # a bug or an unforeseen failure: still one line
        if os.environ.get("MWT_RAY_TRACEBACK"):
            traceback.print_exc()
        print(f"error: {type(error).__name__}: {_one_line(error)} (set MWT_RAY_TRACEBACK=1 for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return 0
