"""Representation Collapse (the paper, Section 5.1 and Appendix F.4), registered as ``"collapse"``.

Data, for each seed (10-class datasets only; the palette has 10 colours):

* retain set ``D_r``: every training image (or the class-balanced ``n_train`` subset) coloured
  with the palette colour of its own label (label = content class = colour index), weight
  ``p / (1 + p)``;
* forget set ``D_f``: copies of a random ``p`` fraction of the images **of each class**, each
  recoloured with a uniformly random **other** palette colour, labelled with its content class,
  weight ``1 / (1 + p)`` -- so retain and forget sets carry about equal total weight;
* original model: a warm start on full-intensity gray copies of the training images (weight 1),
  then retain + forget, continuing the **same** optimizer and scheduler;
* ground-truth model: the retain set only (no warm start). Colour predicts the label perfectly
  on ``D_r`` and is easier to learn, so it becomes a colour classifier, while the original model
  must use content.

The retain set holds every training image (the forget images are extra recoloured copies),
following the paper's "retain set: every training image". The sample weights are training
weights only: the unlearning problem's data carry none by default (``unlearn_weights=False``, plain
``mean(CE_i)``, as the authors' reference code unlearns), so the paper's hyperparameter grids keep
their meaning. ``unlearn_weights=True`` keeps them (the engine's loss is then ``mean(w_i * CE_i)``,
the objective the original model minimised), which scales forget terms about ``1/p`` times
against retain terms and penalties.

Metrics, on 10 copies of the test set (or its class-balanced ``n_test`` subset), copy ``j``
coloured with palette colour ``j``:

* ``color_acc`` (max): fraction of images classified as their colour ``j``;
* ``content_acc`` (max): fraction classified as their content class (information only).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from overunlearn.benchmarks._image_common import ImageBenchmark, ImagePreset, balanced_subset, count
from overunlearn.benchmarks.base import MetricSpec, register_benchmark
from overunlearn.benchmarks.training import COLLAPSE_CIFAR10, COLLAPSE_CPU, TEST_RECIPE, Phase, predict
from overunlearn.data.color import COLLAPSE_PALETTE, FULL_GRAY, ColoredImages, intensity
from overunlearn.problem import UnlearningProblem

COLLAPSE_METRICS = (
    MetricSpec("color_acc", "max", "colour accuracy over the 10 recoloured test copies"),
    MetricSpec("content_acc", "max", "content accuracy over the 10 recoloured test copies"),
)

#: unlearning hyperparameters used by ``overunlearn bench collapse`` (one point per method): each
#: method's best-mean setting of the paper's full T = 10 Collapse grid (Tables 19-22) in the
#: equal-epoch sweep ``configs/fmnist_collapse_T10_paper_grid_unweighted_epochs.toml`` (CPU preset,
#: seeds 1-4; docs/sweeps.md 8.10). KL-to-uniform is not in that sweep: lr 1e-3, weight 0.1.
COLLAPSE_METHOD_POINTS: dict[str, dict[str, Any]] = {
    "retrain": {"lr": 5e-3},
    "gd": {"lr": 5e-3},
    "ga": {"lr": 1e-4},
    "ngd": {"lr": 5e-3, "noise_sig": 0.1},
    "ngp": {"lr": 5e-3, "ga_coef": 0.1},
    "ridge": {"lr": 5e-3, "reg_coef": 0.5, "reg_coef_decay": 0.8},
    "l1_sparse": {"lr": 5e-3, "reg_coef": 0.01},
    "scrub": {"lr": 5e-3, "reg_coef": 0.01, "ga_coef": 1e-3, "num_gd_epochs": 7},
    "npo": {"lr": 1e-4, "reg_coef": 0.9},
    "salun": {"lr": 5e-3, "ga_coef": 0.1},
    "kl_unif": {"lr": 1e-3, "kl_coef": 0.1},
    "minnorm_og": {"lr": 5e-3, "reg_coef": 0.5, "reg_coef_decay": 0.2, "num_gd_epochs": 7, "proj_pd": 1,
                   "grad_sample_size": 50},
}


def collapse_preset(name: str, dataset: str, device: torch.device | None = None) -> ImagePreset:
    """Presets: ``cpu`` (SmallCNN, 5,000 training images), ``paper`` (CIFAR-10 recipe), ``test`` (tiny)."""
    if name == "auto":
        name = "paper" if device is not None and device.type == "cuda" else "cpu"
    if name == "cpu":
        return ImagePreset("cpu", COLLAPSE_CPU, n_train=5000, n_test=1000, p_forget=0.05, p_retain=0.1,
                           unlearn_batch_size=128, epochs=10)
    if name == "paper":
        return ImagePreset("paper", COLLAPSE_CIFAR10, None, None, p_forget=0.01, p_retain=0.01,
                           unlearn_batch_size=256, epochs=10)
    if name == "test":
        return ImagePreset("test", TEST_RECIPE, n_train=300, n_test=100, p_forget=0.05, p_retain=0.2,
                           unlearn_batch_size=32, epochs=1)
    raise KeyError(f"unknown collapse preset {name!r}; valid: auto, cpu, paper, test")


def collapse_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Colour and content accuracy from logits ``(K, N, classes)`` of ``K`` recoloured copies.

    Copy ``j`` is coloured with palette colour ``j``; ``labels`` are the content classes ``(N,)``.
    """
    pred = logits.argmax(-1)  # (K, N)
    k = logits.shape[0]
    colors = torch.arange(k).unsqueeze(1).expand_as(pred)
    return {"color_acc": float((pred == colors).double().mean()),
            "content_acc": float((pred == labels.unsqueeze(0)).double().mean())}


@register_benchmark("collapse")
class CollapseBenchmark(ImageBenchmark):
    """Representation Collapse on a 10-class image dataset (see the module docstring).

    Args: as :class:`~overunlearn.benchmarks.erase.EraseBenchmark`; ``p_forget`` is the per-class
    forget fraction ``p``; ``unlearn_weights`` keeps the sample weights in the unlearning problem
    (default ``False``, the reference code's unweighted unlearning loss).
    """

    name = "collapse"
    metrics = COLLAPSE_METRICS
    color_classes = None
    METHOD_POINTS = COLLAPSE_METHOD_POINTS

    def __init__(self, dataset: str = "fashion-mnist", *, unlearn_weights: bool = False, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.unlearn_weights = unlearn_weights

    @classmethod
    def get_preset(cls, name: str, dataset: str, device: torch.device) -> ImagePreset:
        return collapse_preset(name, dataset, device)

    def _make_split(self, seed: int) -> dict[str, ColoredImages]:
        train = self.train_set()
        k_col = COLLAPSE_PALETTE.shape[0]
        if train.num_classes != k_col:
            raise ValueError(f"Representation Collapse needs a {k_col}-class dataset (one palette colour per "
                             f"class); {self.dataset} has {train.num_classes} classes")
        gen = torch.Generator().manual_seed(seed)
        idx = balanced_subset(train.labels, self.preset.n_train, gen)
        lum = intensity(train.images[idx])
        labels = train.labels[idx]
        p = self.preset.p_forget
        chosen = []
        for c in range(k_col):
            members = torch.nonzero(labels == c).flatten()
            if len(members) == 0:
                continue
            take = count(p, len(members))
            chosen.append(members[torch.randperm(len(members), generator=gen)[:take]])
        fidx = torch.cat(chosen).sort().values
        shift = torch.randint(1, k_col, (len(fidx),), generator=gen)
        fcol = (labels[fidx] + shift) % k_col  # uniform over the other colours
        n = len(labels)
        retain = ColoredImages(lum, labels.clone(), labels, COLLAPSE_PALETTE,
                               torch.full((n,), p / (1 + p)))
        forget = ColoredImages(lum[fidx], fcol, labels[fidx], COLLAPSE_PALETTE,
                               torch.full((len(fidx),), 1 / (1 + p)))
        warm = ColoredImages(lum, torch.zeros(n, dtype=torch.long), labels, FULL_GRAY)
        return {"retain": retain, "forget": forget, "accessible": self._accessible(retain, seed),
                "original_train": ColoredImages.concat([retain, forget]), "gt_train": retain, "warm": warm}

    def _phases(self, split: dict[str, ColoredImages], role: str) -> list[Phase]:
        r = self.preset.recipe
        if role == "original":
            phases = [Phase(split["warm"], r.warm_start_epochs, 0, "gray warm start")] if r.warm_start_epochs else []
            return phases + [Phase(split["original_train"], r.epochs, 0, "original")]
        return [Phase(split["gt_train"], r.gt_epochs or r.epochs, 0, "ground truth")]

    def problem(self, seed: int) -> UnlearningProblem:
        prob = super().problem(seed)
        if not self.unlearn_weights:
            prob.retain.weights = None  # type: ignore[union-attr]
            prob.forget.weights = None  # type: ignore[union-attr]
        return prob

    def test_copies(self) -> list[ColoredImages]:
        if getattr(self, "_copies", None) is not None:
            return self._copies  # type: ignore[return-value]
        test = self.test_set()
        lum = intensity(test.images)
        n = len(test)
        self._copies: list[ColoredImages] | None = [
            ColoredImages(lum, torch.full((n,), j, dtype=torch.long), test.labels, COLLAPSE_PALETTE)
            for j in range(COLLAPSE_PALETTE.shape[0])]
        return self._copies

    def evaluate(self, model: nn.Module, seed: int) -> dict[str, float]:
        copies = self.test_copies()
        logits = torch.stack([predict(model, c, device=self.device)[0] for c in copies])
        return collapse_metrics(logits, copies[0].targets)  # type: ignore[arg-type]


__all__ = ["CollapseBenchmark", "collapse_metrics", "collapse_preset", "COLLAPSE_METHOD_POINTS", "COLLAPSE_METRICS"]
