"""Saddle Escape: the simulation core and book machinery of the Saddle Escape companion book.

Chapters use :mod:`saddle_escape.book` (results, claims, figures) and
:mod:`saddle_escape.params` (parameter validation); ``python -m saddle_escape`` runs chapters
and builds the book (:mod:`saddle_escape.cli`).
"""

__version__ = "0.1.0"
