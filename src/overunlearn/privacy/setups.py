"""Ready-made :class:`~overunlearn.privacy.runner.PrivacySetup` objects.

* :func:`digits_setup` -- scikit-learn's bundled 8x8 digits (no download), an
  overparameterized MLP, all ``N`` models of a kind trained at once as one vmapped ensemble
  (:func:`fit_ensemble_vmap`). Seconds on a CPU; used by the tests and as a demo.
* :func:`poison_setup`, :func:`image_benchmark_setup` -- adapters for the built-in Data
  Poisoning and image (``erase``, ``collapse``) benchmarks; :func:`adapt_benchmark` picks one
  for a benchmark object without a ``privacy_setup(seed)`` method of its own (``None`` if unknown).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from overunlearn.privacy.runner import PrivacySetup, concat_data
from overunlearn.problem import ClassificationTask, Task, TensorData, as_heads


def seeded_model(make_model: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``make_model()`` with the CPU generator seeded by ``seed``; no generator's state (CUDA's included) changes."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return make_model()


def fit_ensemble_vmap(make_model: Callable[[], nn.Module], data: TensorData, task: Task, seeds: Sequence[int], *,
                      steps: int, lr: float = 1e-3, weight_decay: float = 0.01, batch_size: int | None = None,
                      device: str | torch.device = "cpu") -> list[nn.Module]:
    """Train ``len(seeds)`` independent models at once with ``torch.func`` (stacked parameters + vmap).

    Model ``i`` is initialised under seed ``seeds[i]`` and trained with AdamW on ``task``'s
    (weighted) mean loss for ``steps`` steps, full batch (``batch_size=None``) or on its own
    seeded mini-batch order. AdamW acts element-wise and the summed loss has independent
    gradients per model, so this equals training each model alone. Models without buffers
    that change in training only (no BatchNorm running statistics updates are applied).
    """
    from torch.func import functional_call, stack_module_state, vmap

    dev = torch.device(device)
    models = [seeded_model(make_model, s).to(dev) for s in seeds]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x_all = data.inputs.to(dev)
    y_all = tuple(t.to(dev) for t in as_heads(data.targets))
    single = isinstance(data.targets, torch.Tensor)
    w_all = data.weights.to(dev) if data.weights is not None else None

    def loss_one(p, b, x, y, w):
        out = functional_call(base, (p, b), (x,))
        per = task.per_sample_loss(out, y[0] if single else y)
        return (per * w).mean() if w is not None else per.mean()

    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay)
    n = len(data)
    gens = [torch.Generator().manual_seed(s + 7919) for s in seeds]
    perms: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(seeds)
    pos = 0
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        if batch_size is None or batch_size >= n:
            f = vmap(loss_one, in_dims=(0, 0, None, None, None))
            loss = f(params, buffers, x_all, y_all, w_all).sum()
        else:
            if pos + batch_size > n or perms[0].numel() == 0:
                perms = [torch.randperm(n, generator=g) for g in gens]
                pos = 0
            idx = torch.stack([p[pos:pos + batch_size] for p in perms]).to(dev)  # (N, B)
            pos += batch_size
            xb = x_all[idx]
            yb = tuple(t[idx] for t in y_all)
            wb = w_all[idx] if w_all is not None else None
            f = vmap(loss_one, in_dims=(0, 0, 0, 0, 0 if wb is not None else None))
            loss = f(params, buffers, xb, yb, wb).sum()
        loss.backward()
        opt.step()
    out = []
    for i, m in enumerate(models):
        m.load_state_dict({**{k: v[i].detach() for k, v in params.items()},
                           **{k: v[i] for k, v in buffers.items()}})
        out.append(m.cpu())
    return out


class DigitsMLP(nn.Module):
    """``Linear -> ReLU -> Linear -> ReLU -> Linear``: a small overparameterized classifier."""

    def __init__(self, d_in: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def digits_setup(*, seed: int = 0, n_retain: int = 300, n_forget: int = 60, n_test: int = 300, hidden: int = 128,
                 steps: int = 300, lr: float = 3e-3, weight_decay: float = 0.0, batch_size: int = 64,
                 train_batch_size: int | None = 64, forget: Literal["random", "mislabeled"] = "random",
                 device: str | torch.device = "cpu") -> PrivacySetup:
    """Digits (8x8, 10 classes, bundled with scikit-learn) and an MLP trained with AdamW to interpolation.

    ``forget="random"``: the forget set is a random subset of the training examples.
    ``forget="mislabeled"``: forget examples get a random *wrong* label (memorised by the
    original model, never predicted by a retrained one); the test examples are mislabeled
    the same way so that the forget-vs-test MIA compares like with like.
    The data split depends on ``seed`` only; model seeds come from the runner. ``batch_size`` is
    the unlearning batch size, ``train_batch_size`` the training one (``None``: full batch).
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    n_total = n_retain + n_forget + n_test
    if n_total > len(x):
        raise ValueError(f"digits has {len(x)} images; asked for {n_total}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    xt = torch.tensor(x[perm] / 16.0, dtype=torch.float32)
    yt = torch.tensor(y[perm], dtype=torch.long)
    r_idx = slice(0, n_retain)
    f_idx = slice(n_retain, n_retain + n_forget)
    t_idx = slice(n_retain + n_forget, n_total)
    yf, ytest = yt[f_idx].clone(), yt[t_idx].clone()
    if forget == "mislabeled":
        yf = (yf + torch.as_tensor(rng.integers(1, 10, size=n_forget))) % 10
        ytest = (ytest + torch.as_tensor(rng.integers(1, 10, size=n_test))) % 10
    retain = TensorData(xt[r_idx], yt[r_idx])
    forget_data = TensorData(xt[f_idx], yf)
    test = TensorData(xt[t_idx], ytest)
    full = concat_data(retain, forget_data)
    assert isinstance(full, TensorData)
    task = ClassificationTask()

    def make_model() -> nn.Module:
        return DigitsMLP(64, hidden, 10)

    def fit_ensemble(which: str, seeds: Sequence[int]) -> list[nn.Module]:
        data = full if which == "original" else retain
        return fit_ensemble_vmap(make_model, data, task, seeds, steps=steps, lr=lr, weight_decay=weight_decay,
                                 batch_size=train_batch_size, device=device)

    def fit(which: str, seed: int) -> nn.Module:
        return fit_ensemble(which, [seed])[0]

    key = {"data": "sklearn-digits", "seed": seed, "n": [n_retain, n_forget, n_test], "hidden": hidden,
           "steps": steps, "lr": lr, "wd": weight_decay, "bs": train_batch_size, "forget": forget}
    return PrivacySetup(name=f"digits-{forget}", task=task, make_model=make_model, fit=fit, retain=retain,
                        forget=forget_data, test=test, key=key, fit_ensemble=fit_ensemble, batch_size=batch_size)


def image_benchmark_setup(bench: Any, seed: int, *, head: int | None = None, max_eval: int = 2000) -> PrivacySetup:
    """A :class:`PrivacySetup` for an image benchmark (``erase`` / ``collapse``, any preset and dataset).

    * models: the benchmark's own architecture and training phases (warm start included), one
      model per seed through ``overunlearn.benchmarks.training.train``, on the benchmark's device;
    * ``forget``: the benchmark's forget set; ``accessible_retain``: its ``D_r'``;
    * ``retain``: a seeded subset of at most ``max_eval`` retain images (signals only);
    * ``test``: test images drawn like the forget set -- Erase: the red and green copies of the
      test set; Collapse: test images recoloured with a random *other* palette colour;
    * ``head``: Erase reads the colour head (1, what is unlearned), Collapse its only head.
    """
    from overunlearn.benchmarks.training import train
    from overunlearn.data.color import ColoredImages, intensity

    split = bench.split(seed)
    name = getattr(bench, "name", "image")
    gen = torch.Generator().manual_seed(seed * 31 + 17)
    retain_ci = split["retain"]
    r_idx = torch.randperm(len(retain_ci), generator=gen)[:max_eval].sort().values
    test_set = bench.test_set()
    if name == "erase":
        copies = bench.test_copies()
        test_ci = ColoredImages.concat([copies["red"], copies["green"]])
        default_head = 1
    else:
        lum = intensity(test_set.images)
        k = split["forget"].palette.shape[0]
        shift = torch.randint(1, k, (len(test_set),), generator=gen)
        test_ci = ColoredImages(lum, (test_set.labels + shift) % k, test_set.labels, split["forget"].palette)
        default_head = 0
    keep_w = getattr(bench, "unlearn_weights", False)
    forget = split["forget"].materialize(with_weights=keep_w)
    accessible = split["accessible"].materialize(with_weights=keep_w)
    task = bench.task

    def make_model() -> nn.Module:
        return bench.make_model(pretrained=False)

    def fit(which: str, sd: int) -> nn.Module:
        role = "original" if which == "original" else "ground_truth"
        model = seeded_model(bench.make_model, sd)
        train(model, bench._phases(split, role), bench.preset.recipe, seed=sd, device=bench.device,
              progress=False)
        return model.cpu()

    key = {"benchmark": name, "bench_key": bench.key(), "seed": seed, "max_eval": max_eval,
           "preset": getattr(bench.preset, "name", ""), "p_retain": bench.preset.p_retain,
           "n_test": bench.preset.n_test}
    return PrivacySetup(name=f"{name}-{getattr(bench, 'dataset', '')}", task=task, make_model=make_model, fit=fit,
                        retain=retain_ci.subset(r_idx).materialize(with_weights=False), forget=forget,
                        test=test_ci.materialize(with_weights=False), accessible_retain=accessible, key=key,
                        batch_size=bench.preset.unlearn_batch_size, head=default_head if head is None else head)


def adapt_benchmark(benchmark: Any, seed: int) -> PrivacySetup | None:
    """A :class:`PrivacySetup` for a built-in benchmark object without ``privacy_setup``; ``None`` if unknown."""
    try:
        from overunlearn.benchmarks._image_common import ImageBenchmark
    except ImportError:  # pragma: no cover
        ImageBenchmark = ()  # type: ignore[assignment,misc]
    if ImageBenchmark and isinstance(benchmark, ImageBenchmark):
        return image_benchmark_setup(benchmark, seed)
    if getattr(benchmark, "name", None) == "poison":
        return poison_setup(benchmark, seed)
    if getattr(benchmark, "name", None) == "facts":
        return facts_setup(benchmark, seed)
    return None


def facts_setup(bench: Any, seed: int) -> PrivacySetup:
    """A :class:`PrivacySetup` for the ``facts`` benchmark (a GPT-2 that memorised generated facts).

    * models: original models trained on every fact, oracles on the retain facts only, with the
      benchmark's recipe, one model per seed;
    * signals on the forget facts' training questions, the retain facts', and as ``test`` the forget
      facts' questions paired with an answer never trained (a random other value of the attribute): the
      membership question is "was this question-answer pair trained on?", as Collapse's test images
      carry an untrained colour.
    """
    from overunlearn.data.facts import ATTRIBUTES
    from overunlearn.problem import TensorData

    s = bench.split(seed)
    data = {"original": bench._sequences(s["forget_facts"] + s["retain_facts"], copy=bench.world.copy_train),
            "oracle": bench._sequences(s["retain_facts"], copy=bench.world.copy_train)}

    def fit(which: str, sd: int) -> nn.Module:
        model = bench._fresh_model(sd)
        bench._train(model, data[which], sd)
        return model.cpu()

    g = torch.Generator().manual_seed(int(seed) * 31 + 17)
    questions, answers = [], []
    for i in s["forget_facts"]:
        f = bench.world.facts[i]
        others = [a for a in ATTRIBUTES[f.attribute][0] if a != f.answer]
        questions.append(bench.world.question(f, f.train_templates[0]))
        answers.append(others[int(torch.randint(len(others), (1,), generator=g))])
    x, y = bench.world.encode(questions, answers, bench.length)
    return PrivacySetup(name=f"facts-{bench.preset.name}", task=bench.task, make_model=bench.make_model, fit=fit,
                        retain=bench._sequences(s["retain_facts"]), forget=bench._sequences(s["forget_facts"]),
                        test=TensorData(x, y), accessible_retain=bench.accessible_retain(seed),
                        key={"benchmark": bench.name, "bench_key": bench.key(), "seed": int(seed),
                             "p_retain": bench.preset.p_retain},
                        batch_size=bench.preset.unlearn_batch_size)


def poison_setup(bench: Any, seed: int, *, n_test: int = 200, workers: int | None = None) -> PrivacySetup:
    """A :class:`PrivacySetup` for the Data Poisoning benchmark (sine regression, 1-300-300-1 SiLU MLP).

    * data: the benchmark's 50 retain points (``y = sin x``) and 5 poisoned forget points
      (``y = 1.5``) of ``seed``; ``test``: ``n_test`` fresh points ``x ~ U[-5 pi, 5 pi]`` with the
      *poisoned* label 1.5 -- drawn like the forget set, so the forget-vs-test MIA asks "was this
      poisoned point trained on?";
    * models: the benchmark's recipe (AdamW, full batch; ``original_steps`` on ``D_r + D_f``,
      ``ground_truth_steps`` on ``D_r`` for the oracles), all models of a kind trained at once by
      the benchmark's vectorised ensemble trainer (:func:`overunlearn.training.ensemble.train_ensemble`);
    * unlearning: one full-batch step per epoch, as in the benchmark's problem;
    * signals: regression -- ``loss`` (squared error) and ``margin`` (signed error ``f(x) - y``),
      which U-LiRA and KLoM use; MIA-efficacy uses the loss.
    """
    from overunlearn.problem import RegressionTask
    from overunlearn.training.ensemble import Member, train_ensemble

    r = bench.recipe
    retain, forget = bench.data(seed)
    g = torch.Generator().manual_seed(int(seed) * 7919 + 101)
    xt = torch.rand(n_test, 1, generator=g) * (r.x_high - r.x_low) + r.x_low
    test = TensorData(xt, torch.full_like(xt, r.poison_label))
    full = concat_data(retain, forget)
    assert isinstance(full, TensorData)

    def fit_ensemble(which: str, seeds: Sequence[int]) -> list[nn.Module]:
        data, steps = (full, r.original_steps) if which == "original" else (retain, r.ground_truth_steps)
        members = [Member(bench.make_model(int(sd)), data.inputs, data.targets, steps, key=int(sd))  # type: ignore[arg-type]
                   for sd in seeds]
        n_workers = workers if workers is not None else (bench.workers or torch.get_num_threads())
        results = train_ensemble(members, lr=r.lr, weight_decay=r.weight_decay, device=bench.device,
                                 workers=n_workers)
        out = []
        for res in results:
            m = bench.make_model()
            m.load_state_dict(res.state_dict)
            out.append(m)
        return out

    def fit(which: str, sd: int) -> nn.Module:
        return fit_ensemble(which, [sd])[0]

    key = {"benchmark": "poison", "recipe": r.key(), "seed": seed, "n_test": n_test, "test": "poisoned-label"}
    return PrivacySetup(name=f"poison-{r.name}", task=RegressionTask(), make_model=bench.make_model, fit=fit,
                        retain=retain, forget=forget, test=test, key=key, fit_ensemble=fit_ensemble,
                        batch_size=len(retain) + len(forget))
