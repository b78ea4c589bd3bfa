"""One entry point for many runs: the vectorisable ones together, every other one on its own."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence

import torch

from overunlearn.engine.loop import UnlearnRecord, resolve_device, unlearn
from overunlearn.engine.vectorised import BatchedOutcome, BatchedRun, batchable, unlearn_batched


def _alone(run: BatchedRun, device: torch.device, progress: Callable[[int], None] | None) -> BatchedOutcome:
    """``run`` through :func:`~overunlearn.engine.unlearn`, its failure (if any) captured in the outcome."""
    on_step = None if progress is None else (lambda _info, _loss: progress(1))
    try:
        result = unlearn(run.problem, run.method, run.budget, seed=run.seed, device=device, on_step=on_step)
    except Exception as exc:  # noqa: BLE001 - a failing run is an outcome, the others go on
        step = getattr(exc, "step", None)
        step = step if isinstance(step, int) else None
        record = UnlearnRecord(method=run.method.name, config=run.method.config.to_dict(), device=str(device))
        if step is not None:
            record.steps = step
        return BatchedOutcome(run.key, None, record, error=f"{type(exc).__name__}: {exc}",
                              error_type=type(exc).__name__, error_step=step, vectorised=False,
                              traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return BatchedOutcome(run.key, result.model, result.record, batch_seconds=result.record.seconds,
                          vectorised=False)


def _batchable(run: BatchedRun) -> bool:
    """Whether ``run`` joins a vectorised ensemble; a method whose ``vectorised()`` raises (a plugin's bug) runs on
    its own through the engine, where its hooks decide how it fares, as with batching off."""
    try:
        return batchable(run.problem, run.method, run.budget) is None
    except Exception:  # noqa: BLE001
        return False


def unlearn_many(runs: Sequence[BatchedRun], device: str | torch.device = "auto", *, vectorise: bool = True,
                 progress: Callable[[int], None] | None = None) -> list[BatchedOutcome]:
    """Run every run of ``runs`` and return their outcomes in the same order.

    The runs that :func:`~overunlearn.engine.vectorised.batchable` accepts run together through
    :func:`~overunlearn.engine.vectorised.unlearn_batched` (grouped as it groups them); every other
    run (and, with ``vectorise=False``, every run) goes through :func:`~overunlearn.engine.unlearn`
    on its own. ``outcome.vectorised`` says which. A run that fails does not stop the others: its
    outcome has no model and names the error. Should the vectorised computation fail as a whole
    (an error that is no member's own), its runs are run one at a time instead.

    Args:
        runs: the runs; the problems' models are not modified.
        device: where to compute (``"auto"``: CUDA when available).
        vectorise: run the vectorisable runs together (``False``: every run on its own).
        progress: called with a number of steps taken, as they are taken.
    """
    dev = resolve_device(device)
    together = [j for j, r in enumerate(runs) if vectorise and _batchable(r)]
    outcomes: list[BatchedOutcome | None] = [None] * len(runs)
    if together:
        try:
            batched = unlearn_batched([runs[j] for j in together], dev, progress)
        except Exception:  # noqa: BLE001 - no run is lost to a problem of the batch: they run one by one below
            batched = []
        for j, out in zip(together, batched, strict=False):
            outcomes[j] = out
    return [out if out is not None else _alone(runs[j], dev, progress) for j, out in enumerate(outcomes)]


__all__ = ["unlearn_many"]
