"""Results do not depend on scheduling (issue 19): a vectorised member's numbers are those of the same
run alone, whatever else its batch holds, where it sits and how large the batch is; a batched sweep
gives the same numbers at any --batch, and interrupted + resumed sweeps give those of an uninterrupted
run, bit for bit."""

from __future__ import annotations

import pytest
import test_reliability_fake  # noqa: F401  (registers the rel_silu benchmark)
import torch
from test_ensemble_unlearn import _problem

from overunlearn.engine import BatchedRun, Budget, unlearn_batched
from overunlearn.methods import create
from overunlearn.sweep.journal import read_journal
from overunlearn.sweep.run import make_tasks, run_sweep
from overunlearn.sweep.spec import parse_spec

CASES = [
    ("gd", {"lr": 1e-2}),
    ("retrain", {"lr": 1e-2}),
    ("ga", {"lr": 1e-3}),
    ("ngp", {"lr": 1e-2, "ga_coef": 0.3}),
    ("ngd", {"lr": 1e-2, "noise_sig": 0.1}),
    ("ridge", {"lr": 1e-2, "reg_coef": 0.5, "reg_coef_decay": 0.7}),
    ("l1_sparse", {"lr": 1e-2, "reg_coef": 0.05}),
    ("minnorm_og", {"lr": 1e-2, "reg_coef": 0.5, "reg_coef_decay": 0.9}),
    ("minnorm_og", {"lr": 1e-2, "reg_coef": 0.5, "grad_sample_size": 5}),
    ("minnorm_og", {"lr": 1e-2, "reg_coef": 0.3, "order": "descend_then_project"}),
]


#: (hidden, retain points, forget points): row lengths that are not multiples of the vector width (a
#: kernel over the stacked tensor handles the last member's tail differently) and member slices that
#: start at addresses of every alignment (a BLAS product's rounding depends on it)
SHAPES = [((40, 40), 17, 4), ((21, 21), 50, 5)]


def _run(seed: int, name: str, hyper: dict, epochs: int = 6, shape: int = 0) -> BatchedRun:
    hidden, n_r, n_f = SHAPES[shape]
    return BatchedRun(_problem(seed, hidden, n_r=n_r, n_f=n_f), create(name, **hyper), Budget(epochs=epochs),
                      seed=seed, key=(name, seed))


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("shape", range(len(SHAPES)))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_a_member_computes_what_it_computes_alone(case, shape):
    name, hyper = CASES[case]
    alone = unlearn_batched([_run(1, name, hyper, shape=shape)])[0]
    assert alone.model is not None
    for size, pos in ((2, 1), (2, 0), (4, 3), (len(CASES), case)):
        others = [_run(2 + j, *CASES[j % len(CASES)], shape=shape) for j in range(size - 1)]
        batch = others[:pos] + [_run(1, name, hyper, shape=shape)] + others[pos:]
        out = unlearn_batched(batch)[pos]
        assert out.key == (name, 1) and out.model is not None
        assert torch.equal(_flat(out.model), _flat(alone.model)), (name, size, pos)
        assert out.record.epoch_losses == alone.record.epoch_losses


def test_a_member_is_independent_of_the_thread_count():
    prev = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append([_flat(o.model) for o in unlearn_batched([_run(1, *c) for c in CASES[5:8]])])
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


SPEC = {
    "name": "sched",
    "seeds": [1, 2],
    "methods": ["gd", "ridge", "minnorm_og"],
    "benchmark": {"name": "rel_silu", "imports": ["test_reliability_fake"]},
    "budget": {"epochs": 5},
    "grid": {"lr": [1e-2, 3e-3], "ridge": {"reg_coef": [0.1, 0.5]}, "minnorm_og": {"reg_coef": [0.2, 0.5]}},
}


def numbers(path) -> dict[str, tuple]:
    """Per trial id, every number a trial produces: status, metrics, steps, per-epoch losses."""
    c = read_journal(path)
    out = {}
    for rid, r in c.latest_trials().items():
        out[rid] = (r["status"], r.get("metrics"), r.get("steps"), r.get("epoch_losses"), r.get("arithmetic"))
    assert not c.conflicts and not c.problems
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("sched") / "full.jsonl"
    res = run_sweep(parse_spec(SPEC), path, batch=64, warn=lambda m: None)
    assert res.finished == 20
    got = numbers(path)
    assert {v[4] for v in got.values()} == {"vectorised"}
    return got


@pytest.mark.parametrize("batch", [2, 3, 5])
def test_a_batched_sweep_gives_the_same_numbers_at_any_batch_size(tmp_path, uninterrupted, batch):
    path = tmp_path / "j.jsonl"
    run_sweep(parse_spec(SPEC), path, batch=batch, warn=lambda m: None)
    assert numbers(path) == uninterrupted


def test_an_interrupted_batched_sweep_resumes_to_the_same_numbers(tmp_path, uninterrupted):
    """Stop after a few trials (as a kill would), resume with another batch size: the trials left over
    form other batches than in the uninterrupted run, and every number is still the same."""
    path = tmp_path / "j.jsonl"
    spec = parse_spec(SPEC)
    run_sweep(spec, path, batch=4, max_trials=5, warn=lambda m: None)
    run_sweep(spec, path, batch=3, max_trials=4, warn=lambda m: None)
    res = run_sweep(spec, path, batch=64, warn=lambda m: None)
    assert res.finished == 11 and res.skipped == 9
    assert numbers(path) == uninterrupted


def test_a_lone_batchable_trial_still_runs_vectorised():
    spec = parse_spec(SPEC)
    tasks = make_tasks(spec.trials[:1], "cpu", batch=8)
    assert [t["kind"] for t in tasks] == ["batch"] and len(tasks[0]["tasks"]) == 1


def test_switching_between_engine_and_vectorised_arithmetic_is_warned(tmp_path):
    path = tmp_path / "j.jsonl"
    spec = parse_spec(SPEC)
    run_sweep(spec, path, batch=0, max_trials=2, warn=lambda m: None)
    assert {r["arithmetic"] for r in read_journal(path).trials()} == {"engine"}
    seen: list[str] = []
    run_sweep(spec, path, batch=8, max_trials=2, warn=seen.append)
    assert any("2 finished trial(s) were computed by the engine arithmetic" in m and "--batch 0" in m for m in seen)
