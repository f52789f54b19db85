"""One look for every figure of the book.

Chapters call :func:`figure` for a styled figure and :func:`colors` for the palette; nothing else
about appearance is decided in a chapter.
"""
from __future__ import annotations

from contextlib import contextmanager

import matplotlib as mpl
import matplotlib.pyplot as plt

PALETTE = ["#3b5b7a", "#1b8a7a", "#4a9bd1", "#8e5ca8", "#b07cc6", "#d1803b", "#c44e52", "#6b6b6b"]
CLASS_COLORS = {"A": "#6b6b6b", "B": "#1b8a7a", "C": "#8e5ca8", "D": "#d1803b"}

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "font.size": 10.5,
    "font.family": "serif",
    "mathtext.fontset": "cm",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.grid.which": "both",
    "grid.alpha": 0.18,
    "grid.linewidth": 0.6,
    "axes.prop_cycle": mpl.cycler(color=PALETTE),
    "lines.linewidth": 2.0,
    "lines.markersize": 5.5,
    "legend.frameon": False,
    "legend.fontsize": 9.5,
    "svg.hashsalt": "saddle-escape",  # deterministic SVG ids
}


def apply() -> None:
    """Install the book's matplotlib style globally (chapters call this once)."""
    mpl.rcParams.update(STYLE)
    mpl.rcParams["svg.fonttype"] = "none"


@contextmanager
def styled():
    with mpl.rc_context(STYLE):
        yield


def figure(ncols: int = 1, nrows: int = 1, width: float = 5.2, height: float = 3.7, **kw):
    """A styled ``(fig, axes)`` pair; the size is per panel."""
    apply()
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), constrained_layout=True, **kw)


def colors(n: int) -> list[str]:
    """``n`` colours from the book's palette (cycled)."""
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def loglog(ax, xlabel: str, ylabel: str) -> None:
    """Log-log axes with the book's labels."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
