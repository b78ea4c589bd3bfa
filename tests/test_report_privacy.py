"""``overunlearn report --privacy``: the selected hyperparameters of a sweep evaluated by MIA, U-LiRA, KLoM.

A tiny Data Poisoning sweep (``smoke`` recipe, one seed, two settings) is reported with ``N = 4``;
every model goes to a cache inside ``tmp_path``.
"""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import sweep_fake  # noqa: F401  (registers the fake benchmark and method)
from typer.testing import CliRunner

from overunlearn.privacy.columns import PrivacyColumnsError, PrivacyOptions, privacy_section, select_points
from overunlearn.report import build_report
from overunlearn.report.aggregate import load
from overunlearn.sweep.run import run_sweep
from overunlearn.sweep.spec import parse_spec

N = 4
METHODS = ["gd", "minnorm_og"]


def _csv(path):
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.fixture(scope="module")
def poison(tmp_path_factory):
    """A poison sweep journal, its report with privacy columns, and the cache root."""
    root = tmp_path_factory.mktemp("privrep")
    cache = root / "cache"
    raw = {
        "name": "tiny", "title": "Tiny poison", "seeds": [1], "methods": METHODS,
        "benchmark": {"name": "poison", "options": {"recipe": "smoke", "cache_dir": str(cache)}},
        "budget": {"epochs": 5}, "metrics": {"sup_error": "min"},
        "grid": {"lr": [1e-2, 1e-3], "minnorm_og": {"reg_coef": [0.1, 0.5]}},
        "settings": [{"name": "T=5"}, {"name": "T=2", "budget": {"epochs": 2}}],
    }
    journal = root / "j.jsonl"
    run_sweep(parse_spec(raw), journal, device="cpu")
    out = root / "report"
    # the ground truth named: the default is the benchmark's privacy_defaults (tested in test_privacy_cli)
    options = PrivacyOptions(n_models=N, device="cpu", plots=False, progress=False, ground_truth="extra")
    files = build_report(journal, out, figures=False, sections=[privacy_section(options)])
    return {"journal": journal, "out": out, "cache": cache, "files": files}


def test_privacy_tables_have_a_row_per_method_and_reference(poison):
    d = poison["out"] / "tiny"
    rows = _csv(d / "privacy.csv")
    assert [(r["setting"], r["label"]) for r in rows] == [
        (s, label) for s in ("T=5", "T=2") for label in ("original", "ground_truth", *METHODS)]
    for r in rows:
        assert r["n_models"] == str(N) and r["seed"] == "1" and r["ground_truth"] == "extra"
        for col in ("mia_auc", "mia_eff_loss", "ulira_auc", "klom_forget_mean", "klom_forget_p95"):
            assert math.isfinite(float(r[col])), (r["label"], col)
    assert {json.loads(r["budget"])["epochs"] for r in rows} == {5, 2}
    md = (d / "privacy.md").read_text()
    for text in ("## T=5", "## T=2", "U-LiRA AUC", "KLoM forget p95", "MIA-efficacy (loss)", "N = 4",
                 "| ground_truth |", "| minnorm_og | best mean | lr=", "privacy/T=2/"):
        assert text in md, text
    for setting in ("T=5", "T=2"):
        folder = d / "privacy" / setting
        assert (folder / "privacy_rows.json").exists() and (folder / "privacy_arrays.npz").exists()
        assert folder / "privacy_arrays.npz" in poison["files"]
    assert "[tiny/privacy.md](tiny/privacy.md)" in (poison["out"] / "index.md").read_text()
    # the models live in the benchmark's cache (inside tmp_path), nothing in the user's cache
    assert list((poison["cache"] / "privacy").glob("poison-smoke-*"))


def test_privacy_hyperparameters_are_the_selected_winners(poison):
    d = poison["out"] / "tiny"
    winners = {(r["setting"], r["method"]): r for r in _csv(d / "hyperparameters.csv")}
    rows = [r for r in _csv(d / "privacy.csv") if r["kind"] == "method"]
    assert len(rows) == len(winners) == 4
    for r in rows:
        w = winners[(r["setting"], r["method"])]
        assert (r["hyperparameters"], r["config"], r["rank"]) == (w["hyperparameters"], w["config"], w["rank"])
    # ...and they are what privacy_report recorded as used
    used = json.loads((d / "privacy" / "T=5" / "privacy_rows.json").read_text())
    for r in rows:
        if r["setting"] == "T=5":
            row = next(u for u in used if u["label"] == r["method"])
            assert row["hyper"] == json.loads(r["config"]) and row["budget"]["epochs"] == 5


def test_original_memorises_the_forget_set_more_than_the_ground_truth(poison):
    rows = {(r["setting"], r["label"]): r for r in _csv(poison["out"] / "tiny" / "privacy.csv")}
    orig, gt = rows[("T=5", "original")], rows[("T=5", "ground_truth")]
    # originals were trained on the poisoned points: U-LiRA tells them from the oracles, KLoM is far
    # above the oracles' noise floor, and their loss on the poisoned points is lower
    assert float(orig["ulira_auc"]) > float(gt["ulira_auc"]) + 0.15
    assert float(orig["klom_forget_mean"]) > float(gt["klom_forget_mean"]) + 2.0
    assert float(orig["loss_forget"]) < float(gt["loss_forget"])
    # the reference rows do not depend on the setting (same models, same oracles)
    assert rows[("T=2", "original")]["ulira_auc"] == orig["ulira_auc"]


def test_rows_equal_a_direct_privacy_report_call(poison):
    from overunlearn.benchmarks import get_benchmark
    from overunlearn.privacy.runner import MethodSpec, privacy_report

    d = poison["out"] / "tiny"
    winners = [r for r in _csv(d / "hyperparameters.csv") if r["setting"] == "T=2"]
    specs = [MethodSpec(w["method"], json.loads(w["config"]), {"epochs": 2}, label=w["method"]) for w in winners]
    bench = get_benchmark("poison", recipe="smoke", cache_dir=str(poison["cache"]))
    direct = privacy_report(bench, specs, n_models=N, seed=1, cache_dir=poison["cache"], device="cpu",
                            ground_truth="extra", klom_bins="auto")  # served from the cache
    stored = json.loads((d / "privacy" / "T=2" / "privacy_rows.json").read_text())
    assert [r["label"] for r in stored] == [r["label"] for r in direct] == ["original", "ground_truth", *METHODS]
    for a, b in zip(stored, direct, strict=True):
        assert set(a) == set(b)
        for k in a:
            if k != "seconds":
                assert a[k] == (pytest.approx(b[k], nan_ok=True) if isinstance(b[k], float) else b[k]), k


def test_report_cli_privacy(poison, tmp_path):
    from overunlearn.cli import _register, app

    _register()
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(poison["journal"]), "--out", str(tmp_path / "r"), "--no-figures",
                              "--privacy", "--privacy-models", str(N), "--device", "cpu",
                              "--privacy-ground-truth", "extra"])
    assert res.exit_code == 0, res.output
    assert "[privacy] tiny [T=5]" in res.output and "done in" in res.output
    assert (tmp_path / "r/tiny/privacy.md").exists()
    def timeless(rows):  # a second run is served from the cache: no training or unlearning seconds
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert timeless(_csv(tmp_path / "r/tiny/privacy.csv")) == timeless(_csv(poison["out"] / "tiny/privacy.csv"))
    res = runner.invoke(app, ["report", str(poison["journal"]), "--privacy", "--privacy-models", "3"])
    assert res.exit_code == 2 and "at least 4" in res.output
    res = runner.invoke(app, ["report", str(poison["journal"]), "--privacy-seed", "2"])
    assert res.exit_code == 2 and "need --privacy" in res.output


@pytest.fixture(scope="module")
def fake_journal(tmp_path_factory):
    path = tmp_path_factory.mktemp("fake") / "j.jsonl"
    raw = {"name": "front", "seeds": [1, 2], "methods": ["gd", "ridge"],
           "benchmark": {"name": "sweep_fake", "imports": ["sweep_fake"], "options": {"n_metrics": 2}},
           "budget": {"epochs": 2}, "metrics": {"retain_mse": "min", "forget_gap": "max"},
           "grid": {"lr": [1e-1, 1e-2, 1e-3], "reg_coef": [0.1, 0.5]}}
    run_sweep(parse_spec(raw), path)
    return path


def test_pareto_selection_rule(fake_journal):
    (rep,), _ = load(fake_journal)
    (s,) = rep.settings
    assert s.selection == "pareto"
    first, _ = select_points(s)
    for p, mr in zip(first, s.methods, strict=True):
        assert p.rank == 1 and p.group is mr.selected[0]  # best on the first metric: the front's first point
    second, _ = select_points(s, "forget_gap")
    for p, mr in zip(second, s.methods, strict=True):
        gaps = [g.stats("forget_gap").mean for g in mr.selected]
        assert p.group.stats("forget_gap").mean == max(gaps) and p.rank == gaps.index(max(gaps)) + 1
    with pytest.raises(ValueError, match="not a metric"):
        select_points(s, "accuracy")


def test_unsupported_benchmark_is_named_and_the_rest_is_written(fake_journal, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(PrivacyColumnsError, match="sweep_fake") as info:
        build_report(fake_journal, out, figures=False, sections=[privacy_section(PrivacyOptions(n_models=N, progress=False))])
    (msg,) = info.value.failures
    assert "benchmark 'sweep_fake' has no privacy setup" in msg and msg.startswith("front [all]")
    for name in ("index.md", "front/frontiers.md", "front/hyperparameters.csv", "front/runtime.md",
                 "front/privacy.md"):
        assert out / name in info.value.files and (out / name).exists(), name
    assert "has no privacy setup" in (out / "index.md").read_text()
    assert "Not computed: benchmark 'sweep_fake'" in (out / "front/privacy.md").read_text()

    from overunlearn.cli import _register, app

    _register()
    res = CliRunner().invoke(app, ["report", str(fake_journal), "--out", str(tmp_path / "c"), "--privacy",
                                   "--no-figures"])
    assert res.exit_code == 1
    assert "error: privacy columns not computed for front [all]: benchmark 'sweep_fake'" in res.output
    assert (tmp_path / "c/front/frontiers.md").exists()


def test_unregistered_benchmark_says_how_to_register_it(fake_journal, tmp_path):
    journal = tmp_path / "j.jsonl"
    journal.write_text(fake_journal.read_text().replace('"name":"sweep_fake"', '"name":"not_registered"'))
    with pytest.raises(PrivacyColumnsError) as info:
        build_report(journal, tmp_path / "r", figures=False, sections=[privacy_section(PrivacyOptions(progress=False))])
    (msg,) = info.value.failures
    assert "benchmark 'not_registered' is not registered" in msg and "--import" in msg
    assert (tmp_path / "r/front/frontiers.md").exists()
