"""Running one task in whatever process an executor chose.

A *task* is a plain, picklable dict (so it crosses process and Ray boundaries); running
it returns a plain dict, the journal record without provenance. Nothing here writes the
journal. Benchmarks and problems are cached per process, so consecutive trials on the
same benchmark and seed reuse the original model.

Task kinds:

* ``{"kind": "trial", "trial": Trial.identity() + labels, ...}`` -> a ``"trial"`` record;
* ``{"kind": "reference", "benchmark": ..., "seed": ...}`` -> a ``"reference"`` record;
* ``{"kind": "batch", "tasks": [trial tasks]}`` -> ``{"kind": "batch", "records": [trial records]}``:
  the trials that qualify (:func:`overunlearn.engine.batchable`) run as one vectorised ensemble, any
  other one on its own (:func:`overunlearn.engine.unlearn_many`); every trial still gets its own record.
"""

from __future__ import annotations

import importlib
import os
import time
import traceback
from collections import OrderedDict
from typing import Any

_BENCH_CACHE: OrderedDict[str, Any] = OrderedDict()
_PROBLEM_CACHE: OrderedDict[tuple[str, int], Any] = OrderedDict()
_MAX_BENCH = 4
_MAX_PROBLEMS = 2
_CONFIGURED: dict[str, Any] = {"threads": None, "pinned": False}


def configure_process(threads: int | None = None, cuda_device: str | None = None) -> None:
    """Set torch's thread count and pin the process to one GPU (call before CUDA is used); ``cuda_device=""``
    hides every GPU."""
    if cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_device
        _CONFIGURED["pinned"] = cuda_device != ""
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch

        torch.set_num_threads(int(threads))
        _CONFIGURED["threads"] = int(threads)


def _task_device(task: dict[str, Any]) -> str:
    """The device a task asks for; in a worker pinned to one GPU, ``cuda:N`` is that GPU (``cuda``): the
    pool spreads workers over the GPUs, and a pinned worker sees exactly one."""
    device = str(task.get("device", "auto"))
    return "cuda" if _CONFIGURED["pinned"] and device.startswith("cuda:") else device


def warm_up() -> None:
    """Pay once per process, outside any timed region, the one-off cost of the first optimizer
    (see :func:`overunlearn.engine.warm_up`, which :func:`~overunlearn.engine.unlearn` also calls)."""
    from overunlearn.engine import warm_up as engine_warm_up

    engine_warm_up()


def clear_caches() -> None:
    _BENCH_CACHE.clear()
    _PROBLEM_CACHE.clear()


def _benchmark(name: str, options: dict[str, Any], imports: list[str] | tuple[str, ...]) -> Any:
    from overunlearn.benchmarks import get_benchmark
    from overunlearn.sweep.spec import benchmark_key

    for mod in imports:
        importlib.import_module(mod)
    key = benchmark_key(name, options)
    if key not in _BENCH_CACHE:
        _BENCH_CACHE[key] = get_benchmark(name, **options)
        while len(_BENCH_CACHE) > _MAX_BENCH:
            _BENCH_CACHE.popitem(last=False)
    _BENCH_CACHE.move_to_end(key)
    return _BENCH_CACHE[key]


def _problem(bench: Any, bkey: str, seed: int) -> Any:
    from overunlearn.benchmarks.base import seeded

    key = (bkey, seed)
    if key not in _PROBLEM_CACHE:
        with seeded(seed):
            _PROBLEM_CACHE[key] = bench.problem(seed)
        while len(_PROBLEM_CACHE) > _MAX_PROBLEMS:
            _PROBLEM_CACHE.popitem(last=False)
    _PROBLEM_CACHE.move_to_end(key)
    return _PROBLEM_CACHE[key]


def _metric_specs(bench: Any) -> list[dict[str, str]]:
    return [{"name": m.name, "direction": m.direction, "label": getattr(m, "label", "")} for m in bench.metrics]


def _device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": device, "torch_threads": torch.get_num_threads(), "pid": os.getpid()}
    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        info["gpu"] = torch.cuda.get_device_name(idx)
        info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return info


def _error_fields(exc: BaseException) -> dict[str, Any]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    out = {"error_type": type(exc).__name__, "error": f"{type(exc).__name__}: {exc}", "traceback": tb[-4000:]}
    step = getattr(exc, "step", None)
    if isinstance(step, int):
        out["error_step"] = step
    return out


#: ``"arithmetic"`` of a trial record: which code computed it. The two agree to float32 rounding, which
#: long or ill-conditioned runs amplify (docs/reliability.md); within one, numbers do not depend on scheduling
ENGINE = "engine"
VECTORISED = "vectorised"

#: ``error_type`` of a task whose worker process died (killed, out of memory): not deterministic, retried
WORKER_DIED = "WorkerDied"


def failure_records(task: dict[str, Any], error_type: str, message: str) -> dict[str, Any]:
    """The record(s) of a task that produced none of its own (its worker died): each trial of it, or the
    reference, as ``failed`` with ``error_type`` and ``message``, in the shape :func:`run_task` returns."""
    if task["kind"] == "batch":
        return {"kind": "batch", "records": [failure_records(sub, error_type, message) for sub in task["tasks"]]}
    err = {"status": "failed", "error_type": error_type, "error": f"{error_type}: {message}", "phase": "worker"}
    if task["kind"] == "reference":
        return {"kind": "reference", "benchmark": task["benchmark"], "benchmark_key": task["benchmark_key"],
                "seed": task["seed"], **err}
    return {"kind": "trial", "id": task["id"], "config_key": task["config_key"], **task["trial"], **err}


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Run one task and return its record; exceptions are caught and recorded, never raised."""
    if task.get("threads") and _CONFIGURED["threads"] != task["threads"]:
        configure_process(threads=task["threads"])
    kind = task["kind"]
    if kind == "trial":
        return _run_trial(task)
    if kind == "reference":
        return _run_reference(task)
    if kind == "batch":
        return _run_batch(task)
    raise ValueError(f"unknown task kind {kind!r}")


def _run_reference(task: dict[str, Any]) -> dict[str, Any]:
    from overunlearn.benchmarks.base import check_metrics, seeded

    rec: dict[str, Any] = {"kind": "reference", "benchmark": task["benchmark"], "benchmark_key": task["benchmark_key"],
                           "seed": task["seed"], "started_at": time.time()}
    t0 = time.perf_counter()
    try:
        bench = _benchmark(task["benchmark"]["name"], task["benchmark"]["options"], task.get("imports", ()))
        rec["metric_specs"] = _metric_specs(bench)
        with seeded(task["seed"]):
            ref = bench.reference(task["seed"])
        rec["reference"] = {k: check_metrics(bench, d) for k, d in ref.items()}
        rec["status"] = "finished"
    except Exception as exc:  # noqa: BLE001 - every failure is recorded
        rec.update(_error_fields(exc))
        rec["status"] = "failed"
    rec["wall_seconds"] = time.perf_counter() - t0
    return rec


def _run_trial(task: dict[str, Any]) -> dict[str, Any]:
    from overunlearn.benchmarks.base import check_metrics, seeded
    from overunlearn.engine import Budget, resolve_device, unlearn
    from overunlearn.methods import create

    t = task["trial"]
    rec: dict[str, Any] = {"kind": "trial", "id": task["id"], "config_key": task["config_key"], **t,
                           "started_at": time.time()}
    t0 = time.perf_counter()
    phase = "benchmark"
    try:
        bench_name, options = t["benchmark"]["name"], t["benchmark"]["options"]
        bench = _benchmark(bench_name, options, task.get("imports", ()))
        rec["metric_specs"] = _metric_specs(bench)
        phase = "problem"
        problem = _problem(bench, task["benchmark_key"], t["seed"])
        phase = "unlearn"
        warm_up()
        method = create(t["method"], **t["config"])
        device = str(resolve_device(_task_device(task)))
        rec.update(_device_info(device))
        result = unlearn(problem, method, Budget(**t["budget"]), seed=t["seed"], device=device,
                         forget_bn_stats=bool(t["engine"].get("forget_bn_stats", False)))
        r = result.record
        rec.update(steps=r.steps, epochs_completed=r.epochs_completed, steps_per_epoch=r.steps_per_epoch,
                   seconds=r.seconds, setup_seconds=r.setup_seconds, stopped_by=r.stopped_by,
                   epoch_losses=r.epoch_losses, arithmetic=ENGINE)
        phase = "evaluate"
        with seeded(t["seed"]):
            rec["metrics"] = check_metrics(bench, bench.evaluate(result.model, t["seed"]))
        rec["status"] = "finished"
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, the sweep goes on
        rec.update(_error_fields(exc))
        rec["status"] = "failed"
        rec["phase"] = phase
    rec["wall_seconds"] = time.perf_counter() - t0
    return rec


def _run_batch(task: dict[str, Any]) -> dict[str, Any]:
    from overunlearn.benchmarks.base import check_metrics, seeded
    from overunlearn.engine import BatchedRun, Budget, resolve_device, unlearn_many
    from overunlearn.methods import create

    records: list[dict[str, Any]] = []
    runs: list[BatchedRun] = []
    members: list[tuple[dict[str, Any], Any]] = []
    problems: dict[tuple[str, int], Any] = {}
    for sub in task["tasks"]:
        t = sub["trial"]
        try:
            bench = _benchmark(t["benchmark"]["name"], t["benchmark"]["options"], sub.get("imports", ()))
            key = (sub["benchmark_key"], int(t["seed"]))
            if key not in problems:
                problems[key] = _problem(bench, sub["benchmark_key"], int(t["seed"]))
            method = create(t["method"], **t["config"])
            budget = Budget(**t["budget"])
        except Exception:  # noqa: BLE001 - the trial on its own records the failure and its phase
            records.append(_run_trial(sub))
            continue
        if t["engine"].get("forget_bn_stats"):  # an engine option the vectorised runner does not take
            records.append(_run_trial(sub))
            continue
        runs.append(BatchedRun(problems[key], method, budget, seed=int(t["seed"]), key=len(members)))
        members.append((sub, bench))
    if not runs:
        return {"kind": "batch", "records": records}
    try:
        warm_up()
        device = str(resolve_device(_task_device(task)))
        started = time.time()
        # the trials that qualify (batchable) run as one vectorised ensemble, any other one on its own
        outcomes = unlearn_many(runs, device)
    except Exception:  # noqa: BLE001 - nothing of the batch is lost: each trial runs (or fails) on its own
        return {"kind": "batch", "records": records + [_run_trial(sub) for sub, _ in members]}
    for (sub, bench), out in zip(members, outcomes, strict=True):
        t = sub["trial"]
        rec: dict[str, Any] = {"kind": "trial", "id": sub["id"], "config_key": sub["config_key"], **t,
                               "started_at": started, "metric_specs": _metric_specs(bench)}
        rec.update(_device_info(device))
        r = out.record
        rec.update(steps=r.steps, epochs_completed=r.epochs_completed, steps_per_epoch=r.steps_per_epoch,
                   seconds=r.seconds, setup_seconds=r.setup_seconds, stopped_by=r.stopped_by,
                   epoch_losses=r.epoch_losses, arithmetic=VECTORISED if out.vectorised else ENGINE)
        if out.vectorised:
            rec["batch"] = {"size": out.batch_size, "seconds": out.batch_seconds}
        t0 = time.perf_counter()
        if out.model is None:
            rec.update(status="failed", phase="unlearn", error=out.error, error_type=out.error_type)
            if out.error_step is not None:
                rec["error_step"] = out.error_step
            if out.traceback is not None:
                rec["traceback"] = out.traceback[-4000:]
        else:
            try:
                with seeded(int(t["seed"])):
                    rec["metrics"] = check_metrics(bench, bench.evaluate(out.model, t["seed"]))
                rec["status"] = "finished"
            except Exception as exc:  # noqa: BLE001
                rec.update(_error_fields(exc))
                rec.update(status="failed", phase="evaluate")
        rec["wall_seconds"] = r.seconds + time.perf_counter() - t0
        records.append(rec)
    return {"kind": "batch", "records": records}
