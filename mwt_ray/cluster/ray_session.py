"""The one place the package starts and stops Ray, for every command (train, sweep, reuse).

    with ray_session(dashboard=True):   # joins the Ray this process is on, RAY_ADDRESS, or a new local one
        ...

Why one helper: each command's promise is one ``error:`` line on stderr, and ``ray.init`` prints
on its own (the token-authentication warning the first time a machine runs Ray, start-up lines at
INFO level), so it runs at ERROR level here. It also puts the command's SIGTERM handler back
(``ray.init`` installs one that dumps a stack and aborts, which would skip the clean-up of the
MLflow runs), and it shuts down only a Ray it started itself: a caller already connected, such as
a test's cluster or a Ray job's driver, keeps its connection.

Ray's log deduplication is turned off where this package is imported (``mwt_ray.cluster``).
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

__all__ = ["ray_session"]


@contextlib.contextmanager
def ray_session(*, dashboard: bool | None = None, worker_output: bool = True) -> Iterator[bool]:
    """Yield True when this call started Ray (and will shut it down), False when it was running.

    ``dashboard``: whether a new local Ray starts its dashboard (None: Ray's default, on where its
    packages are installed; Tune trials that run Ray Train hang without it on Ray 2.60, see the
    sweep); ``worker_output``: forward the workers' stdout and
    stderr to this process."""
    # Imported here, not at the top: the reuse command imports this module also for its in-process
    # path (reuse.num_actors=0), which runs where Ray is not installed.
    import ray

    if ray.is_initialized():
        yield False
        return
    main_thread = threading.current_thread() is threading.main_thread()
    ours = signal.getsignal(signal.SIGTERM) if main_thread else None
    ray.init(logging_level=logging.ERROR, log_to_driver=worker_output, include_dashboard=dashboard)
    if callable(ours):
        signal.signal(signal.SIGTERM, ours)
    try:
        yield True
    finally:
        ray.shutdown()
