import os

os.environ.setdefault("MPLBACKEND", "Agg")

from saddle_escape.book import set_torch_threads  # noqa: E402

set_torch_threads()  # as in every chapter
