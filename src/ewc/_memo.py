r"""Verified routes remembered across estimates of the same model.

The probe (:mod:`ewc._probe`) checks each route against autograd on a 2-sample sub-batch
before any closed form is trusted: a fixed cost of about one forward and two backward passes of
two samples, paid on the first batch of each input signature. Within one estimate it is paid
once; without memory it would be paid again by every call of :func:`ewc.fisher_diagonal` on the
same model (one per task in continual learning, many in a benchmark). This module keeps, per
model (weakly: nothing here keeps a model alive) and per **fingerprint**, the facts a router
learned and the routes it verified, as plain data (names, flags, index sets; no modules), so
the next estimate starts from them and skips the probe for the signatures already verified.

What the checks depend on, and so what the fingerprint holds (any change gives a new one, and
the next estimate probes again):

* the module tree: every module's name, class (and the class's ``forward``), plain attributes
  (``bool``/``int``/``float``/``str``/``None`` and tuples of them, such as ``batch_first``,
  ``training``, ``kernel_size``), callables stored on the instance (an overridden ``forward``,
  an activation function) and other attribute objects by identity;
* hooks: every module's forward, forward-pre and backward hooks (handle ids, which are never
  reused, and the hook functions) and PyTorch's global module hooks;
* parameters: name, identity (so tying or untying weights counts), ``requires_grad``, dtype,
  device and shape; buffers and tensor attributes by name, dtype, device and shape;
* the estimate: the selected parameters and ``output_fn`` (by code and captured values, so an
  inline ``lambda out: out.logits`` written at each call matches). Not the kind or the
  likelihood: the checks back-propagate random cotangents of the outputs, which stand for the
  factor of any kind and likelihood (the same route serves the Fisher, KFAC and MAS);
* per batch, as before: the input structure, each leaf's dtype, rank and batched flag, and
  the values of plain non-tensor inputs.

What it cannot see: values (weights, buffer contents, data), mutable state outside the module
attributes listed (a global flag a ``forward`` reads, the contents of a list or a config object
held by a module). The closed forms are identities in the values, so values do not matter to
them; a model whose *structure* depends on values or hidden state (whether samples mix, which
layers run) may need the checks again: :func:`clear_route_cache` forgets what was learned.
Every batch still gets the cheap per-batch checks (each fast layer called once, on rows of the
batch, its output not changed in place).
"""

from __future__ import annotations

import functools
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

from ._batches import PLAIN as _PLAIN

__all__ = ["Facts", "RouteFacts", "fingerprint", "recall", "remember", "clear_route_cache"]

_PER_MODEL = 8  # fingerprints remembered per model (the most recent)
_SKIP = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})
_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


@dataclass(frozen=True)
class RouteFacts:
    """A verified route as plain data: rebuilt with :meth:`ewc._probe.Router.candidate`'s parts.

    Attributes:
        excluded: Layers sent to the generic path, and why (at verification).
        clone: Whether layer outputs are copied downstream.
        expand: The lookups expanded to the batch, and how.
        generic: ``"vmap"`` or ``"loop"``.
        how: How the route was verified.
    """

    excluded: Mapping[str, str]
    clone: bool
    expand: Mapping[str, str]
    generic: str
    how: str


@dataclass
class Facts:
    """What a :class:`~ewc._probe.Router` learned about a model, as plain data."""

    excluded: dict[str, str] = field(default_factory=dict)
    clone: bool = False
    prepend: set[str] = field(default_factory=set)
    no_expand: set[str] = field(default_factory=set)
    unexpanded: dict[str, str] = field(default_factory=dict)
    shared: dict[str, set[int]] = field(default_factory=dict)
    generic: str = "vmap"
    verified: dict[tuple[Any, ...], RouteFacts] = field(default_factory=dict)

    def copy(self) -> Facts:
        """Return a copy whose containers can be changed without touching this one."""
        return Facts(
            dict(self.excluded),
            self.clone,
            set(self.prepend),
            set(self.no_expand),
            dict(self.unexpanded),
            {k: set(v) for k, v in self.shared.items()},
            self.generic,
            dict(self.verified),
        )


_CACHE: weakref.WeakKeyDictionary[nn.Module, OrderedDict[tuple[Any, ...], Facts]] = (
    weakref.WeakKeyDictionary()
)


def plain(value: Any) -> Any:
    """``value`` itself if it is plain data (or a tuple of it), else its type and identity."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value):
        return value
    return ("id", type(value).__name__, id(value))


def _callable(fn: Callable[..., Any] | None) -> Any:
    """Return a key for a callable: code and captured values of a function, else identity."""
    if fn is None or isinstance(fn, str):
        return fn
    if isinstance(fn, functools.partial):
        return ("partial", _callable(fn.func), tuple(plain(a) for a in fn.args))
    if isinstance(fn, types.MethodType):
        return ("method", _callable(fn.__func__), id(fn.__self__))
    if isinstance(fn, types.FunctionType):
        cells = []
        for c in fn.__closure__ or ():
            try:
                cells.append(plain(c.cell_contents))
            except ValueError:  # an empty cell
                cells.append(None)
        defaults = tuple(plain(d) for d in fn.__defaults__ or ())
        return ("fn", id(fn.__code__), tuple(cells), defaults)
    state = getattr(fn, "__dict__", None)
    if state is not None and all(isinstance(v, _PLAIN) for v in state.values()):
        return ("obj", id(type(fn)), tuple(sorted(state.items())))  # e.g. a Likelihood
    return ("obj", type(fn).__name__, id(fn))


def _tensor(t: Tensor | None) -> Any:
    return None if t is None else (t.dtype, t.device, tuple(t.shape))


def _module(name: str, m: nn.Module) -> tuple[Any, ...]:
    attrs = []
    for k, v in m.__dict__.items():
        if k in _SKIP or k in _HOOKS or k.startswith("_state_dict") or k.startswith("_load"):
            continue
        if isinstance(v, Tensor):
            attrs.append((k, _tensor(v)))
        elif callable(v) and not isinstance(v, nn.Module):
            attrs.append((k, _callable(v)))
        else:
            attrs.append((k, plain(v)))
    hooks = tuple(
        (h, tuple((k, _callable(f) if callable(f) else plain(f)) for k, f in d.items()))
        for h in _HOOKS
        if (d := m.__dict__.get(h))
    )
    params = tuple(
        (k, None if p is None else (id(p), p.requires_grad, _tensor(p)))
        for k, p in m._parameters.items()  # noqa: SLF001 - what the module owns, unrecursed
    )
    buffers = tuple((k, _tensor(b)) for k, b in m._buffers.items())  # noqa: SLF001
    cls = type(m)
    return (name, id(cls), id(getattr(cls, "forward", None)), tuple(attrs), hooks, params, buffers)


def fingerprint(
    model: nn.Module, trainable: Mapping[str, Tensor], output_fn: Any
) -> tuple[Any, ...]:
    """Return the key of everything the probe's verdicts depend on (see the module doc)."""
    modules = tuple(_module(n, m) for n, m in model.named_modules(remove_duplicate=False))
    global_hooks = tuple(
        tuple((k, _callable(f)) for k, f in getattr(_torch_module, h, {}).items())
        for h in _GLOBAL_HOOKS
    )
    selected = tuple((n, id(p)) for n, p in trainable.items())
    return (
        modules,
        global_hooks,
        selected,
        _callable(output_fn),
    )


def recall(model: nn.Module, key: tuple[Any, ...]) -> Facts | None:
    """Return a copy of the facts remembered for ``model`` under ``key``, or ``None``."""
    try:
        entries = _CACHE.get(model)
    except TypeError:  # a model that cannot be weakly referenced: nothing remembered
        return None
    if entries is None or key not in entries:
        return None
    entries.move_to_end(key)
    return entries[key].copy()


def remember(model: nn.Module, key: tuple[Any, ...], facts: Facts) -> None:
    """Remember ``facts`` (a copy) for ``model`` under ``key``, keeping the latest few keys."""
    try:
        entries = _CACHE.setdefault(model, OrderedDict())
    except TypeError:
        return
    entries[key] = facts.copy()
    entries.move_to_end(key)
    while len(entries) > _PER_MODEL:
        entries.popitem(last=False)


def clear_route_cache(model: nn.Module | None = None) -> None:
    """Forget the verified routes of ``model`` (of every model if ``None``).

    The next estimate probes again (see :mod:`ewc._memo` for what is remembered and when that
    is needed: a model whose structure depends on state the fingerprint does not see).
    """
    if model is None:
        _CACHE.clear()
    else:
        _CACHE.pop(model, None)
