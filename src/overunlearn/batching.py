"""Batch streams following the protocol of the authors' reference code (`base_unlearner.Unlearner.unlearn`).

* Forget batches: one epoch is one shuffled pass over the forget set (last batch kept).
* Retain batches: a persistent, cycling iterator over the accessible retain set,
  reshuffled on each pass; unused batches are not discarded at epoch ends. As in the
  reference code, the last incomplete retain batch is dropped when the retain set is
  larger than one batch.

All randomness comes from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from overunlearn.problem import Batch, Data, TensorData, batch_from_items, collate_examples


def _n_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def _epoch(data: Data, batch_size: int, drop_last: bool, generator: torch.Generator,
           collate: Callable[[list[Any]], Any] | None = None) -> Iterator[Batch]:
    n = len(data)  # type: ignore[arg-type]
    perm = torch.randperm(n, generator=generator)
    if isinstance(data, TensorData):
        for i in range(_n_batches(n, batch_size, drop_last)):
            yield data.take(perm[i * batch_size : (i + 1) * batch_size])
        return
    # (any map-style data: a torch Dataset, or a list of examples)
    loader = DataLoader(Subset(data, perm.tolist()), batch_size=batch_size,  # type: ignore[arg-type]
                        shuffle=False, drop_last=drop_last, collate_fn=collate or collate_examples)
    for items in loader:
        yield batch_from_items(items)


def forget_batches_per_epoch(data: Data, batch_size: int) -> int:
    """Steps in one unlearning epoch: ``ceil(|D_f| / batch_size)``."""
    return _n_batches(len(data), batch_size, drop_last=False)  # type: ignore[arg-type]


def forget_epoch(data: Data, batch_size: int, generator: torch.Generator,
                 collate: Callable[[list[Any]], Any] | None = None) -> Iterator[Batch]:
    """One shuffled pass over the forget set (``collate``: for a ``Dataset``, the collate function)."""
    return _epoch(data, batch_size, drop_last=False, generator=generator, collate=collate)


class RetainCycle:
    """Endless retain batches, reshuffled at the start of every pass."""

    def __init__(self, data: Data, batch_size: int, generator: torch.Generator,
                 collate: Callable[[list[Any]], Any] | None = None) -> None:
        self.data = data
        self.collate = collate
        self.batch_size = batch_size
        self.generator = generator
        self.drop_last = len(data) > batch_size  # type: ignore[arg-type]
        self._it: Iterator[Batch] = iter(())

    def __next__(self) -> Batch:
        try:
            return next(self._it)
        except StopIteration:
            self._it = _epoch(self.data, self.batch_size, self.drop_last, self.generator, self.collate)
            return next(self._it)

    def __iter__(self) -> RetainCycle:
        return self
