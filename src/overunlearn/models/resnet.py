"""Two-head and single-head ResNets built on torchvision backbones.

* :func:`two_head_resnet18` -- ResNet-18 with the CIFAR stem (the paper, Appendix F.3): the 7x7
  stride-2 ``conv1`` becomes a 3x3 stride-1 convolution, the stem max-pool is removed, the
  final ``fc`` becomes the identity and linear heads ``Linear(512, .)`` read the pooled
  features.
* :func:`two_head_resnet50` -- ResNet-50 for Tiny ImageNet (Appendix F.3), standard ImageNet
  stem, heads ``Linear(2048, .)``. Pretrained weights are optional and are **never
  downloaded implicitly**: pass ``weights`` as a path to a saved state dict (of a torchvision
  ``resnet50``), or the name of a torchvision weights enum (``"IMAGENET1K_V1"``) together with
  ``allow_download=True``; a torchvision checkpoint already in the torch hub cache is used
  without downloading.

``color_classes=None`` gives the single-head variants used by Representation Collapse.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from overunlearn.errors import DatasetNotFoundError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MultiHeadNet(nn.Module):
    """A feature backbone followed by a class head and an optional colour head.

    ``input_stats=(mean, std)`` re-normalises inputs that arrive normalised with mean 0.5 and std
    0.5 (the benchmarks' convention) to ``(x01 - mean) / std`` -- a fixed per-channel affine map
    (buffers, not parameters), used to feed ImageNet-normalised inputs to ResNet-50 as the paper does.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, color_classes: int | None,
                 input_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.renormalize = input_stats is not None
        if input_stats is not None:
            mean = torch.tensor(input_stats[0]).view(1, -1, 1, 1)
            std = torch.tensor(input_stats[1]).view(1, -1, 1, 1)
            # x01 = 0.5 x + 0.5; (x01 - mean) / std = x * (0.5 / std) + (0.5 - mean) / std
            self.register_buffer("in_scale", 0.5 / std)
            self.register_buffer("in_shift", (0.5 - mean) / std)
        self.num_classes = num_classes
        self.color_classes = color_classes
        self.class_head = nn.Linear(feature_dim, num_classes)
        self.color_head = nn.Linear(feature_dim, color_classes) if color_classes is not None else None

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if self.renormalize:
            x = x * self.in_scale + self.in_shift
        h = self.backbone(x)
        logits = self.class_head(h)
        if self.color_head is None:
            return logits
        return logits, self.color_head(h)


def _cifar_stem(net: nn.Module) -> nn.Module:
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def two_head_resnet18(num_classes: int = 10, color_classes: int | None = 3, cifar_stem: bool = True) -> MultiHeadNet:
    """ResNet-18 (randomly initialised) with the CIFAR stem and linear heads on 512 features."""
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    if cifar_stem:
        _cifar_stem(net)
    net.fc = nn.Identity()
    return MultiHeadNet(net, 512, num_classes, color_classes)


def _load_resnet50_weights(net: nn.Module, weights: str | os.PathLike, allow_download: bool) -> None:
    path = Path(weights)
    if path.suffix in {".pt", ".pth", ".bin"} or path.exists():
        if not path.exists():
            raise DatasetNotFoundError(f"ResNet-50 weights file {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith("fc.")]
        if bad or unexpected:
            raise ValueError(f"weights {path} do not fit a torchvision resnet50: missing {bad[:5]}, "
                             f"unexpected {list(unexpected)[:5]}")
        return
    from torchvision.models import ResNet50_Weights

    try:
        enum = ResNet50_Weights[str(weights)]
    except KeyError:
        raise ValueError(f"unknown ResNet-50 weights {weights!r}: give a state-dict path or one of "
                         f"{[w.name for w in ResNet50_Weights]}") from None
    hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
    if not hub.exists() and not allow_download:
        raise DatasetNotFoundError(
            f"ResNet-50 weights {enum.name} are not in the torch hub cache ({hub}); copy the file "
            f"{Path(enum.url).name} there, pass a state-dict path, or allow the download explicitly")
    state = enum.get_state_dict(progress=False) if not hub.exists() else torch.load(hub, map_location="cpu",
                                                                                     weights_only=True)
    net.load_state_dict(state)


def two_head_resnet50(num_classes: int = 200, color_classes: int | None = 3,
                      weights: str | os.PathLike | None = None, allow_download: bool = False,
                      imagenet_normalization: bool = True) -> MultiHeadNet:
    """ResNet-50 with linear heads on 2048 features (ImageNet stem, for 64x64 Tiny ImageNet).

    With ``imagenet_normalization`` (default) inputs normalised with (0.5, 0.5) are mapped to
    ImageNet's normalisation inside the model, as the paper's Tiny ImageNet pipeline normalises.
    """
    from torchvision.models import resnet50

    net = resnet50(weights=None)
    if weights is not None:
        _load_resnet50_weights(net, weights, allow_download)
    net.fc = nn.Identity()
    stats = (IMAGENET_MEAN, IMAGENET_STD) if imagenet_normalization else None
    return MultiHeadNet(net, 2048, num_classes, color_classes, stats)


def resnet18_single(num_classes: int = 10) -> MultiHeadNet:
    """Single-head CIFAR-stem ResNet-18 (Representation Collapse)."""
    return two_head_resnet18(num_classes=num_classes, color_classes=None)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MultiHeadNet", "two_head_resnet18", "two_head_resnet50", "resnet18_single"]
