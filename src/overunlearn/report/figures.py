"""Figure 2-style frontier plots (matplotlib, Agg backend)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from overunlearn.report.aggregate import MINNORM, SettingResult

_MARKERS = ["o", "s", "^", "v", "D", "P", "X", "<", ">", "h", "p", "8"]
_REF_STYLE = {"original": ("*", "black", "Original"), "ground_truth": ("*", "gold", "Ground truth")}


def _se(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def frontier_plot(s: SettingResult, path: str | Path, title: str | None = None) -> Path:
    """Plot each method's Pareto front of seed means (first two metrics) with SE bars.

    MinNorm-OG is drawn on top with a thicker red line; the original and ground-truth
    models are stars. Axis labels show which direction is better.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    (mx, dx), (my, dy) = s.metrics[0], s.metrics[1]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    cmap = plt.get_cmap("tab10")
    others = [mr for mr in s.methods if mr.method != MINNORM]
    colour = {mr.method: cmap(i % 10) for i, mr in enumerate(others)}
    for i, mr in enumerate(s.methods):
        if not mr.selected:
            continue
        xs = [g.stats(mx) for g in mr.selected]
        ys = [g.stats(my) for g in mr.selected]
        highlight = mr.method == MINNORM
        ax.errorbar([a.mean for a in xs], [b.mean for b in ys],
                    xerr=[_se(a.se) for a in xs], yerr=[_se(b.se) for b in ys],
                    fmt="-" + _MARKERS[i % len(_MARKERS)] if not highlight else "-o",
                    color="red" if highlight else colour[mr.method],
                    lw=2.6 if highlight else 1.2, ms=8 if highlight else 5, capsize=2,
                    zorder=5 if highlight else 3, label="MinNorm-OG" if highlight else mr.method,
                    alpha=1.0 if highlight else 0.85)
    for kind, stats in s.reference.items():
        if mx in stats and my in stats:
            marker, col, label = _REF_STYLE.get(kind, ("*", "grey", kind))
            ax.errorbar([stats[mx].mean], [stats[my].mean], xerr=[_se(stats[mx].se)], yerr=[_se(stats[my].se)],
                        fmt=marker, color=col, mec="black", ms=14, capsize=2, zorder=6, label=label)
    ax.set_xlabel(f"{mx} ({'higher' if dx == 'max' else 'lower'} is better)")
    ax.set_ylabel(f"{my} ({'higher' if dy == 'max' else 'lower'} is better)")
    budget = ", ".join(f"{k}={v}" for k, v in s.budget.items())
    ax.set_title(title or f"{s.sweep} {s.title or s.setting} ({budget})".strip(), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def save_figure(fig: Any, path: str | Path) -> Path:
    """Render ``fig`` in memory (format from the suffix) and write it atomically with
    :func:`overunlearn.storage.atomic_write_bytes`: an interrupted run never leaves a truncated image."""
    from overunlearn.storage import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix[1:].lower() or None)
    return atomic_write_bytes(path, buf.getvalue())
