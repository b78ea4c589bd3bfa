"""The README's "your own model" example runs as documented."""

import runpy
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_model.py"


def test_own_model_example_runs_and_leaves_original_untouched(capsys):
    ns = runpy.run_path(str(EXAMPLE))
    out = capsys.readouterr().out
    assert "retain acc" in out and "forget acc" in out
    result, model = ns["result"], ns["model"]
    assert result.record.steps == 5  # 30 forget points, batch 64 -> 1 step per epoch, 5 epochs
    # the engine works on a copy: the caller's model is not the returned one and was not changed
    assert result.model is not model
    changed = any(not torch.equal(a, b.cpu()) for a, b in zip(model.parameters(), result.model.parameters()))
    assert changed
