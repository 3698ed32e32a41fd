"""What every command does with a failure: one ``error:`` line on stderr and an exit status.

Exit 2: bad input (``ValueError``: ``ConfigError``, ``SetupError``, ``TrackingError``, ...) found
before anything was trained or written. Exit 1: a job that started and could not finish
(``JobFailed``, a non-finite loss, an I/O error, or any other error: set ``MWT_RAY_TRACEBACK=1``
to see its traceback); a full disk (ENOSPC, wherever it was hit) is exit 1 with a line that starts
``disk full (ENOSPC)`` and says what is kept (``interrupted_hint``), also when it came as bad input.
Exit 130 / 143: stopped by SIGINT (Ctrl-C) / SIGTERM; the job's MLflow run is marked KILLED
and its checkpoints are kept.
"""
from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable

from .core.files import is_disk_full, remove_stale_scratch
from .core.messages import one_line
from .jobs import JobFailed

__all__ = ["run_command", "Terminated"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt so that every ``with``
    block (the MLflow run, temporary folders) ends on the way out."""


def _one_line(error: BaseException) -> str:
    """The error's message and its notes (``add_note``: e.g. that its MLflow run could not be ended)."""
    text = "; ".join([str(error), *getattr(error, "__notes__", ())]) if str(error) else ""
    return one_line(text) or type(error).__name__


def _disk_full_line(error: BaseException) -> str:
    line = _one_line(error)
    return line if line.startswith("disk full") else f"disk full (ENOSPC): {line}"


_sigterm_received = False


def _on_sigterm(signum, frame):
    global _sigterm_received
    _sigterm_received = True  # libraries may turn the exception into a plain KeyboardInterrupt on its way up
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
    raise Terminated()


def _on_unraisable(hook_args) -> None:
    """A SIGTERM whose ``Terminated`` was raised inside a ``__del__`` or a garbage-collection
    callback, where Python only prints "Exception ignored" and goes on: raise it again, in the main
    thread at its next step, so that the stop still stops."""
    if isinstance(hook_args.exc_value, Terminated):
        signal.signal(signal.SIGTERM, _on_sigterm)
        # From another thread, a moment later: raised now, it would land in this hook (or the __del__
        # still running) and be dropped again.
        threading.Timer(0.05, _thread.interrupt_main, args=(signal.SIGTERM,)).start()
        return
    sys.__unraisablehook__(hook_args)


def run_command(action: Callable[[], object], interrupted_hint: str = "") -> int:
    """Run ``action`` and turn its failure into one line and an exit status (0 when it succeeds).
    ``interrupted_hint`` ends the line of a job stopped part-way (Ctrl-C, SIGTERM, a full disk).
    A SIGTERM is a stop wherever it lands: also one swallowed on the way (see ``_on_unraisable``),
    and one that came after the work was done (exit 143 either way). Afterwards the scratch folders
    of this job's processes that are gone (Ray workers stopped with it) are removed."""
    global _sigterm_received
    _sigterm_received = False
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    previous_hook, sys.unraisablehook = sys.unraisablehook, _on_unraisable
    try:
        action()
        if _sigterm_received:
            raise Terminated()
    except Exception as error:
        if is_disk_full(error):  # whatever raised it (a copy, torch.save, SQLite under MLflow): say what it is
            print(f"error: {_disk_full_line(error)}{interrupted_hint}", file=sys.stderr)
            return 1
        if isinstance(error, ValueError):
            print(f"error: {_one_line(error)}", file=sys.stderr)
            return 2
        if isinstance(error, (JobFailed, FloatingPointError, OSError)):
            print(f"error: {_one_line(error)}", file=sys.stderr)
            return 1
        if os.environ.get("MWT_RAY_TRACEBACK"):  # a bug or an unforeseen failure: still one line
            traceback.print_exc()
        print(f"error: {type(error).__name__}: {_one_line(error)} (set MWT_RAY_TRACEBACK=1 for the traceback)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        terminated = isinstance(error, Terminated) or _sigterm_received
        print(f"error: stopped by {'SIGTERM' if terminated else 'SIGINT (Ctrl-C)'}{interrupted_hint}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        sys.unraisablehook = previous_hook
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        remove_stale_scratch()
    return 0
