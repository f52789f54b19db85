"""The built book in a real browser: headless Chromium driven by Playwright.

Builds the quick-profile book (its chapters one per core; tests/test_chapters.py then finds them
cached, or this finds them cached from there when it runs first), serves it on
localhost and, for every page of _toc.yml: no console errors, every image decoded, every equation
typeset by the locally served MathJax, every internal link and anchor resolves; the claims ledger
shows no failed claim; full-page screenshots at desktop and phone widths land in _build/screenshots.
Without a browser the test skips with a clear message -- except in CI, where that is a failure.

Reader-facing defects that a program can see fail it too (issue 17): a markdown table rendered
as raw pipes, glued numbers in bold, figure text smaller than 10 px at the desktop column or 8 px
on a phone (from the PNG's recorded smallest font, its dpi and the size it is shown at), a table
or equation wider than a phone without a scroll container, an image whose alt text is a file
name, a launch (Binder) link to a file the repository does not have, and more visible code than
the parameters cell. ``test_checks_catch_each_defect`` feeds each check a page with the defect.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from saddle_escape.book import pipeline
from saddle_escape.book.executor import ProcessExecutor, default_workers

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "_build" / "screenshots"
VIEWPORTS = {"desktop": (1400, 900), "phone": (400, 844)}
MIN_TEXT_PX = {"desktop": 10.0, "phone": 8.0}  # smallest figure text as rendered
MAX_VISIBLE_CODE_LINES = 40  # the parameters cell (~20 lines) and little else
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("no Chromium found: .ci/run must install Debian's chromium before the tests")
        pytest.skip("no Chromium on this machine (apt-get install chromium) -- browser test skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(quick_book_lock):
    project = pipeline.Project.at(ROOT)
    executor = ProcessExecutor(default_workers())    # the chapters one per core, as `book -j`
    try:
        with quick_book_lock():
            assert pipeline.build_book(project, profile="quick", executor=executor) == 0, "the quick book did not build"
    finally:
        executor.close()
    html = project.out_dir("quick") / "_build" / "html"
    handler = functools.partial(_QuietHandler, directory=str(html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pages = ["intro"] + [doc for doc in _toc_docs() if (html / f"{doc}.html").is_file()]
    yield f"http://127.0.0.1:{server.server_address[1]}", html, pages
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _toc_docs() -> list[str]:
    text = (ROOT / "_toc.yml").read_text()
    return re.findall(r"file:\s*(\S+)", text)


def test_every_page_reads_well(browser, site):
    base, html_dir, pages = site
    SHOTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    for doc in pages:
        for label, (w, h) in VIEWPORTS.items():
            page = browser.new_page(viewport={"width": w, "height": h})
            errors: list[str] = []
            page.on("console", lambda m, e=errors: e.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc, e=errors: e.append(str(exc)))
            page.goto(f"{base}/{doc}.html", wait_until="networkidle")
            page.wait_for_function("() => !window.MathJax || !MathJax.startup || MathJax.startup.promise")
            page.evaluate("() => window.MathJax && MathJax.startup ? MathJax.startup.promise : null")
            if label == "desktop":
                problems += [f"{doc}: console error: {e}" for e in errors]
                problems += _check_images(page, doc, html_dir)
                problems += _check_math(page, doc)
                problems += _check_links(page, doc, base, html_dir)
                problems += _check_raw_tables(page, doc)
                problems += _check_bold_glue(page, doc)
                problems += _check_alt_text(page, doc)
                problems += _check_launch_links(page, doc, ROOT)
                problems += _check_visible_code(page, doc)
                if doc.endswith("claims_ledger"):
                    problems += _check_ledger(page, doc)
            else:
                problems += _check_overflow(page, doc)
            problems += _check_figure_text(page, doc, html_dir, _figure_records(html_dir), label)
            page.screenshot(path=str(SHOTS / f"{doc.replace('/', '__')}-{label}.png"), full_page=True)
            page.close()
    assert not problems, "\n".join(problems)


def _check_images(page, doc, html_dir: Path):
    broken = page.evaluate("() => [...document.images].filter(i => !i.complete || i.naturalWidth === 0)"
                           ".map(i => i.getAttribute('src'))")
    out = [f"{doc}: image not decoded: {src}" for src in broken]
    # every figure the chapter recorded is on the page as an image (not as "<Figure size ...>")
    results = html_dir.parents[1] / "results" / f"{Path(doc).name}.json"
    if doc.startswith("chapters/") and results.is_file():
        expected = len(json.loads(results.read_text())["figures"])
        shown = page.evaluate("() => document.querySelectorAll('main img').length")
        if shown < expected:
            out.append(f"{doc}: {shown} image(s) on the page, but the chapter saved {expected} figures")
        if "<Figure size" in page.evaluate("() => document.querySelector('main').innerText"):
            out.append(f"{doc}: a figure is shown as text ('<Figure size ...>')")
    return out


def _check_math(page, doc):
    # Sphinx wraps every equation in .math; once typeset each holds an mjx-container.
    raw = page.evaluate("() => [...document.querySelectorAll('.math')]"
                        ".filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 60))")
    out = [f"{doc}: equation not typeset: {t!r}" for t in raw]
    text = page.evaluate("() => document.querySelector('main') ? document.querySelector('main').innerText : ''")
    for marker in ("$$", "\\(", "\\begin{"):
        if marker in text:
            out.append(f"{doc}: raw TeX {marker!r} visible on the page")
    return out


def _check_links(page, doc, base, html_dir: Path):
    hrefs = page.evaluate("() => [...document.querySelectorAll('a[href]')].map(a => a.href)")
    out = []
    for href in set(hrefs):
        if not href.startswith(base):
            continue
        url = urlparse(href)
        path = html_dir / unquote(url.path).lstrip("/")
        if path.is_dir():
            path = path / "index.html"
        if not path.is_file():
            out.append(f"{doc}: broken link {href}")
            continue
        if url.fragment and path.suffix == ".html":
            anchor = unquote(url.fragment)
            if f'id="{anchor}"' not in path.read_text(errors="replace"):
                out.append(f"{doc}: missing anchor #{anchor} in {path.relative_to(html_dir)}")
    return out


def _check_ledger(page, doc):
    text = page.evaluate("() => document.querySelector('main').innerText")
    out = []
    if "✗" in text:
        out.append(f"{doc}: the claims ledger shows a failed claim")
    if "claims hold" not in text:
        out.append(f"{doc}: the claims ledger lists no claims")
    return out


# --------------------------------------------------------------------------- reader-facing defects

def _check_raw_tables(page, doc):
    """A markdown table that did not parse shows up as a paragraph of pipes."""
    # a row of cells: the first line starts and ends with a pipe and holds three or more
    # (a statement like "|dDelta_1/dt| ~ ..." that merely starts with one is fine)
    raw = page.evaluate("() => [...document.querySelectorAll('main p')].map(p => p.innerText.trim())"
                        ".filter(t => { const l = t.split('\\n')[0].trim();"
                        " return (l.startsWith('|') && l.endsWith('|') && l.split('|').length > 3) || t.includes('|---'); })")
    return [f"{doc}: table rendered as raw pipes: {t[:60]!r}" for t in raw]


def _check_bold_glue(page, doc):
    bold = page.evaluate("() => [...document.querySelectorAll('main span.pasted-text')]"
                         ".filter(s => parseInt(getComputedStyle(s).fontWeight) >= 600)"
                         ".map(s => s.innerText.slice(0, 40))")
    return [f"{doc}: {len(bold)} glued value(s) in bold, e.g. {bold[0]!r}"] if bold else []


def _check_alt_text(page, doc):
    alts = page.evaluate("() => [...document.querySelectorAll('main img')].map(i => i.getAttribute('alt') || '')")
    bad = [a for a in alts if not a.strip() or re.search(r"[0-9a-f]{32}|\\.(png|svg|jpe?g)$", a)]
    return [f"{doc}: image alt text is a file name or empty: {a[:50]!r}" for a in bad]


def _check_launch_links(page, doc, repo: Path):
    """Launch buttons (Binder and the like) must open a file the repository has."""
    hrefs = page.evaluate("() => [...document.querySelectorAll('a[href*=\"urlpath=\"], a[href*=\"filepath=\"]')]"
                          ".map(a => a.href)")
    out = []
    for href in hrefs:
        m = re.search(r"(?:urlpath=(?:lab/)?tree|filepath=)(?:/|%2F)?([^&]+)", href)
        path = unquote(m.group(1)) if m else ""
        if not path or not (repo / path).is_file():
            out.append(f"{doc}: launch link opens {path or href!r}, which the repository does not have")
    return out


def _check_visible_code(page, doc):
    lines = page.evaluate("""() => [...document.querySelectorAll('main .cell_input pre')]
        .filter(p => p.offsetParent !== null && p.getClientRects().length)
        .reduce((n, p) => n + p.innerText.trimEnd().split('\\n').length, 0)""")
    if lines > MAX_VISIBLE_CODE_LINES:
        return [f"{doc}: {lines} lines of code visible (at most {MAX_VISIBLE_CODE_LINES}: fold bookkeeping)"]
    return []


def _check_overflow(page, doc):
    """At phone width nothing may widen the page: a wide table or display equation must sit in
    a container that scrolls sideways."""
    found = page.evaluate("""() => {
        const W = window.innerWidth, out = [];
        if (document.documentElement.scrollWidth > W + 1) out.push('the page scrolls sideways');
        for (const el of document.querySelectorAll('main table, main mjx-container[display="true"], main pre')) {
            if (el.getBoundingClientRect().right <= W + 1) continue;
            let ok = false;
            for (let a = el; a && a.tagName !== 'MAIN'; a = a.parentElement) {
                const o = getComputedStyle(a).overflowX;
                if ((o === 'auto' || o === 'scroll' || o === 'hidden') && a.getBoundingClientRect().right <= W + 1) { ok = true; break; }
            }
            if (!ok) out.push(el.tagName.toLowerCase() + ': ' + el.innerText.slice(0, 50).replace(/\\s+/g, ' '));
        }
        return out;
    }""")
    return [f"{doc}: wider than a phone without a scroll container: {t!r}" for t in found]


@functools.lru_cache(maxsize=None)
def _figure_records(html_dir: Path) -> dict:
    """SHA-256 of each saved figure PNG → its record (results/<chapter>.json, "figures")."""
    records = {}
    for results in (html_dir.parents[1] / "results").glob("*.json"):
        for fig in json.loads(results.read_text()).get("figures", []):
            png = html_dir.parent / "src" / fig["png"]  # the staged copy the page was built from
            if png.is_file():
                records[hashlib.sha256(png.read_bytes()).hexdigest()] = fig
    return records


def _check_figure_text(page, doc, html_dir: Path, records: dict, label: str):
    """The smallest text of every figure, as the page shows it: recorded font size (points)
    × dpi / 72 × shown width / PNG width."""
    shown = page.evaluate("() => [...document.querySelectorAll('main img')].filter(i => i.clientWidth > 0)"
                          ".map(i => [i.getAttribute('src'), i.clientWidth, i.naturalWidth])")
    out = []
    for src, width, natural in shown:
        path = (html_dir / Path(doc).parent / src).resolve()
        if not path.is_file() or path.suffix != ".png":
            continue
        fig = records.get(hashlib.sha256(path.read_bytes()).hexdigest())
        if fig is None:
            if doc.startswith("chapters/"):
                out.append(f"{doc}: image {src} was not saved by run.figure (no recorded text size)")
            continue
        if "min_font_pt" not in fig:
            out.append(f"{doc}: figure {fig['name']} has no recorded text size (re-run the chapter)")
            continue
        px = fig["min_font_pt"] / 72 * fig["dpi"] * width / natural
        if px < MIN_TEXT_PX[label] - 0.05:
            out.append(f"{doc}: figure {fig['name']}: smallest text {px:.1f} px at {label} width "
                       f"(at least {MIN_TEXT_PX[label]:g})")
    return out


DEFECTS = {
    "raw table": ("<main><p>| a | b |<br>|---|---|</p></main>", _check_raw_tables),
    "bold glue": ("<main><p>x <span class='pasted-text' style='font-weight:bold'>1.0</span></p></main>",
                  _check_bold_glue),
    "hashed alt": (f"<main><img alt='../_images/{'ab' * 32}.png' src='data:,'></main>", _check_alt_text),
    "launch link": ("<main><a href='https://mybinder.org/v2/gh/o/r/main?urlpath=tree/chapters/"
                    "05_critical_depth.ipynb'>binder</a></main>", lambda p, d: _check_launch_links(p, d, ROOT)),
    "visible code": ("<main><div class='cell_input'><pre>" + "x = 1\n" * 60 + "</pre></div></main>",
                     _check_visible_code),
    "wide table": ("<main><table style='width:900px'><tr><td>wide</td></tr></table></main>", _check_overflow),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_checks_catch_each_defect(browser, defect):
    html, check = DEFECTS[defect]
    page = browser.new_page(viewport={"width": 400, "height": 800})
    page.set_content(f"<html><body>{html}</body></html>")
    assert check(page, "demo"), f"the {defect} check did not notice the defect"
    page.set_content("<html><body><main><p>fine</p></main></body></html>")
    assert not check(page, "demo")
    page.close()


def test_figure_text_check_catches_small_text(browser, tmp_path):
    """A figure 16 in wide (10 pt text) shown in a 400 px phone column has ~4 px text."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(16, 4))
    ax.plot([0, 1])
    fig.savefig(tmp_path / "wide.png", dpi=150)
    plt.close(fig)
    digest = hashlib.sha256((tmp_path / "wide.png").read_bytes()).hexdigest()
    records = {digest: dict(name="wide", min_font_pt=10.0, dpi=150)}
    (tmp_path / "chapters").mkdir()
    (tmp_path / "chapters" / "x.html").write_text(
        "<html><body><main><img alt='a wide figure' src='../wide.png' style='max-width:100%'>"
        "</main></body></html>")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    page = browser.new_page(viewport={"width": 400, "height": 800})
    page.goto(f"http://127.0.0.1:{server.server_address[1]}/chapters/x.html", wait_until="load")
    problems = _check_figure_text(page, "chapters/x", tmp_path, records, "phone")
    page.close()
    server.shutdown()
    assert problems and "smallest text" in problems[0]
