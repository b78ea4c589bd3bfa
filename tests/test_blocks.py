"""Per-layer blocks of the hooked projection (``linalg/blocks``), held to the vmapped Jacobian and to
the float64 QR reference.

Every block kind on small random models of its layer (ghost form and formed rows both forced), with
padding, tied weights, a module called twice, in-place operations and frozen parameters;
hypothesis-generated shapes for the sequence linear layer; a user-registered block (right: used;
wrong: caught by the check); layers that are declined still give the right projection; tiny
GPT-2 / Llama / BERT / ViT models built from configs and a LoRA adapter. ``last_route`` says which
path a call took, so each test also checks that the blocks, not the fallback, did the work.

Tolerances: float64 models <= 1e-9 relative (against the vmapped Jacobian's projection) and
<= 1e-8 (against QR, where the Jacobian has full row rank); float32 models <= 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Gain
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import overunlearn.linalg.projection as P
from overunlearn.linalg.blocks import RowsBlock, ScaleNormBlock, register_block
from overunlearn.linalg.blocks.conv import Conv2dBlock
from overunlearn.linalg.blocks.embedding import EmbeddingBlock
from overunlearn.linalg.blocks.positional import PositionalBlock
from overunlearn.linalg.jacobian import call_scores, output_jacobian, output_jacobian_reference
from overunlearn.linalg.projection import project_model_onto_span, project_onto_span, project_onto_span_qr
from overunlearn.problem import CausalLMTask, ClassificationTask

F64 = torch.float64


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def identity(out):
    return out if out.dim() == 2 else out.reshape(out.shape[0], -1)


def check(model, x, score=identity, targets=None, v=None, tol=1e-9, qr=True, dense=0, path="hooked"):
    """The hooked projection equals the vmapped one (and QR); returns the projection."""
    v = flat(model) if v is None else v
    got = project_model_onto_span(model, x, score, v, targets=targets)
    route = P.last_route
    jac = output_jacobian(model, x, score, targets=targets)
    ref = project_onto_span(jac, v)
    # two Gram (normal-equation) solves summed in different orders agree to about eps * cond(J)^2: random
    # tiny models can be ill-conditioned (a draw with cond(J) = 8e4 put them 1.6e-8 apart), so the tolerance
    # grows with cond(J) over the singular values the solve keeps (above 1e-6 of the largest)
    if jac.dtype == torch.float64 and jac.numel():
        sv = torch.linalg.svdvals(jac)
        kept = sv[sv > sv[0] * 1e-6] if float(sv[0]) > 0 else sv[:0]
        if kept.numel():
            tol = max(tol, 1e-15 * float(kept[0] / kept[-1]) ** 2)
    assert relerr(got, ref) <= tol, (relerr(got, ref), route)
    if qr:
        jr = output_jacobian_reference(model, x, score, targets=targets)
        sv = torch.linalg.svdvals(jr.double())
        if jr.shape[0] < jr.shape[1] and float(sv[-1] / sv[0]) > 1e-4:
            assert relerr(got, project_onto_span_qr(jr, v)) <= max(tol, 1e-8)
    assert route.path == path, route
    if path == "hooked":
        assert route.dense == dense, route
    assert float(got.norm()) > 1e-6 * float(v.norm())
    return got


@pytest.fixture(params=[True, False], ids=["ghost", "rows"])
def ghost(request, monkeypatch):
    """Force every layer with a ghost form into it (or out of it)."""
    monkeypatch.setattr(P, "_conv_factored_cheaper", lambda *a: request.param)
    monkeypatch.setattr(EmbeddingBlock, "ghost_cheaper", lambda self, name, budget: request.param)
    return request.param


# ---------------------------------------------------------------- one model per layer kind

class SeqLinear(nn.Module):
    """Linear layers on (n, T, in) and (n, T, S, in) inputs, bias and no bias, two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 4, bias=False)
        self.h1, self.h2 = nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))  # (n, T, S, 4)
        z = h.mean(dim=(1, 2))
        return self.h1(z), self.h2(z)


class Tokens(nn.Module):
    """Embedding (with a padding index) -> LayerNorm -> sequence Linear -> RMSNorm -> pooled head."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width, padding_idx=0)
        self.ln = nn.LayerNorm(width)
        self.lin = nn.Linear(width, width)
        self.rms = nn.RMSNorm(width)
        self.head = nn.Linear(width, 3)

    def forward(self, ids):
        h = torch.tanh(self.lin(self.ln(self.emb(ids))))
        return self.head(self.rms(h).mean(1))


class Convs1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.c2 = nn.Conv1d(4, 3, 2, stride=2, dilation=2, bias=False)
        self.bn = nn.BatchNorm1d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = self.bn(self.c2(torch.tanh(self.c1(x))))
        return self.head(torch.tanh(h).mean(-1))


class Norms2d(nn.Module):
    """LayerNorm over two trailing dimensions, LayerNorm without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.ln2 = nn.LayerNorm((3, 4))
        self.ln = nn.LayerNorm(4, bias=False)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # (n, 3, 4)
        return self.head(self.ln(torch.tanh(self.ln2(self.lin(x)))).sum(1))


def _gpt2_conv1d_model():
    from transformers.pytorch_utils import Conv1D

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs
            self.head = Conv1D(2, 6)

        def forward(self, x):
            return self.head(torch.tanh(self.c(x))).sum(1)

    return M()


def _randomise_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()


CASES = {
    "linear_3d_4d": (SeqLinear, lambda: torch.randn(4, 3, 2, 5, dtype=F64)),
    "embedding_norms": (Tokens, lambda: torch.randint(0, 11, (5, 7))),
    "conv1d_batchnorm": (Convs1d, lambda: torch.randn(4, 2, 9, dtype=F64)),
    "layernorm_2d": (Norms2d, lambda: torch.randn(5, 3, 4, dtype=F64)),
    "gpt2_conv1d": (_gpt2_conv1d_model, lambda: torch.randn(4, 3, 4, dtype=F64)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_block_equals_vmapped_jacobian_and_qr(name, ghost):
    torch.manual_seed(0)
    make, inputs = CASES[name]
    model = make().to(F64)
    _randomise_bn(model)
    model.train()  # the projection runs in eval mode and restores the flags
    score = (lambda out: torch.cat([identity(o) for o in out], 1)) if name == "linear_3d_4d" else identity
    check(model, inputs(), score)
    assert model.training


def test_float32_model_within_float32_tolerance():
    torch.manual_seed(1)
    model = Tokens()
    x = torch.randint(0, 11, (6, 8))
    check(model, x, tol=1e-4, qr=False)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 5), t=st.integers(1, 6), i=st.integers(1, 5), o=st.integers(1, 5), heads=st.integers(1, 3),
       bias=st.booleans(), ghost=st.booleans(), seed=st.integers(0, 2**16))
def test_sequence_linear_random_shapes(n, t, i, o, heads, bias, ghost, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(i, o, bias=bias), nn.Tanh(), nn.Flatten(), nn.Linear(t * o, heads)).to(F64)
    x = torch.randn(n, t, i, dtype=F64)
    saved = P._conv_factored_cheaper
    P._conv_factored_cheaper = lambda *a: ghost
    try:  # (check's tolerance grows with the conditioning of these random tiny models)
        check(model, x, tol=1e-8, qr=False)
    finally:
        P._conv_factored_cheaper = saved


@settings(max_examples=10, deadline=None)
@given(vocab=st.integers(2, 9), t=st.integers(1, 5), n=st.integers(1, 4), pad=st.booleans(), heads=st.integers(1, 2),
       ghost=st.booleans(), seed=st.integers(0, 2**16))
def test_embedding_random_shapes(vocab, t, n, pad, heads, ghost, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(vocab, 3, padding_idx=0 if pad else None), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * t, heads)).to(F64)
    ids = torch.randint(0, vocab, (n, t))
    saved = EmbeddingBlock.ghost_cheaper
    EmbeddingBlock.ghost_cheaper = lambda self, name, budget: ghost
    try:
        check(model, ids, qr=False)
    finally:
        EmbeddingBlock.ghost_cheaper = saved


@settings(max_examples=10, deadline=None)
@given(kernel=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       length=st.integers(5, 8), bias=st.booleans(), ghost=st.booleans(), seed=st.integers(0, 2**16))
def test_conv1d_random_shapes(kernel, stride, padding, dilation, length, bias, ghost, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv1d(2, 3, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias),
                          nn.Tanh(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(3, 2)).to(F64)
    x = torch.randn(3, 2, length, dtype=F64)
    saved = P._conv_factored_cheaper
    P._conv_factored_cheaper = lambda *a: ghost
    try:
        check(model, x, qr=False)
    finally:
        P._conv_factored_cheaper = saved


# ---------------------------------------------------------------- padding, tying, reuse, in-place

def _tiny_gpt2(vocab: int = 23, dtype=F64):
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=vocab, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


def test_padding_does_not_change_the_projection():
    """Right padding (attention mask 0, labels -100) adds positions whose output gradients are zero:
    the projection is that of the unpadded batch."""
    model = _tiny_gpt2()
    torch.manual_seed(3)
    ids = torch.randint(1, 23, (4, 9))
    labels = ids.clone()
    labels[:, :2] = -100
    task = CausalLMTask()
    short = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pad = 5
    long = {"input_ids": torch.cat([ids, torch.zeros(4, pad, dtype=ids.dtype)], 1),
            "attention_mask": torch.cat([torch.ones_like(ids), torch.zeros(4, pad, dtype=ids.dtype)], 1)}
    long_labels = torch.cat([labels, torch.full((4, pad), -100)], 1)
    v = flat(model)
    a = project_model_onto_span(model, short, task.scores, v, targets=labels)
    assert P.last_route.path == "hooked" and P.last_route.dense == 0
    b = project_model_onto_span(model, long, task.scores, v, targets=long_labels)
    assert P.last_route.path == "hooked" and P.last_route.dense == 0
    assert relerr(b, a) <= 1e-10


class TiedLM(nn.Module):
    """An embedding whose weight is also the output layer's (as GPT-2's), a layer called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 13, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.mix(torch.tanh(self.mix(self.emb(ids)))))  # mix called twice
        return self.out(h).logsumexp(-1)  # (n, T): one score per position


def test_tied_weights_and_a_module_called_twice_sum_their_rows(ghost):
    torch.manual_seed(4)
    model = TiedLM().to(F64)
    ids = torch.randint(0, 13, (3, 4))
    check(model, ids)


class InPlace(nn.Module):
    """In-place operations on the input and on layers' outputs (a layer's output gradient is then taken
    before the in-place operation, by a tensor hook)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x):
        x.mul_(2.0)
        h = self.a(x).relu_()
        g = self.b(h)
        g.add_(1.0).mul_(0.5)
        return self.c(torch.tanh(g))


def test_in_place_operations():
    torch.manual_seed(5)
    model = InPlace().to(F64)
    x = torch.randn(2, 3, 4, dtype=F64)
    before = x.clone()
    check(model, x)
    assert torch.equal(x, before)


# ---------------------------------------------------------------- sequence-first layers

class SeqFirst(nn.Module):
    """Token ids (n, L) run sequence-first inside: Embedding, LayerNorm, Linear (in-place ReLU on its
    output), RMSNorm, Linear without bias on (L, n, E) and (L, n, S, E), then batch-major again."""

    def __init__(self, vocab: int = 13, width: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width, padding_idx=0)
        self.ln = nn.LayerNorm(width)
        self.a = nn.Linear(width, width)
        self.rms = nn.RMSNorm(width)
        self.b = nn.Linear(width, 4, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        h = self.ln(self.emb(ids.transpose(0, 1)))  # (L, n, E)
        h = torch.tanh(self.a(h))
        h = torch.stack([h, h.roll(1, -1) + 0.5], 2)  # (L, n, 2, E)
        h = self.b(self.rms(h))  # (L, n, 2, 4)
        return self.head(h.mean(dim=(0, 2)))


@pytest.mark.parametrize("length", [5, 2])
def test_sequence_first_layers_take_the_blocks(length, ghost):
    """A layer acting per position on a (L, n, ...) input is given to its block batch-major: every
    parameter on the blocks, the projection equal to the vmapped Jacobian's and QR's."""
    torch.manual_seed(7)
    model = SeqFirst().to(F64)
    ids = torch.randint(0, 13, (4, length))
    out = model(ids)
    assert (out - out[:1]).abs().max() > 1e-3  # the samples' scores differ (a model worth testing)
    check(model, ids)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(2, 5), length=st.integers(2, 6), heads=st.integers(1, 2), seed=st.integers(0, 99))
def test_sequence_first_linear_random_shapes(n, length, heads, seed):
    torch.manual_seed(seed)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.ln, self.head = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, heads)

        def forward(self, x):  # (n, L, 3) -> (L, n, 3) inside
            return self.head(torch.tanh(self.ln(self.lin(x.transpose(0, 1)))).sum(0))

    model = M().to(F64)
    check(model, torch.randn(n, length, 3, dtype=F64), qr=False)  # on the blocks (L = n: by the probe)


@pytest.mark.parametrize("case", ["length_equals_batch", "one_token", "output_in_place"])
def test_sequence_first_ambiguous_or_mixing_stays_right(case):
    """Shapes that read both ways (L = n: settled by a forward of one sample; L = 1: read as a row shared
    by the samples, which the check catches) and a sequence-first output changed in place: the
    projection is still right."""
    torch.manual_seed(8)
    n = 4
    if case == "output_in_place":
        class M(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)

            def forward(self, x):
                h = self.a(x.transpose(0, 1))
                h.mul_(2.0)
                return self.b(torch.tanh(h)).mean(0)

        model, x = M().to(F64), torch.randn(n, 3, 3, dtype=F64)
    else:
        length = {"length_equals_batch": n, "one_token": 1}[case]
        model = SeqFirst().to(F64)
        x = torch.randint(1, 13, (n, length))
    v = flat(model)
    got = project_model_onto_span(model, x, identity, v)
    route = P.last_route
    ref = project_onto_span(output_jacobian(model, x, identity), v)
    assert relerr(got, ref) <= 1e-9, route
    if case == "output_in_place":
        assert route.path == "hooked" and route.dense == 2, route  # that layer's two parameters: torch.func
    elif case == "length_equals_batch":
        assert route.path == "hooked" and route.dense == 0, route  # settled by the one-sample probe
    else:
        assert route.reason == "check failed", route  # (1, n, E) reads as a shared row: caught by the check


def _same_projection(model, x) -> P.Route:
    v = flat(model)
    got = project_model_onto_span(model, x, identity, v)
    route = P.last_route
    assert relerr(got, project_onto_span(output_jacobian(model, x, identity), v)) <= 1e-9, route
    return route


class Trimmed(nn.Module):
    """Padding trimmed to the batch's longest sequence inside the model, then sequence-first layers:
    the length ``L`` depends on the data, so the same input signature meets ``L != n`` and ``L = n``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin, self.head = nn.Embedding(13, 6, padding_idx=0), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, ids):
        ids = ids[:, : int((ids != 0).sum(1).max())]
        h = torch.tanh(self.lin(self.emb(ids.t())))  # (L, n, E)
        return self.head((h * (ids != 0).t()[..., None].to(h.dtype)).sum(0))


class KeywordCall(nn.Module):
    """A sequence-first layer called with a keyword input."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = self.b(input=torch.tanh(self.a(x.transpose(0, 1))))
        return self.head(torch.tanh(h).sum(0))


class Branch(nn.Module):
    """A layer called batch-major when a separator token occurs in the batch, else sequence-first:
    the one-sample forward (no separator) says sequence-first, which is wrong for batches with one."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin, self.head = nn.Embedding(13, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, ids):
        e = self.emb(ids)
        if bool((ids == 1).any()):
            return self.head(torch.tanh(self.lin(e)).sum(1))
        return self.head(torch.tanh(self.lin(e.transpose(0, 1))).sum(0))


class SharedRowThenNoGrad(nn.Module):
    """A layer called on a row shared by all samples, then sequence-first outside the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.table, self.lin, self.head = nn.Parameter(torch.randn(4, 3)), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = x + self.lin(self.table[None])
        with torch.no_grad():
            g = self.lin(h.transpose(0, 1))
        return self.head(torch.tanh(h) * torch.sigmoid(g.transpose(0, 1))).sum(1)


def _ids(lengths: list[int], width: int = 8) -> torch.Tensor:
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 13, (n,))
    return ids


class Flattened(nn.Module):
    """A feed-forward block on the positions of all samples flattened, ``(n L, E)``, as OPT's decoder
    layers call it; ``position_major`` flattens ``(L, n, E)`` instead (which reads wrongly as
    sample-major, and the check must catch it)."""

    def __init__(self, position_major: bool = False) -> None:
        super().__init__()
        self.position_major = position_major
        self.a, self.norm, self.fc, self.head = nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x):  # (n, L, 3)
        h = torch.tanh(self.a(x))
        n, length, e = h.shape
        flat = (h.transpose(0, 1) if self.position_major else h).reshape(-1, e)
        flat = torch.tanh(self.fc(self.norm(flat)))
        h = flat.view(length, n, e).transpose(0, 1) if self.position_major else flat.view(n, length, e)
        return self.head(h).mean(1)


@pytest.mark.parametrize("length", [1, 4])
def test_flattened_positions_take_the_blocks(length, ghost):
    torch.manual_seed(5)
    model = Flattened().to(F64)
    check(model, torch.randn(3, length, 3, dtype=F64))


@settings(max_examples=12, deadline=None)
@given(n=st.integers(2, 5), length=st.integers(1, 6), width=st.integers(3, 5), heads=st.integers(1, 2),
       bias=st.booleans(), seed=st.integers(0, 99))
def test_flattened_positions_random_shapes(n, length, width, heads, bias, seed):
    """(n L, E) calls of Linear and LayerNorm, with L = n or L = 1 among the shapes: the blocks' projection
    equals the vmapped one, every parameter on a block. (A LayerNorm over 2 features outputs +-1: nearly
    constant, too ill-conditioned a Jacobian for the tolerance.)"""
    torch.manual_seed(seed)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.norm = nn.Linear(3, width, bias=bias), nn.LayerNorm(width)
            self.fc, self.head = nn.Linear(width, width, bias=bias), nn.Linear(width, heads)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            flat = torch.tanh(self.fc(self.norm(h.reshape(-1, h.shape[-1]))))
            return self.head(flat.view(h.shape)).mean(1)

    model = M().to(F64)
    check(model, torch.randn(n, length, 3, dtype=F64), qr=False)


def test_position_major_flattening_is_caught():
    """Read as sample-major, the flattened calls fail the check: they are then not read so (their
    parameters take the torch.func Jacobian), and the rest of the model keeps its blocks."""
    torch.manual_seed(5)
    model = Flattened(position_major=True).to(F64)
    x = torch.randn(3, 4, 3, dtype=F64)
    check(model, x, dense=4)  # fc and norm, weight and bias
    check(model, x, dense=4)  # (remembered)


def test_sequence_first_memo_rechecks_a_batch_read_differently():
    """The check's memo is per input signature *and* per reading of the calls: batches of one
    signature that read differently (L = n after trimming; a smaller last batch; a data-dependent
    extra call) are checked again, or declined, never reused unchecked."""
    torch.manual_seed(0)
    model = Trimmed().to(F64)
    _same_projection(model, _ids([1, 6, 3, 2]))  # L = 6, n = 4; the probe's sample has one token
    _same_projection(model, _ids([2, 4, 3, 1]))  # L = 4 = n: the probe cannot say; declined
    _same_projection(model, _ids([5, 6, 3, 2]))
    model = KeywordCall().to(F64)
    assert _same_projection(model, torch.randn(5, 4, 3, dtype=F64)).dense == 0  # keyword input swapped too
    assert _same_projection(model, torch.randn(4, 4, 3, dtype=F64)).dense == 0  # last batch: L = n
    model = Branch().to(F64)
    assert _same_projection(model, torch.randint(2, 13, (5, 4))).dense == 0  # sequence-first, L != n
    xb = torch.randint(2, 13, (4, 4))
    xb[2, 1] = 1  # batch-major now, at L = n, where the probe says sequence-first: checked again, caught
    assert _same_projection(model, xb).reason == "check failed"
    _same_projection(SharedRowThenNoGrad().to(F64), torch.randn(3, 4, 3, dtype=F64))


def test_gpt2_conv1d_and_llama_norm_sequence_first(block_registry):
    from transformers.pytorch_utils import Conv1D

    from overunlearn.linalg.blocks import ScaleNormBlock

    class MyRMSNorm(nn.Module):  # Llama-style: weight * x / rms(x)
        def __init__(self, width: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(width))

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.norm, self.head = Conv1D(6, 4), MyRMSNorm(6), Conv1D(2, 6)

        def forward(self, x):  # (n, L, 4) -> (L, n, 4) inside
            return self.head(self.norm(torch.tanh(self.c(x.transpose(0, 1).contiguous())))).sum(0)

    register_block(MyRMSNorm)(ScaleNormBlock)
    torch.manual_seed(9)
    model = M().to(F64)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    for n, length in [(4, 3), (3, 3)]:
        route = _same_projection(model, torch.randn(n, length, 4, dtype=F64))
        assert route.path == "hooked" and route.dense == 0, route


def test_frozen_parameters_are_not_part_of_the_jacobian():
    torch.manual_seed(6)
    model = Tokens().to(F64)
    for p in [model.emb.weight, model.lin.bias, model.rms.weight]:
        p.requires_grad_(False)
    x = torch.randint(0, 11, (4, 5))
    got = check(model, x)
    assert got.numel() == flat(model).numel()


def test_peft_lora_adapters_take_the_blocks():
    peft = pytest.importorskip("peft")
    torch.manual_seed(7)
    base = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(F64)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "2"], lora_dropout=0.1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # lora_B starts at zero, which would make lora_A's rows zero
    x = torch.randn(5, 3, 4, dtype=F64)
    model.train()
    check(model, x, tol=1e-7)  # (rank-deficient LoRA rows: the two Gram solves differ at ~1e-8)


# ---------------------------------------------------------------- registration and declines

class GainBlock(RowsBlock):
    param_names = ("gain",)
    factor = 1.0

    def __init__(self, module, args, kwargs, output):
        super().__init__(module, args, kwargs, output)
        self.x = args[0].detach()
        self.output, self.batch, self.saved = output, args[0].shape[0], [args[0]]

    def all_rows(self, name):
        d = self.deltas * self.per_row(torch.tanh(self.x)) * self.factor
        return d.reshape(self.k, -1, d.shape[-1]).sum(1)


class WrongGainBlock(GainBlock):
    factor = 1.5


class WrongRowsGainBlock(GainBlock):
    """Its ``J^T c`` is right, so the check against autograd passes; its rows (hence its Gram) are not: the
    engine's check of the Gram against that ``J^T c`` catches it."""

    def rows(self, name, index):
        return 1.5 * super().rows(name, index)


@pytest.mark.parametrize("block, path", [(GainBlock, "hooked"), (WrongGainBlock, "materialised"),
                                         (WrongRowsGainBlock, "materialised")])
def test_user_registered_block_is_used_and_checked(block_registry, block, path):
    register_block(Gain)(block)
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), Gain(4), nn.Linear(4, 2)).to(F64)
    x = torch.randn(5, 2, 3, dtype=F64)
    check(model, x, path=path)
    if path == "hooked":
        assert P.last_route.dense == 0


def test_explain_first_does_not_skip_the_gram_check(block_registry):
    """explain_projection runs the check against autograd but forms no Gram: a block with wrong rows must
    still be caught by the first projection after it."""
    from overunlearn.linalg import explain_projection

    register_block(Gain)(WrongRowsGainBlock)
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), Gain(4), nn.Linear(4, 2)).to(F64)
    x = torch.randn(5, 2, 3, dtype=F64)
    explain_projection(model, x, identity)
    check(model, x, path="materialised")


@pytest.mark.parametrize("seed", range(3))
def test_float16_models_keep_the_hooked_path(seed):
    """Rows and back-projection round independently in float16: the Gram check's tolerance follows the dtype."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 4)).half()
    x = torch.randn(32, 64).half()
    project_model_onto_span(model, x, identity, flat(model))
    assert P.last_route.path == "hooked", P.last_route


class MyGain(Gain):
    pass


AliasGain = MyGain  # (the same class under another name, as a package re-exporting it)


def test_blocks_registered_by_name_pattern(block_registry):
    """A ``*`` pattern matches the module's class (or an ancestor) by its dotted name; a later registration
    wins, and a class registered by type comes before a pattern."""
    from overunlearn.linalg.blocks.base import registered_block

    assert registered_block(MyGain(3)) is None
    register_block("*.*Gain")(WrongGainBlock)
    assert registered_block(MyGain(3)) is WrongGainBlock and registered_block(Gain(3)) is WrongGainBlock
    register_block(f"{__name__}.My*")(GainBlock)  # later, and matches MyGain itself
    assert registered_block(MyGain(3)) is GainBlock and registered_block(Gain(3)) is WrongGainBlock
    register_block(Gain)(GainBlock)
    assert registered_block(Gain(3)) is GainBlock
    register_block("*.*Gain")(WrongGainBlock)  # registered again: now the latest pattern
    assert registered_block(MyGain(3)) is WrongGainBlock
    register_block(f"{__name__}.MyGain")(WrongGainBlock)  # by name, then by type: the type wins
    register_block(MyGain)(GainBlock)
    assert registered_block(MyGain(3)) is GainBlock
    register_block(f"{__name__}.AliasGain")(WrongGainBlock)  # by a re-exported name, then by type
    register_block(MyGain)(GainBlock)
    assert registered_block(MyGain(3)) is GainBlock
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), MyGain(4), nn.Linear(4, 2)).to(F64)
    check(model, torch.randn(5, 3, dtype=F64))


class GatedRMSNorm(nn.Module):
    """weight * norm(x * silu(gate)): a second tensor argument, which ScaleNormBlock declines."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x, gate):
        h = x * torch.nn.functional.silu(gate)
        return self.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(3, 4), GatedRMSNorm(4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(self.norm(h, torch.tanh(h)))


def test_scale_norm_declines_calls_with_more_tensor_arguments(block_registry):
    register_block(GatedRMSNorm)(ScaleNormBlock)
    torch.manual_seed(8)
    check(Gated().to(F64), torch.randn(5, 3, dtype=F64), dense=1)


class MaskPositions(nn.Embedding):
    """An embedding with its own forward that computes the ids it looks up (positions from a mask,
    as OPT's); ``scale`` multiplies the result, which is then no plain lookup."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(8, 5)
        self.scale = scale

    def forward(self, mask):
        return super().forward(torch.cumsum(mask, 1) * mask) * self.scale


class WithPositions(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(11, 5), MaskPositions(scale), nn.Linear(5, 2)

    def forward(self, ids, mask):
        return self.head(torch.tanh(self.tok(ids) + self.pos(mask))).mean(1)


@pytest.mark.parametrize("scale, dense", [(1.0, 0), (2.0, 1)])
def test_embedding_computing_its_ids(scale, dense, ghost):
    torch.manual_seed(6)
    model = WithPositions(scale).to(F64)
    ids = torch.randint(1, 11, (4, 5))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    check(model, (ids, mask), dense=dense)


class NoPadding(nn.Embedding):
    """A forward of its own that ignores ``padding_idx`` (row 0 gets gradients)."""

    def forward(self, ids):
        return torch.nn.functional.embedding(ids, self.weight)


class SharedTable(nn.Embedding):
    """Positions from the input's shape: one ``(L, E)`` table for every sample (Blenderbot's)."""

    def forward(self, ids):
        return super().forward(torch.arange(ids.shape[1]))


class WithChild(nn.Embedding):
    """Extra ids looked up in a child embedding (Idefics' decoupled embedding)."""

    def __init__(self) -> None:
        super().__init__(10, 4)
        self.extra = nn.Embedding(3, 4)

    def forward(self, ids):
        base = torch.nn.functional.embedding(ids.clamp(max=9), self.weight)
        return torch.where((ids >= 10)[..., None], self.extra((ids - 10).clamp(min=0)), base)


class OneIdPerSample(nn.Embedding):
    """One id per sample, computed from its ``(n,)`` input (a class embedding): ``(n, E)`` out."""

    def forward(self, labels):
        return super().forward(labels.remainder(self.num_embeddings))


def test_embedding_computing_one_id_per_sample():
    torch.manual_seed(6)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cls, self.lin, self.head = OneIdPerSample(4, 3), nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.lin(self.cls(x))))

    model = M().to(F64)
    for n in (3, 4):  # (4 = the table's size: still read per sample)
        check(model, torch.tensor([0, 5, 2, 7][:n]), dense=0)


@pytest.mark.parametrize("kind", ["padding", "shared_table", "child"])
def test_embeddings_whose_ids_cannot_be_read_are_declined(kind):
    """Embedding subclasses the replay must not read: their weight takes the torch.func Jacobian, the rest
    keeps its blocks, for batches with and without the padding id and with L equal to n."""
    torch.manual_seed(6)
    emb = {"padding": lambda: NoPadding(10, 4, padding_idx=0), "shared_table": lambda: SharedTable(10, 4),
           "child": WithChild}[kind]()

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.emb, self.lin, self.head = nn.Embedding(13, 4), emb, nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, ids):
            return self.head(torch.tanh(self.lin(self.tok(ids) + self.emb(ids)))).mean(1)

    model = M().to(F64)
    for ids in (torch.randint(1, 10, (4, 5)), torch.randint(0, 13 if kind == "child" else 10, (5, 5))):
        check(model, ids, dense=1)  # (the child embedding is on its own block)


class CircularConv(nn.Conv2d):
    """A user convolution with its own ``forward``: circular padding done by hand, then a plain conv."""

    def forward(self, x):
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="circular"),
                                          self.weight, self.bias)


class CircularConvBlock(Conv2dBlock):
    """A user block that sets its patches (and the rows' sample index) itself, as the base class's
    docstring says a block may: the engine must use them, not recompute the stock unfolding."""

    @classmethod
    def accepts(cls, module):
        return isinstance(module, CircularConv)

    def __init__(self, module, args, kwargs, output):
        super().__init__(module, args, kwargs, output)
        x = torch.nn.functional.pad(args[0].detach(), (1, 1, 1, 1), mode="circular")
        self.a = torch.nn.functional.unfold(x, module.kernel_size).transpose(1, 2)

    def bind(self, deltas, n, heads):
        PositionalBlock.bind(self, deltas, n, heads)  # (the stock block's position count is for zero padding)
        self.idx = torch.arange(self.k) % n


def test_user_block_setting_its_patches_and_row_index(block_registry, ghost):
    register_block(CircularConv)(CircularConvBlock)
    torch.manual_seed(8)
    model = nn.Sequential(CircularConv(2, 3, 3, padding=0), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 25, 2)).to(F64)
    x = torch.randn(4, 2, 5, 5, dtype=F64)
    check(model, x)
    assert P.last_route.dense == 0


def test_unregistered_layer_goes_through_torch_func():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), Gain(4), nn.Linear(4, 2)).to(F64)
    check(model, torch.randn(5, 3, dtype=F64), dense=1)


class MHA(nn.Module):
    """nn.MultiheadAttention computes its projections with raw parameters, not as module calls: its block
    (``blocks/attention.py``, more cases in ``tests/test_blocks_attention.py``) covers them and its
    ``out_proj``'s, like the layers around it."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.wide = nn.Linear(8, 40)
        self.head = nn.Linear(40, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.head(torch.tanh(self.wide(self.att(h, h, h, need_weights=False)[0])).mean(1))


def test_multihead_attention_takes_its_block():
    torch.manual_seed(9)
    model = MHA().to(F64)
    check(model, torch.randn(4, 5, 3, dtype=F64), dense=0)  # in_proj and out_proj weight+bias on the block


class OneProto(nn.Module):
    """A layer applied to one learned row, used in a way that depends on its batch dimension: the
    broadcast copy the engine hands the model changes the scores' shape, which the check catches."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(4, 6)
        self.proto = nn.Parameter(torch.randn(1, 3))
        self.proj = nn.Linear(3, 6)

    def forward(self, x):
        return torch.tanh(self.f(x)) @ self.proj(self.proto).T  # (n, 1)


def test_shared_row_used_by_shape_is_caught():
    torch.manual_seed(12)
    model = OneProto().to(F64)
    check(model, torch.randn(5, 4, dtype=F64), path="materialised")


def test_non_finite_scores_raise():
    model = nn.Sequential(nn.Linear(3, 2)).to(F64)
    x = torch.randn(4, 3, dtype=F64)
    x[1, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        project_model_onto_span(model, x, identity, flat(model))


# ---------------------------------------------------------------- Hugging Face models from configs

def _hf(kind: str):
    import transformers as T

    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, attn_implementation="eager")
    if kind == "gpt2":
        return _tiny_gpt2(), "lm"
    if kind == "llama":
        cfg = T.LlamaConfig(hidden_size=16, num_key_value_heads=1, vocab_size=23, max_position_embeddings=32,
                            bos_token_id=0, eos_token_id=0, **common)
        return T.LlamaForCausalLM(cfg).to(F64), "lm"
    if kind in ("gemma", "qwen3"):
        # Gemma: (1 + weight) * norm(x) and an embedding times a constant; Qwen3: norms of the queries and keys
        make = {"gemma": (T.GemmaConfig, T.GemmaForCausalLM), "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM)}[kind]
        cfg = make[0](hidden_size=16, num_key_value_heads=1, head_dim=8, vocab_size=23, max_position_embeddings=32,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, **common)
        model = make[1](cfg).to(F64)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(-0.5, 0.5)  # (Gemma's start at zero)
        return model, "lm"
    if kind == "cohere":  # CohereLayerNorm (weight only), on (heads, head_dim) for the query and key norms
        cfg = T.CohereConfig(hidden_size=16, num_key_value_heads=1, vocab_size=23, max_position_embeddings=32,
                             use_qk_norm=True, bos_token_id=0, eos_token_id=0, pad_token_id=0, **common)
        model = T.CohereForCausalLM(cfg).to(F64)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
        return model, "lm"
    if kind == "opt":  # feed-forward layers on (n L, E); learned positions computed from the attention mask
        cfg = T.OPTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32, vocab_size=23,
                          max_position_embeddings=32, word_embed_proj_dim=16, attn_implementation="eager",
                          pad_token_id=0, bos_token_id=0, eos_token_id=0)
        return T.OPTForCausalLM(cfg).to(F64), "lm"
    if kind == "falcon":  # FalconLinear: a Linear with its own forward
        cfg = T.FalconConfig(hidden_size=16, vocab_size=23, bos_token_id=0, eos_token_id=0, **common)
        return T.FalconForCausalLM(cfg).to(F64), "lm"
    if kind == "bert":
        cfg = T.BertConfig(hidden_size=16, vocab_size=23, max_position_embeddings=32, num_labels=3, **common)
        return T.BertForSequenceClassification(cfg).to(F64), "cls"
    cfg = T.ViTConfig(hidden_size=16, image_size=8, patch_size=4, num_channels=3, num_labels=3, **common)
    return T.ViTForImageClassification(cfg).to(F64), "image"


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma", "qwen3", "cohere", "falcon", "opt", "bert", "vit"])
def test_tiny_transformers_equal_the_reference(kind):
    pytest.importorskip("transformers")
    model, what = _hf(kind)
    torch.manual_seed(10)
    if what == "image":
        x, targets, score = torch.randn(4, 3, 8, 8, dtype=F64), None, ClassificationTask().scores
    else:
        ids = torch.randint(1, 23, (4, 6))
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0  # a padded example
        x = {"input_ids": ids, "attention_mask": mask}
        if what == "lm":
            targets = ids.masked_fill(mask == 0, -100)
            targets[:, :2] = -100
            score = CausalLMTask().scores
        else:
            targets, score = None, ClassificationTask().scores
    # (Gemma's and Cohere's norms compute in float32 even in a float64 model: their gradients carry float32 rounding)
    check(model, x, score, targets=targets, tol=1e-6 if kind in ("gemma", "cohere") else 1e-9)


def test_tiny_gpt2_in_float32():
    pytest.importorskip("transformers")
    model = _tiny_gpt2(dtype=torch.float32)
    ids = torch.randint(1, 23, (5, 7))
    labels = ids.clone()
    labels[:, 0] = -100
    check(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, CausalLMTask().scores, targets=labels,
          tol=1e-4, qr=False)


def test_scores_of_the_hooked_forward_are_those_of_the_model():
    """The broadcast copy of a shared row (GPT-2's position embeddings) changes no score."""
    pytest.importorskip("transformers")
    model = _tiny_gpt2()
    ids = torch.randint(1, 23, (3, 5))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = ids.clone()
    with torch.no_grad():
        plain = call_scores(CausalLMTask().scores, model(**x), labels)
    project_model_onto_span(model, x, CausalLMTask().scores, flat(model), targets=labels)
    with torch.no_grad():
        again = call_scores(CausalLMTask().scores, model(**x), labels)
    assert torch.equal(plain, again)


@pytest.mark.parametrize("name", list(CASES) + ["tied"])
def test_rows_kept_for_the_back_projection(name, monkeypatch):
    """Formed rows kept for ``J^T alpha`` (forced for every parameter) give the same projection."""
    monkeypatch.setattr(P, "_KEEP_FACTOR", -1)
    monkeypatch.setattr(P, "_SMALL_BYTES", -1)  # (no parameter gathered with the small ones)
    monkeypatch.setattr(P, "_conv_factored_cheaper", lambda *a: False)
    monkeypatch.setattr(EmbeddingBlock, "ghost_cheaper", lambda self, name, budget: False)
    torch.manual_seed(11)
    if name == "tied":
        model, x, score = TiedLM().to(F64), torch.randint(0, 13, (3, 4)), identity
    else:
        make, inputs = CASES[name]
        model, x = make().to(F64), inputs()
        score = (lambda out: torch.cat([identity(o) for o in out], 1)) if name == "linear_3d_4d" else identity
    _randomise_bn(model)
    check(model, x, score, qr=False)


ENGINE_BUFFERS = {
    # nothing gathered with the small parameters; rows in slices of a few columns, formed in the reused scratch
    "slices_in_scratch": {"_SMALL_BYTES": -1, "_ROWS_BYTES": 256},
    # every small parameter its own gathered block
    "one_per_block": {"_STAGE_BYTES": 1},
    # gathered blocks not kept: the blocks back-project those parameters
    "gathered_not_kept": {"_KEEP_BYTES": 0},
    # a few parameters per gathered block, the first blocks kept and later ones not, rows in small slices
    "several_per_block_partly_kept": {"_STAGE_BYTES": 2048, "_KEEP_BYTES": 4096, "_ROWS_BYTES": 512},
}


@pytest.mark.parametrize("config", list(ENGINE_BUFFERS))
@pytest.mark.parametrize("name", list(CASES) + ["tied", "sequence_first"])
def test_engine_buffers_do_not_change_the_projection(name, config, monkeypatch):
    """The engine's ways of batching the algebra -- small parameters' rows gathered into one product,
    rows formed slice by slice in one reused buffer -- give the same projection in every setting."""
    for attr, value in ENGINE_BUFFERS[config].items():
        monkeypatch.setattr(P, attr, value)
    monkeypatch.setattr(P, "_conv_factored_cheaper", lambda *a: False)
    monkeypatch.setattr(EmbeddingBlock, "ghost_cheaper", lambda self, name, budget: False)
    torch.manual_seed(13)
    score = identity
    if name == "tied":
        model, x = TiedLM().to(F64), torch.randint(0, 13, (3, 4))
    elif name == "sequence_first":
        model, x = SeqFirst().to(F64), torch.randint(0, 13, (4, 5))
    else:
        make, inputs = CASES[name]
        model, x = make().to(F64), inputs()
        score = (lambda out: torch.cat([identity(o) for o in out], 1)) if name == "linear_3d_4d" else identity
    _randomise_bn(model)
    check(model, x, score, qr=False)


@pytest.mark.parametrize("config", list(ENGINE_BUFFERS))
def test_engine_buffers_in_float32(config, monkeypatch):
    """The same in float32 (the float64 conversions then happen inside the engine): every setting gives
    the default setting's projection to float32 rounding, and the vmapped one's."""
    torch.manual_seed(13)
    model = TiedLM()
    x = torch.randint(0, 13, (6, 4))
    v = flat(model)
    default = project_model_onto_span(model, x, identity, v)
    for attr, value in ENGINE_BUFFERS[config].items():
        monkeypatch.setattr(P, attr, value)
    got = project_model_onto_span(model, x, identity, v)
    assert P.last_route.path == "hooked" and P.last_route.dense == 0
    assert relerr(got, default) <= 1e-6
    ref = project_onto_span(output_jacobian(model.double(), x, identity), v.double())
    assert relerr(got.double(), ref) <= 1e-4


def test_peft_lora_on_tiny_gpt2():
    """LoRA on GPT-2's ``Conv1D`` layers (frozen base, ``fan_in_fan_out``): the adapters' inner linear
    layers take the blocks, the frozen base is not part of the Jacobian."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    model = peft.get_peft_model(_tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn", "c_fc"],
                                                              fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model = model.to(F64)
    torch.manual_seed(13)
    ids = torch.randint(1, 23, (4, 7))
    labels = ids.clone()
    labels[:, 0] = -100
    check(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, CausalLMTask().scores, targets=labels,
          tol=1e-7)
