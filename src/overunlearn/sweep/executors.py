"""Executors: where tasks run. One small interface, three implementations.

An executor takes an iterable of task dicts (see :mod:`overunlearn.sweep.worker`) and
yields their result records as they complete, in any order. Executors never touch the
journal: the sweep's parent process writes every record it receives.

* :class:`SequentialExecutor` -- in this process, one task after another.
* :class:`ProcessPoolExecutor` -- ``N`` worker processes (``spawn`` start method), each
  with its own torch thread count and, where there are GPUs, its own device
  (``CUDA_VISIBLE_DEVICES`` set before torch initialises CUDA; worker ``i`` gets GPU
  ``i mod n_gpus``).
* :class:`RayExecutor` -- tasks as Ray remote functions on a cluster (``address``) or a
  local instance; ``num_gpus`` per task where the cluster has GPUs.

Executors are context managers; :func:`make_executor` builds one from CLI options.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
from collections.abc import Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from overunlearn.sweep.worker import WORKER_DIED, configure_process, failure_records, run_task

#: how often a task is started again in a fresh pool after a worker died while it was in flight (the task
#: that killed its worker cannot be told from the others that were in flight with it)
WORKER_DEATH_RETRIES = 1


class Executor(Protocol):
    name: str

    def run(self, tasks: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Run every task; yield each result record as soon as it is available."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: Any) -> None: ...


class _Base:
    name = "base"

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        pass


class SequentialExecutor(_Base):
    """Run tasks in this process, in order."""

    name = "sequential"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def run(self, tasks: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self.threads:
            configure_process(threads=self.threads)
        for task in tasks:
            yield run_task(task)


def _gpu_count() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover
        return 0


def _pool_init(threads: int | None, devices: Any, parent_pid: int | None = None) -> None:
    from overunlearn.workers import exit_with_parent

    exit_with_parent(parent_pid)
    _load_plugins_from_env()
    dev = None
    if devices is not None:
        dev = devices.get()
    configure_process(threads=threads, cuda_device=dev)


class ProcessPoolExecutor(_Base):
    """``jobs`` spawned worker processes; one GPU per worker where there are GPUs.

    Args:
        jobs: number of worker processes.
        threads: torch threads per worker (default: CPU count // jobs, at least 1).
        gpus: GPUs to spread workers over (default: all visible); ``0`` for CPU only.
        max_in_flight: tasks submitted ahead of completion (default ``2 * jobs``).
    """

    name = "pool"

    def __init__(self, jobs: int, threads: int | None = None, gpus: int | None = None,
                 max_in_flight: int | None = None) -> None:
        if jobs < 1:
            raise ValueError(f"jobs={jobs} must be >= 1")
        self.jobs = jobs
        self.threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        self.gpus = _gpu_count() if gpus is None else gpus
        self.max_in_flight = max_in_flight or 2 * jobs
        self._pool: cf.ProcessPoolExecutor | None = None

    def _start(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            ctx = mp.get_context("spawn")
            devices = ctx.Queue()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            # at most the GPUs there are (--gpus 4 on a 2-GPU machine pinned workers to GPUs that do not exist)
            ids = (visible.split(",") if visible else [str(i) for i in range(_gpu_count())])[: self.gpus]
            if ids:
                for i in range(self.jobs):
                    devices.put(ids[i % len(ids)])
            else:  # CPU only: the workers see no GPU (device "auto" then means the CPU)
                for _ in range(self.jobs):
                    devices.put("")
            self._pool = cf.ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx, initializer=_pool_init,
                                                initargs=(self.threads, devices, os.getpid()))
        return self._pool

    def run(self, tasks: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Yield each task's record(s). A worker that dies (killed, out of memory) breaks the pool: the
        tasks in flight are started again in a fresh pool, and one whose worker dies again is recorded
        as failed (``error_type`` ``"WorkerDied"``; a rerun of the sweep retries it)."""
        it = iter(tasks)
        pending: dict[cf.Future, dict[str, Any]] = {}
        retry: list[dict[str, Any]] = []
        deaths: dict[int, int] = {}  # id(task) -> worker deaths while it was in flight
        exhausted = False
        while True:
            pool = self._start()
            while len(pending) < self.max_in_flight and (retry or not exhausted):
                if retry:
                    task = retry.pop(0)
                else:
                    try:
                        task = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                pending[pool.submit(run_task, task)] = task
            if not pending:
                return
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            broken = False
            for fut in done:
                task = pending.pop(fut)
                try:
                    rec = fut.result()
                except BrokenProcessPool:
                    broken = True
                    retry.append(task)
                    continue
                yield rec
            if broken:
                # every future of a broken pool fails: start all in-flight tasks again in a fresh pool
                retry += list(pending.values())
                pending.clear()
                self._discard_pool()
                for task in list(retry):
                    deaths[id(task)] = deaths.get(id(task), 0) + 1
                    if deaths[id(task)] > WORKER_DEATH_RETRIES:
                        retry.remove(task)
                        yield failure_records(task, WORKER_DIED, (
                            "a worker process died (killed, or out of memory) while running this task, twice; it "
                            "is not counted as done: rerun the sweep to retry it (with fewer --jobs if memory is "
                            "short)"))

    def _discard_pool(self) -> None:
        """Forget a broken pool (its processes are gone or being shut down)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayExecutor(_Base):
    """Run tasks as Ray remote functions.

    Args:
        address: a Ray cluster address (``"auto"``, ``"ray://host:10001"``...); ``None`` starts a
            local instance (``init_kwargs``, e.g. ``{"num_cpus": 1}``). An already initialised
            Ray is used as it is and left running.
        cpus_per_trial: CPUs Ray reserves per trial (also the trial's torch thread count).
        gpus_per_trial: GPUs per trial (default: 1 if the cluster has GPUs, else 0).
        max_in_flight: trials submitted ahead of completion (default: 2 x cluster CPUs).
        shutdown: shut Ray down on close (default: only if this executor started it).
        init_kwargs: extra ``ray.init`` arguments.
    """

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_trial: float = 1, gpus_per_trial: float | None = None,
                 max_in_flight: int | None = None, shutdown: bool | None = None,
                 init_kwargs: dict[str, Any] | None = None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise RuntimeError("the Ray executor needs ray: pip install 'overunlearn[ray]' (or pip install ray)") from exc
        self._ray = ray
        started = False
        if not ray.is_initialized():
            kwargs = dict(init_kwargs or {})
            kwargs.setdefault("include_dashboard", False)
            kwargs.setdefault("log_to_driver", False)
            # workers must import the same code (and plugin modules) as this process
            kwargs.setdefault("runtime_env", {"env_vars": _worker_env()})
            ray.init(address=address, **kwargs)
            started = True
        self._shutdown = started if shutdown is None else shutdown
        res = ray.cluster_resources()
        self.cpus_per_trial = cpus_per_trial
        self.gpus_per_trial = (1 if res.get("GPU", 0) > 0 else 0) if gpus_per_trial is None else gpus_per_trial
        self.max_in_flight = max_in_flight or max(2, int(2 * res.get("CPU", 1)))
        self._remote = ray.remote(_ray_run_task)

    def run(self, tasks: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        ray = self._ray
        opts = {"num_cpus": self.cpus_per_trial, "num_gpus": self.gpus_per_trial, "max_retries": 0}
        threads = max(1, int(self.cpus_per_trial))
        it = iter(tasks)
        pending: list[Any] = []
        task_of: dict[Any, dict[str, Any]] = {}
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.max_in_flight:
                try:
                    task = dict(next(it))
                except StopIteration:
                    exhausted = True
                    break
                task.setdefault("threads", threads)
                ref = self._remote.options(**opts).remote(task)
                task_of[ref] = task
                pending.append(ref)
            if not pending:
                return
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                task = task_of.pop(ref)
                try:
                    rec = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a dead worker or node (run_task itself never raises)
                    rec = failure_records(task, WORKER_DIED, (
                        f"the Ray task died ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        "it is not counted as done: rerun the sweep to retry it"))
                yield rec

    def close(self) -> None:
        if self._shutdown and self._ray.is_initialized():
            self._ray.shutdown()
            self._shutdown = False


def _ray_run_task(task: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - runs inside Ray workers
    _load_plugins_from_env()
    return run_task(task)


def _load_plugins_from_env() -> None:
    """Import the plugin modules ``$OVERUNLEARN_PLUGINS`` names (set by the parent), as the parent did.

    A module that cannot be imported here is not fatal at start: every task names it in its ``imports``
    too, so the task fails with the import error in its record (instead of the worker dying).
    """
    from overunlearn.errors import PluginError
    from overunlearn.plugins import load_from_env

    try:
        load_from_env()
    except PluginError:
        pass


def _worker_env() -> dict[str, str]:
    """Environment variables Ray workers need to import this package and its plugins (``PYTHONPATH``, and
    ``OVERUNLEARN_PLUGINS``: the plugin modules this process loaded), and to find the same cache and data."""
    import sys

    from overunlearn.plugins import ENV_VAR, active_plugins

    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    plugins = active_plugins()
    if plugins:
        env[ENV_VAR] = os.pathsep.join(plugins)
    for var in ("OVERUNLEARN_CACHE", "XDG_CACHE_HOME", "OVERUNLEARN_DATA"):
        if var in os.environ:
            env[var] = os.environ[var]
    return env


def make_executor(kind: str = "local", jobs: int = 1, threads: int | None = None, address: str | None = None,
                  gpus: float | None = None, **ray_kwargs: Any) -> Executor:
    """Build an executor from CLI options: ``local`` (sequential if ``jobs == 1``, else a pool) or ``ray``."""
    if kind == "local":
        if jobs <= 1:
            return SequentialExecutor(threads=threads)
        return ProcessPoolExecutor(jobs=jobs, threads=threads, gpus=None if gpus is None else int(gpus))
    if kind == "ray":
        return RayExecutor(address=address, cpus_per_trial=threads or 1, gpus_per_trial=gpus, **ray_kwargs)
    raise ValueError(f"unknown executor {kind!r}; use 'local' or 'ray'")
