"""Running unlearning methods.

* :mod:`overunlearn.engine.loop`: :func:`unlearn`, one method on one problem within a
  :class:`Budget` -- the reference semantics of every method (its hooks, step by step);
* :mod:`overunlearn.engine.vectorised`: :func:`unlearn_batched`, many small full-batch MLP runs at
  once, for methods that describe their step as a
  :class:`~overunlearn.methods.vectorised.VectorisedForm` (:func:`batchable` says whether a run
  qualifies, and why not);
* :func:`unlearn_many`: a list of runs, the vectorisable ones together and the others one by one.

The engine sits above :mod:`overunlearn.methods` and :mod:`overunlearn.linalg`, which never import it.
"""

from overunlearn.engine.loop import (
    Budget,
    StepInfo,
    UnlearningContext,
    UnlearnRecord,
    UnlearnResult,
    check_data,
    check_drawn_labels,
    reinitialise_trainable,
    resolve_device,
    synchronize,
    unlearn,
    warm_up,
)
from overunlearn.engine.many import unlearn_many
from overunlearn.engine.vectorised import BatchedOutcome, BatchedRun, batchable, unlearn_batched

__all__ = [
    "BatchedOutcome",
    "BatchedRun",
    "Budget",
    "StepInfo",
    "UnlearnRecord",
    "UnlearnResult",
    "UnlearningContext",
    "batchable",
    "check_data",
    "check_drawn_labels",
    "reinitialise_trainable",
    "resolve_device",
    "synchronize",
    "unlearn",
    "unlearn_batched",
    "unlearn_many",
    "warm_up",
]
