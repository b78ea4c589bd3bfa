"""Structured model inputs and outputs: tensors, tuples and dicts of tensors.

A batch's inputs may be one tensor, a tuple (or list) of tensors, or a dict of tensors, nested in any
way that :mod:`torch.utils._pytree` handles; every tensor leaf has the examples along its first
dimension. The call convention is fixed and documented:

* a dict (or any mapping, e.g. Hugging Face's ``BatchEncoding``) -> ``model(**inputs)``;
* a tuple or list -> ``model(*inputs)``;
* a tensor -> ``model(inputs)``.

Outputs may be a tensor, a tuple of tensors (one per head), a dict, or a Hugging Face ``ModelOutput``
(an ordered dict); :func:`select_output` picks what a task reads (``"logits"`` by default, another
key, or a callable).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from overunlearn.errors import DataError

#: a tensor, or a tuple / list / dict of them (nested)
Inputs = Any
#: what a task reads from a model's output: a key, a callable, or ``None`` (tensor / tuple outputs)
OutputSelector = str | int | Callable[[Any], Any] | None


def normalise(inputs: Inputs) -> Inputs:
    """Plain containers: mappings become dicts, lists become tuples (so that pytree utilities and
    ``vmap`` see them), recursively; tensors and other leaves are returned as they are."""
    if isinstance(inputs, Tensor):
        return inputs
    if isinstance(inputs, Mapping):
        return {k: normalise(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)) and not hasattr(inputs, "_fields"):
        return tuple(normalise(v) for v in inputs)
    return inputs


def tensor_leaves(inputs: Inputs) -> list[Tensor]:
    """Every tensor in ``inputs``, in pytree order."""
    return [x for x in pytree.tree_leaves(inputs) if isinstance(x, Tensor)]


def map_tensors(fn: Callable[[Tensor], Any], inputs: Inputs) -> Inputs:
    """``inputs`` with ``fn`` applied to every tensor leaf (other leaves unchanged)."""
    return pytree.tree_map(lambda x: fn(x) if isinstance(x, Tensor) else x, inputs)


def batch_len(inputs: Inputs) -> int:
    """The number of examples: the common first dimension of every tensor leaf."""
    leaves = tensor_leaves(inputs)
    if not leaves:
        raise DataError(f"inputs hold no tensor ({describe(inputs)}); give a tensor, or a tuple or dict of tensors")
    sizes = {tuple(x.shape[:1]) for x in leaves}
    if any(x.dim() == 0 for x in leaves):
        raise DataError(f"every input tensor needs a leading example dimension; got {describe(inputs)}")
    if len(sizes) != 1:
        raise DataError(f"input tensors disagree on the number of examples (first dimension): {describe(inputs)}")
    return int(leaves[0].shape[0])


def index(inputs: Inputs, idx: Tensor | slice) -> Inputs:
    """The examples ``idx`` of every tensor leaf (a tensor of indices is moved to each leaf's device)."""
    if isinstance(idx, Tensor):
        return map_tensors(lambda x: x[idx.to(x.device)], inputs)
    return map_tensors(lambda x: x[idx], inputs)


def to_device(inputs: Inputs, device: torch.device | str, non_blocking: bool = False) -> Inputs:
    return map_tensors(lambda x: x.to(device, non_blocking=non_blocking), inputs)


def clone(inputs: Inputs) -> Inputs:
    """A copy of every tensor leaf (a model that works in place on its inputs must not change the caller's)."""
    return map_tensors(lambda x: x.clone(), inputs)


def detach(inputs: Inputs) -> Inputs:
    return map_tensors(lambda x: x.detach(), inputs)


def cat(parts: list[Inputs]) -> Inputs:
    """Concatenate structured inputs of the same structure along the example dimension."""
    flat = [pytree.tree_flatten(p) for p in parts]
    spec = flat[0][1]
    if any(s != spec for _, s in flat[1:]):
        raise DataError("cannot concatenate inputs of different structures")
    columns = list(zip(*[leaves for leaves, _ in flat]))
    return pytree.tree_unflatten([torch.cat(list(c)) if isinstance(c[0], Tensor) else c[0] for c in columns], spec)


def first_floating(inputs: Inputs) -> Tensor | None:
    """The input leaf a gradient can flow through, when there is exactly one floating tensor (else ``None``)."""
    floats = [x for x in tensor_leaves(inputs) if x.is_floating_point()]
    return floats[0] if len(floats) == 1 else None


def non_finite_leaf(inputs: Inputs) -> str | None:
    """The path of the first floating tensor leaf holding NaN or infinity (``None`` if all are finite)."""
    leaves, _ = pytree.tree_flatten_with_path(inputs)
    for path, x in leaves:
        if isinstance(x, Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            return pytree.keystr(path) or "inputs"
    return None


def model_device(model: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """Where ``model`` lives: its first parameter's (else buffer's) device; ``default`` for a model with neither."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device(default)


def call_model(model: nn.Module | Callable[..., Any], inputs: Inputs) -> Any:
    """Call ``model`` on structured inputs: ``model(**d)``, ``model(*t)`` or ``model(x)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def call_args(inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of the call convention, for ``torch.func.functional_call``."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def describe(inputs: Inputs) -> str:
    """A short human description: ``"tensor (4, 3) float32"``, ``"dict {input_ids: (4, 16) int64, ...}"``."""
    if isinstance(inputs, Tensor):
        return f"tensor {tuple(inputs.shape)} {str(inputs.dtype).replace('torch.', '')}"
    if isinstance(inputs, Mapping):
        return "dict {" + ", ".join(f"{k}: {describe(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return f"{type(inputs).__name__} (" + ", ".join(describe(v) for v in inputs) + ")"
    return type(inputs).__name__


def select_output(outputs: Any, selector: OutputSelector = None) -> Any:
    """What a task reads from a model's raw output.

    ``selector`` is a callable (applied to the raw output), a key, a position in a tuple output (a
    ``ModelOutput``'s ``to_tuple()``, as ``return_dict=False`` returns it), or ``None``. With ``None``, a
    tensor or a tuple of tensors is returned as it is, and a dict or Hugging Face ``ModelOutput``
    gives its ``"logits"`` entry.
    """
    if callable(selector):
        return selector(outputs)
    if isinstance(selector, bool):
        raise DataError(f"output={selector!r}: name an entry (a string), a position (an integer) or pass a callable")
    if isinstance(selector, numbers.Integral):
        selector = int(selector)
        # (a dict's positions skip None entries, as a ModelOutput's to_tuple() does)
        seq = outputs.to_tuple() if hasattr(outputs, "to_tuple") else \
            tuple(v for v in outputs.values() if v is not None) if isinstance(outputs, Mapping) else outputs
        if not isinstance(seq, (tuple, list)):
            raise DataError(f"the task reads output position {selector}, but the model returned a "
                            f"{type(outputs).__name__}, not a tuple")
        if not -len(seq) <= selector < len(seq):
            raise DataError(f"the task reads output position {selector}, but the model returned {len(seq)} outputs")
        return seq[selector]
    if isinstance(outputs, Mapping):
        key = selector or "logits"
        if key not in outputs or outputs[key] is None:
            keys = ", ".join(repr(k) for k, v in outputs.items() if v is not None)
            raise DataError(
                f"the model returned a {type(outputs).__name__} without {key!r} (it has {keys}); name the entry "
                "the task should read, e.g. ClassificationTask(output='<key>'), or pass a callable")
        return outputs[key]
    if selector is not None:
        if not isinstance(selector, str):
            raise DataError(f"output={selector!r}: name an entry (a string), a position (an integer) or pass a "
                            "callable")
        if hasattr(outputs, selector):
            return getattr(outputs, selector)
        raise DataError(f"the task reads output {selector!r}, but the model returned a {type(outputs).__name__}")
    if isinstance(outputs, list):
        return tuple(outputs)
    return outputs
