"""A small convolutional network for 28x28 / 32x32 images, with an optional colour head.

``SmallCNN`` is the CPU-sized stand-in for the paper's ResNets (the paper, Appendices F.3 and F.4):
two 3x3 conv blocks (conv, ReLU, 2x2 max-pool), an adaptive average pool to ``pool x pool``
(7x7 by default: the identity for 28x28 inputs, so the same network also takes 32x32 or
64x64 inputs), a hidden fully connected layer and one or two linear heads. With the
defaults it has about 410k parameters -- far more than the few thousand images of the CPU
presets, so it interpolates them (the paper's overparameterized regime) while a training
epoch stays cheap: almost all parameters sit in the fully connected layer, almost all
compute in the two convolutions. With ``color_classes`` set it returns ``(class_logits, color_logits)`` (Label
Erasure); with ``color_classes=None`` it returns a single logits tensor (Representation
Collapse).

There is no BatchNorm by default, so a model's output for one image never depends on the
other images of its batch (MinNorm-OG's Jacobians and the evaluation are then batch
independent); ``batchnorm=True`` adds BatchNorm after each convolution for experiments
that want to exercise the engine's BatchNorm policy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SmallCNN(nn.Module):
    """Conv(w) - pool - Conv(2w) - pool - avgpool(pool x pool) - FC(hidden) - heads.

    Args:
        in_channels: image channels (3 for the coloured benchmarks).
        num_classes: classes of the content head.
        color_classes: classes of the colour head, or ``None`` for a single-head model.
        width: channels of the first convolution (the second has ``2 * width``).
        hidden: units of the hidden fully connected layer.
        pool: side of the adaptive average pool before the fully connected layer.
        batchnorm: add BatchNorm2d after each convolution.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, color_classes: int | None = 3,
                 width: int = 16, hidden: int = 256, pool: int = 7, batchnorm: bool = False) -> None:
        super().__init__()
        if min(in_channels, num_classes, width, hidden, pool) <= 0:
            raise ValueError("in_channels, num_classes, width, hidden and pool must be positive")
        if color_classes is not None and color_classes <= 0:
            raise ValueError(f"color_classes must be positive or None, got {color_classes}")

        def block(cin: int, cout: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm)]
            if batchnorm:
                layers.append(nn.BatchNorm2d(cout))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            return layers

        self.in_channels = in_channels
        self.num_classes = num_classes
        self.color_classes = color_classes
        self.features = nn.Sequential(*block(in_channels, width), *block(width, 2 * width),
                                      nn.AdaptiveAvgPool2d(pool), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(2 * width * pool * pool, hidden), nn.ReLU(inplace=True))
        self.class_head = nn.Linear(hidden, num_classes)
        self.color_head = nn.Linear(hidden, color_classes) if color_classes is not None else None

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SmallCNN expects (batch, {self.in_channels}, H, W) images, got {tuple(x.shape)}")
        h = self.hidden(self.features(x))
        logits = self.class_head(h)
        if self.color_head is None:
            return logits
        return logits, self.color_head(h)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["SmallCNN", "count_parameters"]

if __name__ == "__main__":  # pragma: no cover
    m = SmallCNN()
    print(count_parameters(m), [t.shape for t in m(torch.zeros(2, 3, 28, 28))])
