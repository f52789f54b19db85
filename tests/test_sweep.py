"""Parameter studies (saddle_escape.book.sweep): the grid is checked before anything runs, the
summaries list every grid point, and a failing point fails the command by name.
(A sweep on a real Dask cluster against sequential runs is in tests/test_executor.py.)"""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from saddle_escape.book import pipeline, sweep
from saddle_escape.book.pipeline import ChapterResult

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "chapters" / "99_fixture.md"


def cli(*args):
    done = subprocess.run([sys.executable, "-m", "saddle_escape", "--root", str(ROOT), *map(str, args)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    return done.returncode, done.stdout, done.stderr


def test_grid_is_the_product_of_the_lists_in_order():
    grid = sweep.make_grid(FIXTURE, [("scale", [1.0, 2.0]), ("n_points", [4, 6, 8]), ("seed", 3)], "quick")
    assert grid.fixed == {"seed": 3}
    assert grid.points[:4] == [{"scale": 1.0, "n_points": 4}, {"scale": 1.0, "n_points": 6},
                               {"scale": 1.0, "n_points": 8}, {"scale": 2.0, "n_points": 4}]
    assert len(grid.points) == 6
    same = sweep.make_grid(FIXTURE, [("scale", [1.0, 2.0]), ("n_points", [4, 6, 8]), ("seed", 3)], "quick")
    assert same.hash == grid.hash
    assert sweep.make_grid(FIXTURE, [("scale", [1.0, 2.0]), ("n_points", [4, 6, 8])], "full").hash != grid.hash


@pytest.mark.parametrize("pairs, message", [
    ([("scale", [])], "an empty list gives no grid point"),
    ([("nope", [1, 2])], "chapter 99_fixture has no parameter 'nope'"),
    ([("scale", 2.0)], "nothing to sweep"),
    ([("scale", [1.0]), ("scale", [2.0])], "given twice"),
    ([("results_dir", ["a"])], "results_dir cannot be swept"),
])
def test_bad_grids_are_refused(pairs, message):
    with pytest.raises(pipeline.PipelineError, match=message):
        sweep.make_grid(FIXTURE, pairs, "quick")


@pytest.mark.parametrize("args, message", [
    (["-p", "scale", "[]"], "error: -p scale []: an empty list gives no grid point"),
    (["-p", "scale", "[1.0, 2.0]", "-p", "nope", "[1]"], "error: chapter 99_fixture has no parameter 'nope'"),
])
def test_bad_grid_refused_before_anything_runs(tmp_path, args, message):
    code, out, err = cli("sweep", FIXTURE, *args, "--profile", "quick", "--out", tmp_path / "s")
    assert code == 2
    assert err.strip().splitlines() == [err.strip().splitlines()[0]] and err.startswith(message)
    assert not (tmp_path / "s").exists()


def test_failing_grid_point_fails_the_command_by_name(tmp_path):
    code, out, err = cli("sweep", FIXTURE, "-p", "scale", "[-1]", "--profile", "quick",
                         "--out", tmp_path, "--workers", "1")
    assert code == 1
    assert "[1/1] scale=-1: FAILED: chapter 99_fixture failed: ParameterError" in out
    assert "sweep 99_fixture: 1 of 1 grid point(s) failed:" in err
    assert "  scale=-1: chapter 99_fixture failed: ParameterError: scale = -1 is not allowed" in err
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert rows[0]["status"] == "failed" and rows[0]["scale"] == "-1"
    assert "## Failed grid points" in (tmp_path / "summary.md").read_text()


def _fake(chapter, status, claims, wall=1.0):
    return ChapterResult(chapter, status, Path("."), message="" if status != "failed" else "boom",
                         wall_time_s=wall, claims=claims)


def _claim(key, measured, passed=True):
    return {"key": key, "statement": "s", "measured": measured, "expected": 1.0, "tolerance": 0.1,
            "passed": passed, "kind": "abs"}


def test_summaries_have_one_row_per_point_with_every_claim(tmp_path):
    grid = sweep.make_grid(FIXTURE, [("scale", [1.0, 2.0, 4.0])], "quick")
    results = [_fake("99_fixture", "ran", [_claim("law.slope[r=3]", 1.01), _claim("law.slope[r=4]", 0.98)]),
               _fake("99_fixture", "failed", [_claim("law.slope[r=3]", 1.5, False)]),
               _fake("99_fixture", "cached", [_claim("law.slope[r=3]", 1.02), _claim("other", "yes")])]
    outcome = sweep.SweepOutcome(grid, tmp_path, grid.points, results)
    sweep.write_summaries(outcome)
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["scale"] for r in rows] == ["1.0", "2.0", "4.0"]
    assert [r["status"] for r in rows] == ["ran", "failed", "cached"]
    assert rows[1]["law.slope[r=3]"] == "1.5" and rows[1]["law.slope[r=3] passed"] == "False"
    assert rows[1]["law.slope[r=4]"] == ""       # that run made no such claim
    assert rows[2]["other"] == "yes"
    md = (tmp_path / "summary.md").read_text()
    assert md.count("\n| ") == 4 and "1.5 ✗" in md and "* scale=2.0: boom" in md
    assert sweep.pick_family(results) == "law.slope"
    with pytest.raises(pipeline.PipelineError, match="no claim family 'nope'"):
        sweep.pick_family(results, "nope")
    assert sweep.summary_figure(outcome).is_file() and (tmp_path / "summary.svg").is_file()
