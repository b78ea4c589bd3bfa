"""Which parameters the fast projection covers with per-layer blocks, and why the others are not.

:func:`explain_projection` runs the fast projection's route choice on a model and a batch -- the
hooked forward and backward, and the once-per-model check against autograd -- and stops before any
Jacobian or Gram is formed (so the engine's check of the blocks' Gram against that check runs on the
first projection after it; a block that fails only that one is reported on blocks here). Its :class:`ProjectionReport` lists, per trainable parameter, how the
projection handles it: in factored (``"ghost"``) form, from formed rows (``"rows"``), gathered with other
small parameters' rows (``"gathered"``), or through the ``torch.func`` Jacobian (``"torch.func"``, about
``rows x entries`` floats held at once), with the reason for the last. A layer type that shows up there
can get a block of its own (:func:`overunlearn.linalg.register_block`, docs/architecture.md).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from overunlearn import structure
from overunlearn.linalg.jacobian import _mode, call_scores
from overunlearn.linalg.projection import _check_adapted, _owners, _project

#: the forms a parameter can take, in the order reports list them
FORMS = ("ghost", "rows", "gathered", "torch.func")


@dataclass(frozen=True)
class ParameterRoute:
    """How the fast projection handles one trainable parameter.

    Attributes:
        name: the parameter's name in ``model.named_parameters()``.
        shape: its shape.
        module: the type name of the module(s) holding it.
        form: ``"ghost"``, ``"rows"``, ``"gathered"`` or ``"torch.func"``.
        reason: why it takes the ``torch.func`` Jacobian (empty otherwise).
        itemsize: bytes per entry (its dtype's).
    """

    name: str
    shape: tuple[int, ...]
    module: str
    form: str
    reason: str = ""
    itemsize: int = 4

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class ProjectionReport:
    """The route of one fast projection (:func:`explain_projection`).

    Attributes:
        model: the model's type name.
        path: ``"hooked"`` (per-layer blocks, plus the ``torch.func`` Jacobian for what they do not cover)
            or ``"materialised"`` (the whole ``torch.func`` Jacobian).
        rows: the Jacobian's rows (samples x scores per sample).
        parameters: one entry per trainable parameter, in ``model.parameters()`` order.
        reason: why the whole projection takes the ``torch.func`` Jacobian (``path == "materialised"``).
    """

    model: str
    path: str
    rows: int
    parameters: tuple[ParameterRoute, ...]
    reason: str = ""

    @property
    def fallback(self) -> tuple[ParameterRoute, ...]:
        """The parameters that take the ``torch.func`` Jacobian."""
        return tuple(p for p in self.parameters if p.form == "torch.func")

    @property
    def fallback_bytes(self) -> int:
        """Bytes of the ``torch.func`` Jacobian this projection forms (``rows x`` their entries)."""
        return self.rows * sum(p.numel * p.itemsize for p in self.fallback)

    @property
    def covered_fraction(self) -> float:
        """The fraction of the trainable entries that per-layer blocks cover."""
        total = sum(p.numel for p in self.parameters)
        return 1.0 - sum(p.numel for p in self.fallback) / total if total else 0.0

    def __str__(self) -> str:
        lines = [f"fast projection of {self.model}: {self.rows} Jacobian rows, {self.path} path, "
                 f"{self.covered_fraction:.1%} of {sum(p.numel for p in self.parameters):,} trainable entries "
                 "on per-layer blocks"]
        if self.reason:
            lines.append(f"  the whole Jacobian goes through torch.func because {self.reason}")
        groups: dict[tuple[str, str], list[ParameterRoute]] = defaultdict(list)
        for p in self.parameters:
            groups[(p.form, p.module)].append(p)
        for (form, module), ps in sorted(groups.items(), key=lambda kv: (FORMS.index(kv[0][0]), kv[0][1])):
            lines.append(f"  {form:10s} {module:28s} {len(ps):5d} tensor(s) {sum(p.numel for p in ps):14,d} entries")
        if self.fallback:
            lines.append(f"  torch.func Jacobian: {_size(self.fallback_bytes)}; its parameters:")
            # (the reason given above is not repeated)
            lines += [f"    {p.name} {tuple(p.shape)} ({p.module})" + ("" if p.reason == self.reason else f": {p.reason}")
                      for p in self.fallback[:20]]
            if len(self.fallback) > 20:
                lines.append(f"    ... and {len(self.fallback) - 20} more")
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


def explain_projection(model: nn.Module, inputs, score_fn, targets=None, mode: str = "per_sample") -> ProjectionReport:
    """How :func:`overunlearn.linalg.project_model_onto_span` would compute its projection for this
    model and batch (one hooked forward and backward pass, and the check against autograd if it has not
    passed for this model and input shape; no Jacobian or Gram is formed, so the check of the blocks' Gram
    waits for the first projection). Arguments as for that function."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    info: dict = {}
    zero = torch.zeros(sum(p.numel() for _, p in params), dtype=params[0][1].dtype, device=params[0][1].device)
    _check_adapted(model)
    _project(model, inputs, score_fn, zero, mode, 1e-12, targets, explain=info)
    rows = info["rows"]
    if rows is None:  # the route was decided before the scores: read their shape from one forward
        with _mode(model, train=False), torch.no_grad():
            rows = int(call_scores(score_fn, structure.call_model(model, inputs), targets).numel())
    owners = _owners(model)
    routes = tuple(
        ParameterRoute(name=name, shape=tuple(p.shape),
                       module=", ".join(dict.fromkeys(type(m).__name__ for m in owners.get(id(p), []))) or "-",
                       form=info["forms"][id(p)], reason=info["why"].get(id(p), ""), itemsize=p.element_size())
        for name, p in params)
    return ProjectionReport(model=type(model).__name__, path=info["path"], rows=rows, parameters=routes,
                            reason=info["reason"])
