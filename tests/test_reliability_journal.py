"""Journal reading and resume semantics (issue 19): every bad line is skipped with its line number and
reason, conflicting duplicates are reported, and only what is really done is skipped on resume."""

from __future__ import annotations

import json

import pytest
import test_reliability_fake as fake

from overunlearn.report import build_report
from overunlearn.sweep.journal import JournalWriter, read_journal
from overunlearn.sweep.run import SweepAborted, run_sweep
from overunlearn.sweep.spec import parse_spec


def spec_dict(**changes):
    raw = {
        "name": "rel",
        "seeds": [1, 2],
        "methods": ["gd"],
        "benchmark": {"name": "sweep_fake", "imports": ["test_reliability_fake"]},
        "budget": {"epochs": 2},
        "metrics": {"retain_mse": "min", "forget_gap": "max"},
        "grid": {"lr": [1e-2, 1e-3]},
    }
    raw.update(changes)
    return raw


BAD_LINES = [
    (b"this is not json", "not valid JSON"),
    (b'{"kind":"trial","status":"finished"}', "without 'id'"),
    (b'{"kind":"trial","id":"zz","status":"finished","seed":"one"}', "'seed'"),
    (b'{"kind":"trial","id":"zz","status":"done"}', "'status'"),
    (b'{"kind":"trial","id":"zz","status":"finished","metrics":[1,2]}', "'metrics'"),
    (b'{"kind":"reference","seed":1,"status":"finished"}', "'benchmark_key'"),
    (b'{"kind":"reference","benchmark_key":"k","seed":1,"status":"finished","reference":{"original":3}}',
     "'reference'"),
    (b'{"kind":"sweep","spec":{"settings":[]}}', "'spec'"),
    (b'{"kind":"sweep","spec":{"name":"rel","settings":[{"name":"","grids":{"gd":{"lr":1}}}]}}', "grids"),
    (b'[1, 2, 3]', "JSON object"),
    (b'{"kind":"nonsense"}', "unknown record kind"),
]


@pytest.fixture()
def damaged(tmp_path):
    """A finished sweep's journal with every kind of bad line appended, a conflicting duplicate of one
    trial, and a torn last line."""
    path = tmp_path / "j.jsonl"
    spec = parse_spec(spec_dict())
    res = run_sweep(spec, path, warn=lambda m: None)
    assert res.finished == 4
    first = read_journal(path).trials()[0]
    dup = dict(first, metrics={k: v + 1.0 for k, v in first["metrics"].items()})
    n_good = len(path.read_bytes().splitlines())
    with open(path, "ab") as fh:
        for line, _ in BAD_LINES:
            fh.write(line + b"\n")
        fh.write(json.dumps(dup).encode() + b"\n")
        fh.write(b'{"kind": "trial", "id": "torn", "sta')
    return spec, path, n_good


def test_every_bad_line_is_skipped_with_its_number_and_reason(damaged):
    _, path, n_good = damaged
    c = read_journal(path)
    assert len(c.problems) == len(BAD_LINES) + 1 and c.bad_lines == len(BAD_LINES) + 1
    for k, (_, reason) in enumerate(BAD_LINES):
        msg = c.problems[k]
        assert f"{path} line {n_good + 1 + k}:" in msg and reason in msg, (msg, reason)
    assert f"line {n_good + len(BAD_LINES) + 2}:" in c.problems[-1] and "incomplete last line" in c.problems[-1]
    # the conflicting duplicate is reported, naming both lines; the first one is used
    assert len(c.conflicts) == 1
    first = c.trials()[0]
    assert first["id"] in c.conflicts[0] and f"lines {c.line_of(first)} and {n_good + len(BAD_LINES) + 1}" in \
        c.conflicts[0]
    assert c.latest_trials()[first["id"]] is first


def test_identical_duplicates_are_not_conflicts(tmp_path):
    path = tmp_path / "j.jsonl"
    rec = {"kind": "trial", "id": "a", "status": "finished", "metrics": {"m": 1.0}}
    with JournalWriter(path) as w:
        w.append(rec)
        w.append(rec)
    assert read_journal(path).conflicts == []


def test_resume_and_report_survive_a_damaged_journal_and_warn(damaged, tmp_path):
    spec, path, _ = damaged
    warnings: list[str] = []
    res = run_sweep(spec, path, warn=warnings.append)  # nothing to redo, no KeyError / ValueError
    assert (res.finished, res.failed, res.skipped) == (0, 0, 4)
    assert any("line" in w and "not valid JSON" in w for w in warnings)
    assert any("different metrics" in w for w in warnings)
    report_warnings: list[str] = []
    files = build_report(path, tmp_path / "rep", figures=False, warn=report_warnings.append)
    assert any(f.name == "results.md" for f in files) or any(f.name == "frontiers.md" for f in files)
    assert any("not valid JSON" in w for w in report_warnings)
    index = (tmp_path / "rep" / "index.md").read_text()
    assert "Journal warnings" in index and "different metrics" in index


def test_report_leaves_out_trials_it_cannot_place(tmp_path):
    """A valid trial line without method/config_key/seed does not crash the report; it is named."""
    path = tmp_path / "j.jsonl"
    run_sweep(parse_spec(spec_dict(seeds=[1])), path, warn=lambda m: None)
    with JournalWriter(path) as w:
        w.append({"kind": "trial", "id": "lonely", "status": "finished", "metrics": {"retain_mse": 1.0}})
    seen: list[str] = []
    build_report(path, tmp_path / "rep", figures=False, warn=seen.append)
    assert any("trial lonely left out of the report" in m and "'method'" in m for m in seen)


def test_done_ids_count_only_finished_and_deterministic_failures(tmp_path):
    path = tmp_path / "j.jsonl"
    with JournalWriter(path) as w:
        w.append({"kind": "trial", "id": "ok", "status": "finished"})
        w.append({"kind": "trial", "id": "nan", "status": "failed", "error_type": "NonFiniteLossError"})
        w.append({"kind": "trial", "id": "rt", "status": "failed", "error_type": "RuntimeError"})
        w.append({"kind": "trial", "id": "died", "status": "failed", "error_type": "WorkerDied"})
    c = read_journal(path)
    assert c.done_ids() == {"ok", "nan"}
    assert c.done_ids(retry_failed=True) == {"ok"}


def test_a_trial_that_failed_with_an_ordinary_error_is_retried(tmp_path, monkeypatch):
    path = tmp_path / "j.jsonl"
    spec = parse_spec(spec_dict(methods=["gd", "rel_flaky"]))
    monkeypatch.setenv(fake.FLAKY, "1")
    res = run_sweep(spec, path, warn=lambda m: None)
    assert (res.finished, res.failed, res.diverged) == (4, 4, 0)
    failed = [r for r in read_journal(path).trials() if r["status"] == "failed"]
    assert {r["error_type"] for r in failed} == {"RuntimeError"}
    monkeypatch.setenv(fake.FLAKY, "0")  # the user fixed the cause
    res = run_sweep(spec, path, warn=lambda m: None)
    assert (res.finished, res.failed, res.skipped) == (4, 0, 4)
    assert read_journal(path).finished_ids() == {t.id for t in spec.trials}


def test_a_failed_reference_is_measured_again(tmp_path, monkeypatch):
    path = tmp_path / "j.jsonl"
    spec = parse_spec(spec_dict(benchmark={"name": "rel_flaky_ref", "imports": ["test_reliability_fake"]}))
    monkeypatch.setenv(fake.REF_FAILS, "1")
    with pytest.raises(SweepAborted, match="reference: a transient failure"):
        run_sweep(spec, path, warn=lambda m: None)
    monkeypatch.setenv(fake.REF_FAILS, "0")
    res = run_sweep(spec, path, warn=lambda m: None)
    assert res.references == 2 and res.finished == 4
    refs = read_journal(path).references()
    assert len(refs) == 2 and all(r["status"] == "finished" for r in refs.values())


def test_the_lock_is_taken_before_the_journal_is_read(tmp_path, monkeypatch):
    """A second sweep on a journal being written stops at the lock without having read (or decided) anything."""
    import overunlearn.sweep.run as run_mod
    from overunlearn.sweep.journal import JournalLockedError

    path = tmp_path / "j.jsonl"
    reads: list[str] = []
    real = run_mod.read_journal
    monkeypatch.setattr(run_mod, "read_journal", lambda p: reads.append(str(p)) or real(p))
    with JournalWriter(path):
        with pytest.raises(JournalLockedError):
            run_sweep(parse_spec(spec_dict()), path, warn=lambda m: None)
    assert reads == []
    run_sweep(parse_spec(spec_dict(seeds=[1])), path, warn=lambda m: None)
    assert reads == [str(path)]


def test_provenance_is_compared_on_resume_and_in_the_report(tmp_path):
    """Trials recorded by other code are named (and rerun on request); the report flags mixed provenance."""
    path = tmp_path / "j.jsonl"
    spec = parse_spec(spec_dict())
    run_sweep(spec, path, warn=lambda m: None)
    lines = path.read_bytes().splitlines()
    old = [json.loads(x) for x in lines]
    for r in old:  # two trials "from an older version"
        if r["kind"] == "trial" and r["seed"] == 1:
            r["code"] = "0123456789ab"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in old))
    warnings: list[str] = []
    res = run_sweep(spec, path, warn=warnings.append)
    assert res.finished == 0 and any("reusing 2 finished trial(s) recorded by other code" in w
                                     and "0123456789ab" in w for w in warnings)
    seen: list[str] = []
    build_report(path, tmp_path / "rep", figures=False, warn=seen.append)
    assert any("mixed provenance" in m and "0123456789ab" in m for m in seen)
    res = run_sweep(spec, path, warn=lambda m: None, rerun_stale=True)
    assert res.finished == 2
    c = read_journal(path)
    assert c.conflicts == [] and not any(r.get("code") == "0123456789ab" for r in c.latest_trials().values())
    seen.clear()
    build_report(path, tmp_path / "rep2", figures=False, warn=seen.append)
    assert not any("mixed provenance" in m for m in seen)


def test_report_flags_engine_trials_run_with_different_thread_counts():
    from overunlearn.report.aggregate import mixed_provenance

    base = {"status": "finished", "code": "abc", "versions": {"torch": "2.x"}, "arithmetic": "engine"}
    same = [dict(base, torch_threads=1), dict(base, torch_threads=1)]
    assert mixed_provenance(same) is None
    note = mixed_provenance([*same, dict(base, torch_threads=2)])
    assert note is not None and "2 thread(s)" in note and "1 thread(s)" in note
    vectorised = dict(base, arithmetic="vectorised")
    assert mixed_provenance([dict(vectorised, torch_threads=1), dict(vectorised, torch_threads=2)]) is None
