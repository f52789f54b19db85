"""``python -m saddle_escape``: see :mod:`saddle_escape.book.cli`."""

import sys

from .book.cli import main

sys.exit(main())
