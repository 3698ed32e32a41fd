"""The ``sweep`` section: what ``python -m mwt_ray.sweep`` searches (Ray Tune + Optuna) and how."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import (
    MAX_COUNT,
    MAX_CPUS,
    MAX_EPOCHS,
    MAX_GPUS,
    MAX_RESTARTS,
    MAX_SUBTASKS,
    SEED,
    Section,
    shown,
    taus_in_range,
)

__all__ = ["SEARCHABLE_SECTIONS", "SearchRange", "SweepConfig", "flatten_space"]


# Sections a sweep may search over; the others (names, paths, resources, tracking) stay fixed per sweep.
SEARCHABLE_SECTIONS = ("model", "train", "modularize", "data")


class SearchRange(Section):
    """One search dimension: a float range (``low``/``high``, ``log`` for a log scale; ``integer``
    for whole numbers) or a list of ``choices``."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: list | None = None

    @model_validator(mode="after")
    def _shape(self) -> SearchRange:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices is empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs low and high (or a list of choices)")
        if not self.low < self.high:
            raise ValueError(f"empty or inverted range: low {self.low:g} must be below high {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low:g})")
        return self

    def candidates(self) -> list:
        """The values whose validity proves the whole range valid (ends of a range, every choice)."""
        if self.choices is not None:
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.integer else [self.low, self.high]


def flatten_space(tree, prefix: str = "") -> dict:
    """``{"train": {"alpha": {...}}}`` and ``{"train.alpha": {...}}`` both become dotted keys."""
    flat = {}
    for key, value in (tree or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not (set(value) & set(SearchRange.model_fields)):
            flat |= flatten_space(value, name + ".")
        else:
            flat[name] = value
    return flat


class SweepConfig(Section):
    """``python -m mwt_ray.sweep``: Ray Tune + Optuna over ``space``, tau scanned in each trial."""
    trials: int = Field(8, ge=1, le=MAX_COUNT, description="Optuna trials (the reference points included)")
    max_concurrent: int = Field(2, ge=1, le=MAX_COUNT, description="trials running at once")
    seed: int = Field(0, **SEED)
    space: dict[str, SearchRange] = Field(
        default_factory=lambda: {
            "train.alpha": SearchRange(low=0.1, high=3.0, log=True),
            "train.beta": SearchRange(low=0.3, high=3.0, log=True),
        },
        description="dotted config key -> range or choices",
    )
    points: list[dict] = Field(default_factory=list, description="settings tried first, e.g. the paper's "
                               "[{train.alpha: 0.5, train.beta: 1.5}]; keys must be in space")
    tau_grid: list[float] = Field(default_factory=lambda: [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0], max_length=MAX_COUNT,
                                  description="taus scanned after training; the trial reports the best")
    tau_range: SearchRange | None = Field(None, description="search tau with Optuna in this range instead of the grid")
    objective: Literal["score", "pareto"] = Field(
        "score", description="score: module accuracy - krr_weight * KRR (one value); pareto: accuracy vs KRR")
    krr_weight: float = Field(0.1, ge=0, description="accuracy (0..1) one unit of KRR is worth in the score")
    subtask_sizes: list[int] = Field(
        default_factory=list,
        max_length=MAX_SUBTASKS,
        description="M of the sub-tasks that score tau; default: 2 and N // 2",
    )
    subtasks_per_size: int = Field(3, ge=1, le=MAX_SUBTASKS)
    val_fraction: float = Field(0.1, gt=0, lt=1, description="training samples held out to score trials")
    sampler: Literal["tpe", "random"] = "tpe"
    scheduler: Literal["asha", "none"] = Field("asha", description="early stopping on the per-epoch "
                                               "val_accuracy - krr_weight x kernel_rate")
    grace_period: int = Field(2, ge=1, le=MAX_EPOCHS, description="epochs every trial gets before ASHA may stop it")
    reduction_factor: float = Field(2.0, gt=1)
    cpus_per_trial: float = Field(
        1.0, gt=0, le=MAX_CPUS, description="CPUs of a one-process trial (scaling.num_workers=0)"
    )
    gpus_per_trial: float = Field(
        0.0, ge=0, le=MAX_GPUS, description="GPUs of a one-process trial (a fraction shares one GPU)"
    )
    max_failures: int = Field(
        3,
        ge=0,
        le=MAX_RESTARTS,
        description="times a trial (or the standard baseline) may lose its process "
        "or node and run again, resuming from its last finished epoch; a trial's own errors "
        "are never retried",
    )
    standard_baseline: bool = Field(True, description="also train a standard model with the same settings")
    reuse: bool = Field(True, description="evaluate the best trial's modules on sampled sub-tasks at the end")
    register_modules: list[list[int | str]] = Field(
        default_factory=list,
        max_length=MAX_SUBTASKS,
        description="class sets (indices or names) whose module of the best trial is exported "
        "(python -m mwt_ray.export) and registered in MLflow as <name>-<classes> at the end, e.g. [[4, 6]]",
    )

    @field_validator("space", mode="before")
    @classmethod
    def _flat(cls, value):
        return flatten_space(value) if isinstance(value, dict) else value

    @field_validator("space")
    @classmethod
    def _keys(cls, value: dict) -> dict:
        for key in value:
            if key.split(".")[0] not in SEARCHABLE_SECTIONS or key.count(".") != 1:
                raise ValueError(f"cannot search {key!r}: use a key of {', '.join(SEARCHABLE_SECTIONS)} "
                                 "such as train.alpha (tau has tau_grid / tau_range)")
            if key == "modularize.tau":
                raise ValueError("tau is searched through sweep.tau_grid or sweep.tau_range, not sweep.space")
        return value

    _taus = field_validator("tau_grid")(lambda cls, value: sorted(set(taus_in_range(value))))

    @field_validator("tau_range")
    @classmethod
    def _tau_range(cls, value: SearchRange | None) -> SearchRange | None:
        if value is not None and (value.choices is not None and not all(0 < t <= 1 for t in value.choices)
                                  or value.choices is None and not (0 < value.low and value.high <= 1)):
            raise ValueError("tau must lie in (0, 1]")
        return value

    @field_validator("subtask_sizes")
    @classmethod
    def _sizes(cls, value: list[int]) -> list[int]:
        if any(m < 2 for m in value):
            raise ValueError(f"sub-task sizes must be >= 2, got {shown(value)}")
        return value

    @model_validator(mode="after")
    def _points(self) -> SweepConfig:
        for point in self.points:
            flat = flatten_space(point)
            given = set(flat) - {"tau"}
            unknown, missing = sorted(given - set(self.space)), sorted(set(self.space) - given)
            if unknown or missing:
                raise ValueError(f"points: {', '.join(unknown)} not in sweep.space" if unknown else
                                 f"points: a point misses {', '.join(missing)}; give every key of sweep.space")
            # A point's value of a low/high range is a number; true/false would pass as 1/0 (see Section).
            ranges = {key: self.space[key] for key in given if self.space[key].choices is None}
            if self.tau_range is not None and self.tau_range.choices is None and "tau" in flat:
                ranges["tau"] = self.tau_range
            for key, dimension in sorted(ranges.items()):
                if isinstance(flat[key], bool):
                    raise ValueError(f"points: {key}={str(flat[key]).lower()}: true/false is not a number; give "
                                     f"{'a whole number' if dimension.integer else 'a number'} in "
                                     f"[{dimension.low:g}, {dimension.high:g}]")
        return self
