"""The studies: one module per chapter's experiment, each a few calls into :mod:`saddle_escape.sim`.

A study never imports the book machinery; the chapter that calls it records claims and figures.
"""
