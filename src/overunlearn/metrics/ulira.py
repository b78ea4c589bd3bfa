"""U-LiRA (Hayes, Shumailov, Triantafillou, Khalifa & Papernot, 2024): a per-example
likelihood-ratio attack that tries to tell an *unlearned* model from a *retrained* one.

Protocol implemented here (a fixed-forget-set variant, vectorized with NumPy):

* Input: a statistic of every forget example under ``n_u`` **unlearned** models (each an
  original model trained on ``D = D_r + D_f`` with its own seed, then unlearned by the method
  under test) and ``n_r`` **retrained** models (oracles trained on ``D_r`` only, own seeds).
  The statistic is LiRA's logit-scaled confidence ``log(p_y / (1-p_y))`` for classifiers
  and the signed error for regression (:mod:`overunlearn.metrics.signals`).
* Cross-fitting: model ``i`` of each group goes to fold ``i % K``. For fold ``k`` the models
  *outside* the fold are the **shadow** models and the models *inside* it the **targets**.
  ``K`` defaults to ``max(n_u, n_r)``: leave-one-out, so every model is a target exactly
  once and the Gaussians are fitted on all the others (``n - 1`` shadows per group).
* Per example ``j`` and fold ``k``: fit ``N(mu_u, s_u^2)`` to the unlearned shadows and
  ``N(mu_r, s_r^2)`` to the retrained shadows (unbiased variance, floored at ``min_std^2``;
  ``global_variance=True`` pools the variance over examples, LiRA's fixed-variance variant
  for few shadow models).
* Score of a target model ``t`` on example ``j``:
  ``log N(s_tj; mu_u, s_u^2) - log N(s_tj; mu_r, s_r^2)`` (positive: "looks unlearned").
* Evaluation: every (target model, forget example) pair is one attack decision; unlearned
  targets are the positives and retrained targets the negatives. We report the pooled
  ROC AUC and the TPR at 1% and 5% FPR (largest TPR with FPR <= alpha), and per example
  the AUC over the target models. 0.5 means the unlearned models are indistinguishable
  from retrained ones; 1.0 means the attack always tells them apart.

Differences from the paper: Hayes et al. train shadow models on random halves of the data
and unlearn random forget sets, so each example has its own in/out shadows; here the
forget set is fixed (that of the benchmark) and the shadow/target split is over model
seeds, which is what a benchmark with N originals and N oracles allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from overunlearn.metrics.roc import auc_per_column, roc_curve, tpr_at_fpr

LOG_2PI = float(np.log(2.0 * np.pi))


def _gauss_logpdf(x: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    return -0.5 * (LOG_2PI + np.log(var) + (x - mu) ** 2 / var)


def _fold_stats(x: np.ndarray, folds: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and unbiased variance of the rows *outside* each fold: ``(k, n_ex)`` each, and counts."""
    w = (folds[None, :] != np.arange(k)[:, None]).astype(np.float64)  # (k, n_models)
    c = w.sum(axis=1)
    if (c < 2).any():
        raise ValueError("U-LiRA needs at least 2 shadow models per group in every fold; use more models or folds")
    center = x.mean(axis=0)
    xc = x - center
    s1 = w @ xc
    s2 = w @ (xc * xc)
    m = s1 / c[:, None]
    var = (s2 - c[:, None] * m * m) / (c[:, None] - 1.0)
    return m + center, np.maximum(var, 0.0), c


@dataclass(frozen=True)
class ULiRAResult:
    """Result of :func:`ulira`.

    ``per_example``: the attack AUC of each example over the target models;
    ``scores_unlearned`` ``(n_u, n)`` and ``scores_retrained`` ``(n_r, n)``: the log likelihood
    ratios of every target model on every example.
    """

    auc: float
    tpr_at_fpr: dict[float, float]
    n_folds: int
    per_example: np.ndarray = field(repr=False)
    scores_unlearned: np.ndarray = field(repr=False)
    scores_retrained: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, float]:
        out = {"auc": self.auc, "example_auc_mean": float(np.nanmean(self.per_example))}
        for a, v in self.tpr_at_fpr.items():
            out[f"tpr@{a * 100:g}%fpr"] = v
        return out


def ulira_scores(unlearned: np.ndarray, retrained: np.ndarray, *, folds: int | None = None,
                 global_variance: bool = False, min_std: float = 1e-4) -> tuple[np.ndarray, np.ndarray, int]:
    """The cross-fitted log-likelihood-ratio scores of every target model: ``(s_u, s_r, K)``."""
    u = np.asarray(unlearned, dtype=np.float64)
    r = np.asarray(retrained, dtype=np.float64)
    if u.ndim != 2 or r.ndim != 2 or u.shape[1] != r.shape[1]:
        raise ValueError(f"expected (n_unlearned, n) and (n_retrained, n) arrays, got {u.shape} and {r.shape}")
    if not (np.isfinite(u).all() and np.isfinite(r).all()):
        raise ValueError("U-LiRA statistics contain NaN or infinite values")
    k = max(u.shape[0], r.shape[0]) if folds is None else int(folds)
    if k < 2:
        raise ValueError(f"folds={k}: U-LiRA needs at least 2 folds")
    fu, fr = np.arange(u.shape[0]) % k, np.arange(r.shape[0]) % k
    mu_u, var_u, _ = _fold_stats(u, fu, k)
    mu_r, var_r, _ = _fold_stats(r, fr, k)
    if global_variance:
        var_u = np.broadcast_to(var_u.mean(axis=1, keepdims=True), var_u.shape)
        var_r = np.broadcast_to(var_r.mean(axis=1, keepdims=True), var_r.shape)
    floor = min_std * min_std
    var_u, var_r = np.maximum(var_u, floor), np.maximum(var_r, floor)

    def score(x: np.ndarray, f: np.ndarray) -> np.ndarray:
        return _gauss_logpdf(x, mu_u[f], var_u[f]) - _gauss_logpdf(x, mu_r[f], var_r[f])

    return score(u, fu), score(r, fr), k


def ulira(unlearned: np.ndarray, retrained: np.ndarray, *, folds: int | None = None, global_variance: bool = False,
          min_std: float = 1e-4, fprs: tuple[float, ...] = (0.01, 0.05)) -> ULiRAResult:
    """U-LiRA of unlearned against retrained models (see the module docstring for the protocol).

    Args:
        unlearned: statistic of each forget example under each unlearned model, ``(n_u, n)``.
        retrained: the same under each retrained (oracle) model, ``(n_r, n)``.
        folds: number of cross-fitting folds (``None``: leave-one-out).
        global_variance: pool the Gaussian variances over examples.
        min_std: floor on the fitted standard deviations.
        fprs: false-positive rates at which the TPR is reported.
    """
    su, sr, k = ulira_scores(unlearned, retrained, folds=folds, global_variance=global_variance, min_std=min_std)
    scores = np.concatenate([su.ravel(), sr.ravel()])
    labels = np.concatenate([np.ones(su.size, dtype=bool), np.zeros(sr.size, dtype=bool)])
    fpr, tpr, _ = roc_curve(scores, labels)
    # trapezoidal area of the step ROC equals the Mann-Whitney AUC with ties counted one half
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    return ULiRAResult(auc, {a: tpr_at_fpr(fpr, tpr, a) for a in fprs}, k, auc_per_column(su, sr), su, sr)
