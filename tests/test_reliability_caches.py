"""Caches (issue 19): a corrupt cached model is named and rebuilt, never a torch traceback advising
weights_only=False; runs sharing a cache train each model once; `bench poison` keeps its trials in its sweep
journal (tests/test_poison.py), so a rerun resumes and --threads / --jobs do not change its numbers."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import overunlearn.benchmarks.poison as P
from overunlearn.errors import CacheFileError, CacheRebuiltWarning
from overunlearn.storage import atomic_torch_save, safe_torch_load

TINY = P.PoisonRecipe(hidden=(16, 16), original_steps=40, ground_truth_steps=20, name="tiny")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle"])
def test_a_damaged_model_file_is_named_and_never_gets_torchs_advice(tmp_path, damage):
    path = tmp_path / "m.pt"
    atomic_torch_save(path, {"w": torch.ones(3)})
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a torch file at all")
    else:
        import pickle

        path.write_bytes(pickle.dumps(threading.Lock))  # something other than tensors
    with pytest.raises(CacheFileError) as info:
        safe_torch_load(path)
    msg = str(info.value)
    assert str(path) in msg and "weights_only" not in msg and "delete it" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_corrupt_cached_model_is_rebuilt_with_a_warning(tmp_path):
    bench = P.PoisonBenchmark(TINY, cache_dir=tmp_path)
    bench.prepare([1])
    good = bench.load_model(1, "original").state_dict()
    path = bench.model_path(1, "original")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    fresh = P.PoisonBenchmark(TINY, cache_dir=tmp_path)
    with pytest.warns(CacheRebuiltWarning, match=f"{path}.*rebuilding it"):
        model = fresh.load_model(1, "original")
    assert fresh.trained_count == 1  # only the damaged model was trained again
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), good.values(), strict=True))
    safe_torch_load(path)  # the file is whole again


def test_concurrent_runs_sharing_a_cache_train_each_model_once(tmp_path):
    """Two runs on one cache at the same time (threads here; processes take the same file lock): every
    model is trained by one of them only, and both end with every model."""
    benches = [P.PoisonBenchmark(TINY, cache_dir=tmp_path) for _ in range(2)]
    barrier = threading.Barrier(2)

    def go(bench: P.PoisonBenchmark) -> None:
        barrier.wait()
        bench.prepare([1, 2])

    threads = [threading.Thread(target=go, args=(b,)) for b in benches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(b.trained_count for b in benches) == 4  # 2 seeds x original, ground truth
    assert not benches[0].missing([1, 2])


def test_bench_poison_turns_a_truncated_model_into_a_warning_not_a_traceback(tmp_path):
    """The CLI path: a truncated cached model is named, rebuilt, and the run completes (exit 0)."""
    from typer.testing import CliRunner

    from overunlearn.cli import _register, app

    _register()
    bench = P.PoisonBenchmark("smoke", cache_dir=tmp_path / "c")
    bench.prepare([1])
    path = bench.model_path(1, "ground_truth")
    path.write_bytes(path.read_bytes()[:64])
    args = ["bench", "poison", "--recipe", "smoke", "--seeds", "1", "--epochs", "2", "--methods", "gd",
            "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "out"), "--threads", "1", "-q"]
    with pytest.warns(CacheRebuiltWarning, match=str(path)):
        res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and "weights_only" not in res.output


def test_image_model_cache_rebuilds_a_corrupt_model_from_its_initialisation(tmp_path):
    from torch import nn

    from overunlearn.benchmarks.training import ModelCache

    cache = ModelCache(tmp_path)
    path = cache.path("erase", "digits", "k", 1, "original")
    calls: list[torch.Tensor] = []

    def train_fn(model: nn.Module) -> dict:
        calls.append(model.weight.detach().clone())  # what training starts from
        with torch.no_grad():
            model.weight.add_(1.0)
        return {"steps": 1}

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(3, 2)

    _, _, hit = cache.load_or_train(path, fresh(), train_fn, {})
    assert not hit and path.exists()
    _, info, hit = cache.load_or_train(path, fresh(), train_fn, {})
    assert hit and info["steps"] == 1 and len(calls) == 1
    torch.save({"weight": torch.zeros(5, 5)}, path)  # another architecture: a partial load is undone
    with pytest.warns(CacheRebuiltWarning, match="training it again"):
        _, _, hit = cache.load_or_train(path, fresh(), train_fn, {})
    assert not hit and len(calls) == 2 and torch.equal(calls[1], calls[0])
    path.write_bytes(b"garbage")
    with pytest.warns(CacheRebuiltWarning, match=str(path)):
        _, _, hit = cache.load_or_train(path, fresh(), train_fn, {})
    assert not hit and len(calls) == 3


def test_bench_poison_ctrl_c_says_what_is_kept(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from overunlearn.cli import _register, app

    _register()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(P.PoisonBenchmark, "prepare", interrupted)
    res = CliRunner().invoke(app, ["bench", "poison", "--recipe", "smoke", "--seeds", "1", "--epochs", "2",
                                   "--cache", str(tmp_path), "--out", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 130 and "kept in the cache" in res.output and "Traceback" not in res.output
    assert "run the same command again" in res.output


def test_privacy_cache_rebuilds_corrupt_models_and_signals_with_a_warning(tmp_path):
    from overunlearn.errors import CacheRebuiltWarning
    from overunlearn.privacy.runner import PrivacyRunner
    from overunlearn.privacy.setups import digits_setup

    setup = digits_setup(seed=0, n_retain=60, n_forget=12, n_test=30, hidden=16, steps=20, lr=1e-2,
                         train_batch_size=None, forget="mislabeled")
    first = PrivacyRunner(setup, data_seed=0, cache_dir=tmp_path, device="cpu")
    model = first.reference_model("original", 0)
    good = [p.detach().clone() for p in model.parameters()]
    pts = sorted(tmp_path.rglob("*.pt"))
    assert pts
    pts[0].write_bytes(b"truncated")  # a model file cut short by a crash
    again = PrivacyRunner(setup, data_seed=0, cache_dir=tmp_path, device="cpu")
    with pytest.warns(CacheRebuiltWarning, match=str(pts[0].name)):
        rebuilt = again.reference_model("original", 0)
    assert all(torch.equal(a, b) for a, b in zip(good, rebuilt.parameters()))  # trained again, same seed
    sig = again.reference_signals("original", 1)
    npz = sorted(tmp_path.rglob("*.npz"))
    assert npz
    npz[0].write_bytes(b"not a zip")
    third = PrivacyRunner(setup, data_seed=0, cache_dir=tmp_path, device="cpu")
    with pytest.warns(CacheRebuiltWarning, match="unreadable signals"):
        sig2 = third.reference_signals("original", 1)
    assert np.array_equal(sig[0]["forget"].loss, sig2[0]["forget"].loss)


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import stat

    import overunlearn.storage as S
    from overunlearn.storage import atomic_write_text

    path = atomic_write_text(tmp_path / "table.md", "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~S._UMASK  # not mkstemp's private 0o600
    assert stat.S_IMODE(path.stat().st_mode) & 0o044 or S._UMASK & 0o044  # readable by others unless masked
