"""The simulation engine: models, data, gradient flow and the measurements made on it.

It imports nothing from :mod:`saddle_escape.studies` or :mod:`saddle_escape.book`; chapters and
studies reach its modules as ``sim.integrate``, ``sim.networks``, ...
"""
from . import activations, data, errors, escape, fits, imbalance, integrate, networks, progress, reduced, twolayer  # noqa: F401
