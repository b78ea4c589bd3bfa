"""Privacy metrics: known answers on synthetic signals, vectorized == brute force, end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from overunlearn.metrics.klom import klom, klom_splits, klom_values
from overunlearn.metrics.mia import mia_efficacy, mia_efficacy_from_signals, population_mia
from overunlearn.metrics.roc import auc_per_column, auc_score, roc_curve, tpr_at_fpr
from overunlearn.metrics.signals import Signals, compute_signals, signals_from_outputs
from overunlearn.metrics.ulira import ulira, ulira_scores
from overunlearn.problem import ClassificationTask, RegressionTask, TensorData


def phi_auc(d: float) -> float:
    """AUC of N(d, 1) against N(0, 1)."""
    return float(norm.cdf(d / math.sqrt(2.0)))


# ---------------------------------------------------------------------------------- ROC

def test_auc_known_values_and_sklearn_agreement():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    same = auc_score(rng.normal(size=20000), rng.normal(size=20000))
    assert abs(same - 0.5) < 0.01
    sep = auc_score(rng.normal(1.0, 1.0, 20000), rng.normal(0.0, 1.0, 20000))
    assert abs(sep - phi_auc(1.0)) < 0.01
    # ties and the ROC curve agree with scikit-learn
    s = rng.integers(0, 5, size=300).astype(float)
    y = rng.integers(0, 2, size=300).astype(bool)
    assert auc_score(s[y], s[~y]) == pytest.approx(roc_auc_score(y, s))
    fpr, tpr, _ = roc_curve(s, y)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, s))
    assert tpr_at_fpr(fpr, tpr, 1.0) == 1.0
    cols = auc_per_column(rng.normal(size=(7, 4)), rng.normal(size=(5, 4)))
    pos, neg = rng.normal(size=(7, 4)), rng.normal(size=(5, 4))
    cols = auc_per_column(pos, neg)
    assert np.allclose(cols, [auc_score(pos[:, j], neg[:, j]) for j in range(4)])


# ---------------------------------------------------------------------------------- signals

def test_classification_signals_match_definitions_and_stay_finite():
    torch.manual_seed(0)
    z = torch.randn(64, 6) * 3
    y = torch.randint(0, 6, (64,))
    s = signals_from_outputs(z, y, ClassificationTask())
    p = torch.softmax(z.double(), 1)
    py = p[torch.arange(64), y]
    assert np.allclose(s.confidence, py.numpy())
    assert np.allclose(s.loss, -torch.log(py).numpy())
    assert np.allclose(s.scaled_confidence, torch.log(py / (1 - py)).numpy())
    assert np.allclose(s.margin, s.scaled_confidence)
    assert np.allclose(s.entropy, -(p * p.log()).sum(1).numpy())
    other = (p * torch.log1p(-p)).clone()
    other[torch.arange(64), y] = 0
    mentr = -(1 - py) * torch.log(py) - other.sum(1)
    assert np.allclose(s.modified_entropy, mentr.numpy())
    assert np.array_equal(s.correct, (z.argmax(1) == y).double().numpy())
    # saturated logits: p_y rounds to 1 in float64, the logit-scaled confidence does not overflow
    big = torch.tensor([[80.0, 0.0, -5.0], [0.0, 90.0, 0.0]])
    sb = signals_from_outputs(big, torch.tensor([0, 0]), ClassificationTask())
    assert np.isfinite(sb.margin).all() and np.isfinite(sb.modified_entropy).all()
    assert sb.margin[0] == pytest.approx(80.0 - math.log(1 + math.exp(-5.0)))
    assert sb.margin[1] == pytest.approx(-90.0 - math.log(1 + math.exp(-90.0)), abs=1e-9) or sb.margin[1] < -89


def test_regression_multihead_and_compute_signals():
    out = torch.tensor([[1.0], [0.5], [-2.0]])
    tgt = torch.tensor([[0.0], [1.0], [-2.0]])
    s = signals_from_outputs(out, tgt, RegressionTask())
    assert np.allclose(s.margin, [1.0, -0.5, 0.0]) and np.allclose(s.loss, [1.0, 0.25, 0.0])
    assert np.isnan(s.confidence).all()
    # multi-head: per-head signals read the chosen head; total_loss sums the heads
    torch.manual_seed(1)
    heads = (torch.randn(5, 4), torch.randn(5, 3))
    tg = (torch.randint(0, 4, (5,)), torch.randint(0, 3, (5,)))
    s0 = signals_from_outputs(heads, tg, ClassificationTask(), head=0)
    s1 = signals_from_outputs(heads, tg, ClassificationTask(), head=1)
    assert np.allclose(s0.total_loss, s0.loss + s1.loss)
    with pytest.raises(ValueError):
        signals_from_outputs(heads, tg, ClassificationTask(), head=2)
    # batched model evaluation equals one big batch; train mode is restored
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
    data = TensorData(torch.randn(37, 4), torch.randint(0, 3, (37,)))
    model.train()
    sig = compute_signals(model, data, ClassificationTask(), batch_size=8)
    assert model.training
    model.eval()
    with torch.no_grad():
        ref = signals_from_outputs(model(data.inputs), data.targets, ClassificationTask())
    for name in ("loss", "margin", "modified_entropy"):
        assert np.allclose(sig.get(name), ref.get(name))
    assert sig.get("correctness") is sig.correct and len(sig) == 37
    stacked = Signals.stack([sig, sig])
    assert stacked.loss.shape == (2, 37) and stacked.select([1]).loss.shape == (1, 37)


# ---------------------------------------------------------------------------------- MIA

def test_population_mia_known_answers():
    rng = np.random.default_rng(0)
    same = population_mia(rng.normal(size=1500), rng.normal(size=1500), seed=0)
    assert abs(same.accuracy - 0.5) < 0.05 and abs(same.auc - 0.5) < 0.05
    # members have lower loss by d = 1: AUC = Phi(1/sqrt 2), best accuracy = Phi(1/2)
    sep = population_mia(rng.normal(0.0, 1.0, 3000), rng.normal(1.0, 1.0, 3000), seed=0)
    assert abs(sep.auc - phi_auc(1.0)) < 0.03
    assert abs(sep.threshold_auc - phi_auc(1.0)) < 0.03
    assert abs(sep.accuracy - norm.cdf(0.5)) < 0.03
    # balancing: the larger set is subsampled to the size of the smaller one
    bal = population_mia(rng.normal(size=40), rng.normal(size=500), seed=1)
    assert bal.n_used_per_class == 40 and np.isnan(bal.per_example_test).sum() == 460
    assert not np.isnan(bal.per_example).any()
    tiny = population_mia([0.1], [0.2, 0.3])
    assert math.isnan(tiny.accuracy)
    assert set(sep.summary()) >= {"accuracy", "auc"}


def test_mia_efficacy_known_answers():
    rng = np.random.default_rng(0)
    retain = rng.normal(3.0, 0.5, 800)
    test = rng.normal(0.0, 0.5, 800)
    like_test = mia_efficacy(retain, test, rng.normal(0.0, 0.5, 300), feature="confidence")
    like_retain = mia_efficacy(retain, test, rng.normal(3.0, 0.5, 300), feature="confidence")
    assert like_test.efficacy > 0.95 and like_retain.efficacy < 0.05
    assert like_test.per_example.shape == (300,) and like_test.train_accuracy > 0.95
    # identical distributions: about half of the forget set is called a non-member
    same = mia_efficacy(rng.normal(size=800), rng.normal(size=800), rng.normal(size=400))
    assert 0.2 < same.efficacy < 0.8
    with pytest.raises(ValueError, match="NaN"):
        mia_efficacy([np.nan, 1.0], [0.0, 1.0], [0.5])
    z = torch.randn(60, 4) * 2
    sig = signals_from_outputs(z, torch.randint(0, 4, (60,)), ClassificationTask())
    res = mia_efficacy_from_signals(sig, sig, sig)
    assert set(res) == {"confidence", "entropy", "modified_entropy", "correctness"}


# ---------------------------------------------------------------------------------- KLoM

def klom_brute(u, o, bins=20, clip=100.0, eps=1e-5, edges="shared"):
    out = []
    for j in range(u.shape[1]):
        a, b = np.clip(u[:, j], -clip, clip), np.clip(o[:, j], -clip, clip)
        if edges == "shared":
            ea = eb = np.linspace(min(a.min(), b.min()), max(a.max(), b.max()), bins + 1)
        else:
            ea, eb = np.linspace(a.min(), a.max(), bins + 1), np.linspace(b.min(), b.max(), bins + 1)
        p = np.eye(bins)[0] if ea[0] == ea[-1] else np.histogram(a, ea)[0] / a.size
        q = np.eye(bins)[0] if eb[0] == eb[-1] else np.histogram(b, eb)[0] / b.size
        kl = 0.0
        for pb, qb in zip(p, q, strict=True):
            if pb > 0:
                kl += pb * math.log(pb / max(qb, eps))
        out.append(kl)
    return np.array(out)


@pytest.mark.parametrize("edges", ["shared", "separate"])
def test_klom_vectorized_equals_brute_force(edges):
    rng = np.random.default_rng(3)
    u = rng.normal(size=(16, 300)) * np.r_[np.ones(150), 300 * np.ones(150)]  # some columns hit the clip
    o = rng.normal(0.7, 1.3, size=(11, 300))
    u[:, :4] = 2.0  # constant samples
    o[:, :2] = 2.0
    o[:, 10] = np.round(o[:, 10])  # ties on bin edges
    for bins in (20, 3):
        assert np.allclose(klom_values(u, o, bins=bins, edges=edges), klom_brute(u, o, bins=bins, edges=edges),
                           atol=1e-12)


def test_klom_known_answers():
    rng = np.random.default_rng(0)
    same = klom(rng.normal(size=(4000, 50)), rng.normal(size=(4000, 50)))
    assert same.summary()["mean"] < 0.02  # ~ (bins - 1) / (2N)
    far = klom(rng.normal(size=(500, 50)), rng.normal(8.0, 1.0, size=(500, 50)))
    assert far.summary()["mean"] > 5.0  # disjoint supports: close to log(1 / eps) = 11.5
    assert klom_values(np.ones((5, 3)), np.ones((7, 3))).tolist() == [0.0, 0.0, 0.0]
    res = klom_splits({"forget": rng.normal(size=(8, 5)), "test": rng.normal(size=(8, 6))},
                      {"forget": rng.normal(size=(8, 5)), "test": rng.normal(size=(8, 6))})
    assert set(res) == {"forget", "test"} and res["test"].per_example.shape == (6,)
    assert set(res["forget"].summary()) >= {"mean", "p95", "p99"}


# ---------------------------------------------------------------------------------- U-LiRA

def ulira_brute(u, r, folds=None, global_variance=False, min_std=1e-4):
    k = max(len(u), len(r)) if folds is None else folds
    su, sr = np.zeros_like(u), np.zeros_like(r)
    for f in range(k):
        us, rs = u[np.arange(len(u)) % k != f], r[np.arange(len(r)) % k != f]
        for j in range(u.shape[1]):
            mu_u, mu_r = us[:, j].mean(), rs[:, j].mean()
            if global_variance:
                var_u, var_r = us.var(axis=0, ddof=1).mean(), rs.var(axis=0, ddof=1).mean()
            else:
                var_u, var_r = us[:, j].var(ddof=1), rs[:, j].var(ddof=1)
            sd_u, sd_r = max(math.sqrt(var_u), min_std), max(math.sqrt(var_r), min_std)
            for i in np.flatnonzero(np.arange(len(u)) % k == f):
                su[i, j] = norm.logpdf(u[i, j], mu_u, sd_u) - norm.logpdf(u[i, j], mu_r, sd_r)
            for i in np.flatnonzero(np.arange(len(r)) % k == f):
                sr[i, j] = norm.logpdf(r[i, j], mu_u, sd_u) - norm.logpdf(r[i, j], mu_r, sd_r)
    return su, sr


@pytest.mark.parametrize("folds,global_variance", [(None, False), (4, False), (3, True)])
def test_ulira_vectorized_equals_brute_force(folds, global_variance):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    u = rng.normal(0.3, 1.0, size=(9, 25)) + rng.normal(size=25)
    r = rng.normal(0.0, 1.5, size=(8, 25)) + rng.normal(size=25)
    su, sr, _ = ulira_scores(u, r, folds=folds, global_variance=global_variance)
    bu, br = ulira_brute(u, r, folds=folds, global_variance=global_variance)
    assert np.allclose(su, bu) and np.allclose(sr, br)
    res = ulira(u, r, folds=folds, global_variance=global_variance)
    labels = np.r_[np.ones(su.size), np.zeros(sr.size)]
    assert res.auc == pytest.approx(roc_auc_score(labels, np.r_[su.ravel(), sr.ravel()]))
    assert res.per_example.shape == (25,)


def test_ulira_known_answers():
    rng = np.random.default_rng(2)
    centers = rng.normal(0, 3, size=400)  # every example has its own mean
    same = ulira(centers + rng.normal(size=(20, 400)), centers + rng.normal(size=(20, 400)))
    assert abs(same.auc - 0.5) < 0.04 and same.tpr_at_fpr[0.01] < 0.05
    far = ulira(centers + 3.0 + rng.normal(size=(20, 400)), centers + rng.normal(size=(20, 400)))
    assert far.auc > 0.95 and far.tpr_at_fpr[0.01] > 0.5
    assert set(far.summary()) >= {"auc", "tpr@1%fpr", "tpr@5%fpr"}
    with pytest.raises(ValueError, match="shadow"):
        ulira(rng.normal(size=(2, 5)), rng.normal(size=(2, 5)))


# ---------------------------------------------------------------------------------- end to end

def test_privacy_report_end_to_end(tmp_path, monkeypatch):
    from overunlearn.privacy.runner import PrivacyRunner, format_rows, load_arrays, parse_methods, privacy_report
    from overunlearn.privacy.setups import digits_setup

    setup = digits_setup(seed=0, n_retain=200, n_forget=40, n_test=120, hidden=64, steps=100, lr=1e-2,
                         train_batch_size=None, forget="mislabeled")
    kwargs = dict(n_models=6, cache_dir=tmp_path / "cache", device="cpu", out_dir=tmp_path / "out",
                  klom_bins="auto", plots=True)
    rows = privacy_report(setup, [("gd", {"lr": 1e-3}, 1)], **kwargs)
    by = {r["label"]: r for r in rows}
    assert list(by) == ["original", "ground_truth", "gd"]
    orig, gt = by["original"], by["ground_truth"]
    # the untouched original remembers its (mislabeled) forget set; retrained models do not
    assert orig["acc_forget"] > gt["acc_forget"] + 0.3
    assert orig["mia_auc"] > gt["mia_auc"] + 0.2
    assert orig["mia_eff_confidence"] < gt["mia_eff_confidence"]
    assert orig["ulira_auc"] > 0.9 and gt["ulira_auc"] < 0.75
    assert orig["klom_forget_mean"] > gt["klom_forget_mean"]
    for col in ("mia_acc", "ulira_tpr@1%fpr", "klom_test_p99", "klom_retain_p95", "seconds"):
        assert col in by["gd"]
    assert "original" in format_rows(rows)
    # files for plots: rows (JSON), per-example arrays (npz), two figures
    saved = json.loads((tmp_path / "out" / "privacy_rows.json").read_text())
    assert [r["label"] for r in saved] == ["original", "ground_truth", "gd"]
    arrays = load_arrays(tmp_path / "out" / "privacy_arrays.npz")
    assert arrays["original"]["loss_forget"].shape == (6, 40)
    assert arrays["gd"]["klom_forget"].shape == (40,)
    assert (tmp_path / "out" / "loss_hist.png").stat().st_size > 0
    assert (tmp_path / "out" / "klom_cdf.png").stat().st_size > 0
    # a second run reads every signal from the cache: nothing is trained or unlearned again
    runner = PrivacyRunner(setup, data_seed=0, cache_dir=tmp_path / "cache", device="cpu")
    cached = runner.reference_signals("original", 6)
    assert np.array_equal(np.stack([c["forget"].loss for c in cached]), arrays["original"]["loss_forget"])
    runner.unlearned_signals(parse_methods([("gd", {"lr": 1e-3}, 1)])[0], 6)
    assert runner.timings == {}
    # ... unless the unlearning code changed: then the unlearned models are recomputed, not reused
    import overunlearn.privacy.runner as PM

    real = PM.unlearning_fingerprint()
    monkeypatch.setattr(PM, "unlearning_fingerprint", lambda: "edited-" + real)
    runner = PrivacyRunner(setup, data_seed=0, cache_dir=tmp_path / "cache", device="cpu")
    again = runner.unlearned_signals(parse_methods([("gd", {"lr": 1e-3}, 1)])[0], 6)
    assert len(runner.timings["unlearn_gd"]) == 6
    assert np.array_equal(np.stack([g["forget"].loss for g in again]), arrays["gd"]["loss_forget"])  # same code, same bits

def test_method_spec_parsing_and_errors():
    from overunlearn.engine import Budget
    from overunlearn.privacy.runner import MethodSpec, as_privacy_setup, parse_methods

    specs = parse_methods([("gd", {"lr": 1e-3}, 2), ("mn", "minnorm_og", {}, {"epochs": 3}),
                           MethodSpec("ngd", {}, Budget(steps=4))])
    assert [s.name for s in specs] == ["gd", "mn", "ngd"]
    assert specs[1].make_budget() == Budget(epochs=3) and specs[0].make_budget() == Budget(epochs=2)
    assert specs[0].key() != parse_methods([("gd", {"lr": 1e-2}, 2)])[0].key()
    assert [s.name for s in parse_methods({"a": ("gd", {}, 1), "b": ("gd", {}, 2)})] == ["a", "b"]
    with pytest.raises(ValueError, match="unique"):
        parse_methods([("gd", {}, 1), ("gd", {}, 2)])
    with pytest.raises(TypeError, match="privacy_setup"):
        as_privacy_setup(object())


def test_image_benchmark_adapter(tmp_path):
    from overunlearn.benchmarks.erase import EraseBenchmark
    from overunlearn.privacy.runner import as_privacy_setup

    bench = EraseBenchmark("digits", preset="test", cache_dir=tmp_path, device="cpu", progress=False)
    setup = as_privacy_setup(bench, seed=1)
    assert setup.head == 1 and setup.name.startswith("erase")
    assert len(setup.forget) == len(bench.split(1)["forget"])
    # test examples are coloured like the forget set (red and green copies)
    assert set(setup.test.targets[1].unique().tolist()) == {1, 2}
    assert set(setup.forget.targets[1].unique().tolist()) == {1, 2}
    model = setup.fit("oracle", 3)
    sig = compute_signals(model, setup.test, setup.task, head=setup.head)
    assert sig.margin.shape == (len(setup.test),) and np.isfinite(sig.margin).all()


def test_poison_adapter():
    from overunlearn.benchmarks.poison import PoisonBenchmark, PoisonRecipe
    from overunlearn.privacy.runner import as_privacy_setup, evaluate_set

    recipe = PoisonRecipe(hidden=(16, 16), original_steps=30, ground_truth_steps=20, name="tiny")
    setup = as_privacy_setup(PoisonBenchmark(recipe, workers=1), seed=2)
    assert (len(setup.retain), len(setup.forget), len(setup.test)) == (50, 5, 200)
    assert torch.all(setup.test.targets == 1.5) and setup.batch_size == 55
    models = setup.fit_ensemble("original", [1, 2, 3, 4])
    oracles = setup.fit_ensemble("oracle", [5, 6, 7, 8])
    sig = {k: Signals.stack([compute_signals(m, getattr(setup, k), setup.task) for m in models])
           for k in ("forget", "retain", "test")}
    osig = {k: Signals.stack([compute_signals(m, getattr(setup, k), setup.task) for m in oracles])
            for k in ("forget", "retain", "test")}
    ev = evaluate_set(sig, osig, setup.task, klom_kwargs={"bins": 3})
    assert {"mia_eff_loss", "ulira_auc", "klom_forget_mean", "loss_test"} <= set(ev.row)
    assert "mia_eff_confidence" not in ev.row  # probability features do not exist for regression


def test_vmapped_ensemble_equals_independent_training():
    from overunlearn.privacy.setups import DigitsMLP, fit_ensemble_vmap, seeded_model

    torch.manual_seed(0)
    data = TensorData(torch.randn(40, 5), torch.randint(0, 3, (40,)))
    task = ClassificationTask()

    def make():
        return DigitsMLP(5, 8, 3)

    for batch_size in (None, 16):
        ens = fit_ensemble_vmap(make, data, task, [11, 12], steps=7, lr=1e-2, weight_decay=0.01,
                                batch_size=batch_size)
        for i, sd in enumerate([11, 12]):
            ref = seeded_model(make, sd)
            opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01)
            gen = torch.Generator().manual_seed(sd + 7919)
            perm, pos = None, 0
            for _ in range(7):
                if batch_size is None:
                    idx = torch.arange(40)
                else:
                    if perm is None or pos + batch_size > 40:
                        perm, pos = torch.randperm(40, generator=gen), 0
                    idx, pos = perm[pos:pos + batch_size], pos + batch_size
                opt.zero_grad()
                task.per_sample_loss(ref(data.inputs[idx]), data.targets[idx]).mean().backward()
                opt.step()
            for (k, a), b in zip(ens[i].state_dict().items(), ref.state_dict().values(), strict=True):
                assert torch.allclose(a, b, atol=1e-5), k


def test_privacy_retrain_never_starts_from_an_originals_initialisation(tmp_path):
    """With data seed 0 the originals are trained from seeds 0, 1, ...: Retrain of original i, unlearned
    with seed i, must still start from an initialisation of its own."""
    from torch import nn as _nn

    from overunlearn.privacy.runner import PrivacyRunner, model_seeds, parse_methods
    from overunlearn.privacy.setups import digits_setup, seeded_model

    setup = digits_setup(seed=0, n_retain=60, n_forget=10, n_test=20, hidden=16, steps=5, lr=1e-2,
                         train_batch_size=None, forget="mislabeled")
    runner = PrivacyRunner(setup, data_seed=0, cache_dir=False, device="cpu")
    spec = parse_methods([("retrain", {"lr": 1e-12}, 1)])[0]  # lr ~ 0: the result is the initialisation
    vec = lambda m: _nn.utils.parameters_to_vector(m.parameters()).detach()  # noqa: E731
    inits = [vec(seeded_model(setup.make_model, sd)) for sd in model_seeds("original", 2, 0)]
    for i in range(2):
        fresh = vec(runner.unlearn_one(spec, i, seeded_model(setup.make_model, 99)))
        assert all(not torch.allclose(fresh, w, atol=1e-4) for w in inits)


def test_language_model_margins_stay_exact_when_the_label_probability_rounds_to_one():
    """The language-model path took log(1 - p_y) from probabilities clamped at 1 - 1e-15: margins saturated at 34.5
    (the classifier path computes them from logits)."""
    from torch import nn

    from overunlearn.problem import CausalLMTask

    for gap in (5.0, 40.0, 60.0):
        z = torch.zeros(2, 3, 5, dtype=torch.float64)
        z[..., 2] = gap
        labels = torch.full((2, 3), 2)
        sig = compute_signals(nn.Identity(), TensorData(z, labels), CausalLMTask(shift=False), batch_size=2)
        exact = gap - math.log(4.0)  # z_y - logsumexp of the four others (zeros)
        np.testing.assert_allclose(sig.margin, exact, rtol=1e-12)
        np.testing.assert_allclose(sig.scaled_confidence, exact, rtol=1e-12)
        np.testing.assert_allclose(sig.loss, math.log1p(4 * math.exp(-gap)), rtol=1e-9, atol=1e-15)
