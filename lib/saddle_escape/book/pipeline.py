"""Execute chapters with papermill, cache their runs, and build the HTML book.

One output folder ``out`` holds everything a run produces (the repo root for the ``full``
profile, ``_build/quick`` for ``quick``, so quick runs never touch the book's results)::

    out/executed/NN_name.ipynb          the executed notebook
    out/executed/.cache/NN_name.json    cache key of the last successful run
    out/results/NN_name.json            written by ChapterRun.finish()
    out/figures/NN_name/*.png|svg       written by ChapterRun.figure()

The kernel runs with ``out`` as its working directory and gets ``results_dir="results"`` and
``figures_dir="figures"``, so the injected cell and the results JSON hold no machine paths.

The book is built from a generated staging folder ``<path_output>/_build/src`` (the executed
notebooks as ``chapters/NN_name.ipynb`` next to copies of the book's pages) into
``<path_output>/_build/html``; jupyter-book never sees the ``.md`` chapter sources, so each
chapter runs exactly once per build, through our cache.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .chapter import COMMAND_ENV, describe_expected, fmt_value, markdown_table

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PROFILES = ("quick", "full")
CACHE_FORMAT = 2  # 2: the key includes the environment
KERNEL_START_TIMEOUT_S = 300  # papermill's 60 s is too short for parallel chapters on a busy machine
RESERVED = ("results_dir", "figures_dir")  # decided by --out, not by -p
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}
JUPYTER_BOOK = "from jupyter_book.cli.main import main; main()"
MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.M)
EXCLUDED_MODULES = {"__main__"}
ROOMS = ("sim", "studies", "book")   # the package's three rooms: one API page each


class PipelineError(Exception):
    """A usage problem (unknown chapter, unknown parameter) reported as one line."""


# --------------------------------------------------------------------------- project layout

@dataclass(frozen=True)
class Project:
    """Where the book's sources live. Tests point it at temporary copies."""

    root: Path
    chapters_dir: Path
    package_dir: Path

    @classmethod
    def at(cls, root: str | Path | None = None, chapters_dir: str | Path | None = None,
           package_dir: str | Path | None = None) -> "Project":
        root = Path(root).resolve() if root else find_root()
        return cls(root, Path(chapters_dir or root / "chapters").resolve(),
                   Path(package_dir or root / "lib" / "saddle_escape").resolve())

    def out_dir(self, profile: str) -> Path:
        """Default output folder of a profile: the repo root for full, _build/quick for quick."""
        return self.root if profile == "full" else self.root / "_build" / "quick"

    def chapter_source(self, doc: str) -> Path:
        """Source file of a toc entry like ``chapters/05_critical_depth``."""
        return self.chapters_dir / f"{Path(doc).name}.md"


def find_root(start: Path | None = None) -> Path:
    """The book's root: the nearest folder holding ``_toc.yml``, from the working directory up,
    else the checkout this package was installed from."""
    for folder in [start or Path.cwd(), *(start or Path.cwd()).resolve().parents]:
        if (folder / "_toc.yml").is_file():
            return folder.resolve()
    if (PACKAGE_DIR.parents[1] / "_toc.yml").is_file():
        return PACKAGE_DIR.parents[1]
    raise PipelineError("cannot find the book (no _toc.yml here or above); run from the repository")


def find_chapter(spec: str, chapters_dir: Path) -> Path:
    """A chapter's ``.md`` source from ``"05"``, ``"05_critical_depth"`` or a path."""
    if spec.endswith(".md") and Path(spec).is_file():
        return Path(spec).resolve()
    name = Path(spec).name.removesuffix(".md")
    if name.isdigit():
        matches = sorted(chapters_dir.glob(f"{int(name):02d}_*.md"))
    else:
        matches = [p for p in [chapters_dir / f"{name}.md"] if p.is_file()]
    if len(matches) == 1:
        return matches[0].resolve()
    known = ", ".join(p.stem for p in sorted(chapters_dir.glob("*.md"))) or "none"
    raise PipelineError(f"no chapter {spec!r} in {chapters_dir} (chapters: {known})")


def toc_chapter_docs(toc_path: Path) -> list[str]:
    """The ``chapters/...`` entries of ``_toc.yml``, in book order."""
    import yaml

    docs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            doc = node.get("file")
            if isinstance(doc, str) and doc.startswith("chapters/"):
                docs.append(doc.removesuffix(".md").removesuffix(".ipynb"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(yaml.safe_load(toc_path.read_text(encoding="utf-8")))
    return docs


# --------------------------------------------------------------------------- notebooks and parameters

def parse_value(text: str) -> Any:
    """A ``-p`` value: a Python literal (``1e-5``, ``[3, 4]``, ``True``), else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def read_notebook(source: Path):
    """The MyST-markdown chapter as an in-memory nbformat notebook (papermill cannot read .md)."""
    import jupytext

    nb = jupytext.reads(Path(source).read_text(encoding="utf-8"), fmt="md:myst")
    nb.metadata.setdefault("kernelspec", dict(KERNELSPEC))
    return nb


@dataclass(frozen=True)
class ParameterSpec:
    """One knob of a chapter's `parameters` cell."""

    name: str
    default: str
    comment: str


def parameter_specs(nb) -> list[ParameterSpec]:
    """Name, default (as written) and trailing comment of every assignment in the `parameters`
    cell; raises :class:`PipelineError` if the notebook has no such cell."""
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise PipelineError("the chapter has no code cell tagged `parameters`")
    source = cells[0].source
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    specs = []
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Name) and getattr(node, "value", None) is not None:
                specs.append(ParameterSpec(target.id, ast.get_source_segment(source, node.value),
                                           comments.get(node.end_lineno, "")))
    return specs


def sha256_tree(folder: Path, pattern: str = "**/*.py") -> str:
    """Hash of the relative paths and contents of the files under `folder` matching `pattern`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).glob(pattern) if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


KEYED_PACKAGES = ("torch", "numpy", "scipy", "sympy")


def environment_fingerprint(parameters: dict | None = None) -> dict:
    """The part of the environment a cached run depends on: the Python and torch, numpy, scipy,
    sympy versions (read from package metadata: nothing is imported), and the run's device and
    dtype. A dependency upgrade thus re-executes instead of serving results it did not make."""
    import platform

    from .provenance import package_version

    parameters = parameters or {}
    record = {"python": platform.python_version()}
    record.update({name: package_version(name) for name in KEYED_PACKAGES})
    record.update(device=str(parameters.get("device", "cpu")),
                  dtype=str(parameters.get("dtype", "float64")).removeprefix("torch."))
    return record


def cache_key(source: Path, package_dir: Path, parameters: dict,
              environment: dict | None = None) -> str:
    """What a cached run depends on: the chapter source, the package source, the parameters, and
    the environment (:func:`environment_fingerprint`, computed when not given)."""
    record = {
        "format": CACHE_FORMAT,
        "source": hashlib.sha256(Path(source).read_bytes()).hexdigest(),
        "package": sha256_tree(package_dir),
        "parameters": parameters,
        "environment": environment if environment is not None else environment_fingerprint(parameters),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=repr).encode()).hexdigest()


# --------------------------------------------------------------------------- running one chapter

@dataclass
class ChapterResult:
    """Outcome of :func:`run_chapter`. `status` is ``"ran"``, ``"cached"`` or ``"failed"``."""

    chapter: str
    status: str
    out_dir: Path
    message: str = ""
    wall_time_s: float | None = None
    claims: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    @property
    def notebook(self) -> Path:
        return self.out_dir / "executed" / f"{self.chapter}.ipynb"

    @property
    def results_json(self) -> Path:
        return self.out_dir / "results" / f"{self.chapter}.json"

    @property
    def figures_dir(self) -> Path:
        return self.out_dir / "figures" / self.chapter

    def report(self) -> str:
        """What the command line prints: a status line, then where things went."""
        if not self.ok:
            lines = [self.message]
            if self.notebook.exists():
                lines.append(f"  executed notebook  {_shown(self.notebook)}")
            return "\n".join(lines)
        passed = sum(c["passed"] for c in self.claims)
        how = (f"ran in {self.wall_time_s:.1f} s" if self.status == "ran"
               else "cached (source, package, parameters and environment unchanged; --force re-runs it)")
        n_figs = len(list(self.figures_dir.glob("*"))) if self.figures_dir.exists() else 0
        return "\n".join([
            f"chapter {self.chapter}: {how}; claims {passed}/{len(self.claims)} passed",
            f"  executed notebook  {_shown(self.notebook)}",
            f"  figures            {_shown(self.figures_dir)}/ ({n_figs} files)",
            f"  results            {_shown(self.results_json)}",
        ])


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _cache_file(out_dir: Path, chapter: str) -> Path:
    return out_dir / "executed" / ".cache" / f"{chapter}.json"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _kernel_manager_class():
    from jupyter_client import AsyncKernelManager
    from jupyter_client.kernelspec import KernelSpec

    class ThisInterpreterKernel(AsyncKernelManager):
        """An IPython kernel on the interpreter running the pipeline: a user-level `python3`
        kernelspec could otherwise point at another Python without our package. On POSIX it
        talks over Unix sockets, which nothing else on the machine can listen to."""

        def __init__(self, **kwargs):
            self._ipc_dir = None
            if os.name == "posix":
                kwargs.setdefault("transport", "ipc")
                # Sockets in a folder of this kernel's own: jupyter_client numbers ipc sockets by
                # the first free name next to `ip` (default: the working directory), and two
                # kernels started at once in one output folder (book -j) would pick the same.
                self._ipc_dir = tempfile.mkdtemp(prefix="saddle-escape-kernel-")
                kwargs.setdefault("ip", os.path.join(self._ipc_dir, "kernel"))
            super().__init__(**kwargs)

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)
            if self._ipc_dir and not restart:
                shutil.rmtree(self._ipc_dir, ignore_errors=True)

        async def _async_interrupt_kernel(self):
            # jupyter_client interrupts before every shutdown; papermill only shuts down an idle
            # kernel, and the interrupt would make it log a spurious KeyboardInterrupt error.
            if not self.shutting_down:
                await super()._async_interrupt_kernel()

        @property
        def kernel_spec(self):
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f",
                                    "{connection_file}"], **KERNELSPEC)

    return ThisInterpreterKernel


def run_chapter(source: str | Path, out_dir: str | Path, parameters: dict | None = None, *,
                profile: str = "full", package_dir: str | Path = PACKAGE_DIR, force: bool = False,
                stderr: TextIO | None = None) -> ChapterResult:
    """Execute one chapter with papermill unless an identical run is cached.

    `parameters` override the chapter's `parameters` cell (unknown names are refused);
    `profile`, ``results_dir`` and ``figures_dir`` are always injected. The kernel's stderr
    (progress bars) is copied to `stderr` when given. A cell error or a failed claim gives a
    ``"failed"`` result whose `message` is one line; the old results JSON and figures of the
    chapter are removed before executing, and only a successful run is cached.
    """
    import papermill

    source, out_dir = Path(source).resolve(), Path(out_dir).resolve()
    chapter = source.stem
    nb = read_notebook(source)
    try:
        known = [spec.name for spec in parameter_specs(nb)]
    except PipelineError as err:
        raise PipelineError(f"chapter {chapter}: {err}") from None
    parameters = dict(parameters or {})
    for name in parameters:
        if name in RESERVED:
            raise PipelineError(f"{name} is set by --out, not by -p")
        if name not in known:
            raise PipelineError(f"chapter {chapter} has no parameter {name!r} "
                                f"(its parameters: {', '.join(known)})")
    parameters.update(profile=profile, results_dir="results", figures_dir="figures")
    key = cache_key(source, Path(package_dir), parameters)
    result = ChapterResult(chapter, "ran", out_dir)

    cached = _read_json(_cache_file(out_dir, chapter))
    results = _read_json(result.results_json)
    if (not force and cached and cached.get("key") == key and result.notebook.exists()
            and results and all(c["passed"] for c in results["claims"])):
        result.status, result.claims = "cached", results["claims"]
        result.wall_time_s = results.get("wall_time_s")
        return result

    _cache_file(out_dir, chapter).unlink(missing_ok=True)
    result.results_json.unlink(missing_ok=True)
    shutil.rmtree(result.figures_dir, ignore_errors=True)
    for sub in ("executed", "results", "figures"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    # The kernel inherits the environment: figures print this command as their provenance.
    command = rerun_command(chapter, {k: v for k, v in parameters.items() if k not in RESERVED
                                      and k != "profile"}, profile)
    restore = os.environ.get(COMMAND_ENV)
    os.environ[COMMAND_ENV] = command
    try:
        papermill.execute_notebook(
            nb, str(result.notebook), parameters=parameters, kernel_name=KERNELSPEC["name"],
            language="python", cwd=str(out_dir), progress_bar=False, log_output=False,
            start_timeout=KERNEL_START_TIMEOUT_S,
            stderr_file=stderr, kernel_manager_class=_kernel_manager_class())
        error = None
    except Exception as err:  # a cell raised (PapermillExecutionError), or the kernel died
        error = err
    finally:
        if restore is None:
            os.environ.pop(COMMAND_ENV, None)
        else:
            os.environ[COMMAND_ENV] = restore
    result.wall_time_s = time.perf_counter() - t0

    results = _read_json(result.results_json)
    result.claims = results["claims"] if results else []
    failed = [c for c in result.claims if not c["passed"]]
    if failed:
        result.status, result.message = "failed", _claims_message(chapter, failed)
    elif error is not None:
        result.status, result.message = "failed", _error_message(chapter, error)
    elif results is None:
        result.status = "failed"
        result.message = (f"chapter {chapter} failed: it finished without writing "
                          f"results/{chapter}.json (does its last cell call run.finish()?)")
    else:
        _cache_file(out_dir, chapter).parent.mkdir(parents=True, exist_ok=True)
        _cache_file(out_dir, chapter).write_text(json.dumps(
            {"key": key, "parameters": parameters,
             "environment": environment_fingerprint(parameters)}, indent=2), encoding="utf-8")
    return result


def rerun_command(chapter: str, overrides: dict, profile: str = "full") -> str:
    """The shell command that re-runs `chapter` with these parameter overrides."""
    words = ["python", "-m", "saddle_escape", "run", chapter.split("_")[0]]
    for name, value in overrides.items():
        words += ["-p", name, shlex.quote(value if isinstance(value, str) else repr(value))]
    if profile != "full":
        words += ["--profile", profile]
    return " ".join(words)


def _claims_message(chapter: str, failed: list[dict]) -> str:
    parts = [f"{c['key']} failed (measured {fmt_value(c['measured'])}, expected "
             f"{describe_expected(c)})" for c in failed]
    return f"chapter {chapter}: claim " + "; claim ".join(parts)


def _error_message(chapter: str, error: Exception) -> str:
    ename = getattr(error, "ename", type(error).__name__)
    evalue = str(getattr(error, "evalue", error)).strip().splitlines() or [""]
    line = f"chapter {chapter} failed: {ename}: {evalue[0][:300]}"
    code = [ln for ln in str(getattr(error, "source", "")).splitlines() if ln.strip()]
    if ename != "ParameterError" and code:  # a parameter error already names what to fix
        line += f" (in cell [{getattr(error, 'exec_count', '?')}]: {code[0].strip()[:60]})"
    return line


# --------------------------------------------------------------------------- running many chapters

@dataclass(frozen=True)
class ChapterTask:
    """One :func:`run_chapter` call, as shipped to a worker (plain, picklable data)."""

    source: Path
    out_dir: Path
    parameters: dict = field(default_factory=dict)
    profile: str = "full"
    package_dir: Path = PACKAGE_DIR
    force: bool = False

    @property
    def chapter(self) -> str:
        return Path(self.source).stem


def run_chapter_task(task: ChapterTask, stderr: TextIO | None = None) -> ChapterResult:
    """:func:`run_chapter` for an executor: never raises (a failure is a ``"failed"`` result with
    its one-line reason), and the kernel gets no scheduler address -- the chapters are the
    parallel tasks here, so their inner loops run sequentially instead of queueing behind them."""
    from .executor import SCHEDULER_ENV, scoped_environ

    try:
        with scoped_environ(**{SCHEDULER_ENV: None}):
            return run_chapter(task.source, task.out_dir, task.parameters, profile=task.profile,
                               package_dir=task.package_dir, force=task.force, stderr=stderr)
    except Exception as err:  # PipelineError, or anything unexpected on the worker
        return ChapterResult(task.chapter, "failed", Path(task.out_dir),
                             message=f"chapter {task.chapter} failed: {type(err).__name__}: "
                                     f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}")


def check_task(task: ChapterTask) -> None:
    """Refuse (:class:`PipelineError`) a task whose parameters the chapter does not have, before
    anything runs anywhere."""
    known = [spec.name for spec in parameter_specs(read_notebook(Path(task.source)))]
    for name in task.parameters:
        if name in RESERVED:
            raise PipelineError(f"{name} is set by --out, not by -p")
        if name not in known:
            raise PipelineError(f"chapter {task.chapter} has no parameter {name!r} "
                                f"(its parameters: {', '.join(known)})")


def run_chapters(tasks: list[ChapterTask], executor=None, *, stderr: TextIO | None = None,
                 on_result=None) -> list[ChapterResult]:
    """Run `tasks` through `executor` (default: in this process, one after the other) and return
    their results in input order; ``on_result(index, result)`` is called as each finishes. Every
    task runs to its end even when another fails. The kernel's stderr is copied to `stderr` only
    in the sequential case (parallel progress bars would interleave)."""
    from functools import partial

    from .executor import SerialExecutor

    for task in tasks:
        check_task(task)
    executor = executor or SerialExecutor()
    fn = (partial(run_chapter_task, stderr=stderr) if isinstance(executor, SerialExecutor)
          else run_chapter_task)
    results: list = [None] * len(tasks)
    for index, result in executor.as_completed(fn, tasks):
        results[index] = result
        if on_result is not None:
            on_result(index, result)
    return results


# --------------------------------------------------------------------------- building the book

def build_book(project: Project, profile: str = "full", *, force: bool = False,
               strict: bool = True, path_output: Path | None = None,
               stderr: TextIO | None = None, log: TextIO = sys.stdout, executor=None) -> int:
    """Run every chapter of ``_toc.yml`` that has a source, stage, and build the HTML.

    Returns a process exit code: 0 when every chapter passed and jupyter-book succeeded.
    `strict` adds ``-n -W --keep-going`` (nitpicky, warnings are errors). The HTML lands in
    ``<path_output>/_build/html`` (default: the repo root for full, ``_build/quick`` for quick).
    The chapters run through `executor` (:mod:`.executor`; default one after the other, here);
    staging and the HTML build wait for all of them.
    """
    out = project.out_dir(profile)
    path_output = Path(path_output or (project.root if profile == "full" else out)).resolve()
    tasks = []
    for doc in toc_chapter_docs(project.root / "_toc.yml"):
        source = project.chapter_source(doc)
        if not source.is_file():
            print(f"note: {doc} is in _toc.yml but {source.name} does not exist yet; left out",
                  file=log)
            continue
        tasks.append(ChapterTask(source, out, profile=profile, package_dir=project.package_dir,
                                 force=force))
    if executor is not None and executor.workers > 1:
        print(f"book: {len(tasks)} chapter(s) on {executor.describe()}", file=log, flush=True)
    chapters = run_chapters(tasks, executor, stderr=stderr,
                            on_result=lambda i, r: print(r.report(), file=log, flush=True))
    failed = [r for r in chapters if not r.ok]
    if failed:
        print(f"book: {len(failed)} chapter(s) failed, HTML not built:", file=log)
        for r in failed:
            print(f"  {r.message}", file=log)
        return 1

    src = stage_book(project, [r.chapter for r in chapters], out, path_output / "_build" / "src")
    cmd = [sys.executable, "-c", JUPYTER_BOOK, "build", str(src), "--path-output",
           str(path_output), "--all"] + (["-n", "-W", "--keep-going"] if strict else [])
    shutil.rmtree(path_output / "_build" / "html", ignore_errors=True)  # no stale pages
    built = subprocess.run(cmd, cwd=project.root).returncode
    index = path_output / "_build" / "html" / "index.html"
    if built != 0 or not index.is_file():
        print(f"book: jupyter-book build failed (exit {built}); see the warnings above", file=log)
        return 1
    print(f"book: {len(chapters)} chapter(s); HTML at {index}", file=log)
    return 0


def stage_book(project: Project, chapters: list[str], out: Path, dest: Path) -> Path:
    """Fill `dest` with what jupyter-book builds: config, the toc restricted to `chapters`, the
    book's pages (generated parts filled in), the executed notebooks, figures and static files."""
    import nbformat
    import yaml

    root = project.root
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    toc = _restrict_toc(yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8")),
                        {f"chapters/{c}" for c in chapters})
    (dest / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False, allow_unicode=True),
                                   encoding="utf-8")
    for name in ("_config.yml", "references.bib"):
        if (root / name).is_file():
            shutil.copy2(root / name, dest / name)
    for folder in ("_static", "assets"):
        if (root / folder).is_dir():
            shutil.copytree(root / folder, dest / folder)
    if (out / "figures").is_dir():
        shutil.copytree(out / "figures", dest / "figures")

    generated = {
        "claims-ledger": lambda: claims_ledger(chapters, out / "results"),
        "parameter-tables": lambda: parameter_tables(project, chapters),
        "api-modules": lambda: api_modules(project.package_dir),
        **{f"api-{room}": (lambda room=room: api_modules(project.package_dir, room)) for room in ROOMS},
    }
    for doc in _toc_files(toc):
        if doc.startswith("chapters/"):
            continue
        page = next((root / f"{doc}{ext}" for ext in ("", ".md", ".ipynb", ".rst")
                     if (root / f"{doc}{ext}").is_file()), None)
        if page is None:
            continue  # jupyter-book reports the missing page
        target = dest / page.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = page.read_text(encoding="utf-8")
        if page.suffix == ".md":
            text = MARKER.sub(lambda m: generated[m.group(1)]() if m.group(1) in generated
                              else m.group(0), text)
        target.write_text(text, encoding="utf-8")

    (dest / "chapters").mkdir(exist_ok=True)
    for chapter in chapters:
        nb = nbformat.read(out / "executed" / f"{chapter}.ipynb", as_version=4)
        cells = []
        for cell in nb.cells:
            cells.append(cell)
            tags = cell.setdefault("metadata", {}).setdefault("tags", [])
            hide = page_visibility(cell)
            if hide and hide not in tags:
                tags.append(hide)
            if cell.cell_type == "code":
                _describe_figure(cell)
                # myst-nb wraps *every* output of a `mystnb: figure` cell in the figure (a
                # duplicate label otherwise), so the provenance line becomes the next block.
                notes = [o for o in cell.outputs if _is_provenance(o)]
                cell.outputs = [o for o in cell.outputs if not _is_provenance(o)]
                cells += [nbformat.v4.new_markdown_cell(o["data"]["text/html"]) for o in notes]
        nb.cells = cells
        nbformat.write(nb, dest / "chapters" / f"{chapter}.ipynb")
    return dest


PRESENTATION_CALLS = re.compile(r"\brun\.(figure|table|finish)\(")
VISIBILITY_TAGS = {"remove-cell", "remove-input", "hide-cell", "hide-input", "show-input"}
RECORD_CALLS = {("run", "glue"), ("run", "claim"), ("run", "family"), ("run", "at_a_glance"),
                ("run", "try_it"), ("P", "require")}


def page_visibility(cell) -> str | None:
    """The tag that decides how much of a code cell the page shows, chosen at staging time so
    every chapter (old or new) reads the same way without per-chapter tags:

    * the `parameters` cell stays open (it documents the knobs), and so does a cell its author
      tagged ``show-input`` or with any other visibility tag;
    * papermill's injected-parameters cell is removed (the provenance line under every figure
      names the command and the parameters of the run);
    * the cell that opens the run (``ChapterRun(``: imports, defaults, validation) is folded
      whole, one click away;
    * a cell that only records (``run.glue``/``run.claim``/``P.check_*`` calls, also inside
      ``for``/``if`` blocks) and shows nothing is removed: the claims table and the prose show
      what it recorded;
    * every other code cell (the experiment, the plotting) is folded to its output.
    """
    if cell.get("cell_type") != "code":
        return None
    tags = set(cell.get("metadata", {}).get("tags", []))
    if "parameters" in tags or VISIBILITY_TAGS & tags:
        return None
    if "injected-parameters" in tags:
        return "remove-cell"
    source = cell.get("source", "")
    if "ChapterRun(" in source:
        return "hide-cell"
    if is_record_only(source) and not _shows_something(cell):
        return "remove-cell"
    return "hide-input"


def is_record_only(source: str) -> bool:
    """Whether a cell only records: glue, claims and parameter checks, possibly in loops."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return False

    def recording(st) -> bool:
        if isinstance(st, (ast.For, ast.If)):
            return all(recording(s) for s in st.body + st.orelse)
        if not isinstance(st, ast.Expr) or not isinstance(st.value, ast.Call):
            return False
        func = st.value.func
        if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)):
            return False
        return (func.value.id, func.attr) in RECORD_CALLS or (
            func.value.id == "P" and func.attr.startswith("check_"))
    return bool(body) and all(recording(st) for st in body)


def _shows_something(cell) -> bool:
    return any(o.get("output_type") in ("display_data", "execute_result", "error")
               or (o.get("output_type") == "stream" and o.get("name") == "stdout")
               for o in cell.get("outputs", []))


def _describe_figure(cell) -> None:
    """Give a figure's image an alt text (the caption recorded by ``run.figure``, else the
    cell's figure caption) instead of Sphinx's default, the hashed file name."""
    alt = None
    for o in cell.get("outputs", []):
        alt = alt or o.get("metadata", {}).get("image/png", {}).get("alt")
    mystnb = cell.setdefault("metadata", {}).get("mystnb") or {}
    alt = alt or (mystnb.get("figure") or {}).get("caption")
    if alt is None or not any("image/png" in o.get("data", {}) for o in cell.get("outputs", [])):
        return
    image = mystnb.setdefault("image", {})
    image.setdefault("alt", " ".join(str(alt).split()))
    image.setdefault("classes", "book-figure")
    cell.metadata["mystnb"] = mystnb


def is_presentation_cell(cell) -> bool:
    """A code cell that draws a figure or shows a table, or only glues values for the prose and
    records claims (the "Claims checked" table shows them): its code is collapsed on the page,
    the output stays. A chapter keeps such a cell's code open with the tag ``show-input``."""
    if cell.get("cell_type") != "code":
        return False
    source = cell.get("source", "")
    if PRESENTATION_CALLS.search(source):
        return True
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return False
    return bool(body) and all(
        isinstance(st, ast.Expr) and isinstance(st.value, ast.Call)
        and isinstance(st.value.func, ast.Attribute) and st.value.func.attr in ("glue", "claim")
        and isinstance(st.value.func.value, ast.Name) and st.value.func.value.id == "run"
        for st in body)


def _is_provenance(output) -> bool:
    return 'class="provenance"' in output.get("data", {}).get("text/html", "")


def _toc_files(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["root"]] if "root" in node else []
        own += [node["file"]] if "file" in node else []
        return own + [f for v in node.values() if isinstance(v, (dict, list)) for f in _toc_files(v)]
    if isinstance(node, list):
        return [f for v in node for f in _toc_files(v)]
    return []


def _restrict_toc(node: Any, keep: set[str]) -> Any:
    """Drop toc entries of chapters that did not run, and parts left empty."""
    if isinstance(node, list):
        items = [_restrict_toc(v, keep) for v in node]
        return [v for v in items if v is not None]
    if isinstance(node, dict):
        doc = node.get("file", "")
        if doc.startswith("chapters/") and doc.removesuffix(".md") not in keep:
            return None
        new = {k: _restrict_toc(v, keep) for k, v in node.items()}
        for key in ("chapters", "sections"):
            if key in new and not new[key]:
                if "file" not in new:
                    return None  # an empty part
                del new[key]
        if "parts" in new and not new["parts"]:
            del new["parts"]
        return new
    return node


# --------------------------------------------------------------------------- generated pages

def _doc_link(chapter: str, text: str | None = None) -> str:
    return f"{{doc}}`{text} <../chapters/{chapter}>`" if text else f"{{doc}}`../chapters/{chapter}`"


def claims_ledger(chapters: list[str], results_dir: Path) -> str:
    """Markdown: when and from what this build was made, then a section per chapter with its
    count, one row per claim family (its worst case, linked to the claim's row in the chapter)
    and every claim of the chapter in a folded table."""
    from datetime import datetime, timezone

    from .chapter import claim_anchor, claim_view, family_sentence, group_families
    from .provenance import git_commit

    sections, total, passed, seconds = [], 0, 0, 0.0
    for chapter in chapters:
        results = _read_json(results_dir / f"{chapter}.json") or {"claims": []}
        seconds += results.get("wall_time_s") or 0.0
        claims = results["claims"]
        if not claims:
            continue
        ok = sum(c["passed"] for c in claims)
        total, passed = total + len(claims), passed + ok
        page = f"../chapters/{chapter}.html"
        rows = []
        for family, members in group_families(claims).items():
            sentence = family_sentence(members, results.get("families", {}).get(family), markdown=True)
            sentence = sentence.replace('href="#', f'href="{page}#')
            statement = results.get("families", {}).get(family) or members[0]["statement"]
            rows.append(f"| {'✓' if all(c['passed'] for c in members) else '✗'} | "
                        f"{_cell(statement)} | {_cell(sentence)} |")
        everything = []
        for c in claims:
            v = claim_view(c, math_mode=True)
            measured = f"{v['label']} = {v['measured']}" if v["label"] else v["measured"]
            everything.append(f"| {'✓' if c['passed'] else '✗'} | "
                              f"<a href=\"{page}#{claim_anchor(c['key'])}\">{_html(c['key'])}</a> | "
                              f"{_cell(measured)} | {_cell(v['expected'])} |")
        sections.append(
            f"## {_chapter_title(results_dir, chapter)}\n\n"
            f"{ok} of {len(claims)} claims hold, in {len(rows)} families "
            f"({_doc_link(chapter, 'the chapter')}).\n\n"
            "| | claim | this build |\n|---|---|---|\n" + "\n".join(rows) + "\n\n"
            f"````{{dropdown}} All {len(claims)} claims of this chapter\n"
            "| | key | measured | expected |\n|---|---|---|---|\n" + "\n".join(everything)
            + "\n````\n")
    if not total:
        return "*No chapter has been executed in this build yet, so there are no claims to list.*"
    built = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"**{passed} of {total} claims hold** in this build, made on {built} from commit "
            f"`{git_commit()[:10]}`; executing its chapters took {seconds / 60:.1f} minutes.\n\n")
    return head + "\n".join(sections)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _html(text: str) -> str:
    from html import escape
    return escape(text)


def _chapter_title(results_dir: Path, chapter: str, nb=None) -> str:
    """"Chapter 5 · The critical-depth law": the number from the name, the title from the
    notebook's first heading (default: the executed notebook next to ``results_dir``)."""
    title = chapter.partition("_")[2].replace("_", " ")
    try:
        import nbformat
        nb = nb or nbformat.read(results_dir.parent / "executed" / f"{chapter}.ipynb", as_version=4)
        heads = [ln[2:].strip() for c in nb.cells if c.cell_type == "markdown"
                 for ln in c.source.splitlines() if ln.startswith("# ")]
        title = heads[0] if heads else title
    except (OSError, ValueError):
        pass
    number = chapter.split("_")[0]
    return f"Chapter {int(number)} · {title}" if number.isdigit() else title


def parameter_tables(project: Project, chapters: list[str]) -> str:
    """Markdown: for each chapter, its parameters (name, default, meaning) and a sample command."""
    if not chapters:
        return "*No chapter is part of this build yet.*"
    parts = []
    for chapter in chapters:
        nb = read_notebook(project.chapters_dir / f"{chapter}.md")
        specs = parameter_specs(nb)
        rows = [[f"`{s.name}`", f"`{s.default}`", s.comment] for s in specs]
        parts.append(f"### {_chapter_title(project.root, chapter, nb)}\n\n"
                     f"{_doc_link(chapter, 'Read the chapter')}.\n\n"
                     + markdown_table(["parameter", "default", "meaning and allowed values"], rows)
                     + f"\n\n```bash\npython -m saddle_escape run {chapter.split('_')[0]}"
                       f" -p seed 1\n```\n")
    return "\n".join(parts)


def api_modules(package_dir: Path, room: str | None = None) -> str:
    """Markdown: an autodoc section for the package (``room=None``), or for one room (``"sim"``,
    ``"studies"``, ``"book"``) and each of its modules -- one page per room, so no page runs to
    tens of thousands of pixels."""
    package = package_dir.name

    def section(module: str, level: str = "##") -> str:
        name = f"{package}.{module}" if module else package
        return (f"{level} `{name}`\n\n```{{eval-rst}}\n.. automodule:: {name}\n"
                f"   :members:\n   :show-inheritance:\n```\n")

    if room is None:
        return section("")
    modules = []
    for path in (package_dir / room).rglob("*.py"):
        parts = path.relative_to(package_dir).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if "__pycache__" not in parts and parts[-1] not in EXCLUDED_MODULES and len(parts) > 1:
            modules.append(".".join(parts))
    return "\n".join([section(room)] + [section(m, "###") for m in sorted(modules)])
