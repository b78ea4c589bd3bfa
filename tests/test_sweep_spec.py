"""Sweep specs: parsing, grid expansion, validation messages, trial identity, the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import sweep_fake  # noqa: F401  (registers the fake benchmark and method)
from typer.testing import CliRunner

from overunlearn.sweep.spec import SpecError, check_benchmark, load_spec, parse_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def base(**changes):
    raw = {
        "name": "t",
        "seeds": [1, 2],
        "methods": ["gd", "minnorm_og", "ridge"],
        "benchmark": {"name": "sweep_fake", "imports": ["sweep_fake"]},
        "budget": {"epochs": 2},
        "grid": {"lr": [1e-2, 1e-3], "reg_coef": [0.1, 1, 3]},
    }
    raw.update(changes)
    return raw


def counts(spec, setting=0):
    s = spec.settings[setting]
    return {m: sum(1 for t in s.trials if t.method == m and t.seed == s.seeds[0]) for m in s.methods}


def test_shared_grid_applies_by_field_and_drops_invalid_values_with_a_note():
    spec = parse_spec(base())
    # gd: lr only; minnorm_og: reg_coef 3 dropped (must be <= 1); ridge keeps it
    assert counts(spec) == {"gd": 2, "minnorm_og": 4, "ridge": 6}
    assert len(spec.trials) == (2 + 4 + 6) * 2
    assert any("minnorm_og: reg_coef=3.0 dropped" in n for n in spec.notes)
    ridge = [t for t in spec.trials if t.method == "ridge"]
    assert {t.hyper["reg_coef"] for t in ridge} == {0.1, 1.0, 3.0}
    assert all(isinstance(t.hyper["reg_coef"], float) for t in ridge)  # TOML ints become floats
    assert all(t.config["reg_coef_decay"] == 0.9 for t in ridge)  # defaults complete the config


def test_per_method_grid_overrides_and_explicit_invalid_value_is_an_error():
    spec = parse_spec(base(grid={"lr": [1e-3], "reg_coef": [0.1], "minnorm_og": {"reg_coef": [0.5, 1.0],
                                                                               "proj_pd": [1, 2]}}))
    assert counts(spec)["minnorm_og"] == 4
    with pytest.raises(SpecError, match=r"minnorm_og.*reg_coef=3.0 is invalid.*\[0.0, 1.0\]"):
        parse_spec(base(grid={"minnorm_og": {"reg_coef": [3.0]}}))


@pytest.mark.parametrize("raw,match", [
    (base(methods=["gd", "nope"]), r"unknown method 'nope'; valid names: .*minnorm_og"),
    (base(grid={"lr": [1e-3], "gd": {"reg_coef": [0.1]}}), r"method 'gd' has no hyperparameter\(s\) \['reg_coef'\]"),
    (base(grid={"lr": [1e-3], "regcoef": [0.1]}), r"\[grid\] key\(s\) \['regcoef'\] are hyperparameters of none"),
    (base(grid={"salun": {"ga_coef": [0.1]}}), r"\[grid.salun\] is given but 'salun' is not a listed method"),
    (base(budget={"seconds": 0.5}), r"seconds budget also needs a nominal 'epochs'"),
    (base(budget={"epoch": 2}), r"unknown key\(s\) \['epoch'\]"),
    (base(seeds=[]), r"seeds must be a non-empty list"),
    (base(metrics={"retain_mse": "lower"}), r"direction is \"min\" or \"max\""),
    (base(grid={"lr": [1e-3], "num_gd_epochs": [1.5]}), r"num_gd_epochs=1.5 must be an integer"),
    (base(extra=1), r"unknown top-level key"),
    (base(grid={"lr": [-1.0]}), r"no valid value left for lr"),
    (base(engine={"batch": -1}), r"\[engine\].batch must be a whole number >= 0"),
    (base(engine={"batch": True}), r"\[engine\].batch must be a whole number >= 0"),
])
def test_clear_errors(raw, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(raw, source="spec.toml")


def test_trial_identity():
    a = parse_spec(base(grid={"lr": [1e-3], "reg_coef": [1]}))
    b = parse_spec(base(grid={"lr": [1e-3], "reg_coef": [1.0]}, name="other"))
    ids_a = {t.id for t in a.trials}
    assert ids_a == {t.id for t in b.trials}  # 1 == 1.0 and the sweep name is a label, not identity
    assert len(ids_a) == len(a.trials)
    c = parse_spec(base(grid={"lr": [1e-3], "reg_coef": [1]}, budget={"epochs": 3}))
    assert ids_a.isdisjoint({t.id for t in c.trials})
    d = parse_spec(base(grid={"lr": [1e-3], "reg_coef": [1]}, benchmark={"name": "sweep_fake", "options": {"offset": 1.0}}))
    assert ids_a.isdisjoint({t.id for t in d.trials})
    t0 = a.trials[0]
    assert t0.config_key == next(t for t in a.trials if t.seed == 2 and t.method == t0.method
                                 and t.hyper == t0.hyper).config_key


def test_settings_override_budget_grid_options_and_methods():
    spec = parse_spec(base(settings=[
        {"name": "A"},
        {"name": "B", "budget": {"epochs": 5}, "grid": {"lr": [1e-4], "ridge": {"reg_coef_decay": [0.5, 0.6]}},
         "benchmark_options": {"offset": 2.0}},
        {"name": "C", "methods": ["gd"], "seeds": {"start": 3, "stop": 5}},
    ]))
    a, b, c = spec.settings
    assert counts(spec, 0) == {"gd": 2, "minnorm_og": 4, "ridge": 6}
    assert counts(spec, 1) == {"gd": 1, "minnorm_og": 2, "ridge": 6}
    assert b.budget == {"epochs": 5} and b.benchmark_options == {"offset": 2.0}
    assert c.methods == ["gd"] and c.seeds == [3, 4, 5] and len(c.trials) == 6
    assert {t.setting for t in spec.trials} == {"A", "B", "C"}


def test_seconds_budget_with_nominal_epochs():
    spec = parse_spec(base(budget={"seconds": 0.2, "epochs": 5}))
    assert spec.trials[0].budget == {"epochs": 5, "seconds": 0.2}


def test_check_benchmark_metrics():
    assert check_benchmark(parse_spec(base(metrics={"retain_mse": "min", "forget_gap": "max"}))) == []
    probs = check_benchmark(parse_spec(base(metrics={"retain_mse": "max", "acc": "max"})))
    assert any("'retain_mse' is 'max'-is-better" in p for p in probs)
    assert any("lists 'acc'" in p for p in probs)
    assert any("unknown benchmark" in p for p in check_benchmark(parse_spec(base(benchmark={"name": "nope"}))))
    probs = check_benchmark(parse_spec(base(benchmark={"name": "sweep_fake", "options": {"bogus": 1}})))
    assert probs and "rejects the options" in probs[0]


def test_load_toml_file_and_dry_run(tmp_path):
    from overunlearn.cli import _register, app

    path = tmp_path / "s.toml"
    path.write_text('''
name = "s"
seeds = [1, 2]
methods = ["gd", "minnorm_og"]
[benchmark]
name = "sweep_fake"
imports = ["sweep_fake"]
[budget]
epochs = 2
[metrics]
retain_mse = "min"
forget_gap = "max"
[grid]
lr = [1e-2, 1e-3]
reg_coef = [0.5, 2.0]
''')
    spec = load_spec(path)
    assert spec.name == "s" and len(spec.trials) == 8
    _register()
    res = CliRunner().invoke(app, ["sweep", str(path), "--dry-run", "--journal", str(tmp_path / "j.jsonl")])
    assert res.exit_code == 0, res.output
    assert "8 trials in 1 setting(s)" in res.output
    assert "minnorm_og: reg_coef=2.0 dropped" in res.output
    assert res.output.count("minnorm_og ") >= 4  # per-trial rows
    assert "batches:" not in res.output
    res = CliRunner().invoke(app, ["sweep", str(path), "--dry-run", "--summary", "--batch", "3",
                                   "--journal", str(tmp_path / "j.jsonl")])
    assert res.exit_code == 0, res.output
    # 8 trials, grouped by learning rate (4 each), in tasks of up to 3: per rate a batch of 3 and a single trial
    assert "batches: 2 task(s) of up to 3 epoch-budget trials (6 trials), 2 single trial task(s)" in res.output
    bad = tmp_path / "bad.toml"
    bad.write_text(path.read_text().replace('"gd"', '"gdx"'))
    res = CliRunner().invoke(app, ["sweep", str(bad), "--dry-run"])
    assert res.exit_code == 2 and "unknown method 'gdx'" in res.output


PAPER_COUNTS = {
    # grid sizes of the authors' reference grid configs
    ("table1_poison", "T=10"): {"minnorm_og": 162, "ridge": 27, "ngp": 12},
    ("table1_poison", "T=100"): {"minnorm_og": 72, "ridge": 27, "ngp": 12},
    ("table1_poison", "T=1000"): {"minnorm_og": 162, "ridge": 27, "ngp": 12},
    ("fig2_erase_cifar10", ""): {"minnorm_og": 48, "scrub": 48, "ridge": 48},
    ("table2_collapse", "retain .001, T=5"): {"minnorm_og": 108, "scrub": 108},
    ("table2_collapse", "retain .001, T=10"): {"minnorm_og": 144, "scrub": 144},
    ("table2_collapse", "retain .01, T=5"): {"minnorm_og": 144, "scrub": 144},
}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_configs_parse(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    assert spec.metrics, "every config lists its metrics with directions"
    assert spec.trials
    for s in spec.settings:
        expected = PAPER_COUNTS.get((spec.name, s.name), {})
        got = {m: sum(1 for t in s.trials if t.method == m and t.seed == s.seeds[0]) for m in expected}
        assert got == expected


def test_batch_is_an_engine_option_outside_trial_identity():
    plain, batched = parse_spec(base()), parse_spec(base(engine={"batch": 16}))
    assert plain.batch == 0 and batched.batch == 16
    assert [t.id for t in plain.trials] == [t.id for t in batched.trials]
