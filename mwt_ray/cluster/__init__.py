"""Everything that needs Ray: data-parallel training on Ray Train (``trainer``, ``worker``) and
reuse evaluation on a pool of actors (``reuse_pool``).

The names below are loaded on first use rather than at import: ``cluster.shared_storage`` holds
checks that need no Ray (every command makes them, a single-process job too), and importing the
package for them must not import Ray with ``trainer`` and ``worker``.

Ray's log deduplication is off (``RAY_DEDUP_LOGS=0``, read when Ray is first imported, hence here,
before any module of this package imports it): it folds similar lines of different workers into
one ``[repeated Nx]`` line, so concurrent trials' epoch lines were lost. A user's own setting wins.
"""
import importlib
import os

os.environ.setdefault("RAY_DEDUP_LOGS", "0")

_EXPORTS = {
    "DistributedTrainingError": "trainer",
    "check_cluster_resources": "trainer",
    "run_distributed": "trainer",
    "run_training": "trainer",
    "loop_config": "worker",
    "train_loop_per_worker": "worker",
    "evaluate_reuse": "reuse_pool",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
