"""The per-trial unlearning loop: budgets, batches, optimizer, timing.

Protocol (as in the authors' reference code, `base_unlearner.Unlearner.unlearn`): one epoch is one pass over the forget batches; each
forget batch is paired with the next batch of a persistent, reshuffling retain
iterator; every method gets the same number of steps for the same budget.

Budgets (:class:`Budget`) combine ``epochs``, ``steps`` and ``seconds``; the run
stops at whichever limit is reached first. The wall-clock rule is precise:

* the clock starts after the working copy of the model is on its device and
  before ``method.setup`` (so SalUn's mask, teacher copies and Retrain's
  re-initialisation count), with the device synchronised;
* **a step starts only if the elapsed time, measured after synchronising the
  device, is below the deadline**; a step that has started always finishes, so
  a run overshoots ``seconds`` by at most one step;
* the record reports the steps done and the seconds used (setup included).

Schedules that depend on the number of epochs ``T`` (MinNorm-OG's and SCRUB's
final descent-only epochs, L1-Sparse's decay) use ``Budget.epochs`` as the planned
``T`` even when ``seconds`` or ``steps`` cut the run shorter.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
import numbers
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from overunlearn import structure
from overunlearn.batching import RetainCycle, forget_batches_per_epoch, forget_epoch
from overunlearn.errors import DataError, NonFiniteLossError
from overunlearn.initialisation import reinitialise_trainable
from overunlearn.methods.base import Method, MethodConfig
from overunlearn.methods.context import StepInfo, UnlearningContext
from overunlearn.problem import (
    IGNORE_INDEX,
    Batch,
    CausalLMTask,
    ClassificationTask,
    Outputs,
    TensorData,
    UnlearningProblem,
    as_heads,
    first_examples,
)


@dataclass(frozen=True)
class Budget:
    """How long to unlearn: any combination of ``epochs``, ``steps`` and ``seconds`` (the first limit reached
    ends the run). ``steps=0`` or ``epochs=0`` runs no step: the result is the method's set-up alone (the
    original model; for Retrain, its re-initialised trainable parameters)."""

    epochs: int | None = None
    steps: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.epochs is None and self.steps is None and self.seconds is None:
            raise ValueError("a Budget needs at least one of epochs, steps or seconds")
        for name in ("epochs", "steps"):
            v = getattr(self, name)
            if v is None:
                continue
            # whole numbers only; 3.0 is accepted (and stored as 3), 2.5 and "3" are not
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name}={v!r} must be a whole number, got {type(v).__name__}")
            if not isinstance(v, numbers.Integral):
                if not (math.isfinite(float(v)) and float(v).is_integer()):
                    raise ValueError(f"{name}={v!r} must be a whole number")
                object.__setattr__(self, name, int(v))
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={v} must be >= 0")
        if self.seconds is not None:
            if isinstance(self.seconds, bool) or not isinstance(self.seconds, numbers.Real):
                raise TypeError(f"seconds={self.seconds!r} must be a number, got {type(self.seconds).__name__}")
            if not self.seconds > 0:
                raise ValueError(f"seconds={self.seconds} must be > 0")


@dataclass
class UnlearnRecord:
    """What a run did: steps, time, losses, and why it stopped."""

    method: str
    config: dict
    steps: int = 0
    epochs_completed: int = 0
    steps_per_epoch: int = 0
    seconds: float = 0.0
    setup_seconds: float = 0.0
    stopped_by: str = ""
    epoch_losses: list[float] = field(default_factory=list)
    device: str = "cpu"


@dataclass
class UnlearnResult:
    model: nn.Module
    record: UnlearnRecord


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RuntimeError(f"device {device!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available; use the CPU (device 'cpu', or "
                           "'auto' to take CUDA only where there is one)")
    return dev


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_positions(model: nn.Module) -> int | None:
    """The longest sequence a Hugging Face model's position embeddings allow (``None``: no such limit)."""
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and not isinstance(config, dict):
            for key in ("max_position_embeddings", "n_positions"):
                value = getattr(config, key, None)
                if isinstance(value, int) and value > 0:
                    # rotary-embedding models (Llama) accept longer inputs; only absolute tables are a hard limit
                    if getattr(config, "rope_theta", None) is None and getattr(config, "rope_parameters", None) is None:
                        return value
            return None
    return None


def _check_lengths(name: str, model: nn.Module, inputs) -> None:
    limit = _max_positions(model)
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
    if limit is not None and isinstance(ids, Tensor) and ids.dim() >= 2 and ids.shape[1] > limit:
        raise DataError(f"{name} set: sequences of {ids.shape[1]} tokens are longer than the model's "
                        f"{limit} positions (config.max_position_embeddings / n_positions); truncate them")


def _check_keywords(name: str, model: nn.Module, inputs) -> None:
    """A dict of inputs is passed as keyword arguments: every required argument of ``forward`` must be a key,
    and every key an argument (unless ``forward`` takes ``**kwargs``)."""
    if not isinstance(inputs, dict):
        return
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    kinds = {p.kind for p in params.values()}
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    missing = [n for n in required if n not in inputs]
    if missing:
        raise DataError(f"{name} set: the model's forward needs {', '.join(map(repr, missing))}, but the inputs dict "
                        f"has no such key (it has {', '.join(map(repr, inputs))}); inputs dicts are passed as "
                        "model(**inputs)")
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        unknown = [k for k in inputs if k not in params]
        if unknown:
            raise DataError(f"{name} set: the inputs dict has key(s) {', '.join(map(repr, unknown))} that the model's "
                            f"forward does not take (it takes {', '.join(map(repr, params))})")
        return
    # forward(..., **kwargs), as every Hugging Face model's: a misspelt key ("attention_masks") is taken and
    # may be ignored; warn about keys that neither this forward nor a wrapped base model's (peft) names --
    # unless it names no keyword at all (a forward(**batch) wrapper, a torch.compile'd module), where
    # nothing tells a misspelt key from a good one
    named = {n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                         inspect.Parameter.KEYWORD_ONLY)}
    if not named:
        return
    base = getattr(model, "get_base_model", None)
    if callable(base):
        try:
            named |= set(inspect.signature(base().forward).parameters)
        except (TypeError, ValueError):
            return
    unnamed = [k for k in inputs if k not in named]
    if unnamed:
        close = {k: difflib.get_close_matches(k, sorted(named), n=1) for k in unnamed}
        hints = ", ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items())
        warnings.warn(f"{name} set: the inputs dict has key(s) {hints} that the model's forward does not name; it "
                      "takes them through **kwargs, where they may be ignored", UserWarning, stacklevel=4)


def _vocabulary_hint(model: nn.Module, inputs: Any) -> str:
    """Where token ids exceed the model's input embedding: say so (the model's error is "index out of range")."""
    get = getattr(model, "get_input_embeddings", None)
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
    emb = get() if callable(get) else None
    if not isinstance(ids, Tensor) or not isinstance(emb, nn.Embedding) or ids.numel() == 0:
        return ""
    top, low = int(ids.max()), int(ids.min())
    if top < emb.num_embeddings and low >= 0:
        return ""
    return (f"; input_ids range over {low}..{top} but the model's input embedding has {emb.num_embeddings} rows "
            "(a tokenizer with another vocabulary, or a pad id outside it?)")


def check_data(problem: UnlearningProblem, model: nn.Module, dev: torch.device) -> tuple[int, ...] | None:
    """Check outputs against targets on the first batch of the retain *and* the forget set.

    Runs before the clock starts, without gradients and in eval mode (no BatchNorm update), so that
    malformed targets raise a :class:`DataError` whichever set a method looks at first (or at all).
    Returns, for a categorical task, each head's number of classes (a language model's vocabulary): the
    bounds later batches of a ``Dataset`` are held to (:func:`check_drawn_labels`).
    """
    bounds: tuple[int, ...] | None = None
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for name, data in (("retain", problem.retain), ("forget", problem.forget)):
                b = first_examples(data, problem.batch_size, problem.collate).to(dev)
                _check_lengths(name, model, b.inputs)
                _check_keywords(name, model, b.inputs)
                try:
                    out = structure.call_model(model, b.inputs)
                except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
                    x = b.inputs
                    what = f"inputs of shape {tuple(x.shape)} and dtype {x.dtype}" if isinstance(x, Tensor) else \
                        f"inputs {structure.describe(x)}"
                    hint = _vocabulary_hint(model, b.inputs) if isinstance(e, IndexError) else ""
                    if isinstance(x, Tensor) and not x.is_floating_point() and "type" in str(e):
                        hint += "; integer inputs (e.g. uint8 images) must be converted to the model's float dtype first"
                    if isinstance(b.inputs, dict) and isinstance(e, (TypeError, KeyError, ValueError)):
                        hint = ("; a dict of inputs is passed as keyword arguments, model(**inputs): every key must "
                                "be an argument of the model's forward, and every input it needs must be a key")
                    raise DataError(f"{name} set: the model failed on the first batch ({what}): {e}{hint}") from None
                try:
                    problem.task.check(out, b.targets)
                    if isinstance(data, TensorData) and isinstance(problem.task, ClassificationTask):
                        _check_all_labels(problem.task, out, data.targets)
                    if isinstance(problem.task, CausalLMTask):
                        _check_some_scored(name, problem.task, data, b)
                    bounds = _label_bounds(problem.task, out)
                except DataError as e:
                    raise DataError(f"{name} set: {e}") from None
    finally:
        for m, f in flags.items():
            m.training = f
    return bounds


def _label_bounds(task, outputs: Outputs) -> tuple[int, ...] | None:
    """Each head's number of classes (a causal language model's vocabulary) for a categorical task."""
    if isinstance(task, CausalLMTask):
        return (int(task.select(outputs).shape[-1]),)
    if isinstance(task, ClassificationTask):
        return tuple(int(o.shape[1]) for o in task.logits(outputs))
    return None


def _check_all_labels(task: ClassificationTask, outputs: Outputs, targets) -> None:
    """Every class index of in-memory targets lies in ``[0, classes)`` of its head (not only the first batch's)."""
    for i, (o, t) in enumerate(zip(task.logits(outputs), as_heads(targets))):
        if t.numel() == 0 or t.dtype.is_floating_point:
            continue
        bad = ((t < 0) | (t >= o.shape[1])).nonzero()
        if len(bad):
            j = int(bad[0, 0])
            raise DataError(f"head {i}: class index {int(t.reshape(len(t), -1)[j, 0])} of example {j} is out of "
                            f"range [0, {o.shape[1]}) ({len(bad)} such examples)")


def _check_some_scored(name: str, task: CausalLMTask, data, first: Batch) -> None:
    """A language model's data set scores some token (a batch that scores none contributes nothing to a
    loss; a set that scores none is a labelling mistake). In-memory labels are read whole; of a ``Dataset``
    only the first batch, and a first batch without a scored token is a warning."""
    if isinstance(first.targets, Tensor) and first.targets.dim() == 2 and bool(task.scored_positions(first.targets).any()):
        return
    if isinstance(data, TensorData):
        labels = data.targets
        if isinstance(labels, Tensor) and labels.dim() == 2 and not bool(task.scored_positions(labels).any()):
            raise DataError("every label is -100, so no token is scored: the answer positions need their token ids as "
                            "labels (only prompt and padding positions carry -100)")
        return
    warnings.warn(f"the {name} set's first {len(first)} examples score no token (every label -100): a batch without "
                  "scored tokens contributes nothing; check the labels if the whole set is like that", UserWarning,
                  stacklevel=4)


_WARM = {"done": False}


def warm_up() -> None:
    """Pay, once per process and outside any timed region, the one-off cost of the first optimizer step.

    The first ``torch.optim`` optimizer a process builds and steps imports ``torch._dynamo``
    (1-5 s on a CPU); :func:`unlearn` calls this before its clock starts, so that a wall-clock
    budget is not cut short for the first run of a process only.
    """
    if _WARM["done"]:
        return
    w = torch.zeros(4, requires_grad=True)
    for opt in (torch.optim.AdamW([w], lr=1e-3, foreach=True), torch.optim.SGD([w], lr=1e-3, foreach=True)):
        opt.zero_grad(set_to_none=True)
        (w * w).sum().backward()
        opt.step()
    _WARM["done"] = True


def _package_warm_up() -> None:
    """:func:`warm_up` as the package :mod:`overunlearn.engine` exports it, so that replacing
    ``overunlearn.engine.warm_up`` (a profiler, a test) replaces what :func:`unlearn` calls."""
    from overunlearn import engine

    engine.warm_up()


def _check_optimizer(config: MethodConfig, params: list[Tensor]) -> None:
    """Refuse what the optimizer cannot step, before any work."""
    half = [p for p in params if p.dtype == torch.float16]
    if half and config.optimizer == "adamw":
        # AdamW divides by sqrt(v) + eps: eps = 1e-8 is 0 in float16, and so is the second moment of any
        # gradient below ~2e-4, so the first step divides by zero whatever the learning rate
        raise ValueError(f"AdamW cannot step float16 parameters ({len(half)} of the model's trainable tensors): its "
                         "eps (1e-8) and small squared gradients round to 0 in float16 and the first step divides by "
                         "zero. Unlearn a bfloat16 or float32 copy (model.to(torch.bfloat16)), or use optimizer='sgd'")


def _make_optimizer(config: MethodConfig, params: list[Tensor]) -> torch.optim.Optimizer:
    # foreach=True: the multi-tensor implementation (PyTorch's default only on CUDA) is 20-30%
    # faster per step on CPU for the small models of the benchmarks; same algorithm
    if config.optimizer in ("sgd", "sgd_momentum"):
        momentum = 0.9 if config.optimizer == "sgd_momentum" else 0.0
        return torch.optim.SGD(params, lr=config.lr, momentum=momentum, weight_decay=config.weight_decay,
                               foreach=True)
    _check_optimizer(config, params)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)


def check_drawn_labels(batches: list[tuple[str, Batch]], step: int, bounds: tuple[int, ...] | None = None,
                       unscored: bool = True) -> None:
    """Class / token labels of a categorical task drawn from a ``Dataset``: none negative but -100 (the unscored
    mark, where ``unscored`` says the task has one: not a classifier's, whose first batch refuses it too), which
    a loss would otherwise read as an index (a causal LM's gather clamps it to token 0) or silently skip (cross
    entropy ignores -100), and none at or beyond its head's ``bounds`` (on a GPU an index out of range is a
    device-side assert that breaks the process's CUDA context, not an error the step could name)."""
    for name, b in batches:
        for head, t in enumerate(as_heads(b.targets)):
            if t.is_floating_point():
                continue
            bad_mask = (t < 0) & (t != IGNORE_INDEX) if unscored else t < 0
            if bool(bad_mask.any()):
                bad = int(t[bad_mask][0])
                kinds = "class or token indices, -100 where a position is not scored" if unscored else \
                    "class indices (a classifier has no unscored mark)"
                raise DataError(f"the {name} batch of step {step}: label {bad} (head {head}) is negative; labels are "
                                f"{kinds}")
            if bounds is not None and head < len(bounds) and t.numel() and int(t.max()) >= bounds[head]:
                raise DataError(f"the {name} batch of step {step}: label {int(t.max())} (head {head}) is out of range "
                                f"[0, {bounds[head]}) of the model's outputs -- a later batch of a Dataset (those are "
                                "not checked ahead); check the labels of the whole set")


def _one_step(ctx: UnlearningContext, method: Method, info: StepInfo, retain_b: Batch, forget_b: Batch,
              forget_bn_stats: bool) -> float:
    model, dev = ctx.model, ctx.device
    forget_dev: Batch | None = None
    if method.uses_forget:
        forget_dev = forget_b.to(dev)
    elif forget_bn_stats:
        with torch.no_grad():
            structure.call_model(model, forget_b.to(dev).inputs)
    method.before_step(ctx, info, retain_b)
    assert ctx.optimizer is not None
    ctx.optimizer.zero_grad(set_to_none=True)
    drawn = [(name, b) for name, b, data in (("retain", retain_b, ctx.problem.retain), ("forget", forget_b,
                                                                                        ctx.problem.forget))
             if not isinstance(data, TensorData)]  # (a Dataset's batches after the first are not checked ahead)
    if drawn and ctx.problem.task.is_categorical:
        check_drawn_labels(drawn, info.step, ctx.label_bounds, not isinstance(ctx.problem.task, ClassificationTask))
    try:
        loss = method.loss(ctx, info, retain_b, forget_dev)
    except (IndexError, RuntimeError) as exc:
        # a label beyond the outputs in a batch of a Dataset (the first batch of each set is checked before
        # the run, TensorData entirely): name the step and the check that would have found it
        if not drawn or info.step == 0 or "out of bounds" not in str(exc):
            raise
        raise DataError(f"step {info.step}: {exc} -- a label lies outside the model's outputs in a batch of a "
                        "Dataset after the first (those are not checked ahead); check the labels of the whole set"
                        ) from exc
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise TypeError(f"method {method.name!r}: loss() must return a scalar tensor (e.g. a batch mean), got {got}")
    value = float(loss.detach())
    if not math.isfinite(value):
        for name, b in (("retain", retain_b), ("forget", forget_b)):
            bad = structure.non_finite_leaf(b.inputs)
            if bad is not None:
                where = "" if bad == "inputs" else f" ({bad})"
                raise DataError(f"the {name} batch of step {info.step} contains NaN or infinite inputs{where}")
        raise NonFiniteLossError(
            f"{method.name}: the loss became {value} at step {info.step} (epoch {info.epoch}); "
            "lower the learning rate or the ascent coefficient", step=info.step, method=method.name)
    loss.backward()
    method.on_gradients(ctx, info)
    ctx.optimizer.step()
    method.after_step(ctx, info, retain_b)
    return value


def unlearn(problem: UnlearningProblem, method: Method | type[Method] | str, budget: Budget, *, seed: int = 0,
            device: str | torch.device = "auto", progress: bool = False,
            forget_bn_stats: bool = False,
            on_step: Callable[[StepInfo, float], None] | None = None) -> UnlearnResult:
    """Run ``method`` on ``problem`` within ``budget`` and return the unlearned model.

    The caller's ``problem.model`` is never modified: the engine works on a deep copy,
    which it returns. The model stays in train mode throughout, as in the reference code.

    Args:
        problem: model, retain / forget data and task.
        method: an instance from :func:`overunlearn.methods.create`, or a method class or registered name
            (``"minnorm_og"``), which run with their default hyperparameters.
        budget: a :class:`Budget` of epochs / steps / seconds (see the module docstring for the cut-off rule).
        seed: seeds batch order and every random choice of the method; on CPU the same
            seed gives the same numbers.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        progress: show a progress bar.
        forget_bn_stats: also forward forget batches (without gradient) for methods that do
            not use them, so BatchNorm running statistics absorb forget-set statistics. This
            approximates the reference code, which forwards *both* batches in train mode at every
            step for every method; a method that does not use its retain batch (GA, NPO, SCRUB's
            max epochs) or forget batch (SCRUB's min epochs) skips that forward here. With the
            default ``False``, methods that never look at the forget set never forward it.
        on_step: called after every step with the step info and the loss value.

    Raises:
        DataError: outputs and targets of the first retain or forget batch do not match (checked
            before the clock starts), or a batch whose loss is not finite has NaN/inf inputs.
        NonFiniteLossError: the loss became NaN/inf; the error names the step.
    """
    if isinstance(method, str):
        from overunlearn.methods import create

        method = create(method)
    elif isinstance(method, type) and issubclass(method, Method):
        method = method()  # (a method class: its default hyperparameters)
    if not isinstance(method, Method):
        raise TypeError(f"method must be a Method (overunlearn.create('minnorm_og', ...)) or a registered name, got "
                        f"{type(method).__name__}")
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a Budget, e.g. Budget(epochs={budget!r}) or Budget(steps=...), got "
                        f"{type(budget).__name__}")
    dev = resolve_device(device)
    model = copy.deepcopy(problem.model).to(dev)
    model.train()
    steps_per_epoch = forget_batches_per_epoch(problem.forget, problem.batch_size)
    planned = budget.epochs
    if planned is None and budget.steps is not None:
        planned = math.ceil(budget.steps / steps_per_epoch)
    max_steps = math.inf
    if budget.epochs is not None:
        max_steps = budget.epochs * steps_per_epoch
    if budget.steps is not None:
        max_steps = min(max_steps, budget.steps)

    bounds = check_data(problem, model, dev)
    _check_optimizer(method.config, [p for p in model.parameters() if p.requires_grad])
    _package_warm_up()
    ctx = UnlearningContext(problem, model, dev, seed, planned, steps_per_epoch)
    ctx.label_bounds = bounds
    if method.needs_planned_epochs:
        ctx.require_planned_epochs(method.name)
    record = UnlearnRecord(method=method.name, config=method.config.to_dict(), steps_per_epoch=steps_per_epoch,
                           device=str(dev))
    data_gen = torch.Generator().manual_seed(seed)
    retain_iter = RetainCycle(problem.retain, problem.batch_size, data_gen, problem.collate)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=None if math.isinf(max_steps) else int(max_steps), desc=method.name, unit="step",
                   leave=False)

    # dropout and anything else drawing from torch's global generator: a function of the seed, and the
    # caller's generator state is restored afterwards
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.default_generator.manual_seed(seed)
        if dev.type == "cuda":
            with torch.cuda.device(dev):
                torch.cuda.manual_seed(seed)
        synchronize(dev)
        t0 = time.perf_counter()
        try:
            if method.reinitialise:
                reinitialise_trainable(problem, model, seed)
            method.setup(ctx)
            ctx.optimizer = _make_optimizer(method.config, ctx.trainable())
            synchronize(dev)
            record.setup_seconds = time.perf_counter() - t0
            step, epoch, stopped = 0, 0, ""
            try:
                while not stopped:
                    if step >= max_steps:
                        by_epochs = budget.epochs is not None and step >= budget.epochs * steps_per_epoch
                        stopped = "epochs" if by_epochs else "steps"
                        break
                    losses: list[float] = []
                    for j, forget_b in enumerate(forget_epoch(problem.forget, problem.batch_size, data_gen, problem.collate)):
                        if step >= max_steps:
                            break
                        if budget.seconds is not None:
                            synchronize(dev)
                            if time.perf_counter() - t0 >= budget.seconds:
                                stopped = "seconds"
                                break
                        info = StepInfo(step, epoch, j, steps_per_epoch, planned)
                        losses.append(_one_step(ctx, method, info, next(retain_iter).to(dev), forget_b, forget_bn_stats))
                        step += 1
                        if bar is not None:
                            bar.update(1)
                        if on_step is not None:
                            on_step(info, losses[-1])
                    if losses:
                        record.epoch_losses.append(sum(losses) / len(losses))
                    if len(losses) == steps_per_epoch:
                        epoch += 1
                        record.epochs_completed = epoch
            except DataError as exc:  # (a batch drawn or computed mid-run: the step it belongs to)
                if getattr(exc, "step", None) is None:
                    exc.step = step  # type: ignore[attr-defined]
                raise
            synchronize(dev)
            record.seconds = time.perf_counter() - t0
            record.steps = step
            record.stopped_by = stopped
            if stopped == "seconds" and step == 0:
                warnings.warn(f"{method.name}: the {budget.seconds:g} s budget ran out before the first step (the "
                              f"method's set-up took {record.setup_seconds:.3g} s), so no step ran: the result is the "
                              "model as set up (for most methods the original)", UserWarning, stacklevel=2)
        finally:
            method.teardown(ctx)
            if bar is not None:
                bar.close()
    return UnlearnResult(model=model, record=record)


__all__ = [
    "Budget",
    "StepInfo",
    "UnlearnRecord",
    "UnlearnResult",
    "UnlearningContext",
    "check_data",
    "reinitialise_trainable",
    "resolve_device",
    "synchronize",
    "unlearn",
    "warm_up",
]
