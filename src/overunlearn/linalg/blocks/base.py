"""The block interface and its registry.

A *block* is one call of one layer during the hooked forward pass of
:func:`overunlearn.linalg.projection.project_model_onto_span`. It is built by a forward hook from
the call's inputs and output, is then given the gradients of the scores with respect to that output
(one per score head), and from those gives, for each of the layer's trainable parameters:

* its rows of the Jacobian ``J`` (``rows``), for a subset of the parameter's first dimension, or,
  where that is cheaper, its Gram contribution and ``J v`` directly in factored ("ghost") form
  (``ghost``), without forming rows;
* its part of ``J^T alpha`` (``back``).

Rows are ordered head-major: row ``r = h n + i`` is sample ``i``'s score ``h``. Blocks are
registered by module type with :func:`register_block`; a module whose type (or a base class of it)
has a block is hooked, provided ``Block.accepts(module)``. Whatever the blocks compute is checked
against autograd once per model and input shape (``projection._verify``: their ``J^T c``; then their Gram
and ``J v`` against that ``J^T c``), so a wrong block costs time, not results. A block that raises an
exception (``Decline`` aside) or returns a tensor of the wrong shape is treated the same way, with a
``projection.BlockFailedWarning`` naming it.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class Decline(Exception):
    """This call of the layer cannot be handled by its block: its parameters take the fallback."""


@dataclass(frozen=True)
class Budget:
    """What a block needs to choose between the ghost form and formed rows.

    ``positional(n, heads, out, patch, t)``: whether a linear map applied at ``t`` positions (``out``
    outputs, ``patch`` inputs) is cheaper in ghost form for ``n`` samples and ``heads`` scores each;
    ``max_ghost_entries``: the most entries of one ``(k t) x (k t)`` float64 matrix a ghost form may hold.
    """

    positional: Callable[[int, int, int, int, int], bool]
    max_ghost_entries: int


class Block:
    """One call of a registered layer; subclasses implement the capture and the algebra.

    Subclasses set, in ``__init__``, ``self.output`` (the output tensor whose gradient is needed) and
    ``self.batch`` (the number of rows of the call's input, which must equal the number of samples),
    and keep what they need of the inputs (detached). ``saved`` lists the kept input tensors, so
    that the engine can check no in-place operation changed them after the call.
    """

    #: the parameter attributes this block computes, in the module's ``parameters()`` order; a dotted
    #: name (``"out_proj.weight"``) is a parameter of a submodule that the layer uses without calling it
    #: as a module: the engine attributes it to this block and does not hook that submodule
    param_names: ClassVar[tuple[str, ...]] = ("weight", "bias")

    #: the layer acts alike on every position of its leading dimensions (linear layers, norms over the
    #: trailing dimensions, embeddings): a call on a sequence-first input ``(L, n, ...)`` is then given
    #: to the block as batch-major views ``(n, L, ...)`` of its input and output by the engine
    positionwise: ClassVar[bool] = False

    #: what the layer call returns to the model instead of its own output (``None``: its own output),
    #: set in ``__init__`` where ``self.output`` is not the call's output itself (e.g. a batch-major
    #: copy of a sequence-major output, from which the returned value is then computed)
    module_output: Any = None

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        self.module = module
        self.output: Tensor | None = None
        self.batch = -1
        self.saved: list[Tensor] = []
        self.n = self.heads = self.k = 0
        self._idx: Tensor | None = None
        self.deltas: Tensor | None = None

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        """Whether this block describes ``module`` at all (e.g. its class's own ``forward``)."""
        return True

    @classmethod
    def claims(cls, module: nn.Module) -> tuple[str, ...]:
        """The parameter names this block computes for ``module`` (default: :attr:`param_names`; a block whose
        names depend on the module -- peft's adapter names -- overrides it)."""
        return cls.param_names

    def parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the trainable parameters this block computes."""
        out = []
        for name in self.claims(self.module):
            p = param_of(self.module, name)
            if isinstance(p, nn.Parameter) and p.requires_grad:
                out.append((name, p))
        return out

    def bind(self, deltas: Tensor, n: int, heads: int) -> None:
        """Attach the output gradients ``(heads * n, *output.shape[1:])``, head-major."""
        self.deltas, self.n, self.heads, self.k = deltas, n, heads, n * heads
        self._idx = None
        self._device = deltas.device

    @property
    def idx(self) -> Tensor:
        """Each Jacobian row's sample (``r % n``), made on first use (only several heads need it)."""
        if self._idx is None:
            self._idx = torch.arange(self.k, device=self._device) % self.n
        return self._idx

    @idx.setter
    def idx(self, value: Tensor) -> None:
        self._idx = value

    def per_row(self, x: Tensor) -> Tensor:
        """``x`` (one entry per sample) repeated for every head: one entry per Jacobian row."""
        return x if self.heads == 1 else x[self.idx]

    # ---- the algebra ----------------------------------------------------------------------------

    def ghost_cheaper(self, name: str, budget: Budget) -> bool:
        """Whether to take the ghost form for parameter ``name`` (default: no ghost form)."""
        return False

    def ghost(self, name: str, v: Tensor) -> tuple[Tensor, Tensor]:
        """``(J_p J_p^T, J_p v)`` in float64 for parameter ``name`` and its part ``v`` of the vector."""
        raise NotImplementedError

    def units(self, name: str) -> int | None:
        """Into how many equal slices :meth:`rows` divides parameter ``name`` (``None``: its first dimension;
        the fused expert weights ``(E, o, p)`` of a mixture of experts give ``E o``, so that the engine's
        slices of rows stay a few MiB however large one expert is). :meth:`rows` and :meth:`support`
        index these slices."""
        return None

    def support(self, name: str) -> Tensor | None:
        """Indices of the slices (:meth:`units`; by default along the parameter's first dimension) outside
        which its rows are zero (``None``: any)."""
        return None

    def rows(self, name: str, index: Tensor | slice) -> Tensor:
        """The Jacobian rows ``(k, len(index) * inner)`` of the parameter's first-dimension slices ``index``
        (a sorted tensor of indices, or a ``slice`` with step 1; slices of :meth:`units` where it is set).

        A block may also take a keyword ``scratch``: a flat buffer of the parameter's dtype that the
        engine reuses from call to call (it does not keep the rows), in which the block may form them
        when it is large enough (saving a fresh allocation, i.e. page faults on a CPU)."""
        raise NotImplementedError

    def back(self, name: str, alpha: Tensor) -> Tensor:
        """``J_p^T alpha`` in the parameter's shape and dtype (``alpha``: ``(k,)`` float64).

        A block may also take a keyword ``exact``: when ``alpha``'s terms cancel (an ill-conditioned Gram)
        the engine calls ``back(name, alpha, exact=True)`` and the block sums in float64. A block without
        it gets its back-projection from its :meth:`rows`, formed again and summed in float64."""
        raise NotImplementedError

    def done(self) -> None:
        """The engine has finished a step with this block (one parameter's Gram, or its back-projection):
        drop what can be recomputed (e.g. unfolded convolution patches), so that only one block's such
        tensors are held at a time. It may be called again for the same block."""

    def back_flops(self, name: str) -> int:
        """About how many multiply-adds :meth:`back` costs (the engine keeps formed rows instead, within
        a memory budget, where that is much more)."""
        return 0


class RowsBlock(Block):
    """A block whose rows are small (per-channel affine parameters): it forms them all at once.

    Subclasses implement :meth:`all_rows`, returning ``(k, numel)`` rows of one parameter.
    """

    def all_rows(self, name: str) -> Tensor:
        raise NotImplementedError

    def bind(self, deltas: Tensor, n: int, heads: int) -> None:
        """Form the rows at once, then drop the output gradients and the captured inputs (``self.x``):
        the rows are all this block needs afterwards, and they are small."""
        super().bind(deltas, n, heads)
        for name, _ in self.parameters():
            self._cached(name)
        self.deltas = None
        self.__dict__.pop("x", None)

    def _cached(self, name: str) -> Tensor:
        cache = self.__dict__.setdefault("_rows_cache", {})
        if name not in cache:
            cache[name] = self.all_rows(name)
        return cache[name]

    def rows(self, name: str, index: Tensor | slice) -> Tensor:
        p = self.module._parameters[name]
        r = self._cached(name)
        return r.view(self.k, p.shape[0] if p.dim() else 1, -1)[:, index].reshape(self.k, -1)

    def back(self, name: str, alpha: Tensor, exact: bool = False) -> Tensor:
        p = self.module._parameters[name]  # (always summed in float64: the rows are small)
        return (self._cached(name).double().T @ alpha).reshape(p.shape).to(p.dtype)


_REGISTRY: dict[type, type[Block]] = {}
_LAZY: dict[str, type[Block]] = {}
_PATTERNS: dict[str, type[Block]] = {}
#: ``registered_block``'s answer per module type (cleared by every registration)
_RESOLVED: dict[type, type[Block] | None] = {}


def register_block(*types: type | str) -> Callable[[type[Block]], type[Block]]:
    """Class decorator: use this block for modules of these types (and their subclasses that the
    block ``accepts``). A type may be given as a dotted name (``"transformers.pytorch_utils.Conv1D"``):
    it is looked up only once its module has been imported by someone else, so registering a block
    for an optional library never imports it. A dotted name with ``*`` is a pattern matched against
    ``module.qualname`` of every class in a module type's ancestry (``"transformers.models.*RMSNorm"``:
    the RMSNorm of every Hugging Face model). A later registration for the same type or pattern wins;
    for one class, a registered type comes before a pattern, and the nearest class in the ancestry wins.
    Anything else as a type, or a decorated class that is not a :class:`Block` subclass, raises ``TypeError``."""
    for t in types:
        _check_key(t)

    def deco(cls: type[Block]) -> type[Block]:
        if not (isinstance(cls, type) and issubclass(cls, Block)):
            named = ", ".join(t if isinstance(t, str) else t.__name__ for t in types)
            swapped = isinstance(cls, type) and issubclass(cls, nn.Module)
            raise TypeError(f"register_block({named})(...) takes a Block subclass, got {_describe(cls)}"
                            + (", a layer (register_block(MyLayer)(MyBlock) registers MyBlock for MyLayer)"
                               if swapped else ""))
        for t in types:
            if isinstance(t, str):
                store = _PATTERNS if "*" in t else _LAZY
                store.pop(t, None)  # (re-inserted last: a later registration wins)
                store[t] = cls
            else:
                _resolve_lazy()  # (an earlier registration by a name of this type must not replace this one later)
                _REGISTRY[t] = cls
        _RESOLVED.clear()
        return cls

    return deco


def _check_key(t: object) -> None:
    """Raise ``TypeError`` unless ``t`` is a module class or a dotted name (``"pkg.module.Class"``) or pattern."""
    if isinstance(t, str):
        if "*" in t or all(t.rpartition(".")[::2]):
            return
        raise TypeError(f"register_block({t!r}): a name must be dotted, 'package.module.Class' (or a pattern with *)")
    if isinstance(t, type) and issubclass(t, Block):
        raise TypeError(f"register_block got the Block class {t.__name__} as a layer type (arguments swapped? "
                        f"register_block(MyLayer)({t.__name__}))")
    if not (isinstance(t, type) and issubclass(t, nn.Module)):
        raise TypeError(f"register_block takes module classes (nn.Module subclasses), dotted names or patterns, "
                        f"got {_describe(t)}")


def _describe(x: object) -> str:
    """``x`` for an error message: a class by its name, anything else as an instance of its class."""
    if isinstance(x, type):
        return f"the class {x.__qualname__}"
    return f"an instance of {type(x).__qualname__}" + (" (pass the class itself)" if isinstance(x, (nn.Module, Block))
                                                        else "")


def _resolve_lazy() -> None:
    for name, cls in list(_LAZY.items()):
        mod, _, attr = name.rpartition(".")
        t = getattr(sys.modules.get(mod), attr, None)
        if isinstance(t, type):
            _REGISTRY[t] = cls
            del _LAZY[name]
            _RESOLVED.clear()


def registered_block(module: nn.Module) -> type[Block] | None:
    """The block registered for ``module``'s type or its nearest base class, whether or not it accepts
    ``module``."""
    _resolve_lazy()
    kind = type(module)
    if kind not in _RESOLVED:
        _RESOLVED[kind] = _lookup(kind)
    return _RESOLVED[kind]


def _lookup(kind: type) -> type[Block] | None:
    for t in kind.__mro__:
        cls = _REGISTRY.get(t)
        if cls is not None:
            return cls
        name = f"{t.__module__}.{t.__qualname__}"
        for pattern, cls in reversed(_PATTERNS.items()):
            if fnmatch.fnmatchcase(name, pattern):
                return cls
    return None


def block_for(module: nn.Module) -> type[Block] | None:
    """The block registered for ``module``'s type or its nearest base class, if it accepts ``module``."""
    cls = registered_block(module)
    return cls if cls is not None and cls.accepts(module) else None


def stock(module: nn.Module, base: type) -> bool:
    """``module`` computes what ``base`` says: ``base``'s own ``forward``, a plain ``weight`` parameter
    (not parametrized, pruned or weight-normed; or none) and no hooks of its own."""
    from torch.nn.utils import parametrize

    w = module._parameters.get("weight", None)
    return (type(module).forward is base.forward and not parametrize.is_parametrized(module)
            and (w is None or isinstance(w, nn.Parameter)) and "weight" not in module.__dict__
            and not module._forward_hooks and not module._forward_pre_hooks)


def param_of(module: nn.Module, name: str) -> Tensor | None:
    """``module``'s own parameter ``name``, or its submodule's for a dotted name (``"out_proj.weight"``);
    ``None`` if there is none."""
    *path, last = name.split(".")
    for part in path:
        module = module._modules.get(part)  # type: ignore[assignment]
        if module is None:
            return None
    return module._parameters.get(last)


def count(index: Tensor | slice, size: int) -> int:
    """How many indices ``index`` (a tensor, or a slice of a dimension of length ``size``) selects."""
    return index.numel() if isinstance(index, Tensor) else len(range(*index.indices(size)))


def first_input(args: tuple, kwargs: dict[str, Any], *names: str) -> Tensor:
    """The call's first positional input, or the first of the keyword inputs ``names``."""
    x = args[0] if args else next((kwargs[k] for k in names if k in kwargs), None)
    if not isinstance(x, Tensor):
        raise Decline
    return x
