"""Batches: splitting ``(inputs, targets)``, calling the model, and which inputs are per sample.

A model input is a tensor, a tuple (``model(*inputs)``) or a dict (``model(**inputs)``) of
tensors and other values. A tensor leaf is **batched** when its leading dimension indexes the
samples; any other leaf (a shared ``(T, T)`` mask, a task id, a ``(1, T)`` position table) is
**shared** by every sample. :class:`Layout` records that decision per leaf: it slices sub-batches
and single samples, and gives ``torch.func.vmap`` its ``in_dims``, so shared leaves are broadcast
and never split row by row.

A leaf whose leading dimension differs from the batch size is shared for certain; one whose
leading dimension equals it is batched unless the estimator's probe shows otherwise (the leading
dimension of a shared mask can equal the batch size by coincidence).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map, tree_unflatten

__all__ = ["split_batch", "batch_size", "to_device", "call", "Layout"]


def split_batch(batch: Any, needs_targets: bool) -> tuple[Any, Tensor | None]:
    """Return ``(inputs, targets)`` of a batch (``targets`` is ``None`` for a bare input batch)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if needs_targets:
        raise ValueError(
            "kind='empirical' needs (inputs, targets) batches; got a batch of type "
            f"{type(batch).__name__}"
            + (f" with {len(batch)} elements" if isinstance(batch, (tuple, list)) else "")
        )
    return batch, None


def batch_size(inputs: Any) -> int:
    """Return the number of samples: the leading dimension of the first tensor of ``inputs``."""
    if isinstance(inputs, Tensor) and inputs.dim() > 0:
        return int(inputs.shape[0])
    leaves = [t for t in tree_flatten(inputs)[0] if isinstance(t, Tensor)]
    if not leaves or leaves[0].dim() == 0:
        raise ValueError("inputs must contain a tensor with a leading batch dimension")
    return int(leaves[0].shape[0])


def to_device(tree: Any, device: torch.device) -> Any:
    """Move every tensor of ``tree`` to ``device``."""
    if isinstance(tree, Tensor):
        return tree.to(device)
    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, tree)


def take(tree: Any, n: int) -> Any:
    """Return the first ``n`` rows of every tensor with a leading dimension (for targets)."""
    return tree_map(lambda t: t[:n] if isinstance(t, Tensor) and t.dim() > 0 else t, tree)


def call(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on ``inputs`` (a tensor, a tuple of positional or a dict of keyword args)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _describe(path: tuple[Any, ...]) -> str:
    return "inputs" + "".join(f"[{k!r}]" for k in path) if path else "inputs"


def _paths(spec: TreeSpec, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Return the key path of every leaf of ``spec``, in flattening order."""
    if spec.is_leaf():
        return [prefix]
    kids = spec.children() if hasattr(spec, "children") else spec.children_specs
    keys = spec.context if isinstance(spec.context, list) else range(len(kids))
    out: list[tuple[Any, ...]] = []
    for key, child in zip(keys, kids, strict=True):
        out += _paths(child, (*prefix, key))
    return out


PLAIN = (bool, int, float, str, type(None))  # values that are data, compared by value


def _plain(value: Any) -> Any:
    """Return a non-tensor input's value if it is plain data (it may change the model's path)."""
    return value if isinstance(value, PLAIN) else None


@dataclass(frozen=True)
class Layout:
    """Which leaves of a model input are batched (``True``), shared (``False``) or not tensors.

    Attributes:
        spec: The pytree structure of the inputs.
        batched: One entry per leaf: ``True`` (split along dimension 0), ``False`` (a shared
            tensor) or ``None`` (not a tensor: passed as it is).
        names: A readable name per leaf (``inputs['mask']``, ``inputs[1]``).
    """

    spec: TreeSpec
    batched: tuple[bool | None, ...]
    names: tuple[str, ...]

    @staticmethod
    def of(inputs: Any, size: int, shared: Iterable[int] = ()) -> Layout:
        """Guess from shapes: a tensor leaf is batched iff its leading dimension is ``size``.

        ``shared`` lists leaf indices known to be shared whatever their shape.
        """
        leaves, spec = tree_flatten(inputs)
        known = set(shared)
        flags = tuple(
            (
                None
                if not isinstance(t, Tensor)
                else (i not in known and t.dim() > 0 and t.shape[0] == size)
            )
            for i, t in enumerate(leaves)
        )
        return Layout(spec, flags, tuple(_describe(p) for p in _paths(spec)))

    def with_shared(self, indices: Iterable[int]) -> Layout:
        """Return a copy where the leaves ``indices`` are shared."""
        drop = set(indices)
        flags = tuple(False if i in drop and f else f for i, f in enumerate(self.batched))
        return Layout(self.spec, flags, self.names)

    @property
    def ambiguous(self) -> list[int]:
        """Leaves taken as batched only because their leading dimension equals the batch size."""
        return [i for i, f in enumerate(self.batched) if f]

    def signature(self, inputs: Any) -> tuple[Any, ...]:
        """Return a hashable key: the structure, and each leaf's dtype, rank and batched flag.

        Non-tensor leaves count by type and, when plain (``bool``, ``int``, ``float``, ``str``,
        ``None``), by value.
        """
        leaves = tree_flatten(inputs)[0]
        return (
            str(self.spec),
            tuple(
                (t.dtype, t.dim(), f) if isinstance(t, Tensor) else (type(t).__name__, _plain(t))
                for t, f in zip(leaves, self.batched, strict=True)
            ),
        )

    def _map(self, inputs: Any, fn: Any) -> Any:
        leaves = tree_flatten(inputs)[0]
        out = [fn(t) if f else t for t, f in zip(leaves, self.batched, strict=True)]
        return tree_unflatten(out, self.spec)

    def take(self, inputs: Any, n: int) -> Any:
        """Return the first ``n`` samples: batched leaves sliced, shared leaves unchanged."""
        return self._map(inputs, lambda t: t[:n])

    def row(self, inputs: Any, i: int) -> Any:
        """Return sample ``i`` as a batch of one."""
        return self._map(inputs, lambda t: t[i : i + 1])

    def unsqueeze(self, inputs: Any) -> Any:
        """Inside ``vmap`` over the batched leaves: give each of them a batch dimension of 1."""
        return self._map(inputs, lambda t: t.unsqueeze(0))

    def in_dims(self, inputs: Any) -> Any:
        """``in_dims`` for ``torch.func.vmap``: 0 for batched leaves, ``None`` for the rest."""
        del inputs  # the structure is the layout's own
        return tree_unflatten([0 if f else None for f in self.batched], self.spec)
