"""The execution pipeline on a tiny fixture chapter (tests/fixtures/chapters/99_fixture.md)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from saddle_escape.book import pipeline

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "chapters" / "99_fixture.md"
PACKAGE = ROOT / "lib" / "saddle_escape"


def cli(*args, cwd=ROOT):
    """Run `python -m saddle_escape ...`; return (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "saddle_escape", "--root", str(ROOT), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One successful quick run with an injected parameter, shared by the read-only tests."""
    out = tmp_path_factory.mktemp("shared")
    result = pipeline.run_chapter(FIXTURE, out, {"scale": 2.5}, profile="quick")
    assert result.ok, result.message
    return result


def test_parameter_injection_reaches_the_chapter(shared):
    results = json.loads(shared.results_json.read_text())
    assert results["parameters"]["scale"] == 2.5
    assert results["parameters"]["profile"] == "quick"
    assert results["parameters"]["n_points"] == 10  # default kept
    nb = nbformat.read(shared.notebook, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "scale = 2.5" in injected[0].source
    assert (shared.figures_dir / "line.png").is_file() and not (shared.figures_dir / "line.svg").exists()


def test_figures_carry_the_command_that_regenerates_them(shared):
    results = json.loads(shared.results_json.read_text())
    command = "python -m saddle_escape run 99 -p scale 2.5 --profile quick"
    assert results["figures"][0]["command"] == command
    nb = nbformat.read(shared.notebook, as_version=4)
    html = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    assert any(command in h and "seed 0" in h and "scale = 2.5" in h for h in html)


def test_rerun_command_quotes_values():
    assert pipeline.rerun_command("05_critical_depth", {}) == "python -m saddle_escape run 05"
    assert (pipeline.rerun_command("05_critical_depth", {"r_values": [3, 4], "activation": "erf"}, "quick")
            == "python -m saddle_escape run 05 -p r_values '[3, 4]' -p activation erf --profile quick")


def test_results_json_schema(shared):
    results = json.loads(shared.results_json.read_text())
    assert set(results) == {"chapter", "parameters", "environment", "wall_time_s", "claims",
                            "families", "figures", "glued"}
    assert results["chapter"] == "99_fixture"
    assert {"python", "torch", "numpy", "git_commit", "device", "dtype"} <= set(results["environment"])
    assert isinstance(results["wall_time_s"], float)
    (claim,) = results["claims"]
    assert set(claim) == {"key", "statement", "measured", "expected", "tolerance", "passed", "kind"}
    assert claim["key"] == "fixture.sum" and claim["passed"] is True
    assert results["glued"]["total"]["text"] == "12.500"
    assert results["figures"][0]["name"] == "line"


def test_results_are_written_atomically(shared):
    leftovers = [p.name for p in shared.results_json.parent.iterdir() if p.name != "99_fixture.json"]
    assert leftovers == []


def test_bad_parameter_one_line_nonzero_exit_no_results(shared, tmp_path):
    (tmp_path / "results").mkdir()
    stale = tmp_path / "results" / "99_fixture.json"
    shutil.copy(shared.results_json, stale)  # a previous successful run
    code, out, err = cli("run", FIXTURE, "--out", tmp_path, "--profile", "quick", "-p", "scale", "-1")
    assert code != 0
    lines = [ln for ln in (out + err).splitlines() if ln.strip()]
    assert lines[0] == ("chapter 99_fixture failed: ParameterError: "
                        "scale = -1 is not allowed: must be a number > 0")
    assert "Traceback" not in out + err
    assert all(ln.startswith("  ") for ln in lines[1:])
    assert not stale.exists()
    assert not (tmp_path / "executed" / ".cache" / "99_fixture.json").exists()


def test_failed_claim_fails_the_run(tmp_path):
    code, out, err = cli("run", FIXTURE, "--out", tmp_path, "--profile", "quick",
                         "-p", "expected_sum", "3.0")
    assert code == 1
    assert ("chapter 99_fixture: claim fixture.sum failed (measured 5, expected 3 ± 1e-09)"
            in err.splitlines())
    results = json.loads((tmp_path / "results" / "99_fixture.json").read_text())
    assert results["claims"][0]["passed"] is False  # written before failing, for inspection
    assert not (tmp_path / "executed" / ".cache" / "99_fixture.json").exists()
    # a failed run is never served from the cache
    assert pipeline.run_chapter(FIXTURE, tmp_path, {"expected_sum": 3.0}, profile="quick").status == "failed"


def test_cell_error_names_chapter_and_cell(tmp_path):
    chapter = tmp_path / "chapters" / "99_fixture.md"
    chapter.parent.mkdir()
    chapter.write_text(FIXTURE.read_text().replace(
        "```{code-cell} ipython3\nimport matplotlib",
        "```{code-cell} ipython3\nraise RuntimeError('boom')\n```\n\n```{code-cell} ipython3\nimport matplotlib"))
    result = pipeline.run_chapter(chapter, tmp_path / "out", profile="quick")
    assert result.status == "failed"
    assert result.message.startswith("chapter 99_fixture failed: RuntimeError: boom (in cell [")
    assert "raise RuntimeError('boom')" in result.message
    assert not result.results_json.exists()


def test_cache_follows_package_source(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"

    def run(**kw):
        return pipeline.run_chapter(FIXTURE, out, profile="quick", package_dir=package, **kw)

    assert run().status == "ran"
    again = run()
    assert again.status == "cached" and again.claims[0]["passed"]
    with open(package / "params.py", "a") as fh:
        fh.write("\n# a change in the library\n")
    assert run().status == "ran"
    assert run().status == "cached"
    assert run(force=True).status == "ran"
    # a dependency upgrade (here numpy's version as installed metadata reports it) re-executes
    from saddle_escape.book import provenance

    real = provenance.package_version
    monkeypatch.setattr(provenance, "package_version",
                        lambda dist: "99.0" if dist == "numpy" else real(dist))
    assert run().status == "ran"
    assert run().status == "cached"


def test_cache_key_depends_on_source_package_and_parameters(tmp_path):
    chapter = tmp_path / "99_fixture.md"
    shutil.copy(FIXTURE, chapter)
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    base = pipeline.cache_key(chapter, package, {"profile": "quick"})
    assert pipeline.cache_key(chapter, package, {"profile": "quick"}) == base
    assert pipeline.cache_key(chapter, package, {"profile": "full"}) != base
    (package / "a.py").write_text("x = 2\n")
    changed_package = pipeline.cache_key(chapter, package, {"profile": "quick"})
    assert changed_package != base
    chapter.write_text(chapter.read_text() + "\nMore prose.\n")
    assert pipeline.cache_key(chapter, package, {"profile": "quick"}) != changed_package


def test_usage_errors_are_one_line(tmp_path):
    code, out, err = cli("run", FIXTURE, "--out", tmp_path, "-p", "nope", "1")
    assert code == 2 and err.strip().startswith("error: chapter 99_fixture has no parameter 'nope'")
    code, _, err = cli("run", "not_a_chapter")
    assert code == 2 and err.startswith("error: no chapter 'not_a_chapter'")


def test_params_command_lists_parameters():
    code, out, _ = cli("params", FIXTURE)
    assert code == 0
    assert "| scale | 1.0 | amplitude of the curve (> 0) |" in out


def test_parse_value():
    assert pipeline.parse_value("1e-5") == 1e-5
    assert pipeline.parse_value("[3, 4]") == [3, 4]
    assert pipeline.parse_value("True") is True
    assert pipeline.parse_value("tanh") == "tanh"


def test_find_chapter(tmp_path):
    (tmp_path / "05_critical_depth.md").write_text("")
    assert pipeline.find_chapter("05", tmp_path).name == "05_critical_depth.md"
    assert pipeline.find_chapter("5", tmp_path).name == "05_critical_depth.md"
    assert pipeline.find_chapter("05_critical_depth", tmp_path).name == "05_critical_depth.md"
    with pytest.raises(pipeline.PipelineError, match="05_critical_depth"):
        pipeline.find_chapter("06", tmp_path)


def test_parameter_specs_of_fixture():
    specs = pipeline.parameter_specs(pipeline.read_notebook(FIXTURE))
    assert [s.name for s in specs] == ["profile", "seed", "results_dir", "figures_dir", "n_points",
                                       "scale", "expected_sum"]
    assert specs[5] == pipeline.ParameterSpec("scale", "1.0", "amplitude of the curve (> 0)")


def test_staging_uses_executed_notebooks_and_generates_pages(shared, tmp_path):
    root = tmp_path / "book"
    (root / "chapters").mkdir(parents=True)
    shutil.copy(FIXTURE, root / "chapters")
    for name in ("_config.yml", "intro.md", "references.bib"):
        shutil.copy(ROOT / name, root)
    shutil.copytree(ROOT / "appendix", root / "appendix")
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    toc["parts"][0]["chapters"] = [{"file": "chapters/99_fixture"}, {"file": "chapters/98_missing"}]
    toc["parts"] = [toc["parts"][0], toc["parts"][-1]]  # Part I and the appendix, not Part II
    (root / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False, allow_unicode=True))
    project = pipeline.Project.at(root, package_dir=PACKAGE)
    assert pipeline.toc_chapter_docs(root / "_toc.yml") == ["chapters/99_fixture", "chapters/98_missing"]

    dest = pipeline.stage_book(project, ["99_fixture"], shared.out_dir, tmp_path / "src")
    staged_toc = yaml.safe_load((dest / "_toc.yml").read_text())
    assert staged_toc["parts"][0]["chapters"] == [{"file": "chapters/99_fixture"}]
    assert not (dest / "chapters" / "99_fixture.md").exists()  # no duplicate docnames
    nb = nbformat.read(dest / "chapters" / "99_fixture.ipynb", as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert "remove-cell" in injected[0].metadata.tags  # the provenance line names the run
    (fig_cell,) = [c for c in nb.cells if "run.figure(" in c.get("source", "")]
    after = nb.cells[nb.cells.index(fig_cell) + 1]
    assert after.cell_type == "markdown" and 'class="provenance"' in after.source
    assert not any("provenance" in str(o) for o in fig_cell.outputs)
    # on the page: the parameters cell open, the run's set-up folded whole, record-only cells
    # removed, everything else folded to its output (issue 17)
    shown = {c.source.split("\n")[0][:30]: c.metadata.get("tags", []) for c in nb.cells
             if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])}
    tags = list(shown.values())
    assert "parameters" in tags[0] and not {"hide-input", "hide-cell", "remove-cell"} & set(tags[0])
    assert "hide-cell" in tags[1]                       # ChapterRun(...) and the checks
    assert all("hide-input" in t for t in tags[2:])     # experiment, figure, claim, claims table
    assert fig_cell.metadata.mystnb["image"]["alt"] == "A straight line."
    ledger = (dest / "appendix" / "claims_ledger.md").read_text()
    assert "fixture.sum" in ledger and "**1 of 1 claims hold** in this build, made on" in ledger
    assert "#claim-fixture-sum" in ledger and "{dropdown}" in ledger
    assert "from commit" in ledger and "executing its chapters took" in ledger
    assert "<!-- generated" not in ledger
    rerun = (dest / "appendix" / "rerunning.md").read_text()
    assert "| `scale` | `1.0` | amplitude of the curve (> 0) |" in rerun
    api = (dest / "appendix" / "api.md").read_text()
    assert ".. automodule:: saddle_escape\n" in api and "automodule:: saddle_escape.sim" not in api
    book_api = (dest / "appendix" / "api_book.md").read_text()    # one page per room
    assert ".. automodule:: saddle_escape.book.pipeline" in book_api and "__main__" not in book_api
    assert "automodule:: saddle_escape.sim" not in book_api
    assert (dest / "figures" / "99_fixture" / "line.png").is_file()


def test_restrict_toc_drops_empty_parts():
    toc = {"format": "jb-book", "root": "intro", "parts": [
        {"caption": "Part I", "chapters": [{"file": "chapters/01_a"}]},
        {"caption": "Appendix", "chapters": [{"file": "appendix/api"}]}]}
    assert pipeline._restrict_toc(toc, set())["parts"] == [toc["parts"][1]]


@pytest.mark.parametrize("source, record_only", [
    ('run.glue("a", 1, fmt="{:g}")\nrun.claim("k", "s", 1.0, 1.0);', True),
    ('for k in ks:\n    run.claim(k, "s", 1, 1)', True),
    ('P.check_positive("x", x)\nP.require(x < 1, "x", x, "below 1")', True),
    ('x = simulate()\nrun.glue("a", x)', False),
    ("", False),
])
def test_record_only_cells_are_recognised(source, record_only):
    assert pipeline.is_record_only(source) is record_only


@pytest.mark.parametrize("source, collapsed", [
    ('fig, ax = plotting.figure()\nrun.figure(fig, "x")', True),
    ('run.glue("a", 1, fmt="{:g}")\nrun.claim("k", "s", 1.0, 1.0);', True),
    ("run.finish();", True),
    ('x = simulate()\nrun.glue("a", x)', False),        # computes something: stays open
    ('for k in ks:\n    run.claim(k, "s", 1, 1)', False),
    ("", False),
])
def test_presentation_cells_are_recognised(source, collapsed):
    assert pipeline.is_presentation_cell({"cell_type": "code", "source": source}) is collapsed


def test_cache_key_includes_the_environment(tmp_path):
    env = pipeline.environment_fingerprint({"profile": "quick"})
    assert set(env) == {"python", "torch", "numpy", "scipy", "sympy", "device", "dtype"}
    assert env["device"] == "cpu" and env["dtype"] == "float64"
    assert pipeline.environment_fingerprint({"device": "cuda", "dtype": "torch.float32"})["dtype"] == "float32"
    base = pipeline.cache_key(FIXTURE, PACKAGE, {"profile": "quick"}, env)
    assert pipeline.cache_key(FIXTURE, PACKAGE, {"profile": "quick"}) == base   # computed when not given
    for name in ("python", "torch", "numpy", "scipy", "sympy", "device", "dtype"):
        assert pipeline.cache_key(FIXTURE, PACKAGE, {"profile": "quick"}, {**env, name: "other"}) != base
