"""What every config section shares: unknown keys and NaN/inf are refused, assignments validated."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def taus_in_range(values: list[float]) -> list[float]:
    bad = [t for t in values if not 0 < t <= 1]
    if bad or not values:
        raise ValueError(f"tau values must lie in (0, 1], got {bad or 'an empty list'}")
    return values
