"""Metrics: task metrics and privacy metrics (MIA, U-LiRA, KLoM) as pure functions.

* :mod:`~overunlearn.metrics.signals` -- per-example signals of a model (loss, confidence,
  entropy, modified entropy, correctness, logit-scaled confidence, KLoM margin);
* :mod:`~overunlearn.metrics.mia` -- population MIA (logistic regression on losses, forget vs
  test) and SalUn's MIA-efficacy (SVC on retain vs test, applied to the forget set);
* :mod:`~overunlearn.metrics.ulira` -- U-LiRA (unlearned vs retrained models, per-example Gaussians);
* :mod:`~overunlearn.metrics.klom` -- KLoM (binned KL of margins, unlearned vs oracle models);

The privacy layer that trains oracle and shadow models and unlearns them is :mod:`overunlearn.privacy`.

Every metric returns a small frozen result with ``per_example`` values and ``summary()``.
See ``docs/privacy.md``.
"""

from overunlearn.metrics.klom import KLoMResult, klom, klom_splits, klom_values
from overunlearn.metrics.mia import (
    MIAEfficacyResult,
    PopulationMIAResult,
    mia_efficacy,
    mia_efficacy_from_signals,
    population_mia,
)
from overunlearn.metrics.roc import auc_per_column, auc_score, roc_curve, tpr_at_fpr
from overunlearn.metrics.signals import Signals, compute_signals, compute_signals_many, signals_from_outputs
from overunlearn.metrics.ulira import ULiRAResult, ulira, ulira_scores

__all__ = [
    "KLoMResult", "MIAEfficacyResult", "PopulationMIAResult", "Signals", "ULiRAResult", "auc_per_column",
    "auc_score", "compute_signals", "compute_signals_many", "klom", "klom_splits", "klom_values", "mia_efficacy",
    "mia_efficacy_from_signals", "population_mia", "roc_curve", "signals_from_outputs",
    "tpr_at_fpr", "ulira", "ulira_scores",
]

