"""The table every ``overunlearn bench`` command prints: one row per model, one column per metric.

Rows: the reference models (original, ground truth), then each method at its one hyperparameter
point; cells are a statistic over seeds -- ``"median"`` (median (central range)) or ``"mean_se"``
(mean ± standard error) -- and the last column is the method's unlearning seconds (the same
statistic's centre: median or mean over seeds). A method whose trials failed shows ``failed``.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from overunlearn.report.aggregate import MINNORM, SettingResult

#: the reference rows' default labels
REFERENCE_LABELS: Mapping[str, str] = {"original": "original", "ground_truth": "ground truth"}

#: statistic -> the CSV columns of one (model, metric) cell
CSV_COLUMNS: Mapping[str, tuple[str, ...]] = {"median": ("median", "lo", "hi"), "mean_se": ("n", "mean", "se")}


def _csv_values(st: Any, statistic: str) -> list[Any]:
    return [getattr(st, c) for c in CSV_COLUMNS[statistic]]


def _seconds(values: Sequence[float], statistic: str) -> str:
    from overunlearn.report.tables import fmt_num

    if not values:
        return ""
    if statistic == "median":
        return f"{statistics.median(values):.1f}"
    return fmt_num(sum(values) / len(values))


def method_table(setting: SettingResult, metrics: Sequence[str], statistic: str | None = None,
                 ref_labels: Mapping[str, str] | None = None) -> tuple[str, str]:
    """``(markdown, csv)`` of one bench setting.

    Args:
        setting: a setting of the bench sweep's report (``BenchRun.settings[i]``).
        metrics: the metric columns, in order.
        statistic: ``"median"`` or ``"mean_se"`` (default: the setting's own).
        ref_labels: labels of the reference rows (default :data:`REFERENCE_LABELS`).

    The CSV is long-format: ``model, metric`` and the statistic's columns (``median, lo, hi`` or
    ``n, mean, se``).
    """
    from overunlearn.report.tables import fmt_stat, markdown, to_csv

    stat = statistic or setting.statistic
    if stat not in CSV_COLUMNS:
        raise ValueError(f"statistic must be one of {sorted(CSV_COLUMNS)}, got {stat!r}")
    labels = {**REFERENCE_LABELS, **(ref_labels or {})}
    header = ["model", *metrics, "seconds"]
    rows: list[list[Any]] = []
    csv_rows: list[list[Any]] = []
    for kind, stats in setting.reference.items():
        rows.append([labels.get(kind, kind), *[fmt_stat(stats[m], stat) if m in stats else "—" for m in metrics], ""])
        csv_rows.extend([kind, m, *_csv_values(stats[m], stat)] for m in metrics if m in stats)
    for mr in setting.methods:
        if not mr.selected:
            rows.append([mr.method, *["failed" for _ in metrics], ""])
            continue
        g = mr.selected[0]
        rows.append([f"**{mr.method}**" if mr.method == MINNORM else mr.method,
                     *[fmt_stat(g.stats(m), stat) for m in metrics], _seconds(list(g.seconds.values()), stat)])
        csv_rows.extend([mr.method, m, *_csv_values(g.stats(m), stat)] for m in metrics)
    return markdown(header, rows), to_csv(["model", "metric", *CSV_COLUMNS[stat]], csv_rows)


__all__ = ["CSV_COLUMNS", "REFERENCE_LABELS", "method_table"]
