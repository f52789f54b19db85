"""Progress bars for terminal re-runs that never end up in the executed notebook.

Inside a papermill-executed notebook ``sys.stderr`` is captured into cell output, but the kernel
process's own ``sys.__stderr__`` is the terminal that launched the run; writing there shows the
bar to a person re-running a chapter and keeps the HTML clean. With no terminal it is silent.
(tqdm.auto is deliberately not used: in a notebook it would pick the widget we want to avoid.)
"""
from __future__ import annotations

import sys

from tqdm import tqdm


def bar(iterable=None, *, total=None, desc: str = "", enabled: bool = True):
    """A tqdm bar on the terminal's stderr, disabled when that is not a terminal."""
    stream = sys.__stderr__
    on = enabled and stream is not None and stream.isatty()
    return tqdm(iterable, total=total, desc=desc, file=stream, disable=not on, leave=False,
                dynamic_ncols=True)
