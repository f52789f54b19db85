"""One look for every figure of the book.

Chapters call :func:`figure` for a styled figure and :func:`colors` for the palette; nothing else
about appearance is decided in a chapter.

Figures are drawn for the text column: the page shows the PNG scaled to the column (about 768 px
on a desktop, 360 px on a phone), so a figure wider than ``COLUMN_IN`` inches, or text
smaller than ``MIN_FONT_PT``, would be illegible there. :func:`figure` stacks panels that
would not fit side by side, and :func:`fit_to_column` (called by ``ChapterRun.figure`` before
saving) shrinks a figure to the column and raises any smaller text to the minimum, so a chapter
cannot produce an illegible figure even with hand-made sizes.
"""
from __future__ import annotations

from contextlib import contextmanager

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np

PALETTE = ["#3b5b7a", "#1b8a7a", "#4a9bd1", "#8e5ca8", "#b07cc6", "#d1803b", "#c44e52", "#6b6b6b"]
CLASS_COLORS = {"A": "#6b6b6b", "B": "#1b8a7a", "C": "#8e5ca8", "D": "#d1803b"}

DPI = 150            # PNG resolution
COLUMN_IN = 6.0      # widest figure: 900 px at 150 dpi, shown at the column width
MIN_FONT_PT = 10.0   # smallest text: ≥ 8 px on a 360 px phone column, ≥ 10 px at 768 px

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": DPI,
    "savefig.bbox": "tight",
    "font.size": 11,
    "axes.titlesize": 11,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "figure.facecolor": "white",   # legible on the theme's dark background too
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
    "legend.fontsize": 10,
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
    """A styled ``(fig, axes)`` pair sized for the text column; `width` and `height` are per
    panel, in inches.

    A panel wider than the column is scaled down (aspect kept). When `ncols` panels do not fit
    side by side, they are stacked in one column instead, but ``axes`` keeps the shape the
    chapter asked for (``fig, (ax, bx) = figure(2)`` and ``axes[0][1]`` with
    ``squeeze=False`` work either way), so a chapter need not know the layout.
    """
    apply()
    if width > COLUMN_IN:
        width, height = COLUMN_IN, height * COLUMN_IN / width
    if ncols > 1 and ncols * width > COLUMN_IN:
        squeeze = kw.pop("squeeze", True)
        shared = {k: kw.pop(k) for k in ("sharex", "sharey") if k in kw}
        fig, stacked = plt.subplots(nrows * ncols, 1, figsize=(width, height * nrows * ncols),
                                    constrained_layout=True, squeeze=False, **kw)
        axes = np.array(stacked[:, 0]).reshape(nrows, ncols)
        _share(axes, shared)
        if squeeze:
            axes = axes.squeeze()
            axes = axes.item() if axes.ndim == 0 else axes
        return fig, axes
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows),
                        constrained_layout=True, **kw)


def _share(axes, shared: dict) -> None:
    """``sharex``/``sharey`` of :func:`matplotlib.pyplot.subplots` on the requested grid."""
    for name, how in shared.items():
        if how in (False, "none"):
            continue
        for i, j in np.ndindex(axes.shape):
            ref = {True: axes[0, 0], "all": axes[0, 0], "row": axes[i, 0], "col": axes[0, j]}[how]
            if ref is not axes[i, j]:
                getattr(axes[i, j], name)(ref)


def fit_to_column(fig) -> dict:
    """Make `fig` legible in the text column and return what the page check needs.

    A figure wider than ``COLUMN_IN`` is scaled down to it (its text keeps its point size,
    so it grows relative to the plot), and any visible text smaller than ``MIN_FONT_PT``
    is raised to it. Returns ``width_in``, ``height_in``, ``dpi`` and ``min_font_pt``: the
    rendered size of the smallest text at a column of ``w`` pixels is
    ``min_font_pt / 72 * dpi * w / (width_in * dpi)``.
    """
    from matplotlib.text import Text

    w, h = fig.get_size_inches()
    if w > COLUMN_IN:
        fig.set_size_inches(COLUMN_IN, h * COLUMN_IN / w)
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    for t in texts:
        if t.get_fontsize() < MIN_FONT_PT:
            t.set_fontsize(MIN_FONT_PT)
    w, h = fig.get_size_inches()
    smallest = min((t.get_fontsize() for t in texts), default=MIN_FONT_PT)
    return dict(width_in=round(float(w), 3), height_in=round(float(h), 3), dpi=DPI,
                min_font_pt=round(float(smallest), 2))


def colors(n: int) -> list[str]:
    """``n`` colours from the book's palette (cycled)."""
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def loglog(ax, xlabel: str, ylabel: str) -> None:
    """Log-log axes with the book's labels."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
