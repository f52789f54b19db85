"""The built book in a real browser: headless Chromium driven by Playwright.

Builds the quick-profile book (chapters are cached from tests/test_chapters.py), serves it on
localhost and, for every page of _toc.yml: no console errors, every image decoded, every equation
typeset by the locally served MathJax, every internal link and anchor resolves; the claims ledger
shows no failed claim; full-page screenshots at desktop and phone widths land in _build/screenshots.
Without a browser the test skips with a clear message -- except in CI, where that is a failure.
"""
from __future__ import annotations

import functools
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

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "_build" / "screenshots"
VIEWPORTS = {"desktop": (1280, 900), "phone": (390, 844)}
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
def site():
    project = pipeline.Project.at(ROOT)
    assert pipeline.build_book(project, profile="quick") == 0, "the quick book did not build"
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
                if doc.endswith("claims_ledger"):
                    problems += _check_ledger(page, doc)
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
