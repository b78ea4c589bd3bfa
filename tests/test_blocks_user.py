"""User-registered projection blocks that are wrong in ways the check against autograd cannot see,
because they raise: rows or back-projections of the wrong shape, errors in ``__init__``, ``bind``,
``ghost`` or ``done``. Each must cost time, not results: the projection takes the ``torch.func``
Jacobian, gives the reference projection and warns once (``BlockFailedWarning``, naming the block,
its layer and the error). The model's own errors still propagate, and registration mistakes raise
``TypeError`` at once. Small float64 models, tolerance 1e-9 relative.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import Gain, GainRows
from torch import nn

import overunlearn.linalg.projection as P
from overunlearn.linalg import explain_projection
from overunlearn.linalg.blocks import Block, Decline, ScaleNormBlock, register_block
from overunlearn.linalg.blocks.base import registered_block
from overunlearn.linalg.jacobian import output_jacobian
from overunlearn.linalg.projection import BlockFailedWarning, project_model_onto_span, project_onto_span

F64 = torch.float64


def identity(out):
    return out


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def model_and_batch(seed: int = 8, layer: type[nn.Module] = Gain) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), layer(4), nn.Linear(4, 2)).to(F64), torch.randn(5, 3, dtype=F64)


def reference(model: nn.Module, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return project_onto_span(output_jacobian(model, x, identity), v)


# ---------------------------------------------------------------- blocks for Gain (gain * tanh(x))

class GainBlock(Block):
    """Right, with ``rows``, ``back`` and a ghost form of its own (each wrong subclass breaks one)."""

    param_names = ("gain",)
    ghost_form = False

    def __init__(self, module, args, kwargs, output):
        super().__init__(module, args, kwargs, output)
        self.x = args[0].detach()
        self.output, self.batch, self.saved = output, args[0].shape[0], [args[0]]

    def _all(self):
        return self.deltas * self.per_row(torch.tanh(self.x))

    def rows(self, name, index):
        return self._all()[:, index]

    def back(self, name, alpha):
        return self._all().T @ alpha.to(self.x.dtype)

    def ghost_cheaper(self, name, budget):
        return self.ghost_form

    def ghost(self, name, v):
        r = self._all().double()
        return r @ r.T, r @ v.double()


class RowsShort(GainRows):  # rows one feature short
    def all_rows(self, name):
        return super().all_rows(name)[:, :-1]


class RowsTransposed(GainRows):  # (features, k) instead of (k, features)
    def all_rows(self, name):
        return super().all_rows(name).T


class RowsWrongK(GainBlock):  # one row short
    def rows(self, name, index):
        return super().rows(name, index)[:-1]


class RowsFlat(GainBlock):  # a 1-D tensor of the right size
    def rows(self, name, index):
        return super().rows(name, index).reshape(-1)


class BackShort(GainBlock):  # a back-projection one entry short
    def back(self, name, alpha):
        return super().back(name, alpha)[:-1]


class BackScalar(GainBlock):  # one number, which would broadcast
    def back(self, name, alpha):
        return super().back(name, alpha).sum()


class InitRaises(GainBlock):
    def __init__(self, module, args, kwargs, output):
        super().__init__(module, args, kwargs, output)
        raise RuntimeError("my block failed in __init__")


class OutputNotTensor(GainBlock):
    def __init__(self, module, args, kwargs, output):
        super().__init__(module, args, kwargs, output)
        self.output = (output,)


class BindRaises(GainBlock):
    def bind(self, deltas, n, heads):
        raise KeyError("my block failed in bind")


class GhostWrongShape(GainBlock):  # a Gram of (k,), which would broadcast
    ghost_form = True

    def ghost(self, name, v):
        g, r = super().ghost(name, v)
        return g.diagonal(), r


class GhostRaises(GainBlock):
    ghost_form = True

    def ghost(self, name, v):
        raise IndexError("my block failed in ghost")


class DoneRaises(GainBlock):
    def done(self):
        raise AttributeError("my block failed in done")


WRONG = [RowsShort, RowsTransposed, RowsWrongK, RowsFlat, BackShort, BackScalar, InitRaises, OutputNotTensor,
         BindRaises, GhostWrongShape, GhostRaises, DoneRaises]


@pytest.mark.parametrize("block", WRONG, ids=[b.__name__ for b in WRONG])
def test_a_raising_block_gives_the_reference_projection_and_warns_once(block_registry, block):
    register_block(Gain)(block)
    model, x = model_and_batch()
    v = flat(model)
    ref = reference(model, x, v)
    with pytest.warns(BlockFailedWarning) as got:
        out = project_model_onto_span(model, x, identity, v)
    assert relerr(out, ref) <= 1e-9
    assert P.last_route.path == "materialised", P.last_route
    (warned,) = [w for w in got if w.category is BlockFailedWarning]
    message = str(warned.message)
    assert f"block {block.__qualname__} of layer '1' (Gain)" in message, message
    assert "torch.func Jacobian" in message
    assert warned.filename == __file__  # (points at the caller of project_model_onto_span)
    assert block.__qualname__ in P.last_route.reason
    # the model keeps the vmapped Jacobian, without warning again (also for a batch of another size)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BlockFailedWarning)
        for xs in (x, x[:3]):
            assert relerr(project_model_onto_span(model, xs, identity, v), reference(model, xs, v)) <= 1e-9
            assert P.last_route.path == "materialised"


def test_the_error_is_named_in_the_warning(block_registry):
    register_block(Gain)(InitRaises)
    model, x = model_and_batch()
    with pytest.warns(BlockFailedWarning, match=r"raised RuntimeError: my block failed in __init__ at "
                                                r"test_blocks_user\.py:\d+"):
        project_model_onto_span(model, x, identity, flat(model))
    register_block(Gain)(BackShort)
    model, x = model_and_batch()
    with pytest.warns(BlockFailedWarning, match=r"parameter 'gain', raised ValueError: back\(\) returned \(3,\), "
                                                r"expected \(4,\)"):
        project_model_onto_span(model, x, identity, flat(model))


def test_explain_reports_a_raising_block(block_registry):
    register_block(Gain)(BackShort)
    model, x = model_and_batch()
    with pytest.warns(BlockFailedWarning):
        report = explain_projection(model, x, identity)
    assert report.path == "materialised" and "BackShort" in report.reason
    assert all(p.form == "torch.func" for p in report.parameters)


def _projected_quietly(block: type) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection with ``block`` registered for ``Gain`` (no ``BlockFailedWarning`` allowed), and the reference."""
    register_block(Gain)(block)
    model, x = model_and_batch()
    v = flat(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BlockFailedWarning)
        out = project_model_onto_span(model, x, identity, v)
    return out, reference(model, x, v)


@pytest.mark.parametrize("block", [GainRows, GainBlock])
def test_a_right_user_block_is_used(block_registry, block):
    out, expected = _projected_quietly(block)
    assert P.last_route.path == "hooked" and P.last_route.dense == 0, P.last_route
    assert relerr(out, expected) <= 1e-9


def test_a_right_ghost_form_is_used(block_registry):
    register_block(Gain)(type("GainGhost", (GainBlock,), {"ghost_form": True}))
    model, x = model_and_batch()
    v = flat(model)
    out = project_model_onto_span(model, x, identity, v)
    assert P.last_route.path == "hooked" and P.last_route.ghost >= 1, P.last_route
    assert relerr(out, reference(model, x, v)) <= 1e-9


class Declines(GainBlock):
    def __init__(self, module, args, kwargs, output):
        super().__init__(module, args, kwargs, output)
        raise Decline


def test_decline_is_not_an_error(block_registry):
    """A block that declines a call leaves its parameters to the fallback, without a warning."""
    out, expected = _projected_quietly(Declines)
    assert P.last_route.path == "hooked" and P.last_route.dense == 1, P.last_route
    assert relerr(out, expected) <= 1e-9


# ---------------------------------------------------------------- the model's own errors propagate

class Fails(Gain):
    """The user's layer itself fails: in the forward of a batch of ``fail_at`` samples, or in the backward."""

    fail_at = 5

    def forward(self, x):
        if x.shape[0] == self.fail_at:
            raise ArithmeticError("the model's own error")
        return _FailingBackward.apply(super().forward(x)) if self.fail_at == 0 else super().forward(x)


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise ArithmeticError("the model's own error")


@pytest.mark.parametrize("fail_at", [5, 1, 0], ids=["forward", "forward of one sample", "backward"])
def test_the_models_own_errors_propagate(block_registry, fail_at):
    register_block(Fails)(GainRows)
    model, x = model_and_batch(layer=type("Fails", (Fails,), {"fail_at": fail_at}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BlockFailedWarning)
        with pytest.raises(ArithmeticError, match="the model's own error"):
            project_model_onto_span(model, x, identity, flat(model))


# ---------------------------------------------------------------- registration mistakes

class MyNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("register, message", [
    (lambda: register_block(ScaleNormBlock)(MyNorm), r"Block class ScaleNormBlock as a layer type \(arguments swapped"),
    (lambda: register_block(MyNorm, ScaleNormBlock), r"Block class ScaleNormBlock as a layer type"),
    (lambda: register_block(MyNorm)(object), r"takes a Block subclass, got the class object"),
    (lambda: register_block(MyNorm)(ScaleNormBlock), None),
    (lambda: register_block(MyNorm)(nn.Linear), r"got the class Linear, a layer"),
    (lambda: register_block(MyNorm)(GainRows.__new__(GainRows)), r"got an instance of GainRows \(pass the class"),
    (lambda: register_block(MyNorm(3))(ScaleNormBlock), r"got an instance of MyNorm \(pass the class"),
    (lambda: register_block(object)(ScaleNormBlock), r"module classes \(nn.Module subclasses\).*got the class object"),
    (lambda: register_block("MyNorm")(ScaleNormBlock), r"a name must be dotted"),
    (lambda: register_block(f"{__name__}.MyNorm", "mylib.*Norm")(ScaleNormBlock), None),
], ids=["swapped", "no second call", "not a block", "right", "a layer as the block", "a block instance",
        "a layer instance", "not a module class", "undotted name", "names"])
def test_registration_mistakes_raise_type_error(block_registry, register, message):
    if message is None:
        register()
        assert registered_block(MyNorm(3)) is ScaleNormBlock
        return
    with pytest.raises(TypeError, match=message):
        register()
    assert registered_block(MyNorm(3)) is None  # (nothing registered)
