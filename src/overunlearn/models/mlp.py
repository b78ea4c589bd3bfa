"""Fully connected networks: ``Linear -> act -> ... -> Linear``.

The Data Poisoning benchmark uses :func:`poison_mlp`, the paper's "3-layer MLP, hidden dim 300"
(``ShallowNet`` in the reference code): Linear(1, 300) -> SiLU -> Linear(300, 300) -> SiLU ->
Linear(300, 1), d = 91,201 parameters.

Initialisation is PyTorch's default for ``nn.Linear`` (weights and biases uniform on
``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``, which is what ``kaiming_uniform_(a=sqrt(5))`` gives),
but drawn from an explicit ``torch.Generator`` when one is given, so that building a model
never depends on (or disturbs) the global random state -- which makes it safe in threads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

_ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Sequential):
    """A multilayer perceptron. Layers are ``nn.Sequential`` children, so the state-dict keys are
    ``"0.weight", "0.bias", "2.weight", ...`` (linear layers at even positions).

    Args:
        in_features: input dimension.
        hidden: widths of the hidden layers.
        out_features: output dimension.
        activation: ``"silu"`` (default), ``"relu"`` or ``"tanh"``.
        generator: draw the initial parameters from this generator instead of the global one.
    """

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (300, 300), out_features: int = 1,
                 activation: str = "silu", generator: torch.Generator | None = None) -> None:
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {', '.join(map(repr, _ACTIVATIONS))}")
        widths = [int(in_features), *map(int, hidden), int(out_features)]
        if any(w <= 0 for w in widths):
            raise ValueError(f"every layer width must be positive, got {widths}")
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            if i:
                layers.append(_ACTIVATIONS[activation]())
            layers.append(nn.Linear(widths[i], widths[i + 1]))
        super().__init__(*layers)
        self.widths = tuple(widths)
        self.activation = activation
        if generator is not None:
            self.reset_parameters(generator)

    def linears(self) -> list[nn.Linear]:
        return [m for m in self if isinstance(m, nn.Linear)]

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PyTorch's default ``nn.Linear`` initialisation, from ``generator`` if given."""
        for lin in self.linears():
            bound = 1.0 / math.sqrt(lin.in_features)
            for p in (lin.weight, lin.bias):
                u = torch.rand(p.shape, generator=generator, dtype=p.dtype, device="cpu")
                p.copy_((u * 2.0 - 1.0) * bound)


def poison_mlp(seed: int | None = None) -> MLP:
    """The Data Poisoning model, 1-300-300-1 with SiLU; ``seed`` fixes its initialisation."""
    gen = None if seed is None else torch.Generator().manual_seed(int(seed))
    return MLP(1, (300, 300), 1, "silu", generator=gen)
