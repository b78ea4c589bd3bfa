"""Representation Collapse on scikit-learn digits with tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from overunlearn.benchmarks import get_benchmark
from overunlearn.benchmarks.collapse import COLLAPSE_METHOD_POINTS, CollapseBenchmark, collapse_metrics
from overunlearn.benchmarks.training import TEST_RECIPE, Phase, train
from overunlearn.data.color import COLLAPSE_PALETTE, FULL_GRAY


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    cache = tmp_path_factory.mktemp("collapse-cache")
    return get_benchmark("collapse", dataset="digits", preset="test", cache_dir=cache, device="cpu", progress=False)


def test_split_sizes_colours_and_weights(bench):
    s = bench.split(1)
    p = 0.05
    retain, forget = s["retain"], s["forget"]
    assert len(retain) == 300 and len(s["accessible"]) == 60
    # retain: coloured by the label's palette colour
    assert torch.equal(retain.color, retain.targets)
    # forget: round(p * 30) = 2 per class, each recoloured with another colour, labelled by content
    assert torch.bincount(forget.targets, minlength=10).tolist() == [2] * 10
    assert torch.all(forget.color != forget.targets)
    assert torch.allclose(retain.weights, torch.full((300,), p / (1 + p)))
    assert torch.allclose(forget.weights, torch.full((20,), 1 / (1 + p)))
    # total weights of the two sets are comparable (equal when p * n_class is an integer)
    assert float(forget.weights.sum()) == pytest.approx(float(retain.weights.sum()) * 20 / 15, rel=1e-6)
    warm = s["warm"]
    assert torch.equal(warm.palette, FULL_GRAY) and warm.weights is None and len(warm) == 300
    assert torch.equal(s["original_train"].lum[:300], retain.lum)


def test_recolouring_covers_every_other_colour(bench):
    cols = []
    for seed in range(1, 8):
        f = bench.split(seed)["forget"]
        cols.append((f.color - f.targets) % 10)
    shifts = torch.cat(cols)
    assert shifts.min() >= 1 and set(shifts.tolist()) == set(range(1, 10))


def test_problem_is_unweighted_by_default_like_the_reference_code(bench):
    """The sample weights are training weights; unlearning uses plain CE unless asked to keep them."""
    prob = bench.problem(1)
    assert prob.retain.weights is None and prob.forget.weights is None
    x = prob.retain.inputs
    y = prob.retain.targets
    # an image of class 2 is blue: red and green channels at -1
    blue = x[y == 2]
    assert torch.all(blue[:, :2] == -1.0)
    weighted = CollapseBenchmark("digits", preset="test", cache_dir=bench.cache.root, device="cpu",
                                 progress=False, unlearn_weights=True).problem(1)
    split = bench.split(1)
    p = bench.preset.p_forget
    assert torch.allclose(weighted.forget.weights, torch.full((len(split["forget"]),), 1 / (1 + p)))
    assert torch.allclose(weighted.retain.weights, torch.full_like(weighted.retain.weights, p / (1 + p)))
    assert not isinstance(prob.model(x[:2]), tuple)  # single head


def test_metrics_on_hand_built_predictions():
    n = 20
    labels = torch.arange(n) % 10
    colour_clf = torch.stack([nn.functional.one_hot(torch.full((n,), j), 10).float() for j in range(10)])
    m = collapse_metrics(colour_clf, labels)
    assert m["color_acc"] == 1.0 and m["content_acc"] == pytest.approx(0.1)
    content_clf = nn.functional.one_hot(labels, 10).float().expand(10, n, 10)
    m = collapse_metrics(content_clf, labels)
    assert m["content_acc"] == 1.0 and m["color_acc"] == pytest.approx(0.1)


class _Colour(nn.Module):
    """Predicts the palette index whose RGB direction best matches the mean pixel colour."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        rgb = (x * 0.5 + 0.5).sum(dim=(2, 3))
        rgb = rgb / rgb.sum(1, keepdim=True).clamp(min=1e-6)
        pal = COLLAPSE_PALETTE / COLLAPSE_PALETTE.sum(1, keepdim=True)
        return -torch.cdist(rgb, pal) * 100 + self.w


def test_evaluate_stub_colour_classifier(bench):
    m = bench.evaluate(_Colour(), 1)
    # cyan (0, 255, 255) and teal (0, 128, 128) share a hue: a hue-only classifier gets 9 copies of 10
    assert m["color_acc"] == pytest.approx(0.9, abs=0.01)


def test_training_phases_share_optimizer_and_scheduler(bench):
    s = bench.split(1)
    phases = bench._phases(s, "original")
    assert [p.desc for p in phases] == ["gray warm start", "original"]
    assert [p.epochs for p in phases] == [1, 2]
    gt = bench._phases(s, "ground_truth")
    assert [p.desc for p in gt] == ["ground truth"] and len(gt[0].data) == 300
    recipe = TEST_RECIPE.replace(step_size=2, gamma=0.5, lr=0.04)
    model = bench.make_model()
    tiny = s["warm"].subset(torch.arange(8))
    summary = train(model, [Phase(tiny, 3), Phase(tiny, 2)], recipe, seed=0, progress=False)
    # 5 epochs in one schedule: steps after epochs 2 and 4
    assert summary["final_lr"] == pytest.approx(0.04 * 0.25)


def test_reference_and_collapse_rejects_many_classes(bench):
    ref = bench.reference(1)
    assert 0.0 <= ref["original"]["color_acc"] <= 1.0 and "content_acc" in ref["ground_truth"]
    info = bench.training_info(1)
    assert info["original"]["phases"][0]["desc"] == "gray warm start"
    from overunlearn.data.sources import ImageSet

    b = CollapseBenchmark("digits", preset="test", use_cache=False, progress=False)
    b._train = ImageSet("x", "train", torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4), 200)
    with pytest.raises(ValueError, match="10-class"):
        b.split(1)


def test_unlearning_step_with_weights(bench):
    from overunlearn.engine import Budget, unlearn
    from overunlearn.methods import create

    prob = CollapseBenchmark("digits", preset="test", cache_dir=bench.cache.root, device="cpu",
                             progress=False, unlearn_weights=True).problem(1)
    for name in ("minnorm_og", "ngp"):
        hyper = dict(COLLAPSE_METHOD_POINTS[name])
        hyper.pop("num_gd_epochs", None)
        res = unlearn(prob, create(name, **hyper), Budget(epochs=1), seed=1, device="cpu")
        assert res.record.steps == 1
        assert 0.0 <= bench.evaluate(res.model, 1)["color_acc"] <= 1.0


def test_normalize_weights_makes_training_invariant_to_weight_scale(bench):
    tiny = bench.split(1)["original_train"].subset(torch.arange(290, 310))
    recipe = TEST_RECIPE.replace(normalize_weights=True)
    params = []
    for scale in (1.0, 7.0):
        data = tiny.subset(torch.arange(len(tiny)))
        data.weights = data.weights * scale
        torch.manual_seed(0)
        model = bench.make_model()
        train(model, [Phase(data, 2)], recipe, seed=0, progress=False)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(params[0], params[1], atol=1e-5)


def test_bench_cli_collapse_digits(tmp_path):
    from typer.testing import CliRunner

    from overunlearn.cli import _register, app

    _register()
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["bench", "collapse", "--dataset", "digits", "--preset", "test", "--cache",
                                   str(tmp_path / "c"), "--methods", "gd,retrain", "--seeds", "1-2", "--out",
                                   str(out), "-q", "-j", "1"])
    assert res.exit_code == 0, res.output
    assert "color_acc" in res.output and "±" in res.output  # two seeds: mean ± SE
    lines = (out / "collapse_digits_test_table.csv").read_text().splitlines()
    # long format: (original, ground truth, gd, retrain) x (color_acc, content_acc)
    assert lines[0] == "model,metric,n,mean,se" and len(lines) == 1 + 4 * 2
    assert (out / "collapse_digits_test.jsonl").exists()
