"""Oracle and shadow models, and the privacy report of unlearning methods.

A privacy evaluation needs many models trained from different seeds on *one* fixed split
(retain ``D_r``, forget ``D_f``, test):

* ``N`` **original** models, trained on ``D = D_r + D_f`` (seed of model ``i``: ``s_i``);
* ``N`` **oracle** (retrained) models, trained on ``D_r`` only (their own seeds);
* for every method to evaluate, ``N`` **unlearned** models: the method applied to original
  model ``i`` with unlearning seed ``i``.

Everything is cached under ``<cache>/privacy/<setup-name>-<key>/`` (atomic writes through
:mod:`overunlearn.storage`; state dicts loaded with ``weights_only=True``); the per-example
signals of every model are cached next to it, so a report re-run reads ``.npz`` files only.

A benchmark takes part by providing a :class:`PrivacySetup` (data, task, model factory and
training function): either it is one, or it has a ``privacy_setup(seed)`` method returning
one (:func:`as_privacy_setup`). :mod:`overunlearn.privacy.setups` builds setups for toy
problems and adapts the built-in benchmarks.

:func:`privacy_report` is the one-call entry point used by ``overunlearn bench --privacy``:
it returns one table row (a flat dict) per model set -- ``original``, ``ground_truth`` and
each method -- and optionally writes the rows (JSON) and the per-example arrays (``.npz``)
used by :mod:`overunlearn.privacy.plots`. See ``docs/privacy.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Subset

from overunlearn.errors import CacheFileError, CacheRebuiltWarning
from overunlearn.metrics.klom import klom_values
from overunlearn.metrics.mia import SALUN_FEATURES, mia_efficacy, population_mia
from overunlearn.metrics.signals import SIGNAL_NAMES, Signals, compute_signals
from overunlearn.metrics.ulira import ulira
from overunlearn.problem import ClassificationTask, Data, Task, TensorData, UnlearningProblem, as_heads
from overunlearn.storage import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    default_cache_dir,
    file_lock,
    safe_torch_load,
    source_fingerprint,
    stable_hash,
)

Which = Literal["original", "oracle"]
SPLITS: tuple[str, ...] = ("forget", "retain", "test")

#: the defaults of a benchmark that declares no ``privacy_defaults`` (or leaves a key out): ``N`` models of
#: each kind, and the ground-truth row from one half of the oracles against the other (the cheaper protocol)
FALLBACK_PRIVACY_DEFAULTS: Mapping[str, Any] = {"n_models": 8, "ground_truth": "split"}


def privacy_defaults(benchmark: Any) -> dict[str, Any]:
    """The privacy defaults of ``benchmark`` (an object, or a registered name: its factory's class attribute).

    Read from the benchmark's optional ``privacy_defaults`` mapping, with generic fallbacks:
    ``n_models`` (``N``; default 8), ``ground_truth`` (``"extra"`` | ``"split"``; default ``"split"``),
    ``epochs`` (the unlearning epochs ``T``; default the first of
    :func:`overunlearn.benchmarks.base.default_epochs`, ``None`` when the benchmark names none) and
    ``options`` (constructor options for a privacy run, e.g. a lighter recipe; default none).
    """
    from overunlearn.benchmarks.base import default_epochs

    source = benchmark
    if isinstance(benchmark, str):
        from overunlearn.benchmarks import base

        base.list_benchmarks()  # loads the built-in benchmarks
        source = base._BENCHMARKS.get(benchmark)
    raw = getattr(source, "privacy_defaults", None)
    raw = dict(raw) if isinstance(raw, Mapping) else {}
    out: dict[str, Any] = {**FALLBACK_PRIVACY_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    out["n_models"] = int(out["n_models"])
    if out["ground_truth"] not in ("extra", "split"):
        raise ValueError(f"{getattr(source, 'name', source)!r}.privacy_defaults: ground_truth "
                         f"{out['ground_truth']!r} is not 'extra' or 'split'")
    if out.get("epochs") is None:
        out["epochs"] = None
        if not isinstance(benchmark, str):
            try:
                out["epochs"] = int(default_epochs(benchmark)[0])
            except (ValueError, TypeError, IndexError):
                pass
    else:
        out["epochs"] = int(out["epochs"])
    out["options"] = dict(out.get("options") or {})
    return out


# ---------------------------------------------------------------------------------------
# What a benchmark provides
# ---------------------------------------------------------------------------------------

@dataclass
class PrivacySetup:
    """Everything a privacy evaluation needs from a benchmark (one fixed data split).

    Attributes:
        name: a label, used in cache paths.
        task: the task (loss, and how signals are read from outputs).
        make_model: zero-argument factory of a fresh (untrained) model.
        fit: ``fit(which, seed) -> nn.Module`` trains an ``"original"`` model (on ``D_r + D_f``)
            or an ``"oracle"`` model (on ``D_r`` only) with training seed ``seed``.
        retain: retain examples on which signals are computed: ``D_r`` or a representative subset
            (training is ``fit``'s business; the runner caps it at ``max_eval`` examples).
        forget: the forget set ``D_f``.
        test: held-out examples, from the same distribution as the forget set when possible
            (the population MIA compares forget with test).
        accessible_retain: the retain data ``D_r'`` handed to unlearning methods (default ``retain``).
        key: everything that determines the data and the training recipes (enters the cache key).
        fit_ensemble: optional ``fit_ensemble(which, seeds) -> list[nn.Module]`` training several
            models at once (e.g. a vmapped ensemble); used instead of ``fit`` when given.
        batch_size: the unlearning batch size.
        head: which head the per-head signals read (multi-head models).
        forget_bn_stats: passed to :func:`overunlearn.engine.unlearn`.
        eval_retain: indices of ``retain`` on which signals are computed (``None``: a seeded
            subset of at most ``max_eval`` examples is drawn by the runner).
        eval_batch_size: batch size of signal computation.
    """

    name: str
    task: Task
    make_model: Callable[[], nn.Module]
    fit: Callable[[str, int], nn.Module]
    retain: Data
    forget: Data
    test: Data
    accessible_retain: Data | None = None
    key: dict = field(default_factory=dict)
    fit_ensemble: Callable[[str, Sequence[int]], list[nn.Module]] | None = None
    batch_size: int = 256
    head: int = 0
    forget_bn_stats: bool = False
    eval_retain: Sequence[int] | None = None
    eval_batch_size: int = 1024

    def cache_key(self) -> str:
        return stable_hash({"name": self.name, "key": self.key, "sizes": [len(self.retain), len(self.forget),
                                                                            len(self.test)]})


def as_privacy_setup(benchmark: Any, seed: int = 0) -> PrivacySetup:
    """A :class:`PrivacySetup` itself, ``benchmark.privacy_setup(seed)``, or an adapted built-in
    benchmark (an object, or a registered name such as ``"poison"`` built with default options)."""
    if isinstance(benchmark, PrivacySetup):
        return benchmark
    if isinstance(benchmark, str):
        from overunlearn.benchmarks.base import get_benchmark

        benchmark = get_benchmark(benchmark)
    fn = getattr(benchmark, "privacy_setup", None)
    if callable(fn):
        setup = fn(seed)
        if not isinstance(setup, PrivacySetup):
            raise TypeError(f"{type(benchmark).__name__}.privacy_setup returned {type(setup).__name__}, "
                            "not a PrivacySetup")
        return setup
    from overunlearn.privacy import setups

    adapted = setups.adapt_benchmark(benchmark, seed)
    if adapted is not None:
        return adapted
    raise TypeError(
        f"{type(benchmark).__name__} cannot be evaluated for privacy: give it a privacy_setup(seed) method "
        "returning an overunlearn.privacy.runner.PrivacySetup (data split, model factory, training function), "
        "or pass a PrivacySetup directly")


@dataclass(frozen=True)
class MethodSpec:
    """One method to evaluate: registered ``method`` name, hyperparameters and unlearning budget."""

    method: str
    hyper: Mapping[str, Any] = field(default_factory=dict)
    budget: Any = 1  # a Budget, a dict of Budget fields, or an int number of epochs
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.method

    def make_budget(self):
        from overunlearn.engine import Budget

        if isinstance(self.budget, Budget):
            return self.budget
        if isinstance(self.budget, Mapping):
            return Budget(**self.budget)
        return Budget(epochs=int(self.budget))

    def key(self) -> str:
        b = self.make_budget()
        return stable_hash({"method": self.method, "hyper": dict(self.hyper), "budget": dataclasses.asdict(b)})


def unlearning_fingerprint() -> str:
    """Hash of the sources that decide an unlearned model and its signals (engine, methods, linear
    algebra, models, this module and the signals) and of torch's version."""
    return source_fingerprint(["engine/*.py", "batching.py", "problem.py", "methods/*.py", "linalg/*.py",
                               "linalg/blocks/*.py", "models/*.py", "privacy/runner.py", "metrics/signals.py"])


def parse_methods(methods: Any) -> list[MethodSpec]:
    """Accept ``MethodSpec`` objects, ``(method, hyper, budget)`` / ``(label, method, hyper, budget)``
    tuples, or a ``{label: (method, hyper, budget)}`` mapping."""
    out: list[MethodSpec] = []
    items: Iterable[Any]
    if isinstance(methods, Mapping):
        items = [(label, *v) if not isinstance(v, MethodSpec) else dataclasses.replace(v, label=label)
                 for label, v in methods.items()]
    else:
        items = methods
    for m in items:
        if isinstance(m, MethodSpec):
            out.append(m)
        elif isinstance(m, str):
            out.append(MethodSpec(m))
        elif isinstance(m, (tuple, list)) and len(m) == 3:
            out.append(MethodSpec(m[0], dict(m[1] or {}), m[2]))
        elif isinstance(m, (tuple, list)) and len(m) == 4:
            out.append(MethodSpec(m[1], dict(m[2] or {}), m[3], label=m[0]))
        else:
            raise TypeError(f"cannot read a method spec from {m!r}; use MethodSpec(method, hyper, budget)")
    labels = [m.name for m in out]
    reserved = {"original", "ground_truth", "index", "labels"} & set(labels)
    if reserved:
        raise ValueError(f"method labels {sorted(reserved)} are reserved; give the method another label")
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise ValueError(f"method labels must be unique; repeated: {sorted(dup)} (give each a label)")
    return out


# ---------------------------------------------------------------------------------------
# Models and their cached signals
# ---------------------------------------------------------------------------------------

def _subset(data: Data, index: Sequence[int]) -> Data:
    if isinstance(data, TensorData):
        return data.subset(torch.as_tensor(list(index), dtype=torch.long))
    return Subset(data, list(index))  # type: ignore[arg-type]


def concat_data(a: Data, b: Data) -> Data:
    """``a + b`` (e.g. ``D_r + D_f``): concatenated tensors for TensorData, a ConcatDataset otherwise."""
    if isinstance(a, TensorData) and isinstance(b, TensorData):
        ta, tb = as_heads(a.targets), as_heads(b.targets)
        targets = tuple(torch.cat([x, y]) for x, y in zip(ta, tb, strict=True))
        weights = None
        if a.weights is not None or b.weights is not None:
            wa = a.weights if a.weights is not None else torch.ones(len(a))
            wb = b.weights if b.weights is not None else torch.ones(len(b))
            weights = torch.cat([wa, wb])
        return TensorData(torch.cat([a.inputs, b.inputs]), targets[0] if isinstance(a.targets, torch.Tensor)
                          else targets, weights)
    return ConcatDataset([a, b])  # type: ignore[list-item]


def model_seeds(which: str, n: int, data_seed: int) -> list[int]:
    """Training seeds: original ``i`` -> ``100_000 * data_seed + i``; oracle ``i`` -> ``... + 50_000 + i``."""
    base = 100_000 * data_seed + (50_000 if which == "oracle" else 0)
    return [base + i for i in range(n)]


def _signals_to_npz(splits: Mapping[str, Signals]) -> bytes:
    arrays = {f"{s}__{k}": v for s, sig in splits.items() for k, v in sig.as_dict().items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _discard(path: Path, reason: str) -> None:
    """Remove an unusable cache file, saying which and why; the caller computes it again."""
    warnings.warn(f"privacy cache: {path} is unusable ({reason}); computing it again", CacheRebuiltWarning,
                  stacklevel=3)
    path.unlink(missing_ok=True)


def _signals_from_npz(path: Path) -> dict[str, Signals]:
    with np.load(path, allow_pickle=False) as z:
        out: dict[str, dict[str, np.ndarray]] = {}
        for k in z.files:
            s, name = k.split("__", 1)
            out.setdefault(s, {})[name] = z[k]
    return {s: Signals(**d) for s, d in out.items() if set(d) == set(SIGNAL_NAMES)}


class PrivacyRunner:
    """Trains (or loads) the model sets of one :class:`PrivacySetup` and their per-example signals.

    Args:
        setup: the benchmark's setup.
        data_seed: the seed of the data split (enters the training seeds and the cache path).
        cache_dir: cache root (default :func:`overunlearn.storage.default_cache_dir`); ``False``: no cache.
        device: device for unlearning and signal computation (training is the setup's business).
        max_eval: at most this many retain and test examples get signals (seeded subsets; the
            forget set is always complete).
        progress: print one line per trained / unlearned model.
    """

    def __init__(self, setup: PrivacySetup, *, data_seed: int = 0, cache_dir: str | Path | None | bool = None,
                 device: str | torch.device = "auto", max_eval: int | None = 2000, progress: bool = False) -> None:
        from overunlearn.engine import resolve_device

        self.setup = setup
        self.data_seed = data_seed
        self.device = resolve_device(device)
        self.progress = progress
        if cache_dir is False:
            self.root: Path | None = None
        else:
            base = Path(cache_dir) if cache_dir not in (None, True) else default_cache_dir()
            self.root = base / "privacy" / f"{setup.name}-{setup.cache_key()}-s{data_seed}"
        rng = np.random.default_rng(10_007 + data_seed)

        def pick(n: int) -> np.ndarray:
            if max_eval is None or n <= max_eval:
                return np.arange(n)
            return np.sort(rng.choice(n, size=max_eval, replace=False))

        retain_idx = np.asarray(setup.eval_retain) if setup.eval_retain is not None else pick(len(setup.retain))
        test_idx = pick(len(setup.test))
        self.eval_index = {"forget": np.arange(len(setup.forget)), "retain": retain_idx, "test": test_idx}
        self.eval_data: dict[str, Data] = {
            "forget": setup.forget,
            "retain": setup.retain if len(retain_idx) == len(setup.retain) else _subset(setup.retain, retain_idx),
            "test": setup.test if len(test_idx) == len(setup.test) else _subset(setup.test, test_idx),
        }
        self.eval_key = stable_hash({k: v.tolist() for k, v in self.eval_index.items()} | {"head": setup.head})
        self.timings: dict[str, list[float]] = {}
        self._models: dict[tuple[str, int], nn.Module] = {}

    # -- paths ---------------------------------------------------------------------
    def _path(self, *parts: str) -> Path | None:
        return None if self.root is None else self.root.joinpath(*parts)

    def _log(self, msg: str) -> None:
        if self.progress:
            print(f"[privacy] {msg}", flush=True)

    # -- signals -------------------------------------------------------------------
    def signals_of(self, model: nn.Module) -> dict[str, Signals]:
        s = self.setup
        return {split: compute_signals(model, data, s.task, head=s.head, batch_size=s.eval_batch_size,
                                       device=self.device)
                for split, data in self.eval_data.items()}

    def _cached_signals(self, group: str, name: str, make: Callable[[], nn.Module]) -> dict[str, Signals]:
        path = self._path("signals", self.eval_key, group, f"{name}.npz")
        if path is not None and path.exists():
            try:
                return _signals_from_npz(path)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
                _discard(path, f"unreadable signals ({exc})")
        sig = self.signals_of(make())
        if path is not None:
            atomic_write_bytes(path, _signals_to_npz(sig))
        return sig

    # -- reference models ------------------------------------------------------------
    def _load_state(self, path: Path) -> nn.Module | None:
        """The cached model at ``path``, or ``None`` (and the file removed, with a warning naming it) when it
        cannot be used: truncated, corrupt, or of another architecture."""
        model = self.setup.make_model()
        try:
            model.load_state_dict(safe_torch_load(path))
        except (CacheFileError, RuntimeError) as exc:
            _discard(path, str(exc))
            return None
        return model

    def _store(self, which: str, sd: int, model: nn.Module) -> None:
        path = self._path(which, f"{sd}.pt")
        if path is not None:
            atomic_torch_save(path, model.state_dict())
        else:  # no disk cache: keep it in memory
            self._models[(which, sd)] = model

    def _stored(self, which: str, sd: int) -> bool:
        path = self._path(which, f"{sd}.pt")
        return (which, sd) in self._models or (path is not None and path.exists())

    def ensure_models(self, which: Which, n: int) -> None:
        """Train the missing ones of the ``n`` original or oracle models (one ``fit_ensemble`` call, or
        ``fit`` per seed, each model written to the cache as soon as it exists)."""
        if not [sd for sd in model_seeds(which, n, self.data_seed) if not self._stored(which, sd)]:
            return
        lock = self._path(which, ".lock")
        with file_lock(lock) if lock is not None else contextlib.nullcontext():
            # (under the lock: another run sharing the cache may have trained them meanwhile)
            missing = [sd for sd in model_seeds(which, n, self.data_seed) if not self._stored(which, sd)]
            if missing:
                self._train_missing(which, missing)

    def _train_missing(self, which: Which, missing: list[int]) -> None:
        t0 = time.perf_counter()
        if self.setup.fit_ensemble is not None:
            trained = list(self.setup.fit_ensemble(which, missing))
            if len(trained) != len(missing):
                raise RuntimeError(f"fit_ensemble returned {len(trained)} models for {len(missing)} seeds")
            for sd, m in zip(missing, trained, strict=True):
                self._store(which, sd, m.cpu())
            self._log(f"trained {len(missing)} {which} models (ensemble)")
        else:
            for sd in missing:
                self._store(which, sd, self.setup.fit(which, sd).cpu())
                self._log(f"trained {which} seed {sd}")
        dt = time.perf_counter() - t0
        self.timings.setdefault(f"train_{which}", []).extend([dt / len(missing)] * len(missing))

    def reference_model(self, which: Which, i: int) -> nn.Module:
        """Original or oracle model ``i`` (trained if missing, else loaded from the cache)."""
        sd = model_seeds(which, i + 1, self.data_seed)[i]
        if not self._stored(which, sd):
            self.ensure_models(which, i + 1)
        if (which, sd) in self._models:
            return self._models[(which, sd)]
        path = self._path(which, f"{sd}.pt")
        assert path is not None
        model = self._load_state(path)
        if model is None:  # a corrupt cache file was removed: train it again
            self.ensure_models(which, i + 1)
            model = self._load_state(path)
            assert model is not None
        return model

    def reference_signals(self, which: Which, n: int) -> list[dict[str, Signals]]:
        """Signals of the ``n`` original or oracle models (models are trained only if signals are missing)."""
        seeds = model_seeds(which, n, self.data_seed)
        if not all(self._has_signals(which, str(sd)) for sd in seeds):
            self.ensure_models(which, n)
        return [self._cached_signals(which, str(sd), lambda i=i: self.reference_model(which, i))
                for i, sd in enumerate(seeds)]

    def _has_model(self, folder: str, i: int) -> bool:
        path = self._path("unlearned", folder, f"{i}.pt")
        return path is not None and path.exists()

    def _has_signals(self, group: str, name: str) -> bool:
        path = self._path("signals", self.eval_key, group, f"{name}.npz")
        return path is not None and path.exists()

    # -- unlearned models ------------------------------------------------------------
    def _unlearned_folder(self, spec: MethodSpec) -> str:
        """Cache folder of ``spec``'s unlearned models and signals: the method, its settings and a
        fingerprint of the code that unlearns and measures (an edit there recomputes them)."""
        return f"{spec.method}-{spec.key()}-{unlearning_fingerprint()}"

    def unlearn_one(self, spec: MethodSpec, i: int, original: nn.Module) -> nn.Module:
        from overunlearn.engine import unlearn
        from overunlearn.methods import create

        s = self.setup
        # Retrain starts from an initialisation of its own, never original i's (whatever data_seed is)
        from overunlearn.benchmarks.base import retrain_seed

        init_seed = retrain_seed(model_seeds("original", i + 1, self.data_seed)[i])

        def fresh_model() -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(init_seed)
                return s.make_model()

        problem = UnlearningProblem(model=original, retain=s.accessible_retain if s.accessible_retain is not None
                                    else s.retain, forget=s.forget, task=s.task, batch_size=s.batch_size,
                                    make_model=fresh_model)
        res = unlearn(problem, create(spec.method, **dict(spec.hyper)), spec.make_budget(), seed=i,
                      device=self.device, forget_bn_stats=s.forget_bn_stats)
        self.timings.setdefault(f"unlearn_{spec.name}", []).append(res.record.seconds)
        rec_path = self._path("unlearned", self._unlearned_folder(spec), f"{i}.json")
        if rec_path is not None:
            atomic_write_json(rec_path, dataclasses.asdict(res.record))
        return res.model.cpu()

    def unlearned_signals(self, spec: MethodSpec, n: int) -> list[dict[str, Signals]]:
        """Signals of the ``n`` unlearned models of ``spec`` (unlearning original ``i`` with seed ``i``)."""
        folder = self._unlearned_folder(spec)
        group = f"unlearned-{folder}"
        if any(not self._has_signals(group, str(i)) and not self._has_model(folder, i) for i in range(n)):
            self.ensure_models("original", n)
        out = []
        for i in range(n):
            def make(i: int = i) -> nn.Module:
                path = self._path("unlearned", folder, f"{i}.pt")
                if path is not None and path.exists():
                    cached = self._load_state(path)
                    if cached is not None:
                        return cached
                model = self.unlearn_one(spec, i, self.reference_model("original", i))
                if path is not None:
                    atomic_torch_save(path, model.state_dict())
                self._log(f"unlearned {spec.name} model {i}")
                return model

            out.append(self._cached_signals(group, str(i), make))
        return out


# ---------------------------------------------------------------------------------------
# Metrics of a model set
# ---------------------------------------------------------------------------------------

def _stack(per_model: Sequence[Mapping[str, Signals]]) -> dict[str, Signals]:
    return {split: Signals.stack([m[split] for m in per_model]) for split in per_model[0]}


def _is_classification(task: Task) -> bool:
    return isinstance(task, ClassificationTask)


@dataclass
class SetEvaluation:
    """Metrics of one model set against the oracles, with the per-example arrays behind them."""

    row: dict[str, Any]
    arrays: dict[str, np.ndarray]


def evaluate_set(signals: Mapping[str, Signals], oracle: Mapping[str, Signals], task: Task, *,
                 features: Sequence[str] | None = None, ulira_folds: int | None = None,
                 ulira_global_variance: bool = False, klom_kwargs: Mapping[str, Any] | None = None,
                 mia_splits: int = 5, seed: int = 0, with_ulira: bool = True,
                 with_klom: bool = True) -> SetEvaluation:
    """All privacy metrics of one set of models (stacked signals, ``(n_models, n)`` per split).

    Per model: population MIA (loss, forget vs test) and MIA-efficacy (``features``; default
    SalUn's four for classifiers, ``("loss",)`` for regression), averaged over models. Across
    models: U-LiRA on the forget set (statistic: ``scaled_confidence`` for classifiers, the
    signed error ``margin`` for regression) and KLoM (margins) on every split.
    """
    cls = _is_classification(task)
    feats = tuple(features) if features is not None else (SALUN_FEATURES if cls else ("loss",))
    n_models = signals["forget"].loss.shape[0]
    row: dict[str, Any] = {"n_models": n_models}
    arrays: dict[str, np.ndarray] = {}
    # utility
    for split, sig in signals.items():
        row[f"loss_{split}"] = float(sig.loss.mean())
        if cls:
            row[f"acc_{split}"] = float(sig.correct.mean())
        arrays[f"loss_{split}"] = sig.loss
        arrays[f"margin_{split}"] = sig.margin
    # population MIA per model
    accs, aucs, taucs = [], [], []
    for m in range(n_models):
        r = population_mia(signals["forget"].loss[m], signals["test"].loss[m], n_splits=mia_splits, seed=seed + m)
        accs.append(r.accuracy)
        aucs.append(r.auc)
        taucs.append(r.threshold_auc)
    row["mia_acc"] = float(np.nanmean(accs)) if np.isfinite(accs).any() else float("nan")
    row["mia_acc_std"] = float(np.nanstd(accs)) if np.isfinite(accs).any() else float("nan")
    row["mia_auc"] = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")
    row["mia_threshold_auc"] = float(np.nanmean(taucs))
    # MIA efficacy per model and feature
    for name in feats:
        effs = []
        nonmember = np.zeros(signals["forget"].loss.shape[1])
        for m in range(n_models):
            r = mia_efficacy(signals["retain"].get(name)[m], signals["test"].get(name)[m],
                             signals["forget"].get(name)[m], feature=name, seed=seed + m)
            effs.append(r.efficacy)
            nonmember += r.per_example
        row[f"mia_eff_{name}"] = float(np.mean(effs))
        arrays[f"mia_eff_{name}"] = nonmember / n_models
    # U-LiRA on the forget set
    stat = "scaled_confidence" if cls else "margin"
    if with_ulira:
        ul = ulira(signals["forget"].get(stat), oracle["forget"].get(stat), folds=ulira_folds,
                   global_variance=ulira_global_variance)
        for k, v in ul.summary().items():
            row[f"ulira_{k}"] = v
        arrays["ulira_example_auc"] = ul.per_example
    else:
        for k in ("auc", "example_auc_mean", "tpr@1%fpr", "tpr@5%fpr"):
            row[f"ulira_{k}"] = float("nan")
    # KLoM on every split
    for split in (signals if with_klom else ()):
        kv = klom_values(signals[split].margin, oracle[split].margin, **dict(klom_kwargs or {}))
        arrays[f"klom_{split}"] = kv
        row[f"klom_{split}_mean"] = float(kv.mean())
        row[f"klom_{split}_p95"] = float(np.percentile(kv, 95))
        row[f"klom_{split}_p99"] = float(np.percentile(kv, 99))
    return SetEvaluation(row, arrays)


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------

def _save_arrays(path: Path, evals: Mapping[str, SetEvaluation], index: Mapping[str, np.ndarray]) -> Path:
    arrays = {f"{label}__{k}": v for label, ev in evals.items() for k, v in ev.arrays.items()}
    arrays.update({f"index__{k}": v for k, v in index.items()})
    arrays["labels"] = np.array(list(evals), dtype=str)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def load_arrays(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Read a report's ``.npz`` back as ``{label: {array_name: array}}`` (plus ``"index"``)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as z:
        for k in z.files:
            if k == "labels":
                continue
            label, name = k.split("__", 1)
            out.setdefault(label, {})[name] = z[k]
    return out


def privacy_report(benchmark: Any, methods: Any = (), n_models: int = 8, *, seed: int = 0,
                   cache_dir: str | Path | None | bool = None, device: str | torch.device = "auto",
                   out_dir: str | Path | None = None, features: Sequence[str] | None = None,
                   ulira_folds: int | None = None, ulira_global_variance: bool = False,
                   klom_kwargs: Mapping[str, Any] | None = None, max_eval: int | None = 2000,
                   progress: bool = False, plots: bool = False, ground_truth: Literal["extra", "split"] = "extra",
                   klom_bins: int | Literal["auto"] = "auto") -> list[dict[str, Any]]:
    """Privacy metrics of unlearning methods against ``n_models`` oracles; one row per model set.

    Args:
        benchmark: a :class:`PrivacySetup`, or a benchmark with ``privacy_setup(seed)`` (or one that
            :func:`overunlearn.privacy.setups.adapt_benchmark` knows).
        methods: what to evaluate, see :func:`parse_methods` -- e.g.
            ``[("minnorm_og", {"lr": 1e-3, "reg_coef": 1.0}, 100), ("gd", {}, {"epochs": 100})]``.
        n_models: ``N``, the number of originals, of oracles and of unlearned models per method.
        seed: the data seed (which split; the model seeds derive from it, see :func:`model_seeds`).
        cache_dir: cache root (``False``: keep nothing on disk).
        device: unlearning / signal device.
        out_dir: if given, writes ``privacy_rows.json`` and ``privacy_arrays.npz`` there (atomically).
        features: MIA-efficacy features (default: SalUn's four for classifiers, ``loss`` for regression).
        ulira_folds, ulira_global_variance: U-LiRA options (default leave-one-out, per-example variance).
        klom_kwargs: KLoM options (``bins``, ``clip``, ``eps``, ``edges``).
        klom_bins: KLoM's bin count: ``"auto"`` (default, as in the CLI and reports:
            :func:`klom_auto_bins`, fewer bins for small ``N``) or a number, e.g. 20 (the published
            setting, meant for ~100 models or more); ``klom_kwargs["bins"]`` wins.
        ground_truth: ``"extra"`` (default) trains ``N`` further oracles and evaluates them like a
            method (same sample sizes as every other row); ``"split"`` trains only ``N`` oracles and
            compares one half with the other (cheaper, but its U-LiRA / KLoM use ``N/2`` models).
        max_eval: cap on retain and test examples that get signals.
        progress: print a line per trained model.
        plots: also draw ``loss_hist.png`` and ``klom_cdf.png`` in ``out_dir`` (needs matplotlib).

    Rows: ``label`` (``original``, ``ground_truth`` or the method label), ``kind``, ``method``,
    ``hyper``, ``budget``, ``n_models``, utility (``loss_*``, ``acc_*``), ``mia_acc``, ``mia_auc``,
    ``mia_threshold_auc``, ``mia_eff_<feature>``, ``ulira_auc``, ``ulira_tpr@1%fpr``,
    ``ulira_tpr@5%fpr``, ``ulira_example_auc_mean``, ``klom_<split>_{mean,p95,p99}`` and
    ``klom_bins`` and ``seconds`` (mean training or unlearning time per model). The ``original``
    row compares the untouched originals with the oracles; the ``ground_truth`` row compares
    independently retrained models with the oracles: the finite-``N`` noise floor of U-LiRA
    (~0.5) and KLoM, and the MIA values of a perfect unlearner.
    """
    if n_models < 4:
        raise ValueError(f"n_models={n_models}: at least 4 models are needed (U-LiRA fits Gaussians on N - 1 "
                         "shadows; the ground-truth row splits the oracles in two halves)")
    setup = as_privacy_setup(benchmark, seed)
    specs = parse_methods(methods)
    if ground_truth not in ("extra", "split"):
        raise ValueError(f"ground_truth={ground_truth!r} is not one of 'extra', 'split'")
    runner = PrivacyRunner(setup, data_seed=seed, cache_dir=cache_dir, device=device, max_eval=max_eval,
                           progress=progress)
    n_oracles = 2 * n_models if ground_truth == "extra" else n_models
    oracle_all = _stack(runner.reference_signals("oracle", n_oracles))
    original = _stack(runner.reference_signals("original", n_models))
    kl = dict(klom_kwargs or {})
    kl.setdefault("bins", klom_auto_bins(n_models) if klom_bins == "auto" else int(klom_bins))
    kw = dict(features=features, ulira_folds=ulira_folds, ulira_global_variance=ulira_global_variance,
              klom_kwargs=kl, seed=seed)
    evals: dict[str, SetEvaluation] = {}
    meta: dict[str, dict[str, Any]] = {}
    if ground_truth == "extra":
        # reference: oracles 0..N-1; ground-truth row: N further oracles N..2N-1 (same sample sizes as every row)
        oracle = {k: v.select(range(n_models)) for k, v in oracle_all.items()}
        fresh = {k: v.select(range(n_models, 2 * n_models)) for k, v in oracle_all.items()}
        gt = evaluate_set(fresh, oracle, setup.task, **kw)
    else:
        # one half of the oracles against the other half (N/2 vs N/2: a higher noise floor than the other rows)
        oracle = oracle_all
        half = n_models // 2
        a = {k: v.select(range(half)) for k, v in oracle.items()}
        b = {k: v.select(range(half, 2 * half)) for k, v in oracle.items()}
        # leave-one-out U-LiRA needs >= 2 shadows per group, so the halves need >= 3 models
        gt = evaluate_set(b, a, setup.task, **kw, with_ulira=half >= 3)
        full_gt = evaluate_set(oracle, oracle, setup.task, **kw, with_ulira=False, with_klom=False)  # MIA, utility
        for k, v in full_gt.row.items():
            if not (k.startswith("ulira_") or k.startswith("klom_")):
                gt.row[k] = v
        for k, v in full_gt.arrays.items():
            if not (k.startswith("ulira_") or k.startswith("klom_")):
                gt.arrays[k] = v
    evals["original"] = evaluate_set(original, oracle, setup.task, **kw)
    meta["original"] = {"kind": "original", "method": "", "seconds": _mean(runner.timings.get("train_original"))}
    evals["ground_truth"] = gt
    meta["ground_truth"] = {"kind": "ground_truth", "method": "retrain (oracle)",
                            "seconds": _mean(runner.timings.get("train_oracle"))}
    for spec in specs:
        t0 = time.perf_counter()
        sig = _stack(runner.unlearned_signals(spec, n_models))
        evals[spec.name] = evaluate_set(sig, oracle, setup.task, **kw)
        meta[spec.name] = {"kind": "method", "method": spec.method, "hyper": dict(spec.hyper),
                           "budget": dataclasses.asdict(spec.make_budget()),
                           "seconds": _mean(runner.timings.get(f"unlearn_{spec.name}"))}
        runner._log(f"{spec.name}: {time.perf_counter() - t0:.1f}s")
    rows = []
    for label, ev in evals.items():
        rows.append({"label": label, "setup": setup.name, "seed": seed, **meta[label], **ev.row,
                     "klom_bins": kl["bins"]})
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_json(out / "privacy_rows.json", rows)
        npz = _save_arrays(out / "privacy_arrays.npz", evals, runner.eval_index)
        if plots:
            from overunlearn.privacy.plots import plot_klom_cdfs, plot_loss_histograms

            plot_loss_histograms(npz, out / "loss_hist.png")
            plot_klom_cdfs(npz, out / "klom_cdf.png")
    return rows


def klom_auto_bins(n_models: int) -> int:
    """Bins for KLoM with few models: 20 from 80 models on, else ``max(3, round(sqrt(N)))``.

    With ``N`` samples spread over 20 bins most bins hold 0 or 1 model, so two samples of one
    distribution already score near the ceiling ``log(1/eps) = 11.5``; fewer bins keep the
    metric informative at ``N = 8 .. 32`` (our CPU defaults).
    """
    return 20 if n_models >= 80 else max(3, int(round(np.sqrt(n_models))))


def _mean(v: Sequence[float] | None) -> float:
    return float(np.mean(v)) if v else float("nan")


def format_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of report rows (default columns: the headline metrics)."""
    cols = list(columns or ["label", "mia_auc", "mia_eff_confidence", "mia_eff_loss", "ulira_auc",
                            "ulira_tpr@1%fpr", "klom_forget_mean", "klom_forget_p95", "klom_retain_mean",
                            "klom_test_mean", "acc_forget", "acc_test", "loss_forget", "loss_test"])
    cols = [c for c in cols if any(c in r for r in rows)]

    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    table = [cols] + [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths, strict=True)) for line in table)


def rows_to_json(rows: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps(list(rows), indent=2, default=str)
