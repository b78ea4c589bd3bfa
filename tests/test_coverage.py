"""explain_projection / MinNormOG.explain: the report of which parameters the fast projection covers
with per-layer blocks, and the warning when it forms a large torch.func Jacobian."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import Gain, GainRows
from torch import nn

import overunlearn.linalg.projection as P
from overunlearn import ClassificationTask, TensorData, UnlearningProblem, create
from overunlearn.linalg import JacobianFallbackWarning, explain_projection, register_block
from overunlearn.linalg.projection import project_model_onto_span

F64 = torch.float64


def identity(out):
    return out


class OwnLinear(nn.Linear):
    """A Linear with its own forward: the Linear block does not accept it."""

    def forward(self, x):
        return super().forward(x) * 2.0


class WrongGainBlock(GainRows):
    """A wrong block for Gain (its rows are 1.5x too large): the check against autograd rejects it."""

    def all_rows(self, name):
        return 1.5 * super().all_rows(name)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), Gain(6), OwnLinear(6, 6), nn.LayerNorm(6), nn.Linear(6, 2)).to(F64)


def test_report_names_every_parameter_its_form_and_why():
    model, x = _model(), torch.randn(5, 3, dtype=F64)
    report = explain_projection(model, x, identity)
    forms = {p.name: p.form for p in report.parameters}
    assert report.path == "hooked" and report.rows == 10  # 5 samples x 2 outputs
    assert forms == {"0.weight": "ghost", "0.bias": "gathered", "1.gain": "torch.func", "2.weight": "torch.func",
                     "2.bias": "torch.func", "3.weight": "gathered", "3.bias": "gathered", "4.weight": "ghost",
                     "4.bias": "gathered"}
    why = {p.name: p.reason for p in report.fallback}
    assert why["1.gain"] == "Gain has no block"
    assert why["2.weight"].startswith("OwnLinear's block does not accept this module")
    assert report.fallback_bytes == 10 * (6 + 36 + 6) * 8
    assert report.covered_fraction == pytest.approx(1 - 48 / sum(p.numel() for p in model.parameters()))
    text = str(report)
    assert "Gain has no block" in text and "1.gain (6,) (Gain)" in text


def test_report_agrees_with_the_route_the_projection_takes():
    """The explained forms are the ones a real projection uses, and explaining changes nothing."""
    model, x = _model(), torch.randn(5, 3, dtype=F64)
    before = [p.detach().clone() for p in model.parameters()]
    report = explain_projection(model, x, identity)
    v = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    project_model_onto_span(model, x, identity, v)
    route = P.last_route
    count = {f: sum(p.form == f for p in report.parameters) for f in ("ghost", "rows", "gathered", "torch.func")}
    assert (route.path, route.ghost, route.rows, route.dense) == (
        "hooked", count["ghost"], count["rows"] + count["gathered"], count["torch.func"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_report_of_a_materialised_projection_gives_the_reason(block_registry):
    register_block(Gain)(WrongGainBlock)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), Gain(4), nn.Linear(4, 2)).to(F64)
    report = explain_projection(model, torch.randn(5, 3, dtype=F64), identity)
    assert report.path == "materialised" and report.rows == 10
    assert "did not match autograd" in report.reason
    assert all(p.form == "torch.func" for p in report.parameters)
    assert report.covered_fraction == 0.0
    batch_mode = explain_projection(nn.Linear(3, 2).double(), torch.randn(4, 3, dtype=F64), identity, mode="batch_train")
    assert batch_mode.path == "materialised" and "not per_sample" in batch_mode.reason


def test_a_large_fallback_warns_once_per_model(monkeypatch):
    monkeypatch.setattr(P, "_WARN_BYTES", 10 * 42 * 8)  # the fallback below: 10 rows x 42 entries, float64
    model, x = _model(), torch.randn(5, 3, dtype=F64)
    v = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    with pytest.warns(JacobianFallbackWarning, match=r"3 parameter tensor\(s\) \(48 entries x 10 rows.*Gain has no block") as got:
        project_model_onto_span(model, x, identity, v)
    assert got[0].filename == __file__  # (it points at the caller)
    other = nn.Linear(3, 60).double()  # the whole Jacobian (batch_train mode): warned too, at the caller
    with pytest.warns(JacobianFallbackWarning, match=r"x 300 rows.*not per_sample") as got:
        project_model_onto_span(other, x, identity, torch.cat([p.detach().reshape(-1) for p in other.parameters()]),
                                mode="batch_train")
    assert got[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        project_model_onto_span(model, x, identity, v)  # the same model: once
        covered = nn.Sequential(nn.Linear(3, 60), nn.Tanh(), nn.Linear(60, 2)).double()
        project_model_onto_span(covered, x, identity, torch.cat([p.detach().reshape(-1) for p in covered.parameters()]))


def test_minnorm_og_explains_its_projection_on_a_problem():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 8), Gain(8), nn.Linear(8, 4))
    x, y = torch.randn(40, 3), torch.randint(0, 4, (40,))
    data = TensorData(x, y)
    problem = UnlearningProblem(model, data.subset(range(30)), data.subset(range(30, 40)), ClassificationTask(),
                                batch_size=8)
    report = create("minnorm_og", grad_sample_size=6).explain(problem)
    assert report.rows == 6  # one score per sample: the true class's log-probability
    assert [p.name for p in report.fallback] == ["1.gain"]
    assert report.path == "hooked"
    # a projection samples at most a retain batch
    assert create("minnorm_og", grad_sample_size=12).explain(problem).rows == 8
    with pytest.raises(ValueError, match="fast projection"):
        create("minnorm_og", implementation="reference").explain(problem)


def test_gpt2_language_model_is_covered_entirely():
    """A Hugging Face GPT-2 (tied embeddings, Conv1D, LayerNorm, position embeddings) on a causal-LM
    problem: every parameter on a block, none through torch.func."""
    transformers = pytest.importorskip("transformers")
    from overunlearn.problem import CausalLMTask

    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=23, n_positions=32,
                                  attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(1, 23, (12, 7))
    data = TensorData({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids.clone())
    problem = UnlearningProblem(model, data.subset(range(8)), data.subset(range(8, 12)), CausalLMTask(), batch_size=6)
    report = create("minnorm_og", grad_sample_size=6).explain(problem)
    assert report.path == "hooked" and report.rows == 6 and not report.fallback
    assert {p.form for p in report.parameters} <= {"ghost", "rows", "gathered"}
    assert "transformer.wte.weight" in {p.name for p in report.parameters}


def _coverage_script():
    """``benchmarks/hf_coverage.py``, the script the documented coverage table comes from."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "hf_coverage.py"
    spec = importlib.util.spec_from_file_location("hf_coverage", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SCRIPT = _coverage_script()


@pytest.mark.parametrize("family", _SCRIPT.CAUSAL + _SCRIPT.CLASSIFIERS)
def test_hugging_face_family_coverage(family):
    """The coverage table of docs/performance.md: every family on blocks, the mixtures of experts included. A
    family this transformers version cannot build from the script's sizes is skipped."""
    pytest.importorskip("transformers")
    script = _SCRIPT
    try:
        report = script.report(family)
    except script.NotBuilt as exc:
        pytest.skip(f"{family}: {exc}")
    assert report.path == "hooked" and not report.fallback, str(report)


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,k_proj,v_proj,o_proj"])
@pytest.mark.parametrize("family", _SCRIPT.MIXTURE_OF_EXPERTS)
def test_mixture_of_experts_with_lora_is_on_blocks(family, targets):
    """LoRA on a mixture of experts takes the blocks: on the attention projections, and with peft's all-linear
    LoRA, whose ParamWrapper adapters on the routers and fused experts the MoE block reads."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    try:
        report = _SCRIPT.report(family, lora=True, targets=targets)
    except _SCRIPT.NotBuilt as exc:
        pytest.skip(f"{family}: {exc}")
    assert report.path == "hooked" and not report.fallback, str(report)
