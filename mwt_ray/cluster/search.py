"""What the sweep's Tuner searches and how: Tune's search space, the Optuna searcher, ASHA.

The Optuna sampler is a seeded TPE (one objective), NSGA-II (``sweep.objective: pareto``, module
accuracy vs KRR) or random search, under ``sweep.max_concurrent``. Tune pickles its searcher with
the Optuna study inside (its experiment state, for ``--resume``), and Optuna 5.1's NSGA-II sampler
holds a ``threading.Lock`` that cannot be pickled: ``PicklableNSGAIISampler`` leaves the lock out
of its state and makes a new one when it is unpickled (the lock guards a cache, not data).
"""
from __future__ import annotations

import threading
import warnings

import optuna

from ..config import Config, flatten_space

__all__ = ["search_space", "searcher", "scheduler", "PicklableNSGAIISampler"]

# A trial that runs again (resumed by --resume, or retried after a lost node) starts Tune's iteration
# count anew, so its first reports repeat steps Optuna has: Optuna keeps the first value and warns once
# per step. Nothing is wrong; the epoch lines say where the trial resumed. Set at import: a resumed
# sweep unpickles its searcher instead of building it here.
warnings.filterwarnings("ignore", message=r"The reported value is ignored because this `step=\d+` is already "
                        r"reported", category=UserWarning)


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """NSGA-II whose lock is rebuilt on unpickling; the generation cache travels as it is."""

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "_thread_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


def search_space(cfg: Config) -> dict:
    """Tune's distributions for ``sweep.space`` (and ``sweep.tau_range``, as the key ``tau``)."""
    from ray import tune

    space = {}
    dimensions = dict(cfg.sweep.space)
    if cfg.sweep.tau_range is not None:
        dimensions["tau"] = cfg.sweep.tau_range
    for key, dim in dimensions.items():
        if dim.choices is not None:
            space[key] = tune.choice(dim.choices)
        elif dim.integer:
            space[key] = (tune.lograndint if dim.log else tune.randint)(int(dim.low), int(dim.high) + 1)
        else:
            space[key] = (tune.loguniform if dim.log else tune.uniform)(dim.low, dim.high)
    return space


def searcher(cfg: Config):
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (optuna.samplers.RandomSampler(seed=cfg.sweep.seed) if cfg.sweep.sampler == "random"
               else optuna.samplers.TPESampler(seed=cfg.sweep.seed))
    if cfg.sweep.objective == "pareto":
        metric, mode = ["module_accuracy", "krr"], ["max", "min"]
        if cfg.sweep.sampler == "tpe":
            sampler = PicklableNSGAIISampler(seed=cfg.sweep.seed)
    else:
        metric, mode = "objective", "max"
    points = [flatten_space(p) for p in cfg.sweep.points]
    if cfg.sweep.tau_range is not None:  # Optuna needs every dimension of a point: tau defaults to modularize.tau
        low, high = (min(cfg.sweep.tau_range.choices), max(cfg.sweep.tau_range.choices)) \
            if cfg.sweep.tau_range.choices else (cfg.sweep.tau_range.low, cfg.sweep.tau_range.high)
        points = [{"tau": min(max(cfg.modularize.tau, low), high), **p} for p in points]
    search = OptunaSearch(metric=metric, mode=mode, sampler=sampler, points_to_evaluate=points or None)
    return ConcurrencyLimiter(search, max_concurrent=cfg.sweep.max_concurrent)


def scheduler(cfg: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.sweep.scheduler == "none":
        return FIFOScheduler()
    # max_t one past the last epoch: ASHA stops a trial that reaches max_t, and a trial must live on
    # after its last epoch to score tau.
    return ASHAScheduler(metric="epoch_score", mode="max", time_attr="epoch", max_t=cfg.train.epochs + 1,
                         grace_period=min(cfg.sweep.grace_period, cfg.train.epochs),
                         reduction_factor=cfg.sweep.reduction_factor)
