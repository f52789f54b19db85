"""The executor seam (saddle_escape.book.executor): local processes, a real Dask LocalCluster,
an unreachable scheduler; chapters and sweeps on the cluster give the sequential run's results."""

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saddle_escape.book import executor as ex
from saddle_escape.book import pipeline, sweep

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "chapters"
FIXTURE = FIXTURES / "99_fixture.md"
MAP_FIXTURE = FIXTURES / "98_fixture_map.md"
UNREACHABLE = "tcp://127.0.0.1:1"   # nothing listens on port 1


def comparable(results_json: Path) -> dict:
    """A results JSON without what legitimately differs between two executions (the wall time)."""
    record = json.loads(results_json.read_text())
    record.pop("wall_time_s")
    return record


@pytest.fixture(scope="module")
def cluster():
    """A real LocalCluster: two single-threaded worker processes."""
    with ex.open_executor("local", 2) as dask:
        yield dask


def test_map_keeps_input_order_and_runs_single_threaded():
    with ex.open_executor(None, 2) as local:
        assert isinstance(local, ex.ProcessExecutor) and local.workers == 2
        assert local.map(functools.partial(pow, 2), range(6)) == [1, 2, 4, 8, 16, 32]
        assert local.map(os.getenv, ["OMP_NUM_THREADS", "SADDLE_ESCAPE_THREADS"]) == ["1", "1"]
    assert isinstance(ex.open_executor(None, 1), ex.SerialExecutor)


def test_dask_local_cluster_map(cluster):
    assert isinstance(cluster, ex.DaskExecutor) and cluster.workers == 2
    assert cluster.address.startswith("tcp://")
    assert cluster.map(functools.partial(pow, 3), range(5)) == [1, 3, 9, 27, 81]
    assert cluster.map(os.getenv, ["OMP_NUM_THREADS", "SADDLE_ESCAPE_THREADS"]) == ["1", "1"]
    assert sorted(i for i, _ in cluster.as_completed(abs, [-1, -2, -3])) == [0, 1, 2]


def test_unreachable_scheduler_fails_fast_with_one_line(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ex.ExecutorError, match=r"^cannot reach the Dask scheduler at tcp://127\.0\.0\.1:1 "):
        ex.connect(UNREACHABLE)
    assert time.perf_counter() - t0 < 15
    with pytest.raises(ex.ExecutorError, match="not an address"):
        ex.open_executor("nowhere")
    done = subprocess.run([sys.executable, "-m", "saddle_escape", "--root", str(ROOT), "sweep",
                           str(FIXTURE), "-p", "scale", "[1.0]", "--out", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, ex.SCHEDULER_ENV: UNREACHABLE})
    assert done.returncode == 2
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the Dask scheduler at "
                                                   "tcp://127.0.0.1:1"), lines
    assert not (tmp_path / "s" / "runs").exists()


def test_sweep_on_the_cluster_equals_sequential_runs(cluster, tmp_path):
    grid = sweep.make_grid(FIXTURE, [("scale", [1.0, 2.5])], "quick")
    outcome = sweep.run_sweep(FIXTURE, grid, tmp_path / "sweep", cluster, package_dir=pipeline.PACKAGE_DIR,
                              log=open(os.devnull, "w"))
    assert [r.status for r in outcome.results] == ["ran", "ran"]
    for point, result in zip(outcome.points, outcome.results):
        alone = pipeline.run_chapter(FIXTURE, tmp_path / f"seq{point['scale']}", point, profile="quick")
        assert alone.status == "ran"
        assert comparable(result.results_json) == comparable(alone.results_json)
    assert (outcome.folder / "summary.csv").is_file() and (outcome.folder / "summary.png").is_file()


def test_two_chapter_book_on_the_cluster_equals_sequential(cluster, tmp_path):
    tasks = lambda out: [pipeline.ChapterTask(FIXTURE, out, profile="quick"),
                         pipeline.ChapterTask(MAP_FIXTURE, out, profile="quick")]
    parallel = pipeline.run_chapters(tasks(tmp_path / "dask"), cluster)
    sequential = pipeline.run_chapters(tasks(tmp_path / "seq"))
    assert [r.chapter for r in parallel] == ["99_fixture", "98_fixture_map"]   # input order
    assert [r.status for r in parallel + sequential] == ["ran"] * 4
    for a, b in zip(parallel, sequential):
        assert comparable(a.results_json) == comparable(b.results_json)
    # under book/sweep the chapters are the parallel tasks: their own loops run in the kernel
    assert json.loads(parallel[1].results_json.read_text())["glued"]["mapped_by"]["text"] == "sequential"

    # run alone with the cluster's address, the chapter maps its loop over the cluster
    alone = tmp_path / "alone"
    with ex.scoped_environ(**{ex.SCHEDULER_ENV: cluster.address}):
        mapped = pipeline.run_chapter(MAP_FIXTURE, alone, profile="quick")
    assert mapped.status == "ran", mapped.message
    on_cluster = comparable(mapped.results_json)
    assert on_cluster["glued"].pop("mapped_by")["text"] == "dask"
    in_kernel = comparable(sequential[1].results_json)
    in_kernel["glued"].pop("mapped_by")
    assert on_cluster == in_kernel


def test_book_jobs_2_one_failing_chapter_fails_the_command_others_cache(tmp_path):
    root = tmp_path / "book"
    (root / "chapters").mkdir(parents=True)
    shutil.copy(FIXTURE, root / "chapters")
    (root / "chapters" / "97_broken.md").write_text(FIXTURE.read_text().replace(
        "```{code-cell} ipython3\nimport matplotlib",
        "```{code-cell} ipython3\nraise RuntimeError('boom')\n```\n\n```{code-cell} ipython3\nimport matplotlib"
    ).replace('"99_fixture"', '"97_broken"'))
    (root / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n"
                                   "- file: chapters/97_broken\n- file: chapters/99_fixture\n")
    done = subprocess.run([sys.executable, "-m", "saddle_escape", "--root", str(root), "book",
                           "--profile", "quick", "-j", "2"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 1
    assert "book: 2 chapter(s) on local processes (2 workers)" in done.stdout
    assert "book: 1 chapter(s) failed, HTML not built:" in done.stdout
    assert "  chapter 97_broken failed: RuntimeError: boom (in cell [" in done.stdout
    out = root / "_build" / "quick"
    assert (out / "executed" / ".cache" / "99_fixture.json").is_file()   # the other one finished
    assert not (out / "_build" / "html").exists()
    again = pipeline.run_chapter(root / "chapters" / "99_fixture.md", out, profile="quick",
                                 package_dir=root / "lib" / "saddle_escape")  # what --root implies
    assert again.status == "cached"


SIGTERM_SCRIPT = """
import threading, time
from saddle_escape.book import cli, executor as ex
cli.exit_on_sigterm()
with ex.ProcessExecutor(2) as pool:
    def report():
        while len(pool._pool._processes) < 2:
            time.sleep(0.1)
        print(*pool._pool._processes, flush=True)
    threading.Thread(target=report, daemon=True).start()
    list(pool.as_completed(time.sleep, [120, 120, 120]))
"""


def test_sigterm_stops_the_worker_processes():
    """A killed sweep or book (SIGTERM: kill, timeout, a cancelled CI job) leaves no worker running
    the next task; Python's default handler would leave both workers sleeping for two minutes."""
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    time.sleep(0.5)                                  # the tasks are running
    start = time.monotonic()
    proc.terminate()
    assert proc.wait(timeout=30) == 143 and time.monotonic() - start < 30
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        time.sleep(0.1)
    assert not alive


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
