"""The base of every config section, and a validator for names chosen from a registry."""
from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Annotated

from pydantic import AllowInfNan, BaseModel, ConfigDict

OpenBound = Annotated[float, AllowInfNan(True)]
"""A float that may be infinite: a bound that can be left open (every other float must be finite)."""


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated, and
    floats must be finite (an infinite or NaN learning rate, say, would only show up as a
    diverged run)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def one_of(registry: Collection[str], what: str) -> Callable[[str], str]:
    """A pydantic after-validator accepting the names in `registry` (read when validating, so a
    name registered later is accepted)."""

    def check(name: str) -> str:
        if name not in registry:
            raise ValueError(f"unknown {what} {name!r} (one of {', '.join(registry)})")
        return name

    return check
