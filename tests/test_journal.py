"""The journal: torn lines, locking, failures, resume -- including a real SIGKILL of a running sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import sweep_fake  # noqa: F401  (registers the fake benchmark and method)

from overunlearn.sweep.journal import JournalLockedError, JournalWriter, read_journal
from overunlearn.sweep.run import SweepAborted, run_sweep
from overunlearn.sweep.spec import parse_spec

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


def spec_dict(**changes):
    raw = {
        "name": "j",
        "seeds": [1, 2],
        "methods": ["gd", "sweep_nan", "minnorm_og"],
        "benchmark": {"name": "sweep_fake", "imports": ["sweep_fake"]},
        "budget": {"epochs": 3},
        "metrics": {"retain_mse": "min", "forget_gap": "max"},
        "grid": {"lr": [1e-2, 1e-3], "minnorm_og": {"grad_sample_size": [4]}},
    }
    raw.update(changes)
    return raw


def finished_counts(path) -> Counter:
    return Counter(r["id"] for r in read_journal(path).trials() if r["status"] == "finished")


def test_torn_and_garbage_lines_are_skipped_and_terminated(tmp_path):
    path = tmp_path / "j.jsonl"
    with JournalWriter(path) as w:
        w.append({"kind": "trial", "id": "a", "status": "finished"})
    with open(path, "ab") as fh:
        fh.write(b'{"kind": "trial", "id": "b", "sta')  # a write cut by a kill
    c = read_journal(path)
    assert [r["id"] for r in c.trials()] == ["a"] and c.bad_lines == 1 and c.torn_tail
    with JournalWriter(path) as w:  # the next writer starts a fresh line
        w.append({"kind": "trial", "id": "c", "status": "finished"})
    c = read_journal(path)
    assert [r["id"] for r in c.trials()] == ["a", "c"] and c.bad_lines == 1 and not c.torn_tail
    assert path.read_bytes().count(b"\n") == 3


def test_journal_is_locked_while_written(tmp_path):
    path = tmp_path / "j.jsonl"
    with JournalWriter(path):
        with pytest.raises(JournalLockedError, match="another sweep"):
            JournalWriter(path).open()
    JournalWriter(path).open()  # released


def test_failures_are_recorded_and_the_sweep_goes_on(tmp_path):
    path = tmp_path / "j.jsonl"
    spec = parse_spec(spec_dict())
    res = run_sweep(spec, path)
    assert (res.finished, res.failed, res.references) == (8, 4, 2)
    c = read_journal(path)
    failed = [r for r in c.trials() if r["status"] == "failed"]
    assert {r["method"] for r in failed} == {"sweep_nan"}
    r = failed[0]
    assert r["error_type"] == "NonFiniteLossError" and r["error_step"] == 2 and "nan" in r["error"]
    ok = next(r for r in c.trials() if r["status"] == "finished")
    for key in ("config", "seed", "budget", "metrics", "steps", "seconds", "device", "versions", "git", "hyper",
                "benchmark", "metric_specs", "sweep", "setting"):
        assert key in ok, key
    assert ok["steps"] == 3 and ok["budget"] == {"epochs": 3} and ok["versions"]["torch"]
    assert len(c.of_kind("reference")) == 2 and len(c.of_kind("sweep")) == 1
    # rerun: finished and deterministic failures are skipped; --retry-failed reruns the failures only
    again = run_sweep(spec, path)
    assert (again.finished, again.failed, again.skipped) == (0, 0, 12)
    retry = run_sweep(spec, path, retry_failed=True)
    assert (retry.finished, retry.failed) == (0, 4)
    assert max(finished_counts(path).values()) == 1


def test_partial_runs_resume_without_duplicates(tmp_path):
    path = tmp_path / "j.jsonl"
    spec = parse_spec(spec_dict(methods=["gd", "minnorm_og"]))
    assert run_sweep(spec, path, max_trials=3).finished == 3
    assert run_sweep(spec, path, max_trials=2).finished == 2
    res = run_sweep(spec, path)
    assert res.finished == 3 and res.skipped == 5
    counts = finished_counts(path)
    assert set(counts) == {t.id for t in spec.trials} and set(counts.values()) == {1}


def test_setup_failure_aborts(tmp_path):
    spec = parse_spec(spec_dict(benchmark={"name": "sweep_fake", "imports": ["sweep_fake"],
                                           "options": {"bogus": 1}}))
    with pytest.raises(SweepAborted, match="setup step failed.*unexpected keyword argument .bogus."):
        run_sweep(spec, tmp_path / "j.jsonl", check=False)
    bad = parse_spec(spec_dict(metrics={"retain_mse": "max"}))
    with pytest.raises(SweepAborted, match="'retain_mse' is 'max'-is-better"):
        run_sweep(bad, tmp_path / "k.jsonl")


def test_real_kill_and_resume(tmp_path):
    """SIGKILL a running sweep process, rerun it: nothing lost, nothing finished twice."""
    spec_path = tmp_path / "kill.toml"
    spec_path.write_text('''
name = "kill"
seeds = [1, 2, 3]
methods = ["gd", "ridge"]
[benchmark]
name = "sweep_fake"
imports = ["sweep_fake"]
options = {sleep = 0.15}
[budget]
epochs = 2
[grid]
lr = [1e-2, 1e-3]
reg_coef = [0.1, 1.0]
''')
    journal = tmp_path / "kill.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(SRC), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "overunlearn", "sweep", str(spec_path), "--journal", str(journal), "-q",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(finished_counts(journal)) >= 3 or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.stderr.read().decode()}"
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only this sweep
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    n_before = len(finished_counts(journal))
    assert 3 <= n_before < 18
    # a kill can also cut a line in half: simulate that on top of the real kill
    with open(journal, "ab") as fh:
        fh.write(b'{"kind":"trial","id":"deadbeef","status":"fini')

    from overunlearn.sweep.spec import load_spec

    spec = load_spec(spec_path)
    res = run_sweep(spec, journal)
    assert res.skipped == n_before and res.finished == 18 - n_before
    c = read_journal(journal)
    assert c.bad_lines == 1
    counts = finished_counts(journal)
    assert set(counts) == {t.id for t in spec.trials}
    assert set(counts.values()) == {1}, "a trial was recorded as finished twice"
    # every line but the torn one is valid JSON, one record per line
    lines = journal.read_bytes().split(b"\n")
    assert sum(1 for ln in lines if ln.strip() and not _is_json(ln)) == 1


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def test_code_fingerprint_covers_loaded_plugin_sources(tmp_path, monkeypatch):
    """Editing a plugin's method must make its journalled trials stale, as editing the package does."""
    import sys

    import overunlearn.plugins as plugins
    from overunlearn.sweep.journal import code_fingerprint

    base = code_fingerprint()
    mod = tmp_path / "fp_plugin_mod.py"
    mod.write_text("SCALE = 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fp_plugin_mod  # noqa: F401

    monkeypatch.setattr(plugins, "active_plugins", lambda: ["fp_plugin_mod"])
    with_plugin = code_fingerprint()
    assert with_plugin != base
    mod.write_text("SCALE = 0.0\n")
    assert code_fingerprint() not in (base, with_plugin)
    monkeypatch.delitem(sys.modules, "fp_plugin_mod")
