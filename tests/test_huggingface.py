"""Hugging Face models end to end: structured inputs and outputs, causal-LM and sequence tasks, LoRA, the Trainer.

Every model is built from a config with random weights (no downloads). Skipped without the ``hf`` extra.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from overunlearn import (  # noqa: E402
    Budget,
    ClassificationTask,
    DataError,
    NonFiniteLossError,
    TensorData,
    UnlearningProblem,
    create,
    get_method,
    list_methods,
    unlearn,
)
from overunlearn.methods.minnorm_og import minnorm_projection_step  # noqa: E402
from overunlearn.problem import CausalLMTask, PadCollate, SequenceClassificationTask  # noqa: E402

VOCAB, T = 40, 12


def _tokens(n: int, seed: int, prompt: int = 4, min_len: int = 8) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded token batches: ids, attention mask, and labels with -100 on the prompt and the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    lengths = torch.randint(min_len, T + 1, (n,), generator=g)
    for i, length in enumerate(lengths):
        ids[i, length:] = 0
        mask[i, length:] = 0
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    return transformers.BertForSequenceClassification(cfg)


def lora_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    base = transformers.LlamaForCausalLM(cfg)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, lora)
    with torch.no_grad():  # trained adapters: B is zero at peft's initialisation
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def lm_problem(model: nn.Module, batch_size: int = 8) -> UnlearningProblem:
    x, y = _tokens(24, seed=1)
    data = TensorData(x, y)
    return UnlearningProblem(model, data.subset(range(16)), data.subset(range(16, 24)), CausalLMTask(),
                             batch_size=batch_size)


def cls_problem(model: nn.Module) -> UnlearningProblem:
    x, _ = _tokens(24, seed=2)
    y = torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(3))
    data = TensorData(x, y)
    return UnlearningProblem(model, data.subset(range(16)), data.subset(range(16, 24)), SequenceClassificationTask(),
                             batch_size=8)


#: the package's own methods (test modules may register fakes of their own)
BUILTIN = [m for m in list_methods() if get_method(m).__module__.startswith("overunlearn.methods.")]

CASES = {"gpt2_causal_lm": lambda: lm_problem(gpt2()), "bert_sequence_classifier": lambda: cls_problem(bert()),
         "lora_llama": lambda: lm_problem(lora_llama())}
HYPER = {"minnorm_og": {"reg_coef": 0.05, "grad_sample_size": 6}, "salun": {}, "scrub": {}, "npo": {}}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", BUILTIN)
def test_every_method_runs_and_changes_only_trainable_parameters(case, method):
    problem = CASES[case]()
    before = {n: p.detach().clone() for n, p in problem.model.named_parameters()}
    trainable = {n for n, p in problem.model.named_parameters() if p.requires_grad}
    res = unlearn(problem, create(method, lr=1e-2, **HYPER.get(method, {})), Budget(steps=3), device="cpu", seed=1)
    assert res.record.steps == 3
    assert all(torch.isfinite(torch.tensor(v)) for v in res.record.epoch_losses)
    after = dict(res.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed, "nothing was trained"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:3]}"
    assert all(torch.equal(before[n], p.detach()) for n, p in problem.model.named_parameters())  # caller's model


def _projection(problem: UnlearningProblem, implementation: str) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(problem.model).double()
    batch = problem.retain.take(torch.arange(len(problem.retain)))
    minnorm_projection_step(model, batch, problem.task.scores, problem.task.strata(batch.targets), 0.7, 6,
                            torch.Generator().manual_seed(0), implementation=implementation, with_targets=True)
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_projection_equals_the_reference(case):
    problem = CASES[case]()
    fast, ref = _projection(problem, "fast"), _projection(problem, "reference")
    num = sum(float((fast[n] - ref[n]).pow(2).sum()) for n in fast)
    den = sum(float(ref[n].pow(2).sum()) for n in ref)
    assert (num / den) ** 0.5 <= 1e-5


def test_extra_padding_does_not_change_the_projection():
    problem = lm_problem(gpt2())
    x, y = problem.retain.inputs, problem.retain.targets
    pad = 5
    wide = {"input_ids": torch.cat([x["input_ids"], torch.zeros(len(y), pad, dtype=torch.long)], 1),
            "attention_mask": torch.cat([x["attention_mask"], torch.zeros(len(y), pad, dtype=torch.long)], 1)}
    padded = UnlearningProblem(problem.model, TensorData(wide, torch.cat([y, torch.full((len(y), pad), -100)], 1)),
                               problem.forget, problem.task)
    a, b = _projection(problem, "fast"), _projection(padded, "fast")
    assert all(torch.allclose(a[n], b[n], rtol=1e-9, atol=1e-12) for n in a)


def test_token_scores_cap_rows_and_keep_the_scored_log_probabilities():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 3, 4, -100, -100], [-100, -100, 1, 2, 6]])
    task = CausalLMTask(scores_per="token", max_score_tokens=2)
    logp = torch.log_softmax(logits, -1)
    s = task.scores(logits, labels)
    # position t predicts label t + 1
    assert torch.allclose(s[0], torch.stack([logp[0, 0, 3], logp[0, 1, 4]]))
    assert torch.allclose(s[1], torch.stack([logp[1, 1, 1], logp[1, 2, 2]]))
    seq = CausalLMTask().scores(logits, labels)
    assert torch.allclose(seq[1, 0], logp[1, 1, 1] + logp[1, 2, 2] + logp[1, 3, 6])
    loss = CausalLMTask().per_sample_loss(logits, labels)
    assert torch.allclose(loss[0], -(logp[0, 0, 3] + logp[0, 1, 4]) / 2)
    assert torch.allclose(CausalLMTask(reduction="sum").per_sample_loss(logits, labels)[1], -seq[1, 0])


def test_structured_inputs_tuple_and_dataset_of_dicts_with_padding():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

        def forward(self, x, z):
            return {"logits": self.a(x) + self.b(z)}

    torch.manual_seed(0)
    x, z, y = torch.randn(12, 3), torch.randn(12, 2), torch.randint(0, 4, (12,))
    data = TensorData((x, z), y)
    p = UnlearningProblem(TwoInputs(), data.subset(range(8)), data.subset(range(8, 12)), ClassificationTask())
    for m in ("minnorm_og", "scrub", "salun"):
        unlearn(p, create(m), Budget(steps=2), device="cpu")

    class Seqs(torch.utils.data.Dataset):
        def __init__(self, n: int) -> None:
            g = torch.Generator().manual_seed(n)
            self.items = [torch.randint(1, VOCAB, (int(torch.randint(5, 10, (1,), generator=g)),), generator=g)
                          for _ in range(n)]

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i):
            ids = self.items[i]
            labels = ids.clone()
            labels[:2] = -100
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels

    p2 = UnlearningProblem(gpt2(), Seqs(10), Seqs(4), CausalLMTask(), batch_size=4, collate=PadCollate())
    for m in ("gd", "minnorm_og", "npo"):
        res = unlearn(p2, create(m, **HYPER.get(m, {})), Budget(steps=2), device="cpu")
        assert res.record.steps == 2


def test_pad_collate_pads_inputs_and_labels():
    items = [({"input_ids": torch.tensor([5, 6, 7])}, torch.tensor([-100, 6, 7])),
             ({"input_ids": torch.tensor([8])}, torch.tensor([8]))]
    b = PadCollate(pad={"input_ids": 0})(items)
    assert b.inputs["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b.targets.tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = PadCollate(side="left")(items)
    assert left.inputs["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]


def test_retrain_resets_multihead_attention_and_lora_adapters():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0),
                                              1, enable_nested_tensor=False), nn.Flatten(), nn.Linear(8 * 3, 2))
    x, y = torch.randn(10, 3, 8), torch.randint(0, 2, (10,))
    data = TensorData(x, y)
    p = UnlearningProblem(enc, data.subset(range(6)), data.subset(range(6, 10)), ClassificationTask())
    res = unlearn(p, create("retrain"), Budget(steps=0), device="cpu")
    attn_before = enc[0].layers[0].self_attn.in_proj_weight
    assert not torch.equal(res.model[0].layers[0].self_attn.in_proj_weight, attn_before)

    lp = lm_problem(lora_llama())
    res = unlearn(lp, create("retrain"), Budget(steps=0), device="cpu")
    for name, q in res.model.named_parameters():
        orig = dict(lp.model.named_parameters())[name]
        if "lora_B" in name:
            assert bool((q == 0).all()), "peft initialises B at zero"
        elif not q.requires_grad:
            assert torch.equal(q, orig), f"frozen {name} changed"

    g = lm_problem(gpt2())
    res = unlearn(g, create("retrain"), Budget(steps=0), device="cpu")
    changed = [n for n, q in res.model.named_parameters() if not torch.equal(q, dict(g.model.named_parameters())[n])]
    weights = [n for n, q in g.model.named_parameters() if q.dim() > 1]
    assert set(weights) <= set(changed)  # every weight matrix (GPT-2's Conv1D included) is re-drawn


def test_salun_saliency_pass_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    model(torch.randn(64, 4) * 3 + 1)  # non-trivial running statistics
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    p = UnlearningProblem(model, TensorData(x[:12], y[:12]), TensorData(x[12:], y[12:]), ClassificationTask())
    res = unlearn(p, create("salun"), Budget(steps=0), device="cpu")
    assert torch.equal(res.model[1].running_mean, model[1].running_mean)
    assert torch.equal(res.model[1].running_var, model[1].running_var)


def test_sgd_with_momentum_is_offered():
    p = cls_problem(bert())
    a = unlearn(p, create("gd", optimizer="sgd", lr=0.1), Budget(steps=3), device="cpu").model
    b = unlearn(p, create("gd", optimizer="sgd_momentum", lr=0.1), Budget(steps=3), device="cpu").model
    assert any(not torch.equal(q, r) for q, r in zip(a.parameters(), b.parameters()))


def test_minnorm_warns_once_when_a_projection_removes_most_of_the_norm():
    p = lm_problem(gpt2())
    with pytest.warns(UserWarning, match="lower reg_coef") as rec:
        unlearn(p, create("minnorm_og", reg_coef=0.5, grad_sample_size=4), Budget(steps=3), device="cpu")
    assert sum("lower reg_coef" in str(w.message) for w in rec) == 1
    # the samples it names are those the projection used: at most a retain batch's (8 here), not the setting's 50
    with pytest.warns(UserWarning, match="reg_coef=0.5, 8 samples"):
        unlearn(p, create("minnorm_og", reg_coef=0.5), Budget(steps=1), device="cpu")


# ---- bad input --------------------------------------------------------------------------------

def test_a_dict_missing_a_key_the_model_needs_names_the_key():
    class Needs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, scale):
            return self.lin(x) * scale

    data = TensorData({"x": torch.randn(6, 3)}, torch.randint(0, 2, (6,)))
    p = UnlearningProblem(Needs(), data.subset(range(4)), data.subset(range(4, 6)), ClassificationTask())
    with pytest.raises(DataError, match=r"retain set: the model's forward needs 'scale'"):
        unlearn(p, create("gd"), Budget(steps=1), device="cpu")
    hf = cls_problem(bert())
    no_ids = TensorData({"attention_mask": hf.retain.inputs["attention_mask"]}, hf.retain.targets)
    with pytest.raises(DataError, match="input_ids"):
        unlearn(UnlearningProblem(hf.model, no_ids, no_ids, hf.task), create("gd"), Budget(steps=1), device="cpu")


def test_all_labels_ignored_is_a_clear_error():
    p = lm_problem(gpt2())
    blank = TensorData(p.forget.inputs, torch.full_like(p.forget.targets, -100))
    with pytest.raises(DataError, match="forget set: every label is -100"):
        unlearn(UnlearningProblem(p.model, p.retain, blank, p.task), create("ga"), Budget(steps=1), device="cpu")


def test_sequences_longer_than_the_model_positions_fail_before_any_work():
    model = gpt2()
    ids = torch.randint(1, VOCAB, (4, 40))  # n_positions = 32
    data = TensorData({"input_ids": ids}, ids)
    with pytest.raises(DataError, match="40 tokens are longer than the model's 32 positions"):
        unlearn(UnlearningProblem(model, data, data, CausalLMTask()), create("gd"), Budget(steps=1), device="cpu")


def test_nan_outputs_on_the_fast_projection_are_a_non_finite_loss_error():
    class NaNOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x) * float("nan")

    data = TensorData(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    p = UnlearningProblem(NaNOut(), data.subset(range(6)), data.subset(range(6, 8)), ClassificationTask())
    with pytest.raises(NonFiniteLossError) as exc:
        unlearn(p, create("minnorm_og"), Budget(steps=1), device="cpu")
    assert exc.value.step == 0


def test_a_model_returning_a_dict_without_the_entry_says_which_to_name():
    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return {"scores": self.lin(x)}

    data = TensorData(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    p = UnlearningProblem(Named(), data.subset(range(6)), data.subset(range(6, 8)), ClassificationTask())
    with pytest.raises(DataError, match=r"without 'logits' \(it has 'scores'\)"):
        unlearn(p, create("gd"), Budget(steps=1), device="cpu")
    ok = UnlearningProblem(Named(), p.retain, p.forget, ClassificationTask(output="scores"))
    assert unlearn(ok, create("minnorm_og"), Budget(steps=1), device="cpu").record.steps == 1


# ---- the Trainer ------------------------------------------------------------------------------

SCRIPT = Path(__file__).with_name("hf_trainer_script.py")


def _run_script(method: str, out: Path, ddp: bool) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parent)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"] \
        if ddp else [sys.executable]
    done = subprocess.run([*launch, str(SCRIPT), method, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_trainer_two_cpu_processes_match_one_process(tmp_path):
    _run_script("minnorm_og", tmp_path / "one.pt", ddp=False)
    _run_script("minnorm_og", tmp_path / "two.pt", ddp=True)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 1e-6


def test_trainer_runs_methods_end_to_end_with_evaluation(tmp_path):
    from overunlearn.integrations.huggingface import UnlearningTrainer

    sys.path.insert(0, str(SCRIPT.parent))
    from hf_trainer_script import Dicts

    x, y = _tokens(20, seed=4)
    for method in ("npo", "minnorm_og"):
        model = gpt2()
        before = copy.deepcopy(model)
        args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                                              learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                                              logging_steps=1, disable_tqdm=True)
        retain, forget = Dicts(x["input_ids"][:14], y[:14]), Dicts(x["input_ids"][14:], y[14:])
        trainer = UnlearningTrainer(model, args, method=method, method_kwargs=HYPER.get(method), retain_dataset=retain,
                                    forget_dataset=forget, task=CausalLMTask(), eval_dataset=forget)
        out = trainer.train()
        assert out.global_step == 3
        assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))
        assert "eval_loss" in trainer.evaluate()
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        UnlearningTrainer(gpt2(), transformers.TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=2,
                                                                 use_cpu=True, report_to=[]),
                          method="gd", retain_dataset=retain, forget_dataset=forget, task=CausalLMTask())


def test_transformer_encoder_projection_raises_no_torch_batching_warnings():
    import warnings

    torch.manual_seed(0)
    enc = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0),
                                              1, enable_nested_tensor=False), nn.Flatten(), nn.Linear(8 * 3, 2))
    data = TensorData(torch.randn(10, 3, 8), torch.randint(0, 2, (10,)))
    p = UnlearningProblem(enc, data.subset(range(6)), data.subset(range(6, 10)), ClassificationTask())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unlearn(p, create("minnorm_og", reg_coef=0.05), Budget(steps=2), device="cpu")


def test_privacy_signals_of_a_language_model():
    from overunlearn.metrics.signals import compute_signals

    p = lm_problem(gpt2())
    sig = compute_signals(p.model, p.forget, p.task, batch_size=3)
    assert sig.loss.shape == (len(p.forget),)
    with torch.no_grad():
        expected = p.task.per_sample_loss(p.model.eval()(**p.forget.inputs), p.forget.targets).double().numpy()
    assert abs(sig.loss - expected).max() < 1e-6  # mean token NLL per example
    assert set(sig.correct.tolist()) <= {0.0, 1.0}


# ---- review fixes --------------------------------------------------------------------------

def test_trainer_refuses_to_resume_and_evaluates_dict_datasets_only(tmp_path):
    from overunlearn.integrations.huggingface import UnlearningTrainer

    sys.path.insert(0, str(SCRIPT.parent))
    from hf_trainer_script import Dicts

    x, y = _tokens(12, seed=5)
    retain, forget = Dicts(x["input_ids"][:8], y[:8]), Dicts(x["input_ids"][8:], y[8:])
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1,
                                          report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = UnlearningTrainer(gpt2(), args, method="gd", retain_dataset=retain, forget_dataset=forget,
                                task=CausalLMTask())
    with pytest.raises(ValueError, match="cannot resume"):
        trainer.train(resume_from_checkpoint=True)
    pairs = TensorData(x, y)
    with pytest.raises(DataError, match="evaluation through the Trainer needs dict items"):
        UnlearningTrainer(gpt2(), args, method="gd", retain_dataset=retain, forget_dataset=forget,
                          task=CausalLMTask(), eval_dataset=torch.utils.data.TensorDataset(pairs.targets))


def test_retrain_applies_hugging_face_init_as_hugging_face_does():
    g = lm_problem(gpt2())
    fresh = unlearn(g, create("retrain"), Budget(steps=0), device="cpu").model
    blocks = fresh.transformer.h
    attn = torch.cat([b.attn.c_attn.weight.reshape(-1) for b in blocks]).std()
    proj = torch.cat([b.attn.c_proj.weight.reshape(-1) for b in blocks]).std()
    # GPT-2's residual projections are drawn with std 0.02 / sqrt(2 n_layer) = 0.01, the others with 0.02
    assert abs(float(attn) - 0.02) < 0.003 and abs(float(proj) - 0.01) < 0.002


def test_unlearn_leaves_the_callers_generator_alone():
    p = lm_problem(gpt2())
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    unlearn(p, create("retrain"), Budget(steps=1), device="cpu", seed=7)
    assert torch.equal(state, torch.random.get_rng_state())


# ---- a new user's review (2026-12-03) ----------------------------------------------------------

class _VarLenDicts(torch.utils.data.Dataset):
    """Hugging Face-style examples of their own lengths: lists of token ids, a ``labels`` list, and a raw
    ``text`` column that the model's forward does not take (what ``datasets.map(tokenize)`` leaves)."""

    def __init__(self, x: dict[str, torch.Tensor], y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        n = int(self.x["attention_mask"][i].sum())
        return {"text": "raw text", "input_ids": self.x["input_ids"][i, :n].tolist(),
                "attention_mask": [1] * n, "labels": self.y[i, :n].tolist()}


def _trainer_args(tmp_path, **kw):
    return transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                                          learning_rate=1e-3, max_grad_norm=0, report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True, **kw)


def test_trainer_drops_unused_columns_pads_with_pad_collate_and_names_a_missing_collator(tmp_path):
    """Dict examples with a column the model does not take are collated as the Trainer does (the column
    dropped); ``PadCollate`` works as the Trainer's collator; variable lengths without a padding collator
    are one clear error naming the fix."""
    from overunlearn.integrations.huggingface import UnlearningTrainer

    x, y = _tokens(12, seed=6)
    retain, forget = _VarLenDicts({k: v[:8] for k, v in x.items()}, y[:8]), _VarLenDicts({k: v[8:] for k, v in x.items()}, y[8:])
    model = gpt2()
    before = copy.deepcopy(model)
    trainer = UnlearningTrainer(model, _trainer_args(tmp_path), method="ga", retain_dataset=retain, forget_dataset=forget,
                                task=CausalLMTask(), data_collator=PadCollate())
    assert trainer.train().global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))
    with pytest.raises(DataError, match="different lengths.*PadCollate"):
        UnlearningTrainer(gpt2(), _trainer_args(tmp_path), method="ga", retain_dataset=retain, forget_dataset=forget,
                          task=CausalLMTask()).train()


def test_trainer_takes_tensor_data_as_forget_set_like_unlearn(tmp_path):
    """In-memory ``TensorData`` is accepted as the forget set, as it is as the retain set, and steps exactly as
    a torch ``Dataset`` of the same examples does."""
    from overunlearn.integrations.huggingface import UnlearningTrainer

    x, y = _tokens(12, seed=7)
    data = TensorData(x, y)
    results = []
    for forget in (data.subset(range(8, 12)),
                   torch.utils.data.TensorDataset(*[t[8:] for t in (x["input_ids"], x["attention_mask"], y)])):
        model = gpt2()
        if not isinstance(forget, TensorData):
            forget = [({"input_ids": a, "attention_mask": m}, t) for a, m, t in forget]
        trainer = UnlearningTrainer(model, _trainer_args(tmp_path), method="ga", retain_dataset=data.subset(range(8)),
                                    forget_dataset=forget, task=CausalLMTask())
        assert trainer.train().global_step == 2
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1])


def test_trainer_mixed_precision_runs_minnorm_og_on_the_vmapped_jacobian(tmp_path):
    """``bf16=True`` runs the model under autocast; the projection's blocks read layers in their own dtypes, so
    MinNorm-OG takes the vmapped Jacobian there (it raised a dtype mismatch inside the blocks before)."""
    from overunlearn.integrations.huggingface import UnlearningTrainer
    from overunlearn.linalg import projection

    x, y = _tokens(12, seed=8)
    data = TensorData(x, y)
    model = gpt2()
    before = copy.deepcopy(model)
    trainer = UnlearningTrainer(model, _trainer_args(tmp_path, bf16=True), method="minnorm_og",
                                method_kwargs={"reg_coef": 0.05, "grad_sample_size": 4},
                                retain_dataset=data.subset(range(8)), forget_dataset=data.subset(range(8, 12)),
                                task=CausalLMTask())
    assert trainer.train().global_step == 2
    assert projection.last_route.path == "materialised" and projection.last_route.reason == "autocast"
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))


def test_dict_examples_with_labels_work_in_unlearn_and_pad_collate():
    """A list of Hugging Face-style dict examples (``labels`` = the targets) is a dataset ``unlearn`` takes,
    padded by ``PadCollate``; a dict without ``labels`` is one clear error."""
    x, y = _tokens(12, seed=9)
    items = [{"input_ids": x["input_ids"][i, :int(x["attention_mask"][i].sum())].tolist(),
              "attention_mask": x["attention_mask"][i, :int(x["attention_mask"][i].sum())],
              "labels": y[i, :int(x["attention_mask"][i].sum())]} for i in range(12)]
    batch = PadCollate()(items[:3])
    n = int(x["attention_mask"][:3].sum(1).max())
    torch.testing.assert_close(batch.inputs["input_ids"], x["input_ids"][:3, :n])
    torch.testing.assert_close(batch.targets, y[:3, :n])
    p = UnlearningProblem(gpt2(), items[:8], items[8:], CausalLMTask(), batch_size=4, collate=PadCollate())
    assert unlearn(p, create("ga", lr=1e-3), Budget(steps=2), device="cpu").record.steps == 2
    with pytest.raises(DataError, match="'labels' entry"):
        PadCollate()([{"input_ids": [1, 2]}])


def test_a_misspelt_key_a_token_beyond_the_vocabulary_and_a_tuple_output_are_named():
    x, y = _tokens(8, seed=10)
    data = TensorData({"input_ids": x["input_ids"], "attention_masks": x["attention_mask"]}, y)
    p = UnlearningProblem(gpt2(), data.subset(range(4)), data.subset(range(4, 8)), CausalLMTask(), batch_size=4)
    with pytest.warns(UserWarning, match="'attention_masks' \\(did you mean 'attention_mask'\\?\\)"):
        unlearn(p, create("ga", lr=1e-3), Budget(steps=1), device="cpu")
    far = TensorData({"input_ids": x["input_ids"] + VOCAB, "attention_mask": x["attention_mask"]}, y)
    p = UnlearningProblem(gpt2(), far.subset(range(4)), far.subset(range(4, 8)), CausalLMTask(), batch_size=4)
    with pytest.raises(DataError, match=f"input embedding has {VOCAB} rows"):
        unlearn(p, create("ga", lr=1e-3), Budget(steps=1), device="cpu")
    class AsTuple(nn.Module):  # (what return_dict=False gives: the ModelOutput's entries as a tuple)
        def __init__(self) -> None:
            super().__init__()
            self.lm = gpt2()

        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN201
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=True).to_tuple()

    model = AsTuple()
    data = TensorData(x, y)
    p = UnlearningProblem(model, data.subset(range(4)), data.subset(range(4, 8)), CausalLMTask(), batch_size=4)
    with pytest.raises(DataError, match=r"tuple of 2 outputs.*CausalLMTask\(output=0\)"):
        unlearn(p, create("ga", lr=1e-3), Budget(steps=1), device="cpu")
    p = UnlearningProblem(model, data.subset(range(4)), data.subset(range(4, 8)), CausalLMTask(output=0), batch_size=4)
    for method in ("ga", "minnorm_og"):
        assert unlearn(p, create(method), Budget(steps=1), device="cpu").record.steps == 1


def test_trainer_warns_that_a_methods_own_learning_rate_is_not_used(tmp_path):
    from overunlearn.integrations.huggingface import UnlearningTrainer

    x, y = _tokens(8, seed=11)
    data = TensorData(x, y)
    with pytest.warns(UserWarning, match="method_kwargs lr: the Trainer owns the optimizer"):
        UnlearningTrainer(gpt2(), _trainer_args(tmp_path), method="ga", method_kwargs={"lr": 5.0},
                          retain_dataset=data.subset(range(4)), forget_dataset=data.subset(range(4, 8)),
                          task=CausalLMTask())


def test_list_of_dict_examples_without_a_collate_and_a_text_entry():
    """Equal-length dict examples with lists of token ids are collated into tensors by default (torch's
    default_collate alone made per-position lists of them); a raw text entry is one clear error."""
    x, y = _tokens(8, seed=12, min_len=T)
    items = [{"input_ids": x["input_ids"][i].tolist(), "attention_mask": x["attention_mask"][i].tolist(),
              "labels": y[i].tolist()} for i in range(8)]
    p = UnlearningProblem(gpt2(), items[:4], items[4:], CausalLMTask(), batch_size=2)
    assert unlearn(p, "ga", Budget(steps=2), device="cpu").record.steps == 2
    texts = [dict(it, text="raw") for it in items]
    with pytest.raises(DataError, match="'text' holds text"):
        unlearn(UnlearningProblem(gpt2(), texts[:4], texts[4:], CausalLMTask(), batch_size=2, collate=PadCollate()),
                "ga", Budget(steps=1), device="cpu")


class KwargsOnly(nn.Module):
    """A GPT-2 behind ``forward(**batch)``: a forward that names none of its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.m = gpt2()

    def forward(self, **batch):  # noqa: ANN003, ANN201
        return self.m(**batch)


def test_trainer_keeps_every_column_for_a_forward_that_names_none_and_scalar_labels_get_the_padding_message(tmp_path):
    from overunlearn.integrations.huggingface import UnlearningTrainer

    x, y = _tokens(12, seed=13)
    data = [{"input_ids": x["input_ids"][i], "attention_mask": x["attention_mask"][i], "labels": y[i]} for i in range(12)]
    trainer = UnlearningTrainer(KwargsOnly(), _trainer_args(tmp_path), method="ga", retain_dataset=data[:8],
                                forget_dataset=data[8:], task=CausalLMTask())
    assert trainer.train().global_step == 2
    # sequence classification with 0-d labels (torch.tensor(label)) and examples of their own lengths
    lens = x["attention_mask"].sum(1)
    cls = [{"input_ids": x["input_ids"][i, :int(lens[i])], "labels": torch.tensor(i % 3)} for i in range(12)]
    with pytest.raises(DataError, match="different lengths.*PadCollate"):
        UnlearningTrainer(bert(), _trainer_args(tmp_path), method="ga", retain_dataset=cls[:8], forget_dataset=cls[8:],
                          task=SequenceClassificationTask()).train()


def test_no_key_warning_for_forwards_that_name_no_keyword():
    import warnings

    x, y = _tokens(8, seed=14)
    data = TensorData(x, y)
    p = UnlearningProblem(KwargsOnly(), data.subset(range(4)), data.subset(range(4, 8)), CausalLMTask(), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        unlearn(p, "ga", Budget(steps=1), device="cpu")
