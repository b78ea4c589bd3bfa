"""Executors: a process pool and a local Ray instance give the journal results of a sequential run."""

from __future__ import annotations

import pytest
import sweep_fake  # noqa: F401  (registers the fake benchmark and method)

from overunlearn.sweep.executors import ProcessPoolExecutor, SequentialExecutor, make_executor
from overunlearn.sweep.journal import read_journal
from overunlearn.sweep.run import run_sweep
from overunlearn.sweep.spec import parse_spec

SPEC = {
    "name": "ex",
    "seeds": [1, 2],
    "methods": ["gd", "minnorm_og", "sweep_nan"],
    "benchmark": {"name": "sweep_fake", "imports": ["sweep_fake"]},
    "budget": {"epochs": 3},
    "grid": {"lr": [1e-2, 1e-3], "minnorm_og": {"grad_sample_size": [4], "reg_coef": [0.5]}},
}


def results(path):
    """What must not depend on the executor: per trial id, status, metrics, steps."""
    c = read_journal(path)
    trials = {r["id"]: (r["status"], r.get("metrics"), r.get("steps"), r.get("error_type")) for r in c.trials()}
    refs = {(r["benchmark_key"], r["seed"]): r["reference"] for r in c.of_kind("reference")}
    return trials, refs


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    path = tmp_path_factory.mktemp("seq") / "j.jsonl"
    res = run_sweep(parse_spec(SPEC), path, SequentialExecutor(threads=1))
    assert (res.finished, res.failed) == (8, 4)
    return results(path)


def test_make_executor():
    assert isinstance(make_executor("local", jobs=1), SequentialExecutor)
    assert isinstance(make_executor("local", jobs=2), ProcessPoolExecutor)
    with pytest.raises(ValueError, match="unknown executor"):
        make_executor("slurm")


def test_process_pool_matches_sequential(tmp_path, sequential):
    path = tmp_path / "j.jsonl"
    with ProcessPoolExecutor(jobs=2, threads=1, gpus=0) as ex:
        res = run_sweep(parse_spec(SPEC), path, ex)
    assert (res.finished, res.failed) == (8, 4)
    assert results(path) == sequential
    recs = read_journal(path).trials()
    assert {r["executor"] for r in recs} == {"pool"}
    assert all(r["torch_threads"] == 1 for r in recs if "torch_threads" in r)


@pytest.mark.ray
def test_ray_matches_local(tmp_path, sequential):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'overunlearn[ray]')")
    from overunlearn.sweep.executors import RayExecutor

    path = tmp_path / "j.jsonl"
    if ray.is_initialized():  # pragma: no cover
        ray.shutdown()
    with RayExecutor(gpus_per_trial=0, init_kwargs={"num_cpus": 1, "include_dashboard": False}) as ex:
        res = run_sweep(parse_spec(SPEC), path, ex)
    assert not ray.is_initialized()
    assert (res.finished, res.failed) == (8, 4)
    assert results(path) == sequential
    assert {r["executor"] for r in read_journal(path).trials()} == {"ray"}


@pytest.mark.parametrize("gpus, visible, jobs, expected", [
    (0, None, 2, ["", ""]),  # CPU only: the workers see no GPU ("auto" is the CPU there)
    (2, None, 3, ["0", "1", "0"]),
    (4, None, 2, ["0", "1"]),  # more than the machine's two: the two there are
    (2, "3,5,7", 3, ["3", "5", "3"]),  # --gpus 2 of the visible three
    (3, "3,5,7", 2, ["3", "5"]),
])
def test_the_pool_gives_each_worker_its_gpu(monkeypatch, gpus, visible, jobs, expected):
    from overunlearn.sweep import executors
    from overunlearn.sweep.executors import ProcessPoolExecutor

    monkeypatch.setattr(executors, "_gpu_count", lambda: 2)

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    ex = ProcessPoolExecutor(jobs=jobs, threads=1, gpus=gpus)
    pool = ex._start()  # (no task submitted: no worker has taken its device yet)
    try:
        queue = pool._initargs[1]
        assert [queue.get(timeout=10) for _ in range(jobs)] == expected
    finally:
        pool.shutdown()


def test_a_worker_pinned_to_one_gpu_reads_cuda_n_as_that_gpu(monkeypatch):
    from overunlearn.sweep import worker

    monkeypatch.setitem(worker._CONFIGURED, "pinned", True)
    assert worker._task_device({"device": "cuda:1"}) == "cuda"
    assert worker._task_device({"device": "cpu"}) == "cpu"
    monkeypatch.setitem(worker._CONFIGURED, "pinned", False)
    assert worker._task_device({"device": "cuda:1"}) == "cuda:1"
    assert worker._task_device({}) == "auto"
