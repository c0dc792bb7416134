r"""The column backprop driver shared by the diagonal and the Kronecker-factored estimators.

For one batch, the likelihood's factor ``s`` (shape ``(K, *z.shape)``, see
:mod:`ewc.likelihoods`) is back-propagated one column at a time from the outputs ``z`` to the
outputs of the route's fast layers only (no weight gradients). :func:`column_grads` yields each
column's output gradients; a consumer turns them into a quantity: :class:`DiagonalSums` into the
closed-form sums of squared per-sample gradients of :mod:`ewc._rules`, :mod:`ewc.kfac` into
Kronecker factors. Only one column's gradients are held at a time.

:class:`DiagonalSums` adds into a ``dict`` of accumulators (one per parameter, the common case)
or hands each contribution to a :class:`Sink` as it is formed (FSDP: each layer's full-shape
sums are reduce-scattered into the shards instead of being held for the whole model).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from . import _rules
from ._capture import Record
from ._options import acc_dtype
from ._route import Route

__all__ = ["column_grads", "live_layers", "DiagonalSums", "Sink"]


@runtime_checkable
class Sink(Protocol):
    """Takes each contribution to a parameter's sum as it is formed (instead of a dict)."""

    def add(self, key: str, val: Tensor) -> None:
        """Add ``val`` (the parameter's full shape) to the sum of ``key``."""


def live_layers(route: Route, records: Mapping[str, Record], z: Tensor) -> list[str]:
    """Fast layers whose output carries a graph to ``z`` (others contribute zero)."""
    if not z.requires_grad:
        return []
    return [n for n in route.partition.fast if records[n].out.requires_grad]


def column_grads(
    route: Route, records: Mapping[str, Record], z: Tensor, s: Tensor, live: list[str]
) -> Iterator[dict[str, Tensor]]:
    """Yield, for each column ``j`` of ``s``, ``{layer: ∂⟨s_j, z⟩/∂out}`` for the ``live`` layers.

    Shapes: ``s`` is ``(K, *z.shape)``; each gradient has its layer output's shape, in the
    accumulation dtype (float32 or wider) unless the layer's rule is ``native``. The graph is
    freed after the last column.
    """
    part = route.partition
    outs = [records[n].out for n in live]
    k = s.shape[0]
    acc = acc_dtype(z.dtype)
    for j in range(k):
        gs = torch.autograd.grad(z, outs, s[j], retain_graph=j < k - 1, allow_unused=True)
        grads = {}
        for name, o, g in zip(live, outs, gs, strict=True):
            g = o.new_zeros(o.shape) if g is None else g
            grads[name] = g if part.rules[name].native else g.to(acc)
        yield grads


class DiagonalSums:
    """Add the closed-form sums of squared per-sample gradients of one batch into ``sums``.

    Call :meth:`column` with each column's gradients (from :func:`column_grads`), then
    :meth:`finish`. Layers whose rule only needs ``Σ_k g_k²`` (Linear on 2-D inputs) accumulate
    that and do one matmul at the end. Layers in ``skip`` are left to another consumer.
    """

    def __init__(
        self,
        route: Route,
        records: Mapping[str, Record],
        z: Tensor,
        sums: dict[str, Tensor] | Sink,
        live: list[str],
        skip: frozenset[str] = frozenset(),
    ) -> None:
        self.part = route.partition
        self.sums = sums
        self.live = [n for n in live if n not in skip]
        acc = acc_dtype(z.dtype)
        self.xs = {n: _as(records[n].x, acc, self.part.rules[n]) for n in self.live}
        self.squares: dict[str, Tensor] = {}

    def _put(self, full: str, val: Tensor) -> None:
        if isinstance(self.sums, dict):
            self.sums[full] += val.to(self.sums[full].dtype)
        else:
            self.sums.add(full, val)

    def _add(self, name: str, vals: dict[str, Tensor]) -> None:
        for local, val in vals.items():
            full = self.part.names[name].get(local)
            if full is not None:  # a layer's unselected parameter (``params=``) is dropped
                self._put(full, val)

    def column(self, grads: Mapping[str, Tensor]) -> None:
        """Add one column's contribution."""
        part, xs = self.part, self.xs
        for name in self.live:
            rule, g = part.rules[name], grads[name]
            if rule.factorised and xs[name].dim() == 2:
                sq = self.squares.get(name)
                self.squares[name] = g.square() if sq is None else sq.addcmul_(g, g)
            else:
                self._add(name, rule.diagonal(part.fast[name], xs[name], g.unsqueeze(0)))
        for full, lin, emb in part.ties:
            if lin in self.xs and emb in self.xs:
                cross = _rules.tied_cross(xs[lin], grads[lin], xs[emb], grads[emb], part.fast[emb])
                self._put(full, cross)

    def finish(self) -> None:
        """Add the factorised layers' sums (one matmul each)."""
        sums = self.sums
        for name, g2 in self.squares.items():
            names = self.part.names[name]
            into = (
                {loc: sums[full] for loc, full in names.items()} if isinstance(sums, dict) else None
            )
            self._add(name, _rules.linear_from_sq(self.part.fast[name], self.xs[name], g2, into))
        self.squares = {}


def _as(x: Tensor, dtype: torch.dtype, rule: _rules.LayerRule) -> Tensor:
    return x if rule.native or not x.is_floating_point() else x.to(dtype)
