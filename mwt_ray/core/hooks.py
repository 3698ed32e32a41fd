"""Named points in the code where a test can run its own function: a process killed mid-step, to
check what the product does about it, without the product holding any fault of its own.

    hook = hook_at("reuse.fine_tune_step", index=3)      # None when no hook is installed at that point
    ...
    if hook: hook(step=step)                              # calls every hook with index=3, step=step

A test installs a hook in its own process with ``install(point, function)``. For a process it does
not run in (a Ray actor or worker), it names Python files in ``MWT_RAY_HOOKS`` (separated by
``os.pathsep``): each process loads them the first time it asks for a hook, and each file's
``install_hooks(install)`` installs its own. ``hook_env()`` is that variable with the ``MWT_RAY_HOOK_*``
variables those files read their settings from, to hand to Ray's ``runtime_env``.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

__all__ = ["HOOKS_ENV", "install", "uninstall", "hook_at", "hook_env"]

HOOKS_ENV = "MWT_RAY_HOOKS"
_SETTINGS_PREFIX = "MWT_RAY_HOOK_"

_hooks: dict[str, list[Callable]] = {}
_loaded: set[str] = set()  # the files of MWT_RAY_HOOKS this process has loaded


def install(point: str, function: Callable) -> None:
    """Run ``function(**context)`` whenever the code reaches ``point``."""
    _hooks.setdefault(point, []).append(function)


def uninstall(point: str, function: Callable) -> None:
    if function in _hooks.get(point, []):
        _hooks[point].remove(function)


def hook_at(point: str, **context) -> Callable | None:
    """A function that runs the hooks installed at ``point`` with ``context`` and its own keywords,
    or None when there are none (the caller then skips the point at no cost)."""
    _load_files()
    hooks = list(_hooks.get(point, ()))
    if not hooks:
        return None

    def run(**more) -> None:
        for hook in hooks:
            hook(**context, **more)

    return run


def hook_env() -> dict[str, str]:
    """``MWT_RAY_HOOKS`` and the ``MWT_RAY_HOOK_*`` settings of this process, for the processes it starts."""
    return {key: value for key, value in os.environ.items() if key == HOOKS_ENV or key.startswith(_SETTINGS_PREFIX)}


def _load_files() -> None:
    for path in filter(None, os.environ.get(HOOKS_ENV, "").split(os.pathsep)):
        if path in _loaded:
            continue
        _loaded.add(path)
        spec = importlib.util.spec_from_file_location(f"mwt_ray_hooks_{len(_loaded)}", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"{HOOKS_ENV}: {path} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.install_hooks(install)
