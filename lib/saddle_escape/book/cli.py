"""Command line: re-run one chapter, list its parameters, or build the whole book.

    python -m saddle_escape run 05 -p eps_min 1e-5 -p r_values "[3, 4]"
    python -m saddle_escape run 05 --profile quick --out /tmp/ch05 --force
    python -m saddle_escape params 05
    python -m saddle_escape book --profile full -j 2
    python -m saddle_escape sweep 05 -p activation "['tanh', 'erf']" --profile quick

``book -j N`` runs N chapters at once; ``sweep`` fans a grid of parameter values out to worker
processes. Both (and ``run``, for a chapter's inner loops) take ``--scheduler local`` (a Dask
LocalCluster of ``--workers`` processes) or ``--scheduler tcp://HOST:PORT`` (a running Dask
cluster; also read from ``$SADDLE_ESCAPE_SCHEDULER``).

Exit status: 0 success, 1 a chapter, a grid point or the HTML build failed, 2 a usage error.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from . import executor as executors
from . import pipeline
from .chapter import markdown_table


def _scheduler_options(parser: argparse.ArgumentParser, workers_help: str) -> None:
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="'local' (a Dask LocalCluster on this machine) or a Dask scheduler's "
                             f"address tcp://HOST:PORT (default: ${executors.SCHEDULER_ENV}, else "
                             "local worker processes without a server)")
    parser.add_argument("--workers", type=int, metavar="N", help=workers_help)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m saddle_escape", description=__doc__.split("\n")[0])
    parser.add_argument("--root", help="the book's folder (default: found from the working directory)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute one chapter through papermill")
    run.add_argument("chapter", help='"05", "05_critical_depth" or a path to the .md source')
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                     metavar=("NAME", "VALUE"), help="override a parameter (a Python literal)")
    run.add_argument("--profile", choices=pipeline.PROFILES,
                     help="full (default; the book's results) or quick (tests, into _build/quick)")
    run.add_argument("--out", help="output folder (default: repo root for full, _build/quick for quick)")
    run.add_argument("--force", action="store_true", help="re-execute even if cached")
    _scheduler_options(run, "size of the LocalCluster of --scheduler local "
                            "(the chapter's inner loops run on it)")

    params = sub.add_parser("params", help="list a chapter's parameters")
    params.add_argument("chapter")

    book = sub.add_parser("book", help="execute every chapter and build the HTML book")
    book.add_argument("--profile", choices=pipeline.PROFILES, default="full")
    book.add_argument("--force", action="store_true", help="re-execute every chapter")
    book.add_argument("--no-strict", dest="strict", action="store_false",
                      help="do not turn Sphinx warnings into errors")
    book.add_argument("-j", "--jobs", type=int, default=1, metavar="N",
                      help="chapters executed at once, each in its own process (default 1)")
    _scheduler_options(book, "size of the LocalCluster of --scheduler local (default: -j)")

    sweep = sub.add_parser("sweep", help="run one chapter over a grid of parameter values")
    sweep.add_argument("chapter", help='"05", "05_critical_depth" or a path to the .md source')
    sweep.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                       metavar=("NAME", "VALUE"),
                       help="a list '[v1, v2]' is an axis of the grid; another value is fixed")
    sweep.add_argument("--profile", choices=pipeline.PROFILES, default="full")
    sweep.add_argument("--out", help="sweep folder (default: sweeps/<chapter>/<grid-hash>/)")
    sweep.add_argument("--force", action="store_true", help="re-execute every grid point")
    sweep.add_argument("--family", help="claim family drawn in summary.png (default: the first "
                                        "with numeric values)")
    _scheduler_options(sweep, "local worker processes, or the size of --scheduler local "
                              "(default: the CPUs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m saddle_escape`` and the ``saddle-escape`` script."""
    args = _parser().parse_args(argv)
    exit_on_sigterm()
    try:
        project = pipeline.Project.at(args.root)
        if args.command == "book":
            if args.jobs < 1:
                raise pipeline.PipelineError(f"-j {args.jobs} is not allowed: must be at least 1")
            with executors.open_executor(args.scheduler, args.workers or args.jobs) as ex:
                return pipeline.build_book(project, args.profile, force=args.force,
                                           strict=args.strict, stderr=sys.stderr, executor=ex)
        source = pipeline.find_chapter(args.chapter, project.chapters_dir)
        if args.command == "sweep":
            return _sweep(args, project, source)
        if args.command == "params":
            specs = pipeline.parameter_specs(pipeline.read_notebook(source))
            print(markdown_table(["parameter", "default", "meaning"],
                                 [[s.name, s.default, s.comment] for s in specs]))
            return 0
        return _run(args, project, source)
    except (pipeline.PipelineError, executors.ExecutorError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``kill``, ``timeout``, a CI runner's cancel) into ``SystemExit(143)``, so that
    the executors' ``with`` blocks run and stop their workers; Python's default would leave them."""
    def _exit(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _exit)


def _run(args: argparse.Namespace, project: pipeline.Project, source) -> int:
    overrides = {name: pipeline.parse_value(value) for name, value in args.parameter}
    profile = args.profile or overrides.pop("profile", "full")
    overrides.pop("profile", None)
    if profile not in pipeline.PROFILES:
        raise pipeline.PipelineError(f"profile = {profile!r} is not allowed: must be 'quick' or 'full'")
    out = args.out or project.out_dir(profile)
    scheduler = args.scheduler or os.environ.get(executors.SCHEDULER_ENV) or None
    if scheduler is None and args.workers is not None:
        raise pipeline.PipelineError("--workers needs --scheduler local (run executes one chapter; "
                                     "its inner loops use a cluster only when one is given)")
    if scheduler is None:
        return _run_chapter(source, out, overrides, profile, project, args.force)
    # Connected here first (an unreachable address fails in one line, before the kernel starts);
    # the kernel connects to the same cluster through the environment (book.task_map).
    with executors.open_executor(scheduler, args.workers) as ex:
        with executors.scoped_environ(**{executors.SCHEDULER_ENV: ex.address}):
            return _run_chapter(source, out, overrides, profile, project, args.force)


def _run_chapter(source, out, overrides, profile, project, force) -> int:
    result = pipeline.run_chapter(source, out, overrides, profile=profile,
                                  package_dir=project.package_dir, force=force,
                                  stderr=sys.stderr)
    print(result.report(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


def _sweep(args: argparse.Namespace, project: pipeline.Project, source) -> int:
    from . import sweep

    pairs = [(name, pipeline.parse_value(value)) for name, value in args.parameter]
    grid = sweep.make_grid(source, pairs, args.profile)  # refused here, before anything runs
    out = args.out or project.root / "sweeps" / grid.chapter / grid.hash
    with executors.open_executor(args.scheduler, args.workers, serial_when_one=False) as ex:
        outcome = sweep.run_sweep(source, grid, out, ex, package_dir=project.package_dir,
                                  force=args.force, family=args.family)
    print(f"sweep {grid.chapter}: summary in {outcome.folder / 'summary.md'}")
    if outcome.failed:
        print(f"sweep {grid.chapter}: {len(outcome.failed)} of {len(outcome.points)} grid point(s) "
              f"failed:", file=sys.stderr)
        for point, result in outcome.failed:
            print(f"  {sweep.point_label(point)}: {result.message}", file=sys.stderr)
        return 1
    return 0
