"""From journal records to per-setting, per-method hyperparameter groups with seed statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overunlearn.sweep.journal import FINISHED, JournalContents, read_journal
from overunlearn.sweep.select import SeedStats, best_mean, pareto_front, seed_stats
from overunlearn.sweep.spec import benchmark_key

MINNORM = "minnorm_og"


class UnknownSweepError(ValueError):
    """A sweep asked for by name is not in the journal (the message lists those that are)."""


class SeedSplitError(ValueError):
    """``select_seeds`` does not split a setting's seeds into a selection and a held-out part."""


@dataclass
class ConfigGroup:
    """One hyperparameter setting of one method: its per-seed results."""

    method: str
    config_key: str
    hyper: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # seed -> metrics
    failed: dict[int, str] = field(default_factory=dict)  # seed -> error
    seconds: dict[int, float] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)
    order: int = 0

    def values(self, metric: str, seeds: list[int] | None = None) -> list[float]:
        """Per-seed values of ``metric`` (in seed order), of ``seeds`` only if given."""
        return [float(m[metric]) if m.get(metric) is not None else math.nan
                for s, m in sorted(self.metrics.items()) if seeds is None or s in seeds]

    def stats(self, metric: str, seeds: list[int] | None = None) -> SeedStats:
        return seed_stats(self.values(metric, seeds))

    def restricted(self, seeds: list[int]) -> ConfigGroup:
        """A copy holding only the results of ``seeds``."""
        keep = set(seeds)
        return ConfigGroup(self.method, self.config_key, self.hyper, self.config,
                           {s: v for s, v in self.metrics.items() if s in keep},
                           {s: v for s, v in self.failed.items() if s in keep},
                           {s: v for s, v in self.seconds.items() if s in keep},
                           {s: v for s, v in self.steps.items() if s in keep}, self.order)

    def complete(self, seeds: list[int]) -> bool:
        return all(s in self.metrics for s in seeds) and not self.failed


@dataclass
class MethodResult:
    method: str
    groups: list[ConfigGroup]
    selected: list[ConfigGroup]  # best mean: one group; Pareto: the front, best-first by metric 0
    excluded: int = 0  # groups left out: incomplete seeds or failures


@dataclass
class SettingResult:
    sweep: str
    setting: str
    title: str
    seeds: list[int]
    budget: dict[str, Any]
    metrics: list[tuple[str, str]]  # (name, direction), report order
    selection: str  # "best_mean" | "pareto"
    statistic: str  # "mean_se" | "median"
    methods: list[MethodResult]
    reference: dict[str, dict[str, SeedStats]]  # "original"/"ground_truth" -> metric -> stats
    notes: list[str] = field(default_factory=list)
    selected_on: list[int] | None = None  # held-out selection: the seeds the choice was made on


@dataclass
class SweepReport:
    name: str
    title: str
    paper: str
    settings: list[SettingResult]
    notes: list[str] = field(default_factory=list)


def load(path: str | Path, allow_partial: bool = False, sweeps: list[str] | None = None,
         select_seeds: list[int] | None = None) -> tuple[list[SweepReport], JournalContents]:
    """Aggregate a journal into one :class:`SweepReport` per sweep name.

    ``select_seeds``: choose each method's hyperparameters on these seeds only and report every
    statistic on the setting's other seeds (a held-out selection; without it both use all seeds,
    which flatters methods with large grids).
    """
    contents = read_journal(path)
    headers = contents.sweeps()
    latest = _reportable(contents)
    refs = contents.references()
    by_sweep: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rec in latest.values():
        by_sweep.setdefault(rec.get("sweep", "?"), {}).setdefault(rec.get("setting", ""), []).append(rec)
    names = list(dict.fromkeys([*headers, *by_sweep]))
    if sweeps:
        unknown = [s for s in sweeps if s not in names]
        if unknown:
            held = ", ".join(repr(n) for n in names) if names else "none yet"
            raise UnknownSweepError(f"the journal {path} holds no sweep named {', '.join(map(repr, unknown))} (it "
                                    f"holds: {held})")
        names = [n for n in names if n in sweeps]
    out = []
    for name in names:
        header = headers.get(name, {}).get("spec", {})
        setting_hdrs = {s["name"]: s for s in header.get("settings", [])}
        groups = by_sweep.get(name, {})
        setting_names = list(dict.fromkeys([*setting_hdrs, *groups]))
        sweep_notes: list[str] = []
        if contents.bad_lines:
            sweep_notes.append(f"{contents.bad_lines} unreadable journal line(s) ignored")
        sweep_notes += [f"{len(contents.conflicts)} trial(s) recorded twice with different metrics "
                        "(the first line is used)"] if contents.conflicts else []
        mixed = mixed_provenance([r for r in latest.values() if r.get("sweep", "?") == name])
        if mixed:
            sweep_notes.append(mixed)
        results = []
        for sname in setting_names:
            shdr = setting_hdrs.get(sname)
            recs = _members(shdr, header, latest.values()) if shdr else groups.get(sname, [])
            if not recs:
                sweep_notes.append(f"setting {sname!r}: no trials in the journal yet")
                continue
            results.append(_setting(name, sname, header, setting_hdrs.get(sname, {}), recs, refs, allow_partial,
                                    select_seeds))
        out.append(SweepReport(name=name, title=header.get("title", name), paper=header.get("paper", ""),
                               settings=results, notes=sweep_notes + list(header.get("notes", []))))
    return out, contents


#: fields a trial record needs to be placed in a report
_REPORT_FIELDS = ("method", "config_key", "seed")


def _reportable(contents: JournalContents) -> dict[str, dict[str, Any]]:
    """The latest record of every trial that has what a report needs; each one without it is named in
    ``contents.problems`` (with its line) and left out."""
    out: dict[str, dict[str, Any]] = {}
    for rid, rec in contents.latest_trials().items():
        missing = [k for k in _REPORT_FIELDS if k not in rec]
        if missing:
            contents.problems.append(f"journal {contents.path} line {contents.line_of(rec)}: trial {rid} left out of "
                                     f"the report: it has no {', '.join(repr(k) for k in missing)}")
            continue
        out[rid] = rec
    return out


def provenance_of(rec: dict[str, Any]) -> str:
    """Which code computed a record: its source fingerprint, torch version, arithmetic (engine or vectorised)
    and, for the engine, the intra-op thread count."""
    torch_version = (rec.get("versions") or {}).get("torch", "?") if isinstance(rec.get("versions"), dict) else "?"
    arithmetic = f", {rec['arithmetic']} arithmetic" if isinstance(rec.get("arithmetic"), str) else ""
    if rec.get("arithmetic") == "engine" and isinstance(rec.get("torch_threads"), int):
        # the engine's products split their sums over the process's threads (the vectorised runner uses one)
        arithmetic += f" with {rec['torch_threads']} thread(s)"
    return f"code {rec.get('code') or 'unknown'} (torch {torch_version}{arithmetic})"


def mixed_provenance(records: list[dict[str, Any]]) -> str | None:
    """A note when the finished ``records`` were computed by more than one version of the code, else ``None``."""
    counts: dict[str, int] = {}
    for r in records:
        if r.get("status") == FINISHED:
            key = provenance_of(r)
            counts[key] = counts.get(key, 0) + 1
    if len(counts) < 2:
        return None
    parts = ", ".join(f"{n} by {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return (f"mixed provenance: the finished trials were computed by {len(counts)} versions of the code ({parts}); "
            "numbers of different versions may not be comparable: rerun the sweep with --rerun-stale to recompute "
            "trials of older code, and keep one --batch and --threads setting per journal")


def _members(shdr: dict[str, Any], header: dict[str, Any], records: Any) -> list[dict[str, Any]]:
    """The trials of a spec setting, found by content (not by label): a trial run under another
    sweep or setting name with the same identity belongs here too."""
    bench_name = header.get("benchmark", {}).get("name")
    engine = header.get("engine")
    seeds = set(shdr.get("seeds", []))
    grids = shdr.get("grids", {})
    out = []
    for r in records:
        grid = grids.get(r.get("method"))
        if grid is None or r.get("seed") not in seeds or r.get("budget") != shdr.get("budget"):
            continue
        bench = r.get("benchmark", {})
        if bench.get("name") != bench_name or bench.get("options") != shdr.get("benchmark_options"):
            continue
        if engine is not None and r.get("engine") != engine:
            continue
        config = r.get("config", {})
        fixed = shdr.get("fixed", {}).get(r["method"], {})
        if any(config.get(k) not in vals for k, vals in grid.items()) or any(
                config.get(k) != v for k, v in fixed.items()):
            continue
        out.append(r)
    return out


def _metric_order(header: dict[str, Any], recs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    bench_specs: list[dict[str, str]] = next((r["metric_specs"] for r in recs if r.get("metric_specs")), [])
    directions = {m["name"]: m["direction"] for m in bench_specs}
    spec_metrics = [(m["name"], m["direction"]) for m in header.get("metrics", [])]
    directions.update(dict(spec_metrics))
    wanted = (header.get("report", {}).get("metrics") or [m for m, _ in spec_metrics]
              or [m["name"] for m in bench_specs])
    if not wanted:  # no specs recorded: take the metric names of the first finished trial
        first = next((r for r in recs if r.get("status") == FINISHED), None)
        wanted = list((first or {}).get("metrics", {}))
    return [(m, directions.get(m, "max")) for m in wanted]


def _setting(sweep: str, sname: str, header: dict[str, Any], shdr: dict[str, Any], recs: list[dict[str, Any]],
             refs: dict[tuple[str, int], dict[str, Any]], allow_partial: bool,
             select_seeds: list[int] | None = None) -> SettingResult:
    notes: list[str] = []
    metrics = _metric_order(header, recs)
    seeds = shdr.get("seeds") or sorted({int(r["seed"]) for r in recs})
    chosen_on: list[int] | None = None
    report_seeds = list(seeds)
    if select_seeds is not None:
        chosen_on = [s for s in seeds if s in set(select_seeds)]
        report_seeds = [s for s in seeds if s not in set(select_seeds)]
        if not chosen_on or not report_seeds:
            raise SeedSplitError(f"sweep {sweep!r}, setting {sname!r}: selection seeds {sorted(select_seeds)} must "
                             f"split its seeds {list(seeds)} into two non-empty parts")
        notes.append(f"hyperparameters selected on seeds {chosen_on}; every statistic is over the held-out "
                     f"seeds {report_seeds}")
    methods_order = shdr.get("methods") or list(dict.fromkeys(r["method"] for r in recs))
    report_opts = header.get("report", {})
    selection = report_opts.get("selection", "auto")
    if selection == "auto":
        selection = "best_mean" if len(metrics) == 1 else "pareto"
    statistic = report_opts.get("statistic", "mean_se")

    groups: dict[str, dict[str, ConfigGroup]] = {}
    for rec in recs:
        g = groups.setdefault(rec["method"], {}).get(rec["config_key"])
        if g is None:
            g = ConfigGroup(method=rec["method"], config_key=rec["config_key"], hyper=rec.get("hyper", {}),
                            config=rec.get("config", {}), order=len(groups[rec["method"]]))
            groups[rec["method"]][rec["config_key"]] = g
        seed = int(rec["seed"])
        if rec.get("status") == FINISHED:
            g.metrics[seed] = rec.get("metrics", {})
            if rec.get("seconds") is not None:
                g.seconds[seed] = float(rec["seconds"])
            if rec.get("steps") is not None:
                g.steps[seed] = int(rec["steps"])
        else:
            g.failed[seed] = rec.get("error", "failed")
    # order groups as in the grid (the first trial seen of each config), methods as in the spec
    method_results = []
    for m in [*methods_order, *[m for m in groups if m not in methods_order]]:
        if m not in groups:
            continue
        gl = sorted(groups[m].values(), key=lambda g: g.order)
        # eligibility is judged on the seeds the choice is made on: a held-out seed's result (or its
        # absence) must not decide which setting is selected
        pick_seeds = chosen_on if chosen_on is not None else list(seeds)
        usable = [g for g in gl if (g.complete(pick_seeds) if not allow_partial else
                                    (any(s in g.metrics for s in pick_seeds) and not g.failed))]
        n_failed = sum(1 for g in gl if g.failed)
        n_partial = sum(1 for g in gl if not g.failed and not g.complete(seeds))
        if n_failed:
            notes.append(f"{m}: {n_failed} setting(s) with failed seeds excluded "
                         f"(e.g. {next(iter(next(g for g in gl if g.failed).failed.values()))[:120]})")
        if n_partial and not allow_partial:
            notes.append(f"{m}: {n_partial} setting(s) without all {len(seeds)} seeds excluded (sweep unfinished?)")
        selected: list[ConfigGroup] = []
        usable = [g for g in usable if all(math.isfinite(g.stats(name, chosen_on).mean) for name, _ in metrics)]
        if usable and metrics:
            if selection == "best_mean":
                name, direction = metrics[0]
                selected = [usable[best_mean([g.values(name, chosen_on) for g in usable], direction)]]
            else:
                pts = [[g.stats(name, chosen_on).mean for name, _ in metrics] for g in usable]
                selected = [usable[i] for i in pareto_front(pts, [d for _, d in metrics])]
        if chosen_on is not None:  # from here on, only the held-out seeds
            gl = [g.restricted(report_seeds) for g in gl]
            by_key = {g.config_key: g for g in gl}
            selected = [by_key[g.config_key] for g in selected]
        method_results.append(MethodResult(method=m, groups=gl, selected=selected, excluded=len(gl) - len(usable)))

    reference: dict[str, dict[str, SeedStats]] = {}
    bopts = shdr.get("benchmark_options")
    if bopts is None:
        bopts = recs[0].get("benchmark", {}).get("options", {})
    bname = recs[0].get("benchmark", {}).get("name", header.get("benchmark", {}).get("name", ""))
    bkey = benchmark_key(bname, bopts)
    per_kind: dict[str, dict[str, list[float]]] = {}
    missing = []
    for seed in report_seeds:
        r = refs.get((bkey, seed))
        if r is None or r.get("status") != FINISHED:
            missing.append(seed)
            continue
        for kind, vals in r.get("reference", {}).items():
            for metric, v in vals.items():
                per_kind.setdefault(kind, {}).setdefault(metric, []).append(
                    float(v) if v is not None else math.nan)
    if missing:
        notes.append(f"reference metrics missing for seed(s) {missing}")
    for kind in sorted(per_kind, key=lambda k: (k != "original", k != "ground_truth", k)):
        reference[kind] = {metric: seed_stats(v) for metric, v in per_kind[kind].items()}
    return SettingResult(sweep=sweep, setting=sname, title=shdr.get("title", sname) or sname, seeds=report_seeds,
                         budget=shdr.get("budget") or recs[0].get("budget", {}), metrics=metrics,
                         selection=selection, statistic=statistic, methods=method_results, reference=reference,
                         notes=notes, selected_on=chosen_on)
