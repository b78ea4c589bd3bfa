"""Privacy columns of a sweep report: the selected hyperparameters evaluated with MIA, U-LiRA and KLoM.

For every setting of a sweep, :func:`sweep_privacy` takes each method's **selected**
hyperparameter setting (the one the report's tables show), rebuilds the benchmark from the
journal (name and options, as the sweep's workers did), and runs
:func:`overunlearn.privacy.runner.privacy_report` once for all methods of the setting, so the
original and oracle models are trained once (and cached). It writes, into the sweep's report
folder:

* ``privacy.md`` / ``privacy.csv`` -- one row per method plus ``original`` and
  ``ground_truth``: the headline privacy metrics, the hyperparameters used and ``N``
  (the CSV holds every numeric column of the privacy rows);
* ``privacy/<setting>/privacy_rows.json``, ``privacy_arrays.npz`` (and the two plots) -- the
  per-example arrays behind the table (see ``docs/privacy.md``).

Which point is evaluated:

* best-mean sweeps: the winner (``hyperparameters.md``);
* Pareto sweeps: one point of each method's front -- the point with the best mean on
  ``PrivacyOptions.pareto_metric`` (default: the first report metric, i.e. the front's first
  point, the one ``runtime.md`` times); ties go to the earlier point of the front.

Defaults (``N``, ground-truth protocol) are those of ``overunlearn privacy``: the benchmark's
``privacy_defaults`` (:func:`overunlearn.privacy.runner.privacy_defaults`; 8 models and the ``split``
ground truth for a benchmark that declares none).
A setting whose benchmark has no privacy setup (or any other failure) is reported, with the
reason, in ``privacy.md`` and in :attr:`SweepPrivacy.failures`; the other settings go on.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from overunlearn.errors import NonFiniteLossError, OverunlearnError
from overunlearn.report import ReportSectionError
from overunlearn.report.aggregate import ConfigGroup, SettingResult, SweepReport
from overunlearn.report.tables import fmt_hyper, fmt_num, markdown, to_csv
from overunlearn.storage import atomic_write_text
from overunlearn.sweep.journal import FINISHED, JournalContents

if TYPE_CHECKING:
    from overunlearn.privacy.runner import MethodSpec

__all__ = ["PrivacyOptions", "SelectedPoint", "SettingPrivacy", "SweepPrivacy", "PrivacyColumnsError",
           "PrivacyUnsupportedError", "select_points", "sweep_privacy", "privacy_table", "default_models",
           "HEADLINE"]

#: headline columns of ``privacy.md``: (row key, column title); ``mia_eff`` is the first MIA-efficacy
#: feature present (``confidence`` for classifiers, ``loss`` for regression)
HEADLINE: tuple[tuple[str, str], ...] = (
    ("mia_auc", "MIA AUC (forget vs test)"),
    ("mia_eff", "MIA-efficacy"),
    ("ulira_auc", "U-LiRA AUC"),
    ("klom_forget_mean", "KLoM forget mean"),
    ("klom_forget_p95", "KLoM forget p95"),
)
_EFFICACY_ORDER = ("mia_eff_confidence", "mia_eff_loss")
_ID_COLUMNS = ("setting", "label", "kind", "method", "rank", "hyperparameters", "config", "budget", "n_models",
               "seed", "ground_truth", "klom_bins")


class PrivacyUnsupportedError(OverunlearnError, TypeError):
    """The benchmark of a setting has no privacy setup (no adapter and no ``privacy_setup(seed)``)."""


#: the error :func:`overunlearn.report.build_report` raises when the privacy section failed for some settings
PrivacyColumnsError = ReportSectionError


@dataclass(frozen=True)
class PrivacyOptions:
    """How ``overunlearn report --privacy`` evaluates the selected hyperparameters.

    Attributes:
        n_models: ``N`` (originals, oracles and unlearned models per method); ``None``: the default of
            ``overunlearn privacy`` for the benchmark (:func:`default_models`). At least 4.
        seed: the data seed (which split); ``None``: the first seed of each setting.
        device: unlearning and signal device (training follows the benchmark's own ``device`` option).
        cache_dir: cache root of the privacy models (``<cache_dir>/privacy/...``); ``None``: the benchmark's
            ``cache_dir`` option if the journal records one, else the default cache root
            (:func:`overunlearn.storage.default_cache_dir`).
        pareto_metric: Pareto sweeps: evaluate each method's front point with the best mean on this
            metric (``None``: the first report metric). Ignored by best-mean sweeps.
        ground_truth: ``"extra"`` | ``"split"`` (see :func:`~overunlearn.privacy.runner.privacy_report`);
            ``None``: the default of ``overunlearn privacy`` (the benchmark's ``privacy_defaults``).
        klom_bins: KLoM bins (``"auto"``, the CLI default, or a number >= 2).
        imports: modules imported before the benchmark is built (plugins registering benchmarks or
            methods, as ``--plugin`` loads them; a journal does not record the spec's imports).
        plots: also draw the loss histograms and KLoM CDFs of every setting.
        progress: print progress lines (and privacy_report's line per trained model).
    """

    n_models: int | None = None
    seed: int | None = None
    device: str = "auto"
    cache_dir: str | Path | None = None
    pareto_metric: str | None = None
    ground_truth: Literal["extra", "split"] | None = None
    klom_bins: int | Literal["auto"] = "auto"
    imports: tuple[str, ...] = ()
    plots: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.n_models is not None and self.n_models < 4:
            raise ValueError(f"n_models={self.n_models}: at least 4 models per set are needed (U-LiRA fits its "
                             "Gaussians on N - 1 shadow models; the ground-truth row splits the oracles)")
        if self.ground_truth not in (None, "extra", "split"):
            raise ValueError(f"ground_truth={self.ground_truth!r} is not one of 'extra', 'split'")
        if self.klom_bins != "auto" and (not isinstance(self.klom_bins, int) or self.klom_bins < 2):
            raise ValueError(f"klom_bins={self.klom_bins!r}: 'auto' or an integer >= 2")


def default_models(benchmark: Any) -> int:
    """``N`` of ``overunlearn privacy`` for ``benchmark`` (an object or a registered name): its
    ``privacy_defaults["n_models"]``, else 8."""
    from overunlearn.privacy.runner import privacy_defaults

    return int(privacy_defaults(benchmark)["n_models"])


def default_ground_truth(benchmark: Any) -> Literal["extra", "split"]:
    """The ground-truth protocol of ``overunlearn privacy`` for ``benchmark`` (an object or a registered name):
    its ``privacy_defaults["ground_truth"]``, else ``"split"``."""
    from overunlearn.privacy.runner import privacy_defaults

    return "extra" if privacy_defaults(benchmark)["ground_truth"] == "extra" else "split"


@dataclass(frozen=True)
class SelectedPoint:
    """The hyperparameter setting of one method that the privacy columns evaluate."""

    method: str
    group: ConfigGroup
    rank: int  # 1-based position on the method's Pareto front (1 for best mean)

    def spec(self, budget: dict[str, Any]) -> MethodSpec:
        """The :class:`~overunlearn.privacy.runner.MethodSpec`: the full config the sweep ran, labelled by method."""
        from overunlearn.privacy.runner import MethodSpec

        return MethodSpec(self.method, dict(self.group.config), dict(budget), label=self.method)


def select_points(s: SettingResult, pareto_metric: str | None = None) -> tuple[list[SelectedPoint], list[str]]:
    """One point per method of a setting (see the module docstring) and notes on methods left out."""
    notes: list[str] = []
    directions = dict(s.metrics)
    metric = pareto_metric or (s.metrics[0][0] if s.metrics else "")
    if s.selection == "pareto" and metric not in directions:
        raise ValueError(f"pareto metric (--privacy-pareto-metric) {metric!r} is not a metric of this setting "
                         f"(metrics: {', '.join(directions) or 'none'})")
    points: list[SelectedPoint] = []
    for mr in s.methods:
        if not mr.selected:
            notes.append(f"{mr.method}: no complete hyperparameter setting, left out")
            continue
        if s.selection != "pareto":
            points.append(SelectedPoint(mr.method, mr.selected[0], 1))
            continue
        sign = 1.0 if directions[metric] == "min" else -1.0
        means = [sign * g.stats(metric).mean for g in mr.selected]
        best = min(range(len(means)), key=lambda i: (means[i] if math.isfinite(means[i]) else math.inf, i))
        points.append(SelectedPoint(mr.method, mr.selected[best], best + 1))
    return points, notes


@dataclass
class SettingPrivacy:
    """The privacy evaluation of one setting: its rows, or why there are none."""

    setting: SettingResult
    benchmark: str
    benchmark_options: dict[str, Any]
    points: list[SelectedPoint] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    seed: int | None = None
    n_models: int | None = None
    ground_truth: str | None = None
    pareto_metric: str | None = None
    out_dir: Path | None = None
    seconds: float = math.nan
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def selected_by(self) -> str:
        """How the evaluated points were chosen, in words."""
        s = self.setting
        if s.selection != "pareto":
            return f"best mean of `{s.metrics[0][0]}`" if s.metrics else "best mean"
        return f"the Pareto-front point best on `{self.pareto_metric}`"

    @property
    def name(self) -> str:
        return self.setting.title or self.setting.setting or "all"


@dataclass
class SweepPrivacy:
    """What :func:`sweep_privacy` did for one sweep."""

    sweep: str
    settings: list[SettingPrivacy]
    files: list[Path]

    @property
    def failures(self) -> list[str]:
        return [f"{self.sweep} [{s.name}]: {s.error}" for s in self.settings if s.error]

    @property
    def notes(self) -> list[str]:
        """Index notes: failures and methods left out, per setting."""
        out = [f"privacy [{s.name}]: not computed: {s.error}" for s in self.settings if s.error]
        return out + [f"privacy [{s.name}]: {n}" for s in self.settings for n in s.notes]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_") or "default"


def _log(options: PrivacyOptions, msg: str) -> None:
    if options.progress:
        print(f"[privacy] {msg}", flush=True)


def _benchmark_of(contents: JournalContents, sweep: str, setting: str) -> tuple[str, dict[str, Any]]:
    """Benchmark name and options of a setting: the sweep header's, else those of one of its trials."""
    header = contents.sweeps().get(sweep, {}).get("spec", {})
    name = header.get("benchmark", {}).get("name")
    for sh in header.get("settings", []):
        if sh.get("name") == setting and sh.get("benchmark_options") is not None and name:
            return str(name), dict(sh["benchmark_options"])
    recs = [r for r in contents.latest_trials().values() if r.get("sweep") == sweep and r.get("setting") == setting]
    rec = next((r for r in recs if r.get("status") == FINISHED), recs[0] if recs else None)
    if rec is None or not rec.get("benchmark", {}).get("name"):
        raise ValueError(f"the journal records no benchmark for sweep {sweep!r}, setting {setting!r}")
    return str(rec["benchmark"]["name"]), dict(rec["benchmark"].get("options", {}))


def _build_benchmark(name: str, options: dict[str, Any], imports: tuple[str, ...]) -> Any:
    """``get_benchmark(name, **options)`` after importing ``imports``, as the sweep's workers build it."""
    from overunlearn.benchmarks import get_benchmark, list_benchmarks
    from overunlearn.plugins import load_plugins

    load_plugins(imports)
    if name not in list_benchmarks():
        raise PrivacyUnsupportedError(
            f"benchmark {name!r} is not registered in this process (valid: {', '.join(list_benchmarks())}); "
            "if a plugin module registers it, name that module with --plugin (or --import)")
    return get_benchmark(name, **options)


def _setup_of(bench: Any, name: str, seed: int) -> Any:
    """The benchmark's :class:`~overunlearn.privacy.runner.PrivacySetup`, or a clear error naming it."""
    from overunlearn.privacy.runner import as_privacy_setup
    from overunlearn.privacy.setups import adapt_benchmark

    if callable(getattr(bench, "privacy_setup", None)):
        return as_privacy_setup(bench, seed)
    setup = adapt_benchmark(bench, seed)
    if setup is None:
        raise PrivacyUnsupportedError(
            f"benchmark {name!r} has no privacy setup: the privacy adapters support poison, erase, collapse and facts; "
            f"give {type(bench).__name__} a privacy_setup(seed) method returning a PrivacySetup to evaluate it")
    return setup


def _run_setting(sp: SettingPrivacy, folder: Path, options: PrivacyOptions, benches: dict[str, Any],
                 engine: dict[str, Any]) -> None:
    """Fill ``sp`` (rows, or ``error``) for one setting; never raises for a failure of the evaluation."""
    from overunlearn.privacy.runner import privacy_report
    from overunlearn.sweep.spec import benchmark_key

    s = sp.setting
    t0 = time.perf_counter()
    try:
        sp.points, left_out = select_points(s, options.pareto_metric)
        sp.pareto_metric = options.pareto_metric or (s.metrics[0][0] if s.metrics else None)
        sp.notes += left_out
        if not sp.points:
            raise ValueError("no method has a selected hyperparameter setting (sweep unfinished? try --allow-partial)")
        sp.seed = options.seed if options.seed is not None else int(s.seeds[0])
        key = benchmark_key(sp.benchmark, sp.benchmark_options)
        if key not in benches:
            benches[key] = _build_benchmark(sp.benchmark, sp.benchmark_options, options.imports)
        sp.n_models = options.n_models or default_models(benches[key])
        sp.ground_truth = options.ground_truth or default_ground_truth(benches[key])
        setup = _setup_of(benches[key], sp.benchmark, sp.seed)
        if engine.get("forget_bn_stats") and not setup.forget_bn_stats:
            sp.notes.append("the sweep unlearned with forget_bn_stats=true; the privacy setup does not")
        cache = options.cache_dir if options.cache_dir is not None else sp.benchmark_options.get("cache_dir")
        sp.out_dir = folder / "privacy" / _slug(s.setting)
        specs = [p.spec(s.budget) for p in sp.points]
        n_oracles = 2 * sp.n_models if sp.ground_truth == "extra" else sp.n_models
        _log(options, f"{s.sweep} [{sp.name}]: benchmark {sp.benchmark} {sp.benchmark_options}, data seed {sp.seed}, "
                      f"N = {sp.n_models} ({sp.n_models} originals, {n_oracles} oracles, {sp.n_models} unlearned "
                      f"per method), ground truth {sp.ground_truth!r}, budget {s.budget}; "
                      + "; ".join(f"{p.method} ({fmt_hyper(p.group.hyper)})" for p in sp.points))
        while True:
            try:
                sp.rows = privacy_report(setup, specs, n_models=sp.n_models, seed=sp.seed, cache_dir=cache,
                                         device=options.device, out_dir=sp.out_dir, progress=options.progress,
                                         plots=options.plots, ground_truth=sp.ground_truth,
                                         klom_bins=options.klom_bins)
                break
            except NonFiniteLossError as exc:  # one method diverged on a privacy model: drop it, keep the rest
                bad = next((x for x in specs if x.method == exc.method), None)
                if bad is None:
                    raise
                specs.remove(bad)
                sp.points = [p for p in sp.points if p.method != bad.method]
                sp.notes.append(f"{bad.method}: left out: unlearning diverged on a privacy model ({exc})")
                _log(options, f"{s.sweep} [{sp.name}]: {bad.method} diverged; rerunning without it")
    except PrivacyUnsupportedError as exc:
        sp.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - one failed setting must not cost the rest of the report
        sp.error = f"{type(exc).__name__}: {exc}"
        if options.progress:
            print(traceback.format_exc(), file=sys.stderr, flush=True)
    sp.seconds = time.perf_counter() - t0
    if sp.error:
        _log(options, f"{s.sweep} [{sp.name}]: not computed: {sp.error}")
    else:
        _log(options, f"{s.sweep} [{sp.name}]: done in {sp.seconds:.1f} s; arrays in {sp.out_dir}")


def _cell(v: Any) -> str:
    return fmt_num(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def privacy_table(results: list[SettingPrivacy], title: str) -> tuple[str, str]:
    """``(markdown, csv)`` of the privacy rows of a sweep's settings (markdown: headline columns)."""
    parts = [f"# {title}: privacy of the selected hyperparameters\n",
             "Each method at its selected setting (best mean, or for Pareto sweeps the front point named "
             "in the `selected` column), evaluated by `privacy_report` against `N` oracles (models retrained "
             "without the forget set). `original`: the untouched originals; `ground_truth`: independently "
             "retrained models, i.e. what a perfect unlearner scores at this `N`. Read every column against "
             "`ground_truth` (see docs/privacy.md).\n"]
    csv_rows: list[list[Any]] = []
    metric_cols: list[str] = []
    for sp in results:
        for r in sp.rows:
            metric_cols += [k for k, v in r.items() if k not in _ID_COLUMNS and k not in metric_cols
                            and isinstance(v, (int, float)) and not isinstance(v, bool)]
    for sp in results:
        s = sp.setting
        parts.append(f"## {sp.name}\n")
        if sp.error:
            parts.append(f"Not computed: {sp.error}\n")
            continue
        first = sp.rows[0] if sp.rows else {}
        parts.append(f"Selected: {sp.selected_by}. "
                     f"Benchmark `{sp.benchmark}` {json.dumps(sp.benchmark_options, sort_keys=True)}, data seed "
                     f"{sp.seed}, budget {fmt_hyper(s.budget)}, N = {sp.n_models} models per set, ground truth "
                     f"`{sp.ground_truth}`, KLoM bins {first.get('klom_bins', '?')}; {sp.seconds:.1f} s. Per-example "
                     f"arrays: `privacy/{sp.out_dir.name if sp.out_dir else ''}/`.\n")
        eff = next((k for k in _EFFICACY_ORDER if k in first),
                   next((k for k in first if k.startswith("mia_eff_")), None))
        cols = [(eff, f"MIA-efficacy ({eff[len('mia_eff_'):]})") if key == "mia_eff" else (key, name)
                for key, name in HEADLINE if key != "mia_eff" or eff is not None]
        by_method = {p.method: p for p in sp.points}
        header = ["set", "selected", "hyperparameters", *[name for _, name in cols]]
        rows = []
        for r in sp.rows:
            p = by_method.get(r.get("method", "")) if r.get("kind") == "method" else None
            sel = "" if p is None else ("best mean" if s.selection != "pareto" else f"front #{p.rank}")
            rows.append([r["label"], sel, "" if p is None else fmt_hyper(p.group.hyper),
                         *[_cell(r.get(k, math.nan)) for k, _ in cols]])
            csv_rows.append([s.setting, r["label"], r.get("kind", ""), r.get("method", ""),
                             "" if p is None else p.rank,
                             "" if p is None else json.dumps(p.group.hyper, sort_keys=True),
                             "" if p is None else json.dumps(p.group.config, sort_keys=True),
                             json.dumps(s.budget, sort_keys=True), r.get("n_models", sp.n_models), sp.seed,
                             sp.ground_truth, r.get("klom_bins", ""), *[r.get(k, math.nan) for k in metric_cols]])
        parts.append(markdown(header, rows))
        if sp.notes:
            parts += ["Notes:\n", *[f"- {n}" for n in sp.notes], ""]
    return "\n".join(parts), to_csv([*_ID_COLUMNS, *metric_cols], csv_rows)


def sweep_privacy(rep: SweepReport, contents: JournalContents, folder: str | Path,
                  options: PrivacyOptions) -> SweepPrivacy:
    """Evaluate the selected hyperparameters of every setting of ``rep``; write ``privacy.md`` / ``.csv``
    and the per-setting arrays into ``folder`` (the sweep's report folder)."""
    folder = Path(folder)
    header = contents.sweeps().get(rep.name, {}).get("spec", {})
    benches: dict[str, Any] = {}  # settings sharing a benchmark configuration share its object
    results: list[SettingPrivacy] = []
    for s in rep.settings:
        try:
            name, opts = _benchmark_of(contents, rep.name, s.setting)
        except ValueError as exc:
            results.append(SettingPrivacy(s, "?", {}, error=str(exc)))
            continue
        sp = SettingPrivacy(s, name, opts)
        _run_setting(sp, folder, options, benches, header.get("engine", {}))
        results.append(sp)
    files = sorted(f for sp in results if sp.out_dir is not None and sp.out_dir.is_dir()
                   for f in sp.out_dir.iterdir() if f.is_file())
    if results:
        md, csv = privacy_table(results, rep.title)
        files += [atomic_write_text(folder / "privacy.md", md), atomic_write_text(folder / "privacy.csv", csv)]
    return SweepPrivacy(rep.name, results, files)


def privacy_section(options: PrivacyOptions) -> Callable[[SweepReport, JournalContents, Path], SweepPrivacy]:
    """A section for :func:`overunlearn.report.build_report`: the privacy columns of every sweep."""

    def section(rep: SweepReport, contents: JournalContents, folder: Path) -> SweepPrivacy:
        return sweep_privacy(rep, contents, folder, options)

    return section
