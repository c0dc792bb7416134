r"""Checks of a route against autograd, on a sub-batch, before its closed forms are trusted.

A closed form is right for a layer when (a) row ``n`` of the layer's input and output belongs
to sample ``n`` and to no other, and (b) the layer's own call is the only use of its
parameters, and its output gradient is what the rule assumes (no hook in between, no wrong
batching rule). Neither can be read off shapes or module types. Both are checked with one
backward pass per sample of a small sub-batch: a random cotangent ``c`` that is non-zero only
in sample ``i``'s output is back-propagated, and

* **locality**: every fast layer's output gradient must vanish outside row ``i``;
* **squares**: with that gradient, each rule's sum of squared per-sample gradients (one sample
  is non-zero, so the sum is that sample's square) must equal the square of
  ``torch.autograd.grad`` of ``<c, z>`` with respect to the layer's parameters; for a tied
  weight, the two layers' terms and their cross term together;
* **generic path**: the generic path's sum of squares for the remaining parameters, run on the
  same sub-batch and cotangent, must equal autograd's square too.

A layer that fails goes to the generic path; a generic path that fails is replaced by the
per-sample loop; a model that fails even that does not treat samples independently and is
refused. Tolerances are relative to the largest entry, by dtype (:func:`tolerance`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import _rules
from ._capture import Record
from ._generic import GENERIC_PATHS
from ._options import OutputFn, acc_dtype
from ._route import Route

__all__ = ["tolerance", "rel_err", "Verdict", "check_sample", "apply_rule"]


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the checks for a model computing in ``dtype``."""
    if dtype == torch.float64:
        return 1e-6
    if dtype == torch.float32:
        return 1e-4
    return 5e-2  # float16 / bfloat16: a few roundings of 2^-8 to 2^-11 each


def rel_err(got: Tensor, want: Tensor, floor: float = 0.0) -> float:
    """``max |got − want| / max(|got|, |want|)``; 0 when the difference is within ``floor``.

    ``floor`` is an absolute tolerance: rounding noise on a value that is zero in exact
    arithmetic (the gradient of an attention key's bias, for one) is not a mismatch. The
    difference is formed in the wider of the two dtypes (float32 at least): its own rounding,
    one unit in the last place of the difference, is far below every :func:`tolerance`.
    """
    if want.numel() == 0:
        return 0.0
    dt = torch.promote_types(torch.promote_types(got.dtype, want.dtype), torch.float32)
    got, want = got.detach().to(dt), want.detach().to(dt)
    stats = torch.stack([(got - want).abs().max(), got.abs().max(), want.abs().max()]).tolist()
    diff, scale = stats[0], max(stats[1], stats[2])
    if diff <= floor:
        return 0.0
    return float("inf") if scale == 0.0 else diff / scale


def noise_floor(squares: list[Tensor], dtype: torch.dtype) -> float:
    """Return the rounding noise of squared gradients: ``(100 ε)²`` times the largest."""
    top = max((float(t.abs().max()) for t in squares if t.numel()), default=0.0)
    return (100 * torch.finfo(dtype).eps) ** 2 * top


def apply_rule(
    rule: _rules.LayerRule, module: nn.Module, x: Tensor, g: Tensor
) -> dict[str, Tensor]:
    """Run ``rule`` with ``x`` and ``g`` cast to the accumulation dtype (unless it is native)."""
    if not rule.native:
        acc = acc_dtype(g.dtype)
        g = g.to(acc)
        x = x.to(acc) if x.is_floating_point() else x
    return rule.diagonal(module, x, g)


@dataclass
class Verdict:
    """What a check found: failed layers with reasons, and the generic path's failure."""

    failed: dict[str, str] = field(default_factory=dict)
    generic: str | None = None


LEAK = (
    "the gradient of one sample reaches other rows of its output (its rows are not samples: a "
    "sequence-first layout, or a table shared by the batch)"
)
DIFFERS = (
    "its closed form differs from autograd (relative error {:.1e}): a parameter used outside "
    "the layer's own call, a hook that changes its output, or a wrong per-sample VJP"
)


def _leaks(g: Tensor, i: int, tol: float, floor: float) -> bool:
    """Whether ``g`` (one layer's output gradient) is non-zero outside row ``i``."""
    if g.shape[0] < 2 or g.numel() == 0:
        return False
    leak = float(torch.cat([g[:i], g[i + 1 :]]).abs().max())
    return leak > floor and leak > tol * float(g.abs().max())


def check_sample(
    model: nn.Module,
    route: Route,
    trainable: Mapping[str, nn.Parameter],
    sub: Any,
    z: Tensor,
    records: Mapping[str, Record],
    c: Tensor,
    i: int,
    output_fn: OutputFn | None,
    squares_too: bool = True,
) -> Verdict:
    """Check ``route`` with the cotangent ``c`` (non-zero in sample ``i`` only) of ``z``.

    ``sub`` is the sub-batch, ``z`` its outputs from a forward pass under ``route.capture``
    whose records are ``records`` (one per fast layer). With ``squares_too=False`` only the
    locality check runs (one backward pass to the layer outputs, no weight gradients): what
    the square checks test does not depend on the sample, locality does.
    """
    part = route.partition
    tol = tolerance(z.dtype)
    outs = {n: records[n].out for n in part.fast if records[n].out.requires_grad}
    keys = list(trainable) if squares_too else []
    wrt = [*outs.values(), *(trainable[k] for k in keys)]
    if z.requires_grad and wrt:
        grads = torch.autograd.grad(z, wrt, c, retain_graph=True, allow_unused=True)
    else:  # nothing the outputs depend on is trainable here (frozen, or under no_grad)
        grads = (None,) * len(wrt)
    g_out = {n: g for n, g in zip(outs, grads[: len(outs)], strict=True) if g is not None}
    true = {
        k: (torch.zeros_like(trainable[k]) if g is None else g)
        for k, g in zip(keys, grads[len(outs) :], strict=True)
    }
    squares = {k: t.to(acc_dtype(t.dtype)).square() for k, t in true.items()}
    floor = noise_floor(list(squares.values()), z.dtype)
    top = max((float(g.abs().max()) for g in g_out.values() if g.numel()), default=0.0)
    leak_floor = 100 * torch.finfo(z.dtype).eps * top
    verdict = Verdict()
    values: dict[str, dict[str, Tensor]] = {}
    grad_of: dict[str, Tensor] = {}
    for name, module in part.fast.items():
        rec = records[name]
        g = g_out.get(name, torch.zeros_like(rec.out))
        grad_of[name] = g
        if _leaks(g, i, tol, leak_floor):
            verdict.failed[name] = LEAK
            continue
        if not squares_too:
            continue
        try:
            values[name] = apply_rule(part.rules[name], module, rec.x, g.unsqueeze(0))
        except Exception as e:  # e.g. torch.func cannot trace this module alone
            verdict.failed[name] = f"its closed form raised {type(e).__name__}: {str(e)[:100]}"
    if not squares_too:
        return verdict
    tied = {key: (lin, emb) for key, lin, emb in part.ties}
    for key, (lin, emb) in tied.items():
        if lin not in values or emb not in values:
            continue
        cross = _rules.tied_cross(
            records[lin].x.to(acc_dtype(z.dtype)),
            grad_of[lin].to(acc_dtype(z.dtype)),
            records[emb].x,
            grad_of[emb].to(acc_dtype(z.dtype)),
            part.fast[emb],
        )
        total = values[lin]["weight"] + values[emb]["weight"] + cross
        err = rel_err(total, squares[key].to(total.dtype), floor)
        if err > tol:
            verdict.failed[lin] = verdict.failed[emb] = DIFFERS.format(err)
    for name, vals in values.items():
        for local, full in part.names[name].items():
            if full in tied:
                continue
            got = vals.get(local)
            err = 1.0 if got is None else rel_err(got, squares[full], floor)
            if err > tol:
                verdict.failed[name] = DIFFERS.format(err)
    if part.rest:
        verdict.generic = _check_generic(model, route, sub, c, squares, output_fn, tol, floor)
    return verdict


def _check_generic(
    model: nn.Module,
    route: Route,
    sub: Any,
    c: Tensor,
    squares: Mapping[str, Tensor],
    output_fn: OutputFn | None,
    tol: float,
    floor: float,
) -> str | None:
    """Return ``None`` if the generic path reproduces autograd's squares, else what is wrong."""
    names = list(route.rest)
    try:
        got = GENERIC_PATHS[route.generic](
            model, names, sub, route.layout, c.unsqueeze(0), output_fn
        )
    except Exception as e:  # vmap cannot trace the model, or the model rejects a sample alone
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    for n in names:
        err = rel_err(got[n], squares[n], floor)
        if err > tol:
            return f"per-sample gradients of {n!r} differ from autograd (relative error {err:.1e})"
    return None
