"""Figures from a privacy report's per-example arrays (``privacy_arrays.npz``).

* :func:`plot_loss_histograms` -- one panel per model set (original, ground truth, each
  method): histograms of the per-example losses of the forget and test sets, pooled over the
  ``N`` models (log-scaled loss axis). A forgotten forget set looks like the test set.
* :func:`plot_klom_cdfs` -- empirical CDFs of per-example KLoM for one split, one curve per
  model set; curves further left are closer to the oracles (the ground-truth curve is the
  noise floor).

Both accept the ``.npz`` path written by :func:`overunlearn.privacy.runner.privacy_report`
(or the dict returned by :func:`overunlearn.privacy.runner.load_arrays`) and write a PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _load(source) -> dict[str, dict[str, np.ndarray]]:
    if isinstance(source, Mapping):
        return dict(source)
    from overunlearn.privacy.runner import load_arrays

    return load_arrays(source)


def _labels(data: Mapping[str, Mapping[str, np.ndarray]], labels: Sequence[str] | None) -> list[str]:
    found = [k for k in data if k != "index"]
    if labels is None:
        return found
    missing = [x for x in labels if x not in found]
    if missing:
        raise KeyError(f"no arrays for {missing}; available: {found}")
    return list(labels)


def _save(fig, path: str | Path) -> Path:
    import io

    from overunlearn.storage import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def plot_loss_histograms(source, path: str | Path, *, labels: Sequence[str] | None = None, bins: int = 40,
                         splits: Sequence[str] = ("forget", "test"), floor: float = 1e-6) -> Path:
    """Forget vs test loss histograms, one panel per model set; returns the written path.

    The loss axis is logarithmic; losses below ``floor`` are counted in the first bin. Bar
    heights are fractions of each split's (example, model) pairs.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    data = _load(source)
    labs = _labels(data, labels)
    pooled = {lab: {s: np.asarray(data[lab][f"loss_{s}"]).ravel() for s in splits} for lab in labs}
    allv = np.concatenate([v for d in pooled.values() for v in d.values()])
    lo = max(float(np.min(allv[allv > 0])) if (allv > 0).any() else floor, floor)
    hi = max(float(np.max(allv)), lo * 10)
    edges = np.logspace(np.log10(lo), np.log10(hi), bins + 1)
    ncol = min(3, len(labs))
    nrow = int(np.ceil(len(labs) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.0 * nrow), squeeze=False)
    for ax, lab in zip(axes.ravel(), labs, strict=False):
        for s in splits:
            v = np.clip(pooled[lab][s], lo, hi)
            ax.hist(v, bins=edges, alpha=0.55, weights=np.full(v.size, 1.0 / max(v.size, 1)), label=s)
        ax.set_xscale("log")
        ax.set_title(lab)
        ax.set_xlabel(f"per-example loss (first bin: <= {lo:.0e})")
        ax.set_ylabel("fraction")
        ax.legend(fontsize=8)
    for ax in axes.ravel()[len(labs):]:
        ax.set_visible(False)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_klom_cdfs(source, path: str | Path, *, split: str = "forget", labels: Sequence[str] | None = None) -> Path:
    """Empirical CDFs of per-example KLoM on ``split``, one curve per model set; returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    data = _load(source)
    labs = [lab for lab in _labels(data, labels) if f"klom_{split}" in data[lab]]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for lab in labs:
        v = np.sort(np.asarray(data[lab][f"klom_{split}"]))
        ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=lab,
                linestyle="--" if lab == "ground_truth" else "-")
    ax.set_xlabel(f"KLoM ({split} examples)")
    ax.set_ylabel("fraction of examples")
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
