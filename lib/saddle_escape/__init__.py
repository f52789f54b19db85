"""Saddle Escape: the simulation engine, the studies and the book machinery of the companion book.

Three rooms, with imports pointing one way only (``book`` → ``studies`` → ``sim``):

* :mod:`saddle_escape.sim` — the simulation engine: activations, data, networks, the reduced
  chain, the integrator, escape times, fits. It knows nothing of chapters or the book.
* :mod:`saddle_escape.studies` — one module per chapter's experiment, each calling the engine.
* :mod:`saddle_escape.book` — the book machinery: the chapter-side API (:class:`~saddle_escape.book.chapter.ChapterRun`),
  parameter checks, plotting, the papermill pipeline and ``python -m saddle_escape``.

A chapter starts with ``from saddle_escape import book, sim, studies``.
"""

__version__ = "0.1.0"
