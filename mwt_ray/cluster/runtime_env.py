"""The environment of the processes Ray starts for a job (Train workers, reuse actors).

No Ray here: the modules that need it only at run time (the reuse pool, whose in-process path runs
without Ray) import this one at the top.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..core.hooks import hook_env

__all__ = ["worker_runtime_env"]


def worker_runtime_env() -> dict | None:
    """Environment for the workers: this source tree on PYTHONPATH when mwt_ray is not an
    installed package, the driver's MLFLOW_* variables (server credentials, TLS settings) and the
    test hooks' variables."""
    env = {key: value for key, value in os.environ.items() if key.startswith("MLFLOW_")}
    env.update(hook_env())  # a test's hooks reach the processes Ray starts (core.hooks)
    parent = Path(__file__).resolve().parents[2]  # the folder that holds the mwt_ray package
    if not ("site-packages" in parent.parts or "dist-packages" in parent.parts):
        paths = [str(parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return {"env_vars": env} if env else None
