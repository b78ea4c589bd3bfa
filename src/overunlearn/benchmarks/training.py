"""Training recipes for the image benchmarks, the training loop, and the model cache.

A :class:`TrainRecipe` is a frozen dataclass: architecture, SGD settings, StepLR schedule,
epochs, Representation Collapse's gray warm start, Label Erasure's colour-loss start epoch,
and augmentation. Its :meth:`TrainRecipe.key` (a hash of every field) enters the cache key
of the trained models, so changing any training setting retrains.

Recipes from the paper (Appendices F.3 and F.4):

* :data:`ERASE_CIFAR10` -- two-head ResNet-18 (CIFAR stem), 100 epochs, SGD(0.03, momentum 0.9,
  wd 5e-4), StepLR(50, 0.1), batch 256, colour loss from epoch 0, no augmentation.
* :data:`ERASE_TINY` -- ImageNet-pretrained two-head ResNet-50, 100 epochs, batch 512, SGD(0.1,
  0.9, wd 1e-4), StepLR(25, 0.3), colour loss from epoch 10, RandomResizedCrop(64, 0.7-1) + flip.
* :data:`COLLAPSE_CIFAR10` -- single-head ResNet-18; 20 warm-start epochs on full-intensity gray
  images, then 50 epochs on retain + forget **continuing the same optimizer and scheduler**
  (SGD 0.03 / 0.9 / 5e-4, StepLR(20, 0.1), batch 256); ground truth: 50 epochs on the retain set.

CPU presets (ours, not the paper's) shrink the problem so that one seed's original and
ground-truth models train in minutes on two CPU cores: a :class:`~overunlearn.models.cnn.SmallCNN`
(about 410k parameters) on a class-balanced subset of the training set. See ``docs/images.md``.

The loop colours each batch from ``uint8`` intensities (:class:`~overunlearn.data.color.ColoredImages`),
computes ``mean(w_i * sum_heads CE_i)`` and steps the scheduler once per epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from overunlearn import structure
from overunlearn.data.color import ColoredImages, colorize
from overunlearn.errors import CacheFileError, CacheRebuiltWarning
from overunlearn.problem import as_heads
from overunlearn.storage import atomic_torch_save, atomic_write_json, file_lock, safe_torch_load, stable_hash


@dataclass(frozen=True)
class TrainRecipe:
    """How an original or ground-truth model is trained.

    Attributes:
        name: a label (not part of the semantics, but part of the key).
        arch: ``"small_cnn"``, ``"resnet18"`` (CIFAR stem) or ``"resnet50"``.
        width, hidden: :class:`SmallCNN` sizes (ignored by the ResNets).
        pretrained: ResNet-50 weights (a torchvision enum name or a state-dict path); never downloaded.
        epochs: epochs of the main phase (original model).
        gt_epochs: epochs of the ground-truth model (``None``: ``epochs``).
        warm_start_epochs: Collapse's gray warm start before the main phase, sharing the optimizer
            and scheduler with it (0: none).
        color_start_epoch: the colour head's loss is used from this epoch on (Tiny ImageNet: 10).
        lr, momentum, weight_decay: SGD settings.
        step_size, gamma: StepLR (stepped once per epoch, counted across warm start and main phase).
        batch_size: training batch size.
        augment: RandomResizedCrop(scale 0.7-1, ratio 3/4-4/3) + horizontal flip, as batched tensor ops.
        normalize_weights: rescale a phase's sample weights so that they average 1 over its data set
            (relative weights unchanged). With plain SGD, ``mean(w * CE)`` with small weights is just a
            smaller learning rate; the paper's BatchNorm ResNets largely absorb that, a CNN without
            BatchNorm does not (used by the Collapse CPU preset, see docs/images.md).
    """

    name: str
    arch: str = "small_cnn"
    width: int = 16
    hidden: int = 256
    pretrained: str | None = None
    epochs: int = 100
    gt_epochs: int | None = None
    warm_start_epochs: int = 0
    color_start_epoch: int = 0
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    step_size: int = 50
    gamma: float = 0.1
    batch_size: int = 256
    augment: bool = False
    normalize_weights: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ("small_cnn", "resnet18", "resnet50"):
            raise ValueError(f"arch={self.arch!r} is not one of 'small_cnn', 'resnet18', 'resnet50'")
        for f in ("epochs", "batch_size", "step_size", "width", "hidden"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be positive, got {getattr(self, f)}")
        if self.warm_start_epochs < 0 or self.color_start_epoch < 0:
            raise ValueError("warm_start_epochs and color_start_epoch must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        return stable_hash(self.to_dict())

    def replace(self, **changes: Any) -> TrainRecipe:
        return dataclasses.replace(self, **changes)


ERASE_CIFAR10 = TrainRecipe("erase-cifar10-paper", arch="resnet18", epochs=100, lr=0.03, momentum=0.9,
                            weight_decay=5e-4, step_size=50, gamma=0.1, batch_size=256)
ERASE_TINY = TrainRecipe("erase-tiny-paper", arch="resnet50", pretrained="IMAGENET1K_V1", epochs=100, lr=0.1,
                         momentum=0.9, weight_decay=1e-4, step_size=25, gamma=0.3, batch_size=512,
                         color_start_epoch=10, augment=True)
COLLAPSE_CIFAR10 = TrainRecipe("collapse-cifar10-paper", arch="resnet18", warm_start_epochs=20, epochs=50,
                               gt_epochs=50, lr=0.03, momentum=0.9, weight_decay=5e-4, step_size=20, gamma=0.1,
                               batch_size=256)
#: CPU recipes (ours): a 410k-parameter SmallCNN on a few thousand images, see docs/images.md
ERASE_CPU = TrainRecipe("erase-cpu", arch="small_cnn", width=16, hidden=256, epochs=30, lr=0.03, momentum=0.9,
                        weight_decay=5e-4, step_size=20, gamma=0.1, batch_size=128)
COLLAPSE_CPU = TrainRecipe("collapse-cpu", arch="small_cnn", width=16, hidden=256, warm_start_epochs=25, epochs=20,
                           gt_epochs=20, lr=0.03, momentum=0.9, weight_decay=5e-4, step_size=20, gamma=0.1,
                           batch_size=128, normalize_weights=True)
#: tiny settings for unit tests (digits, a few epochs)
TEST_RECIPE = TrainRecipe("test", arch="small_cnn", width=4, hidden=16, epochs=2, gt_epochs=2, warm_start_epochs=1,
                          lr=0.05, step_size=10, batch_size=64)


def build_model(recipe: TrainRecipe, num_classes: int, color_classes: int | None, in_channels: int = 3) -> nn.Module:
    """A freshly initialised model for ``recipe`` (pretrained ResNet-50 weights loaded if the recipe names them)."""
    if recipe.arch == "small_cnn":
        from overunlearn.models.cnn import SmallCNN

        return SmallCNN(in_channels, num_classes, color_classes, width=recipe.width, hidden=recipe.hidden)
    if recipe.arch == "resnet18":
        from overunlearn.models.resnet import two_head_resnet18

        return two_head_resnet18(num_classes, color_classes)
    from overunlearn.models.resnet import two_head_resnet50

    return two_head_resnet50(num_classes, color_classes, weights=recipe.pretrained)


def random_resized_crop_flip(x: Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.7, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Batched RandomResizedCrop + RandomHorizontalFlip with one affine resampling per image."""
    n = x.shape[0]
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    logr = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass
class Phase:
    """Some epochs on one data set; the colour head's loss starts at ``color_start`` (phase-local epoch)."""

    data: ColoredImages
    epochs: int
    color_start: int = 0
    desc: str = "train"


def weighted_loss(outputs: Any, targets: Any, weights: Tensor | None, heads: int) -> Tensor:
    """``mean_i(w_i * sum_{h < heads} CE_h,i)``."""
    total: Tensor | float = 0.0
    for o, t in list(zip(as_heads(outputs), as_heads(targets), strict=True))[:heads]:
        total = total + F.cross_entropy(o, t, reduction="none")
    per = total if weights is None else total * weights  # type: ignore[operator]
    return per.mean()  # type: ignore[union-attr]


def train(model: nn.Module, phases: list[Phase], recipe: TrainRecipe, *, seed: int,
          device: torch.device | str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Train ``model`` in place through ``phases`` with one SGD optimizer and one StepLR schedule.

    Returns a summary: epochs, seconds and the last epoch's mean loss per phase.
    """
    dev = torch.device(device)
    model.to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=recipe.step_size, gamma=recipe.gamma)
    gen = torch.Generator().manual_seed(10_000 + seed)
    total_epochs = sum(p.epochs for p in phases)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_epochs, desc=phases[0].desc if phases else "train", unit="epoch", leave=False)
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"phases": []}
    try:
        for phase in phases:
            data = phase.data
            n_heads_all = len(as_heads(data.targets))
            lum = data.lum.to(dev)
            palette = data.palette.to(dev)
            color = data.color.to(dev)
            targets = tuple(t.to(dev) for t in as_heads(data.targets))
            weights = None if data.weights is None else data.weights.to(dev)
            if weights is not None and recipe.normalize_weights:
                weights = weights * (len(weights) / weights.sum())
            last = float("nan")
            for ep in range(phase.epochs):
                heads = n_heads_all if ep >= phase.color_start else 1
                perm = torch.randperm(len(data), generator=gen).to(dev)
                tot, cnt = 0.0, 0
                for i in range(0, len(data), recipe.batch_size):
                    idx = perm[i: i + recipe.batch_size]
                    x = colorize(lum[idx], palette[color[idx]])
                    if recipe.augment:
                        x = random_resized_crop_flip(x, gen)
                    out = model(x)
                    loss = weighted_loss(out, tuple(t[idx] for t in targets), None if weights is None else weights[idx],
                                         heads)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    tot += float(loss.detach()) * len(idx)
                    cnt += len(idx)
                sched.step()
                last = tot / max(cnt, 1)
                if not math.isfinite(last):
                    raise FloatingPointError(f"training diverged in {phase.desc} epoch {ep} (loss {last})")
                if bar is not None:
                    bar.set_description(phase.desc)
                    bar.set_postfix(loss=f"{last:.4f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
                    bar.update(1)
            summary["phases"].append({"desc": phase.desc, "epochs": phase.epochs, "last_loss": last,
                                      "images": len(data)})
    finally:
        if bar is not None:
            bar.close()
    summary["seconds"] = time.perf_counter() - t0
    summary["final_lr"] = opt.param_groups[0]["lr"]
    return summary


@torch.no_grad()
def predict(model: nn.Module, data: ColoredImages, *, batch_size: int = 1000,
            device: torch.device | str = "cpu") -> tuple[Tensor, ...]:
    """Logits of every head on ``data`` (eval mode, restored afterwards), on the CPU. The images go to the
    model's own device (``device`` only for a model without parameters or buffers): a sweep may unlearn on
    another device than the benchmark's."""
    dev = structure.model_device(model, device)
    was_training = model.training
    model.eval()
    outs: list[tuple[Tensor, ...]] = []
    try:
        for i in range(0, len(data), batch_size):
            idx = torch.arange(i, min(i + batch_size, len(data)))
            outs.append(tuple(o.float().cpu() for o in as_heads(model(data.inputs(idx, dev)))))
    finally:
        model.train(was_training)
    return tuple(torch.cat([o[h] for o in outs]) for h in range(len(outs[0])))


def accuracy(model: nn.Module, data: ColoredImages, device: torch.device | str = "cpu") -> dict[str, float]:
    """Per-head accuracy and the fraction of images with every head correct."""
    logits = predict(model, data, device=device)
    correct = [lg.argmax(1) == t for lg, t in zip(logits, as_heads(data.targets), strict=True)]
    res = {f"head{h}_acc": float(c.float().mean()) for h, c in enumerate(correct)}
    res["all_heads_acc"] = float(torch.stack(correct).all(0).float().mean())
    return res


class ModelCache:
    """Trained models under ``<dir>/<benchmark>/<dataset>/<key>/seed<seed>/<role>.pt`` (+ ``.json`` metadata).

    Written atomically and loaded with ``weights_only=True``; ``key`` hashes the recipe and the
    benchmark's data settings.
    """

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None

    def path(self, benchmark: str, dataset: str, key: str, seed: int, role: str) -> Path | None:
        if self.root is None:
            return None
        return self.root / benchmark / dataset / key / f"seed{seed}" / f"{role}.pt"

    def reference_models(self, prepare: Callable[[str], tuple[Path | None, nn.Module, Callable[[nn.Module], dict[str, Any]],
                                                              dict[str, Any]]],
                         device: torch.device | str) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
        """The original and ground-truth models of a benchmark seed: ``prepare(role)`` gives the cache path,
        a fresh model, its training function and metadata; each is loaded from the cache or trained and
        saved. Returns ``(original, ground_truth, {role: metadata with "cache_hit"})``, on ``device``."""
        out, infos = [], {}
        for role in ("original", "ground_truth"):
            path, model, fit, meta = prepare(role)
            model, info, hit = self.load_or_train(path, model, fit, meta)
            info["cache_hit"] = hit
            infos[role] = info
            out.append(model.to(device))
        return out[0], out[1], infos

    def load_or_train(self, path: Path | None, model: nn.Module, train_fn: Callable[[nn.Module], dict[str, Any]],
                      meta: dict[str, Any]) -> tuple[nn.Module, dict[str, Any], bool]:
        """Load ``model``'s state from ``path`` if present, else train it and save it. Returns ``(model, meta, hit)``.

        Runs sharing the cache take a lock per model, so each model is trained once (the second run
        waits, then loads it). A cached file that cannot be loaded (truncated, corrupt, another
        architecture) is named in a :class:`~overunlearn.errors.CacheRebuiltWarning`, deleted and trained
        again."""
        if path is None:
            return self._train(None, model, train_fn, meta)
        hit = self._load(path, model)
        if hit is not None:
            return model, hit, True
        with file_lock(path.with_name(path.name + ".lock")):
            hit = self._load(path, model)  # another run may have trained it meanwhile
            if hit is not None:
                return model, hit, True
            return self._train(path, model, train_fn, meta)

    @staticmethod
    def _load(path: Path, model: nn.Module) -> dict[str, Any] | None:
        """The metadata of the cached model at ``path`` after loading it into ``model``; ``None`` if there is
        none, or it was unusable (then it is deleted, with a warning)."""
        if not path.is_file():
            return None
        info_path = path.with_suffix(".json")
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        try:
            model.load_state_dict(safe_torch_load(path))
            info = json.loads(info_path.read_text()) if info_path.is_file() else {}
            if not isinstance(info, dict):
                raise ValueError(f"{info_path} holds a JSON {type(info).__name__}, not an object")
            return info
        except (CacheFileError, RuntimeError, KeyError, ValueError, UnicodeDecodeError) as exc:
            reason = str(exc).split("; delete it")[0] if isinstance(exc, CacheFileError) else f"{path}: {exc}"
            warnings.warn(f"cached model unusable ({reason}); training it again", CacheRebuiltWarning, stacklevel=3)
            for stale in (path, info_path):
                stale.unlink(missing_ok=True)
            model.load_state_dict(initial)  # a partial load must not become the starting point of training
            return None

    @staticmethod
    def _train(path: Path | None, model: nn.Module, train_fn: Callable[[nn.Module], dict[str, Any]],
               meta: dict[str, Any]) -> tuple[nn.Module, dict[str, Any], bool]:
        info = dict(meta)
        info.update(train_fn(model))
        info.update({"torch": torch.__version__, "python": platform.python_version()})
        if path is not None:
            atomic_torch_save(path, {k: v.detach().cpu() for k, v in model.state_dict().items()})
            atomic_write_json(path.with_suffix(".json"), info)
        return model, info, False


__all__ = ["TrainRecipe", "ERASE_CIFAR10", "ERASE_TINY", "COLLAPSE_CIFAR10", "ERASE_CPU", "COLLAPSE_CPU",
           "TEST_RECIPE", "build_model", "random_resized_crop_flip", "Phase", "train", "predict", "accuracy",
           "ModelCache", "weighted_loss"]
