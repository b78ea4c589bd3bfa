"""Damaged inputs found by the second review: each is one message naming the file and what to do.

* A: corrupt or truncated dataset files (MNIST-like IDX, CIFAR batches, images; ``data prepare``
  sources; a ``--data-root`` that is a file);
* B: journal lines with mistyped provenance or budget fields are skipped with their line number;
* C: a ``[report].metrics`` name the benchmark does not report stops the sweep before it starts;
* D: sweeps whose names make the same folder name get folders of their own in a report.

Everything runs on tiny files written here (no real dataset, no network).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import sweep_fake  # noqa: F401  (registers the fake benchmark)
import typer
from typer.testing import CliRunner

from overunlearn.data import load_images, prepare_fashion_mnist
from overunlearn.data.sources import MNIST_FILES
from overunlearn.errors import DatasetFileError
from overunlearn.report import build_report
from overunlearn.sweep.journal import read_journal
from overunlearn.sweep.run import SweepAborted, run_sweep
from overunlearn.sweep.spec import load_spec, parse_spec

# ---------------------------------------------------------------------------------------------- helpers


def _idx_bytes(arr: np.ndarray) -> bytes:
    """An uint8 array as an IDX file."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _mnist_arrays(n_train: int = 6, n_test: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }


def _write_gz_source(folder: Path, bad: dict[str, bytes] | None = None, seed: int = 0) -> None:
    """The four ``*-ubyte.gz`` files of a ``data prepare`` source; ``bad``: file name -> raw bytes instead."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in _mnist_arrays(seed=seed).items():
        if bad and name in bad:
            (folder / (name + ".gz")).write_bytes(bad[name])
        else:
            (folder / (name + ".gz")).write_bytes(gzip.compress(_idx_bytes(arr)))


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (symlinks as their target), to see that nothing changed."""
    return {str(p.relative_to(folder)): (str(p.readlink()).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_symlink() or p.is_file()}


# ---------------------------------------------------------------------------------------------- A: datasets


def test_garbage_mnist_files_are_named_not_an_assertion_from_torchvision(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for files in MNIST_FILES.values():
        for f in files:
            (raw / f).write_bytes(b"garbage\n")
    with pytest.raises(DatasetFileError) as info:
        load_images("mnist", "train", tmp_path)
    msg = str(info.value)
    assert str(raw / "train-images-idx3-ubyte") in msg and "Delete it and provide the file again" in msg
    assert info.value.path == str(raw / "train-images-idx3-ubyte")


def test_a_truncated_fashion_mnist_file_is_named_with_its_expected_size(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name, arr in _mnist_arrays().items():
        (raw / name).write_bytes(_idx_bytes(arr))
    cut = raw / "train-images-idx3-ubyte"
    cut.write_bytes(cut.read_bytes()[:1000])
    with pytest.raises(DatasetFileError, match="truncated") as info:
        load_images("fashion-mnist", "train", tmp_path)
    assert str(cut) in str(info.value) and "[6, 28, 28]" in str(info.value)
    assert load_images("fashion-mnist", "test", tmp_path).images.shape == (4, 1, 28, 28)  # the other split is fine


def test_labels_that_do_not_match_the_images_name_the_labels_file(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = _mnist_arrays()
    arrays["t10k-labels-idx1-ubyte"] = arrays["t10k-labels-idx1-ubyte"][:3]  # 3 labels, 4 images
    for name, arr in arrays.items():
        (raw / name).write_bytes(_idx_bytes(arr))
    with pytest.raises(DatasetFileError, match="3 labels for the 4 images") as info:
        load_images("mnist", "test", tmp_path)
    assert str(raw / "t10k-labels-idx1-ubyte") in str(info.value)


@pytest.mark.parametrize("content", [b"garbage\n", pickle.dumps([1, 2, 3]),
                                     pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]})[:40],
                                     pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]})],
                         ids=["garbage", "a list", "cut short", "not 32x32 images"])
def test_a_damaged_cifar_batch_is_named(tmp_path, content):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / name).write_bytes(content)
    with pytest.raises(DatasetFileError) as info:
        load_images("cifar10", "train", tmp_path)
    assert str(base / "data_batch_1") in str(info.value) and "Delete it" in str(info.value)


def test_an_unsafe_cifar_batch_is_named_and_still_an_unpickling_error(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / name).write_bytes(pickle.dumps({"data": print, "labels": [0]}))
    with pytest.raises(DatasetFileError, match="refusing to load builtins.print") as info:
        load_images("cifar10", "test", tmp_path)
    assert isinstance(info.value, pickle.UnpicklingError) and str(base / "test_batch") in str(info.value)


def test_a_corrupt_tiny_imagenet_image_is_named(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    (base / "train" / "n001" / "images").mkdir(parents=True)
    (base / "val" / "n001").mkdir(parents=True)
    bad = base / "train" / "n001" / "images" / "a.JPEG"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetFileError, match="not a readable image") as info:
        load_images("tiny-imagenet", "train", tmp_path)
    assert str(bad) in str(info.value)


def test_a_commands_dataset_file_error_is_one_line_and_exit_2(capsys):
    from overunlearn.cli.errors import friendly_errors

    with pytest.raises(typer.Exit) as info, friendly_errors("nothing"):
        raise DatasetFileError("dataset file /x/y is unusable: bad. Delete it", "/x/y")
    assert info.value.exit_code == 2
    assert capsys.readouterr().err == "error: dataset file /x/y is unusable: bad. Delete it\n"


@pytest.mark.parametrize("bad", [
    {"train-images-idx3-ubyte": b"garbage\n"},  # not gzip at all (BadGzipFile)
    {"t10k-labels-idx1-ubyte": gzip.compress(b"garbage\n")},  # gzip, not IDX; the last file checked
    {"t10k-images-idx3-ubyte": gzip.compress(_idx_bytes(np.zeros((4, 28, 28), np.uint8)))[:-12]},  # cut short
], ids=["not gzip", "not IDX", "cut short"])
def test_prepare_checks_every_source_file_before_laying_any_out(tmp_path, bad):
    src, root = tmp_path / "src", tmp_path / "root"
    _write_gz_source(src, bad)
    with pytest.raises(DatasetFileError) as info:
        prepare_fashion_mnist(root, src)
    assert str(src / (next(iter(bad)) + ".gz")) in str(info.value)
    assert not root.exists()  # nothing laid out, not even raw/
    # a good earlier layout (of other data) is left exactly as it was
    good = tmp_path / "good"
    _write_gz_source(good, seed=1)
    prepare_fashion_mnist(root, good, link=False)
    before = _snapshot(root)
    with pytest.raises(DatasetFileError):
        prepare_fashion_mnist(root, src)
    assert _snapshot(root) == before


@pytest.mark.parametrize("link", [False, True])
def test_prepare_from_its_own_laid_out_folder_keeps_the_files(tmp_path, link):
    """``--source`` pointing at the laid-out ``raw/`` itself replaced each copied ``.gz`` by a symlink to
    itself (the data lost, and success reported)."""
    src, root = tmp_path / "src", tmp_path / "root"
    _write_gz_source(src)
    raw = prepare_fashion_mnist(root, src, link=link)
    before = _snapshot(raw)
    assert prepare_fashion_mnist(root, raw, link=link) == raw
    assert _snapshot(raw) == before
    assert all(p.resolve().is_file() for p in raw.iterdir())


def test_data_prepare_cli_names_a_bad_source_file_and_a_data_root_that_is_a_file(tmp_path):
    from overunlearn.cli import _register, app

    _register()
    runner = CliRunner()
    src = tmp_path / "src"
    _write_gz_source(src, {"train-labels-idx1-ubyte": b"garbage\n"})
    res = runner.invoke(app, ["data", "prepare", "fashion-mnist", "--source", str(src),
                              "--data-root", str(tmp_path / "root")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output  # not an uncaught error
    assert "train-labels-idx1-ubyte.gz is unusable" in res.output and "Traceback" not in res.output
    good, afile = tmp_path / "good", tmp_path / "afile"
    _write_gz_source(good)
    afile.write_text("x")
    res = runner.invoke(app, ["data", "prepare", "fashion-mnist", "--source", str(good), "--data-root", str(afile)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert f"{afile} is a file, not a folder" in res.output


# ---------------------------------------------------------------------------------------------- B: journal lines


def _spec(name: str, **extra):
    raw = {"name": name, "seeds": [1], "methods": ["gd"], "budget": {"epochs": 2},
           "benchmark": {"name": "sweep_fake", "imports": ["sweep_fake"], "options": {"n_metrics": 1}},
           "grid": {"lr": [1e-2]}}
    raw.update(extra)
    return parse_spec(raw)


@pytest.fixture(scope="module")
def fake_journal(tmp_path_factory) -> list[dict]:
    """The records of a one-trial sweep of the fake benchmark: a header, a reference, a trial."""
    path = tmp_path_factory.mktemp("j") / "j.jsonl"
    run_sweep(_spec("base"), path)
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("field, value, why", [
    ("code", [1], "field 'code'"),
    ("arithmetic", 5, "field 'arithmetic'"),
    ("torch_threads", "4", "field 'torch_threads'"),
    ("budget", {"epochs": "3"}, "'budget' must be a table of integer 'epochs'"),
    ("budget", {"epochs": 2, "seconds": "1"}, "'budget' must be a table of integer 'epochs'"),
])
def test_a_mistyped_trial_field_skips_the_line_with_its_number(fake_journal, tmp_path, field, value, why):
    trial = next(r for r in fake_journal if r["kind"] == "trial")
    kept = {**trial, "id": "kept", "budget": {"epochs": 2, "seconds": None}}  # an infinite seconds budget, as written
    lines = [r for r in fake_journal if r["kind"] != "trial"] + [{**trial, field: value}, kept]
    contents = read_journal(_write(tmp_path / "j.jsonl", lines))
    assert [r.get("id") for r in contents.trials()] == ["kept"]
    assert len(contents.problems) == 1 and f"line {len(lines) - 1}: skipped: " in contents.problems[0]
    assert why in contents.problems[0]
    contents.latest_trials()  # used to raise TypeError: unhashable type: 'list'


def test_report_of_trials_with_a_string_budget_and_no_header_skips_them(fake_journal, tmp_path):
    lines = [r for r in fake_journal if r["kind"] != "sweep"]
    lines = [{**r, "budget": {"epochs": "2"}} if r["kind"] == "trial" else r for r in lines]
    warnings: list[str] = []
    files = build_report(_write(tmp_path / "j.jsonl", lines), tmp_path / "out", warn=warnings.append)
    assert tmp_path / "out" / "index.md" in files
    assert len(warnings) == 1 and "line 2: skipped: 'budget'" in warnings[0]


def test_a_header_with_a_string_budget_is_skipped(fake_journal, tmp_path):
    header = next(r for r in fake_journal if r["kind"] == "sweep")
    spec = {**header["spec"], "settings": [{**header["spec"]["settings"][0], "budget": {"epochs": "2"}}]}
    contents = read_journal(_write(tmp_path / "j.jsonl", [{**header, "spec": spec}]))
    assert contents.sweeps() == {}
    assert "line 1: skipped: 'spec.settings[0].budget' must be a table of integer" in contents.problems[0]


# ---------------------------------------------------------------------------------------------- C: [report].metrics


def test_an_unknown_report_metric_stops_the_sweep_naming_the_file_and_the_valid_names(tmp_path):
    path = tmp_path / "s25.toml"
    path.write_text('seeds = [1]\nmethods = ["gd"]\n[benchmark]\nname = "sweep_fake"\nimports = ["sweep_fake"]\n'
                    '[budget]\nepochs = 2\n[grid]\nlr = [1e-2]\n[report]\nmetrics = ["nosuch", "retain_mse"]\n')
    journal = tmp_path / "j.jsonl"
    with pytest.raises(SweepAborted) as info:
        run_sweep(load_spec(path), journal)
    msg = str(info.value)
    assert msg.startswith(f"{path}: [report].metrics lists 'nosuch', which benchmark 'sweep_fake' does not report")
    assert msg.endswith("valid names: forget_gap, retain_mse")
    assert not journal.exists()


# ---------------------------------------------------------------------------------------------- D: report folders


def test_sweeps_whose_names_slug_alike_get_their_own_report_folders(tmp_path):
    journal = tmp_path / "j.jsonl"
    run_sweep(_spec("run 1"), journal)
    run_sweep(_spec("run_1", grid={"lr": [1e-3]}), journal)
    build_report(journal, tmp_path / "out", figures=False)
    folders = sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir())
    assert len(folders) == 2 and "run_1" in folders  # the name that is its own folder name keeps it
    other = next(f for f in folders if f != "run_1")
    # each sweep's hyperparameters (lr 0.01 vs 0.001) are in its own folder
    for folder, lr in ((other, 0.01), ("run_1", 0.001)):
        rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / folder / "hyperparameters.csv").read_text())))
        assert [json.loads(r["hyperparameters"]) for r in rows] == [{"lr": lr}]
    index = (tmp_path / "out" / "index.md").read_text()
    section_a, section_b = index.split("## run 1:")[1].split("## run_1:")
    assert f"]({other}/results.md)" in section_a and "](run_1/" not in section_a
    assert "](run_1/results.md)" in section_b and f"]({other}/" not in section_b


def test_report_folder_names_are_distinct_and_do_not_depend_on_order():
    from overunlearn.report import _folders

    names = ["run 1", "run_1", "Run_1", "run:1", "table"]
    a, b = _folders(names), _folders(list(reversed(names)))
    assert a == b and a["table"] == "table" and a["Run_1"] == "Run_1"
    assert len({f.casefold() for f in a.values()}) == len(names)
