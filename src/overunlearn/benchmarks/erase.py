"""Multi-Class Label Erasure (the paper, Section 5.1 and Appendix F.3), registered as ``"erase"``.

Data, for each seed:

* retain set ``D_r``: every training image (or the class-balanced ``n_train`` subset) in
  **gray** ``(L, L, L)``, labels ``(class, 0)``;
* forget set ``D_f``: a random ``p_color`` fraction of the images as **red** copies ``(L, 0, 0)``
  with labels ``(class, 1)`` plus an independent random ``p_color`` fraction as **green** copies
  ``(0, L, 0)`` with labels ``(class, 2)``;
* the original model trains on ``D_r + D_f``, the ground-truth model on ``D_r`` only (it never
  sees a colour, so it predicts gray everywhere);
* an unlearning method sees a random ``p_retain`` fraction of ``D_r`` (``D_r'``) and all of ``D_f``.

Models have two heads, ``(class_logits, color_logits)``; the task is
``ClassificationTask(logit_clamp=30.0)``: cross-entropy of both heads summed, logits clamped to
``[-30, 30]`` as in the authors' reference code (``MAX_LOGIT_THRESHOLD``); MinNorm-OG constrains the
max logit of each head.

Metrics (the paper, Appendix F.3; the authors' reference code, ``erase/data_module.evaluate``),
on the gray, red and green copies of the test set (or its class-balanced ``n_test`` subset):

* ``retain_acc`` (max): fraction of **gray** test images with both heads correct;
* ``forget_error`` (min): mean of ``(p(gray | x) - 1)^2`` over the gray, red and green copies --
  the reference code's definition (gray included). A perfect colour classifier scores 2/3, a
  model that always says gray scores 0;
* ``forget_error_colored`` (min): the same mean over the red and green copies only (the paper's
  prose); perfect colour classifier 1, always-gray 0;
* ``class_acc`` (max): class-head accuracy on gray test images; ``color_acc`` (max): colour-head
  accuracy over the three copies (information only).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from overunlearn.benchmarks._image_common import ImageBenchmark, ImagePreset, balanced_subset, count
from overunlearn.benchmarks.base import MetricSpec, register_benchmark
from overunlearn.benchmarks.training import ERASE_CIFAR10, ERASE_CPU, ERASE_TINY, TEST_RECIPE, Phase, predict
from overunlearn.data.color import ERASE_PALETTE, ColoredImages, intensity

GRAY, RED, GREEN = 0, 1, 2

ERASE_METRICS = (
    MetricSpec("retain_acc", "max", "retain accuracy: gray test images with class and colour correct"),
    MetricSpec("forget_error", "min", "mean (p_gray - 1)^2 over gray, red and green test copies"),
    MetricSpec("forget_error_colored", "min", "mean (p_gray - 1)^2 over red and green test copies"),
    MetricSpec("class_acc", "max", "class accuracy on gray test images"),
    MetricSpec("color_acc", "max", "colour accuracy over the three test copies"),
)

#: unlearning hyperparameters used by ``overunlearn bench erase`` for every method (one point each),
#: taken from the paper's CIFAR-10 T=2 grid (Table 8); see docs/images.md
ERASE_METHOD_POINTS: dict[str, dict[str, Any]] = {
    "retrain": {"lr": 1e-3},
    "gd": {"lr": 1e-3},
    "ga": {"lr": 1e-4},
    "ngd": {"lr": 1e-3, "noise_sig": 0.1},
    "ngp": {"lr": 1e-3, "ga_coef": 0.1},
    "ridge": {"lr": 1e-3, "reg_coef": 0.1, "reg_coef_decay": 0.8},
    "l1_sparse": {"lr": 1e-3, "reg_coef": 1e-3},
    "scrub": {"lr": 1e-3, "reg_coef": 0.1, "ga_coef": 0.1, "num_gd_epochs": 0},
    "npo": {"lr": 1e-4, "reg_coef": 0.1},
    "salun": {"lr": 1e-3, "ga_coef": 0.1},
    "kl_unif": {"lr": 1e-3, "kl_coef": 0.1},
    "minnorm_og": {"lr": 1e-4, "reg_coef": 0.1, "reg_coef_decay": 0.8, "num_gd_epochs": 0, "proj_pd": 1,
                   "grad_sample_size": 50},
}


def erase_preset(name: str, dataset: str, device: torch.device | None = None) -> ImagePreset:
    """Presets: ``cpu`` (SmallCNN, 5,000 training images), ``paper`` (the paper's recipes), ``test`` (tiny)."""
    if name == "auto":
        name = "paper" if device is not None and device.type == "cuda" else "cpu"
    if name == "cpu":
        return ImagePreset("cpu", ERASE_CPU, n_train=5000, n_test=2000, p_forget=0.05, p_retain=0.1,
                           unlearn_batch_size=128, epochs=2)
    if name == "paper":
        if dataset == "tiny-imagenet":
            return ImagePreset("paper", ERASE_TINY, None, None, p_forget=0.01, p_retain=0.01,
                               unlearn_batch_size=512, epochs=5)
        # CIFAR-10 as in the paper; MNIST-like data: the same ResNet-18 recipe (our choice, v1's is unknown)
        return ImagePreset("paper", ERASE_CIFAR10, None, None, p_forget=0.01, p_retain=0.01,
                           unlearn_batch_size=256, epochs=2 if dataset == "cifar10" else 5)
    if name == "test":
        return ImagePreset("test", TEST_RECIPE, n_train=300, n_test=100, p_forget=0.05, p_retain=0.2,
                           unlearn_batch_size=32, epochs=1)
    raise KeyError(f"unknown erase preset {name!r}; valid: auto, cpu, paper, test")


def erase_metrics(class_gray: Tensor, color_gray: Tensor, color_red: Tensor, color_green: Tensor,
                  labels: Tensor) -> dict[str, float]:
    """Label Erasure metrics from logits of the gray, red and green copies of a test set.

    Args:
        class_gray: class logits on the gray copies ``(N, classes)``.
        color_gray, color_red, color_green: colour logits ``(N, 3)`` on each copy.
        labels: content labels ``(N,)``.
    """
    class_ok = class_gray.argmax(1) == labels
    gray_ok = color_gray.argmax(1) == GRAY
    p = [torch.softmax(c.double(), dim=1)[:, GRAY] for c in (color_gray, color_red, color_green)]
    sq = [(q - 1.0) ** 2 for q in p]
    color_ok = torch.cat([color_gray.argmax(1) == GRAY, color_red.argmax(1) == RED, color_green.argmax(1) == GREEN])
    return {
        "retain_acc": float((class_ok & gray_ok).double().mean()),
        "forget_error": float(torch.cat(sq).mean()),
        "forget_error_colored": float(torch.cat(sq[1:]).mean()),
        "class_acc": float(class_ok.double().mean()),
        "color_acc": float(color_ok.double().mean()),
    }


@register_benchmark("erase")
class EraseBenchmark(ImageBenchmark):
    """Label Erasure on an image dataset (see the module docstring).

    Args:
        dataset: ``fashion-mnist``, ``mnist``, ``cifar10``, ``tiny-imagenet`` or ``digits``.
        preset: ``"auto"`` (``paper`` on CUDA, else ``cpu``), ``"cpu"``, ``"paper"``, ``"test"`` or an
            :class:`ImagePreset`.
        data_root, download: where the dataset files are; ``download=True`` lets torchvision fetch them.
        cache_dir, use_cache: where trained models are cached (default ``$OVERUNLEARN_CACHE/models``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        logit_clamp: the task's logit clamp (30 as in the reference code; ``None`` to disable).
        **overrides: :class:`ImagePreset` fields to change (``p_forget`` = ``p_color``, ``p_retain``,
            ``n_train``, ``n_test``, ``unlearn_batch_size``, ``epochs``, ``recipe``).
    """

    name = "erase"
    metrics = ERASE_METRICS
    color_classes = 3
    METHOD_POINTS = ERASE_METHOD_POINTS

    @classmethod
    def get_preset(cls, name: str, dataset: str, device: torch.device) -> ImagePreset:
        return erase_preset(name, dataset, device)

    def _make_split(self, seed: int) -> dict[str, ColoredImages]:
        train = self.train_set()
        gen = torch.Generator().manual_seed(seed)
        idx = balanced_subset(train.labels, self.preset.n_train, gen)
        lum = intensity(train.images[idx])
        labels = train.labels[idx]
        n = len(labels)
        k = count(self.preset.p_forget, n)
        red = torch.randperm(n, generator=gen)[:k].sort().values
        green = torch.randperm(n, generator=gen)[:k].sort().values
        zeros = torch.zeros(n, dtype=torch.long)
        retain = ColoredImages(lum, zeros, (labels, zeros), ERASE_PALETTE)
        fidx = torch.cat([red, green])
        fcol = torch.cat([torch.full((k,), RED), torch.full((k,), GREEN)])
        forget = ColoredImages(lum[fidx], fcol, (labels[fidx], fcol.clone()), ERASE_PALETTE)
        return {"retain": retain, "forget": forget, "accessible": self._accessible(retain, seed),
                "original_train": ColoredImages.concat([retain, forget]), "gt_train": retain,
                "red_index": red, "green_index": green}  # type: ignore[dict-item]

    def _phases(self, split: dict[str, ColoredImages], role: str) -> list[Phase]:
        r = self.preset.recipe
        if role == "original":
            return [Phase(split["original_train"], r.epochs, r.color_start_epoch, "original")]
        # the reference code delays the colour loss for the original model only (Tiny ImageNet);
        # the ground-truth model learns both heads from the first epoch
        return [Phase(split["gt_train"], r.gt_epochs or r.epochs, 0, "ground truth")]

    def test_copies(self) -> dict[str, ColoredImages]:
        if getattr(self, "_copies", None) is not None:
            return self._copies
        test = self.test_set()
        lum = intensity(test.images)
        n = len(test)
        out = {}
        for name, c in (("gray", GRAY), ("red", RED), ("green", GREEN)):
            col = torch.full((n,), c, dtype=torch.long)
            out[name] = ColoredImages(lum, col, (test.labels, col), ERASE_PALETTE)
        self._copies: dict[str, ColoredImages] | None = out
        return out

    def evaluate(self, model: nn.Module, seed: int) -> dict[str, float]:
        copies = self.test_copies()
        logits = {k: predict(model, v, device=self.device) for k, v in copies.items()}
        return erase_metrics(logits["gray"][0], logits["gray"][1], logits["red"][1], logits["green"][1],
                             copies["gray"].targets[0])  # type: ignore[index]


__all__ = ["EraseBenchmark", "erase_metrics", "erase_preset", "ERASE_METHOD_POINTS", "ERASE_METRICS"]
