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


def _points(s: SettingResult) -> dict[str, list[tuple[float, float]]]:
    (mx, _), (my, _) = s.metrics[0], s.metrics[1]
    out = {mr.method: [(g.stats(mx).mean, g.stats(my).mean) for g in mr.selected] for mr in s.methods if mr.selected}
    for kind, stats in s.reference.items():
        if mx in stats and my in stats:
            out[f"ref:{kind}"] = [(stats[mx].mean, stats[my].mean)]
    return out


def zoom_limits(s: SettingResult, min_ratio: float = 3.0,
                pad: float = 0.15) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Axis limits of a close-up on the reference models and MinNorm-OG's front, or ``None``.

    The close-up is worth drawing when the whole plot spans at least ``min_ratio`` times the
    close-up's range on either axis (a diverged baseline squeezes everything else into a corner).
    """
    pts = _points(s)
    core = [p for k, v in pts.items() if k == MINNORM or k.startswith("ref:") for p in v]
    every = [p for v in pts.values() for p in v]
    core = [p for p in core if all(map(math.isfinite, p))]
    every = [p for p in every if all(map(math.isfinite, p))]
    if len(core) < 2 or not every:
        return None
    lims = []
    worth = False
    for i in (0, 1):
        lo, hi = min(p[i] for p in core), max(p[i] for p in core)
        full = max(p[i] for p in every) - min(p[i] for p in every)
        span = hi - lo
        if span <= 0:
            span = max(abs(hi), 1e-12) * 0.05
        if full >= min_ratio * span:
            worth = True
        lims.append((lo - pad * span, hi + pad * span))
    return (lims[0], lims[1]) if worth else None


def frontier_plot(s: SettingResult, path: str | Path, title: str | None = None) -> Path:
    """Plot each method's Pareto front of seed means (first two metrics) with SE bars.

    MinNorm-OG is drawn on top with a thicker red line; the original and ground-truth
    models are stars. Axis labels show which direction is better. When some front lies far
    from the rest (e.g. a diverged baseline), a second panel zooms in on the reference models
    and MinNorm-OG's front (:func:`zoom_limits`).
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    zoom = zoom_limits(s)
    ncols = 2 if zoom else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.4 * ncols, 4.8), dpi=120, squeeze=False)
    for k, ax in enumerate(axes[0]):
        _draw_fronts(ax, s, legend=(k == 0))
        if k == 1 and zoom is not None:
            ax.set_xlim(*zoom[0])
            ax.set_ylim(*zoom[1])
            ax.set_title("close-up: reference models and MinNorm-OG's front", fontsize=9)
    budget = ", ".join(f"{k}={v}" for k, v in s.budget.items())
    full_title = title or f"{s.sweep} {s.title or s.setting} ({budget})".strip()
    fig.suptitle("\n".join(textwrap.wrap(full_title, 60 * ncols)), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def _draw_fronts(ax: Any, s: SettingResult, legend: bool) -> None:
    import matplotlib.pyplot as plt

    (mx, dx), (my, dy) = s.metrics[0], s.metrics[1]
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
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7, loc="best", ncol=2)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Render ``fig`` in memory (format from the suffix) and write it atomically with
    :func:`overunlearn.storage.atomic_write_bytes`: an interrupted run never leaves a truncated image."""
    from overunlearn.storage import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix[1:].lower() or None)
    return atomic_write_bytes(path, buf.getvalue())
