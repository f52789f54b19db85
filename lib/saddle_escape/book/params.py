"""Validation of chapter parameters.

Every chapter checks its knobs right after the `parameters` cell, before any work starts.
Each check returns the (possibly normalised) value and raises :class:`~saddle_escape.sim.errors.ParameterError` with one
readable line naming the parameter, the value and what is allowed::

    eps_min = -1.0 is not allowed: must be a number > 0

so a re-runner who typed a bad value sees that line, never a stack trace from deep inside torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from numbers import Integral, Real
from typing import Any

from ..sim.errors import ParameterError

PROFILES = ("quick", "full")




def require(condition: bool, name: str, value: Any, allowed: str) -> None:
    """Raise :class:`~saddle_escape.sim.errors.ParameterError` unless `condition` holds.

    For constraints that involve several parameters, e.g.
    ``require(r <= L, "r", r, f"must be <= L = {L}")``.
    """
    if not condition:
        raise ParameterError(name, value, allowed)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _range_text(kind: str, lo, hi, unbounded: str) -> str:
    """What a range check allows, in words: "must be a number in [0, 1]", "must be an integer >= 1"."""
    if lo is not None and hi is not None:
        return f"must be {kind} in [{lo}, {hi}]"
    if lo is not None:
        return f"must be {kind} >= {lo}"
    if hi is not None:
        return f"must be {kind} <= {hi}"
    return f"must be {unbounded}"


def check_number(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    """A finite real number in the closed interval [lo, hi] (either end may be open-ended)."""
    ok = _is_number(value) and (lo is None or value >= lo) and (hi is None or value <= hi)
    require(ok, name, value, _range_text("a number", lo, hi, "a finite number"))
    return float(value)


def check_positive(name: str, value: Any) -> float:
    """A finite number > 0 (a tolerance, a scale, an ε)."""
    require(_is_number(value) and value > 0, name, value, "must be a number > 0")
    return float(value)


def check_nonnegative(name: str, value: Any) -> float:
    """A finite number >= 0."""
    require(_is_number(value) and value >= 0, name, value, "must be a number >= 0")
    return float(value)


def check_int_range(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (not a bool) in the closed range [lo, hi]."""
    ok = _is_int(value) and (lo is None or value >= lo) and (hi is None or value <= hi)
    require(ok, name, value, _range_text("an integer", lo, hi, "an integer"))
    return int(value)


def check_positive_int(name: str, value: Any) -> int:
    """An integer >= 1 (a width, a depth, a number of seeds)."""
    return check_int_range(name, value, lo=1)


def check_bool(name: str, value: Any) -> bool:
    """True or False."""
    require(isinstance(value, bool), name, value, "must be True or False")
    return value


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """One of the values in `allowed` (e.g. a registered activation name)."""
    allowed = list(allowed)
    require(value in allowed, name, value, "must be one of " + ", ".join(map(repr, allowed)))
    return value


def check_nonempty_list(name: str, value: Any) -> list:
    """A non-empty list or tuple; returned as a list."""
    ok = isinstance(value, (list, tuple)) and len(value) > 0
    require(ok, name, value, "must be a non-empty list")
    return list(value)


def check_list_of(name: str, value: Any, check: Callable[[str, Any], Any]) -> list:
    """A non-empty list whose every item passes `check` (e.g. ``P.check_positive``).

    An item that fails is reported as ``name[i] = value is not allowed: ...``.
    """
    return [check(f"{name}[{i}]", item) for i, item in enumerate(check_nonempty_list(name, value))]


def check_list_of_choices(name: str, value: Any, allowed: Sequence[Any]) -> list:
    """A non-empty list whose every item is one of `allowed`."""
    return check_list_of(name, value, lambda n, v: check_choice(n, v, allowed))


def check_profile(value: Any, name: str = "profile") -> str:
    """The execution profile: ``"quick"`` (tests) or ``"full"`` (the book)."""
    return check_choice(name, value, PROFILES)


def check_seed(value: Any, name: str = "seed") -> int:
    """An RNG seed: an integer >= 0."""
    return check_int_range(name, value, lo=0)


def check_path(name: str, value: Any) -> str:
    """A non-empty path (a string or path-like object); returned as a string."""
    ok = isinstance(value, (str, os.PathLike)) and str(os.fspath(value)).strip() != ""
    require(ok, name, value, "must be a non-empty path")
    return os.fspath(value)
