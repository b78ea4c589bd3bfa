"""Colouring as tensor operations, and coloured image sets that colour per batch.

Grayscale intensity ``L`` follows PIL's ``convert("L")`` (ITU-R 601-2 luma, fixed point,
rounded), as the reference code converts images to ``L`` before colouring. A colour with
RGB weights ``(r, g, b)`` in ``[0, 1]`` gives the image ``(L * r, L * g, L * b) / 255``,
which is then normalised with mean 0.5 and std 0.5 to ``[-1, 1]``.

* Label Erasure (the paper, Section 5.1 and Appendix F.3): gray = (L, L, L), red = (L, 0, 0),
  green = (0, L, 0); colour labels 0, 1, 2 (:data:`ERASE_PALETTE`).
* Representation Collapse (Appendix F.4): the 10-colour palette :data:`COLLAPSE_PALETTE`,
  each channel ``L * rgb / 255``. The warm start uses full-intensity gray (L, L, L)
  (:data:`FULL_GRAY`), which differs from palette index 8 (half-intensity gray), as in the
  authors' reference code (``experiments/collapse``).

:class:`ColoredImages` keeps intensities as ``uint8`` and a palette index per image and
builds normalised float batches on demand, so a 50,000-image training set costs 50 MB, not
600 MB per colouring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from overunlearn.problem import Batch, Targets, TensorData, as_heads

ERASE_COLORS = ("gray", "red", "green")
ERASE_PALETTE = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
COLLAPSE_COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "purple", "gray", "teal")
COLLAPSE_RGB = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
                             [255, 128, 0], [128, 0, 255], [128, 128, 128], [0, 128, 128]], dtype=torch.float32)
COLLAPSE_PALETTE = COLLAPSE_RGB / 255.0
FULL_GRAY = torch.tensor([[1.0, 1.0, 1.0]])
MEAN, STD = 0.5, 0.5


def intensity(images: Tensor) -> Tensor:
    """Grayscale intensity ``L`` as ``uint8 (N, 1, H, W)`` from ``uint8`` images with 1 or 3 channels.

    RGB uses PIL's fixed-point formula ``(19595 R + 38470 G + 7471 B + 2**15) >> 16``.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
    if images.shape[1] == 1:
        return images.contiguous()
    x = images.to(torch.int32)
    lum = (19595 * x[:, 0] + 38470 * x[:, 1] + 7471 * x[:, 2] + 32768) >> 16
    return lum.clamp_(0, 255).to(torch.uint8).unsqueeze(1)


def colorize(lum: Tensor, rgb: Tensor, normalize: bool = True) -> Tensor:
    """Colour intensities ``lum`` (``uint8 (N, 1, H, W)``) with per-image RGB weights ``rgb`` (``(N, 3)`` or ``(3,)``).

    Returns float32 ``(N, 3, H, W)``: ``lum / 255 * rgb``, normalised to ``(x - 0.5) / 0.5`` unless
    ``normalize=False``.
    """
    if rgb.dim() == 1:
        rgb = rgb.expand(lum.shape[0], 3)
    x = lum.to(torch.float32).div_(255.0) * rgb.to(device=lum.device, dtype=torch.float32)[:, :, None, None]
    if normalize:
        x = x.sub_(MEAN).div_(STD)
    return x


def denormalize(x: Tensor) -> Tensor:
    return x * STD + MEAN


@dataclass
class ColoredImages:
    """Images stored as intensities plus a palette index each; batches are coloured on demand.

    Attributes:
        lum: ``uint8 (N, 1, H, W)`` intensities.
        color: ``int64 (N,)`` row of ``palette`` used to colour each image.
        targets: a tensor or tuple of tensors (one per head), ``N`` rows each.
        palette: ``(K, 3)`` RGB weights in ``[0, 1]``.
        weights: optional per-image loss weights.
    """

    lum: Tensor
    color: Tensor
    targets: Targets
    palette: Tensor
    weights: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.lum.shape[0]
        if self.color.shape != (n,):
            raise ValueError(f"color must have shape ({n},), got {tuple(self.color.shape)}")
        for t in as_heads(self.targets):
            if t.shape[0] != n:
                raise ValueError("every target head needs one row per image")
        if n and (int(self.color.min()) < 0 or int(self.color.max()) >= self.palette.shape[0]):
            raise ValueError("color index out of the palette's range")

    def __len__(self) -> int:
        return int(self.lum.shape[0])

    def inputs(self, index: Tensor | None = None, device: torch.device | str | None = None) -> Tensor:
        lum, color = (self.lum, self.color) if index is None else (self.lum[index], self.color[index])
        if device is not None:
            lum = lum.to(device, non_blocking=True)
        return colorize(lum, self.palette.to(lum.device)[color.to(lum.device)])

    def _targets(self, index: Tensor) -> Targets:
        tg = self.targets
        return tg[index] if isinstance(tg, Tensor) else tuple(t[index] for t in tg)

    def batch(self, index: Tensor, device: torch.device | str | None = None) -> Batch:
        b = Batch(self.inputs(index, device), self._targets(index),
                  None if self.weights is None else self.weights[index])
        return b.to(device) if device is not None else b

    def subset(self, index: Tensor) -> ColoredImages:
        return ColoredImages(self.lum[index], self.color[index], self._targets(index), self.palette,
                             None if self.weights is None else self.weights[index])

    def materialize(self, with_weights: bool = True) -> TensorData:
        """A :class:`TensorData` of normalised float images (for unlearning problems)."""
        return TensorData(self.inputs(), self.targets, self.weights if with_weights else None)

    @staticmethod
    def concat(parts: list[ColoredImages]) -> ColoredImages:
        if not parts:
            raise ValueError("nothing to concatenate")
        pal = parts[0].palette
        if any(p.palette.shape != pal.shape or not torch.equal(p.palette, pal) for p in parts):
            raise ValueError("parts must share one palette")
        heads = [as_heads(p.targets) for p in parts]
        targets: Targets = tuple(torch.cat([h[i] for h in heads]) for i in range(len(heads[0])))
        if isinstance(parts[0].targets, Tensor):
            targets = targets[0]
        has_w = [p.weights is not None for p in parts]
        if any(has_w) and not all(has_w):
            raise ValueError("either every part has weights or none has")
        weights = torch.cat([p.weights for p in parts]) if all(has_w) else None  # type: ignore[misc]
        return ColoredImages(torch.cat([p.lum for p in parts]), torch.cat([p.color for p in parts]), targets, pal,
                             weights)


__all__ = ["ERASE_COLORS", "ERASE_PALETTE", "COLLAPSE_COLORS", "COLLAPSE_PALETTE", "COLLAPSE_RGB", "FULL_GRAY",
           "intensity", "colorize", "denormalize", "ColoredImages"]
