"""Errors the simulation engine raises on purpose.

:class:`ParameterError` (a ValueError) names a bad parameter, its value and what is allowed;
:class:`DivergenceError` says the integration blew up and which knob to change.
"""
from __future__ import annotations

from typing import Any


class ParameterError(ValueError):
    """A chapter parameter has a value the chapter cannot use."""

    def __init__(self, name: str, value: Any, allowed: str):
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"{name} = {value!r} is not allowed: {allowed}")


class DivergenceError(RuntimeError):
    """The integration produced NaN/inf or exploded; the message names the knob to change."""
