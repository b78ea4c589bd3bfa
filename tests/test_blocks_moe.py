"""The mixture-of-experts block (``linalg/blocks/moe.py``) on tiny Hugging Face MoE models from configs,
held to the vmapped Jacobian and the float64 QR reference with the helpers of ``tests/test_blocks.py``.

Mixtral (softmax, top-2, normalised), Qwen2-MoE (a shared expert and its gate beside the routed
experts; top-k not normalised), Qwen3-MoE, PhiMoE (a ``router`` whose "sparsemixer" masks near-ties and
samples experts in training mode); causal-LM scores and a two-label classifier (two Jacobian rows per
sample); a padded sequence; the ghost form forced on and off; frozen router or frozen experts; and the
declines (fewer hidden units than experts; a hooked router, which the block does not read).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_blocks import F64, check, flat, ghost, relerr  # noqa: F401  (ghost: a fixture)
from torch import nn

import overunlearn.linalg.projection as P
from overunlearn.linalg.blocks import block_for
from overunlearn.linalg.blocks.moe import SparseMoEBlock
from overunlearn.linalg.jacobian import output_jacobian_reference
from overunlearn.linalg.projection import project_onto_span, project_onto_span_qr
from overunlearn.problem import CausalLMTask, ClassificationTask

transformers = pytest.importorskip("transformers")

VOCAB = 29


def _moe(family: str, classifier: bool = False, experts: int = 6, hidden: int = 16):
    """A tiny MoE model of ``family`` in float64 (eager experts: the grouped kernels take no float64)."""
    T = transformers
    torch.manual_seed(0)
    common = dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=12, vocab_size=VOCAB, max_position_embeddings=32, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, num_labels=2)
    if family == "mixtral":
        cfg = T.MixtralConfig(num_local_experts=experts, num_experts_per_tok=2, **common)
    elif family == "qwen2_moe":
        cfg = T.Qwen2MoeConfig(num_experts=experts, num_experts_per_tok=3, moe_intermediate_size=8,
                               shared_expert_intermediate_size=10, norm_topk_prob=False, **common)
    elif family == "qwen3_moe":
        cfg = T.Qwen3MoeConfig(num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=8,
                               norm_topk_prob=True, **common)
    else:
        cfg = T.PhimoeConfig(num_local_experts=experts, num_experts_per_tok=2, **common)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    auto = T.AutoModelForSequenceClassification if classifier else T.AutoModelForCausalLM
    model = auto.from_config(cfg).to(F64)
    if family == "phimoe":
        # (its router's mask keeps experts within 2 * jitter of the best: make near-ties, where the
        # routing weights have gradients, likely)
        for layer in model.model.layers:
            layer.mlp.router.router_jitter_noise = 0.5
    return model


def _batch(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # a padded sequence
    return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)


def _moe_blocks(model):
    return [m for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "phimoe"])
def test_moe_language_models_equal_the_reference(family, ghost):  # noqa: F811
    model = _moe(family)
    assert all(block_for(m) is SparseMoEBlock for m in _moe_blocks(model))
    x, targets = _batch()
    # (the routing weights are computed in float32 by Mixtral and Qwen: their gradients carry float32 rounding)
    check(model, x, CausalLMTask().scores, targets=targets, tol=1e-9 if family == "phimoe" else 1e-6)


def test_moe_classifier_with_two_scores_per_sample():
    model = _moe("mixtral", classifier=True)
    x, _ = _batch(5)
    check(model, x, ClassificationTask().scores, tol=1e-6)
    assert P.last_route.path == "hooked" and P.last_route.dense == 0


@pytest.mark.parametrize("frozen", ["router", "experts"])
def test_moe_with_frozen_router_or_experts(frozen):
    model = _moe("qwen3_moe")
    for name, p in model.named_parameters():
        if (frozen == "router" and name.endswith("mlp.gate.weight")) or (frozen == "experts" and ".experts." in name):
            p.requires_grad_(False)
    x, targets = _batch(7)
    check(model, x, CausalLMTask().scores, targets=targets, tol=1e-6)


def test_experts_no_token_reaches_have_zero_rows_and_are_skipped():
    """With many experts and few tokens, some experts get no token: their rows are zero (and left out)."""
    model = _moe("mixtral", experts=16, hidden=20)
    x, targets = _batch(11)
    x = {k: v[:2, :3] for k, v in x.items()}
    seen = []
    orig = SparseMoEBlock.support

    def support(self, name):
        s = orig(self, name)
        if s is not None:
            seen.append(s.numel() / self.units(name))  # (the fraction of the experts' rows left in)
        return s

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SparseMoEBlock, "support", support)
        mp.setattr(P, "_conv_factored_cheaper", lambda *a: False)  # (formed rows: the ghost form needs no support)
        check(model, x, CausalLMTask().scores, targets=targets[:2, :3], tol=1e-6)
    assert seen and min(seen) < 1


@pytest.mark.parametrize("batched", [False, True])
def test_expert_rows_in_slices_smaller_than_one_expert(batched, monkeypatch):
    """The engine forms rows in slices of ``_ROWS_BYTES``; an expert's weights are cut into several (by output
    row), and slices that cross from one expert to the next are assembled right (with the experts' rows
    batched by token count, as on a GPU, or not)."""
    from overunlearn.linalg.blocks import moe

    monkeypatch.setattr(moe, "_batched_rows", lambda device: batched)
    monkeypatch.setattr(P, "_ROWS_BYTES", 4 * 8 * 8 * 16 * 5)  # (k = 8 rows of 5 output rows of width 16 each)
    monkeypatch.setattr(P, "_conv_factored_cheaper", lambda *a: False)
    monkeypatch.setattr(P, "_SMALL_BYTES", 0)  # (nothing gathered)
    model = _moe("qwen3_moe")
    x, targets = _batch(13)
    check(model, x, CausalLMTask().scores, targets=targets, tol=1e-6)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("index", [slice(None), slice(1, 4), torch.tensor([4, 0, 2])])
def test_expert_rows_batched_by_token_count_equal_one_product_per_sample(index, batched, monkeypatch):
    """An expert's formed rows, batched over samples grouped by padded token count (``_padded``; on a GPU)
    or one product per sample (on a CPU), equal the obvious per-sample, per-head ``sum_{t in sample} d_t
    a_t^T`` for counts from 0 (a zero row) to beyond the padding ladder's exact range, in any order of
    output rows asked for."""
    from overunlearn.linalg.blocks import moe
    from overunlearn.linalg.blocks.moe import _Groups, _padded, _Tokens

    monkeypatch.setattr(moe, "_batched_rows", lambda device: batched)

    some = torch.arange(0, 300)
    assert _padded(torch.tensor([0, 1, 8, 9, 17, 33, 64])).tolist() == [0, 1, 8, 10, 20, 40, 64]
    assert bool(((some <= _padded(some)) & (_padded(some) <= 1.25 * some)).all())
    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 9, 10, 17, 1, 33, 0, 12, 8]
    n, heads, o, p = len(counts), 2, 5, 4
    sample = torch.repeat_interleave(torch.arange(n), torch.tensor(counts))
    m = sample.numel()
    a = torch.randn(m, p, generator=g, dtype=F64)
    d = torch.randn(heads, m, o, generator=g, dtype=F64)
    tokens = _Tokens(torch.zeros(o, p, dtype=F64), a, _Groups(sample, n, heads))
    tokens.bind(d)
    cols = torch.arange(o)[index]
    out = torch.full((heads * n, cols.numel(), p), float("nan"), dtype=F64)
    tokens.rows(index, out)
    for h in range(heads):
        for i in range(n):
            at = sample == i
            want = d[h][at][:, cols].T @ a[at]
            torch.testing.assert_close(out[h * n + i], want, rtol=1e-12, atol=1e-12)


def test_fewer_hidden_units_than_experts_decline():
    """The router's replay needs ``hidden >= experts``: below that the layer is declined (its parameters take
    the torch.func Jacobian), and the projection is still right."""
    model = _moe("mixtral", experts=20, hidden=16)
    assert all(block_for(m) is None for m in _moe_blocks(model))
    x, targets = _batch()
    check(model, x, CausalLMTask().scores, targets=targets, tol=1e-6, path="materialised")


def test_a_hooked_router_declines():
    """A hook on the router may change what it returns: the block does not read such a layer."""
    model = _moe("mixtral")
    layer = _moe_blocks(model)[0]
    layer.gate.register_forward_hook(lambda m, a, o: None)
    assert block_for(layer) is None and block_for(_moe_blocks(model)[1]) is SparseMoEBlock
    x, targets = _batch()
    check(model, x, CausalLMTask().scores, targets=targets, tol=1e-6, dense=3)


class Float32Router(nn.Module):
    """A Mixtral-style router that computes its logits in float32 whatever the model's dtype (as Laguna's and
    ERNIE-4.5's do): the replay must feed it its input dtype."""

    def __init__(self, gate):
        super().__init__()
        self.top_k, self.num_experts, self.hidden_dim = gate.top_k, gate.num_experts, gate.hidden_dim
        self.weight = gate.weight

    def forward(self, hidden_states):
        logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight).float()
        probs = torch.softmax(logits, dim=-1)
        top, index = torch.topk(probs, self.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), index


def test_a_router_computing_in_float32_in_a_float64_model():
    model = _moe("mixtral")
    for layer in _moe_blocks(model):
        layer.gate = Float32Router(layer.gate)
    x, targets = _batch()
    check(model, x, CausalLMTask().scores, targets=targets, tol=1e-6)


class TwoInputRouter(Float32Router):
    def forward(self, hidden_states, correction):  # (as MiniMax-M2's router: a second, required input)
        return super().forward(hidden_states + 0 * correction)


def test_a_router_needing_a_second_input_is_not_accepted():
    model = _moe("mixtral")
    layer = _moe_blocks(model)[0]
    layer.gate = TwoInputRouter(layer.gate)
    assert block_for(layer) is None and block_for(_moe_blocks(model)[1]) is SparseMoEBlock


class FailingRouter(Float32Router):
    """A router that runs in the model's forward but fails in the block's replay (its weight swapped for
    ``[I | 0]``): the block declines the layer, nothing raises."""

    def forward(self, hidden_states):
        if not self.weight.requires_grad:
            raise RuntimeError("a weight of its own only")
        return super().forward(hidden_states)


def test_a_router_the_replay_cannot_drive_declines():
    model = _moe("mixtral")
    layer = _moe_blocks(model)[0]
    layer.gate = FailingRouter(layer.gate)
    x, targets = _batch()
    check(model, x, CausalLMTask().scores, targets=targets, tol=1e-6, dense=3)


def test_float16_moe_language_model_keeps_the_hooked_path():
    """A float16 model's language-model scores are float32: the Gram check's tolerance follows the parameters'
    dtype too (float16 rounding of rows and back-projection differ by ~3e-4)."""
    model = _moe("mixtral").half()
    x, targets = _batch()
    P.project_model_onto_span(model, x, CausalLMTask().scores, flat(model), targets=targets)
    assert P.last_route.path == "hooked" and P.last_route.dense == 0, P.last_route


class TiedToAnExpert(nn.Module):
    """A Conv1d whose weight is an expert tensor of the MoE block: the two blocks slice its rows differently
    (by output channel; by expert and output row), so that parameter takes the fallback."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.conv = nn.Conv1d(16, 6, 12, bias=False).to(F64)
        self.conv.weight = lm.model.layers[0].mlp.experts.down_proj  # (E = 6, H = 16, I = 12)

    def forward(self, input_ids, attention_mask):
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
        e = self.lm.model.embed_tokens(input_ids).transpose(1, 2)
        return logits[:, -1, :6] + self.conv(F.pad(e, (0, 5)))[:, :, 0]


def test_a_parameter_two_blocks_slice_differently_takes_the_fallback():
    model = TiedToAnExpert(_moe("mixtral", hidden=16))
    x, _ = _batch()
    check(model, x, lambda out: out, tol=1e-6, dense=1)


def _with_lora(model, seed: int = 0):
    """peft's all-linear LoRA (rank 2): its ParamWrapper adapters on the routers and fused experts, its Linear
    ones on the attention; B drawn at random (it starts at zero, which would make A's rows zero)."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def _check_against_the_backward_loop(model, x, score, targets=None, tol=1e-6):
    """As ``check``, against the per-score backward loop's Jacobian: peft's ParamWrapper swaps a parameter in
    place during its forward, which ``torch.func`` cannot trace (so the vmapped Jacobian, and the projection
    of such a model before this block, raise)."""
    v = flat(model)
    got = P.project_model_onto_span(model, x, score, v, targets=targets)
    route = P.last_route
    jr = output_jacobian_reference(model, x, score, targets=targets)
    assert relerr(got, project_onto_span(jr, v)) <= tol, (relerr(got, project_onto_span(jr, v)), route)
    assert relerr(got, project_onto_span_qr(jr, v)) <= max(tol, 1e-8)
    assert route.path == "hooked" and route.dense == 0, route
    assert float(got.norm()) > 1e-6 * float(v.norm())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_all_linear_lora_on_a_mixture_of_experts(family, ghost):  # noqa: F811
    """LoRA factors of the router and of each fused expert weight (peft's ParamWrapper: delta = s B A per
    expert, B interleaved by expert) on the MoE block."""
    model = _with_lora(_moe(family))
    wrapped = [type(m).__name__ for m in _moe_blocks(model)[0].children()]
    assert wrapped.count("ParamWrapper") == 2, wrapped  # (the router's and the experts')
    x, targets = _batch()
    _check_against_the_backward_loop(model, x, CausalLMTask().scores, targets)


def test_all_linear_lora_on_a_mixture_of_experts_classifier():
    model = _with_lora(_moe("mixtral", classifier=True), seed=1)
    x, _ = _batch(5)
    _check_against_the_backward_loop(model, x, ClassificationTask().scores)


def test_a_model_torch_func_cannot_trace_takes_the_backward_loop(monkeypatch):
    """Without the MoE block, peft's ParamWrapper (which swaps the adapted parameter in place) left torch.func
    raising from deep inside torch; its Jacobian is now the per-score backward loop's, with a warning."""
    from overunlearn.linalg.jacobian import output_jacobian

    model = _with_lora(_moe("mixtral"))
    x, targets = _batch()
    monkeypatch.setattr(SparseMoEBlock, "accepts", classmethod(lambda cls, m: False))
    with pytest.warns(RuntimeWarning, match="torch.func cannot trace this model"):
        jac = output_jacobian(model, x, CausalLMTask().scores, targets=targets)
    ref = output_jacobian_reference(model, x, CausalLMTask().scores, targets=targets)
    assert relerr(jac.reshape(-1), ref.reshape(-1)) <= 1e-12
    with pytest.warns(RuntimeWarning, match="torch.func cannot trace this model"):
        v = flat(model)
        got = P.project_model_onto_span(model, x, CausalLMTask().scores, v, targets=targets)
    assert P.last_route.path != "hooked" or P.last_route.dense > 0
    assert relerr(got, project_onto_span(ref, v)) <= 1e-6


def test_lora_adapters_in_float32_on_a_float16_mixture_of_experts():
    """peft keeps the adapters in float32 on a float16 model (autocast_adapter_dtype): the block forms their
    rows in the adapters' dtype (it raised on the dtype mismatch). (The float16 model then fails the check
    against autograd at float16 rounding, as float16 LoRA models do elsewhere, and takes the backward loop.)"""
    model = _with_lora(_moe("mixtral").half())
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    x, targets = _batch()
    v = flat(model).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = P.project_model_onto_span(model, x, CausalLMTask().scores, v, targets=targets)
        ref = project_onto_span(output_jacobian_reference(model, x, CausalLMTask().scores, targets=targets).double(),
                                v.double())
    assert torch.isfinite(got).all() and relerr(got.double(), ref) <= 1e-2


def test_a_trainable_parameter_under_a_lora_wrapper_is_a_clear_error():
    model = _with_lora(_moe("mixtral"))
    model.base_model.model.model.layers[0].mlp.gate.base_layer.weight.requires_grad_(True)
    x, targets = _batch()
    with pytest.raises(ValueError, match="adapted by a peft LoRA ParamWrapper and is trainable too"):
        P.project_model_onto_span(model, x, CausalLMTask().scores, flat(model), targets=targets)
    assert len(dict(model.named_parameters())) == len(list(model.parameters()))  # (nothing left half-swapped)


class Branchy(nn.Module):
    """A model whose forward branches on its input's values (vmap cannot trace it: one jacrev per example) around
    a LoRA mixture of experts (which jacrev cannot trace either): the backward loop takes it."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1, :3]
        return out * 2 if bool(input_ids.sum() > 0) else out


def test_the_per_example_path_also_falls_back_to_the_backward_loop(monkeypatch):
    from overunlearn.linalg.jacobian import output_jacobian

    model = Branchy(_with_lora(_moe("mixtral")))
    x, _ = _batch()
    with pytest.warns(RuntimeWarning, match="torch.func cannot trace this model"):
        jac = output_jacobian(model, x, lambda out: out)
    ref = output_jacobian_reference(model, x, lambda out: out)
    assert relerr(jac.reshape(-1), ref.reshape(-1)) <= 1e-12
