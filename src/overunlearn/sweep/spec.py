"""Sweep specs: TOML files that expand into trials.

A spec names a benchmark, seeds, a budget, the methods and their hyperparameter grids,
and how results are reported. Format (full reference in ``docs/sweeps.md``)::

    name = "table1_poison"                  # default: the file name without extension
    title = "Data Poisoning, Table 1"
    seeds = [1, 2, 3]                       # or {start = 1, stop = 10} (inclusive)
    methods = ["minnorm_og", "gd", "ridge"] # report order

    [benchmark]
    name = "poison"
    options = {}                            # keyword arguments of get_benchmark(name, ...)
    imports = []                            # modules imported first (plugin benchmarks)

    [budget]                                # any of epochs / steps / seconds (engine.Budget)
    epochs = 10                             # with seconds: the nominal T of the schedules

    [engine]
    forget_bn_stats = false                 # part of trial identity
    device = "auto"                         # not part of trial identity
    batch = 0                               # > 0: run up to this many epoch-budget trials as one
                                            # vectorised ensemble where the model allows
                                            # (ensemble_unlearn.py); not part of trial identity

    [metrics]                               # name = "min" | "max"; must match the benchmark
    sup_error = "min"

    [grid]                                  # shared lists: a key applies to every listed
    lr = [1e-2, 1e-3]                       # method whose config has that field
    reg_coef = [0.1, 1.0, 3.0]

    [grid.minnorm_og]                       # per-method lists (replace the shared ones)
    grad_sample_size = [50]

    [[settings]]                            # optional variants (e.g. one per table row)
    name = "T=10"
    budget = {epochs = 10}                  # replaces [budget]
    grid = {num_gd_epochs = [1, 2, 5], minnorm_og = {proj_pd = [1, 2, 5]}}  # updates [grid]
    benchmark_options = {}                  # updates [benchmark].options
    # methods = [...]                       # replaces the method list

    [report]
    selection = "best_mean"                 # or "pareto" (default: by number of metrics)
    statistic = "median"                    # or "mean_se"

Validation follows the method configs: a value from the shared ``[grid]`` that a method's
config rejects (MinNorm-OG's ``reg_coef > 1``) is dropped for that method with a note, as
the reference grid does; an invalid value given explicitly under ``[grid.NAME]``, an
unknown method, or an unknown hyperparameter key is an error.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overunlearn.errors import BenchmarkDefinitionError, OverunlearnError, UnknownMethodError
from overunlearn.storage import stable_hash

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10: the tomli backport has the same API
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

_TOP_KEYS = {"name", "title", "paper", "description", "seeds", "methods", "benchmark", "budget", "engine", "metrics",
             "grid", "settings", "report", "notes"}
_SETTING_KEYS = {"name", "title", "budget", "grid", "methods", "benchmark_options", "seeds"}
_BUDGET_KEYS = {"epochs", "steps", "seconds"}
_ENGINE_KEYS = {"forget_bn_stats", "device", "batch"}
_REPORT_KEYS = {"selection", "statistic", "metrics"}
_IDENTITY_ENGINE_KEYS = ("forget_bn_stats",)


class SpecError(OverunlearnError, ValueError):
    """A sweep spec is malformed; the message names the file and the offending entry."""


#: most trials a spec may expand to unless the caller raises the limit (``overunlearn sweep --limit``)
DEFAULT_TRIAL_LIMIT = 200_000


def valid_device(value: Any) -> bool:
    """Whether ``value`` names a device a sweep can run on: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not isinstance(value, str):
        return False
    if value in ("auto", "cpu", "cuda"):
        return True
    head, _, index = value.partition(":")
    return head == "cuda" and index.isdigit()


@dataclass(frozen=True)
class Trial:
    """One unit of work: a method with a full config, on one seed of one benchmark, within a budget."""

    sweep: str
    setting: str
    method: str
    hyper: dict[str, Any]
    config: dict[str, Any]
    seed: int
    budget: dict[str, Any]
    benchmark: str
    benchmark_options: dict[str, Any]
    engine: dict[str, Any] = field(default_factory=dict)
    imports: tuple[str, ...] = ()

    def identity(self) -> dict[str, Any]:
        """What makes two trials the same experiment (labels, device and imports excluded)."""
        return {
            "method": self.method,
            "config": self.config,
            "seed": self.seed,
            "budget": self.budget,
            "benchmark": {"name": self.benchmark, "options": self.benchmark_options},
            "engine": {k: self.engine[k] for k in _IDENTITY_ENGINE_KEYS if k in self.engine},
        }

    @property
    def id(self) -> str:
        return trial_id(self.identity())

    @property
    def config_key(self) -> str:
        """Identity without the seed: trials sharing it are the seeds of one hyperparameter setting."""
        ident = self.identity()
        ident.pop("seed")
        return stable_hash(ident, 16)


def trial_id(identity: dict[str, Any]) -> str:
    return stable_hash(identity, 16)


def benchmark_key(name: str, options: dict[str, Any]) -> str:
    return stable_hash({"name": name, "options": options}, 16)


@dataclass
class Setting:
    """One expanded variant of a spec (a table row / figure panel)."""

    name: str
    title: str
    seeds: list[int]
    budget: dict[str, Any]
    benchmark_options: dict[str, Any]
    methods: list[str]
    grids: dict[str, dict[str, list[Any]]]  # method -> key -> values (after validation)
    trials: list[Trial]

    def fixed(self) -> dict[str, dict[str, Any]]:
        """Per method, the config values that the grid does not vary (defaults and single values)."""
        out: dict[str, dict[str, Any]] = {}
        for t in self.trials:
            if t.method not in out:
                varied = self.grids.get(t.method, {})
                out[t.method] = {k: v for k, v in t.config.items() if k not in varied}
        return out


@dataclass
class SweepSpec:
    """A loaded and validated spec."""

    name: str
    title: str
    paper: str
    path: str
    benchmark: str
    benchmark_options: dict[str, Any]
    imports: tuple[str, ...]
    engine: dict[str, Any]
    metrics: dict[str, str]  # name -> "min" | "max" (may be empty: taken from the benchmark)
    report: dict[str, Any]
    settings: list[Setting]
    notes: list[str]
    raw: dict[str, Any]

    @property
    def trials(self) -> list[Trial]:
        return [t for s in self.settings for t in s.trials]

    @property
    def device(self) -> str:
        return str(self.engine.get("device", "auto"))

    @property
    def batch(self) -> int:
        """Most trials per vectorised batch (``[engine].batch``; 0: one trial at a time)."""
        return int(self.engine.get("batch", 0))

    def header(self) -> dict[str, Any]:
        """What the journal records about the spec (for reports)."""
        return {
            "name": self.name,
            "title": self.title,
            "paper": self.paper,
            "path": self.path,
            "benchmark": {"name": self.benchmark, "options": self.benchmark_options},
            "engine": {k: self.engine[k] for k in _IDENTITY_ENGINE_KEYS if k in self.engine},
            # a list, not a table: the journal sorts keys, and metric order matters (x axis, sort key)
            "metrics": [{"name": k, "direction": d} for k, d in self.metrics.items()],
            "report": self.report,
            "settings": [
                {"name": s.name, "title": s.title, "seeds": s.seeds, "budget": s.budget,
                 "benchmark_options": s.benchmark_options, "methods": s.methods, "grids": s.grids,
                 "fixed": s.fixed(), "n_trials": len(s.trials)}
                for s in self.settings
            ],
            "notes": self.notes,
            "spec_hash": stable_hash(self.raw, 16),
        }


# ---------------------------------------------------------------------------------------------
# loading


def load_spec(path: str | Path, limit: int | None = DEFAULT_TRIAL_LIMIT) -> SweepSpec:
    """Read and validate a TOML spec file (see the module docstring for the format); ``limit``: see
    :func:`parse_spec`."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"spec file {str(path)!r} does not exist")
    if path.suffix.lower() not in (".toml", ".json"):
        raise SpecError(f"{path}: a sweep spec is a .toml (or .json) file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc}") from None
    if tomllib is None and path.suffix.lower() == ".toml":
        raise SpecError(f"{path}: reading TOML on Python < 3.11 needs the tomli package: pip install tomli")
    try:
        if path.suffix.lower() == ".json":
            import json

            raw = json.loads(text)
        else:
            raw = tomllib.loads(text)
    except ValueError as exc:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise SpecError(f"{path}: cannot parse the spec: {exc}") from exc
    return parse_spec(raw, source=str(path), default_name=path.stem, limit=limit)


def parse_spec(raw: dict[str, Any], source: str = "<spec>", default_name: str = "sweep",
               limit: int | None = DEFAULT_TRIAL_LIMIT) -> SweepSpec:
    """Validate a spec given as a dict (the parsed TOML) and expand its trials.

    ``limit``: most trials the spec may expand to (``None``: no limit); the count is taken from the
    grid sizes before any trial is formed, so an absurd grid is refused at once."""
    from overunlearn.methods import get_method  # noqa: F401  (registers the methods)

    where = source

    def fail(msg: str) -> typing.NoReturn:
        raise SpecError(f"{where}: {msg}")

    if not isinstance(raw, dict):
        fail("the spec must be a table of keys")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        fail(f"unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\n\0"):
        fail(f"name={name!r} must be a non-empty string without slashes, and not '.' or '..' (it names the "
             "journal and the report folder)")

    bench = raw.get("benchmark")
    if not isinstance(bench, dict) or "name" not in bench:
        fail("[benchmark] with a 'name' is required, e.g. [benchmark] name = \"poison\"")
    bad = set(bench) - {"name", "options", "imports"}
    if bad:
        fail(f"[benchmark] has unknown key(s) {sorted(bad)}; allowed: name, options, imports")
    bench_options = _table(bench.get("options", {}), "[benchmark].options", fail)
    imports = bench.get("imports", [])
    if not isinstance(imports, list) or not all(isinstance(m, str) for m in imports):
        fail("[benchmark].imports must be a list of module names")
    from overunlearn.errors import PluginError
    from overunlearn.plugins import load_plugins

    try:  # plugins register benchmarks / methods on import (workers import them again: Trial.imports)
        load_plugins(imports, what="module", record=False)
    except PluginError as exc:
        fail(f"[benchmark].imports: {exc}")

    engine = _table(raw.get("engine", {}), "[engine]", fail)
    bad = set(engine) - _ENGINE_KEYS
    if bad:
        fail(f"[engine] has unknown key(s) {sorted(bad)}; allowed: {sorted(_ENGINE_KEYS)}")
    if "forget_bn_stats" in engine and not isinstance(engine["forget_bn_stats"], bool):
        fail("[engine].forget_bn_stats must be true or false")
    engine.setdefault("forget_bn_stats", False)
    if "device" in engine and not valid_device(engine["device"]):
        fail(f"[engine].device = {engine['device']!r} is not a device: use \"auto\", \"cpu\", \"cuda\" or "
             "\"cuda:N\"")
    if "batch" in engine and (isinstance(engine["batch"], bool) or not isinstance(engine["batch"], int)
                              or engine["batch"] < 0):
        fail("[engine].batch must be a whole number >= 0 (0: one trial at a time)")

    metrics = _table(raw.get("metrics", {}), "[metrics]", fail)
    for m, d in metrics.items():
        if d not in ("min", "max"):
            fail(f"[metrics].{m} = {d!r}: a direction is \"min\" or \"max\"")

    report = _table(raw.get("report", {}), "[report]", fail)
    bad = set(report) - _REPORT_KEYS
    if bad:
        fail(f"[report] has unknown key(s) {sorted(bad)}; allowed: {sorted(_REPORT_KEYS)}")
    if report.get("selection", "auto") not in ("auto", "best_mean", "pareto"):
        fail(f"[report].selection = {report['selection']!r}: use \"best_mean\" or \"pareto\"")
    if report.get("statistic", "mean_se") not in ("mean_se", "median"):
        fail(f"[report].statistic = {report['statistic']!r}: use \"mean_se\" or \"median\"")
    if "metrics" in report:
        rm = report["metrics"]
        if not isinstance(rm, list) or not all(isinstance(m, str) for m in rm) or not rm:
            fail("[report].metrics must be a non-empty list of metric names")
        if metrics and set(rm) - set(metrics):
            fail(f"[report].metrics {sorted(set(rm) - set(metrics))} are not in [metrics]")

    base_methods = raw.get("methods")
    if not isinstance(base_methods, list) or not base_methods or not all(isinstance(m, str) for m in base_methods):
        fail("'methods' must be a non-empty list of method names (report order), e.g. methods = [\"gd\", \"minnorm_og\"]")
    base_grid, base_overrides = _split_grid(_table(raw.get("grid", {}), "[grid]", fail), "[grid]", fail)

    settings_raw = raw.get("settings", [{}])
    if not isinstance(settings_raw, list) or not settings_raw:
        fail("[[settings]] must be an array of tables")
    _check_grid_keys(base_methods, base_grid, base_overrides, settings_raw, fail)
    notes: list[str] = []
    settings: list[Setting] = []
    seen_names: set[str] = set()
    plans = []
    n_trials = 0
    for i, st in enumerate(settings_raw):
        if not isinstance(st, dict):
            fail(f"settings[{i}] must be a table")
        bad = set(st) - _SETTING_KEYS
        if bad:
            fail(f"settings[{i}] has unknown key(s) {sorted(bad)}; allowed: {sorted(_SETTING_KEYS)}")
        sname = str(st.get("name", "" if len(settings_raw) == 1 else f"setting{i}"))
        if sname in seen_names:
            fail(f"two settings are named {sname!r}")
        seen_names.add(sname)
        swhere = f"settings[{i}] ({sname!r})" if "settings" in raw else "spec"
        seeds = _seeds(st.get("seeds", raw.get("seeds")), f"{swhere}: seeds", fail)
        budget = _budget(st.get("budget", raw.get("budget")), f"{swhere}: budget", fail)
        opts = dict(bench_options)
        opts.update(_table(st.get("benchmark_options", {}), f"{swhere}: benchmark_options", fail))
        methods = st.get("methods", base_methods)
        if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
            fail(f"{swhere}: methods must be a non-empty list of method names")
        s_shared, s_per = _split_grid(_table(st.get("grid", {}), f"{swhere}: grid", fail), f"{swhere}: grid", fail)
        grid = dict(base_grid)
        grid.update(s_shared)
        per_method = {m: dict(v) for m, v in base_overrides.items()}
        for m, tab in s_per.items():
            per_method.setdefault(m, {}).update(tab)
        values, snotes = _grid_values(methods, grid, per_method, budget, f"{source} {swhere}".strip(), fail)
        n_trials += len(seeds) * sum(_n_combinations(v) for _, v in values.values())
        plans.append((st, sname, seeds, budget, opts, methods, values, snotes))
    if limit is not None and n_trials > limit:
        fail(f"the spec expands to {n_trials:,} trials (seeds x grid combinations over all settings), more than the "
             f"limit of {limit:,}; shrink the grid or the seeds, or raise the limit (overunlearn sweep --limit N)")
    for st, sname, seeds, budget, opts, methods, values, snotes in plans:
        grids = {m: _combinations(m, cls, vals, snotes, fail) for m, (cls, vals) in values.items()}
        notes.extend(f"[{sname}] {n}" if sname else n for n in snotes)
        trials = []
        for seed in seeds:
            for m in methods:
                for hyper, cfg in grids[m]:
                    trials.append(Trial(sweep=name, setting=sname, method=m, hyper=hyper, config=cfg, seed=seed,
                                        budget=budget, benchmark=str(bench["name"]), benchmark_options=opts,
                                        engine=dict(engine), imports=tuple(imports)))
        settings.append(Setting(
            name=sname, title=str(st.get("title", sname)), seeds=seeds, budget=budget, benchmark_options=opts,
            methods=list(methods),
            grids={m: _grid_lists([h for h, _ in grids[m]]) for m in methods}, trials=trials))

    ids = [t.id for s in settings for t in s.trials]
    if len(set(ids)) != len(ids):
        dup = len(ids) - len(set(ids))
        notes.append(f"{dup} trial(s) appear in more than one setting with identical configs; each runs once")

    return SweepSpec(name=name, title=str(raw.get("title", name)), paper=str(raw.get("paper", "")), path=source,
                     benchmark=str(bench["name"]), benchmark_options=bench_options, imports=tuple(imports),
                     engine=engine, metrics=dict(metrics), report=dict(report), settings=settings, notes=notes,
                     raw=raw)


def _check_grid_keys(base_methods, base_grid, base_overrides, settings_raw, fail) -> None:
    """Every shared key must belong to some listed method; every per-method table to a listed method."""
    from overunlearn.methods import get_method

    listed = list(base_methods)
    shared_keys = set(base_grid)
    per_keys = set(base_overrides)
    for st in settings_raw:
        if isinstance(st, dict):
            if isinstance(st.get("methods"), list):
                listed += [m for m in st["methods"] if isinstance(m, str)]
            if isinstance(st.get("grid"), dict):
                for k, v in st["grid"].items():
                    (per_keys if isinstance(v, dict) else shared_keys).add(k)
    fields: set[str] = set()
    for m in dict.fromkeys(listed):
        try:
            fields.update(f.name for f in dataclasses.fields(get_method(m).Config))
        except UnknownMethodError as exc:
            fail(str(exc))
    for m in per_keys:
        if m not in listed:
            hint = " (a hyperparameter value must be a scalar or a list)" if m in fields else ""
            fail(f"[grid.{m}] is given but {m!r} is not a listed method{hint}; listed: {sorted(set(listed))}")
    unused = shared_keys - fields
    if unused:
        fail(f"[grid] key(s) {sorted(unused)} are hyperparameters of none of the listed methods; "
             f"known keys: {sorted(fields)}")


def _split_grid(grid: dict[str, Any], what: str, fail) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Split a ``[grid]`` table into shared lists and per-method tables (``[grid.NAME]``)."""
    shared: dict[str, Any] = {}
    per: dict[str, dict[str, Any]] = {}
    for k, v in grid.items():
        if isinstance(v, dict):
            per[k] = dict(v)
        else:
            shared[k] = v
    return shared, per


# ---------------------------------------------------------------------------------------------
# helpers


def _table(value: Any, what: str, fail) -> dict[str, Any]:
    if not isinstance(value, dict):
        fail(f"{what} must be a table, got {type(value).__name__}")
    return dict(value)


#: most seeds a spec may list or a range may span (a typo such as ``stop = 1e9`` is refused, not expanded)
MAX_SEEDS = 100_000


def _seeds(value: Any, what: str, fail) -> list[int]:
    if value is None:
        fail(f"{what}: 'seeds' is required, e.g. seeds = [1, 2, 3] or seeds = {{start = 1, stop = 10}}")
    if isinstance(value, dict):
        if set(value) != {"start", "stop"}:
            fail(f"{what}: a seed range is {{start = A, stop = B}} (inclusive)")
        for end in ("start", "stop"):
            v = value[end]
            if isinstance(v, bool) or not isinstance(v, int):
                fail(f"{what}: {end} = {v!r} must be a whole number (e.g. {end} = 10)")
        start, stop = value["start"], value["stop"]
        if stop < start:
            fail(f"{what}: stop = {stop} is below start = {start} (the range is inclusive)")
        if stop - start + 1 > MAX_SEEDS:
            fail(f"{what}: the range {start}..{stop} holds {stop - start + 1} seeds, more than {MAX_SEEDS}; "
                 "is stop a typo?")
        value = list(range(start, stop + 1))
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                            for s in value):
        fail(f"{what}: seeds must be a non-empty list of integers")
    if len(value) > MAX_SEEDS:
        fail(f"{what}: {len(value)} seeds are more than {MAX_SEEDS}")
    if len(set(value)) != len(value):
        fail(f"{what}: seeds contain duplicates")
    low: dict[int, int] = {}
    for seed in value:
        # torch's CPU generator keeps a seed's low 32 bits: such seeds would be the same trial twice
        twin = low.setdefault(seed % 2**32, seed)
        if twin != seed:
            fail(f"{what}: seeds {twin} and {seed} differ by a multiple of 2^32, and torch's generator uses only a "
                 "seed's low 32 bits: they would give the same data and models; use seeds in [0, 2^32)")
    return list(value)


def _budget(value: Any, what: str, fail) -> dict[str, Any]:
    from overunlearn.engine import Budget

    if not isinstance(value, dict) or not value:
        fail(f"{what}: [budget] is required, e.g. [budget] epochs = 10 (or seconds = 0.2 with a nominal epochs)")
    bad = set(value) - _BUDGET_KEYS
    if bad:
        fail(f"{what}: unknown key(s) {sorted(bad)}; a budget has epochs, steps and/or seconds")
    out: dict[str, Any] = {}
    for k in ("epochs", "steps"):
        if k in value:
            v = value[k]
            if not isinstance(v, int) or isinstance(v, bool):
                fail(f"{what}: {k} must be an integer, got {v!r}")
            out[k] = v
    if "seconds" in value:
        v = value["seconds"]
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            fail(f"{what}: seconds must be a number, got {v!r}")
        out["seconds"] = float(v)
        if "epochs" not in out:
            fail(f"{what}: a seconds budget also needs a nominal 'epochs' (the T of the schedules: MinNorm-OG's "
                 "and SCRUB's descent-only epochs, L1-Sparse's decay); the run stops at whichever comes first")
    try:
        Budget(**out)
    except ValueError as exc:
        fail(f"{what}: {exc}")
    return out


def _type_hints(cfg_cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cfg_cls)
    except Exception:  # pragma: no cover - unresolvable annotations: skip coercion
        return {}


def _coerce(value: Any, hint: Any, key: str, method: str) -> Any:
    """Make TOML values match the config field type (1 -> 1.0 for floats) so hashes are stable."""
    if isinstance(value, (list, dict)):
        raise ValueError(f"{method}: {key}={value!r}: a grid value must be a scalar (a list holds the values)")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{method}: {key}={value!r} must be an integer")
        return int(value)
    if hint is int and isinstance(value, bool):
        raise ValueError(f"{method}: {key}={value!r} must be an integer")
    if hint in (int, float) and isinstance(value, str):
        raise ValueError(f"{method}: {key}={value!r} must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{method}: {key}={value!r} must be finite")
    return value


def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, list) else [v]


def _grid_values(methods: list[str], grid: dict[str, Any], per_method: dict[str, dict[str, Any]],
                 budget: dict[str, Any], where: str, fail) -> tuple[dict[str, tuple[Any, dict[str, list[Any]]]],
                                                                    list[str]]:
    """Per method, its config class and the validated values of every key its grid varies (no
    combinations are formed here, so counting them is cheap)."""
    from overunlearn.methods import get_method

    notes: list[str] = []
    out: dict[str, tuple[Any, dict[str, list[Any]]]] = {}
    if len(set(methods)) != len(methods):
        fail("a method is listed twice")
    classes = {}
    for m in methods:
        try:
            classes[m] = get_method(m)
        except UnknownMethodError as exc:
            fail(str(exc))
        if classes[m].name != m:
            fail(f"method {m!r}: write its registered name {classes[m].name!r}")
    for m in methods:
        cls = classes[m]
        cfg_cls = cls.Config
        fields = [f.name for f in dataclasses.fields(cfg_cls)]
        hints = _type_hints(cfg_cls)
        own = per_method.get(m, {})
        bad = set(own) - set(fields)
        if bad:
            fail(f"method {m!r} has no hyperparameter(s) {sorted(bad)}; its hyperparameters are {sorted(fields)}")
        if getattr(cls, "needs_planned_epochs", False) and "epochs" not in budget and "steps" not in budget:
            fail(f"method {m!r} schedules by the number of epochs: the budget needs 'epochs'")
        values: dict[str, list[Any]] = {}
        # lr first, then the config's own order
        order = ["lr"] + [f for f in fields if f != "lr"]
        for key in order:
            explicit = key in own
            if not explicit and key not in grid:
                continue
            raw_vals = _as_list(own[key] if explicit else grid[key])
            if not raw_vals:
                fail(f"method {m!r}: {key} has an empty list of values")
            kept = []
            reasons = []
            for v in raw_vals:
                try:
                    v = _coerce(v, hints.get(key), key, m)
                    cfg_cls(**{key: v})
                except (ValueError, TypeError) as exc:
                    if explicit:
                        fail(f"method {m!r}: {key}={v!r} is invalid: {exc}")
                    notes.append(f"{m}: {key}={v!r} dropped ({exc})")
                    reasons.append(str(exc))
                    continue
                if v in kept:
                    fail(f"method {m!r}: {key} lists {v!r} twice")
                kept.append(v)
            if not kept:
                fail(f"method {m!r}: no valid value left for {key}: all of {raw_vals} are rejected "
                     f"({'; '.join(reasons)})")
            values[key] = kept
        out[m] = (cfg_cls, values)
    return out, notes


def _n_combinations(values: dict[str, list[Any]]) -> int:
    """How many combinations a method's grid has (before invalid ones are dropped)."""
    return math.prod(len(v) for v in values.values())


def _combinations(m: str, cfg_cls: Any, values: dict[str, list[Any]], notes: list[str],
                  fail) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every valid combination of a method's grid as ``(hyperparameters, full config)``."""
    combos: list[tuple[dict[str, Any], dict[str, Any]]] = []
    keys = list(values)
    for prod in itertools.product(*(values[k] for k in keys)):
        hyper = dict(zip(keys, prod, strict=True))
        try:
            cfg = cfg_cls(**hyper)
        except (ValueError, TypeError) as exc:
            notes.append(f"{m}: combination {hyper} dropped ({exc})")
            continue
        combos.append((hyper, dataclasses.asdict(cfg)))
    if not combos:
        fail(f"method {m!r}: every combination of its grid is invalid")
    return combos


def _expand_grids(methods: list[str], grid: dict[str, Any], per_method: dict[str, dict[str, Any]],
                  budget: dict[str, Any], where: str, fail):
    """Per method, every valid ``(hyperparameters, config)`` combination of its grid; and notes."""
    values, notes = _grid_values(methods, grid, per_method, budget, where, fail)
    return {m: _combinations(m, cls, vals, notes, fail) for m, (cls, vals) in values.items()}, notes


def _grid_lists(hypers: list[dict[str, Any]]) -> dict[str, list[Any]]:
    lists: dict[str, list[Any]] = {}
    for h in hypers:
        for k, v in h.items():
            lists.setdefault(k, [])
            if v not in lists[k]:
                lists[k].append(v)
    return lists


def describe(spec: SweepSpec, finished: set[str] | None = None, show_trials: bool = True) -> str:
    """A human-readable table of the expanded trials and their counts (``--dry-run``)."""
    lines = [f"sweep {spec.name!r}: {spec.title}" + (f"  [{spec.paper}]" if spec.paper else ""),
             f"benchmark {spec.benchmark} {spec.benchmark_options}  engine {spec.engine}"]
    if spec.metrics:
        lines.append("metrics: " + ", ".join(f"{k} ({d})" for k, d in spec.metrics.items()))
    total = 0
    unique: set[str] = set()
    for s in spec.settings:
        lines.append("")
        lines.append(f"setting {s.name or '(default)'}: budget {s.budget}, seeds {s.seeds}, options {s.benchmark_options}")
        lines.append(f"  {'method':12s} {'configs':>7s} {'seeds':>5s} {'trials':>6s}  grid")
        for m in s.methods:
            n_cfg = sum(1 for t in s.trials if t.method == m and t.seed == s.seeds[0])
            grid = "  ".join(f"{k}={v}" for k, v in s.grids[m].items()) or "(defaults)"
            lines.append(f"  {m:12s} {n_cfg:7d} {len(s.seeds):5d} {n_cfg * len(s.seeds):6d}  {grid}")
        lines.append(f"  {'total':12s} {'':7s} {'':5s} {len(s.trials):6d}")
        total += len(s.trials)
        unique.update(t.id for t in s.trials)
    lines.append("")
    lines.append(f"{total} trials in {len(spec.settings)} setting(s) ({len(unique)} distinct)")
    if finished is not None:
        done = len(unique & finished)
        lines.append(f"already in the journal: {done}; to run: {len(unique) - done}")
    if spec.notes:
        lines.append("notes:")
        lines.extend(f"  - {n}" for n in spec.notes)
    if show_trials:
        lines.append("")
        lines.append(f"{'trial id':16s}  {'setting':10s} {'method':12s} {'seed':>4s}  hyperparameters")
        for t in spec.trials:
            mark = " (done)" if finished is not None and t.id in finished else ""
            hyper = " ".join(f"{k}={v}" for k, v in t.hyper.items())
            lines.append(f"{t.id}  {t.setting[:10]:10s} {t.method:12s} {t.seed:4d}  {hyper}{mark}")
    return "\n".join(lines)


def check_benchmark(spec: SweepSpec) -> list[str]:
    """Problems found by configuring the spec's benchmark for every setting (cheap: nothing is trained).

    Checks that the benchmark exists, accepts the options, and reports the metrics and
    directions listed under ``[metrics]`` and the metrics named by ``[report].metrics`` (a name it
    does not report would leave the report empty). Returns readable messages; empty when all is well.
    """
    from overunlearn.benchmarks import get_benchmark

    problems: list[str] = []
    seen: set[str] = set()
    for s in spec.settings:
        key = benchmark_key(spec.benchmark, s.benchmark_options)
        if key in seen:
            continue
        seen.add(key)
        label = f"setting {s.name!r}: " if s.name else ""
        try:
            bench = get_benchmark(spec.benchmark, **s.benchmark_options)
        except KeyError as exc:
            problems.append(f"{label}{exc.args[0] if exc.args else exc}")
            continue
        except BenchmarkDefinitionError as exc:
            problems.append(f"{label}{exc}")
            continue
        except (TypeError, ValueError) as exc:
            problems.append(f"{label}benchmark {spec.benchmark!r} rejects the options {s.benchmark_options}: {exc}")
            continue
        actual = {m.name: m.direction for m in bench.metrics}
        for name, direction in spec.metrics.items():
            if name not in actual:
                problems.append(f"{label}[metrics] lists {name!r} but benchmark {spec.benchmark!r} reports "
                                f"{sorted(actual)}")
            elif actual[name] != direction:
                problems.append(f"{label}[metrics] says {name!r} is {direction!r}-is-better; the benchmark says "
                                f"{actual[name]!r}")
        unknown = [name for name in spec.report.get("metrics", []) if name not in actual]
        if unknown:
            problems.append(f"{label}[report].metrics lists {', '.join(map(repr, unknown))}, which benchmark "
                            f"{spec.benchmark!r} does not report; valid names: {', '.join(sorted(actual))}")
    return problems
