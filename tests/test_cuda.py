"""The same code on a CUDA GPU: every method, the ensemble trainer, the batched engine, the
projection and the poisoning CLI give what the CPU gives (up to float32 rounding).

Skipped where ``torch.cuda.is_available()`` is false (CI has no GPU); run on a GPU machine with
``python -m pytest tests/test_cuda.py``. TF32 is off for matrix products (PyTorch's default) and, by the
fixture below, for cuDNN's convolutions (whose default is TF32: a 5e-4 relative difference on a small
CNN's projection, emulated on the CPU), so CUDA and CPU differ only by the order of float32 operations.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import classification_problem, regression_problem

from overunlearn import Budget, create, unlearn
from overunlearn.engine import BatchedRun, unlearn_batched
from overunlearn.linalg.projection import project_onto_span, project_onto_span_qr
from overunlearn.models.mlp import MLP
from overunlearn.problem import RegressionTask, TensorData, UnlearningProblem
from overunlearn.training.ensemble import Member, train_ensemble

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")]

REGRESSION = ["ga", "gd", "l1_sparse", "minnorm_og", "ngd", "ngp", "retrain", "ridge"]
CLASSIFICATION = ["ga", "gd", "kl_unif", "l1_sparse", "minnorm_og", "ngd", "ngp", "npo", "retrain", "ridge",
                  "salun", "scrub"]
#: methods that draw random numbers on the model's device (NGD's noise): CUDA and CPU generators
#: give different streams, so only finiteness and movement are checked for them
RANDOM_ON_DEVICE = {"ngd"}


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _max_rel(a: torch.nn.Module, b: torch.nn.Module) -> float:
    num = max(float((p.detach().cpu() - q.detach().cpu()).abs().max()) for p, q in
              zip(a.parameters(), b.parameters(), strict=True))
    den = max(float(p.detach().abs().max()) for p in a.parameters())
    return num / max(den, 1e-12)


@pytest.mark.parametrize("task,name", [("reg", m) for m in REGRESSION] + [("cls", m) for m in CLASSIFICATION])
def test_every_method_on_cuda_matches_cpu(task, name):
    make = regression_problem if task == "reg" else classification_problem
    problem = make(seed=3)
    budget = Budget(steps=4) if name != "retrain" else Budget(epochs=3)
    cpu = unlearn(problem, create(name), budget, seed=5, device="cpu")
    gpu = unlearn(problem, create(name), budget, seed=5, device="cuda")
    assert next(gpu.model.parameters()).device.type == "cuda"
    assert gpu.record.steps == cpu.record.steps and gpu.record.device.startswith("cuda")
    assert all(torch.isfinite(p).all() for p in gpu.model.parameters())
    assert next(problem.model.parameters()).device.type == "cpu"  # the caller's model stays where it was
    if name in RANDOM_ON_DEVICE:
        moved = max(float((p.detach().cpu() - q).abs().max()) for p, q in
                    zip(gpu.model.parameters(), problem.model.parameters(), strict=True))
        assert moved > 0
    else:
        assert _max_rel(cpu.model, gpu.model) < 1e-4, name


def test_ensemble_training_on_cuda_matches_cpu():
    members = []
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        x = torch.rand(11 + s, 1, generator=g) * 6 - 3
        members.append(Member(MLP(1, (24, 24), 1, generator=g), x, torch.sin(x), steps=150 + 20 * s, key=s))
    cpu = train_ensemble(members, device="cpu", workers=1)
    gpu = train_ensemble(members, device="cuda")
    for a, b in zip(cpu, gpu, strict=True):
        assert a.key == b.key and a.steps == b.steps
        for k in a.state_dict:
            assert b.state_dict[k].device.type == "cpu"  # results come back on the CPU, ready to save
            torch.testing.assert_close(b.state_dict[k], a.state_dict[k], rtol=1e-4, atol=1e-5)
        assert b.final_loss == pytest.approx(a.final_loss, rel=1e-3, abs=1e-7)


def test_batched_unlearning_on_cuda_matches_cpu():
    def problem(seed: int, jitter: float = 0.0) -> UnlearningProblem:
        g = torch.Generator().manual_seed(seed)
        xr, xf = torch.rand(5, 1, generator=g) * 6 - 3, torch.rand(2, 1, generator=g) * 6 - 3
        model = MLP(1, (32, 32), 1, generator=g)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + jitter * torch.randn(p.shape, generator=g))
        return UnlearningProblem(model, TensorData(xr, torch.sin(xr)), TensorData(xf, torch.full_like(xf, 1.5)),
                                 RegressionTask(), batch_size=7)

    cases = [("gd", {}), ("ridge", {"reg_coef": 0.5}), ("l1_sparse", {"reg_coef": 0.05}),
             ("minnorm_og", {"reg_coef": 0.5, "reg_coef_decay": 0.9}), ("retrain", {})]

    def runs(jitter: float = 0.0) -> list[BatchedRun]:
        return [BatchedRun(problem(s, jitter), create(n, lr=1e-2, **h), Budget(epochs=6), seed=s, key=(n, s))
                for s in (1, 2) for n, h in cases]

    cpu = unlearn_batched(runs(), device="cpu")
    gpu = unlearn_batched(runs(), device="cuda")
    # how far float32 rounding alone moves each result: the same CPU run from a start perturbed by
    # ~1e-7 (relative). MinNorm-OG's Gram solve amplifies such a perturbation up to ~1e3-fold on
    # these small problems, so the CUDA result is held to that, not to a fixed 1e-4
    rounding = unlearn_batched(runs(1e-7), device="cpu")
    for a, b, c in zip(cpu, gpu, rounding, strict=True):
        assert a.model is not None and b.model is not None, (a.error, b.error)
        assert next(b.model.parameters()).device.type == "cuda"
        assert _max_rel(a.model, b.model) < max(1e-4, 20 * _max_rel(a.model, c.model)), a.key


def test_projection_on_cuda_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    jac = torch.randn(40, 5000, generator=g)
    v = torch.randn(5000, generator=g)
    ref = project_onto_span_qr(jac.double(), v.double())
    got = project_onto_span(jac.cuda(), v.cuda())
    assert got.device.type == "cuda"
    assert float((got.double().cpu() - ref).norm() / ref.norm()) < 1e-5


def test_factored_projection_of_a_cnn_on_cuda_matches_cpu(monkeypatch):
    from test_methods import _SmallResNet

    import overunlearn.linalg.projection as P
    from overunlearn.problem import ClassificationTask

    monkeypatch.setattr(P, "_conv_factored_cheaper", lambda *a: True)  # every convolution through the ghost Gram
    torch.manual_seed(2)
    model = _SmallResNet().eval()
    x = torch.randn(6, 2, 6, 6)
    v = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    cpu = P.project_model_onto_span(model, x, ClassificationTask().scores, v)
    gpu = P.project_model_onto_span(model.cuda(), x.cuda(), ClassificationTask().scores, v.cuda())
    assert gpu.device.type == "cuda"
    assert float((gpu.cpu() - cpu).norm() / cpu.norm()) < 1e-4


def _transformer_projection(family: str, device: str) -> tuple[torch.Tensor, object]:
    """The fast projection of a tiny float32 GPT-2 or Mixtral (its MoE layers on their block) on ``device``."""
    import overunlearn.linalg.projection as P
    from overunlearn.problem import CausalLMTask

    if family == "gpt2":
        from test_blocks import _tiny_gpt2

        model = _tiny_gpt2(dtype=torch.float32)
    else:
        from test_blocks_moe import _moe

        model = _moe("mixtral").float()
    model = model.to(device)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 23, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    x = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    targets = ids.masked_fill(mask == 0, -100).to(device)
    v = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    got = P.project_model_onto_span(model, x, CausalLMTask().scores, v, targets=targets)
    return got.cpu(), P.last_route


@pytest.mark.parametrize("family", ["gpt2", "mixtral"])
def test_transformer_projection_on_cuda_matches_cpu(family):
    pytest.importorskip("transformers")
    cpu, _ = _transformer_projection(family, "cpu")
    gpu, route = _transformer_projection(family, "cuda")
    assert route.path == "hooked" and route.dense == 0, route
    assert float((gpu - cpu).norm() / cpu.norm()) < 1e-4


def test_bench_poison_cli_on_cuda(tmp_path):
    from typer.testing import CliRunner

    from overunlearn.cli import _register, app

    _register()
    out, cache = tmp_path / "out", tmp_path / "cache"
    res = CliRunner().invoke(app, ["bench", "poison", "--recipe", "smoke", "--seeds", "1-2", "--epochs", "4",
                                   "--methods", "minnorm_og,gd,retrain", "--out", str(out), "--cache", str(cache),
                                   "-q", "--device", "cuda"])
    assert res.exit_code == 0, res.output
    trials = json.loads((out / "poison_results.json").read_text())["trials"]
    assert len(trials) == 6 and all(t["status"] == "ok" for t in trials)
    assert (out / "poison_fits_T4.png").read_bytes()[:4] == b"\x89PNG"
