"""The ``facts`` benchmark: generated world, splits, metrics, ground truth, and the ``bench facts`` command."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from overunlearn.benchmarks.facts import FactsBenchmark, FactsPreset, get_preset  # noqa: E402
from overunlearn.data.facts import ATTRIBUTES, generate_world  # noqa: E402


def test_the_world_is_a_function_of_its_seed():
    a, b, c = generate_world(30, 3, 50, 7), generate_world(30, 3, 50, 7), generate_world(30, 3, 50, 8)
    assert a.names == b.names and a.facts == b.facts and a.copy_train == b.copy_train and a.vocab == b.vocab
    assert a.facts != c.facts
    assert len(set(a.names)) == 30
    assert not set(a.copy_train) & set(a.copy_test)


def test_held_out_templates_are_never_trained_on_for_their_fact_but_every_template_is_trained():
    w = generate_world(60, 4, 50, 0)
    trained: dict[str, set[int]] = {}
    for f in w.facts:
        assert f.held_out_template not in f.train_templates and len(f.train_templates) == 2
        train_questions = {w.question(f, t) for t in f.train_templates}
        assert w.question(f, f.held_out_template) not in train_questions
        trained.setdefault(f.attribute, set()).update(f.train_templates)
    assert all(trained[a] == {0, 1, 2} for a in w.attributes)


def _bench(**kw) -> FactsBenchmark:
    return FactsBenchmark("test", use_cache=False, device="cpu", **kw)


def test_forget_and_retain_people_share_no_fact():
    b = _bench(people=20)
    s = b.split(1)
    assert s["forget_people"] and not s["forget_people"] & s["retain_people"]
    assert s["forget_people"] | s["retain_people"] == set(range(20))
    forget_names = {b.world.names[p] for p in s["forget_people"]}
    retain_seqs = b._sequences(s["retain_facts"], copy=b.world.copy_train)
    words = {tuple(row.tolist()) for row in retain_seqs.inputs["input_ids"]}
    for name in forget_names:
        first, last = (b.world.index[x] for x in name.split())
        assert not any(any(r[i] == first and r[i + 1] == last for i in range(len(r) - 1)) for r in words)
    assert b.split(1)["forget_people"] == s["forget_people"] and b.split(2)["forget_people"] != s["forget_people"]


class _Oracle(nn.Module):
    """Logits whose argmax at position t is the token at t + 1: answers everything right."""

    def __init__(self, vocab: int, confidence: float = 20.0) -> None:
        super().__init__()
        self.vocab, self.confidence = vocab, confidence
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        nxt = torch.roll(input_ids, -1, dims=1)
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float() * self.confidence + self.w
        return {"logits": logits}


class _Uniform(_Oracle):
    def forward(self, input_ids, attention_mask=None):
        return {"logits": torch.zeros(*input_ids.shape, self.vocab) + self.w}


def test_metrics_on_hand_built_predictions(monkeypatch):
    b = _bench()
    v = len(b.world.vocab)
    gt = _Uniform(v)
    monkeypatch.setattr(b, "models", lambda seed: (gt, gt, {}))
    perfect = b.evaluate(_Oracle(v), 1)
    assert perfect["forget_em"] == perfect["retain_em"] == perfect["general_acc"] == 1.0
    assert perfect["forget_em_heldout"] == perfect["retain_em_heldout"] == 1.0
    assert perfect["forget_prob"] > 0.99
    assert perfect["forget_quality"] < 0.05  # truth ratios ~0 against the uniform ground truth's 1
    flat = b.evaluate(_Uniform(v), 1)
    assert flat["forget_em"] == flat["retain_em"] == flat["general_acc"] == 0.0  # argmax of ties is <pad>
    assert flat["forget_prob"] == pytest.approx(1 / v)
    assert flat["forget_quality"] == 1.0  # identical to the ground truth


def test_original_memorises_and_ground_truth_guesses_on_a_tiny_run(tmp_path):
    b = FactsBenchmark("test", cache_dir=tmp_path, device="cpu", people=16, train_steps=400)
    ref = b.reference(1)
    assert ref["original"]["forget_em"] >= 0.75
    assert ref["ground_truth"]["forget_em"] <= b.prior() + 0.25
    assert ref["ground_truth"]["general_acc"] >= 0.8
    # the cache: a second benchmark object loads the same models
    again = FactsBenchmark("test", cache_dir=tmp_path, device="cpu", people=16, train_steps=400)
    assert again.training_info(1)["original"]["cache_hit"]
    p = again.problem(1)
    assert len(p.forget) == 2 * len(again.split(1)["forget_facts"])


def test_bad_options_fail_before_any_training():
    with pytest.raises(ValueError, match="unknown facts preset 'huge'"):
        get_preset("huge")
    with pytest.raises(ValueError, match=r"forget_fraction=1.5 must lie in \(0, 1\)"):
        get_preset("cpu").replace(forget_fraction=1.5)
    with pytest.raises(ValueError, match="at least one person must remain"):
        get_preset("test").replace(people=2, forget_fraction=0.9)
    with pytest.raises(TypeError, match="unknown facts option"):
        get_preset("cpu").replace(persons=3)
    assert isinstance(get_preset("cpu"), FactsPreset)
    assert set(ATTRIBUTES) >= set(generate_world(5, 6, 10).attributes)


def test_bench_facts_cli_smoke_and_clear_errors(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from overunlearn.cli import _register, app

    _register()
    monkeypatch.setenv("OVERUNLEARN_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    for args, message in ((["--preset", "huge"], "unknown facts preset"),
                          (["--forget-fraction", "0"], "forget_fraction=0.0 must lie"),
                          (["--people", "3", "--forget-fraction", "0.9"], "at least one person must remain"),
                          (["--methods", "gd,bogus"], "unknown method")):
        res = runner.invoke(app, ["bench", "facts", *args, "--out", str(tmp_path / "x")])
        assert res.exit_code == 2, res.output
        assert message in re.sub(r"[\s│]+", " ", res.output)  # (the error box wraps long lines)
        assert not (tmp_path / "cache").exists()  # nothing trained
    res = runner.invoke(app, ["bench", "facts", "--preset", "test", "--seeds", "1", "--methods", "gd,minnorm_og",
                              "--out", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    assert "original model" in res.output and "ground truth" in res.output and "minnorm_og" in res.output
    assert (tmp_path / "out" / "facts_test_table.md").is_file() and (tmp_path / "out" / "facts_test.png").is_file()
    # a second run is served from the journal: identical table
    again = runner.invoke(app, ["bench", "facts", "--preset", "test", "--seeds", "1", "--methods", "gd,minnorm_og",
                                "--out", str(tmp_path / "out"), "-q"])
    assert again.exit_code == 0
    table = [line for line in res.output.splitlines() if line.startswith("|")]
    assert table == [line for line in again.output.splitlines() if line.startswith("|")]


def test_privacy_of_the_facts_benchmark_separates_members_from_retrained_models(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from overunlearn.cli import _register, app

    _register()
    monkeypatch.setenv("OVERUNLEARN_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(app, ["bench", "facts", "--preset", "test", "--seeds", "1", "--methods", "gd",
                                   "--people", "16", "--privacy", "--out", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "privacy (seed 1, N = 4" in out and "klom_forget_mean" in out
    table = [line.split() for line in out.splitlines() if line.strip().startswith(("original", "ground_truth", "gd"))]
    by = {r[0]: r for r in table if len(r) > 3}
    # (columns: label, mia_auc, ...) the original model's forget pairs are members, the oracles' are not
    assert float(by["original"][1]) > float(by["ground_truth"][1]) + 0.2


# ---- review fixes (2026-12-03) ------------------------------------------------------------------------------

def test_truth_ratios_stay_finite_for_a_diverged_model():
    """A model with ~200 nats more on another word: the ratio of probabilities was 0 / 0 (NaN p-value)."""

    class Diverged(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, **x):  # noqa: ANN003, ANN201
            out = self.inner(**x)
            out.logits[..., 0] += 200.0
            return out

    b = FactsBenchmark("test", use_cache=False, device="cpu", people=16)
    facts = b.split(1)["forget_facts"]
    model = Diverged(b.make_model())
    with torch.no_grad():
        r = b._log_truth_ratios(model, facts)
    assert torch.isfinite(r).all()
    assert (r.abs() < 50).all()  # every word but 0 is equally unlikely: wrong and true answers tie closely


def test_the_prior_is_a_guess_from_the_retain_facts_and_averages_to_chance():
    b = FactsBenchmark("cpu", use_cache=False, device="cpu")  # (the world only: nothing is trained)
    assert b.chance() == pytest.approx(1 / len(ATTRIBUTES["city"][0]))
    # over many splits a guess from the other people's answers scores about chance on the forget facts, 0.065 here
    # (400 facts, binomial sd ~0.011); the previous prior, the in-sample most frequent answer, was 0.098
    assert abs(b.prior(range(1, 31)) - b.chance()) < 0.03
    assert b.prior((1,)) == pytest.approx(0.15)  # seed 1: 6 of its 40 forget facts


def test_evaluation_follows_the_models_device():
    b = FactsBenchmark("test", use_cache=False, device="cpu", people=16)
    b.device = torch.device("meta")  # as a benchmark built for CUDA evaluating a model unlearned on the CPU
    logp, ok = b._answer_logprobs(b.make_model(), b._sequences(b.split(1)["forget_facts"]))
    assert logp.device.type == "cpu" and torch.isfinite(logp).all()
