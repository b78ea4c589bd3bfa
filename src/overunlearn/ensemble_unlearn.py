"""Deprecated: the vectorised runner is :mod:`overunlearn.engine.vectorised` (import from :mod:`overunlearn.engine`)."""

from overunlearn.engine.vectorised import BatchedOutcome, BatchedRun, batchable, unlearn_batched  # noqa: F401

__all__ = ["BatchedOutcome", "BatchedRun", "batchable", "unlearn_batched"]
