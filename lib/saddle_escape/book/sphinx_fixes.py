"""Small Sphinx fixes for the book's HTML, registered in _config.yml.

sphinx-thebe and sphinx-togglebutton (pulled in by jupyter-book) each emit their inline
configuration script twice per page; the second ``const THEBE_JS_URL`` is a console error in
every browser. After the build, each page keeps only the first copy of an inline script line.
"""
from __future__ import annotations

import re
from pathlib import Path

_INLINE = re.compile(r"^\s*<script>.*</script>\s*$")


def dedupe_inline_scripts(html: str) -> str:
    """Drop repeated identical one-line inline ``<script>`` elements (first copy kept)."""
    seen: set[str] = set()
    out = []
    for line in html.splitlines(keepends=True):
        if _INLINE.match(line):
            if line.strip() in seen:
                continue
            seen.add(line.strip())
        out.append(line)
    return "".join(out)


def _fix_pages(app, exc):
    if exc is not None or app.builder.format != "html":
        return
    for page in Path(app.outdir).rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        fixed = dedupe_inline_scripts(text)
        if fixed != text:
            page.write_text(fixed, encoding="utf-8")


def setup(app):
    app.connect("build-finished", _fix_pages)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
