"""Methods on language models, from a review: reference models run without dropout, the Trainer sets a method up
in train mode, per-example weights reach every term, batches without scored tokens, bfloat16 logits, SalUn's ties,
the QR reference on padded batches, Retrain of LoRA adapters whatever their init."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from overunlearn import Budget, CausalLMTask, TensorData, UnlearningProblem, unlearn
from overunlearn.errors import DataError
from overunlearn.methods import create
from overunlearn.methods.context import UnlearningContext, set_reference_mode
from overunlearn.methods.saliency import saliency_mask

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 40


def gpt2(dropout: float = 0.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return transformers.GPT2LMHeadModel(cfg)


def tokens(n: int, length: int = 8, seed: int = 0, answer: int = 3) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def problem(model: nn.Module, n: int = 12, batch_size: int = 4, weights: torch.Tensor | None = None
            ) -> UnlearningProblem:
    x, y = tokens(n)
    half = n // 2
    forget = TensorData({k: v[half:] for k, v in x.items()}, y[half:], weights)
    return UnlearningProblem(model, TensorData({k: v[:half] for k, v in x.items()}, y[:half]), forget, CausalLMTask(),
                             batch_size=batch_size)


def context(p: UnlearningProblem) -> UnlearningContext:
    return UnlearningContext(p, p.model, torch.device("cpu"), seed=0, planned_epochs=2, steps_per_epoch=2)


def forget_batch(p: UnlearningProblem):
    return p.forget.take(torch.arange(len(p.forget)))


# ---- reference models ---------------------------------------------------------------------------------------

def test_reference_mode_turns_dropout_off_and_keeps_batch_statistics_in_train_mode():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    set_reference_mode(model, "train")
    assert model[1].training and not model[2].training and not model[0].training
    x = torch.randn(16, 4)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # a fixed function of the batch
    set_reference_mode(model, "eval")
    assert not any(m.training for m in model.modules())
    with pytest.raises(ValueError, match="one of 'train', 'eval'"):
        set_reference_mode(model, "test")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_npo_loss_at_the_reference_is_two_over_beta_log_two_with_dropout(mode):
    """NPO's reference policy is fixed: at theta = theta_ref the loss is (2 / beta) log 2 on every call, even for a
    model with dropout (its reference ran in train mode and drew dropout masks, the loss varied by call)."""
    p = problem(gpt2(dropout=0.3))
    ctx = context(p)
    method = create("npo", reg_coef=0.5, reference_mode=mode)
    p.model.train()
    method.setup(ctx)
    p.model.eval()  # the working model without dropout: its log-likelihoods equal the reference's
    fb = forget_batch(p)
    for _ in range(3):
        with torch.no_grad():
            loss = float(method.loss(ctx, None, fb, fb))
        assert loss == pytest.approx(2.0 / 0.5 * math.log(2.0), rel=1e-6)


def test_scrub_teacher_mode_train_draws_no_dropout():
    p = problem(gpt2(dropout=0.3))
    ctx = context(p)
    method = create("scrub")
    p.model.train()
    method.setup(ctx)
    x = forget_batch(p).inputs
    with torch.no_grad():
        assert torch.equal(method.teacher(**x).logits, method.teacher(**x).logits)


def test_the_trainer_sets_a_method_up_in_train_mode(tmp_path):
    """``on_train_begin`` runs before the Trainer's own ``model.train()``: a model from ``from_pretrained`` (eval
    mode) was set up in eval mode there and in train mode by ``unlearn`` (SalUn's saliency pass differed)."""
    from overunlearn.integrations.huggingface import UnlearningTrainer
    from overunlearn.methods.base import Method

    seen: list[bool] = []

    class Records(Method):
        name = "records_setup_mode"

        def setup(self, ctx):  # noqa: ANN001
            seen.append(ctx.model.training)

        def loss(self, ctx, info, retain, forget):  # noqa: ANN001
            return ctx.batch_loss(retain)

    p = problem(gpt2())
    p.model.eval()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1,
                                          report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    UnlearningTrainer(p.model, args, method=Records(), retain_dataset=p.retain, forget_dataset=p.forget,
                      task=p.task).train()
    p.model.eval()
    unlearn(p, Records(), Budget(steps=1), device="cpu")
    assert seen == [True, True]


# ---- weights and unscored batches ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["npo", "kl_unif", "scrub"])
def test_forget_weights_reach_every_term(method):
    """Zero weights on the forget set silence its terms, weights of 2 double them, as they do GA's and SalUn's (NPO,
    KL-Unif and SCRUB's KL ignored them)."""
    base = problem(gpt2(seed=1))
    n = len(base.forget)
    hp = {"scrub": {"ga_coef": 1.0}}.get(method, {})
    losses = {}
    for name, w in (("none", None), ("ones", torch.ones(n)), ("twos", torch.full((n,), 2.0)), ("zeros", torch.zeros(n))):
        p = problem(copy.deepcopy(base.model), weights=w)
        ctx = context(p)
        m = create(method, **hp)
        p.model.train()
        m.setup(ctx)
        with torch.no_grad():
            p.model.eval()
            g = torch.Generator().manual_seed(0)
            for q in p.model.parameters():  # off the reference, so that NPO's and SCRUB's terms are not constants
                q.add_(0.05 * torch.randn(q.shape, generator=g))
            fb = forget_batch(p)
            info = type("Info", (), {"epoch": 1})()  # SCRUB: an odd epoch is a max (forget) epoch
            total = float(m.loss(ctx, info, fb, fb))
            retain_part = float(ctx.batch_loss(fb)) if method == "kl_unif" else 0.0
            losses[name] = total - retain_part
    assert losses["ones"] == pytest.approx(losses["none"], rel=1e-6)
    assert losses["twos"] == pytest.approx(2 * losses["none"], rel=1e-5)
    assert losses["zeros"] == pytest.approx(0.0, abs=1e-7)
    assert abs(losses["none"]) > 1e-4


@pytest.mark.parametrize("method", ["ga", "npo", "kl_unif", "scrub", "salun", "ngp"])
def test_a_forget_batch_without_scored_tokens_contributes_nothing(method):
    """batch_size 1 and an example whose labels are all -100: every method takes finite steps, whatever the seed
    (NPO, KL-Unif and SCRUB made the loss NaN; the first-batch check raised for some seeds only)."""
    x, y = tokens(6)
    y[4] = -100  # forget example 1 scores nothing
    data = TensorData(x, y)
    p = UnlearningProblem(gpt2(), data.subset(range(3)), data.subset(range(3, 6)), CausalLMTask(), batch_size=1)
    for seed in range(4):
        res = unlearn(p, create(method), Budget(epochs=2), seed=seed, device="cpu")
        assert res.record.steps == 6 and all(math.isfinite(v) for v in res.record.epoch_losses)


def test_a_data_set_without_any_scored_token_is_an_error_and_a_dataset_first_batch_a_warning():
    x, y = tokens(6)
    blank = torch.full_like(y, -100)
    p = UnlearningProblem(gpt2(), TensorData(x, y), TensorData(x, blank), CausalLMTask(), batch_size=2)
    with pytest.raises(DataError, match="forget set: every label is -100"):
        unlearn(p, create("ga"), Budget(steps=1), device="cpu")
    items = [({k: v[i] for k, v in x.items()}, blank[i] if i < 2 else y[i]) for i in range(6)]
    p = UnlearningProblem(gpt2(), TensorData(x, y), items, CausalLMTask(), batch_size=2)
    with pytest.warns(UserWarning, match="forget set's first 2 examples score no token"):
        unlearn(p, create("ga"), Budget(steps=1), device="cpu")


def test_bfloat16_logits_are_compared_in_float32():
    task = CausalLMTask()
    logits = torch.randn(2, 6, VOCAB) * 4
    labels = torch.randint(0, VOCAB, (2, 6))
    (cat,) = task.categorical(logits.bfloat16(), labels)
    assert cat.logits.dtype == torch.float32
    (exact,) = task.categorical(logits.bfloat16().float(), labels)
    assert torch.equal(cat.logits, exact.logits)


# ---- SalUn's mask ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_salun_mask_keeps_the_requested_fraction_when_saliencies_tie(sparsity):
    g = torch.Generator().manual_seed(0)
    distinct = torch.rand(1001, generator=g)
    expected = saliency_mask(distinct, sparsity, torch.Generator().manual_seed(1))
    if sparsity == 0.5:  # the reference's rule on distinct values
        assert torch.equal(expected, distinct >= distinct.median())
    wanted = int(expected.sum())
    tied = torch.cat([torch.zeros(700), torch.rand(301, generator=g) + 1])  # 70% exact zeros (fresh LoRA A's)
    keep = saliency_mask(tied, sparsity, torch.Generator().manual_seed(1))
    assert int(keep.sum()) == wanted  # was: all 1001 kept
    assert bool(keep[700:].all())  # every nonzero saliency is among the kept
    again = saliency_mask(tied, sparsity, torch.Generator().manual_seed(1))
    assert torch.equal(keep, again)


# ---- the QR reference on a padded language-model batch ------------------------------------------------------

def test_reference_projection_equals_the_fast_one_with_an_unscored_example():
    """An example without scored tokens is a zero Jacobian row: the QR reference added a spurious direction."""
    from overunlearn.linalg.jacobian import output_jacobian
    from overunlearn.linalg.projection import project_onto_span, project_onto_span_qr

    model = gpt2().double().eval()
    x, y = tokens(5, length=6)
    y[2] = -100
    task = CausalLMTask()
    jac = output_jacobian(model, x, task.scores, targets=y)
    assert float(jac[2].abs().max()) == 0.0
    v = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    exact = np.linalg.pinv(jac.numpy()) @ (jac.numpy() @ v.numpy())
    for got in (project_onto_span(jac, v), project_onto_span_qr(jac, v)):
        assert np.linalg.norm(got.numpy() - exact) <= 1e-9 * np.linalg.norm(v.numpy())


# ---- Retrain of LoRA adapters --------------------------------------------------------------------------------

def _lora(init) -> nn.Module:  # noqa: ANN001
    base = gpt2()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0, init_lora_weights=init,
                          fan_in_fan_out=True)
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():  # trained adapters
        for name, q in model.named_parameters():
            if "lora_" in name:
                q.normal_(0, 0.1)
    return model


def test_retrain_draws_lora_adapters_again_when_their_init_is_false():
    model = _lora(False)
    trained = {n: q.detach().clone() for n, q in model.named_parameters() if "lora_" in n}
    res = unlearn(problem(model), create("retrain"), Budget(steps=0), device="cpu")
    now = dict(res.model.named_parameters())
    assert trained and all(not torch.equal(now[n], v) for n, v in trained.items())


def test_retrain_refuses_lora_adapters_derived_from_the_base_weights():
    model = _lora(True)
    for m in model.modules():  # as a model built with init_lora_weights="olora" reads
        if isinstance(getattr(m, "peft_config", None), dict):
            for cfg in m.peft_config.values():
                cfg.init_lora_weights = "olora"
    with pytest.raises(DataError, match="Retrain cannot re-initialise the LoRA adapter 'default'"):
        unlearn(problem(model), create("retrain"), Budget(steps=0), device="cpu")


def test_the_trainer_holds_later_dataset_batches_to_the_vocabulary(tmp_path):
    """As ``unlearn`` does: on a GPU an out-of-range label is a device-side assert, not an error naming the step."""
    from overunlearn.integrations.huggingface import UnlearningTrainer

    x, y = tokens(12)
    y[10, -1] = VOCAB + 5  # in a later batch of the forget Dataset
    items = [({k: v[i] for k, v in x.items()}, y[i]) for i in range(6, 12)]
    p = problem(gpt2())
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                                          report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = UnlearningTrainer(p.model, args, method="ga", retain_dataset=p.retain, forget_dataset=items, task=p.task)
    trainer.get_train_dataloader = lambda: torch.utils.data.DataLoader(  # (in order: the bad example comes third)
        items, batch_size=2, collate_fn=trainer._raw_collate)
    with pytest.raises(DataError, match=rf"forget batch of step \d+: label {VOCAB + 5} \(head 0\) is out of range"):
        trainer.train()
