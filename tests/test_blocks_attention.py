"""The ``nn.MultiheadAttention`` block (``linalg/blocks/attention.py``), held to the vmapped Jacobian and
the float64 QR reference with the helpers of ``tests/test_blocks.py``.

Small random models around ``nn.MultiheadAttention``: self- and cross-attention, ``batch_first`` both
ways, ``kdim``/``vdim`` different (separate projection weights), key padding and attention masks
(boolean, float, 2-D, per-sample 3-D, ``is_causal``), ``need_weights`` both ways, ``bias_k``/``bias_v``
and ``add_zero_attn``, frozen projections, a module called twice, float32 and float64, and
``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder``. ``last_route`` must show every parameter
on the hooked path (``dense == 0``) where the block covers the call, and the declines must decline
(their parameters through ``torch.func``, the result still right).
"""

from __future__ import annotations

import pytest
import torch
from test_blocks import F64, check, flat, identity, relerr
from torch import nn

import overunlearn.linalg.projection as P
from overunlearn.linalg.blocks import Decline, block_for
from overunlearn.linalg.blocks.attention import MultiheadAttentionBlock
from overunlearn.linalg.blocks.embedding import EmbeddingBlock
from overunlearn.linalg.jacobian import output_jacobian
from overunlearn.linalg.projection import project_model_onto_span, project_onto_span


class Attn(nn.Module):
    """Linear -> MultiheadAttention -> Linear -> mean over tokens -> two scores.

    ``cross``: keys and values come from a second input (``kdim``/``vdim`` as given); ``kpm``: a
    per-sample boolean key padding mask from the input's signs (first key never masked); ``mask``:
    ``"float2d"`` (a fixed float mask), ``"bool3d"`` (a per-sample, per-head boolean mask from the
    input), ``"causal"`` (a causal mask with the ``is_causal`` hint; self-attention only).
    """

    def __init__(self, batch_first=True, cross=False, kdim=None, vdim=None, kpm=False, mask=None,
                 need_weights=False, heads=2, width=8, bias_kv=False, zero_attn=False, bias=True) -> None:
        super().__init__()
        self.batch_first, self.cross, self.kpm, self.mask, self.need_weights = batch_first, cross, kpm, mask, need_weights
        self.heads = heads
        self.inp = nn.Linear(3, width)
        if cross:
            self.kin = nn.Linear(4, kdim or width)
            self.vin = nn.Linear(4, vdim or width) if vdim != kdim else None
        self.att = nn.MultiheadAttention(width, heads, batch_first=batch_first, kdim=kdim, vdim=vdim,
                                         add_bias_kv=bias_kv, add_zero_attn=zero_attn, bias=bias)
        with torch.no_grad():  # non-zero biases (the module initialises them to zero)
            for name, p in self.att.named_parameters():
                if "bias" in name:
                    p.normal_(0, 0.3)
        self.out = nn.Linear(width, 2)

    def forward(self, x, y=None):
        h = torch.tanh(self.inp(x))  # (n, L, E)
        q = h
        if self.cross:
            k = torch.tanh(self.kin(y))
            v = torch.tanh(self.vin(y)) if self.vin is not None else k
        else:
            k = v = h
        t, s = q.shape[1], k.shape[1]
        kw = {}
        if self.kpm:
            pad = (y if self.cross else x)[:, :, 0] > 0.5
            pad[:, 0] = False
            kw["key_padding_mask"] = pad
        if self.mask == "float2d":
            kw["attn_mask"] = torch.linspace(-1, 1, t * s, dtype=x.dtype).reshape(t, s)
        elif self.mask == "bool3d":
            m = (x[:, :, 1:2] > x[:, None, :, 1]) if not self.cross else (x[:, :, 1:2] > y[:, None, :, 1])
            m[:, :, 0] = False
            kw["attn_mask"] = m.repeat_interleave(self.heads, 0)
        elif self.mask == "causal":
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(t, dtype=x.dtype)
            kw["is_causal"] = True
        if not self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        out, w = self.att(q, k, v, need_weights=self.need_weights, **kw)
        assert (w is not None) == self.need_weights
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.out(torch.tanh(out)).mean(1)


@pytest.fixture(params=[True, False], ids=["ghost", "rows"])
def ghost(request, monkeypatch):
    """Force every layer with a ghost form into it (or out of it), as in ``test_blocks.py``."""
    monkeypatch.setattr(P, "_conv_factored_cheaper", lambda *a: request.param)
    monkeypatch.setattr(EmbeddingBlock, "ghost_cheaper", lambda self, name, budget: request.param)
    return request.param


def _inputs(model: Attn, n=4, t=5, s=6, dtype=F64):
    x = torch.randn(n, t, 3, dtype=dtype)
    return (x, torch.randn(n, s, 4, dtype=dtype)) if model.cross else x


CASES = {
    "self_batch_first": dict(),
    "self_seq_first_weights": dict(batch_first=False, need_weights=True, kpm=True),
    "self_float_mask": dict(mask="float2d", need_weights=True),
    "self_causal": dict(mask="causal", heads=4),
    "cross_kdim_vdim": dict(cross=True, kdim=5, vdim=7, kpm=True, mask="bool3d"),
    "cross_seq_first_same_kv": dict(cross=True, batch_first=False, kdim=5, vdim=5, mask="float2d", need_weights=True),
    "cross_packed": dict(cross=True, kpm=True, heads=1),
    "bias_kv_zero_attn": dict(bias_kv=True, zero_attn=True, kpm=True, mask="bool3d"),
    "no_bias": dict(bias=False, batch_first=False, mask="causal"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_attention_equals_vmapped_jacobian_and_qr(name, ghost):
    torch.manual_seed(0)
    model = Attn(**CASES[name]).to(F64)
    check(model, _inputs(model))
    weights = sum(p.dim() == 2 for p in model.parameters())  # linear and projection weights
    assert P.last_route.ghost == (weights if ghost else 0), P.last_route


def test_float32_within_float32_tolerance():
    torch.manual_seed(1)
    model = Attn(cross=True, kdim=5, vdim=7, kpm=True, mask="bool3d")
    check(model, _inputs(model, dtype=torch.float32), tol=1e-4, qr=False)
    model = Attn(batch_first=False, need_weights=True, mask="causal")
    check(model, _inputs(model, dtype=torch.float32), tol=1e-4, qr=False)


def test_one_sample_and_one_position():
    torch.manual_seed(2)
    model = Attn(cross=True, kpm=False).to(F64)
    check(model, (torch.randn(1, 1, 3, dtype=F64), torch.randn(1, 3, 4, dtype=F64)), qr=False)
    model = Attn().to(F64)
    check(model, torch.randn(3, 1, 3, dtype=F64), qr=False)


@pytest.mark.parametrize("frozen", ["in_proj_weight", "in_proj", "all_own", "out_proj"])
def test_frozen_projections(frozen):
    torch.manual_seed(3)
    model = Attn(kpm=True).to(F64)
    att = model.att
    names = {"in_proj_weight": ["in_proj_weight"], "in_proj": ["in_proj_weight", "in_proj_bias"],
             "all_own": [n for n, _ in att.named_parameters(recurse=False)],
             "out_proj": ["out_proj.weight", "out_proj.bias"]}[frozen]
    for n in names:
        att.get_parameter(n).requires_grad_(False)
    check(model, _inputs(model))


class Twice(nn.Module):
    """One MultiheadAttention called twice (self-attention, then over the first call's output), and
    separate projection weights: its parameters sum the rows of both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        a = self.att(h, h, h, need_weights=False)[0]
        b = self.att(torch.tanh(a), h, h)[0]
        return self.out(b).mean(1)


def test_module_called_twice(ghost):
    torch.manual_seed(4)
    check(Twice().to(F64), torch.randn(4, 5, 3, dtype=F64))


class InPlace(Attn):
    """The attention output changed in place afterwards (a residual ``+=``, then an in-place tanh)."""

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        q = h if self.batch_first else h.transpose(0, 1)
        out = self.att(q, q, q, need_weights=False)[0]
        out += q
        out.tanh_()
        out = out if self.batch_first else out.transpose(0, 1)
        return self.out(out).mean(1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_output_changed_in_place(batch_first):
    torch.manual_seed(12)
    check(InPlace(batch_first=batch_first).to(F64), torch.randn(4, 5, 3, dtype=F64))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer(batch_first, norm_first):
    """The encoder layer calls its attention as a module with gradients on (its no-grad fast path, which
    bypasses the module, is only taken without them): every parameter on the blocks."""
    torch.manual_seed(5)

    class Enc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1, batch_first=batch_first,
                                                    norm_first=norm_first)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = self.inp(x)
            pad = x[:, :, 0] > 0.8
            pad[:, 0] = False
            h = h if batch_first else h.transpose(0, 1)
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
            y = self.layer(h, src_mask=mask, src_key_padding_mask=pad, is_causal=True)
            y = y if batch_first else y.transpose(0, 1)
            return self.out(y).mean(1)

    model = Enc().to(F64)
    model.train()  # dropout 0.1: the projection runs in eval mode
    # sequence-first, the feed-forward linear layers and the norms see (L, n, E) inputs: the engine
    # hands their blocks batch-major views, so they are on the blocks too
    check(model, torch.randn(4, 5, 3, dtype=F64), dense=0)
    assert model.training


def test_transformer_encoder_stack_float32():
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    model = nn.Sequential(nn.Linear(3, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.Flatten(), nn.Linear(16 * 6, 2))
    model.eval()
    check(model, torch.randn(5, 6, 3), tol=1e-4, qr=False)


# ---------------------------------------------------------------- declines and what the check catches

class WeightsUsed(Attn):
    """Scores that use the returned attention weights: the block does not follow them, so the check
    against autograd fails and the vmapped Jacobian is used (still the right projection)."""

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        out, w = self.att(h, h, h, need_weights=True)
        return self.out(out).mean(1) + w.sum((1, 2))[:, None] * w[:, 0, :2]


def test_attention_weights_in_the_scores_fail_the_check():
    torch.manual_seed(7)
    check(WeightsUsed().to(F64), torch.randn(4, 5, 3, dtype=F64), path="materialised")
    assert P.last_route.reason == "check failed"


class FloatPad(Attn):
    """A float32 key padding mask on a float64 model: the call promotes it, the block declines (a wide
    layer after it, so that the blocks still cover enough for the hooked path)."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(8, 40)
        self.out = nn.Linear(40, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        pad = torch.where(x[:, :, 0] > 0.5, -1.0, 0.0).float()
        a = self.att(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return self.out(torch.tanh(self.wide(a))).mean(1)


def test_unusual_mask_dtype_is_declined():
    torch.manual_seed(8)
    model = FloatPad().to(F64)
    try:
        check(model, torch.randn(4, 5, 3, dtype=F64), dense=4)  # in_proj weight+bias, out_proj weight+bias
    except RuntimeError:
        pytest.skip("this torch does not accept a float32 mask on a float64 call")


def test_declines_on_direct_construction():
    m = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True).double()
    x = torch.randn(3, 4, 8, dtype=F64)
    m.train()
    out = m(x, x, x)
    with pytest.raises(Decline):
        MultiheadAttentionBlock(m, (x, x, x), {}, out)  # dropout in training mode
    m.eval()
    MultiheadAttentionBlock(m, (x, x, x), {}, m(x, x, x))  # fine in eval mode
    u = x[0]
    with pytest.raises(Decline):
        MultiheadAttentionBlock(m, (u, u, u), {}, m(u, u, u))  # unbatched


def test_subclass_with_its_own_forward_is_not_accepted():
    class Mine(nn.MultiheadAttention):
        def forward(self, *a, **k):
            return super().forward(*a, **k)

    assert block_for(nn.MultiheadAttention(8, 2)) is MultiheadAttentionBlock
    assert block_for(Mine(8, 2)) is None

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.att = Mine(8, 2, batch_first=True)
            self.wide = nn.Linear(8, 40)
            self.out = nn.Linear(40, 2)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            return self.out(torch.tanh(self.wide(self.att(h, h, h)[0]))).mean(1)

    torch.manual_seed(9)
    check(Model().to(F64), torch.randn(4, 5, 3, dtype=F64), dense=4)  # out_proj never called: torch.func


def test_out_proj_called_elsewhere_fails_the_check():
    """``out_proj`` is claimed by the attention block and not hooked; a model that also calls it as a
    module has gradients the blocks do not see: the check catches it."""

    class Model(Attn):
        def forward(self, x):
            h = torch.tanh(self.inp(x))
            a = self.att(h, h, h, need_weights=False)[0]
            return self.out(torch.tanh(self.att.out_proj(a))).mean(1)

    torch.manual_seed(10)
    check(Model().to(F64), torch.randn(4, 5, 3, dtype=F64), path="materialised")


def test_projection_in_a_step_matches_for_random_vectors():
    """Random vectors (not the parameters themselves) project the same way on both paths."""
    torch.manual_seed(11)
    model = Attn(cross=True, kdim=5, vdim=7, kpm=True, mask="bool3d", bias_kv=True).to(F64)
    x = _inputs(model)
    jac = output_jacobian(model, x, identity)
    for _ in range(2):
        v = torch.randn_like(flat(model))
        got = project_model_onto_span(model, x, identity, v)
        assert P.last_route.path == "hooked" and P.last_route.dense == 0
        assert relerr(got, project_onto_span(jac, v)) <= 1e-9
