"""What every config section shares: unknown keys, NaN/inf and booleans as numbers are refused,
assignments validated."""
from __future__ import annotations

import reprlib
import types
import typing

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

__all__ = ["Section", "taus_in_range", "shown"]

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
