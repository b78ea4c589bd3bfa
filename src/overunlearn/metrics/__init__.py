"""Metrics: task metrics and privacy metrics (MIA, U-LiRA, KLoM) as pure functions.

* :mod:`~overunlearn.metrics.signals` -- per-example signals of a model (loss, confidence,
  entropy, modified entropy, correctness, logit-scaled confidence, KLoM margin);
* :mod:`~overunlearn.metrics.mia` -- population MIA (logistic regression on losses, forget vs
  test) and SalUn's MIA-efficacy (SVC on retain vs test, applied to the forget set);
* :mod:`~overunlearn.metrics.ulira` -- U-LiRA (unlearned vs retrained models, per-example Gaussians);
* :mod:`~overunlearn.metrics.klom` -- KLoM (binned KL of margins, unlearned vs oracle models);
* :mod:`~overunlearn.metrics.privacy` -- oracle / shadow model sets, caching, :func:`privacy_report`;
* :mod:`~overunlearn.metrics.setups` -- ready-made setups (digits) and benchmark adapters.

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
    "mia_efficacy_from_signals", "population_mia", "privacy_report", "roc_curve", "signals_from_outputs",
    "tpr_at_fpr", "ulira", "ulira_scores",
]


def __getattr__(name: str):
    # privacy_report pulls in the engine and the methods: import it on first use only
    if name in ("privacy_report", "PrivacySetup", "MethodSpec"):
        from overunlearn.metrics import privacy

        return getattr(privacy, name)
    raise AttributeError(f"module 'overunlearn.metrics' has no attribute {name!r}")
