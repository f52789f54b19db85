"""The one seam through which the book runs independent tasks side by side.

Three executors with the same two methods (``map`` keeps the input order, ``as_completed`` yields
``(index, result)`` as tasks finish, for progress lines):

* :class:`SerialExecutor` -- in this process, one task after the other (``-j 1``);
* :class:`ProcessExecutor` -- the default: local worker processes (``spawn``), no server;
* :class:`DaskExecutor` -- a ``dask.distributed`` cluster: ``scheduler="local"`` starts a
  ``LocalCluster`` of worker processes, a ``tcp://host:port`` address (or the environment
  variable ``SADDLE_ESCAPE_SCHEDULER``) connects a ``Client`` to a running one.

Every task runs with torch (and BLAS) on one thread, whatever the executor: the book's tensors are
tiny, and the parallelism is across tasks. A task's result does not depend on the executor (each
task is a pure function of its input), so results equal a sequential run's.

Inside a chapter, :func:`task_map` gives a plain ``map(fn, items) -> list`` for a study's heaviest
loop: over the configured cluster when one is configured, else the builtin sequential loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Callable, Iterable, Iterator

SCHEDULER_ENV = "SADDLE_ESCAPE_SCHEDULER"
CONNECT_TIMEOUT_S = 5
# What makes a worker's libraries single-threaded (torch reads SADDLE_ESCAPE_THREADS through
# book.set_torch_threads; the BLAS libraries read theirs when first loaded).
SINGLE_THREAD_ENV = {"SADDLE_ESCAPE_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                     "OPENBLAS_NUM_THREADS": "1"}


class ExecutorError(Exception):
    """A scheduler that cannot be used (unreachable, malformed address), as one line."""


def default_workers() -> int:
    """Local worker count when none is given: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def single_threaded() -> None:
    """Make this process's numerical libraries use one thread (run in every worker)."""
    for name, value in SINGLE_THREAD_ENV.items():
        os.environ[name] = value
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _call(fn: Callable, item: Any) -> Any:
    """How every task runs on a worker: one thread, then the task."""
    single_threaded()
    return fn(item)


@contextlib.contextmanager
def scoped_environ(**changes: str | None):
    """Set (or, for ``None``, remove) environment variables for the duration of the block."""
    old = {name: os.environ.get(name) for name in changes}
    try:
        _set_environ(changes)
        yield
    finally:
        _set_environ(old)


def _set_environ(values: dict) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class Executor:
    """Common interface: ``as_completed`` is the primitive, ``map`` orders it by input."""

    name = "executor"
    workers = 1
    address: str | None = None   # a Dask scheduler's address, for chapters to connect to

    def as_completed(self, fn: Callable, items: Iterable) -> Iterator[tuple[int, Any]]:
        raise NotImplementedError

    def map(self, fn: Callable, items: Iterable) -> list:
        items = list(items)
        out: list = [None] * len(items)
        for index, result in self.as_completed(fn, items):
            out[index] = result
        return out

    def close(self, abort: bool = False) -> None:
        """Release the workers; ``abort`` (leaving on an exception or a signal) stops running tasks
        instead of waiting for them."""

    def describe(self) -> str:
        return f"{self.name} ({self.workers} worker{'s' if self.workers != 1 else ''})"

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(abort=exc_type is not None)


class SerialExecutor(Executor):
    """In this process, in input order (no single-thread switch: this is the caller's process)."""

    name = "sequential"

    def as_completed(self, fn, items):
        for index, item in enumerate(items):
            yield index, fn(item)


class ProcessExecutor(Executor):
    """Local worker processes, started with ``spawn`` (a fresh interpreter: no inherited torch
    threads or locks), each single-threaded."""

    name = "local processes"

    def __init__(self, workers: int | None = None):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.workers = workers or default_workers()
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=single_threaded)

    def as_completed(self, fn, items):
        from concurrent.futures import as_completed

        futures = {self._pool.submit(_call, fn, item): i for i, item in enumerate(items)}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            for future in futures:
                future.cancel()

    def close(self, abort=False):
        if abort:
            # A worker may be running a whole chapter: without this, the chapters of a killed sweep
            # run on to the end. (A chapter's kernel exits with its worker: ipykernel polls its parent.)
            for process in list((getattr(self._pool, "_processes", None) or {}).values()):
                process.terminate()
        self._pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor(Executor):
    """Tasks on a ``dask.distributed`` cluster through a Client (and the LocalCluster it started,
    if any, which closes with it)."""

    def __init__(self, client, cluster=None, name: str = "dask"):
        self.client, self.cluster, self.name = client, cluster, name
        self.address = client.scheduler.address
        self.workers = max(1, len(client.scheduler_info().get("workers", {})))

    def as_completed(self, fn, items):
        from dask.distributed import as_completed

        # pure=False: two equal items are still two runs (and nothing is served from Dask's memory)
        futures = [self.client.submit(_call, fn, item, pure=False) for item in items]
        index = {f.key: i for i, f in enumerate(futures)}
        try:
            for future in as_completed(futures):
                yield index[future.key], future.result()
        finally:
            self.client.cancel(futures)

    def close(self, abort=False):
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _quiet_dask():
    """Dask logs every failed connection attempt and a LocalCluster's start-up; the command line
    says what matters itself, in one line."""
    for name in ("distributed", "distributed.client", "distributed.comm", "distributed.core",
                 "distributed.scheduler", "distributed.nanny", "distributed.worker"):
        logging.getLogger(name).setLevel(logging.ERROR)


def start_local_cluster(workers: int | None = None) -> DaskExecutor:
    """A ``LocalCluster`` of single-threaded worker processes on this machine, and its Client."""
    from dask.distributed import Client, LocalCluster

    _quiet_dask()
    n = workers or default_workers()
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR, env=dict(SINGLE_THREAD_ENV))
    client = Client(cluster)
    return DaskExecutor(client, cluster, name="dask LocalCluster")


def connect(address: str, timeout: float = CONNECT_TIMEOUT_S) -> DaskExecutor:
    """A Client on the scheduler at `address`; :class:`ExecutorError` (one line) within about
    `timeout` seconds if nothing answers there."""
    from dask.distributed import Client

    if "://" not in address and ":" not in address:
        raise ExecutorError(f"scheduler {address!r} is not an address: use tcp://HOST:PORT, "
                            "or 'local' for a cluster on this machine")
    _quiet_dask()
    try:
        client = Client(address, timeout=timeout)
    except Exception as err:  # refused, timed out, or something that is not a Dask scheduler
        if isinstance(err, (OSError, TimeoutError)) and str(err).strip():
            reason = str(err).strip().splitlines()[0]
        else:  # e.g. a server that speaks another protocol answers with nonsense frame sizes
            reason = f"what answers there is not a Dask scheduler: {type(err).__name__}"
        raise ExecutorError(
            f"cannot reach the Dask scheduler at {address} ({reason[:160]}); start one with "
            f"`dask scheduler` (and `dask worker {address}`), use --scheduler local, or unset "
            f"{SCHEDULER_ENV}") from None
    return DaskExecutor(client, name=f"dask scheduler {address}")


def open_executor(scheduler: str | None = None, workers: int | None = None, *,
                  serial_when_one: bool = True) -> Executor:
    """The executor the command line asked for.

    `scheduler`: ``None`` -> ``$SADDLE_ESCAPE_SCHEDULER`` if set, else local worker processes
    (in-process and sequential when `workers` is 1 and `serial_when_one`); ``"local"`` -> a
    LocalCluster of `workers` processes; an address -> a Client connected to it.
    """
    if workers is not None and workers < 1:
        raise ExecutorError(f"--workers {workers} is not allowed: must be at least 1")
    scheduler = scheduler if scheduler is not None else (os.environ.get(SCHEDULER_ENV) or None)
    if scheduler is None:
        if workers == 1 and serial_when_one:
            return SerialExecutor()
        return ProcessExecutor(workers)
    if scheduler == "local":
        return start_local_cluster(workers)
    return connect(scheduler)


# --------------------------------------------------------------------------- inside a chapter

_CHAPTER_EXECUTOR: DaskExecutor | None = None


class TaskMap:
    """``map(fn, items) -> list`` over a cluster's executor, or sequential in this process when
    `executor` is None; `where` says which (``"dask"`` or ``"sequential"``)."""

    def __init__(self, executor: Executor | None = None):
        self.executor = executor
        self.where = "sequential" if executor is None else "dask"

    def __call__(self, fn: Callable, items: Iterable) -> list:
        if self.executor is None:
            return [fn(item) for item in items]
        return self.executor.map(fn, items)

    def __repr__(self) -> str:
        return f"TaskMap({self.where})"


def task_map() -> TaskMap:
    """A ``map(fn, items) -> list`` for a study's heaviest loop, passed in by the chapter::

        times = study.sweep(..., map=book.task_map())

    With ``$SADDLE_ESCAPE_SCHEDULER`` set to a scheduler's address (``run 06 --scheduler ...``
    sets it for the kernel) the items run as tasks on that cluster; otherwise in this process,
    one after the other. Results come back in input order and, each task being a pure function of
    its item, are identical either way. On a cluster `fn` and the items are pickled: use a
    module-level function of the package (possibly in ``functools.partial``) and chunks big
    enough to be worth a task (a whole seed, not one step). Under ``book -j`` and ``sweep`` the
    chapters themselves are the parallel tasks and their kernels get no address, so a chapter
    never waits on a cluster that its own siblings fill.
    """
    global _CHAPTER_EXECUTOR
    address = os.environ.get(SCHEDULER_ENV) or None
    if address is None or address == "local":
        return TaskMap()
    if _CHAPTER_EXECUTOR is None or _CHAPTER_EXECUTOR.address != address:
        _CHAPTER_EXECUTOR = connect(address)
    return TaskMap(_CHAPTER_EXECUTOR)
