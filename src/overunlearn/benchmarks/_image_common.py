"""Shared machinery of the image benchmarks (Label Erasure, Representation Collapse).

An :class:`ImagePreset` fixes everything a benchmark needs besides the seed: the training
recipe, the size of the (class-balanced) training and test subsets, the forget and
accessible-retain fractions, the unlearning batch size and the default number of
unlearning epochs ``T``. :class:`ImageBenchmark` loads the dataset once, draws each seed's
split, trains or loads the original and ground-truth models through the cache, assembles
the :class:`~overunlearn.problem.UnlearningProblem` and evaluates models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from overunlearn.benchmarks.base import MetricSpec, cached_reference, retrain_seed
from overunlearn.benchmarks.training import ModelCache, Phase, TrainRecipe, accuracy, build_model, train
from overunlearn.data.color import ColoredImages
from overunlearn.data.sources import ImageSet, canonical_name, default_data_root, get_source, load_images
from overunlearn.engine import resolve_device
from overunlearn.errors import DatasetNotFoundError
from overunlearn.problem import ClassificationTask, UnlearningProblem
from overunlearn.storage import default_cache_dir, stable_hash

#: bump when the way splits or models are built changes (invalidates caches)
DATA_VERSION = 2


@dataclass(frozen=True)
class ImagePreset:
    """A benchmark configuration besides the seed.

    Attributes:
        name: preset name (``"cpu"``, ``"paper"``, ``"test"``).
        recipe: how original and ground-truth models are trained.
        n_train: size of the class-balanced training subset (``None``: the whole training set).
        n_test: size of the class-balanced test subset the metrics use (``None``: the whole test set).
        p_forget: Erase: ``p_color`` (fraction of red copies and, independently, of green copies);
            Collapse: the fraction of each class recoloured into the forget set.
        p_retain: the fraction of the retain set an unlearning method may access (``D_r'``).
        unlearn_batch_size: retain and forget batch size during unlearning.
        epochs: default unlearning epochs ``T`` for the command line.
    """

    name: str
    recipe: TrainRecipe
    n_train: int | None
    n_test: int | None
    p_forget: float
    p_retain: float
    unlearn_batch_size: int
    epochs: int

    def __post_init__(self) -> None:
        if not 0 < self.p_forget <= 1 or not 0 < self.p_retain <= 1:
            raise ValueError(f"p_forget={self.p_forget} and p_retain={self.p_retain} must lie in (0, 1]")
        for f in ("n_train", "n_test"):
            v = getattr(self, f)
            if v is not None and v <= 0:
                raise ValueError(f"{f} must be positive or None, got {v}")

    def replace(self, **changes: Any) -> ImagePreset:
        """A copy with the non-``None`` ``changes`` applied (unknown names raise ``TypeError``).

        ``n_train=0`` / ``n_test=0`` mean "the whole split" (``None``).
        """
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise TypeError(f"unknown benchmark option(s) {unknown}; preset fields are {sorted(fields)}")
        kept: dict[str, Any] = {k: v for k, v in changes.items() if v is not None}
        for f in ("n_train", "n_test"):
            if kept.get(f) == 0:
                kept[f] = None
        return dataclasses.replace(self, **kept)


def balanced_subset(labels: Tensor, n: int | None, generator: torch.Generator) -> Tensor:
    """Indices of ``n`` examples, as equal a number per class as possible, in random order per class (sorted)."""
    if n is None or n >= len(labels):
        return torch.arange(len(labels))
    classes = torch.unique(labels)
    per = n // len(classes)
    extra = n - per * len(classes)
    chosen = []
    for i, c in enumerate(classes.tolist()):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        chosen.append(idx[: per + (1 if i < extra else 0)])
    return torch.cat(chosen).sort().values


def count(p: float, n: int) -> int:
    """``round(p * n)``, at least 1."""
    return max(1, int(round(p * n)))


class ImageBenchmark:
    """Base class; subclasses set ``name``, ``metrics``, ``METHOD_POINTS``, ``get_preset`` and implement the
    split and metrics."""

    name: str = ""
    metrics: tuple[MetricSpec, ...] = ()
    color_classes: int | None = None
    #: the hyperparameter point of each method for ``overunlearn bench NAME`` (see :meth:`method_points`)
    METHOD_POINTS: dict[str, dict[str, Any]] = {}
    #: models of each kind of ``overunlearn privacy`` (originals, oracles, unlearned per method) and where its
    #: ground truth comes from (``split``: one half of the oracles against the other)
    PRIVACY_MODELS = 8
    PRIVACY_GROUND_TRUTH = "split"

    def __init__(self, dataset: str = "fashion-mnist", *, preset: str | ImagePreset = "auto",
                 data_root: str | Path | None = None, cache_dir: str | Path | None = None, use_cache: bool = True,
                 device: str | torch.device = "auto", progress: bool = True, download: bool = False,
                 logit_clamp: float | None = 30.0, **overrides: Any) -> None:
        self.dataset = canonical_name(dataset)
        self.device = resolve_device(device)
        if isinstance(preset, str):
            preset = self.get_preset(preset, self.dataset, self.device)
        self.preset = preset.replace(**overrides)
        self.data_root = data_root
        self.download = download
        self.progress = progress
        self.task = ClassificationTask(logit_clamp=logit_clamp)
        root = (Path(cache_dir) if cache_dir is not None else default_cache_dir() / "models") if use_cache else None
        self.cache = ModelCache(root)
        self._train: ImageSet | None = None
        self._test: ImageSet | None = None
        self._splits: dict[int, dict[str, ColoredImages]] = {}
        self._models: dict[int, tuple[nn.Module, nn.Module, dict[str, Any]]] = {}
        self._reference: dict[int, dict[str, dict[str, float]]] = {}

    # -- presets ------------------------------------------------------------------
    @classmethod
    def get_preset(cls, name: str, dataset: str, device: torch.device) -> ImagePreset:  # pragma: no cover
        raise NotImplementedError

    # -- defaults of the command line (optional members of the benchmark protocol, benchmarks/base.py) ---
    @property
    def default_epochs(self) -> int:
        """The unlearning epochs ``T`` of ``overunlearn bench NAME``: the preset's."""
        return self.preset.epochs

    def method_points(self, epochs: int) -> dict[str, dict[str, Any]]:
        """The methods ``overunlearn bench NAME`` runs and their preset points (the same at every ``epochs``)."""
        return {m: dict(hp) for m, hp in self.METHOD_POINTS.items()}

    @property
    def privacy_defaults(self) -> dict[str, Any]:
        """Defaults of ``overunlearn privacy NAME``: models per set, ground truth, unlearning epochs."""
        return {"n_models": self.PRIVACY_MODELS, "ground_truth": self.PRIVACY_GROUND_TRUTH,
                "epochs": self.preset.epochs}

    # -- data ---------------------------------------------------------------------
    def oversized(self) -> dict[str, tuple[int, int]]:
        """The preset's subset sizes above its dataset's splits, ``{"n_train": (asked, available), ...}``
        (such a subset is the whole split). Loads the dataset only when the preset asks for a subset,
        else only checks that its files are there; raises :class:`~overunlearn.errors.DatasetNotFoundError`
        when they are not. Trains nothing."""
        p = self.preset
        if p.n_train is None and p.n_test is None:
            root = Path(self.data_root) if self.data_root is not None else default_data_root()
            source = get_source(self.dataset)
            if not self.download and source.find(root) is None:
                raise DatasetNotFoundError(source.how_to(root))
            return {}
        out: dict[str, tuple[int, int]] = {}
        if p.n_train is not None and p.n_train > len(self.train_set()):
            out["n_train"] = (p.n_train, len(self.train_set()))
        if p.n_test is not None:
            n_test = len(load_images(self.dataset, "test", self.data_root, self.download))
            if p.n_test > n_test:
                out["n_test"] = (p.n_test, n_test)
        return out

    def train_set(self) -> ImageSet:
        if self._train is None:
            self._train = load_images(self.dataset, "train", self.data_root, self.download)
        return self._train

    def test_set(self) -> ImageSet:
        if self._test is None:
            test = load_images(self.dataset, "test", self.data_root, self.download)
            idx = balanced_subset(test.labels, self.preset.n_test, torch.Generator().manual_seed(12345))
            self._test = test.subset(idx)
        return self._test

    def key(self) -> str:
        """Hash of everything the trained models depend on besides the seed."""
        p = self.preset
        return stable_hash({"benchmark": self.name, "dataset": self.dataset, "recipe": p.recipe.to_dict(),
                            "n_train": p.n_train, "p_forget": p.p_forget, "version": DATA_VERSION})

    def split(self, seed: int) -> dict[str, ColoredImages]:
        """``{"retain", "forget", "accessible", "original_train", "gt_train", ...}`` for ``seed`` (memoised)."""
        if seed not in self._splits:
            self._splits[seed] = self._make_split(seed)
        return self._splits[seed]

    def _make_split(self, seed: int) -> dict[str, ColoredImages]:  # pragma: no cover
        raise NotImplementedError

    def _accessible(self, retain: ColoredImages, seed: int) -> ColoredImages:
        gen = torch.Generator().manual_seed(seed * 7919 + 3)
        k = count(self.preset.p_retain, len(retain))
        return retain.subset(torch.randperm(len(retain), generator=gen)[:k].sort().values)

    # -- models -------------------------------------------------------------------
    def make_model(self, pretrained: bool = True) -> nn.Module:
        recipe = self.preset.recipe if pretrained else self.preset.recipe.replace(pretrained=None)
        return build_model(recipe, self.train_set().num_classes, self.color_classes)

    def _phases(self, split: dict[str, ColoredImages], role: str) -> list[Phase]:  # pragma: no cover
        raise NotImplementedError

    def models(self, seed: int) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
        """The original and ground-truth models for ``seed`` (trained once, then loaded from the cache)."""
        if seed in self._models:
            return self._models[seed]
        split = self.split(seed)
        key = self.key()
        def prepare(role: str) -> tuple[Any, nn.Module, Any, dict[str, Any]]:
            phases = self._phases(split, role)
            train_data = split["original_train" if role == "original" else "gt_train"]

            def fit(model: nn.Module) -> dict[str, Any]:
                summary = train(model, phases, self.preset.recipe, seed=seed, device=self.device,
                                progress=self.progress)
                summary["train_accuracy"] = accuracy(model, train_data, device=self.device)
                if role == "original":
                    summary["forget_accuracy"] = accuracy(model, split["forget"], device=self.device)
                return summary

            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                model = self.make_model()
            meta = {"benchmark": self.name, "dataset": self.dataset, "seed": seed, "role": role, "key": key,
                    "recipe": self.preset.recipe.to_dict(), "preset": self.preset.name,
                    "n_train_images": len(train_data)}
            return self.cache.path(self.name, self.dataset, key, seed, role), model, fit, meta

        self._models[seed] = self.cache.reference_models(prepare, self.device)
        return self._models[seed]

    def training_info(self, seed: int) -> dict[str, Any]:
        """Training metadata of both reference models (train accuracy, seconds, cache hits)."""
        return self.models(seed)[2]

    # -- protocol -----------------------------------------------------------------
    def problem(self, seed: int) -> UnlearningProblem:
        original, _, _ = self.models(seed)
        split = self.split(seed)
        return UnlearningProblem(
            model=original,
            retain=split["accessible"].materialize(),
            forget=split["forget"].materialize(),
            task=self.task,
            batch_size=self.preset.unlearn_batch_size,
            make_model=lambda: self._fresh_model(retrain_seed(seed)),
        )

    def _fresh_model(self, init_seed: int) -> nn.Module:
        """Retrain's starting point: an untrained network drawn under its own seed (not the ground-truth
        model's initialisation, which the engine's ``manual_seed(seed)`` would otherwise reproduce)."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(init_seed)
            return self.make_model(pretrained=False)

    def evaluate(self, model: nn.Module, seed: int) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError

    def reference(self, seed: int) -> dict[str, dict[str, float]]:
        if seed in self._reference:
            return self._reference[seed]
        original, gt, infos = self.models(seed)
        path = self.cache.path(self.name, self.dataset, self.key(), seed, f"reference-test{self.preset.n_test}")
        self._reference[seed] = cached_reference(
            None if path is None else path.with_suffix(".json"), all(i.get("cache_hit") for i in infos.values()),
            lambda: {"original": self.evaluate(original, seed), "ground_truth": self.evaluate(gt, seed)})
        return self._reference[seed]
