"""Reports: tables (markdown, CSV), frontier figures and winning hyperparameters from a journal."""

from __future__ import annotations

import csv
import io

import pytest
import sweep_fake  # noqa: F401  (registers the fake benchmark and method)
from typer.testing import CliRunner

from overunlearn.report import build_report
from overunlearn.report.aggregate import load
from overunlearn.sweep.run import run_sweep
from overunlearn.sweep.spec import parse_spec

METHODS = ["gd", "minnorm_og", "ridge", "sweep_nan"]


def spec(name, n_metrics, **extra):
    metrics = {"retain_mse": "min", "forget_gap": "max"}
    raw = {
        "name": name,
        "title": f"Fake {name}",
        "seeds": [1, 2, 3],
        "methods": METHODS,
        "benchmark": {"name": "sweep_fake", "imports": ["sweep_fake"], "options": {"n_metrics": n_metrics}},
        "budget": {"epochs": 2},
        "metrics": dict(list(metrics.items())[:n_metrics]),
        "grid": {"lr": [1e-2, 1e-3], "reg_coef": [0.1, 0.5], "minnorm_og": {"grad_sample_size": [4]}},
    }
    raw.update(extra)
    return parse_spec(raw)


@pytest.fixture(scope="module")
def journal(tmp_path_factory):
    path = tmp_path_factory.mktemp("rep") / "j.jsonl"
    table = spec("table", 1, report={"statistic": "median"},
                 settings=[{"name": "T=2"}, {"name": "T=3", "budget": {"epochs": 3}}])
    run_sweep(table, path)
    run_sweep(spec("front", 2), path)
    return path


def test_aggregate_selection(journal):
    reports, _ = load(journal)
    by_name = {r.name: r for r in reports}
    assert set(by_name) == {"table", "front"}
    t2 = by_name["table"].settings[0]
    assert t2.selection == "best_mean" and t2.metrics == [("retain_mse", "min")]
    gd = next(m for m in t2.methods if m.method == "gd")
    assert len(gd.selected) == 1
    best = gd.selected[0]
    assert all(best.stats("retain_mse").mean <= g.stats("retain_mse").mean for g in gd.groups)
    assert set(t2.reference) == {"original", "ground_truth"}
    nan = next(m for m in by_name["table"].settings[1].methods if m.method == "sweep_nan")  # 3 epochs: diverges
    assert nan.selected == [] and nan.excluded == len(nan.groups)
    front = by_name["front"].settings[0]
    assert front.selection == "pareto" and [d for _, d in front.metrics] == ["min", "max"]
    for mr in front.methods:
        means = [g.stats("retain_mse").mean for g in mr.selected]
        assert means == sorted(means)  # best-first by the first metric
        gaps = [g.stats("forget_gap").mean for g in mr.selected]
        assert gaps == sorted(gaps)  # ...and each further point improves the second


def test_build_report_writes_tables_figures_and_hyperparameters(journal, tmp_path):
    files = build_report(journal, tmp_path / "out")
    names = {f.relative_to(tmp_path / "out").as_posix() for f in files}
    for expected in ("index.md", "table/results.md", "table/results.csv", "table/hyperparameters.md",
                     "table/hyperparameters.csv", "table/runtime.md", "front/frontiers.md", "front/frontiers.csv",
                     "front/frontier.png", "front/hyperparameters.md"):
        assert expected in names, (expected, sorted(names))
    for f in files:
        assert f.stat().st_size > 0
    png = (tmp_path / "out/front/frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    md = (tmp_path / "out/table/results.md").read_text()
    assert "retain_mse" in md and "Original" in md and "Ground truth" in md and "**minnorm_og**" in md
    assert "| T=2 |" in md and "| T=3 |" in md and "median (central range)" in md
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out/table/results.csv").read_text())))
    assert {r["method"] for r in rows} >= {"gd", "minnorm_og", "ridge", "original", "ground_truth"}
    assert all(r["n"] == "3" for r in rows)

    hyp = (tmp_path / "out/table/hyperparameters.md").read_text()
    for m in ("gd", "**minnorm_og**", "ridge"):
        assert m in hyp
    assert "lr=" in hyp and "reg_coef=" in hyp and "no complete setting" in hyp

    fr = (tmp_path / "out/front/frontiers.md").read_text()
    assert "retain_mse (↓)" in fr and "forget_gap (↑)" in fr and "Original" in fr
    index = (tmp_path / "out/index.md").read_text()
    assert "sweep_nan" in index and "failed seeds excluded" in index


def test_settings_are_matched_by_content_not_by_label(journal, tmp_path):
    import shutil

    copy = tmp_path / "copy.jsonl"
    shutil.copy(journal, copy)
    renamed = spec("renamed", 2)  # the same trials as "front" under another name: nothing runs
    res = run_sweep(renamed, copy)
    assert res.finished == 0 and res.skipped == len(renamed.trials)
    reports, _ = load(copy, sweeps=["renamed"])
    (s,) = reports[0].settings
    assert all(len(m.groups) == len([t for t in renamed.trials if t.method == m.method]) // 3 for m in s.methods)
    assert next(m for m in s.methods if m.method == "gd").selected


def test_held_out_selection_chooses_on_some_seeds_and_reports_the_others(journal, tmp_path):
    reports, _ = load(journal, sweeps=["table"], select_seeds=[1, 2])
    t2 = reports[0].settings[0]
    assert t2.seeds == [3] and t2.selected_on == [1, 2]
    assert any("held-out seeds [3]" in n for n in t2.notes)
    full, _ = load(journal, sweeps=["table"])
    for mr, mr_all in zip(t2.methods, full[0].settings[0].methods, strict=True):
        if not mr.selected:
            continue
        chosen = mr.selected[0]
        # the choice is the best mean on seeds 1-2 ...
        on_12 = {g.config_key: g.stats("retain_mse", [1, 2]).mean for g in mr_all.groups if g.metrics}
        assert on_12[chosen.config_key] == min(v for k, v in on_12.items()
                                               if k in {g.config_key for g in mr_all.groups if not g.failed})
        # ... and what is reported is seed 3 alone
        assert sorted(chosen.metrics) == [3] and chosen.stats("retain_mse").n == 1
        original = next(g for g in mr_all.groups if g.config_key == chosen.config_key)
        assert chosen.stats("retain_mse").median == original.metrics[3]["retain_mse"]
    for st in t2.reference.values():
        assert all(v.n == 1 for v in st.values())
    files = build_report(journal, tmp_path / "held", sweeps=["table"], figures=False, select_seeds=[1, 2])
    md = next(f for f in files if f.name == "results.md").read_text()
    assert "held-out seeds [3]" in md and "best mean on seeds [1, 2]" in md


def test_held_out_results_do_not_decide_the_selection():
    import math

    from overunlearn.report.aggregate import _setting
    from overunlearn.sweep.journal import FINISHED

    def rec(cfg, seed, value):
        return {"method": "gd", "config_key": cfg, "hyper": {"lr": cfg}, "config": {}, "seed": seed,
                "status": FINISHED, "metrics": {"err": value}}

    header = {"metrics": [{"name": "err", "direction": "min"}]}
    # A is better on the selection seeds 1-2 and has no finite value on held-out seed 3; B is worse
    recs = [rec("A", 1, 0.1), rec("A", 2, 0.1), rec("A", 3, math.nan), rec("B", 1, 0.9), rec("B", 2, 0.9),
            rec("B", 3, 0.9)]
    shdr = {"seeds": [1, 2, 3], "benchmark_options": {}}
    held = _setting("s", "T", header, shdr, recs, {}, False, [1, 2])
    assert [g.config_key for g in held.methods[0].selected] == ["A"]
    # with partial results allowed, a selection seed nobody finished is no crash
    part = _setting("s", "T", header, shdr, [rec("A", 3, 0.5), rec("B", 3, 0.4)], {}, True, [1, 2])
    assert part.methods[0].selected == []


def test_report_cli_select_seeds(journal, tmp_path):
    from overunlearn.cli import _register, app

    _register()
    ok = CliRunner().invoke(app, ["report", str(journal), "--out", str(tmp_path / "h"), "--sweep", "table",
                                  "--no-figures", "--select-seeds", "1-2"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(app, ["report", str(journal), "--out", str(tmp_path / "b"), "--sweep", "table",
                                   "--no-figures", "--select-seeds", "1-3"])
    assert bad.exit_code == 2 and "non-empty" in bad.output


def test_report_cli(journal, tmp_path):
    from overunlearn.cli import _register, app

    _register()
    res = CliRunner().invoke(app, ["report", str(journal), "--out", str(tmp_path / "r"), "--sweep", "front",
                                   "--no-figures"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r/front/frontiers.md").exists() and not (tmp_path / "r/table").exists()
    assert not list((tmp_path / "r").rglob("*.png"))
    res = CliRunner().invoke(app, ["report", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2 and "does not exist" in res.output
    # a sweep name the journal does not hold is one error listing those it does (it was an empty report)
    res = CliRunner().invoke(app, ["report", str(journal), "--out", str(tmp_path / "n"), "--sweep", "nosuch"])
    text = " ".join(res.output.replace("│", " ").split())
    assert res.exit_code == 2 and "no sweep named 'nosuch'" in text and "'table', 'front'" in text


def test_dominance_table_counts_weakly_dominated_front_points():
    from overunlearn.report.aggregate import ConfigGroup, MethodResult, SettingResult
    from overunlearn.report.tables import dominance_table

    def group(method: str, acc: float, err: float) -> ConfigGroup:
        return ConfigGroup(method, f"{method}{acc}{err}", {}, {}, metrics={1: {"acc": acc, "err": err}})

    mn = [group("minnorm_og", 0.9, 0.2), group("minnorm_og", 0.8, 0.05)]
    gd = [group("gd", 0.85, 0.3), group("gd", 0.8, 0.05)]  # both dominated (the second one weakly: a tie)
    salun = [group("salun", 0.95, 0.25)]  # better accuracy than every MinNorm-OG point: not dominated
    s = SettingResult("sw", "", "", [1], {"epochs": 1}, [("acc", "max"), ("err", "min")], "pareto", "mean_se",
                      [MethodResult("minnorm_og", mn, mn), MethodResult("gd", gd, gd),
                       MethodResult("salun", salun, salun)], {})
    md, csv = dominance_table(s)  # type: ignore[misc]
    rows = {r.split(",")[1]: r.split(",") for r in csv.strip().splitlines()[1:]}
    assert rows["gd"][2:6] == ["2", "2", "yes", "0"]
    assert rows["salun"][2:6] == ["1", "0", "no", "0"]
    assert "| SalUn |" in md or "salun" in md.lower()
    best_mean = SettingResult("sw", "", "", [1], {}, [("acc", "max")], "best_mean", "mean_se", [], {})
    assert dominance_table(best_mean) is None


def _front_setting(with_outlier: bool):
    from overunlearn.report.aggregate import ConfigGroup, MethodResult, SettingResult

    def groups(method, pts):
        return [ConfigGroup(method, f"{method}{i}", {}, {}, metrics={1: {"acc": a, "err": e}})
                for i, (a, e) in enumerate(pts)]

    mn = groups("minnorm_og", [(0.86, 0.6), (0.85, 0.2), (0.84, 0.0)])
    gd = groups("gd", [(0.86, 0.65)])
    methods = [MethodResult("minnorm_og", mn, mn), MethodResult("gd", gd, gd)]
    if with_outlier:
        ga = groups("ga", [(0.1, 0.0)])  # a diverged baseline far to the left
        methods.append(MethodResult("ga", ga, ga))
    return SettingResult("sw", "s", "", [1], {"epochs": 1}, [("acc", "max"), ("err", "min")], "pareto",
                         "mean_se", methods, {})


def test_frontier_figure_adds_a_close_up_only_when_a_front_is_far_away(tmp_path):
    import struct

    from overunlearn.report.figures import frontier_plot, zoom_limits

    assert zoom_limits(_front_setting(False)) is None
    (x0, x1), (y0, y1) = zoom_limits(_front_setting(True))
    assert 0.8 < x0 < 0.84 and 0.86 < x1 < 0.9  # the outlier at 0.1 is outside the close-up
    assert y0 < 0.0 and y1 > 0.6
    widths = []
    for flag in (False, True):
        path = frontier_plot(_front_setting(flag), tmp_path / f"f{flag}.png")
        widths.append(struct.unpack(">I", path.read_bytes()[16:20])[0])  # PNG IHDR width
    assert widths[1] == 2 * widths[0]


def test_bench_tables_print_the_median_seconds_of_an_even_number_of_seeds():
    from overunlearn.report.bench_table import _seconds

    assert _seconds([1.0, 3.0], "median") == "2.0"  # was the upper middle value, 3.0
    assert _seconds([20.0, 1.0, 10.0, 2.0], "median") == "6.0"
    assert _seconds([1.0, 5.0, 2.0], "median") == "2.0"
