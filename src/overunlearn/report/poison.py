"""Data Poisoning tables and figures (the paper's Table 1 / Table 5 and Figure 1) from a sweep journal.

``overunlearn bench poison`` runs its trials through the sweep runner; this module reads what the
journal holds -- every trial's sup-norm error, status and time, and every seed's reference models --
into a :class:`PoisonResults` and renders it: the plain-text table (our median and central range per
method and T next to the paper's), the CSV / JSON files and one figure of fits per T. It never trains:
the paper's reference values, the recipe and the curves of the figure (predictions of models, which
the journal does not keep) are handed in by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: a trial's ``status``: ``ok``; ``diverged`` (a non-finite loss or output: ``sup_error = inf``, counted in the
#: statistics as the paper's code would); ``failed`` (any other error, e.g. a worker killed: left out of
#: the statistics and run again by the next run)
OK, DIVERGED, FAILED = "ok", "diverged", "failed"


@dataclass
class PoisonTrial:
    """One journal trial: a method at its preset at ``epochs`` on one seed."""

    method: str
    epochs: int
    seed: int
    sup_error: float
    status: str
    seconds: float | None
    steps: int | None
    hyper: dict[str, Any]
    message: str = ""
    arithmetic: str = ""


@dataclass
class FitPanel:
    """One panel of a fit figure: a model's predictions on the grid and its sup-norm error."""

    key: str  # "original", "ground_truth" or a method name
    title: str
    curve: Sequence[float] | None
    sup_error: float


@dataclass
class FitFigure:
    """What a figure of fits shows: the data of the figure seed, the grid and one panel per model."""

    epochs: int
    seed: int
    recipe: str
    grid: Sequence[float]
    retain: tuple[Sequence[float], Sequence[float]]  # (x, y)
    forget: tuple[Sequence[float], Sequence[float]]
    panels: list[FitPanel]
    note: str = ""  # a footnote


@dataclass
class PoisonResults:
    """Everything the table and the output files show (see :func:`load_results`)."""

    recipe: dict[str, Any]  # PoisonRecipe.to_dict(): name, original_steps, ground_truth_steps, ...
    seeds: list[int]
    epochs: list[int]
    methods: list[str]
    trials: list[PoisonTrial]
    references: dict[int, dict[str, dict[str, float]]]  # seed -> "original"/"ground_truth" -> metrics
    paper: Mapping[tuple[str, int], tuple[float, float, float]] = field(default_factory=dict)
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)  # "<method>@<T>" -> {"hyper", "note"}
    journal: str = ""
    notes: list[str] = field(default_factory=list)

    def errors(self, method: str, epochs: int) -> list[float]:
        """The sup-norm errors of ``method`` at ``epochs`` (diverged trials as ``inf``; failed ones left out)."""
        return [t.sup_error for t in self.trials if t.method == method and t.epochs == epochs and t.status != FAILED]

    @property
    def failed(self) -> list[PoisonTrial]:
        return [t for t in self.trials if t.status == FAILED]

    def summary(self) -> list[dict[str, Any]]:
        """One row per (method, T): our median and central range next to the paper's; then the references."""
        rows = []
        for T in self.epochs:
            for m in self.methods:
                errs = self.errors(m, T)
                lo, hi = central_range(errs)
                paper = self.paper.get((m, T))
                rows.append({
                    "method": m, "T": T, "n": len(errs), "median": median(errs), "range_lo": lo, "range_hi": hi,
                    "mean": sum(errs) / len(errs) if errs else math.nan,
                    "diverged": sum(1 for t in self.trials if t.method == m and t.epochs == T and t.status == DIVERGED),
                    "paper_median": paper[0] if paper else None, "paper_lo": paper[1] if paper else None,
                    "paper_hi": paper[2] if paper else None,
                })
        for kind in ("original", "ground_truth"):
            errs = [self.references[s][kind]["sup_error"] for s in self.seeds
                    if kind in self.references.get(s, {})]
            lo, hi = central_range(errs)
            rows.append({"method": kind, "T": None, "n": len(errs), "median": median(errs), "range_lo": lo,
                         "range_hi": hi, "mean": sum(errs) / len(errs) if errs else math.nan, "diverged": 0,
                         "paper_median": None, "paper_lo": None, "paper_hi": None})
        return rows


# ---- the paper's statistics -------------------------------------------------------------------------

def central_range(values: Sequence[float], drop: int = 2) -> tuple[float, float]:
    """The paper's central range: the sorted values after dropping the ``drop`` lowest and highest
    (3rd lowest to 3rd highest of 10). With fewer than ``2 drop + 1`` values: ``(min, max)``."""
    v = sorted(values, key=lambda a: (math.isnan(a), a))
    if not v:
        return (math.nan, math.nan)
    if len(v) < 2 * drop + 1:
        return (v[0], v[-1])
    return (v[drop], v[-1 - drop])


def median(values: Sequence[float]) -> float:
    v = sorted(values, key=lambda a: (math.isnan(a), a))
    if not v:
        return math.nan
    n = len(v)
    if n % 2:
        return v[n // 2]
    a, b = v[n // 2 - 1], v[n // 2]
    if math.isinf(a) or math.isinf(b):
        return b
    return 0.5 * (a + b)


# ---- reading the journal ---------------------------------------------------------------------------

def load_results(journal: str | Path, sweep: str, *, recipe: Mapping[str, Any],
                 paper: Mapping[tuple[str, int], tuple[float, float, float]] | None = None,
                 presets: Mapping[str, Mapping[str, Any]] | None = None, metric: str = "sup_error") -> PoisonResults:
    """The trials and references of sweep ``sweep`` (its latest spec: seeds, settings = one T each, one
    preset point per method) as :class:`PoisonResults`."""
    from overunlearn.report.aggregate import load
    from overunlearn.sweep.journal import DETERMINISTIC_ERRORS, FINISHED
    from overunlearn.sweep.spec import benchmark_key

    reports, contents = load(journal, allow_partial=True, sweeps=[sweep])
    if not reports:
        raise ValueError(f"{journal} holds no sweep named {sweep!r}")
    report = reports[0]
    header = contents.sweeps().get(sweep, {}).get("spec", {})
    bench_name = header.get("benchmark", {}).get("name", "poison")
    records = {(r.get("config_key"), int(r["seed"])): r for r in contents.latest_trials().values() if "seed" in r}
    seeds: list[int] = []
    epochs: list[int] = []
    methods: list[str] = []
    trials: list[PoisonTrial] = []
    references: dict[int, dict[str, dict[str, float]]] = {}
    refs = contents.references()
    settings = {s.get("name"): s for s in header.get("settings", [])}
    for setting in report.settings:
        T = int(setting.budget["epochs"])
        epochs.append(T)
        seeds += [s for s in setting.seeds if s not in seeds]
        bkey = benchmark_key(bench_name, settings.get(setting.setting, {}).get("benchmark_options", {}))
        for seed in setting.seeds:
            ref = refs.get((bkey, seed))
            if ref is not None and ref.get("status") == FINISHED and seed not in references:
                references[seed] = {k: {n: float(v) for n, v in vals.items()} for k, vals in ref["reference"].items()}
        for mr in setting.methods:
            if mr.method not in methods:
                methods.append(mr.method)
            for group in mr.groups:
                for seed in setting.seeds:
                    rec = records.get((group.config_key, seed))
                    if rec is None:
                        continue
                    err = float((rec.get("metrics") or {}).get(metric, math.nan))
                    if rec.get("status") == FINISHED:
                        status, msg = (OK if math.isfinite(err) else DIVERGED), ""
                    elif rec.get("error_type") in DETERMINISTIC_ERRORS:
                        err, status, msg = math.inf, DIVERGED, str(rec.get("error", ""))
                    else:
                        err, status, msg = math.nan, FAILED, str(rec.get("error", "failed"))
                    trials.append(PoisonTrial(
                        mr.method, T, seed, err, status, rec.get("seconds"),
                        rec.get("steps", rec.get("error_step")), dict(rec.get("hyper") or group.hyper), msg,
                        str(rec.get("arithmetic", ""))))
    missing = [s for s in seeds if s not in references]
    notes = list(report.notes)
    if missing:
        notes.append(f"reference metrics missing for seed(s) {missing}")
    return PoisonResults(recipe=dict(recipe), seeds=seeds, epochs=epochs, methods=methods, trials=trials,
                         references=references, paper=dict(paper or {}),
                         presets={k: dict(v) for k, v in (presets or {}).items()}, journal=str(journal), notes=notes)


# ---- the table -------------------------------------------------------------------------------------

def _fmt(v: float | None, width: int = 6) -> str:
    if v is None:
        return "-".rjust(width)
    if math.isnan(v):
        return "nan".rjust(width)
    if math.isinf(v):
        return "inf".rjust(width)
    if abs(v) >= 100:
        return f"{v:.0f}".rjust(width)
    return f"{v:.2f}".rjust(width)


def seed_text(seeds: Sequence[int]) -> str:
    s = sorted(seeds)
    if s == list(range(s[0], s[-1] + 1)) and len(s) > 2:
        return f"{s[0]}-{s[-1]}"
    return ",".join(map(str, s))


def format_table(run: PoisonResults) -> str:
    """A plain-text table: our median and central range per method and T, next to the paper's."""
    r = run.recipe
    lines = [
        f"Data Poisoning: sup-norm error |f(x) - sin x| on [-5pi, 5pi] (lower is better); recipe "
        f"{r['name']!r} ({r['original_steps']} original / {r['ground_truth_steps']} ground-truth "
        f"steps), seeds {seed_text(run.seeds)}",
        "ours: median (central range = 3rd lowest .. 3rd highest of 10; min .. max for < 5 seeds); "
        "paper: Table 1 / Table 5 reference values",
        "",
    ]
    summary = run.summary()
    labels = {"original": "(original)", "ground_truth": "(ground truth)"}
    names = [labels.get(row["method"], row["method"]) for row in summary]
    w = max([13, *(len(n) + 1 for n in names)])  # every name keeps at least one space before the T column
    lines.append(f"{'method':<{w}}{'T':>6}  {'median':>7}  {'central range':<17}{'paper':>7}  {'paper range':<17}"
                 f"{'diverged':>9}")
    for name, row in zip(names, summary, strict=True):
        T = "" if row["T"] is None else str(row["T"])
        rng = f"({_fmt(row['range_lo'], 0)}, {_fmt(row['range_hi'], 0)})"
        prng = "" if row["paper_lo"] is None else f"({_fmt(row['paper_lo'], 0)}, {_fmt(row['paper_hi'], 0)})"
        div = f"{row['diverged']}/{row['n']}" if row["T"] is not None else ""
        lines.append(f"{name:<{w}}{T:>6}  {_fmt(row['median'], 7)}  {rng:<17}{_fmt(row['paper_median'], 7)}  "
                     f"{prng:<17}{div:>9}")
    return "\n".join(lines)


# ---- figures and files -----------------------------------------------------------------------------

def plot_fits(fig_data: FitFigure, path: str | Path) -> Path:
    """The paper's Figure 1 (at T = 100; Figures 3-5 at other T): every model's fit on the figure seed
    against ``sin x``, with the retain and forget points."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    from overunlearn.storage import atomic_write_bytes

    grid = np.asarray(fig_data.grid, dtype=float)
    panels = fig_data.panels
    ncol = min(5, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), squeeze=False, sharex=True, sharey=True)
    for ax, panel in zip(axes.flat, panels, strict=False):
        ax.plot(grid, np.sin(grid), color="0.6", lw=1.0, label="sin x")
        if panel.curve is not None:
            ax.plot(grid, np.asarray(panel.curve, dtype=float), color="C0", lw=1.2, label="model")
        ax.scatter(fig_data.retain[0], fig_data.retain[1], s=8, color="k", label="retain", zorder=3)
        ax.scatter(fig_data.forget[0], fig_data.forget[1], s=18, color="C3", marker="x", label="forget (y = 1.5)",
                   zorder=3)
        ax.set_title(f"{panel.title}  sup err {_fmt(panel.sup_error, 0).strip()}", fontsize=9)
        ax.set_ylim(-3, 3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"Data Poisoning fits after T = {fig_data.epochs} unlearning epochs (seed {fig_data.seed}, "
                 f"recipe {fig_data.recipe!r})", fontsize=10)
    if fig_data.note:
        fig.text(0.5, 0.005, fig_data.note, ha="center", va="bottom", fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.02 if fig_data.note else 0, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_outputs(run: PoisonResults, out_dir: str | Path, figures: Sequence[FitFigure] = (),
                  extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write the summary CSV, per-trial CSV, table, JSON and one figure per :class:`FitFigure`; return their paths.

    ``extra``: more fields of the JSON file (device, timings, ...)."""
    import csv
    import io
    import json

    from overunlearn.storage import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    rows = run.summary()
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    paths["summary_csv"] = atomic_write_text(out / "poison_summary.csv", buf.getvalue())
    buf = io.StringIO()
    w2 = csv.writer(buf)
    w2.writerow(["method", "T", "seed", "sup_error", "status", "seconds", "steps", "hyper", "message"])
    for t in run.trials:
        w2.writerow([t.method, t.epochs, t.seed, t.sup_error, t.status,
                     "" if t.seconds is None else f"{t.seconds:.3f}", "" if t.steps is None else t.steps,
                     json.dumps(t.hyper, sort_keys=True), t.message])
    paths["trials_csv"] = atomic_write_text(out / "poison_trials.csv", buf.getvalue())
    paths["table_txt"] = atomic_write_text(out / "poison_table.txt", format_table(run) + "\n")
    for fig in figures:
        paths[f"figure_T{fig.epochs}"] = plot_fits(fig, out / f"poison_fits_T{fig.epochs}.png")
    payload = {
        "benchmark": "poison", "recipe": run.recipe, "seeds": run.seeds, "epochs": run.epochs,
        "methods": run.methods, "journal": run.journal, **dict(extra or {}), "presets": run.presets,
        "summary": rows, "references": {str(s): v for s, v in run.references.items()},
        "trials": [asdict(t) for t in run.trials], "notes": run.notes,
        "paper_table5_reference_values": {f"{m}@{T}": list(v) for (m, T), v in run.paper.items()},
    }
    paths["json"] = out / "poison_results.json"
    atomic_write_json(paths["json"], jsonable(payload))
    return paths


def jsonable(obj: Any) -> Any:
    """Replace non-finite floats by strings so the JSON stays standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


__all__ = ["FitFigure", "FitPanel", "PoisonResults", "PoisonTrial", "central_range", "format_table", "load_results",
           "median", "plot_fits", "write_outputs"]
