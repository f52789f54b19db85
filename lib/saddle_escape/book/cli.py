"""Command line: re-run one chapter, list its parameters, or build the whole book.

    python -m saddle_escape run 05 -p eps_min 1e-5 -p r_values "[3, 4]"
    python -m saddle_escape run 05 --profile quick --out /tmp/ch05 --force
    python -m saddle_escape params 05
    python -m saddle_escape book --profile full

Exit status: 0 success, 1 a chapter or the HTML build failed, 2 a usage error.
"""

from __future__ import annotations

import argparse
import sys

from . import pipeline
from .chapter import markdown_table


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

    params = sub.add_parser("params", help="list a chapter's parameters")
    params.add_argument("chapter")

    book = sub.add_parser("book", help="execute every chapter and build the HTML book")
    book.add_argument("--profile", choices=pipeline.PROFILES, default="full")
    book.add_argument("--force", action="store_true", help="re-execute every chapter")
    book.add_argument("--no-strict", dest="strict", action="store_false",
                      help="do not turn Sphinx warnings into errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m saddle_escape`` and the ``saddle-escape`` script."""
    args = _parser().parse_args(argv)
    try:
        project = pipeline.Project.at(args.root)
        if args.command == "book":
            return pipeline.build_book(project, args.profile, force=args.force,
                                       strict=args.strict, stderr=sys.stderr)
        source = pipeline.find_chapter(args.chapter, project.chapters_dir)
        if args.command == "params":
            specs = pipeline.parameter_specs(pipeline.read_notebook(source))
            print(markdown_table(["parameter", "default", "meaning"],
                                 [[s.name, s.default, s.comment] for s in specs]))
            return 0
        return _run(args, project, source)
    except pipeline.PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, project: pipeline.Project, source) -> int:
    overrides = {name: pipeline.parse_value(value) for name, value in args.parameter}
    profile = args.profile or overrides.pop("profile", "full")
    overrides.pop("profile", None)
    if profile not in pipeline.PROFILES:
        raise pipeline.PipelineError(f"profile = {profile!r} is not allowed: must be 'quick' or 'full'")
    out = args.out or project.out_dir(profile)
    result = pipeline.run_chapter(source, out, overrides, profile=profile,
                                  package_dir=project.package_dir, force=args.force,
                                  stderr=sys.stderr)
    print(result.report(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1
