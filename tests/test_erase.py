"""Label Erasure on scikit-learn digits with tiny models: splits, metrics, cache, models, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from overunlearn.benchmarks import Benchmark, get_benchmark, list_benchmarks
from overunlearn.benchmarks.erase import ERASE_METHOD_POINTS, EraseBenchmark, erase_metrics
from overunlearn.benchmarks.training import TEST_RECIPE, predict
from overunlearn.models.cnn import SmallCNN
from overunlearn.problem import ClassificationTask


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    cache = tmp_path_factory.mktemp("erase-cache")
    return get_benchmark("erase", dataset="digits", preset="test", cache_dir=cache, device="cpu", progress=False)


def test_registered_and_protocol(bench):
    assert "erase" in list_benchmarks()
    assert isinstance(bench, Benchmark) and isinstance(bench, EraseBenchmark)
    assert {m.name for m in bench.metrics} >= {"retain_acc", "forget_error", "forget_error_colored"}
    assert {m.name: m.direction for m in bench.metrics}["forget_error"] == "min"


def test_split_sizes_and_label_semantics(bench):
    s = bench.split(1)
    n = 300
    k = round(0.05 * n)
    assert len(s["retain"]) == n and len(s["forget"]) == 2 * k
    assert len(s["accessible"]) == round(0.2 * n)
    assert len(s["original_train"]) == n + 2 * k and len(s["gt_train"]) == n
    cls, col = s["retain"].targets
    assert torch.all(col == 0) and torch.all(s["retain"].color == 0)
    assert torch.bincount(cls).tolist() == [30] * 10  # class-balanced subset
    fcls, fcol = s["forget"].targets
    assert fcol.tolist() == [1] * k + [2] * k and torch.equal(fcol, s["forget"].color)
    # forget copies are coloured versions of retain images with the same content label
    red = s["red_index"]
    assert torch.equal(s["forget"].lum[:k], s["retain"].lum[red]) and torch.equal(fcls[:k], cls[red])
    # a different seed draws a different forget set; the same seed the same one
    assert not torch.equal(bench.split(2)["red_index"], red)
    assert torch.equal(EraseBenchmark("digits", preset="test", use_cache=False, progress=False).split(1)["red_index"],
                       red)


def test_problem_data_are_coloured(bench):
    prob = bench.problem(1)
    assert isinstance(prob.task, ClassificationTask) and prob.task.logit_clamp == 30.0
    assert prob.batch_size == 32
    x = prob.retain.inputs
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # gray
    k = len(prob.forget) // 2
    f = prob.forget.inputs
    assert torch.all(f[:k, 1:] == -1.0)  # red: no green or blue
    assert torch.all(f[k:, 0] == -1.0) and torch.all(f[k:, 2] == -1.0)  # green
    assert prob.retain.weights is None
    fresh = prob.make_model()
    assert type(fresh) is type(prob.model)


def test_metrics_on_hand_built_predictions():
    n = 4
    labels = torch.tensor([0, 1, 2, 3])
    big = 50.0

    def one_hot(idx, k):
        return torch.nn.functional.one_hot(torch.as_tensor(idx).expand(n), k).float() * big

    cls = one_hot(labels, 10)
    perfect = erase_metrics(cls, one_hot(0, 3), one_hot(1, 3), one_hot(2, 3), labels)
    assert perfect["forget_error"] == pytest.approx(2 / 3)
    assert perfect["forget_error_colored"] == pytest.approx(1.0)
    assert perfect["retain_acc"] == 1.0 and perfect["color_acc"] == 1.0
    always_gray = erase_metrics(cls, one_hot(0, 3), one_hot(0, 3), one_hot(0, 3), labels)
    assert always_gray["forget_error"] == pytest.approx(0.0, abs=1e-12)
    assert always_gray["color_acc"] == pytest.approx(1 / 3)
    # uniform colour probabilities: (1/3 - 1)^2 = 4/9 everywhere
    uniform = erase_metrics(cls, torch.zeros(n, 3), torch.zeros(n, 3), torch.zeros(n, 3), labels)
    assert uniform["forget_error"] == pytest.approx(4 / 9)
    # retain accuracy needs both heads right on gray images
    wrong_colour = torch.tensor([[0.0, 9, 0], [9, 0, 0], [9, 0, 0], [9, 0, 0]])
    wrong_class = cls.clone()
    wrong_class[1] = one_hot(5, 10)[1]
    m = erase_metrics(wrong_class, wrong_colour, one_hot(1, 3), one_hot(2, 3), labels)
    assert m["retain_acc"] == pytest.approx(0.5) and m["class_acc"] == pytest.approx(0.75)


class _FixedColour(nn.Module):
    """Predicts class 0 and a fixed colour distribution for every input."""

    def __init__(self, colour_logits):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.c = torch.tensor(colour_logits)

    def forward(self, x):
        n = x.shape[0]
        return torch.zeros(n, 10) + self.w, self.c.expand(n, 3)


class _ChannelColour(nn.Module):
    """A perfect colour classifier from channel statistics (gray: all channels equal)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        m = x.mean(dim=(2, 3))  # (n, 3); 0 intensity -> -1
        red = (m[:, 1] == -1) & (m[:, 2] == -1) & (m[:, 0] > -1)
        green = (m[:, 0] == -1) & (m[:, 2] == -1) & (m[:, 1] > -1)
        col = torch.stack([~(red | green), red, green], 1).float() * 100.0
        return torch.zeros(x.shape[0], 10) + self.w, col


def test_evaluate_on_stub_models(bench):
    perfect = bench.evaluate(_ChannelColour(), 1)
    assert perfect["forget_error"] == pytest.approx(2 / 3, abs=1e-6)
    assert perfect["color_acc"] == pytest.approx(1.0)
    gray = bench.evaluate(_FixedColour([100.0, 0.0, 0.0]), 1)
    assert gray["forget_error"] == pytest.approx(0.0, abs=1e-9)
    assert gray["retain_acc"] == pytest.approx(0.1)  # class 0 right on 1/10 of the balanced test subset


def test_reference_models_cached_and_reused(bench, tmp_path):
    _, _, info = bench.models(1)
    ref = bench.reference(1)
    assert set(ref) == {"original", "ground_truth"}
    path = bench.cache.path("erase", "digits", bench.key(), 1, "original")
    assert path.is_file() and path.with_suffix(".json").is_file()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert "train_accuracy" in meta and meta["recipe"]["name"] == "test"
    again = get_benchmark("erase", dataset="digits", preset="test", cache_dir=bench.cache.root, device="cpu",
                          progress=False)
    o2, g2, info2 = again.models(1)
    assert info2["original"]["cache_hit"] and info2["ground_truth"]["cache_hit"]
    o1 = bench.models(1)[0]
    for (k, a), (_, b) in zip(o1.state_dict().items(), o2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    ref2 = again.reference(1)
    for role in ("original", "ground_truth"):
        assert ref2[role] == pytest.approx(ref[role])
    # a different recipe is a different cache entry
    other = get_benchmark("erase", dataset="digits", preset="test", cache_dir=bench.cache.root, device="cpu",
                          progress=False, recipe=TEST_RECIPE.replace(epochs=3))
    assert other.key() != bench.key()


def test_original_learns_colours_ground_truth_does_not(tmp_path):
    """With a few more epochs the original model classifies colours and the ground truth says gray."""
    b = EraseBenchmark("digits", preset="test", cache_dir=tmp_path, device="cpu", progress=False,
                       recipe=TEST_RECIPE.replace(epochs=12, gt_epochs=6, width=8, hidden=32, lr=0.05),
                       p_forget=0.15, n_train=400)
    ref = b.reference(1)
    assert ref["ground_truth"]["forget_error"] < 0.05
    assert ref["original"]["forget_error"] > 0.3


def test_retrain_starts_from_an_initialisation_of_its_own(bench):
    """Retrain's fresh model must not be the ground-truth (or original) model's initialisation."""
    from overunlearn.engine import reinitialise_trainable

    prob = bench.problem(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        shared_init = bench.make_model()  # how the original and ground-truth models start
    fresh = reinitialise_trainable(prob, bench.make_model(), seed=1)
    w_init, w_fresh = nn.utils.parameters_to_vector(shared_init.parameters()), nn.utils.parameters_to_vector(fresh.parameters())
    assert not torch.allclose(w_init, w_fresh)
    again = reinitialise_trainable(prob, bench.make_model(), seed=1)
    assert torch.equal(nn.utils.parameters_to_vector(again.parameters()), w_fresh)  # deterministic per seed
    other = reinitialise_trainable(bench.problem(2), bench.make_model(), seed=2)
    assert not torch.allclose(nn.utils.parameters_to_vector(other.parameters()), w_fresh)


def test_small_cnn_and_resnet_shapes():
    from overunlearn.models.resnet import two_head_resnet18

    m = SmallCNN(3, 10, 3, width=4, hidden=8)
    a, b = m(torch.zeros(2, 3, 28, 28))
    assert a.shape == (2, 10) and b.shape == (2, 3)
    assert SmallCNN(3, 10, None, width=4, hidden=8)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    r = two_head_resnet18(10, 3)
    assert isinstance(r.backbone.maxpool, nn.Identity) and r.backbone.conv1.stride == (1, 1)
    a, b = r(torch.zeros(2, 3, 32, 32))
    assert a.shape == (2, 10) and b.shape == (2, 3)
    with pytest.raises(ValueError):
        m(torch.zeros(2, 1, 28, 28))


def test_resnet50_weights_never_downloaded(tmp_path, monkeypatch):
    from overunlearn.errors import DatasetNotFoundError
    from overunlearn.models.resnet import two_head_resnet50

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="hub cache"):
        two_head_resnet50(200, 3, weights="IMAGENET1K_V1")


def test_unlearning_runs_and_predict_restores_mode(bench):
    from overunlearn.engine import Budget, unlearn
    from overunlearn.methods import create

    prob = bench.problem(1)
    res = unlearn(prob, create("minnorm_og", **ERASE_METHOD_POINTS["minnorm_og"]), Budget(epochs=1), seed=1,
                  device="cpu")
    assert res.record.steps == 1  # 30 forget images, batch 32
    res.model.train()
    predict(res.model, bench.split(1)["forget"])
    assert res.model.training
    metrics = bench.evaluate(res.model, 1)
    assert 0 <= metrics["forget_error"] <= 1


def test_bench_cli_erase_digits(tmp_path):
    from typer.testing import CliRunner

    from overunlearn.cli import _register, app
    from overunlearn.sweep.journal import read_journal

    _register()
    out = tmp_path / "out"
    args = ["bench", "erase", "--dataset", "digits", "--preset", "test", "--cache", str(tmp_path / "c"),
            "--methods", "gd,minnorm_og", "--out", str(out), "-q", "--hp", "gd.lr=0.01", "--threads", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = [line.split("|")[1].strip() for line in res.output.splitlines() if line.startswith("| ")]
    assert rows == ["model", "original", "ground truth", "gd", "**minnorm_og**"]
    (journal,) = out.glob("erase_digits_test_*.jsonl")  # --hp: not the default run's journal
    trials = [r for r in read_journal(journal).records if r.get("kind") == "trial"]
    assert {r["method"]: r["config"]["lr"] for r in trials}["gd"] == 0.01
    stem = journal.with_suffix("").name
    assert (out / f"{stem}_table.md").exists() and (out / f"{stem}_table.csv").exists()
    assert (out / f"{stem}.png").exists()
    assert list((tmp_path / "c" / "models").rglob("*.pt"))  # --cache is the cache root, as CACHE_HELP says
    # rerunning the same command recomputes nothing
    assert CliRunner().invoke(app, args).exit_code == 0
    assert len([r for r in read_journal(journal).records if r.get("kind") == "trial"]) == len(trials)
    res = CliRunner().invoke(app, ["bench", "erase", "--dataset", "cifar10", "--data-root", str(tmp_path / "none"),
                                   "--preset", "test", "--no-cache", "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "cifar-10-batches-py" in res.output


def test_image_benchmarks_declare_their_defaults():
    from overunlearn.benchmarks.base import default_epochs, method_points
    from overunlearn.benchmarks.collapse import COLLAPSE_METHOD_POINTS

    erase = get_benchmark("erase", dataset="digits", preset="cpu", device="cpu")
    assert default_epochs(erase) == (2,) and method_points(erase, 2) == ERASE_METHOD_POINTS
    assert erase.privacy_defaults == {"n_models": 8, "ground_truth": "split", "epochs": 2}
    collapse = get_benchmark("collapse", dataset="digits", preset="cpu", device="cpu")
    assert default_epochs(collapse) == (10,) and method_points(collapse, 10) == COLLAPSE_METHOD_POINTS
    assert collapse.privacy_defaults["epochs"] == 10


def test_resnet50_renormalises_to_imagenet_statistics():
    from overunlearn.models.resnet import IMAGENET_MEAN, IMAGENET_STD, two_head_resnet50

    m = two_head_resnet50(5, 3)
    seen = {}
    def grab(mod, inp, out):
        seen["x"] = inp[0]

    m.backbone.conv1.register_forward_hook(grab)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    m.eval()
    a, b = m(x)
    assert a.shape == (1, 5) and b.shape == (1, 3)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = ((x * 0.5 + 0.5) - mean) / std
    assert torch.allclose(seen["x"], expected, atol=1e-5)
    assert not any("in_scale" in n for n, _ in m.named_parameters())


def test_predict_runs_on_the_models_own_device():
    """A sweep may unlearn on another device than the benchmark's: evaluation follows the model (the images went to
    the benchmark's device and the forward failed on a device mismatch; ``meta`` stands in for CUDA here)."""
    from overunlearn.data.color import ERASE_PALETTE, ColoredImages

    torch.manual_seed(0)
    data = ColoredImages(torch.rand(5, 1, 28, 28), torch.zeros(5, dtype=torch.long),
                         (torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long)), ERASE_PALETTE)
    model = SmallCNN(3, 10, 3)
    logits = predict(model, data, device="meta")
    assert logits[0].shape == (5, 10) and logits[0].device.type == "cpu"
