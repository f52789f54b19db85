"""The chapter-side API (saddle_escape.book), used in-process without a kernel."""

import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from saddle_escape import book
from saddle_escape.book.params import ParameterError


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


def test_figure_saves_png_and_svg(run, tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    png = run.figure(fig, "line", caption="a line")
    assert png == str(tmp_path / "figures" / "42_demo" / "line.png")
    assert (tmp_path / "figures" / "42_demo" / "line.svg").is_file()
    assert not plt.fignum_exists(fig.number)
    assert run.figures == [{"name": "line", "caption": "a line", "png": png,
                            "svg": str(tmp_path / "figures" / "42_demo" / "line.svg"),
                            "command": "python -m saddle_escape run 42"}]
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
    assert run.glued["claims-critical_depth-exponent"]["text"] == (
        "r=3,L=5: measured -1.003 (predicted -1 ± 0.02) ✓ · "
        "r=4,L=6: measured -2.1 (predicted -2 ± 0.02) ✗")
    assert run.glued["claims-x-bound"]["text"] == "measured 0.5 (predicted ≤ 1) ✓"


def test_nothing_is_written_before_finish(run, tmp_path):
    run.claim("a", "s", 1.0, 1.0)
    assert not (tmp_path / "results").exists()


def test_finish_writes_schema(run, tmp_path, capsys):
    run.claim("critical_depth.exponent[r=3,L=5]", "t ∝ ε^-(r-2)", -1.003, -1.0, tolerance=0.02)
    record = run.finish()
    path = tmp_path / "results" / "42_demo.json"
    on_disk = json.loads(path.read_text())
    assert on_disk.keys() == {"chapter", "parameters", "environment", "wall_time_s", "claims",
                              "figures", "glued"}
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
    assert "`k[r=3]`" in table and "a \\| b" in table and "✗" in table and "≤ 1" in table
    assert book.describe_expected(dict(expected=2, tolerance=0.05, kind="rel")) == "2 ± 5%"
    assert book.describe_expected(dict(expected="B", tolerance=None, kind="equal")) == "= B"
