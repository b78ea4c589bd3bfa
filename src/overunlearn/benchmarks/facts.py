"""Fact unlearning in a transformer language model with a known retrained ground truth, registered as ``"facts"``.

A Hugging Face GPT-2 built from a config (random weights, word-level tokens from the generated corpus,
:mod:`overunlearn.data.facts`) is trained from scratch until it answers its training facts: every
attribute of every person under two of three question templates, plus a copying rule. For each seed,
the facts of ``forget_fraction`` of the people are the forget set; the ground-truth model is the same
recipe trained without them (its answers about the forget people are the prior: what a model that
never saw them guesses). The unlearning problem's model is the original, its task
:class:`~overunlearn.problem.CausalLMTask` (only answer tokens are scored), its retain set a
``p_retain`` fraction of the retain training sequences.

Metrics of a model (answers are single words; exact match = the answer token is the argmax):

* ``forget_em`` (min): exact match on the forget facts' training questions; ``forget_prob`` (min):
  the mean probability of their answer; ``forget_em_heldout`` (min): exact match on their held-out
  paraphrases;
* ``retain_em`` (max) and ``retain_em_heldout`` (max): the same on the retain facts;
* ``general_acc`` (max): the copying rule on word pairs never trained on (ability beyond memorisation);
* ``forget_quality`` (max): TOFU-style, the p-value of a two-sample Kolmogorov-Smirnov test between the
  model's and the ground-truth model's truth ratios on the forget facts (the truth ratio of a fact is the
  mean probability of five wrong answers of its attribute over the probability of the true one); 1 means
  indistinguishable from the retrained model.

Requires the ``hf`` extra (``transformers``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from overunlearn import structure
from overunlearn.benchmarks.base import MetricSpec, cached_reference, register_benchmark, retrain_seed
from overunlearn.benchmarks.training import ModelCache
from overunlearn.data.facts import ATTRIBUTES, FactWorld, generate_world
from overunlearn.engine import resolve_device
from overunlearn.problem import CausalLMTask, TensorData, UnlearningProblem
from overunlearn.storage import default_cache_dir, stable_hash

#: bump when the data, the model or the training loop changes (invalidates cached models)
DATA_VERSION = 1

FACTS_METRICS = (
    MetricSpec("forget_em", "min", "exact match on the forget facts (training questions)"),
    MetricSpec("forget_prob", "min", "mean answer probability on the forget facts"),
    MetricSpec("forget_em_heldout", "min", "exact match on the forget facts' held-out paraphrases"),
    MetricSpec("retain_em", "max", "exact match on the retain facts (training questions)"),
    MetricSpec("retain_em_heldout", "max", "exact match on the retain facts' held-out paraphrases"),
    MetricSpec("general_acc", "max", "copying rule on word pairs never trained on"),
    MetricSpec("forget_quality", "max", "KS-test p-value: truth ratios on the forget facts vs the ground truth"),
)

#: wrong answers per fact in the truth ratio
N_WRONG = 5


@dataclass(frozen=True)
class FactsPreset:
    """Everything the benchmark needs besides the seed (any field can be overridden by name)."""

    name: str
    people: int
    attributes: int
    copy_pairs: int
    forget_fraction: float
    p_retain: float
    n_layer: int
    n_embd: int
    n_head: int
    train_steps: int
    train_batch: int
    lr: float
    unlearn_batch_size: int
    epochs: int
    world_seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.forget_fraction < 1:
            raise ValueError(f"forget_fraction={self.forget_fraction} must lie in (0, 1)")
        if not 0 < self.p_retain <= 1:
            raise ValueError(f"p_retain={self.p_retain} must lie in (0, 1]")
        forget = max(1, round(self.forget_fraction * self.people))
        if forget >= self.people:
            raise ValueError(f"forget_fraction={self.forget_fraction} of {self.people} people forgets {forget}: "
                             "at least one person must remain in the retain set")
        for f in ("people", "attributes", "copy_pairs", "n_layer", "n_embd", "n_head", "train_steps", "train_batch",
                  "unlearn_batch_size", "epochs"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{f}={v!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")

    def replace(self, **changes: Any) -> FactsPreset:
        """A copy with the non-``None`` ``changes`` applied (unknown names raise ``TypeError``)."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise TypeError(f"unknown facts option(s) {unknown}; preset fields are {sorted(fields)}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def n_forget(self) -> int:
        return max(1, round(self.forget_fraction * self.people))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, FactsPreset] = {
    # a 0.42M-parameter GPT-2 that memorises 100 people x 4 attributes on 2 CPU cores
    "cpu": FactsPreset("cpu", people=100, attributes=4, copy_pairs=300, forget_fraction=0.1, p_retain=1.0, n_layer=2,
                       n_embd=128, n_head=4, train_steps=1200, train_batch=64, lr=3e-3, unlearn_batch_size=32,
                       epochs=5),
    # a larger model and world for a GPU
    "gpu": FactsPreset("gpu", people=400, attributes=6, copy_pairs=400, forget_fraction=0.05, p_retain=1.0,
                       n_layer=4, n_embd=256, n_head=4, train_steps=6000, train_batch=128, lr=2e-3,
                       unlearn_batch_size=64, epochs=5),
    # seconds: for tests and smoke runs (the model does not fully memorise)
    "test": FactsPreset("test", people=20, attributes=2, copy_pairs=60, forget_fraction=0.1, p_retain=1.0, n_layer=1,
                        n_embd=32, n_head=2, train_steps=150, train_batch=32, lr=1e-2, unlearn_batch_size=8, epochs=2),
}

#: one hyperparameter point per method for ``overunlearn bench facts`` (the "cpu" preset, T = 5); see docs/facts.md
FACTS_METHOD_POINTS: dict[str, dict[str, Any]] = {
    "retrain": {"lr": 3e-3},
    "gd": {"lr": 1e-3},
    "ga": {"lr": 1e-4},
    "ngd": {"lr": 1e-3, "noise_sig": 0.01},
    "ngp": {"lr": 1e-3, "ga_coef": 0.5},
    "npo": {"lr": 1e-3, "reg_coef": 0.1},
    "scrub": {"lr": 1e-3, "reg_coef": 1.0, "ga_coef": 0.5},
    "salun": {"lr": 1e-3, "ga_coef": 1.0},
    "l1_sparse": {"lr": 1e-3, "reg_coef": 1e-4},
    "ridge": {"lr": 1e-3, "reg_coef": 1e-3},
    "kl_unif": {"lr": 1e-3, "kl_coef": 1.0},
    "minnorm_og": {"lr": 3e-3, "reg_coef": 0.1, "reg_coef_decay": 0.9, "grad_sample_size": 32},
}


def get_preset(name: str) -> FactsPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown facts preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


class FactsBenchmark:
    """The ``facts`` benchmark (see the module docstring)."""

    name = "facts"
    dataset = "facts"
    metrics = FACTS_METRICS

    def __init__(self, preset: str | FactsPreset = "cpu", *, cache_dir: str | Path | None = None,
                 use_cache: bool = True, device: str | torch.device = "auto", progress: bool = False,
                 **overrides: Any) -> None:
        try:
            import transformers  # noqa: F401
        except ImportError:  # pragma: no cover - only without the extra
            raise ImportError("the facts benchmark needs transformers: pip install 'overunlearn[hf]'") from None
        base = get_preset(preset) if isinstance(preset, str) else preset
        self.preset = base.replace(**overrides)
        self.device = resolve_device(device)
        self.progress = progress
        self.task = CausalLMTask()
        root = (Path(cache_dir) if cache_dir is not None else default_cache_dir() / "models") if use_cache else None
        self.cache = ModelCache(root)
        p = self.preset
        self.world: FactWorld = generate_world(p.people, p.attributes, p.copy_pairs, p.world_seed)
        self.length = self.world.max_length()
        self._models: dict[int, tuple[nn.Module, nn.Module, dict[str, Any]]] = {}
        self._reference: dict[int, dict[str, dict[str, float]]] = {}
        self._wrong = self._wrong_answers()

    # -- defaults of the command line (optional members of the benchmark protocol, benchmarks/base.py) ---
    @property
    def default_epochs(self) -> int:
        """The unlearning epochs ``T`` of ``overunlearn bench facts``: the preset's."""
        return self.preset.epochs

    def method_points(self, epochs: int) -> dict[str, dict[str, Any]]:
        """The methods ``overunlearn bench facts`` runs and their points (:data:`FACTS_METHOD_POINTS`, at every T)."""
        return {m: dict(hp) for m, hp in FACTS_METHOD_POINTS.items()}

    @property
    def privacy_defaults(self) -> dict[str, Any]:
        """Defaults of the privacy report (``bench facts --privacy``): 4 models per set (each is a GPT-2
        trained from scratch), extra retrained ground-truth models, the preset's epochs."""
        return {"n_models": 4, "ground_truth": "extra", "epochs": self.preset.epochs}

    # -- data ---------------------------------------------------------------------
    def forget_people(self, seed: int) -> list[int]:
        g = torch.Generator().manual_seed(int(seed) * 7919 + 11)
        return sorted(torch.randperm(self.preset.people, generator=g)[: self.preset.n_forget()].tolist())

    def _facts(self, people: set[int]) -> list[int]:
        return [i for i, f in enumerate(self.world.facts) if f.person in people]

    def _sequences(self, facts: list[int], heldout: bool = False, copy: list[tuple[str, str]] | None = None
                   ) -> TensorData:
        w = self.world
        questions, answers = [], []
        for i in facts:
            f = w.facts[i]
            for t in ((f.held_out_template,) if heldout else f.train_templates):
                questions.append(w.question(f, t))
                answers.append(f.answer)
        for a, b in copy or []:
            questions.append(f"repeat {a} {b} .")
            answers.append(f"{a} {b}")
        x, y = w.encode(questions, answers, self.length)
        return TensorData(x, y)

    def split(self, seed: int) -> dict[str, Any]:
        forget = set(self.forget_people(seed))
        retain = set(range(self.preset.people)) - forget
        return {"forget_people": forget, "retain_people": retain, "forget_facts": self._facts(forget),
                "retain_facts": self._facts(retain)}

    def _wrong_answers(self) -> list[list[str]]:
        """``N_WRONG`` fixed wrong answers of each fact's attribute (for the truth ratio)."""
        g = torch.Generator().manual_seed(self.preset.world_seed + 101)
        out = []
        for f in self.world.facts:
            choices = [a for a in ATTRIBUTES[f.attribute][0] if a != f.answer]
            idx = torch.randperm(len(choices), generator=g)[:N_WRONG].tolist()
            out.append([choices[i] for i in idx])
        return out

    # -- models -------------------------------------------------------------------
    def key(self) -> str:
        return stable_hash({"benchmark": self.name, "preset": {k: v for k, v in self.preset.to_dict().items()
                                                                if k not in ("name", "p_retain", "unlearn_batch_size",
                                                                             "epochs")},
                            "version": DATA_VERSION})

    def make_model(self) -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        p = self.preset
        cfg = GPT2Config(n_layer=p.n_layer, n_embd=p.n_embd, n_head=p.n_head, vocab_size=len(self.world.vocab),
                         n_positions=self.length, bos_token_id=1, eos_token_id=1, pad_token_id=0, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(cfg)

    def _fresh_model(self, init_seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(init_seed)
            return self.make_model()

    def _train(self, model: nn.Module, data: TensorData, seed: int) -> dict[str, Any]:
        """AdamW with a one-cycle schedule on random batches (no weight decay: the interpolating fit)."""
        p, dev = self.preset, self.device
        model.to(dev).train()
        x = {k: v.to(dev) for k, v in data.inputs.items()}
        y = data.targets.to(dev)  # type: ignore[union-attr]
        opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=p.train_steps, pct_start=0.1)
        g = torch.Generator().manual_seed(int(seed))
        n = len(data)
        t0 = time.perf_counter()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=p.train_steps, desc=f"facts: training (seed {seed})", unit="step", leave=False)
        for _ in range(p.train_steps):
            idx = torch.randint(0, n, (min(p.train_batch, n),), generator=g).to(dev)
            out = model(input_ids=x["input_ids"][idx], attention_mask=x["attention_mask"][idx])
            loss = self.task.per_sample_loss(out, y[idx]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return {"train_seconds": time.perf_counter() - t0, "final_loss": float(loss.detach())}

    def models(self, seed: int) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
        """The original and ground-truth models for ``seed`` (trained once, then loaded from the cache)."""
        if seed in self._models:
            return self._models[seed]
        s = self.split(seed)
        train_sets = {"original": self._sequences(s["forget_facts"] + s["retain_facts"], copy=self.world.copy_train),
                      "ground_truth": self._sequences(s["retain_facts"], copy=self.world.copy_train)}
        def prepare(role: str) -> tuple[Any, nn.Module, Any, dict[str, Any]]:
            data = train_sets[role]

            def fit(m: nn.Module) -> dict[str, Any]:
                info = self._train(m, data, seed)
                info["train_em"] = self._exact_match(m, data)
                return info

            meta = {"benchmark": self.name, "seed": seed, "role": role, "preset": self.preset.to_dict(),
                    "sequences": len(data)}
            return (self.cache.path(self.name, self.dataset, self.key(), seed, role), self._fresh_model(int(seed)),
                    fit, meta)

        self._models[seed] = self.cache.reference_models(prepare, self.device)
        return self._models[seed]

    def training_info(self, seed: int) -> dict[str, Any]:
        return self.models(seed)[2]

    # -- protocol -----------------------------------------------------------------
    def accessible_retain(self, seed: int) -> TensorData:
        """The retain sequences an unlearning method sees: a seeded ``p_retain`` fraction of them."""
        retain = self._sequences(self.split(seed)["retain_facts"], copy=self.world.copy_train)
        if self.preset.p_retain < 1:
            g = torch.Generator().manual_seed(int(seed) * 7919 + 3)
            k = max(1, round(self.preset.p_retain * len(retain)))
            retain = retain.subset(torch.randperm(len(retain), generator=g)[:k].sort().values)
        return retain

    def problem(self, seed: int) -> UnlearningProblem:
        original, _, _ = self.models(seed)
        return UnlearningProblem(model=original, retain=self.accessible_retain(seed),
                                 forget=self._sequences(self.split(seed)["forget_facts"]), task=self.task,
                                 batch_size=self.preset.unlearn_batch_size,
                                 make_model=lambda: self._fresh_model(retrain_seed(seed)))

    @torch.no_grad()
    def _answer_logprobs(self, model: nn.Module, data: TensorData) -> tuple[Tensor, Tensor]:
        """Per sequence: the log-probabilities of the answer's first position over the vocabulary ``(n, V)``,
        and whether every answer token is the argmax ``(n,)``."""
        model.eval()
        dev = structure.model_device(model)  # (a sweep may unlearn on another device than the benchmark's)
        x = {k: v.to(dev) for k, v in data.inputs.items()}
        y = data.targets.to(dev)  # type: ignore[union-attr]
        logits = self.task.select(model(**x))[:, :-1].float()
        labels = y[:, 1:]
        scored = labels != -100
        correct = ((logits.argmax(-1) == labels) | ~scored).all(1)
        first = scored.float().argmax(1)
        rows = torch.arange(len(labels), device=labels.device)
        return torch.log_softmax(logits[rows, first], -1), correct

    def _exact_match(self, model: nn.Module, data: TensorData) -> float:
        was = model.training
        _, ok = self._answer_logprobs(model, data)
        model.train(was)
        return float(ok.float().mean())

    def _log_truth_ratios(self, model: nn.Module, facts: list[int]) -> Tensor:
        """Each fact's log truth ratio, ``log mean_wrong p - log p_true``, computed in log space: the ratio of
        probabilities underflows to 0 / 0 once a (diverged) model puts ~100 nats more on another word."""
        data = self._sequences(facts)  # two training questions per fact; the first one is used
        logp, _ = self._answer_logprobs(model, data)
        logp = logp[::2]
        idx = self.world.index
        true = torch.tensor([idx[self.world.facts[i].answer] for i in facts], device=logp.device)
        wrong = torch.tensor([[idx[a] for a in self._wrong[i]] for i in facts], device=logp.device)
        rows = torch.arange(len(facts), device=logp.device)
        mean_wrong = torch.logsumexp(logp.gather(1, wrong), 1) - math.log(wrong.shape[1])
        return (mean_wrong - logp[rows, true]).cpu()

    def evaluate(self, model: nn.Module, seed: int) -> dict[str, float]:
        from scipy.stats import ks_2samp

        was = model.training
        try:
            s = self.split(seed)
            out: dict[str, float] = {}
            for prefix, facts in (("forget", s["forget_facts"]), ("retain", s["retain_facts"])):
                data = self._sequences(facts)
                logp, ok = self._answer_logprobs(model, data)
                out[f"{prefix}_em"] = float(ok.float().mean())
                if prefix == "forget":
                    first = (data.targets[:, 1:] != -100).float().argmax(1)  # type: ignore[index]
                    ans = data.targets[torch.arange(len(first)), first + 1].to(logp.device)  # type: ignore[index]
                    out["forget_prob"] = float(logp.gather(1, ans[:, None]).exp().mean())
                _, ok_h = self._answer_logprobs(model, self._sequences(facts, heldout=True))
                out[f"{prefix}_em_heldout"] = float(ok_h.float().mean())
            _, ok_c = self._answer_logprobs(model, self._sequences([], copy=self.world.copy_test))
            out["general_acc"] = float(ok_c.float().mean())
            _, gt, _ = self.models(seed)
            # (the KS test reads ranks only, so log ratios give the ratios' p-value)
            mine = self._log_truth_ratios(model, s["forget_facts"]).numpy()
            ref = self._log_truth_ratios(gt, s["forget_facts"]).numpy()
            out["forget_quality"] = float(ks_2samp(mine, ref).pvalue)
            return {k: out[k] for k in (m.name for m in FACTS_METRICS)}
        finally:
            model.train(was)

    def reference(self, seed: int) -> dict[str, dict[str, float]]:
        if seed in self._reference:
            return self._reference[seed]
        original, gt, infos = self.models(seed)
        path = self.cache.path(self.name, self.dataset, self.key(), seed, "reference")
        self._reference[seed] = cached_reference(
            None if path is None else path.with_suffix(".json"), all(i.get("cache_hit") for i in infos.values()),
            lambda: {"original": self.evaluate(original, seed), "ground_truth": self.evaluate(gt, seed)})
        return self._reference[seed]

    def prior(self, seeds: Sequence[int] = (1, 2, 3)) -> float:
        """What a model that never saw the forget people can score by guessing: the exact match on each seed's
        forget facts of answering every attribute's most frequent value among that seed's retain facts, mean
        over ``seeds``. Answers are drawn uniformly, so its expectation is chance, :meth:`chance`."""
        facts = self.world.facts
        scores = []
        for seed in seeds:
            s = self.split(seed)
            counts: dict[str, Counter[str]] = {}
            for i in s["retain_facts"]:
                counts.setdefault(facts[i].attribute, Counter())[facts[i].answer] += 1
            guess = {a: c.most_common(1)[0][0] for a, c in counts.items()}
            forget = s["forget_facts"]
            scores.append(sum(guess.get(facts[i].attribute) == facts[i].answer for i in forget) / max(len(forget), 1))
        return float(sum(scores) / len(scores)) if scores else math.nan

    def chance(self) -> float:
        """The expected exact match of any guess about an unseen person: 1 / the values of an attribute."""
        values = {f.attribute: len(ATTRIBUTES[f.attribute][0]) for f in self.world.facts}
        return float(sum(1.0 / v for v in values.values()) / len(values)) if values else math.nan


@register_benchmark("facts")
def _facts(**options: Any) -> FactsBenchmark:
    return FactsBenchmark(**options)


__all__ = ["FACTS_METHOD_POINTS", "FACTS_METRICS", "FactsBenchmark", "FactsPreset", "PRESETS", "get_preset"]
