"""The book machinery: the chapter-side API, parameter checks, plotting, provenance, and the
pipeline that executes chapters and builds the HTML (``python -m saddle_escape``).

A chapter uses :class:`~saddle_escape.book.chapter.ChapterRun` (claims, figures, glue, results JSON), :mod:`.params`
(validation) and :mod:`.plotting` (the book's look).
"""
from .chapter import (COMMAND_ENV, ChapterRun, ClaimsFailed, claims_markdown, describe_expected,  # noqa: F401
                      fmt_value, markdown_table, set_torch_threads, write_json_atomic)
from .executor import task_map  # noqa: F401,E402  (a chapter's inner loops: map over the cluster)
