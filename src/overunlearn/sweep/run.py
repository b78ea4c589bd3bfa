"""Running a spec: pending trials -> executor -> journal (written here, by the parent only)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overunlearn.errors import OverunlearnError
from overunlearn.sweep.executors import Executor, SequentialExecutor
from overunlearn.sweep.journal import (
    DETERMINISTIC_ERRORS,
    FINISHED,
    JournalContents,
    JournalWriter,
    code_fingerprint,
    describe_stale,
    environment,
    git_revision,
    package_versions,
    read_journal,
    stale_trials,
)
from overunlearn.sweep.spec import SweepSpec, Trial, benchmark_key, check_benchmark
from overunlearn.sweep.worker import ENGINE, VECTORISED

#: failures in these phases are not about the trial: the same error would hit every trial
SETUP_PHASES = ("benchmark", "problem")


class SweepAborted(OverunlearnError, RuntimeError):
    """A failure that every remaining trial would repeat (missing dataset, bad benchmark options)."""


@dataclass
class SweepResult:
    journal: Path
    total: int
    skipped: int
    finished: int = 0
    failed: int = 0
    #: of ``failed``, the trials that diverged (a non-finite loss: a result of the hyperparameters, not retried)
    diverged: int = 0
    references: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def task_imports(imports: tuple[str, ...] | list[str]) -> list[str]:
    """The modules a worker imports before it runs a task: the spec's ``imports`` and the plugins loaded in
    this process (``--plugin``, entry points), so that spawned and Ray workers register the same methods
    and benchmarks."""
    from overunlearn.plugins import active_plugins

    return list(dict.fromkeys([*imports, *active_plugins()]))


def trial_task(trial: Trial, device: str, threads: int | None = None) -> dict[str, Any]:
    ident = trial.identity()
    labels = {"sweep": trial.sweep, "setting": trial.setting, "hyper": trial.hyper}
    return {"kind": "trial", "id": trial.id, "config_key": trial.config_key,
            "benchmark_key": benchmark_key(trial.benchmark, trial.benchmark_options),
            "trial": {**ident, **labels}, "imports": task_imports(trial.imports), "device": device,
            "threads": threads}


def batch_key(trial: Trial) -> tuple[Any, ...] | None:
    """Trials with the same key may share a vectorised batch (``None``: this one never does).

    Only pure epoch budgets batch (a wall-clock budget must time each trial alone); members of
    one batch share the benchmark, the budget and the optimizer settings, so one stacked AdamW
    steps them all. Whether the model allows batching is decided by the worker, which runs any
    trial it cannot batch on its own.
    """
    if set(trial.budget) != {"epochs"}:
        return None
    cfg = trial.config
    return (benchmark_key(trial.benchmark, trial.benchmark_options), trial.budget["epochs"], cfg.get("lr"),
            cfg.get("weight_decay"), cfg.get("optimizer"), tuple(sorted(trial.engine.items())))


def make_tasks(trials: list[Trial], device: str, threads: int | None = None, batch: int = 0) -> list[dict[str, Any]]:
    """One task per trial, or, with ``batch > 1``, batch tasks of up to ``batch`` compatible trials."""
    if batch <= 1:
        return [trial_task(t, device, threads) for t in trials]
    groups: dict[tuple[Any, ...], list[Trial]] = {}
    tasks: list[dict[str, Any]] = []
    for t in trials:
        key = batch_key(t)
        if key is None:
            tasks.append(trial_task(t, device, threads))
        else:
            groups.setdefault(key, []).append(t)
    for members in groups.values():
        for i in range(0, len(members), batch):
            # a chunk of one is a batch task too: a batchable trial then always runs vectorised, whatever
            # else is pending (a resumed sweep may leave one trial of a group); its numbers do not depend
            # on its batch (ensemble_unlearn.py runs every member's arithmetic as it would run alone)
            chunk = members[i : i + batch]
            tasks.append({"kind": "batch", "tasks": [trial_task(t, device, threads) for t in chunk],
                          "device": device, "threads": threads})
    return tasks


def pending_trials(spec: SweepSpec, done: set[str]) -> list[Trial]:
    """Trials not yet done, each once, ordered by setting, seed, method (keeps problem caches warm)."""
    seen: set[str] = set()
    out: list[Trial] = []
    for t in spec.trials:
        if t.id in done or t.id in seen:
            continue
        seen.add(t.id)
        out.append(t)
    return out


def check_metric_specs(spec: SweepSpec, specs: list[dict[str, Any]] | None) -> str | None:
    """A message if the spec's ``[metrics]`` disagree with what the benchmark reports, else ``None``."""
    if not spec.metrics or not specs:
        return None
    actual = {m["name"]: m["direction"] for m in specs}
    for name, direction in spec.metrics.items():
        if name not in actual:
            return (f"the spec lists metric {name!r} but benchmark {spec.benchmark!r} reports "
                    f"{sorted(actual)}; fix [metrics] in {spec.path}")
        if actual[name] != direction:
            return (f"the spec says metric {name!r} is {direction!r}-is-better but benchmark {spec.benchmark!r} "
                    f"says {actual[name]!r}; fix [metrics] in {spec.path}")
    return None


def _fmt_values(values: dict[str, Any]) -> str:
    """``metric=value`` pairs of the numeric entries, for the progress log."""
    return " ".join(f"{k}={v:.4g}" for k, v in values.items() if isinstance(v, (int, float)))


def _record(rec: dict[str, Any], writer: JournalWriter, spec: SweepSpec, provenance: dict[str, Any],
            result: SweepResult, counter: dict[str, int], n_total: int, log: Callable[[str], None]) -> str | None:
    """Journal one record and log it; return an abort reason, or ``None``."""
    counter["i"] += 1
    i = counter["i"]
    rec.update(provenance)
    rec["finished_at"] = time.time()
    writer.append(rec)
    mismatch = check_metric_specs(spec, rec.get("metric_specs"))
    if mismatch:
        return mismatch
    ok = rec.get("status") == FINISHED
    if rec["kind"] == "reference":
        result.references += 1
        what = f"reference seed={rec['seed']}"
    else:
        result.finished += ok
        result.failed += not ok
        result.diverged += not ok and rec.get("error_type") in DETERMINISTIC_ERRORS
        hyper = " ".join(f"{k}={v}" for k, v in rec.get("hyper", {}).items())
        what = f"{rec.get('setting') or ''} {rec['method']} seed={rec['seed']} {hyper}".strip()
    if ok:
        if rec["kind"] == "reference":  # {"original": {metric: value}, "ground_truth": {...}}
            metr = "; ".join(f"{role} {_fmt_values(vals)}" for role, vals in (rec.get("reference") or {}).items()
                             if isinstance(vals, dict))
        else:
            metr = _fmt_values(rec.get("metrics") or {})
        log(f"[{i}/{n_total}] {what}: {metr}")
    else:
        msg = f"[{i}/{n_total}] {what}: FAILED {rec.get('error', '')}"
        log(msg)
        result.failures.append(msg)
        if rec["kind"] == "reference" or rec.get("phase") in SETUP_PHASES:
            return rec.get("error", "setup failed")
    return None


#: most warnings printed one by one; the rest are counted
MAX_WARNINGS = 20


def emit_warnings(messages: list[str], warn: Callable[[str], None]) -> None:
    """Hand every message to ``warn``, at most :data:`MAX_WARNINGS` of them, then how many more there were."""
    for msg in messages[:MAX_WARNINGS]:
        warn(msg)
    if len(messages) > MAX_WARNINGS:
        warn(f"... and {len(messages) - MAX_WARNINGS} more journal warning(s) like these")


def _stderr(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def mixed_arithmetic(contents: JournalContents, spec: SweepSpec, todo: list[Trial], batch: int) -> str | None:
    """A warning when this run would compute pending epoch-budget trials with the other arithmetic (engine or
    vectorised, ``--batch``) than finished ones in the journal, else ``None``."""
    ids = {t.id for t in spec.trials if batch_key(t) is not None}
    counts: dict[str, int] = {}
    for rid, rec in contents.latest_trials().items():
        if rid in ids and rec.get("status") == FINISHED and rec.get("arithmetic") in (ENGINE, VECTORISED):
            counts[rec["arithmetic"]] = counts.get(rec["arithmetic"], 0) + 1
    pending = sum(1 for t in todo if t.id in ids)
    planned = VECTORISED if batch > 1 else ENGINE
    other = ENGINE if planned == VECTORISED else VECTORISED
    if not pending or not counts.get(other):
        return None
    how = "--batch 0" if other == ENGINE else f"--batch {max(2, spec.batch)}"
    return (f"{counts[other]} finished trial(s) were computed by the {other} arithmetic and this run computes "
            f"{pending} with the {planned} one where the model allows (batch = {batch}); the two agree to float32 "
            f"rounding only, which long or ill-conditioned runs amplify. Use {how} to keep one arithmetic in this "
            "journal")


def reference_tasks(spec: SweepSpec, done: set[tuple[str, int]], device: str,
                    threads: int | None) -> list[dict[str, Any]]:
    """One task per (benchmark configuration, seed) of the spec whose reference is not in ``done``."""
    tasks: list[dict[str, Any]] = []
    seen: set[tuple[str, int]] = set(done)
    for s in spec.settings:
        bkey = benchmark_key(spec.benchmark, s.benchmark_options)
        for seed in s.seeds:
            if (bkey, seed) in seen:
                continue
            seen.add((bkey, seed))
            tasks.append({"kind": "reference", "benchmark": {"name": spec.benchmark, "options": s.benchmark_options},
                          "benchmark_key": bkey, "seed": seed, "imports": task_imports(spec.imports), "device": device,
                          "threads": threads})
    return tasks


def run_sweep(spec: SweepSpec, journal: str | Path, executor: Executor | None = None, *,
              device: str | None = None, threads: int | None = None, retry_failed: bool = False,
              references: bool = True, max_trials: int | None = None, check: bool = True,
              batch: int | None = None, log: Callable[[str], None] | None = None,
              warn: Callable[[str], None] | None = None, rerun_stale: bool = False) -> SweepResult:
    """Run every trial of ``spec`` that ``journal`` does not already hold as done.

    Safe to kill at any moment and run again: finished trials are skipped, and a trial is
    marked finished only by its own fsynced journal line. The journal is locked before it is
    read, so two sweeps on one journal cannot both decide to run the same trial.

    Args:
        spec: a loaded spec.
        journal: JSONL path (created if missing).
        executor: where trials run (default: sequentially in this process).
        device: overrides the spec's ``[engine].device``.
        threads: torch threads per trial.
        retry_failed: rerun trials that failed deterministically (NaN loss) before.
        references: also record ``benchmark.reference(seed)`` for every seed not yet recorded.
        max_trials: stop after this many trials (for smoke runs).
        check: configure the benchmark here first (cheap) and stop on unknown names, bad options
            or metrics that disagree with the spec's ``[metrics]``.
        batch: most trials per vectorised batch task (default: the spec's ``[engine].batch``; 0 or 1:
            one trial per task). Every trial still gets its own journal line.
        log: receives one line per completed task (progress).
        warn: receives every warning (skipped journal lines, conflicting duplicates, reused results of
            other code); default: printed on stderr. Warnings are not progress: pass them on also when
            ``log`` is silenced.
        rerun_stale: rerun finished trials recorded by other code (another source fingerprint or torch
            version) instead of reusing them.

    Raises:
        JournalLockedError: another sweep is writing ``journal``.
        SweepAborted: a setup step failed in a way every trial would repeat.
    """
    journal = Path(journal)
    log = log or (lambda _msg: None)
    warn = warn or _stderr
    if check:
        problems = check_benchmark(spec)
        if problems:
            raise SweepAborted(f"{spec.path}: " + "; ".join(problems))
    executor = executor or SequentialExecutor(threads=threads)
    dev = device or spec.device
    batch = spec.batch if batch is None else int(batch)
    abort: str | None = None
    t_start = time.perf_counter()
    with JournalWriter(journal) as writer:  # the lock first, then what the journal holds
        contents = read_journal(journal)
        emit_warnings(contents.warnings(), warn)
        code = code_fingerprint()
        done = contents.done_ids(retry_failed=retry_failed)
        stale = stale_trials(contents, {t.id for t in spec.trials} & done, code)
        if stale:
            emit_warnings([describe_stale(stale, code, journal, rerun_stale)], warn)
            if rerun_stale:
                done -= set(stale)
        todo = pending_trials(spec, done)
        mixed = mixed_arithmetic(contents, spec, todo, batch)
        if mixed:
            emit_warnings([f"journal {journal}: {mixed}"], warn)
        distinct = len({t.id for t in spec.trials})
        result = SweepResult(journal=journal, total=distinct, skipped=distinct - len(todo))
        if max_trials is not None:
            todo = todo[:max_trials]
        refs_done = {k for k, r in contents.references().items() if r.get("status") == FINISHED}
        ref_tasks = reference_tasks(spec, refs_done, dev, threads) if references else []
        run_info = {"executor": getattr(executor, "name", type(executor).__name__), "device": dev,
                    "threads": threads, "pending": len(todo), "references": len(ref_tasks), "batch": batch}
        n_total = len(todo) + len(ref_tasks)
        counter = {"i": 0}
        git = git_revision()
        versions = package_versions()
        writer.append({"kind": "sweep", "spec": spec.header(), "run": run_info, "versions": versions, "git": git,
                       "env": environment(), "code": code})
        provenance = {"versions": versions, "git": git, "executor": run_info["executor"], "code": code}
        if not todo and not ref_tasks:
            log(f"nothing to do: all {distinct} trials are in {journal}")
        # references first, as a barrier: they usually train (and cache) the original models, which the
        # trials of the same seed would otherwise train concurrently in other workers
        phases = [ref_tasks, make_tasks(todo, dev, threads, batch)]
        for phase in phases:
            if not phase or abort is not None:
                continue
            abort = _consume(executor.run(iter(phase)), writer, spec, provenance, result, counter, n_total, log)
    result.seconds = time.perf_counter() - t_start
    if abort is not None:
        raise SweepAborted(
            f"stopped: a setup step failed and would fail for every trial: {abort}. The failure is recorded in "
            f"{journal}; fix the cause and run the sweep again (finished trials are kept).")
    return result


def _consume(gen: Iterator[dict[str, Any]], writer: JournalWriter, spec: SweepSpec, provenance: dict[str, Any],
             result: SweepResult, counter: dict[str, int], n_total: int, log: Callable[[str], None]) -> str | None:
    """Write every record the executor yields; return an abort reason, or ``None``."""
    try:
        for out in gen:
            for rec in (out["records"] if out.get("kind") == "batch" else [out]):
                reason = _record(rec, writer, spec, provenance, result, counter, n_total, log)
                if reason is not None:
                    return reason
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            close()
    return None
