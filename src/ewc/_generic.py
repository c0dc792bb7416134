r"""The generic paths: exact per-sample gradients of any model, for parameters without a rule.

Both return, for the parameters ``names``,

.. math::

    \sum_n \sum_k \big(\partial_\theta \langle s_{nk}, z_n \rangle\big)^2,

squared in float32 or wider (``quantity="abs"``: the sum of absolute values instead, for
:mod:`ewc.mas`). :func:`vmap_squares` runs the whole model on one sample inside
``torch.func.vmap`` (the ``K`` columns are a loop inside the vmapped function, never a nested
``vmap``); :func:`loop_squares` does one forward and ``K`` backward passes per sample, for models
``vmap`` cannot trace (data-dependent control flow, ``.item()``). Shared inputs (see
:class:`ewc._batches.Layout`) are passed whole to every sample's call, never split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._batches import Layout, call
from ._options import OutputFn, acc_dtype
from ._rules import _CHUNK_ELEMENTS, QUANTITIES

__all__ = ["vmap_squares", "loop_squares", "GENERIC_PATHS"]


def vmap_squares(
    model: nn.Module,
    names: list[str],
    inputs: Any,
    layout: Layout,
    s: Tensor,
    output_fn: OutputFn | None,
    quantity: str = "square",
) -> dict[str, Tensor]:
    """Sum of squared per-sample gradients by ``vmap`` over the samples of the whole model.

    Shapes: ``s`` is ``(K, N, *z.shape[1:])``; the results have their parameters' shapes.
    ``quantity="abs"`` sums absolute values instead of squares.
    """
    reduce = QUANTITIES[quantity]
    from torch.func import functional_call, vjp, vmap

    params = dict(model.named_parameters())
    sub = {n: params[n].detach() for n in names}
    const: dict[str, Tensor] = {n: p.detach() for n, p in params.items() if n not in sub}
    const.update(dict(model.named_buffers()))
    k = s.shape[0]

    def one(x: Any, s_n: Tensor) -> dict[str, Tensor]:
        def f(p: dict[str, Tensor]) -> Tensor:
            x1 = layout.unsqueeze(x)
            state = {**p, **const}
            if isinstance(x1, Mapping):
                out = functional_call(model, state, (), dict(x1))
            elif isinstance(x1, (tuple, list)):
                out = functional_call(model, state, tuple(x1))
            else:
                out = functional_call(model, state, (x1,))
            if output_fn is not None:
                out = output_fn(out)
            return out.squeeze(0)

        _, vjp_fn = vjp(f, sub)
        return reduce([vjp_fn(s_n[j])[0] for j in range(k)])

    numel = sum(p.numel() for p in sub.values()) * max(1, k)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, numel))
    per = vmap(one, in_dims=(layout.in_dims(inputs), 0), chunk_size=chunk)(inputs, s.movedim(0, 1))
    return {n: g.sum(0) for n, g in per.items()}


def loop_squares(
    model: nn.Module,
    names: list[str],
    inputs: Any,
    layout: Layout,
    s: Tensor,
    output_fn: OutputFn | None,
    quantity: str = "square",
) -> dict[str, Tensor]:
    """Compute :func:`vmap_squares`'s sum with one forward pass per sample (no ``vmap``)."""
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {sorted(QUANTITIES)}, got {quantity!r}")
    params = dict(model.named_parameters())
    sub = [params[n] for n in names]
    out = {
        n: torch.zeros(p.shape, dtype=acc_dtype(p.dtype), device=p.device)
        for n, p in zip(names, sub, strict=True)
    }
    k = s.shape[0]
    for i in range(s.shape[1]):
        with torch.enable_grad():
            z = call(model, layout.row(inputs, i))
            if output_fn is not None:
                z = output_fn(z)
        if not z.requires_grad:
            continue  # nothing here depends on a trainable parameter: zero
        for j in range(k):
            gs = torch.autograd.grad(
                z, sub, s[j, i : i + 1].to(z.dtype), retain_graph=j < k - 1, allow_unused=True
            )
            for n, g in zip(names, gs, strict=True):
                if g is not None:
                    g = g.to(out[n].dtype)
                    if quantity == "abs":
                        out[n].add_(g.abs())
                    else:
                        out[n].addcmul_(g, g)
    return out


GENERIC_PATHS = {"vmap": vmap_squares, "loop": loop_squares}
