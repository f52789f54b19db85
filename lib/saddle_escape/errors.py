"""Errors the simulation core raises on purpose (bad parameters raise ParameterError, a ValueError)."""
from .params import ParameterError  # noqa: F401  (re-exported: one place to import errors from)


class DivergenceError(RuntimeError):
    """The integration produced NaN/inf or exploded; the message names the knob to change."""
