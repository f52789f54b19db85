"""Every chapter of _toc.yml whose source exists executes in the quick profile, all claims passing."""

from pathlib import Path

import pytest

from saddle_escape.book import pipeline
from saddle_escape.book.executor import ProcessExecutor, default_workers

ROOT = Path(__file__).resolve().parents[1]
PROJECT = pipeline.Project.at(ROOT)
CHAPTERS = [p for p in (PROJECT.chapter_source(doc) for doc in pipeline.toc_chapter_docs(ROOT / "_toc.yml"))
            if p.is_file()]


@pytest.fixture(scope="module")
def quick_results(request, quick_book_lock) -> dict:
    """The selected chapters at once, one per core (the chapters are independent, so the wall time
    is the slowest core's share instead of the sum). The quick-profile output folder is shared
    with tests/test_browser.py: whichever runs second finds every chapter cached."""
    selected = {item.callspec.params["source"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}
    tasks = [pipeline.ChapterTask(source, PROJECT.out_dir("quick"), profile="quick",
                                  package_dir=PROJECT.package_dir)
             for source in CHAPTERS if source in selected]
    executor = ProcessExecutor(min(default_workers(), len(tasks)))
    try:
        with quick_book_lock():
            results = pipeline.run_chapters(tasks, executor)
    finally:
        executor.close()
    return {r.chapter: r for r in results}


@pytest.mark.parametrize("source", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_runs_in_quick_profile(source, quick_results):
    result = quick_results[source.stem]
    assert result.ok, result.message
    assert result.claims, f"{source.stem} checks no claims"
    failed = [c["key"] for c in result.claims if not c["passed"]]
    assert not failed
