"""Small Sphinx fixes for the book's HTML, registered in _config.yml.

* sphinx-thebe and sphinx-togglebutton (pulled in by jupyter-book) each emit their inline
  configuration script twice per page; the second ``const THEBE_JS_URL`` is a console error in
  every browser. After the build, each page keeps only the first copy of an inline script line.
* Every figure a chapter saved opens as its SVG on click: myst-nb names an image output by the
  SHA-256 of its bytes, and ``ChapterRun.figure`` shows exactly the PNG on disk, so the hash
  finds the figure's SVG next to it, which is copied into the HTML.
* The launch (Binder) button points at ``chapters/NN_name.ipynb``, which the repository does not
  have (its chapters are the MyST sources ``chapters/NN_name.md``, which Jupytext opens as
  notebooks); the link is pointed at the source.
* Bibliography labels read like the author-year citations in the text ("Saxe et al. 2014"),
  not pybtex's alpha labels ("[JGcSimcsek+21]").
"""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

_LAUNCH = re.compile(r"(urlpath=(?:tree|lab/tree)(?:/|%2F)chapters(?:/|%2F)\d\d_[A-Za-z0-9_]+)\.ipynb")

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


def launch_links_to_sources(html: str) -> str:
    """Point Binder links at the chapter's MyST source instead of a notebook that is not in
    the repository."""
    return _LAUNCH.sub(r"\1.md", html)


def link_figures_to_svg(html: str, svgs: dict[str, str]) -> str:
    """Wrap each ``<img src="…/_images/<sha256>.png">`` whose hash is a saved figure in a link
    to that figure's SVG; `svgs` maps the hash to the SVG's path below the HTML root."""
    def wrap(m: re.Match) -> str:
        prefix, digest = m.group("prefix"), m.group("hash")
        if digest not in svgs:
            return m.group(0)
        return (f'<a class="figure-svg" href="{prefix}{svgs[digest]}" '
                f'title="Open the figure as SVG (scalable)">{m.group(0)}</a>')
    return re.sub(r'<img [^>]*src="(?P<prefix>(?:\.\./)*)_images/(?P<hash>[0-9a-f]{64})\.png"[^>]*>',
                  wrap, html)


def _figure_svgs(srcdir: Path, outdir: Path) -> dict[str, str]:
    """Copy each saved figure's SVG into the HTML and map its PNG's hash to the copy."""
    svgs = {}
    for png in sorted((srcdir / "figures").glob("*/*.png")):
        svg = png.with_suffix(".svg")
        if svg.is_file():
            rel = Path("_images") / "svg" / png.parent.name / svg.name
            (outdir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(svg, outdir / rel)
            svgs[hashlib.sha256(png.read_bytes()).hexdigest()] = rel.as_posix()
    return svgs


def _fix_pages(app, exc):
    if exc is not None or app.builder.format != "html":
        return
    svgs = _figure_svgs(Path(app.srcdir), Path(app.outdir))
    for page in Path(app.outdir).rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        fixed = link_figures_to_svg(launch_links_to_sources(dedupe_inline_scripts(text)), svgs)
        if fixed != text:
            page.write_text(fixed, encoding="utf-8")


def _register_author_year_labels() -> None:
    """A pybtex style ``authoryear``: the plain style with "Saxe et al. 2014" labels."""
    from pybtex.plugin import register_plugin
    from pybtex.style.formatting.plain import Style as Plain
    from pybtex.style.labels import BaseLabelStyle

    class AuthorYearLabels(BaseLabelStyle):
        def format_labels(self, sorted_entries):
            for entry in sorted_entries:
                people = entry.persons.get("author") or entry.persons.get("editor") or []
                names = [" ".join(p.last_names) for p in people]
                who = (names[0] if len(names) == 1 else " & ".join(names) if len(names) == 2
                       else f"{names[0]} et al." if names else entry.key)
                yield f"{_untex(who)} {entry.fields.get('year', '')}".strip()

    class AuthorYear(Plain):
        default_label_style = "authoryear"

    register_plugin("pybtex.style.labels", "authoryear", AuthorYearLabels, force=True)
    register_plugin("pybtex.style.formatting", "authoryear", AuthorYear, force=True)


def _untex(text: str) -> str:
    """Drop the TeX braces and accent commands of a bibtex name (``\\c{S}im\\c{s}ek`` → Simsek)."""
    return re.sub(r"\\[a-zA-Z'\"`^~=.]\s*|[{}]", "", text)


def setup(app):
    _register_author_year_labels()
    app.connect("build-finished", _fix_pages)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
