"""Tables in markdown and CSV: Table 1/2-style results, frontier points, winning hyperparameters, runtime."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from overunlearn.report.aggregate import MINNORM, SettingResult
from overunlearn.sweep.select import SeedStats, seed_stats

REFERENCE_LABELS = {"original": "Original", "ground_truth": "Ground truth"}


def fmt_num(x: float | None, digits: int = 3) -> str:
    """Compact number: 3 significant digits, no exponent between 1e-3 and 1e6."""
    if x is None or not math.isfinite(x):
        return "—"
    if abs(x) >= 1000 and abs(x) < 1e6:
        return f"{x:.0f}"
    if x == 0 or 1e-3 <= abs(x) < 1e6:
        return f"{x:.{digits}g}"
    return f"{x:.{digits - 1}e}"


def fmt_stat(st: SeedStats, statistic: str) -> str:
    if st.n == 0:
        return "—"
    if statistic == "median":
        return f"{fmt_num(st.median)} ({fmt_num(st.lo)}, {fmt_num(st.hi)})"
    se = "" if not math.isfinite(st.se) else f" ± {fmt_num(st.se)}"
    return f"{fmt_num(st.mean)}{se}"


def fmt_hyper(hyper: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hyper.items()) or "defaults"


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if (isinstance(v, float) and not math.isfinite(v)) else v for v in r])
    return buf.getvalue()


def _label(method: str) -> str:
    return f"**{method}**" if method == MINNORM else method


def results_table(settings: list[SettingResult]) -> tuple[str, str]:
    """Table 1/2 style for best-mean sweeps: one row per setting, a column per method.

    Returns ``(markdown, csv)``; the CSV is long-format with every statistic.
    """
    md_parts: list[str] = []
    csv_rows: list[list[Any]] = []
    csv_header = ["setting", "method", "metric", "direction", "n", "mean", "se", "median", "central_lo",
                  "central_hi", "hyperparameters"]
    metric_names = list(dict.fromkeys(m for s in settings for m, _ in s.metrics))
    for metric in metric_names:
        ss = [s for s in settings if metric in dict(s.metrics)]
        methods = list(dict.fromkeys(m.method for s in ss for m in s.methods))
        kinds = list(dict.fromkeys(k for s in ss for k in s.reference))
        direction = dict(ss[0].metrics)[metric]
        statistic = ss[0].statistic
        what = "median (central range)" if statistic == "median" else "mean ± SE"
        held = ss[0].selected_on
        over = (f"over the held-out seeds {ss[0].seeds} of the setting with the best mean on seeds {held}" if held
                else "over seeds of the best-mean setting")
        md_parts.append(f"**{metric}** ({'lower' if direction == 'min' else 'higher'} is better; {what} {over})\n")
        header = ["setting", *[REFERENCE_LABELS.get(k, k) for k in kinds], *[_label(m) for m in methods]]
        rows = []
        for s in ss:
            row: list[Any] = [s.title or s.setting or "all"]
            for k in kinds:
                st = s.reference.get(k, {}).get(metric)
                row.append(fmt_stat(st, s.statistic) if st else "—")
                if st:
                    csv_rows.append([s.setting, k, metric, direction, st.n, st.mean, st.se, st.median, st.lo, st.hi, ""])
            # bold the best method mean in this row
            cells = {}
            for mr in s.methods:
                if mr.selected:
                    g = mr.selected[0]
                    st = g.stats(metric)
                    cells[mr.method] = (st, fmt_stat(st, s.statistic))
                    csv_rows.append([s.setting, mr.method, metric, direction, st.n, st.mean, st.se, st.median,
                                     st.lo, st.hi, json.dumps(g.hyper, sort_keys=True)])
            best = None
            centre = {m: (c[0].median if s.statistic == "median" else c[0].mean) for m, c in cells.items()}
            centre = {m: v for m, v in centre.items() if math.isfinite(v)}
            if centre:
                best = (min if direction == "min" else max)(centre, key=centre.__getitem__)
            for m in methods:
                if m in cells:
                    row.append(f"**{cells[m][1]}**" if m == best else cells[m][1])
                else:
                    row.append("—")
            rows.append(row)
        md_parts.append(markdown(header, rows))
    return "\n".join(md_parts), to_csv(csv_header, csv_rows)


def frontier_table(s: SettingResult) -> tuple[str, str]:
    """Frontier points of every method (rebuttal-table style), with references first."""
    names = [m for m, _ in s.metrics]
    header = ["method", "point", *[f"{m} ({'↓' if d == 'min' else '↑'})" for m, d in s.metrics], "hyperparameters"]
    csv_header = ["setting", "method", "point", *[f"{m}_{x}" for m in names for x in ("mean", "se")], "n",
                  "hyperparameters"]
    rows: list[list[Any]] = []
    crow: list[list[Any]] = []
    for kind, stats in s.reference.items():
        sts = [stats.get(m, seed_stats([])) for m in names]
        rows.append([REFERENCE_LABELS.get(kind, kind), "", *[fmt_stat(st, "mean_se") for st in sts], ""])
        crow.append([s.setting, kind, "", *[v for st in sts for v in (st.mean, st.se)], sts[0].n, ""])
    for mr in s.methods:
        if not mr.selected:
            rows.append([_label(mr.method), "", *["—" for _ in names], "no complete setting"])
            continue
        for i, g in enumerate(mr.selected, 1):
            sts = [g.stats(m) for m in names]
            rows.append([_label(mr.method), i, *[fmt_stat(st, "mean_se") for st in sts], fmt_hyper(g.hyper)])
            crow.append([s.setting, mr.method, i, *[v for st in sts for v in (st.mean, st.se)], sts[0].n,
                         json.dumps(g.hyper, sort_keys=True)])
    return markdown(header, rows), to_csv(csv_header, crow)


def hyperparameter_table(settings: list[SettingResult]) -> tuple[str, str]:
    """The winning hyperparameters of every method (Table 6 style)."""
    header = ["setting", "method", "selected", "hyperparameters", "grid size", "excluded"]
    rows: list[list[Any]] = []
    crow: list[list[Any]] = []
    for s in settings:
        for mr in s.methods:
            label = "best mean" if s.selection == "best_mean" else "Pareto front"
            if not mr.selected:
                rows.append([s.title or s.setting or "all", _label(mr.method), label, "— (no complete setting)",
                             len(mr.groups), mr.excluded])
            for i, g in enumerate(mr.selected, 1):
                sel = label if s.selection == "best_mean" else f"{label} #{i}"
                rows.append([s.title or s.setting or "all", _label(mr.method), sel, fmt_hyper(g.hyper), len(mr.groups),
                             mr.excluded])
                crow.append([s.setting, mr.method, i, json.dumps(g.hyper, sort_keys=True),
                             json.dumps(g.config, sort_keys=True), len(mr.groups), mr.excluded])
    return markdown(header, rows), to_csv(
        ["setting", "method", "rank", "hyperparameters", "config", "grid_size", "excluded"], crow)


def runtime_table(settings: list[SettingResult]) -> tuple[str, str]:
    """Seconds per trial and per epoch of the selected setting of each method (Table 3 style)."""
    header = ["setting", "method", "seconds / trial", "seconds / epoch", "steps", "seeds"]
    rows: list[list[Any]] = []
    crow: list[list[Any]] = []
    for s in settings:
        for mr in s.methods:
            if not mr.selected:
                continue
            g = mr.selected[0]
            secs = list(g.seconds.values())
            st = seed_stats(secs)
            steps = seed_stats(list(g.steps.values()))
            epochs = s.budget.get("epochs")
            per_epoch = st.mean / epochs if epochs and "seconds" not in s.budget else math.nan
            rows.append([s.title or s.setting or "all", _label(mr.method), fmt_stat(st, "mean_se"), fmt_num(per_epoch),
                         fmt_num(steps.mean), st.n])
            crow.append([s.setting, mr.method, st.mean, st.se, per_epoch, steps.mean, st.n])
    return markdown(header, rows), to_csv(
        ["setting", "method", "seconds_mean", "seconds_se", "seconds_per_epoch", "steps_mean", "n"], crow)


def _weakly_dominates(q: list[float], p: list[float], directions: list[str]) -> bool:
    """``q`` is at least as good as ``p`` in every metric (means; ``min`` / ``max`` per metric)."""
    return all((a <= b) if d == "min" else (a >= b) for a, b, d in zip(q, p, directions, strict=True))


def dominance_table(s: SettingResult, reference: str = MINNORM) -> tuple[str, str] | None:
    """Per baseline: how many of its Pareto-front points a point of ``reference``'s front weakly
    dominates (at least as good in every metric, on seed means), and the other way round.

    Answers "does MinNorm-OG's frontier dominate each baseline?" with the numbers behind it;
    ``None`` if the setting is not a Pareto selection or ``reference`` has no front.
    """
    if s.selection != "pareto":
        return None
    names, dirs = [m for m, _ in s.metrics], [d for _, d in s.metrics]
    fronts = {mr.method: [[g.stats(m).mean for m in names] for g in mr.selected] for mr in s.methods}
    ref = fronts.get(reference) or []
    if not ref:
        return None
    header = ["baseline", "front points", f"dominated by {_label(reference)}", "all dominated",
              f"{_label(reference)} points dominated by it"]
    rows: list[list[Any]] = []
    crow: list[list[Any]] = []
    for method, front in fronts.items():
        if method == reference or not front:
            continue
        by_ref = sum(any(_weakly_dominates(q, p, dirs) for q in ref) for p in front)
        of_ref = sum(any(_weakly_dominates(p, q, dirs) and p != q for p in front) for q in ref)
        verdict = "yes" if by_ref == len(front) else "no"
        rows.append([_label(method), len(front), by_ref, verdict, f"{of_ref} of {len(ref)}"])
        crow.append([s.setting, method, len(front), by_ref, verdict, of_ref, len(ref)])
    csv_header = ["setting", "baseline", "front_points", "dominated_by_reference", "all_dominated",
                  "reference_points_dominated_by_baseline", "reference_front_points"]
    return markdown(header, rows), to_csv(csv_header, crow)
