"""What every config section shares: unknown keys, NaN/inf and booleans as numbers are refused,
assignments validated."""
from __future__ import annotations

import reprlib
import types
import typing

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

__all__ = ["Section", "taus_in_range", "shown", "SEED", "MAX_SEED", "MAX_EPOCHS", "MAX_BATCH", "MAX_SAMPLES",
           "MAX_COUNT", "MAX_SUBTASKS", "MAX_RESTARTS", "MAX_CPUS", "MAX_GPUS", "LIMIT_REASONS"]

# Upper bounds of the numeric keys. A value past them is no experiment anyone can run: it only
# fails late (a seed NumPy refuses after the job folder exists), overflows (an epoch count beyond
# int64) or runs until killed (a reuse plan of a billion sub-tasks). Each bound is a distinct
# number so that the error line can say why it is there (``LIMIT_REASONS``).
MAX_SEED = 2**32 - 1
MAX_EPOCHS = 100_000
MAX_BATCH = 2**20
MAX_SAMPLES = 2**31 - 1
MAX_COUNT = 10_000
MAX_SUBTASKS = 5_000
MAX_RESTARTS = 1_000
MAX_CPUS = 4_096
MAX_GPUS = 64
SEED = {"ge": 0, "le": MAX_SEED}  # Field(0, **SEED)
LIMIT_REASONS = {
    MAX_SEED: "seeds are 32-bit (NumPy, Optuna and Ray take 0..2^32-1)",
    MAX_EPOCHS: "more epochs than any run can finish",
    MAX_BATCH: "a batch of more than 2^20 images fits in no device's memory",
    MAX_SAMPLES: "more samples than a dataset in memory can hold",
    MAX_COUNT: "more than any sweep or cluster runs",
    MAX_SUBTASKS: "each sub-task fine-tunes and measures a module, minutes each",
    MAX_RESTARTS: "more retries than a failure that can heal ever needs",
    MAX_CPUS: "more CPUs than any node has",
    MAX_GPUS: "more GPUs than any node has",
}

_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxdict, _SHOWN.maxlist, _SHOWN.maxtuple, _SHOWN.maxset = 3, 4, 6, 6, 6
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 80, 80, 40


def shown(value) -> str:
    """``repr(value)``, cut short: an error message quotes a bad value, never all of a huge one (a YAML
    alias bomb is a list of lists of millions of shared items; ``repr`` of it alone is megabytes)."""
    return _SHOWN.repr(value)


def _number_kind(annotation) -> str | None:
    """'a whole number' / 'a number' when ``annotation`` takes an int / float and not a bool, else None."""
    if annotation is int:
        return "a whole number"
    if annotation is float:
        return "a number"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if bool in args:
            return None
        kinds = [k for k in map(_number_kind, args) if k]
        return "a number" if "a number" in kinds else kinds[0] if kinds else None
    return None


def _boolean_as_number(annotation, value) -> str | None:
    """What a boolean inside ``value`` stands where ``annotation`` wants a number, or None.

    Walks ``value`` only as deep as ``annotation`` goes (list[int]: one level), so a huge or shared
    structure costs no more than its top levels."""
    if isinstance(value, bool):
        return _number_kind(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return next(filter(None, (_boolean_as_number(a, value) for a in args if a is not type(None))), None)
    if origin in (list, tuple, set, frozenset) and args and isinstance(value, (list, tuple)):
        return next(filter(None, (_boolean_as_number(args[0], v) for v in value)), None)
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return next(filter(None, (_boolean_as_number(args[1], v) for v in value.values())), None)
    return None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value, info: ValidationInfo):
        """Pydantic (lax mode) takes true/false for 1/0 in an int or float field, so ``train.epochs=true``
        (or YAML's ``yes``/``on``) trained one epoch. One check here, for every numeric field of every
        section, also inside lists and mappings (``reuse.sizes``, ``sweep.tau_grid``); strict mode is
        not the answer: it would also refuse '1e9' and 'nan', which YAML gives as strings."""
        kind = _boolean_as_number(cls.model_fields[info.field_name].annotation, value)
        if kind:
            raise ValueError(f"true/false is not a number: give {kind}")
        return value


def taus_in_range(values: list[float]) -> list[float]:
    bad = [t for t in values if not 0 < t <= 1]
    if bad or not values:
        raise ValueError(f"tau values must lie in (0, 1], got {shown(bad) if bad else 'an empty list'}")
    return values
