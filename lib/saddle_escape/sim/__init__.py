"""The simulation engine: models, data, gradient flow and the measurements made on it.

It imports nothing from :mod:`saddle_escape.studies` or :mod:`saddle_escape.book`; chapters and
studies reach its modules as ``sim.integrate``, ``sim.networks``, ...

The modules load on first use: the command line and the book machinery need only
:mod:`.errors`, and importing torch, scipy.stats and sympy for them cost every chapter run
(command and kernel) seconds.
"""
import importlib

_MODULES = ("activations", "counts", "data", "embedding", "errors", "escape", "fits", "imbalance", "integrate",
           "networks", "progress", "reduced", "relative_step", "saxe", "twolayer", "units")


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_MODULES))
