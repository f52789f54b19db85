"""Every chapter of _toc.yml whose source exists executes in the quick profile, all claims passing."""

from pathlib import Path

import pytest

from saddle_escape.book import pipeline

ROOT = Path(__file__).resolve().parents[1]
PROJECT = pipeline.Project.at(ROOT)
CHAPTERS = [PROJECT.chapter_source(doc) for doc in pipeline.toc_chapter_docs(ROOT / "_toc.yml")]


@pytest.mark.parametrize("source", [p for p in CHAPTERS if p.is_file()], ids=lambda p: p.stem)
def test_chapter_runs_in_quick_profile(source):
    # the quick-profile output folder is shared with tests/test_browser.py, whose book build
    # then finds every chapter cached instead of executing it a second time
    result = pipeline.run_chapter(source, PROJECT.out_dir("quick"), profile="quick",
                                  package_dir=PROJECT.package_dir)
    assert result.ok, result.message
    assert result.claims, f"{source.stem} checks no claims"
    failed = [c["key"] for c in result.claims if not c["passed"]]
    assert not failed
