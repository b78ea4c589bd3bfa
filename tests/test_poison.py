"""Data Poisoning benchmark: ensemble trainer, metric, cache, presets and the CLI end to end (fast).

The CLI runs its trials through the sweep runner and journal; see also tests/test_reliability_caches.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from overunlearn.benchmarks import Benchmark, get_benchmark
from overunlearn.benchmarks import poison as P
from overunlearn.models.mlp import MLP, poison_mlp
from overunlearn.training import Member, train_ensemble, train_single_reference

TINY = P.PoisonRecipe(hidden=(16, 16), original_steps=40, ground_truth_steps=20, name="tiny")


# ---- the ensemble trainer ------------------------------------------------------------------

def _members(widths=(300, 300), steps=(6, 4, 6, 4)):
    g = torch.Generator().manual_seed(0)
    out = []
    for i, st in enumerate(steps):
        n = 55 if i % 2 == 0 else 50  # original-sized and ground-truth-sized members share one ensemble
        x = (torch.rand(n, 1, generator=g) * 2 - 1) * 5 * math.pi
        y = torch.sin(x)
        out.append(Member(MLP(1, widths, 1, generator=torch.Generator().manual_seed(i)), x, y, st, key=i))
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_ensemble_equals_per_model_adamw(workers):
    members = _members()
    results = train_ensemble(members, lr=1e-3, weight_decay=0.01, workers=workers)
    for m, r in zip(members, results, strict=False):
        ref = train_single_reference(m.model, m.x, m.y, m.steps, lr=1e-3, weight_decay=0.01)
        assert r.steps == m.steps and r.key == m.key
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(r.state_dict[k], v, rtol=1e-4, atol=2e-5)
        loss = nn.functional.mse_loss(ref(m.x), m.y).item()
        assert r.final_loss == pytest.approx(loss, rel=1e-4, abs=1e-6)
    # the caller's models are untouched
    assert torch.equal(members[0].model.state_dict()["0.weight"], MLP(1, (300, 300), 1,
                       generator=torch.Generator().manual_seed(0)).state_dict()["0.weight"])


@pytest.mark.parametrize("group_size,workers", [(1, 1), (2, 2), (3, 1), (10, 1)])
def test_ensemble_groups_and_early_finishers_equal_per_model_adamw(group_size, workers):
    # mixed step counts inside one lockstep group: members that finish early leave the flat
    # buffer (and AdamW's moments) while the others go on
    members = _members(widths=(12, 12), steps=(7, 3, 5, 2, 7, 4))
    results = train_ensemble(members, lr=1e-2, weight_decay=0.01, workers=workers, group_size=group_size)
    for m, r in zip(members, results, strict=True):
        ref = train_single_reference(m.model, m.x, m.y, m.steps, lr=1e-2, weight_decay=0.01)
        assert r.steps == m.steps and r.key == m.key
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(r.state_dict[k], v, rtol=1e-4, atol=2e-5)


def test_ensemble_groups_split_by_dataset_size_and_architecture():
    from overunlearn.training.ensemble import _groups

    members = _members(widths=(4, 4), steps=(5,) * 7)  # n alternates 55, 50: four 55s, three 50s
    groups = _groups(members, 3)
    assert sorted(len(g) for g in groups) == [2, 2, 3]  # 4 -> 2 + 2 (not 3 + 1), 3 -> 3
    for g in groups:
        assert len({int(members[i].x.shape[0]) for i in g}) == 1 and len(g) <= 3
    assert sorted(i for g in groups for i in g) == list(range(len(members)))
    with pytest.raises(ValueError, match="group_size"):
        train_ensemble(members, group_size=0)
    # different architectures on the same points never share a lockstep group, and train fine
    mixed = _members(widths=(4, 4), steps=(5, 5)) + _members(widths=(6,), steps=(5, 5))
    assert all(len({mixed[i].model.widths for i in g}) == 1 for g in _groups(mixed, 5))
    for m, r in zip(mixed, train_ensemble(mixed, lr=1e-2), strict=True):
        ref = train_single_reference(m.model, m.x, m.y, m.steps, lr=1e-2, weight_decay=0.01)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(r.state_dict[k], v, rtol=1e-4, atol=2e-5)


def test_ensemble_state_dicts_load_into_plain_mlp():
    members = _members(widths=(8, 8), steps=(3, 3))
    res = train_ensemble(members)
    model = MLP(1, (8, 8), 1)
    model.load_state_dict(res[0].state_dict)  # strict: the keys and shapes of an ordinary MLP
    assert set(res[0].state_dict) == set(model.state_dict())


def test_fused_adamw_is_torch_adamw():
    from overunlearn.training.adamw import FusedAdamW

    g = torch.Generator().manual_seed(3)
    shapes = [(500,), (7, 3), (1, 4)]
    grads = [[torch.randn(*sh, generator=g) * 10.0 ** k for sh in shapes] for k in range(-3, 3)] * 2  # 12 steps
    start = [torch.randn(*sh, generator=g) for sh in shapes]
    for fused in (True, False):
        ref = [t.clone().requires_grad_(True) for t in start]
        opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=fused or None)
        ps, gs = [t.clone() for t in start], [torch.zeros(sh) for sh in shapes]
        ours = FusedAdamW(ps, gs, lr=1e-2, weight_decay=0.1, fused=fused)
        for step in grads:
            for r, gr, buf in zip(ref, step, gs, strict=True):
                r.grad = gr.clone()
                buf.copy_(gr)
            opt.step()
            ours.step()
        for p_, r in zip(ps, ref, strict=True):
            if fused:  # the same kernel with the same arguments: bit for bit
                assert torch.equal(p_, r.detach())
            else:  # torch.optim.AdamW's formula in plain tensor operations
                torch.testing.assert_close(p_, r.detach(), rtol=1e-6, atol=1e-7)
        assert float(ours.step_t) == len(grads)
    with pytest.raises(ValueError, match="same shape"):
        FusedAdamW([torch.zeros(3)], [torch.zeros(4)], lr=1e-3, weight_decay=0.0)


def test_ensemble_processes_equal_threads_bitwise():
    members = _members(widths=(40, 40), steps=(30, 12, 25, 30, 12))
    kw = dict(lr=1e-2, weight_decay=0.01, workers=2, group_size=2)
    done_keys: list = []
    steps_seen: list[int] = []
    by_process = train_ensemble(members, processes=True, on_done=lambda r: done_keys.append(r.key),
                                progress=steps_seen.append, report_every=5, **kw)
    by_thread = train_ensemble(members, processes=False, **kw)
    assert sorted(done_keys) == [m.key for m in members]  # on_done ran in this process, once each
    assert sum(steps_seen) == sum(m.steps for m in members)
    for a, b, m in zip(by_process, by_thread, members, strict=True):
        assert a.key == b.key == m.key and a.steps == b.steps == m.steps
        assert a.final_loss == b.final_loss
        for k in a.state_dict:
            assert torch.equal(a.state_dict[k], b.state_dict[k]), k


def test_ensemble_rejects_what_it_cannot_train_before_starting_workers():
    members = _members(widths=(8, 8), steps=(3, 3))
    relu = Member(MLP(1, (8, 8), 1, "relu"), members[1].x, members[1].y, 3, key="relu")
    with pytest.raises(ValueError, match="SiLU"):
        train_ensemble([members[0], relu], workers=2)
    short_y = Member(members[1].model, members[1].x, members[1].y[:-1], 3, key="short")
    with pytest.raises(ValueError, match="short"):
        train_ensemble([members[0], short_y], workers=2)


linux_only = pytest.mark.skipif(not __import__("sys").platform.startswith("linux"),
                                reason="the test patches the trainer in this process; fork carries it to the workers")


@linux_only
def test_ensemble_worker_error_is_raised_here_after_the_other_workers_finish(monkeypatch):
    from overunlearn.training import ensemble as E

    real_init = E._Shard.__init__

    def failing_init(self, members, *args, **kwargs):
        if any(m.key == "bad" for m in members):
            raise ValueError("boom in the worker")
        real_init(self, members, *args, **kwargs)

    monkeypatch.setattr(E._Shard, "__init__", failing_init)
    members = _members(widths=(8, 8), steps=(40, 3))
    members[1].key = "bad"
    handed = []
    with pytest.raises(ValueError, match="boom in the worker") as info:
        train_ensemble(members, workers=2, processes=True, on_done=lambda r: handed.append(r.key))
    assert any("training worker process" in n for n in getattr(info.value, "__notes__", []))
    assert handed == [members[0].key]  # the healthy worker's model was not lost


@linux_only
def test_ensemble_dead_worker_is_an_error_not_a_hang():
    import multiprocessing as mp
    import os
    import signal

    # worker 0 gets the long member (shards are balanced longest first) and is killed once; worker 1
    # finishes its member, which is handed over before the error is raised
    members = _members(widths=(8, 8), steps=(10**7, 300))
    handed = []
    killed = []

    def kill_worker_0(_n):
        if not killed:
            for p in mp.active_children():
                if p.name == "overunlearn-train-0":
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)

    with pytest.raises(RuntimeError, match="died"):
        train_ensemble(members, workers=2, processes=True, progress=kill_worker_0, report_every=50,
                       on_done=lambda r: handed.append(r.key))
    assert killed and handed == [members[1].key]
    assert not [p for p in mp.active_children() if p.name.startswith("overunlearn-train-")]


@pytest.mark.parametrize("processes", [False, True])
def test_ensemble_accepts_the_same_member_twice(processes):
    m = _members(widths=(8, 8), steps=(4,))[0]
    res = train_ensemble([m, m, m], workers=2, processes=processes)
    assert len(res) == 3 and all(r.key == m.key for r in res)
    for r in res[1:]:
        for k in r.state_dict:
            assert torch.equal(r.state_dict[k], res[0].state_dict[k])


@pytest.mark.parametrize("d_in,hidden,d_out", [(3, (5, 1, 4), 2), (1, (1,), 1), (2, (6, 6), 1), (1, (7,), 3)])
def test_ensemble_equals_per_model_adamw_on_other_architectures(d_in, hidden, d_out):
    g = torch.Generator().manual_seed(5)
    members = [Member(MLP(d_in, hidden, d_out, generator=g), torch.randn(n, d_in, generator=g),
                      torch.randn(n, d_out, generator=g), st, key=i)
               for i, (n, st) in enumerate([(9, 6), (9, 3), (7, 5)])]
    for m, r in zip(members, train_ensemble(members, lr=1e-2, group_size=3), strict=True):
        ref = train_single_reference(m.model, m.x, m.y, m.steps, lr=1e-2, weight_decay=0.01)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(r.state_dict[k], v, rtol=1e-4, atol=2e-5)


def test_poison_mlp_is_the_papers_shallownet():
    m = poison_mlp(seed=0)
    assert sum(p.numel() for p in m.parameters()) == 91_201
    assert [type(x).__name__ for x in m] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    torch.testing.assert_close(poison_mlp(seed=3).state_dict()["2.weight"], poison_mlp(seed=3).state_dict()["2.weight"])
    bound = 1 / math.sqrt(300)
    assert m[2].weight.abs().max() <= bound and m[0].weight.abs().max() <= 1.0


# ---- the metric ------------------------------------------------------------------------------

class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.fn(x) + 0 * self.p


def test_sup_error_on_known_functions():
    assert P.sup_error(_Fn(torch.sin)) < 1e-6
    assert P.sup_error(_Fn(torch.zeros_like)) == pytest.approx(1.0, abs=1e-4)
    assert P.sup_error(_Fn(lambda x: torch.sin(x) + 0.25)) == pytest.approx(0.25, abs=1e-6)
    assert P.sup_error(_Fn(lambda x: x * float("nan"))) == math.inf


def test_median_and_central_range():
    from overunlearn.report.poison import central_range, median

    vals = [float(v) for v in range(10, 0, -1)]
    assert median(vals) == 5.5
    assert central_range(vals) == (3.0, 8.0)  # 3rd lowest .. 3rd highest of 10
    assert central_range([1.0, 2.0]) == (1.0, 2.0)
    assert median([1.0, math.inf, 2.0]) == 2.0


# ---- presets and paper values -----------------------------------------------------------------

def test_presets_cover_the_table_and_build_methods():
    from overunlearn.methods import create

    for T in (10, 100, 1000):
        for m in P.POISON_METHODS:
            pre = P.preset(m, T)
            create(m, **pre.kwargs())  # validated by the method's config
            assert (m, T) in P.PAPER_TABLE5
    mn = P.preset("minnorm_og", 100).kwargs()
    assert mn["num_gd_epochs"] == 50 and mn["proj_pd"] == 2 and mn["reg_coef"] == 0.1
    assert "not in Table 6" in P.preset("gd", 30).note


def test_benchmark_protocol_members_are_the_papers_presets():
    from overunlearn.benchmarks.base import default_epochs, method_points

    bench = P.PoisonBenchmark("smoke")
    assert default_epochs(bench) == (10, 100, 1000)
    for T in (10, 100, 1000, 30):
        points = method_points(bench, T)
        assert list(points) == list(P.POISON_METHODS)
        assert points == {m: P.preset(m, T).kwargs() for m in P.POISON_METHODS}
    assert method_points(bench, 100, ["gd"]) == {"gd": {"lr": 1e-3}}
    assert dict(bench.privacy_defaults) == {"n_models": 16, "ground_truth": "extra", "epochs": 100,
                                            "options": {"recipe": "quick"}}
    from overunlearn.privacy.runner import privacy_defaults

    assert privacy_defaults("poison")["options"] == {"recipe": "quick"}  # privacy trains the quick recipe


# ---- the benchmark protocol and the cache --------------------------------------------------------

def test_benchmark_protocol_and_cache(tmp_path):
    bench = get_benchmark("poison", recipe=TINY, cache_dir=tmp_path)
    assert isinstance(bench, Benchmark)
    prob = bench.problem(1)
    assert len(prob.retain) == 50 and len(prob.forget) == 5
    assert prob.batch_size >= 55  # one retain batch and one forget batch per epoch
    assert torch.all(prob.forget.targets == 1.5)
    torch.testing.assert_close(prob.retain.targets, torch.sin(prob.retain.inputs))
    assert prob.retain.inputs.abs().max() <= 5 * math.pi
    assert not torch.equal(bench.data(1)[0].inputs, bench.data(2)[0].inputs)
    assert bench.trained_count == 2  # original + ground truth of seed 1
    ref = bench.reference(1)
    assert set(ref) == {"original", "ground_truth"} and math.isfinite(ref["original"]["sup_error"])
    assert bench.evaluate(prob.model, 1) == ref["original"]
    files = sorted(p.name for p in bench.cache_dir.iterdir())
    assert "seed1-original.pt" in files and "seed1-ground_truth.pt" in files
    sd = torch.load(bench.model_path(1, "original"), weights_only=True)
    assert set(sd) == set(MLP(1, TINY.hidden, 1).state_dict())

    again = get_benchmark("poison", recipe=TINY, cache_dir=tmp_path)
    mtime = bench.model_path(1, "original").stat().st_mtime_ns
    again.problem(1)
    again.reference(1)
    assert again.trained_count == 0
    assert bench.model_path(1, "original").stat().st_mtime_ns == mtime
    # a different recipe is a different cache entry
    other = P.PoisonRecipe(hidden=(16, 16), original_steps=41, ground_truth_steps=20)
    assert other.key() != TINY.key()


@pytest.mark.parametrize("processes", [False, True])
def test_task_counter_hands_out_every_task_once(processes):
    from overunlearn.workers import TaskCounter, can_start_processes, run_in_processes, run_in_threads

    if processes and not can_start_processes():
        pytest.skip("worker processes need fork (Linux)")
    counter = TaskCounter(50, processes=processes)
    got: list[int] = []

    def take(send) -> None:
        while (i := counter.next()) is not None:
            send(i)

    if processes:
        run_in_processes(lambda _w, chan: take(lambda i: chan.send("task", i)), [0, 1, 2],
                         lambda _w, _kind, i: got.append(i))
    else:
        run_in_threads(lambda _w: take(got.append), [0, 1, 2])
    assert sorted(got) == list(range(50))
    assert counter.next() is None
    stopped = TaskCounter(5, processes=processes)
    assert stopped.next() == 0
    stopped.stop()  # after a failure: nothing more is handed out
    assert stopped.next() is None




# ---- the CLI end to end: a sweep with a journal ----------------------------------------------------

SMOKE = ["bench", "poison", "--recipe", "smoke", "--seeds", "1-2", "--epochs", "4", "--methods", "minnorm_og,gd",
         "--threads", "1", "-q", "--device", "cpu"]


def _cli(args):
    from typer.testing import CliRunner

    from overunlearn.cli import _register, app

    _register()
    return CliRunner().invoke(app, args)


def _journal_trials(path):
    from overunlearn.sweep.journal import read_journal

    return read_journal(path).trials()


def test_cli_writes_a_journal_resumes_it_and_its_table_is_the_journals(tmp_path):
    import csv

    from overunlearn.report.poison import central_range, median

    out, cache = tmp_path / "out", tmp_path / "cache"
    args = SMOKE + ["--out", str(out), "--cache", str(cache)]
    res = _cli(args)
    assert res.exit_code == 0, res.output
    assert "minnorm_og" in res.output and "(ground truth)" in res.output and str(out) in res.output
    journal = out / "poison_smoke.jsonl"
    for name in ("poison_summary.csv", "poison_trials.csv", "poison_results.json", "poison_table.txt",
                 "poison_fits_T4.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "poison_fits_T4.png").read_bytes()[:4] == b"\x89PNG"
    first = json.loads((out / "poison_results.json").read_text())
    assert first["trained_models"] == 4 and first["reused_trials"] == 0 and first["journal"] == str(journal)
    assert len(first["trials"]) == 2 * 2

    # every number of the table is the journal's
    recs = [r for r in _journal_trials(journal) if r["status"] == "finished"]
    assert len(recs) == 4 and {r["arithmetic"] for r in recs} == {"vectorised"}
    by_trial = {(r["method"], r["seed"]): r["metrics"]["sup_error"] for r in recs}
    assert {(t["method"], t["seed"]): t["sup_error"] for t in first["trials"]} == by_trial
    rows = {r["method"]: r for r in csv.DictReader((out / "poison_summary.csv").open())}
    for m in ("minnorm_og", "gd"):
        vals = [by_trial[(m, s)] for s in (1, 2)]
        assert float(rows[m]["median"]) == median(vals)
        assert (float(rows[m]["range_lo"]), float(rows[m]["range_hi"])) == central_range(vals)
    refs = {r["seed"]: r["reference"] for r in read_refs(journal)}
    assert float(rows["original"]["median"]) == median([refs[s]["original"]["sup_error"] for s in (1, 2)])
    # the figure seed's fits come from its trials run again with the journal's arithmetic: the same numbers
    figs = first["figure_sup_errors"]
    assert {m: figs[f"{m}@4"] for m in ("minnorm_og", "gd")} == {m: by_trial[(m, 1)] for m in ("minnorm_og", "gd")}
    assert figs["original@4"] == refs[1]["original"]["sup_error"]
    models = sorted(cache.rglob("seed*.pt"))
    assert len(models) == 4
    mtimes = [p.stat().st_mtime_ns for p in models]
    fits = out / "poison_smoke_fits.json"  # the figure seed's curves, kept for the next run
    fits_mtime = fits.stat().st_mtime_ns

    # the same command again: nothing trained, no trial recomputed, the same numbers
    res = _cli(args)
    assert res.exit_code == 0, res.output
    assert "0 of 4 trials run, 4 from the journal" in res.output
    second = json.loads((out / "poison_results.json").read_text())
    assert second["trained_models"] == 0 and second["reused_trials"] == 4
    assert [p.stat().st_mtime_ns for p in models] == mtimes
    assert len([r for r in _journal_trials(journal) if r["status"] == "finished"]) == 4
    assert second["trials"] == first["trials"] and second["summary"] == first["summary"]
    assert second["figure_sup_errors"] == first["figure_sup_errors"] and fits.stat().st_mtime_ns == fits_mtime

    # a subset (one seed) reuses the journal too; the engine one trial at a time (--per-trial) gets its own
    # journal and agrees up to float32 rounding amplified over the run's steps (2.1e-3 relative measured on a
    # fresh machine: the interpolating models are ill-conditioned)
    res = _cli(args + ["--seeds", "2"])
    assert res.exit_code == 0 and "0 of 2 trials run" in res.output, res.output
    res = _cli(args + ["--per-trial"])
    assert res.exit_code == 0, res.output
    engine = [r for r in _journal_trials(journal) if r["status"] == "finished"]
    assert len(engine) == 4  # the default journal is untouched
    other = [p for p in out.glob("poison_smoke_*.jsonl")]
    assert len(other) == 1 and {r["arithmetic"] for r in _journal_trials(other[0])} == {"engine"}
    third = json.loads((out / "poison_results.json").read_text())
    assert [t["sup_error"] for t in third["trials"]] == pytest.approx([t["sup_error"] for t in first["trials"]],
                                                                      rel=1e-2)


def read_refs(journal):
    from overunlearn.sweep.journal import read_journal

    return [r for r in read_journal(journal).of_kind("reference") if r["status"] == "finished"]


def test_diverging_trial_is_recorded_not_raised(tmp_path, monkeypatch):
    real = P.preset

    def wild(method, epochs):
        if method == "ga":
            return P.Preset("ga", epochs, (("lr", 1e6),))
        return real(method, epochs)

    monkeypatch.setattr(P, "preset", wild)
    res = _cli(["bench", "poison", "--recipe", "smoke", "--seeds", "1", "--epochs", "5", "--methods", "ga,gd",
                "--threads", "1", "-q", "--device", "cpu", "--out", str(tmp_path / "out"),
                "--cache", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    got = {t["method"]: t for t in json.loads((tmp_path / "out" / "poison_results.json").read_text())["trials"]}
    assert got["ga"]["status"] == "diverged" and got["ga"]["sup_error"] == "inf"
    assert got["gd"]["status"] == "ok"
    ga_row = next(line for line in res.output.splitlines() if line.startswith("ga "))
    assert "inf" in ga_row and ga_row.rstrip().endswith("1/1")


def test_cli_rejects_bad_options_before_training(tmp_path):
    base = ["bench", "poison", "--recipe", "smoke", "--cache", str(tmp_path / "c"), "-q"]
    for extra, needle in [(["--recipe", "huge"], "unknown recipe"), (["--methods", "gd,nope"], "nope"),
                          (["--epochs", "0"], "positive"), (["--seeds", "1-2", "--figure-seed", "5"], "figure seed"),
                          (["--out", str(tmp_path / "x.csv")], "folder")]:
        res = _cli(base + extra)
        assert res.exit_code == 2, (extra, res.output)
        assert needle in res.output, (extra, res.output)
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_cli_numbers_do_not_depend_on_the_worker_count(tmp_path):
    """--jobs 2 (spawned workers, other batches) computes bit for bit what --jobs 1 (this process) does."""
    cache = tmp_path / "cache"
    args = SMOKE + ["--cache", str(cache), "--seeds", "1-3", "--methods", "minnorm_og,gd,ridge", "--epochs", "3,5"]
    got = []
    for jobs in ("1", "2"):
        res = _cli(args + ["--jobs", jobs, "--out", str(tmp_path / jobs)])
        assert res.exit_code == 0, res.output
        got.append(json.loads((tmp_path / jobs / "poison_results.json").read_text())["trials"])
    key = lambda t: (t["method"], t["epochs"], t["seed"])  # noqa: E731
    a, b = sorted(got[0], key=key), sorted(got[1], key=key)
    assert len(a) == 18 and [(key(t), t["sup_error"]) for t in a] == [(key(t), t["sup_error"]) for t in b]
