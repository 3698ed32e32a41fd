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

__all__ = ["run_command", "Terminated"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt so that every ``with``
    block (the MLflow run, temporary folders) ends on the way out."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
    raise Terminated()


def run_command(action: Callable[[], object], interrupted_hint: str = "") -> int:
    """Run ``action`` and turn its failure into one line and an exit status (0 when it succeeds)."""
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
        name = "SIGTERM" if isinstance(error, Terminated) else "SIGINT (Ctrl-C)"
        print(f"error: stopped by {name}{interrupted_hint}", file=sys.stderr)
        return 143 if isinstance(error, Terminated) else 130
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
