"""Parameter studies: one chapter over a grid of parameter values, fanned out to an executor.

    python -m saddle_escape sweep 05 -p activation "['tanh', 'erf', 'gelu']" --profile quick

Every ``-p NAME VALUE`` whose value is a list is an axis of the grid (the product of the axes, in
the order given); any other value is fixed for every run. A list-valued parameter is swept over a
list of lists (``-p r_values "[[3], [4]]"``) and fixed with a one-element one (``"[[3, 4]]"``).
Each grid point is an ordinary :func:`~.pipeline.run_chapter` in its own folder, cached like
``run``, so re-running a sweep re-executes only what changed. The sweep folder (default
``sweeps/<chapter>/<grid-hash>/``) holds::

    grid.json                     chapter, profile, fixed values and axes (what the hash is of)
    runs/NNN_<name=value...>/     one run: executed/, results/, figures/
    summary.csv, summary.md       one row per grid point: parameters, status, wall time, every
                                  claim's measured value and pass/fail
    summary.png, summary.svg      a claim family's measured values against the first axis
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .chapter import fmt_value, markdown_table
from .pipeline import (RESERVED, ChapterResult, ChapterTask, PipelineError, parameter_specs,
                       read_notebook, run_chapters)


@dataclass(frozen=True)
class Grid:
    """The axes (name -> values, in the order given) and the values fixed for every run."""

    chapter: str
    profile: str
    axes: dict[str, list]
    fixed: dict[str, Any]

    @property
    def points(self) -> list[dict]:
        names = list(self.axes)
        return [dict(zip(names, combo)) for combo in itertools.product(*self.axes.values())]

    def record(self) -> dict:
        return {"chapter": self.chapter, "profile": self.profile, "fixed": self.fixed,
                "axes": self.axes}

    @property
    def hash(self) -> str:
        text = json.dumps(self.record(), sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def make_grid(source: Path, overrides: list[tuple[str, Any]], profile: str) -> Grid:
    """The grid of ``-p`` pairs (already parsed), refused with one line (:class:`~saddle_escape.book.pipeline.PipelineError`)
    before anything runs: a name the chapter lacks, a reserved name, a name given twice, an
    empty list, or no list at all."""
    chapter = Path(source).stem
    known = [spec.name for spec in parameter_specs(read_notebook(source))]
    axes: dict[str, list] = {}
    fixed: dict[str, Any] = {}
    for name, value in overrides:
        if name in RESERVED or name == "profile":
            raise PipelineError(f"{name} cannot be swept ({'use --profile' if name == 'profile' else 'set by the sweep'})")
        if name not in known:
            raise PipelineError(f"chapter {chapter} has no parameter {name!r} "
                                f"(its parameters: {', '.join(known)})")
        if name in axes or name in fixed:
            raise PipelineError(f"parameter {name!r} is given twice")
        if isinstance(value, (list, tuple)):
            if not value:
                raise PipelineError(f"-p {name} []: an empty list gives no grid point; "
                                    "give at least one value")
            axes[name] = list(value)
        else:
            fixed[name] = value
    if not axes:
        raise PipelineError("nothing to sweep: give at least one -p NAME '[v1, v2, ...]' "
                            "(a list; other values are fixed for every run)")
    return Grid(chapter, profile, axes, fixed)


def point_label(point: dict) -> str:
    """``activation=tanh, depth=5`` -- how a grid point is named on the terminal and in tables."""
    return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in point.items())


def _folder_name(index: int, point: dict) -> str:
    text = "_".join(f"{k}={v}" for k, v in point.items())
    return f"{index:03d}_" + re.sub(r"[^A-Za-z0-9=.+-]+", "-", text).strip("-")[:80]


@dataclass
class SweepOutcome:
    grid: Grid
    folder: Path
    points: list[dict]
    results: list[ChapterResult]

    @property
    def failed(self) -> list[tuple[dict, ChapterResult]]:
        return [(p, r) for p, r in zip(self.points, self.results) if not r.ok]


def run_sweep(source: Path, grid: Grid, out: Path, executor, *, package_dir: Path,
              force: bool = False, family: str | None = None, log: TextIO = sys.stdout) -> SweepOutcome:
    """Run every grid point through `executor`, printing a line as each finishes, then write the
    summaries and the figure. Every point runs to its end even when others fail."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.json").write_text(json.dumps(grid.record(), indent=2, default=repr), encoding="utf-8")
    points = grid.points
    tasks = [ChapterTask(Path(source), out / "runs" / _folder_name(i, p), {**grid.fixed, **p},
                         profile=grid.profile, package_dir=Path(package_dir), force=force)
             for i, p in enumerate(points)]
    print(f"sweep {grid.chapter}: {len(points)} grid point(s) on {executor.describe()}; "
          f"output {out}", file=log, flush=True)
    done = [0]

    def progress(index: int, result: ChapterResult) -> None:
        done[0] += 1
        passed = sum(c["passed"] for c in result.claims)
        if result.ok:
            how = ("cached" if result.status == "cached"
                   else f"ran in {result.wall_time_s:.1f} s")
            line = f"{how}, claims {passed}/{len(result.claims)} passed"
        else:
            line = f"FAILED: {result.message}"
        print(f"[{done[0]}/{len(points)}] {point_label(points[index])}: {line}", file=log, flush=True)

    results = run_chapters(tasks, executor, on_result=progress)
    outcome = SweepOutcome(grid, out, points, results)
    write_summaries(outcome)
    summary_figure(outcome, family)
    return outcome


# --------------------------------------------------------------------------- summaries

def _claims_by_key(result: ChapterResult) -> dict[str, dict]:
    return {c["key"]: c for c in result.claims}


def claim_keys(results: list[ChapterResult]) -> list[str]:
    """Every claim key of any run, in first-seen order (runs at other parameters may claim more)."""
    keys: dict[str, None] = {}
    for r in results:
        for c in r.claims:
            keys.setdefault(c["key"], None)
    return list(keys)


def summary_rows(outcome: SweepOutcome) -> tuple[list[str], list[list[Any]]]:
    """The CSV's header and rows: parameters, status, wall time, then per claim its measured
    value and pass/fail (empty where a run made no such claim)."""
    names = list(outcome.grid.axes)
    keys = claim_keys(outcome.results)
    header = ["point", *names, "status", "wall_time_s", "claims_passed", "claims_total"]
    for key in keys:
        header += [key, f"{key} passed"]
    rows = []
    for i, (point, result) in enumerate(zip(outcome.points, outcome.results)):
        claims = _claims_by_key(result)
        row = [i, *[json.dumps(point[n]) if not isinstance(point[n], str) else point[n] for n in names],
               result.status, "" if result.wall_time_s is None else f"{result.wall_time_s:.3f}",
               sum(c["passed"] for c in result.claims), len(result.claims)]
        for key in keys:
            c = claims.get(key)
            row += ["", ""] if c is None else [json.dumps(c["measured"]) if not isinstance(c["measured"], str)
                                               else c["measured"], c["passed"]]
        rows.append(row)
    return header, rows


def write_summaries(outcome: SweepOutcome) -> None:
    header, rows = summary_rows(outcome)
    with open(outcome.folder / "summary.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)

    names = list(outcome.grid.axes)
    keys = claim_keys(outcome.results)
    md_rows = []
    for point, result in zip(outcome.points, outcome.results):
        claims = _claims_by_key(result)
        cells = [fmt_value(point[n]) for n in names]
        cells += [result.status, "" if result.wall_time_s is None else f"{result.wall_time_s:.1f}",
                  f"{sum(c['passed'] for c in result.claims)}/{len(result.claims)}"]
        for key in keys:
            c = claims.get(key)
            cells.append("" if c is None else f"{fmt_value(c['measured'])} {'✓' if c['passed'] else '✗'}")
        md_rows.append(cells)
    grid = outcome.grid
    fixed = ", ".join(f"`{k} = {v!r}`" for k, v in grid.fixed.items()) or "none"
    lines = [f"# Sweep of chapter {grid.chapter} ({grid.profile} profile)", "",
             f"Grid `{grid.hash}`: {len(outcome.points)} point(s); fixed values: {fixed}.", "",
             markdown_table([*names, "status", "wall [s]", "claims", *[f"`{k}`" for k in keys]], md_rows)]
    failed = outcome.failed
    if failed:
        lines += ["", "## Failed grid points", ""]
        lines += [f"* {point_label(p)}: {r.message}" for p, r in failed]
    (outcome.folder / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def pick_family(results: list[ChapterResult], family: str | None = None) -> str | None:
    """The claim family (the key up to ``[``) drawn in the summary figure: `family` if given,
    else the first one with a numeric measured value."""
    for key in claim_keys(results):
        fam = key.partition("[")[0]
        if family is not None and fam != family:
            continue
        if any(_number(c["measured"]) is not None for r in results for c in r.claims if c["key"] == key):
            return fam
    if family is not None:
        raise PipelineError(f"no claim family {family!r} with numeric values in this sweep "
                            f"(families: {', '.join(sorted({k.partition('[')[0] for k in claim_keys(results)}))})")
    return None


def summary_figure(outcome: SweepOutcome, family: str | None = None) -> Path | None:
    """Measured values of one claim family against the first axis (one line per claim of the
    family and per combination of the other axes); open markers where the claim failed."""
    fam = pick_family(outcome.results, family)
    if fam is None:
        return None
    from . import plotting

    axes = outcome.grid.axes
    first, others = list(axes)[0], list(axes)[1:]
    values = axes[first]
    numeric = all(_number(v) is not None for v in values)
    xs = {json.dumps(v, default=repr): (float(v) if numeric else i) for i, v in enumerate(values)}
    keys = [k for k in claim_keys(outcome.results) if k.partition("[")[0] == fam]
    series: dict[str, list] = {}
    for point, result in zip(outcome.points, outcome.results):
        rest = point_label({n: point[n] for n in others})
        for c in result.claims:
            if c["key"] in keys and _number(c["measured"]) is not None:
                label = c["key"] + (f" ({rest})" if rest else "")
                series.setdefault(label, []).append(
                    (xs[json.dumps(point[first], default=repr)], _number(c["measured"]), c["passed"]))
    fig, ax = plotting.figure()
    for color, (label, pts) in zip(plotting.colors(len(series)), series.items()):
        pts.sort()
        x, y, ok = zip(*pts)
        ax.plot(x, y, color=color, label=label if len(series) <= 10 else None)
        ax.scatter([a for a, p in zip(x, ok) if not p], [b for b, p in zip(y, ok) if not p],
                   facecolors="none", edgecolors=color, s=60, zorder=3)
        ax.scatter([a for a, p in zip(x, ok) if p], [b for b, p in zip(y, ok) if p], color=color, zorder=3)
    if not numeric:
        ax.set_xticks(list(xs.values()), [fmt_value(v) for v in values])
    elif all(float(v) > 0 for v in values) and max(map(float, values)) / min(map(float, values)) > 100:
        ax.set_xscale("log")
    ax.set_xlabel(first)
    ax.set_ylabel(f"measured: {fam}")
    ax.set_title(f"chapter {outcome.grid.chapter}: {fam} (open markers: claim failed)", fontsize=10)
    if series and len(series) <= 10:
        ax.legend(fontsize=8)
    paths = [outcome.folder / "summary.png", outcome.folder / "summary.svg"]
    for path in paths:
        fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths[0]
