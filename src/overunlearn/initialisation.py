"""Fresh initial values for a model's trainable parameters (Retrain's starting point), drawn the way the
model's own code draws them: ``problem.make_model``, peft's LoRA rules, Hugging Face's ``_init_weights``,
modules' ``reset_parameters``, or ``problem.init_fn``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from overunlearn.errors import DataError
from overunlearn.problem import UnlearningProblem


def _hf_initialiser(model: nn.Module) -> Callable[[nn.Module], None] | None:
    """Hugging Face's own per-module initialisation (``PreTrainedModel._init_weights``) of the
    outermost Hugging Face model inside ``model``, if there is one."""
    for m in model.modules():
        init = getattr(m, "_init_weights", None)
        if callable(init) and hasattr(m, "config"):
            return init
    return None


def _lora_inits(model: nn.Module) -> dict[str, Any]:
    """``adapter name -> init_lora_weights`` from a peft model's configs (empty for other models)."""
    for m in model.modules():
        configs = getattr(m, "peft_config", None)
        if isinstance(configs, dict):
            return {name: getattr(cfg, "init_lora_weights", True) for name, cfg in configs.items()}
    return {}


def _reset_lora(m: nn.Module, inits: dict[str, Any]) -> list[nn.Parameter]:
    """Re-initialise a peft LoRA layer's adapters with peft's rule and the adapter's configured
    ``init_lora_weights``; returns the adapter parameters (empty if ``m`` is no LoRA layer)."""
    reset = getattr(m, "reset_lora_parameters", None)
    adapters = getattr(m, "lora_A", None)
    if not callable(reset) or adapters is None:
        return []
    for name in list(adapters.keys()):
        init = inits.get(name, True)
        if init is False:
            # peft's rule for False is "keep the layers' construction values" (its reset does nothing), so draw
            # those again: nn.Linear's / nn.Conv's own init for A and B, a normal for embedding adapters
            for table in (m.lora_A, getattr(m, "lora_B", {})):
                if name in table and callable(getattr(table[name], "reset_parameters", None)):
                    table[name].reset_parameters()
            for table in (getattr(m, "lora_embedding_A", {}), getattr(m, "lora_embedding_B", {})):
                if name in table:
                    nn.init.normal_(table[name])
            continue
        try:
            reset(name, init)
        except ValueError as e:  # pissa, olora, loftq, eva, orthogonal...: set up when peft builds the adapter
            raise DataError(f"Retrain cannot re-initialise the LoRA adapter {name!r}: peft cannot redraw its "
                            f"init_lora_weights={init!r} on an existing adapter ({e}); pass "
                            "UnlearningProblem(make_model=...) that builds the model afresh") from None
    return [p for n, p in m.named_parameters() if n.split(".")[0].startswith("lora_")]


def cpu_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of ``model`` on the CPU (floating tensors in ``dtype`` if given), made without a second copy
    on ``model``'s own device (``copy.deepcopy(model).cpu()`` first duplicates a GPU model on the GPU)."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in memo:
            continue
        c = t.detach().to("cpu", copy=True)
        if dtype is not None and c.is_floating_point():
            c = c.to(dtype)
        memo[id(t)] = nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else c
    return copy.deepcopy(model, memo)


def reinitialise_trainable(problem: UnlearningProblem, model: nn.Module, seed: int, *,
                           caller: str = "Retrain") -> nn.Module:
    """Fresh values for every trainable parameter, for Retrain.

    ``problem.make_model()`` when given; otherwise: peft LoRA adapters with peft's rule and their
    configured ``init_lora_weights``; a Hugging Face model with its own ``_init_weights`` applied to
    every module (children first, as Hugging Face does, so a block's scaled projections are scaled);
    any parameter still untouched with its module's ``reset_parameters`` (or ``_reset_parameters``, as
    ``nn.MultiheadAttention`` has); then ``problem.init_fn`` on every module if given. Frozen
    parameters (``requires_grad=False``, e.g. a LoRA model's base weights) keep their values. A
    trainable parameter that nothing re-initialised stops the run with :class:`DataError`.

    The new values are drawn from the CPU generator only (a model on another device is reset
    through a CPU copy), so one seed gives the same initial model on every device, and no other
    generator (CUDA's included) is touched. ``caller`` names what needs the fresh values in errors.
    """
    on_cpu = all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        if problem.make_model is not None:
            fresh = problem.make_model()
            model.load_state_dict(fresh.state_dict())
            return model
        work = model if on_cpu else cpu_copy(model)
        trainable = [p for p in work.parameters() if p.requires_grad]
        frozen = {name: p.detach().clone() for name, p in work.named_parameters() if not p.requires_grad}
        covered: set[int] = set()
        with torch.no_grad():
            inits = _lora_inits(work)
            lora = [q for m in work.modules() for q in _reset_lora(m, inits)]
            lora_values = [q.detach().clone() for q in lora]
            covered.update(id(q) for q in lora)
            hf_init = _hf_initialiser(work)
            if hf_init is not None:
                for p in work.parameters():  # Hugging Face's init functions skip tensors flagged as initialised
                    p._is_hf_initialized = False
                before = {id(p): (p._version, p.detach().clone()) for p in trainable if id(p) not in covered}
                work.apply(hf_init)
                covered.update(i for p in trainable if (i := id(p)) in before
                               and (p._version != before[i][0] or not torch.equal(p, before[i][1])))
                for q, value in zip(lora, lora_values):  # (its Linear init must not replace LoRA's)
                    q.copy_(value)
            for m in work.modules():
                own = [p for p in m.parameters(recurse=False) if p.requires_grad and id(p) not in covered]
                reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
                if own and callable(reset):
                    reset()
                    covered.update(id(p) for p in m.parameters(recurse=False))
            if problem.init_fn is not None:
                work.apply(problem.init_fn)
                covered.update(id(p) for p in work.parameters())
            # (a reset of a module with frozen parameters must not change them)
            named = dict(work.named_parameters())
            for name, value in frozen.items():
                named[name].copy_(value)
        missed = [name for name, p in work.named_parameters() if p.requires_grad and id(p) not in covered]
        if missed:
            shown = ", ".join(missed[:5]) + (f" and {len(missed) - 5} more" if len(missed) > 5 else "")
            also = " or make_model=..." if caller == "Retrain" else ""
            raise DataError(
                f"{caller}: {len(missed)} trainable parameter(s) belong to no module that can re-initialise them "
                f"({shown}); pass UnlearningProblem(init_fn=...) (called on every module){also}, or freeze them "
                "(requires_grad=False)")
        if work is not model:
            model.load_state_dict(work.state_dict())
    return model


def init_mean(problem: UnlearningProblem, model: nn.Module, seeds: tuple[int, int] = (1, 2)) -> list[torch.Tensor]:
    """For each trainable parameter of ``model`` (in order), the mean of its initial distribution as two fresh
    initialisations (:func:`reinitialise_trainable`, on copies) tell it: where both draws agree -- a norm's gain
    of 1, a zero bias, a constant of the model's own init -- that value, elsewhere 0 (the mean of the zero-mean
    random draws of weights and embeddings). On ``model``'s device and dtypes; ``model`` is not changed.

    The draws come from the modules' own initialisation, not from ``problem.make_model``, which may build the
    same model at every call (the benchmarks' do: a fixed seed)."""
    problem = dataclasses.replace(problem, make_model=None)
    draws = []
    for seed in seeds:  # (in float32: two half-precision draws of a random weight agree by chance too often)
        fresh = reinitialise_trainable(problem, cpu_copy(model, torch.float32), seed,
                                       caller="MinNorm-OG's anchor='init_mean'")
        draws.append([p.detach() for p in fresh.parameters() if p.requires_grad])
    mine = [p for p in model.parameters() if p.requires_grad]
    return [torch.where(a == b, a, torch.zeros_like(a)).to(device=p.device, dtype=p.dtype)
            for p, a, b in zip(mine, *draws, strict=True)]


def init_draw(problem: UnlearningProblem, model: nn.Module, seed: int) -> list[torch.Tensor]:
    """For each trainable parameter of ``model`` (in order), its value in a fresh initialisation: Retrain's
    starting point for ``seed`` (:func:`reinitialise_trainable` on a copy). On ``model``'s device and dtypes."""
    fresh = reinitialise_trainable(problem, cpu_copy(model), seed, caller="MinNorm-OG's anchor='init'")
    mine = [p for p in model.parameters() if p.requires_grad]
    return [q.detach().to(device=p.device, dtype=p.dtype)
            for p, q in zip(mine, [q for q in fresh.parameters() if q.requires_grad], strict=True)]
