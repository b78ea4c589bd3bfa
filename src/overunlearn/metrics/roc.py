"""ROC helpers shared by the attacks: vectorized over thresholds and examples (NumPy).

Convention: a larger score means "more likely the positive class" (member / unlearned).
Ties count one half, so identical score distributions give an AUC of 0.5.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auc_score(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve of scores ``pos`` (positives) against ``neg`` (Mann-Whitney U / n_pos n_neg)."""
    pos = np.asarray(pos, dtype=np.float64).ravel()
    neg = np.asarray(neg, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def auc_per_column(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUC of every column: ``pos`` is ``(n_pos, n)``, ``neg`` is ``(n_neg, n)``; returns ``(n,)``."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
        raise ValueError(f"expected (n_pos, n) and (n_neg, n) arrays, got {pos.shape} and {neg.shape}")
    ranks = rankdata(np.concatenate([pos, neg], axis=0), axis=0)
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    u = ranks[:n_pos].sum(axis=0) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` at every distinct threshold, starting at ``(0, 0)`` (threshold +inf).

    Predict positive when ``score >= threshold``.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_curve needs at least one positive and one negative score")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # last index of each distinct score
    tpr = np.r_[0.0, tp[last] / n_pos]
    fpr = np.r_[0.0, fp[last] / n_neg]
    thr = np.r_[np.inf, s[last]]
    return fpr, tpr, thr


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, alpha: float) -> float:
    """The largest TPR over thresholds whose FPR is at most ``alpha`` (LiRA's low-FPR operating point)."""
    ok = fpr <= alpha + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0
