"""The chapter-side API (saddle_escape.book), used in-process without a kernel."""

import io
import json
import math
import re
import tokenize
from pathlib import Path

import jupytext
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from saddle_escape import book
from saddle_escape.book import plotting
from saddle_escape.book.params import ParameterError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(tmp_path):
    return book.ChapterRun("42_demo", dict(profile="quick", seed=0, results_dir=str(tmp_path / "results"),
                                           figures_dir=str(tmp_path / "figures"), eps=1e-3))


def test_standard_parameters_are_validated(tmp_path):
    good = dict(profile="quick", seed=0, results_dir="r", figures_dir="f")
    with pytest.raises(ParameterError, match="profile = 'fast' is not allowed"):
        book.ChapterRun("42_demo", {**good, "profile": "fast"})
    with pytest.raises(ParameterError, match="seed = -1 is not allowed"):
        book.ChapterRun("42_demo", {**good, "seed": -1})
    missing = dict(good)
    del missing["figures_dir"]
    with pytest.raises(ParameterError, match="figures_dir = <missing>"):
        book.ChapterRun("42_demo", missing)
    with pytest.raises(ValueError):
        book.ChapterRun("../evil", good)


def test_globals_are_filtered_to_plain_data():
    namespace = {"__name__": "__main__", "__builtins__": {}, "profile": "quick", "seed": 1,
                 "results_dir": "r", "figures_dir": "f", "r_values": [3, 4], "np": np,
                 "In": [""], "_hidden": 1, "fn": print}
    run = book.ChapterRun("42_demo", namespace)
    assert run.parameters == {"profile": "quick", "seed": 1, "results_dir": "r",
                              "figures_dir": "f", "r_values": [3, 4]}


def test_seed_is_applied():
    params = dict(profile="quick", seed=7, results_dir="r", figures_dir="f")
    book.ChapterRun("42_demo", params)
    a = (np.random.rand(), torch.rand(1).item())
    book.ChapterRun("42_demo", params)
    assert (np.random.rand(), torch.rand(1).item()) == a


@pytest.mark.parametrize("kind, measured, expected, tol, passed", [
    ("abs", -1.003, -1.0, 0.02, True),
    ("abs", -0.91, -1.0, 0.02, False),
    ("rel", 101.0, 100.0, 0.02, True),
    ("rel", 103.0, 100.0, 0.02, False),
    ("max", 1e-12, 1e-10, None, True),
    ("max", 1e-9, 1e-10, None, False),
    ("min", 0.9995, 0.999, None, True),
    ("min", 0.99, 0.999, None, False),
    ("equal", "B", "B", None, True),
    ("equal", "C", "B", None, False),
    ("abs", math.nan, 1.0, 10.0, False),
])
def test_claim_kinds(run, kind, measured, expected, tol, passed):
    assert run.claim("k", "s", measured, expected, tolerance=tol, kind=kind) is passed
    assert run.claims[0]["passed"] is passed and run.claims[0]["kind"] == kind


def test_claim_converts_numpy_and_torch_scalars(run):
    run.claim("a", "s", np.float64(1.0), torch.tensor(1.0, dtype=torch.float64), tolerance=np.float32(0.1))
    run.claim("b", "s", np.int64(3), 3, kind="equal")
    c = run.claims
    assert type(c[0]["measured"]) is float and type(c[0]["expected"]) is float
    assert type(c[1]["measured"]) is int
    json.dumps(c, allow_nan=False)


def test_claim_rejects_duplicates_and_bad_kinds(run):
    run.claim("a", "s", 1.0, 1.0)
    with pytest.raises(ValueError, match="already recorded"):
        run.claim("a", "s", 1.0, 1.0)
    with pytest.raises(ParameterError, match="kind = 'approx'"):
        run.claim("b", "s", 1.0, 1.0, kind="approx")
    with pytest.raises(TypeError, match="must be a number"):
        run.claim("c", "s", "x", 1.0)


@pytest.mark.parametrize("profile", ["full", "quick"])
def test_figure_saves_png_and_svg_in_the_full_profile(profile, tmp_path):
    run = book.ChapterRun("42_demo", dict(profile=profile, seed=0, results_dir=str(tmp_path / "results"),
                                          figures_dir=str(tmp_path / "figures")))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    png = run.figure(fig, "line", caption="a line")
    svg = tmp_path / "figures" / "42_demo" / "line.svg"
    assert png == str(tmp_path / "figures" / "42_demo" / "line.png")
    assert svg.is_file() == (profile == "full")            # quick (tests, checks) skips the slower half
    assert not plt.fignum_exists(fig.number)
    assert run.figures == [{"name": "line", "caption": "a line", "png": png,
                            "svg": str(svg) if profile == "full" else None,
                            "command": "python -m saddle_escape run 42", "width_in": 6.0,
                            "height_in": 4.5, "dpi": 150, "min_font_pt": 10.0}]
    with pytest.raises(ValueError):
        run.figure(plt.figure(), "../x")


def test_glue_formats_and_records(run):
    assert run.glue("t_min", 1.23456e-5, fmt="{:.3g}") == "1.23e-05"
    assert run.glued["t_min"] == {"text": "1.23e-05", "value": 1.23456e-05}


def test_finish_glues_one_summary_per_claim_family(run):
    run.claim("critical_depth.exponent[r=3,L=5]", "s", -1.003, -1.0, tolerance=0.02)
    run.claim("critical_depth.exponent[r=4,L=6]", "s", -2.1, -2.0, tolerance=0.02)
    run.claim("x.bound", "s", 0.5, 1.0, kind="max")
    with pytest.raises(book.ClaimsFailed):
        run.finish()
    # one sentence per family: the count and the worst case, digits matching the tolerance
    assert run.glued["claims-critical_depth-exponent"]["text"] == (
        "1/2 within ±0.02 of the prediction; worst −2.100 vs −2 ✗")
    assert run.glued["claims-x-bound"]["text"] == "measured 0.5 against the bound 1 ✓"
    assert "2/3 claims hold" in run.glued["at-a-glance"]["text"]


def test_family_descriptions_and_at_a_glance(run, tmp_path):
    run.family("k.exponent", r"drift exponents within ±0.05 of $L - l + q\,l$")
    for l, m in enumerate([6.017, 8.001, 9.99], start=1):
        run.claim(f"k.exponent[l={l}]", "s", m, 4.0 + 2 * l, tolerance=0.05)
    run.claim("k.fit", "t linear in log(1/ε) (R² of the fit)", 0.99998, 0.999, kind="min")
    fig, ax = plotting.figure()
    ax.plot([0, 1])
    run.figure(fig, "headline", caption="The headline.")
    run.at_a_glance(r"The drift is $\varepsilon^{L-l+ql}$.", figure="headline")
    run.finish()
    assert run.glued["claims-k-exponent"]["text"] == (
        "3/3 drift exponents within ±0.05 of L − l + q l; worst 6.017 vs 6 ✓")
    assert run.glued["claims-k-fit"]["text"] == "1 − R² = 2×10⁻⁵ against the bound 0.001 ✓"
    glance = run.glued["at-a-glance"]["text"]
    assert glance.startswith("The drift is ε") and "4/4 claims hold" in glance
    assert "k.exponent[l=1]" in glance  # the claim closest to its limit
    record = json.loads((tmp_path / "results" / "42_demo.json").read_text())
    assert record["families"] == {"k.exponent": r"drift exponents within ±0.05 of $L - l + q\,l$"}
    with pytest.raises(ValueError):
        run.family("k.exponent[l=1]", "x")


@pytest.mark.parametrize("value, plain, math_mode", [
    (6.01734, "6.017", "6.017"), (-1, "−1", "−1"), (3.333e14, "3.333×10¹⁴", r"$3.333\times10^{14}$"),
    (1.954e-6, "1.954×10⁻⁶", r"$1.954\times10^{-6}$"), (1e-10, "10⁻¹⁰", "$10^{-10}$"),
    (0.0032, "0.0032", "0.0032"), (0.0, "0", "0"), ("B", "B", "B"),
])
def test_one_formatter(value, plain, math_mode):
    from saddle_escape.book.numbers import format_number
    assert format_number(value) == plain
    assert format_number(value, math_mode=True) == math_mode
    assert "e-" not in format_number(value) and "e+" not in format_number(value)


def test_claim_view_digits_follow_the_tolerance():
    from saddle_escape.book.numbers import claim_view
    v = claim_view(dict(kind="abs", measured=-0.99921, expected=-1.0, tolerance=0.02, statement=""))
    assert (v["measured"], v["expected"]) == ("−0.999", "−1 ± 0.02")
    v = claim_view(dict(kind="min", measured=1.0, expected=0.999, tolerance=0, statement="R² of the fit"))
    assert (v["label"], v["measured"], v["expected"]) == ("1 − R²", "0", "≤ 0.001")
    v = claim_view(dict(kind="max", measured=2e-9, expected=1e-10, tolerance=0, statement=""))
    assert v["bound"] and v["usage"] > 1  # a failed bound is the worst case of its family


def test_nothing_is_written_before_finish(run, tmp_path):
    run.claim("a", "s", 1.0, 1.0)
    assert not (tmp_path / "results").exists()


def test_figure_is_fitted_to_the_text_column(run):
    fig, axes = plotting.figure(ncols=2, squeeze=False)
    assert axes.shape == (1, 2)  # the shape asked for, even when stacked
    assert fig.get_size_inches()[0] <= plotting.COLUMN_IN
    axes[0][0].legend(["tiny"], fontsize=6)
    run.figure(fig, "two")
    rec = run.figures[-1]
    assert rec["width_in"] <= plotting.COLUMN_IN and rec["min_font_pt"] >= plotting.MIN_FONT_PT
    wide, ax = plt.subplots(figsize=(12, 4))
    ax.plot([0, 1])
    run.figure(wide, "wide")
    assert run.figures[-1]["width_in"] == plotting.COLUMN_IN


def test_finish_writes_schema(run, tmp_path, capsys):
    run.claim("critical_depth.exponent[r=3,L=5]", "t ∝ ε^-(r-2)", -1.003, -1.0, tolerance=0.02)
    record = run.finish()
    path = tmp_path / "results" / "42_demo.json"
    on_disk = json.loads(path.read_text())
    assert on_disk.keys() == {"chapter", "parameters", "environment", "wall_time_s", "claims",
                              "figures", "glued", "families"}
    assert on_disk["claims"] == record["claims"]
    assert on_disk["parameters"]["eps"] == 1e-3
    for key in ("python", "torch", "numpy", "scipy", "saddle_escape", "git_commit", "device", "dtype"):
        assert key in on_disk["environment"]
    assert list(path.parent.glob("*.tmp")) == [] and list(path.parent.glob(".*")) == []
    assert "✓" in capsys.readouterr().out
    with pytest.raises(RuntimeError):
        run.finish()


def test_finish_raises_after_writing_when_a_claim_fails(run, tmp_path):
    run.claim("good", "s", 1.0, 1.0)
    run.claim("bad", "s", -0.91, -1.0, tolerance=0.02)
    with pytest.raises(book.ClaimsFailed, match=r"bad \(measured -0.91, expected -1 ± 0.02\)") as err:
        run.finish()
    assert [c["key"] for c in err.value.failed] == ["bad"]
    claims = json.loads((tmp_path / "results" / "42_demo.json").read_text())["claims"]
    assert [c["passed"] for c in claims] == [True, False]


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    with pytest.raises(TypeError):
        book.write_json_atomic(tmp_path / "x.json", {"a": object()})
    assert list(tmp_path.iterdir()) == []


def test_claims_markdown_and_expected_descriptions():
    claims = [dict(key="k[r=3]", statement="a | b", measured=1.0, expected=1.0, tolerance=0.1,
                   passed=True, kind="abs"),
              dict(key="m", statement="s", measured=2.0, expected=1.0, tolerance=0.0,
                   passed=False, kind="max")]
    table = book.claims_markdown(claims)
    assert 'id="claim-k-r-3"' in table and "a \\| b" in table and "✗" in table and "≤ 1" in table
    assert table.splitlines()[0] == "| | claim | measured | expected |"
    # a | in a header is escaped too (an unescaped one renders the table as raw pipes)
    assert book.markdown_table(["max |RHS|"], [[1e-13]]).splitlines() == [
        "| max \\|RHS\\| |", "|---|", r"| $10^{-13}$ |"]
    assert book.describe_expected(dict(expected=2, tolerance=0.05, kind="rel")) == "2 ± 5%"
    assert book.describe_expected(dict(expected="B", tolerance=None, kind="equal")) == "= B"


# --------------------------------------------------------------------------- "Try it" re-runs

def _try_it_commands():
    """Every ``python -m saddle_escape run ...`` line in a chapter's "Try it" section."""
    found = []
    for source in sorted((ROOT / "chapters").glob("*.md")):
        text = source.read_text(encoding="utf-8")
        if "\n## Try it" not in text:
            continue
        section = text.split("\n## Try it", 1)[1]
        found += [(source, line.strip()) for line in section.splitlines()
                  if line.strip().startswith("python -m saddle_escape run ")]
    return found


def _overrides(command: str) -> dict:
    import shlex
    from saddle_escape.book import pipeline
    words = shlex.split(command)
    assert words[:4] == ["python", "-m", "saddle_escape", "run"] and "--profile" in words
    pairs = [words[i + 1:i + 3] for i, w in enumerate(words) if w == "-p"]
    return {name: pipeline.parse_value(value) for name, value in pairs}


def test_every_chapter_of_part_one_has_try_it():
    chapters = {source.stem[:2] for source, _ in _try_it_commands()}
    assert {"01", "02", "03", "04", "05", "06", "07"} <= chapters


@pytest.mark.parametrize("source, command", _try_it_commands(),
                         ids=lambda v: v if isinstance(v, str) else v.stem[:2])
def test_try_it_commands_are_accepted(source, command, tmp_path, monkeypatch):
    """The parameters a "Try it" command passes exist and pass the chapter's own validation:
    the parameters cell, the overrides, then the cell that opens the run (defaults and checks)
    execute as the pipeline would run them. SADDLE_ESCAPE_TRY_IT=1 runs the whole chapter."""
    import os
    from saddle_escape.book import pipeline
    nb = pipeline.read_notebook(source)
    overrides = _overrides(command)
    known = {s.name for s in pipeline.parameter_specs(nb)}
    assert set(overrides) <= known, f"{command}: unknown parameter(s) {set(overrides) - known}"
    if os.environ.get("SADDLE_ESCAPE_TRY_IT"):
        result = pipeline.run_chapter(source, tmp_path, overrides, profile="quick")
        assert result.ok, result.message
        return
    monkeypatch.chdir(tmp_path)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    params = next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    setup = next(c for c in code if "ChapterRun(" in c)
    namespace: dict = {}
    exec(params, namespace)
    namespace.update(overrides, profile="quick", results_dir="results", figures_dir="figures")
    exec(setup, namespace)  # raises ParameterError for a value the chapter refuses


@pytest.mark.parametrize("tex, plain", [
    (r"slopes of $t_k$ in $\ln(1/\varepsilon)$", "slopes of t_k in ln(1/ε)"),
    (r"$-s_{k+1}$", "−s_(k+1)"),             # grouping kept: not s_k + 1
    (r"$\tfrac12\sum_{j>k}s_j^2$", "½Σ_(j>k)s_j²"),
    (r"$\|(I-P)\theta\|$", "‖(I−P)θ‖"),
    (r"$-\lambda_{\min}(K)$", "−λ_min(K)"),
    (r"$0, 1, \dots, K$ and $u^\top x$", "0, 1, …, K and uᵀ x"),
])
def test_family_descriptions_in_plain_text(tex, plain):
    """The glue:text form of a family description spells its math out readably (issue 17)."""
    from saddle_escape.book.chapter import tex_to_text
    assert tex_to_text(tex) == plain


_TEX = re.compile(r"(?<!\\)\\(varepsilon|epsilon|beta|frac|theta|nabla|alpha|rho|tau|ln|lambda|sigma|mathcal|"
                  r"sqrt|cdot|le|ge|to|infty|Delta|kappa|gamma|partial|sum|tanh|phi|mu)(?![A-Za-z])")


def _unescaped_tex(source: str) -> list[str]:
    """String literals (not raw) whose LaTeX has a single backslash: '\\varepsilon' there is a vertical
    tab followed by 'arepsilon', '\\beta' a backspace, '\\frac' a form feed."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.STRING and "r" not in re.match(r"[A-Za-z]*", tok.string).group(0).lower() \
                and _TEX.search(tok.string):
            out.append(tok.string[:60])
    return out


def test_latex_in_plain_strings_is_escaped():
    assert _unescaped_tex('x = "$\\varepsilon$"') and not _unescaped_tex('x = r"$\\varepsilon$"')
    assert not _unescaped_tex('x = "$\\\\varepsilon$"')
    bad = []
    for path in sorted((ROOT / "chapters").glob("*.md")):
        for cell in jupytext.read(path).cells:
            if cell.cell_type == "code":
                src = "\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!")))
                bad += [f"{path.name}: {s}" for s in _unescaped_tex(src)]
    assert not bad, bad


def test_an_empty_table_says_so(run, capsys):
    run.table([])                                     # a re-run whose parameters leave no rows
    with pytest.raises(ValueError, match="columns"):
        run.table([[1, 2]])
