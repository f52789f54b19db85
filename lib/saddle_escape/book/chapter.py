"""The chapter-side API: what a chapter notebook calls to record parameters, claims, figures and
glued numbers, and to write its results JSON.

A chapter looks like this::

    # --- cell tagged `parameters` ---
    profile = "full"         # "full" for the book, "quick" for tests
    seed = 0                 # RNG seed
    results_dir = "results"  # where results/<chapter>.json goes
    figures_dir = "figures"  # where figures/<chapter>/<name>.png|.svg go (.svg: full profile only)
    eps_min = 1e-4           # smallest bottleneck scale

    # --- next cell ---
    from saddle_escape import book, params as P
    run = book.ChapterRun("05_critical_depth", dict(profile=profile, seed=seed,
                          results_dir=results_dir, figures_dir=figures_dir, eps_min=eps_min))
    P.check_positive("eps_min", eps_min)

    # --- experiment cells ---
    run.claim("critical_depth.exponent[r=3,L=5]", "t_esc ∝ ε^-(r-2) for r ≥ 3",
              measured=slope, expected=-1.0, tolerance=0.02);
    run.figure(fig, "escape_times")
    run.glue("t_esc_min", t_min, fmt="{:.3g}")   # prose: {glue:text}`t_esc_min`

    # --- last cell ---
    run.finish()

Nothing goes to `results_dir` before :meth:`ChapterRun.finish`, so a chapter stopped by a bad
parameter leaves no results JSON behind.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from . import params as P
from . import provenance
from .numbers import claim_view, format_number

CLAIM_KINDS = ("abs", "rel", "max", "min", "equal")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_HTML_TAG = re.compile(r"<(?=[A-Za-z/!?])")
_REQUIRED = ("profile", "seed", "results_dir", "figures_dir")
COMMAND_ENV = "SADDLE_ESCAPE_COMMAND"  # set by the pipeline: how to re-run this execution
_IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython", "open"}


class ClaimsFailed(AssertionError):
    """Raised by :meth:`ChapterRun.finish` when at least one claim did not hold."""

    def __init__(self, chapter: str, failed: list[dict]):
        self.chapter, self.failed = chapter, failed
        details = "; ".join(f"{c['key']} (measured {fmt_value(c['measured'])}, "
                            f"expected {describe_expected(c)})" for c in failed)
        super().__init__(f"{len(failed)} claim(s) failed in {chapter}: {details}")


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


class _Silent(str):
    """A string that shows nothing when it ends a notebook cell (returned paths and texts)."""

    def _ipython_display_(self) -> None:
        pass


# --------------------------------------------------------------------------- formatting helpers

def to_jsonable(value: Any) -> Any:
    """Plain JSON data from numbers, numpy/torch scalars and arrays, paths, lists and dicts.

    Non-finite floats become the strings ``"nan"``, ``"inf"``, ``"-inf"`` (strict JSON has no
    NaN). Anything else raises ``TypeError``.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu()
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return to_jsonable(value.tolist())
    raise TypeError(f"cannot store a {type(value).__name__} in the results JSON: {value!r}")


def fmt_value(value: Any) -> str:
    """Short human form of a measured/expected value (4 significant digits for floats)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(fmt_value(v) for v in value) + "]"
    return str(value)


def describe_expected(claim: dict) -> str:
    """The expectation of a claim in words: ``-1 ± 0.02``, ``-1 ± 2%``, ``≤ 1e-10``, ``= B``."""
    kind, exp, tol = claim.get("kind", "abs"), fmt_value(claim["expected"]), claim["tolerance"]
    if kind == "abs":
        return f"{exp} ± {fmt_value(tol)}"
    if kind == "rel":
        return f"{exp} ± {fmt_value(100 * tol)}%"
    if kind == "max":
        return f"≤ {exp}" + (f" (+{fmt_value(tol)})" if tol else "")
    if kind == "min":
        return f"≥ {exp}" + (f" (−{fmt_value(tol)})" if tol else "")
    return f"= {exp}"


def claim_summary(claim: dict) -> str:
    """One line for prose: ``measured -1.003 (predicted -1 ± 0.02) ✓``."""
    mark = "✓" if claim["passed"] else "✗"
    return f"measured {fmt_value(claim['measured'])} (predicted {describe_expected(claim)}) {mark}"


def claim_family(key: str) -> str:
    """The family of a claim: its key up to ``[`` (``critical_depth.exponent[r=3,L=5]`` →
    ``critical_depth.exponent``)."""
    return key.partition("[")[0]


def family_glue_name(family: str) -> str:
    """The glue name of a family's sentence: ``claims-critical_depth-exponent``."""
    return "claims-" + re.sub(r"[^A-Za-z0-9_]+", "-", family).strip("-")


def claim_anchor(key: str) -> str:
    """The HTML id of a claim's row in its chapter's "Claims checked" table."""
    return "claim-" + re.sub(r"[^A-Za-z0-9]+", "-", key).strip("-").lower()


def group_families(claims: list[dict]) -> dict[str, list[dict]]:
    """Claims grouped by family, in the order they were first recorded."""
    families: dict[str, list[dict]] = {}
    for c in claims:
        families.setdefault(claim_family(c["key"]), []).append(c)
    return families


def worst_claim(claims: list[dict]) -> dict:
    """The claim that uses most of its allowance (a failed one first)."""
    return max(claims, key=lambda c: (not c["passed"], claim_view(c)["usage"]))


def family_sentence(claims: list[dict], description: str | None = None, *,
                    markdown: bool = False) -> str:
    """One sentence for a family of claims, with the count and the worst case:
    ``21/21 within ±0.05 of the prediction; worst 6.017 vs 6 ✓``. `description` (from
    :meth:`ChapterRun.family`) replaces the generic middle part; in `markdown` its ``$math$``
    stays math and the sentence links to the worst claim's row, in plain text the math is
    spelled out."""
    worst = worst_claim(claims)
    v = claim_view(worst, math_mode=markdown)
    passed, n = sum(c["passed"] for c in claims), len(claims)
    mark = "✓" if passed == n else "✗"
    what = v["label"] + " = " if v["label"] else ""
    if v["bound"]:
        versus = f"{what}{v['measured']} against the bound {v['limit']}"
    elif worst.get("kind") == "equal":
        versus = f"{what}{v['measured']}, predicted {v['limit']}"
    else:
        versus = f"{what}{v['measured']} vs {v['limit']}"
    text = description if markdown else tex_to_text(description) if description else None
    first = claim_view(claims[0], math_mode=markdown)
    same = all(claim_view(c, math_mode=markdown)["expected"] == first["expected"] for c in claims)
    if n == 1:
        sentence = (f"{text}: " if text else "" if what else "measured ") + f"{versus} {mark}"
    else:
        if same and v["bound"]:
            versus = f"{what}{v['measured']}"
        if text is None:
            if first["bound"]:
                text = f"below the bound {first['limit']}" if same else "within their bounds"
                if worst.get("kind") == "min" and not first["label"]:
                    text = f"above {first['limit']}" if same else "above their bounds"
            elif worst.get("kind") == "equal":
                text = "as predicted"
            else:
                spread = first["expected"].partition("±")[2].strip()
                text = f"within ±{spread} of the prediction"
        sentence = f"{passed}/{n} {text}; worst {versus} {mark}"
    if markdown:
        sentence += f' <a class="claim-link" href="#{claim_anchor(worst["key"])}">(table)</a>'
    return sentence


# TeX spelled out for plain text, longest names first (\left before \le, \geq before \ge,
# \cdots before \cdot, \top before \to, \varphi before \phi)
_TEX = [("\\left", ""), ("\\right", ""), ("\\varepsilon", "ε"), ("\\epsilon", "ε"),
        ("\\sigma", "σ"), ("\\Sigma", "Σ"), ("\\Delta", "Δ"), ("\\tau", "τ"), ("\\beta", "β"),
        ("\\lambda", "λ"), ("\\alpha", "α"), ("\\gamma", "γ"), ("\\delta", "δ"), ("\\kappa", "κ"),
        ("\\theta", "θ"), ("\\varphi", "φ"), ("\\phi", "φ"), ("\\psi", "ψ"), ("\\rho", "ρ"),
        ("\\eta", "η"), ("\\xi", "ξ"), ("\\mu", "μ"), ("\\sum", "Σ"), ("\\mathbb", ""),
        ("\\ldots", "…"), ("\\cdots", "…"),
        ("\\dots", "…"), ("\\|", "‖"), ("\\tfrac12", "½"), ("\\frac12", "½"), ("\\sqrt", "√"),
        ("\\star", "⋆"), ("\\infty", "∞"), ("\\leq", "≤"), ("\\geq", "≥"), ("\\le", "≤"),
        ("\\ge", "≥"), ("\\times", "×"), ("\\cdot", "·"), ("\\pm", "±"), ("\\propto", "∝"),
        ("^\\top", "ᵀ"), ("\\top", "ᵀ"), ("\\to", "→"), ("\\mathrm", ""), ("\\rm", ""), ("\\,", " "), ("\\;", " "),
        ("\\!", ""), ("^{-1}", "⁻¹"), ("^{2}", "²"), ("^2", "²")]


def _group(m: re.Match) -> str:
    """``s_{k+1}`` → ``s_(k+1)``: a sub- or superscript of several terms keeps its grouping
    in plain text (``s_k+1`` would read as s_k + 1); a single symbol or number loses the braces."""
    body = m.group(2)
    return m.group(1) + (f"({body})" if re.search(r"[-+,/ <>=]", body.lstrip("-")) else body)


def tex_to_text(text: str | None) -> str | None:
    """Inline ``$math$`` of a description spelled out for plain text (glue:text)."""
    if text is None:
        return None

    def plain(m: re.Match) -> str:
        t = re.sub(r"\\(ln|log|exp|min|max)(?![A-Za-z])\s*", lambda f: f.group(1) + (
            " " if f.end() < len(f.string) and f.string[f.end()] not in "({[_^}" else ""), m.group(1))
        for tex, char in _TEX:
            t = t.replace(tex, char)
        t = re.sub(r"([_^])\{([^{}]*)\}", _group, t)
        t = re.sub(r"[{}]", "", t).replace("-", "−")
        return re.sub(r"\s+", " ", t).strip()
    return re.sub(r"\$([^$]+)\$", plain, text)


class GluedText:
    """A glued value that is plain text for ``{glue:text}`` and markdown for ``{glue:md}``."""

    def __init__(self, text: str, markdown: str | None = None):
        self.text, self.markdown = text, markdown if markdown is not None else text

    def __repr__(self) -> str:
        return self.text

    def _repr_markdown_(self) -> str:
        return self.markdown


def claim_families(claims: list[dict], descriptions: dict[str, str] | None = None) -> dict[str, str]:
    """Glue name → one sentence per claim family (the key up to ``[``), for the "Checked below"
    lines of theorem boxes: ``critical_depth.exponent[r=3,L=5]`` and ``[r=4,L=6]`` both go under
    ``claims-critical_depth-exponent`` as ``2/2 within ±0.02 of the prediction; worst −0.997 vs
    −1 ✓``. Families do not depend on the parameters, so the prose can quote them whatever a
    re-runner chose."""
    descriptions = descriptions or {}
    return {family_glue_name(f): family_sentence(cs, descriptions.get(f))
            for f, cs in group_families(claims).items()}


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub/MyST markdown table; numbers go through
    :func:`saddle_escape.book.numbers.format_number` (powers of ten as math), and a ``|`` in a
    header or cell is escaped (an unescaped one ends the cell and breaks the whole table)."""
    def cell(v: Any) -> str:
        text = v if isinstance(v, str) else format_number(v, math_mode=True)
        text = text.replace("|", "\\|").replace("\n", " ")
        parts = text.split("$")  # outside $math$, stop `<name>` from being read as an HTML tag
        parts[::2] = [_HTML_TAG.sub(r"\\<", p) for p in parts[::2]]
        return "$".join(parts)
    lines = ["| " + " | ".join(cell(str(h)) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def claims_markdown(claims: list[dict]) -> str:
    """The "Claims checked" table of a chapter: status, the statement (its key small below,
    the row's anchor for links from the prose and the ledger), measured, expected. Narrow
    columns first, so a phone shows the verdict and the numbers without scrolling."""
    lines = ["| | claim | measured | expected |", "|---|---|---|---|"]
    for c in claims:
        v = claim_view(c, math_mode=True)
        statement = _md_text(c["statement"])
        key = (f'<span class="claim-key" id="{claim_anchor(c["key"])}">'
               f'{_html_escape(c["key"])}</span>')
        measured = f"{v['label']} = {v['measured']}" if v["label"] else v["measured"]
        lines.append(f"| {'✓' if c['passed'] else '✗'} | {statement} {key} | "
                     f"{_md_text(measured)} | {_md_text(v['expected'])} |")
    return "\n".join(lines)


def _md_text(text: str) -> str:
    """Text for a markdown table cell: pipes escaped, no line breaks, no stray HTML tags."""
    parts = str(text).replace("|", "\\|").replace("\n", " ").split("$")
    parts[::2] = [_HTML_TAG.sub(r"\\<", p) for p in parts[::2]]
    return "$".join(parts)


def _html_escape(text: str) -> str:
    from html import escape
    return escape(text)


def _in_ipython() -> bool:
    return "IPython" in sys.modules and sys.modules["IPython"].get_ipython() is not None


def _show_markdown(text: str) -> None:
    if _in_ipython():
        from IPython.display import Markdown, display
        display(Markdown(text))
    else:
        print(text)


# --------------------------------------------------------------------------- the chapter run

class ChapterRun:
    """One execution of one chapter: collects parameters, claims, figures and glued values.

    Parameters
    ----------
    chapter : str
        The chapter's stable name, e.g. ``"05_critical_depth"``; names the results JSON and the
        figures folder.
    parameters : dict
        The values of the `parameters` cell: an explicit dict (preferred), or ``globals()`` right
        after the parameters cell, in which case every public name holding plain data
        (numbers, strings, bools, None, and lists/tuples/dicts of them) is taken.
        Must include ``profile``, ``seed``, ``results_dir`` and ``figures_dir``.
    device, dtype
        Recorded in the environment block; default to ``parameters["device"]`` /
        ``parameters["dtype"]`` when present, else ``"cpu"`` / ``"float64"``.

    Notes
    -----
    Construction validates the four standard parameters (raising
    :class:`saddle_escape.sim.errors.ParameterError`) and seeds Python's, numpy's and torch's global
    RNGs with ``seed``.
    """

    def __init__(self, chapter: str, parameters: dict, *, device: str | None = None,
                 dtype: str | None = None):
        if not isinstance(chapter, str) or not _NAME.match(chapter):
            raise ValueError(f"chapter name {chapter!r} must be like '05_critical_depth'")
        self.chapter = chapter
        self.parameters = to_jsonable(_collect_parameters(parameters))
        for name in _REQUIRED:
            if name not in self.parameters:
                raise P.ParameterError(name, _Missing(), "every chapter's parameters cell must define it")
        self.profile = P.check_profile(self.parameters["profile"])
        self.seed = P.check_seed(self.parameters["seed"])
        self.results_dir = Path(P.check_path("results_dir", self.parameters["results_dir"]))
        self.figures_dir = Path(P.check_path("figures_dir", self.parameters["figures_dir"]))
        self.device = str(device or self.parameters.get("device", "cpu"))
        self.dtype = str(dtype or self.parameters.get("dtype", "float64"))
        self.claims: list[dict] = []
        self.figures: list[dict] = []
        self.glued: dict[str, dict] = {}
        self.families: dict[str, str] = {}
        self.glance: dict | None = None
        self._finished = False
        self._t0 = time.perf_counter()
        _seed_everything(self.seed)

    @property
    def quick(self) -> bool:
        """True in the ``"quick"`` profile (tests), False in ``"full"`` (the book)."""
        return self.profile == "quick"

    # ------------------------------------------------------------------ claims
    def claim(self, key: str, statement: str, measured: Any, expected: Any,
              tolerance: float | None = None, kind: str = "abs") -> bool:
        """Check one claim of the paper against a measured value; return whether it passed.

        The comparison depends on `kind`:

        - ``"abs"`` (default): ``|measured - expected| <= tolerance``;
        - ``"rel"``: ``|measured - expected| <= tolerance * |expected|``;
        - ``"max"``: ``measured <= expected + tolerance`` (expected is an upper bound);
        - ``"min"``: ``measured >= expected - tolerance`` (expected is a lower bound);
        - ``"equal"``: ``measured == expected`` exactly (strings, class letters, counts).

        `tolerance` defaults to 0. Numpy/torch scalars are converted to plain floats. A NaN
        measurement never passes. End the cell with ``;`` to hide the returned bool.
        """
        P.check_choice("kind", kind, CLAIM_KINDS)
        if not isinstance(key, str) or not key:
            raise ValueError("a claim key must be a non-empty string")
        if any(c["key"] == key for c in self.claims):
            raise ValueError(f"claim {key!r} was already recorded in this chapter")
        measured, expected = to_jsonable(measured), to_jsonable(expected)
        if kind == "equal":
            tolerance, passed = None, measured == expected
        else:
            tolerance = P.check_nonnegative("tolerance", 0.0 if tolerance is None else tolerance)
            passed = _compare(key, measured, expected, tolerance, kind)
        self.claims.append(dict(key=key, statement=str(statement), measured=measured,
                                expected=expected, tolerance=tolerance, passed=bool(passed),
                                kind=kind))
        return bool(passed)

    def family(self, family: str, description: str) -> None:
        """Describe a family of claims (keys ``family[...]``) for the reader, in markdown with
        ``$math$``: ``run.family("identity.drift_exponent", "drift exponents within ±0.05 of
        $L - l + q\\,l$")``. It becomes the middle of the family's "Checked below" sentence
        (``21/21 drift exponents …; worst 6.017 vs 6``) and the family's row in the ledger.
        Without it the sentence says ``within ±0.05 of the prediction``."""
        if not isinstance(family, str) or "[" in family or not family:
            raise ValueError(f"a claim family is a key without its [...] part, got {family!r}")
        self.families[family] = str(description)

    def at_a_glance(self, sentence: str, figure: str | None = None) -> None:
        """The chapter's result in one sentence (markdown, ``$math$`` allowed) and the name of
        its headline figure (as given to :meth:`figure`). :meth:`finish` glues the box
        ``at-a-glance``: the sentence, the figure and this build's verdict (n/n claims, the
        one closest to its limit). The page shows it with a ``glue:md`` directive of
        format ``myst`` near the top (see PAGE_CONVENTIONS)."""
        self.glance = dict(sentence=str(sentence), figure=figure)

    # ------------------------------------------------------------------ figures
    def figure(self, fig, name: str, caption: str | None = None, *, display: bool = True) -> str:
        """Save `fig` as ``figures_dir/<chapter>/<name>.png`` (150 dpi) and, in the full profile,
        ``.svg`` (the page's zoomable copy; the quick profile, for tests and checks, skips it: it is
        the slower half of saving a figure, 1 s of a chapter's 30), show it in the notebook (so it
        appears on the page), close it, and record it in the results.

        For a numbered caption on the page, give the code cell ``mystnb: figure:`` metadata;
        `caption` is stored in the results JSON. Returns the PNG path.
        """
        import matplotlib
        import matplotlib.pyplot as plt

        if not _NAME.match(name):
            raise ValueError(f"figure name {name!r} must be a simple file name like 'escape_times'")
        if any(f["name"] == name for f in self.figures):
            raise ValueError(f"figure {name!r} was already saved in this chapter")
        from . import plotting

        folder = self.figures_dir / self.chapter
        folder.mkdir(parents=True, exist_ok=True)
        png, svg = folder / f"{name}.png", folder / f"{name}.svg"
        # Legible at the text column whatever the chapter asked for: no wider than the column,
        # no text smaller than the book's minimum (the page shows the PNG scaled to the column).
        size = plotting.fit_to_column(fig)
        with matplotlib.rc_context({"svg.hashsalt": f"{self.chapter}/{name}"}):  # stable SVG ids
            fig.savefig(png, dpi=plotting.DPI, bbox_inches="tight", facecolor="white")
            if not self.quick:
                fig.savefig(svg, bbox_inches="tight", metadata={"Date": None}, facecolor="white")
        alt = " ".join(str(caption or name.replace("_", " ")).split())
        if display and _in_ipython():
            # Show the saved file itself: the page gets exactly the PNG on disk, whatever
            # matplotlib backend the kernel inherited (with Agg, display(fig) is only text).
            from IPython.display import HTML, Image, display as ipy_display
            ipy_display(Image(filename=str(png), metadata={"alt": alt}))
            ipy_display(HTML(self.provenance_html()))
        plt.close(fig)
        self.figures.append(dict(name=name, caption=caption, png=str(png), svg=None if self.quick else str(svg),
                                 command=self.command, **size))
        return _Silent(png)

    @functools.cached_property
    def environment(self) -> dict:
        """The versions, git commit, device and dtype of this run, computed once (it asks git)."""
        return provenance.environment(self.device, self.dtype)

    @property
    def command(self) -> str:
        """The shell command that regenerates this run (set by the pipeline; outside it, the
        plain command for the chapter's defaults)."""
        return os.environ.get(COMMAND_ENV) or f"python -m saddle_escape run {self.chapter.split('_')[0]}"

    def provenance_html(self) -> str:
        """The line shown under every figure: command, seed, versions, commit, device, and
        (folded) every parameter of the run."""
        from html import escape
        env = self.environment
        commit = env["git_commit"][:10]
        params = ", ".join(f"{k} = {v!r}" for k, v in self.parameters.items()
                           if k not in ("results_dir", "figures_dir"))
        return (f'<details class="provenance"><summary>Made by <code>{escape(self.command)}</code>'
                f" · seed {self.seed} · saddle_escape {escape(env['saddle_escape'])}, commit "
                f"<code>{escape(commit)}</code> · {escape(env['device'])}, {escape(env['dtype'])}"
                f" · torch {escape(env['torch'])}</summary><code>{escape(params)}</code></details>")

    # ------------------------------------------------------------------ glue and tables
    def glue(self, name: str, value: Any, fmt: str | None = None) -> str:
        """Glue ``fmt.format(value)`` (or ``str(value)``) for the prose to show with the MyST
        role ``glue:text`` (written ``{glue:text}`` followed by the name in backquotes); also
        stored under ``"glued"`` in the results. Returns the formatted text."""
        text = fmt.format(value) if fmt else str(value)
        if _in_ipython():
            from myst_nb import glue as mystnb_glue
            mystnb_glue(name, value if isinstance(value, GluedText) else text, display=False)
        try:
            stored = to_jsonable(value)
        except TypeError:
            stored = text
        self.glued[name] = {"text": text, "value": stored}
        return _Silent(text)

    def table(self, rows, columns: list[str] | None = None) -> None:
        """Show a table on the page: a pandas DataFrame, a list of dicts, or a list of rows
        with `columns`. Floats are shown with 4 significant digits."""
        if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # pandas
            columns, rows = [str(c) for c in rows.columns], rows.to_dict("records")
        rows = list(rows)
        if rows and isinstance(rows[0], dict):
            columns = columns or list(rows[0])
            rows = [[r.get(c, "") for c in columns] for r in rows]
        if columns is None and not rows:       # e.g. a re-run whose parameters leave a table empty
            _show_markdown("*(no rows for these parameters)*")
            return
        if columns is None:
            raise ValueError("give `columns` for a table of plain rows")
        _show_markdown(markdown_table(list(columns), [[to_jsonable(v) for v in r] for r in rows]))

    # ------------------------------------------------------------------ finish
    def results(self) -> dict:
        """The results record as it would be written now."""
        return {
            "chapter": self.chapter,
            "parameters": to_jsonable(self.parameters),
            "environment": self.environment,
            "wall_time_s": round(time.perf_counter() - self._t0, 3),
            "claims": list(self.claims),
            "figures": list(self.figures),
            "glued": dict(self.glued),
            "families": dict(self.families),
        }

    def finish(self) -> dict:
        """Write ``results_dir/<chapter>.json`` atomically, show the "Claims checked" table,
        and raise :class:`ClaimsFailed` (after writing) if any claim failed."""
        if self._finished:
            raise RuntimeError(f"{self.chapter}: finish() was already called")
        self._finished = True
        for family, claims in group_families(self.claims).items():
            description = self.families.get(family)
            self.glue(family_glue_name(family), GluedText(
                family_sentence(claims, description), family_sentence(claims, description, markdown=True)))
        self.glue("at-a-glance", GluedText(*self._glance_box()))
        record = self.results()
        write_json_atomic(self.results_dir / f"{self.chapter}.json", record)
        if self.claims:
            _show_markdown(claims_markdown(self.claims))
        failed = [c for c in self.claims if not c["passed"]]
        if failed:
            raise ClaimsFailed(self.chapter, failed)
        return record


    def _glance_box(self) -> tuple[str, str]:
        """The "At a glance" box as (plain text, MyST markdown)."""
        passed = sum(c["passed"] for c in self.claims)
        verdict = plain_verdict = f"{passed}/{len(self.claims)} claims hold"
        if self.claims:
            worst = worst_claim(self.claims)
            description = self.families.get(claim_family(worst["key"]))
            closest = f"; the closest to its limit is `{worst['key']}`: "
            verdict += closest + family_sentence([worst], description, markdown=True)
            plain_verdict += closest.replace("`", "") + family_sentence([worst], description)
        verdict = f"**This build:** {verdict}."
        glance = self.glance or {}
        parts = [":::{admonition} At a glance", ":class: at-a-glance", ""]
        if glance.get("sentence"):
            parts += [glance["sentence"], ""]
        figure = next((f for f in self.figures if f["name"] == glance.get("figure")), None)
        if figure is not None:
            alt = " ".join(str(figure.get("caption") or figure["name"]).split())
            parts += [f"```{{image}} ../figures/{self.chapter}/{figure['name']}.png",
                      f":alt: {alt}", ":class: book-figure at-a-glance-figure", "```", ""]
        parts += [verdict, ":::"]
        plain = " ".join(p for p in (glance.get("sentence"), f"This build: {plain_verdict}.") if p)
        return tex_to_text(plain), "\n".join(parts)


# --------------------------------------------------------------------------- internals

def write_json_atomic(path: Path, record: dict) -> None:
    """Write JSON through a temporary file in the same folder and ``os.replace`` it into place,
    so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2, ensure_ascii=False, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _compare(key: str, measured: Any, expected: Any, tolerance: float, kind: str) -> bool:
    for what, v in (("measured", measured), ("expected", expected)):
        if isinstance(v, bool) or not isinstance(v, (int, float, str)) or (
                isinstance(v, str) and v not in ("nan", "inf", "-inf")):
            raise TypeError(f"claim {key!r}: {what} must be a number for kind={kind!r}, got {v!r}")
    m, e = float(measured), float(expected)
    if math.isnan(m) or math.isnan(e):
        return False
    if kind == "abs":
        return abs(m - e) <= tolerance
    if kind == "rel":
        return abs(m - e) <= tolerance * abs(e)
    if kind == "max":
        return m <= e + tolerance
    return m >= e - tolerance


def _is_plain_data(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain_data(v) for k, v in value.items())
    return False


def _collect_parameters(parameters: dict) -> dict:
    if not isinstance(parameters, dict):
        raise TypeError("ChapterRun needs the parameters as a dict (or globals())")
    if "__builtins__" not in parameters and "__name__" not in parameters:
        return dict(parameters)
    return {k: v for k, v in parameters.items()
            if not k.startswith("_") and k not in _IPYTHON_NAMES and _is_plain_data(v)}


def _seed_everything(seed: int) -> None:
    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)
    set_torch_threads()


def set_torch_threads() -> int:
    """Give torch ``SADDLE_ESCAPE_THREADS`` threads (default 1) and return the number.

    The book's tensors are tiny (a few hundred numbers per run): thread start-up costs more than
    it saves, and on a shared 2-core machine extra threads were measured up to 100x slower.
    Readers pushing to large widths raise it. Chapters, the tests and the benchmark all use this.
    """
    import torch
    n = int(os.environ.get("SADDLE_ESCAPE_THREADS", "1"))
    torch.set_num_threads(n)
    return n
