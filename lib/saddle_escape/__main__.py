"""``python -m saddle_escape``: see :mod:`saddle_escape.cli`."""

import sys

from .cli import main

sys.exit(main())
