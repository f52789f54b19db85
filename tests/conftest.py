import contextlib
import fcntl
import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

from saddle_escape.book import set_torch_threads  # noqa: E402

set_torch_threads()  # as in every chapter


@pytest.fixture(scope="session")
def quick_book_lock():
    """Held while the quick book's chapters execute. tests/test_chapters.py and tests/test_browser.py
    both execute them into one output folder, and under pytest-xdist (make test) they can run at
    once on two workers: the second waits, then finds every chapter cached."""
    path = Path(__file__).resolve().parents[1] / "_build" / "quick.lock"

    @contextlib.contextmanager
    def hold():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    return hold
