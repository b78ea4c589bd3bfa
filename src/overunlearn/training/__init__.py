"""Training helpers: the vectorised MLP ensemble trainer used to build benchmark models."""

from overunlearn.training.ensemble import (
    Member,
    MemberResult,
    measure_throughput,
    train_ensemble,
    train_single_reference,
)

__all__ = ["Member", "MemberResult", "measure_throughput", "train_ensemble", "train_single_reference"]
