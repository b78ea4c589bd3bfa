"""Population membership-inference attacks on one model's per-example signals.

Two established attacks, both pure functions over arrays (see :mod:`overunlearn.metrics.signals`):

:func:`population_mia` -- the simple MIA of the NeurIPS 2023 machine-unlearning challenge.
    A logistic regression learns to tell **forget** examples (label 1) from held-out
    **test** examples (label 0) from their losses alone. The larger of the two sets is
    first subsampled at random to the size of the smaller (``balance=True``), so chance
    accuracy is exactly 0.5. Accuracy is the mean over a stratified ``n_splits``-fold
    cross-validation (``n_splits`` is lowered to the size of the smaller class when needed);
    the AUC is computed on the pooled out-of-fold member probabilities. A model that has
    forgotten its forget set as well as a retrained model scores like the retrained model
    (~0.5 when forget and test examples come from one distribution and the sets are large; the
    pooled out-of-fold AUC is biased below 0.5 on sets of tens of examples, measured by
    ``benchmarks/mia_null.py``, so compare with the ground-truth row at the same sizes). The attack
    has one feature, so it can only learn a threshold on the loss; ``threshold_auc`` in the summary
    is the AUC of ``-loss`` without any fitting (and without that bias).

:func:`mia_efficacy` -- SalUn's (Fan et al. 2024; Jia et al. 2023) "MIA-efficacy".
    An RBF support-vector classifier (``C=3``, ``gamma="auto"``) is trained on a named
    signal of **retain** examples (members, label 1) versus **test** examples (non-members,
    label 0), balanced by subsampling the larger set (and capped at ``max_per_class`` per
    class to bound the SVC's quadratic cost); it is then applied to the **forget** set. The
    efficacy is the fraction of forget examples predicted *non-member*: higher means the
    forget set looks less like training data (a retrained model's value is the reference).
    Features: ``confidence``, ``entropy``, ``modified_entropy``, ``correctness`` (and any
    other signal name, such as ``loss``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from overunlearn.metrics.roc import auc_score
from overunlearn.metrics.signals import Signals

SALUN_FEATURES: tuple[str, ...] = ("confidence", "entropy", "modified_entropy", "correctness")


def _vector(name: str, x: Any) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of per-example values, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values (is this signal defined for the task?)")
    return a


def _balanced_indices(n_a: int, n_b: int, rng: np.random.Generator, cap: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    k = min(n_a, n_b) if cap is None else min(n_a, n_b, cap)
    ia = np.sort(rng.choice(n_a, size=k, replace=False)) if k < n_a else np.arange(n_a)
    ib = np.sort(rng.choice(n_b, size=k, replace=False)) if k < n_b else np.arange(n_b)
    return ia, ib


@dataclass(frozen=True)
class PopulationMIAResult:
    """Result of :func:`population_mia`.

    ``per_example`` holds the out-of-fold member probability of each forget example
    (NaN for examples dropped by the balancing subsample); ``per_example_test`` the same
    for the test examples.
    """

    accuracy: float
    accuracy_std: float
    auc: float
    threshold_auc: float
    n_forget: int
    n_test: int
    n_used_per_class: int
    n_splits: int
    per_example: np.ndarray = field(repr=False)
    per_example_test: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "accuracy_std": self.accuracy_std, "auc": self.auc,
                "threshold_auc": self.threshold_auc, "n_per_class": float(self.n_used_per_class),
                "n_splits": float(self.n_splits)}


def population_mia(forget_loss: Any, test_loss: Any, *, n_splits: int = 5, seed: int = 0,
                   balance: bool = True) -> PopulationMIAResult:
    """Logistic-regression MIA on per-example losses, forget (members) vs test (non-members).

    Args:
        forget_loss: per-example losses of the forget set, shape ``(n_f,)``.
        test_loss: per-example losses of held-out test examples, shape ``(n_t,)``.
        n_splits: folds of the stratified cross-validation (capped by the smaller class).
        seed: seeds the balancing subsample and the fold assignment.
        balance: subsample the larger set to the size of the smaller one (chance = 0.5).

    Returns NaN metrics (with a valid result object) when a class has fewer than 2 examples.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    f = _vector("forget_loss", forget_loss)
    t = _vector("test_loss", test_loss)
    rng = np.random.default_rng(seed)
    if balance:
        fi, ti = _balanced_indices(f.size, t.size, rng)
    else:
        fi, ti = np.arange(f.size), np.arange(t.size)
    x = np.concatenate([f[fi], t[ti]])
    y = np.concatenate([np.ones(fi.size, dtype=int), np.zeros(ti.size, dtype=int)])
    per_f = np.full(f.size, np.nan)
    per_t = np.full(t.size, np.nan)
    thr_auc = auc_score(-f[fi], -t[ti])
    k = min(n_splits, fi.size, ti.size)
    if k < 2:
        return PopulationMIAResult(float("nan"), float("nan"), float("nan"), thr_auc, f.size, t.size,
                                   int(min(fi.size, ti.size)), k, per_f, per_t)
    # standardise the single feature (losses can be large); this does not change the classifier family
    mu, sd = x.mean(), x.std()
    xs = ((x - mu) / (sd if sd > 0 else 1.0))[:, None]
    oof = np.empty(x.size)
    accs = []
    for train, test in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(xs, y):
        clf = LogisticRegression()
        clf.fit(xs[train], y[train])
        oof[test] = clf.predict_proba(xs[test])[:, 1]
        accs.append(float((clf.predict(xs[test]) == y[test]).mean()))
    per_f[fi] = oof[: fi.size]
    per_t[ti] = oof[fi.size:]
    auc = auc_score(oof[: fi.size], oof[fi.size:])
    return PopulationMIAResult(float(np.mean(accs)), float(np.std(accs)), auc, thr_auc, f.size, t.size,
                               int(fi.size), k, per_f, per_t)


@dataclass(frozen=True)
class MIAEfficacyResult:
    """Result of :func:`mia_efficacy`: ``per_example`` is 1.0 where a forget example is predicted non-member."""

    feature: str
    efficacy: float
    train_accuracy: float
    n_members: int
    n_nonmembers: int
    per_example: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, float]:
        return {"efficacy": self.efficacy, "train_accuracy": self.train_accuracy,
                "n_per_class": float(self.n_members)}


def mia_efficacy(retain_values: Any, test_values: Any, forget_values: Any, *, feature: str = "confidence",
                 seed: int = 0, max_per_class: int | None = 5000, C: float = 3.0) -> MIAEfficacyResult:
    """SalUn-style MIA-efficacy of one feature (arrays of shape ``(n,)`` or ``(n, k)``).

    Args:
        retain_values: feature values of retain examples (members, label 1).
        test_values: feature values of test examples (non-members, label 0).
        forget_values: feature values of the forget examples the trained SVC is applied to.
        feature: the feature's name (recorded in the result).
        seed: seeds the balancing subsample.
        max_per_class: cap on training examples per class (``None``: no cap).
        C: the SVC's regularization constant.
    """
    from sklearn.svm import SVC

    def as2d(name: str, v: Any) -> np.ndarray:
        a = np.asarray(v, dtype=np.float64)
        a = a[:, None] if a.ndim == 1 else a
        if a.ndim != 2:
            raise ValueError(f"{name} must have shape (n,) or (n, k), got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"{name} ({feature}) contains NaN or infinite values; is it defined for this task?")
        return a

    r, t, f = as2d("retain_values", retain_values), as2d("test_values", test_values), as2d("forget_values", forget_values)
    rng = np.random.default_rng(seed)
    ri, ti = _balanced_indices(len(r), len(t), rng, max_per_class)
    if ri.size == 0:
        raise ValueError("mia_efficacy needs at least one retain and one test example")
    x = np.concatenate([r[ri], t[ti]])
    y = np.concatenate([np.ones(ri.size, dtype=int), np.zeros(ti.size, dtype=int)])
    if np.ptp(x, axis=0).max() == 0:
        # a constant feature cannot separate anything: the SVC would predict the majority (a tie here)
        pred_f = np.ones(len(f), dtype=int)
        train_acc = 0.5
    else:
        clf = SVC(C=C, gamma="auto", kernel="rbf")
        clf.fit(x, y)
        pred_f = clf.predict(f) if len(f) else np.zeros(0, dtype=int)
        train_acc = float((clf.predict(x) == y).mean())
    nonmember = (pred_f == 0).astype(np.float64)
    eff = float(nonmember.mean()) if nonmember.size else float("nan")
    return MIAEfficacyResult(feature, eff, train_acc, int(ri.size), int(ti.size), nonmember)


def mia_efficacy_from_signals(retain: Signals, test: Signals, forget: Signals,
                              features: Sequence[str] = SALUN_FEATURES, *, seed: int = 0,
                              max_per_class: int | None = 5000) -> dict[str, MIAEfficacyResult]:
    """:func:`mia_efficacy` for several named features of one model's (1-D) signals."""
    return {name: mia_efficacy(retain.get(name), test.get(name), forget.get(name), feature=name, seed=seed,
                               max_per_class=max_per_class) for name in features}
