"""Worker processes (issue 19): a dead worker is a recorded, retried failure rather than a
BrokenProcessPool traceback; workers die with their parent; a process-pool sweep killed mid-way and
resumed gives the numbers of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_reliability_fake as fake

from overunlearn.sweep.executors import ProcessPoolExecutor, SequentialExecutor
from overunlearn.sweep.journal import read_journal
from overunlearn.sweep.run import run_sweep
from overunlearn.sweep.spec import parse_spec

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(SRC), os.environ.get("PYTHONPATH", "")]),
           OMP_NUM_THREADS="1")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped by its new parent) counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_dead_worker_is_recorded_as_failed_and_retried(tmp_path, monkeypatch):
    spec = parse_spec({"name": "dead", "seeds": [1], "methods": ["gd", "rel_killer"],
                       "benchmark": {"name": "sweep_fake", "imports": ["test_reliability_fake"]},
                       "budget": {"epochs": 2}, "grid": {"lr": [1e-2]}})
    path = tmp_path / "j.jsonl"
    monkeypatch.setenv(fake.KILL, "1")
    with ProcessPoolExecutor(jobs=2, threads=1) as ex:
        res = run_sweep(spec, path, ex, warn=lambda m: None)  # no BrokenProcessPool escapes
    assert (res.finished, res.failed) == (1, 1)
    failed = [r for r in read_journal(path).trials() if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["method"] == "rel_killer" and failed[0]["error_type"] == "WorkerDied"
    assert "not counted as done" in failed[0]["error"]
    monkeypatch.setenv(fake.KILL, "0")
    res = run_sweep(spec, path, SequentialExecutor(threads=1), warn=lambda m: None)
    assert (res.finished, res.skipped) == (1, 1)


PARENT = '''
import sys, time
from overunlearn.sweep.executors import ProcessPoolExecutor
ex = ProcessPoolExecutor(jobs=2, threads=1)
pool = ex._start()
futs = [pool.submit(time.sleep, 60) for _ in range(2)]
time.sleep(0.5)
while len(pool._processes) < 2:
    time.sleep(0.1)
print(" ".join(str(p) for p in pool._processes), flush=True)
time.sleep(60)
'''

FORKED = '''
import os, sys, time
from overunlearn.workers import run_in_processes

def target(shard, chan):
    chan.send("pid", os.getpid())
    time.sleep(60)

def on_message(w, kind, pid):
    print(pid, flush=True)

run_in_processes(target, [0, 1], on_message, name="test")
'''


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
@pytest.mark.parametrize("script, n_lines", [(PARENT, 1), (FORKED, 2)])
def test_workers_exit_when_their_parent_is_killed(script, n_lines):
    proc = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        pids = []
        for _ in range(n_lines):
            pids += [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        os.kill(proc.pid, signal.SIGKILL)  # as the OOM killer does: no clean-up code runs
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "orphaned workers are still running"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


KILL_SPEC = '''
name = "killpool"
seeds = [1, 2, 3]
methods = ["gd", "ridge", "minnorm_og"]
[benchmark]
name = "rel_silu"
imports = ["test_reliability_fake"]
[budget]
epochs = 40
[engine]
batch = 2
[grid]
lr = [1e-2, 3e-3]
[grid.ridge]
reg_coef = [0.1, 0.5]
'''


def _numbers(path):
    c = read_journal(path)
    return {rid: (r["status"], r.get("metrics"), r.get("steps"), r.get("epoch_losses"))
            for rid, r in c.latest_trials().items()}


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_a_killed_batched_sweep_resumes_to_the_numbers_of_an_uninterrupted_run(tmp_path, jobs):
    """SIGKILL a batched sweep (in this process, or a process pool) mid-way, resume it with another
    executor and batch size, and compare every number with an uninterrupted run."""
    spec_path = tmp_path / "killpool.toml"
    spec_path.write_text(KILL_SPEC)
    full = tmp_path / "full.jsonl"
    run_sweep(parse_spec(__import__("tomllib").loads(KILL_SPEC)), full, SequentialExecutor(threads=1),
              warn=lambda m: None)
    journal = tmp_path / "kill.jsonl"
    cmd = [sys.executable, "-m", "overunlearn", "sweep", str(spec_path), "--journal", str(journal), "-q",
           "--threads", "1", "--jobs", str(jobs)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(read_journal(journal).finished_ids()) >= 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.stderr.read().decode()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    kept = len(read_journal(journal).finished_ids())
    assert 4 <= kept < 24
    res = run_sweep(parse_spec(__import__("tomllib").loads(KILL_SPEC)), journal, SequentialExecutor(threads=1),
                    batch=5, warn=lambda m: None)
    assert res.finished == 24 - kept
    assert _numbers(journal) == _numbers(full)


def test_a_dead_ray_task_is_a_recorded_failure_not_a_traceback():
    """Ray raises from ``ray.get`` when a task's worker died; the executor records the task as failed."""
    from types import SimpleNamespace

    from overunlearn.sweep.executors import RayExecutor

    class DiedError(Exception):
        pass

    refs: list[dict] = []

    def remote(task):
        refs.append(task)
        return len(refs) - 1

    def get(ref):
        if refs[ref]["id"] == "b":
            raise DiedError("The worker died unexpectedly while executing this task.\nmore detail")
        return {"kind": "trial", "id": refs[ref]["id"], "status": "finished"}

    ex = object.__new__(RayExecutor)
    ex._ray = SimpleNamespace(wait=lambda pending, num_returns: (pending[:1], pending[1:]), get=get)
    ex._remote = SimpleNamespace(options=lambda **kw: SimpleNamespace(remote=remote))
    ex.cpus_per_trial, ex.gpus_per_trial, ex.max_in_flight = 1, 0, 2
    tasks = [{"kind": "trial", "id": i, "config_key": "k", "trial": {"method": "gd", "seed": 1}} for i in "abc"]
    out = list(ex.run(tasks))
    assert [r["id"] for r in out] == ["a", "b", "c"]
    assert out[1]["status"] == "failed" and out[1]["error_type"] == "WorkerDied"
    assert "DiedError: The worker died unexpectedly" in out[1]["error"] and "more detail" not in out[1]["error"]
