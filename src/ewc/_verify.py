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

from collections.abc import Mapping, Sequence
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
    return _decide(*_spread(got, want), floor)


def _spread(got: Tensor, want: Tensor) -> tuple[float, float]:
    """``(max |got − want|, max(|got|, |want|))`` (see :func:`rel_err`)."""
    if want.numel() == 0:
        return 0.0, 0.0
    dt = torch.promote_types(torch.promote_types(got.dtype, want.dtype), torch.float32)
    got, want = got.detach().to(dt), want.detach().to(dt)
    stats = torch.stack([(got - want).abs().max(), got.abs().max(), want.abs().max()]).tolist()
    return stats[0], max(stats[1], stats[2])


def square_err(diff: float, scale: float, floor: float) -> float:
    """Return the square check's relative error from :func:`_spread`'s ``(diff, scale)``."""
    return _decide(diff, scale, floor)


def _decide(diff: float, scale: float, floor: float) -> float:
    if diff <= floor:
        return 0.0
    return float("inf") if scale == 0.0 else diff / scale


def noise_floor(squares: list[Tensor], dtype: torch.dtype) -> float:
    """Return the rounding noise of squared gradients: ``(100 ε)²`` times the largest."""
    top = max((float(t.abs().max()) for t in squares if t.numel()), default=0.0)
    return _floor(top, dtype)


def _floor(top: float, dtype: torch.dtype) -> float:
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
    groups: Sequence[Sequence[str]] | None = None,
) -> Verdict:
    """Check ``route`` with the cotangent ``c`` (non-zero in sample ``i`` only) of ``z``.

    ``sub`` is the sub-batch, ``z`` its outputs from a forward pass under ``route.capture``
    whose records are ``records`` (one per fast layer). With ``squares_too=False`` only the
    locality check runs (one backward pass to the layer outputs, no weight gradients): what
    the square checks test does not depend on the sample, locality does.

    ``groups`` (lists of keys of ``trainable``) bound the memory of the square checks: autograd's
    gradients of one group are formed, compared with the closed forms of the layers that own
    them and dropped before the next group's (one backward pass per group); ``None``: one group.
    The verdicts do not depend on the grouping (the noise floor is the largest square of all).
    """
    part = route.partition
    tol = tolerance(z.dtype)
    outs = {n: records[n].out for n in part.fast if records[n].out.requires_grad}
    keys = list(trainable) if squares_too else []
    chunks = [keys] if groups is None else [[k for k in g if k in trainable] for g in groups]
    chunks = [g for g in chunks if g] if squares_too else []
    first = chunks[0] if chunks else []
    wrt = [*outs.values(), *(trainable[k] for k in first)]
    if z.requires_grad and wrt:
        grads = torch.autograd.grad(z, wrt, c, retain_graph=True, allow_unused=True)
    else:  # nothing the outputs depend on is trainable here (frozen, or under no_grad)
        grads = (None,) * len(wrt)
    g_out = {n: g for n, g in zip(outs, grads[: len(outs)], strict=True) if g is not None}
    top = max((float(g.abs().max()) for g in g_out.values() if g.numel()), default=0.0)
    leak_floor = 100 * torch.finfo(z.dtype).eps * top
    verdict = Verdict()
    grad_of: dict[str, Tensor] = {}
    usable: list[str] = []
    for name in part.fast:
        g = g_out.get(name, torch.zeros_like(records[name].out))
        grad_of[name] = g
        if _leaks(g, i, tol, leak_floor):
            verdict.failed[name] = LEAK
        else:
            usable.append(name)
    if not squares_too:
        return verdict
    sq = _Squares(part, records, grad_of, usable, z.dtype, verdict)
    sq.group(first, grads[len(outs) :], trainable)
    for group in chunks[1:]:
        wanted = [trainable[k] for k in group]
        if z.requires_grad:
            gs = torch.autograd.grad(z, wanted, c, retain_graph=True, allow_unused=True)
        else:
            gs = (None,) * len(wanted)
        sq.group(group, gs, trainable)
    floor = _floor(sq.top, z.dtype)  # noise_floor of all the squares
    for name, pairs in sq.spread.items():
        err = max(square_err(diff, scale, floor) for diff, scale in pairs)
        if err > tol:
            verdict.failed[name] = DIFFERS.format(err)
    for name in sq.missing:
        verdict.failed[name] = DIFFERS.format(1.0)
    if part.rest:
        verdict.generic = _check_generic(model, route, sub, c, sq.rest, output_fn, tol, floor)
    return verdict


class _Squares:
    """The square checks of :func:`check_sample`, one group of autograd's gradients at a time.

    For each layer ``(max |closed form − autograd|, scale)`` of each of its parameters is kept
    (a tied weight's total over its two layers is charged to both), and the largest square
    seen; the verdicts are decided once every group has been seen.
    """

    def __init__(
        self,
        part: Any,
        records: Mapping[str, Record],
        grad_of: Mapping[str, Tensor],
        usable: list[str],
        dtype: torch.dtype,
        verdict: Verdict,
    ) -> None:
        self.part, self.records, self.grad_of, self.dtype = part, records, grad_of, dtype
        self.usable, self.verdict = set(usable), verdict
        self.owner = {full: name for name, ns in part.names.items() for full in ns.values()}
        self.tied = {key: (lin, emb) for key, lin, emb in part.ties}
        self.spread: dict[str, list[tuple[float, float]]] = {}
        self.missing: set[str] = set()  # layers whose rule gave nothing for a parameter
        self.rest: dict[str, Tensor] = {}  # squares of the generic path's parameters
        self.top = 0.0

    def _values(self, name: str, cache: dict[str, dict[str, Tensor] | None]) -> Any:
        """Return one layer's closed form (``None`` if it raised: the verdict says why)."""
        if name not in cache:
            rec, part = self.records[name], self.part
            try:
                cache[name] = apply_rule(
                    part.rules[name], part.fast[name], rec.x, self.grad_of[name].unsqueeze(0)
                )
            except Exception as e:  # e.g. torch.func cannot trace this module alone
                self.verdict.failed[name] = (
                    f"its closed form raised {type(e).__name__}: {str(e)[:100]}"
                )
                cache[name] = None
        return cache[name]

    def _charge(self, names: tuple[str, ...], diff: float, scale: float) -> None:
        for name in names:
            self.spread.setdefault(name, []).append((diff, scale))

    def group(
        self, keys: list[str], grads: Sequence[Tensor | None], trainable: Mapping[str, Tensor]
    ) -> None:
        """Compare the closed forms with autograd's gradients of ``keys`` (then dropped)."""
        cache: dict[str, dict[str, Tensor] | None] = {}
        acc = acc_dtype(self.dtype)
        for key, g in zip(keys, grads, strict=True):
            true = torch.zeros_like(trainable[key]) if g is None else g
            square = true.to(acc_dtype(true.dtype)).square()
            del true
            if square.numel():
                self.top = max(self.top, float(square.abs().max()))
            if key in self.part.rest:
                self.rest[key] = square
                continue
            if key in self.tied:
                lin, emb = self.tied[key]
                if not (lin in self.usable and emb in self.usable):
                    continue
                vl, ve = self._values(lin, cache), self._values(emb, cache)
                if vl is None or ve is None:
                    continue
                cross = _rules.tied_cross(
                    self.records[lin].x.to(acc),
                    self.grad_of[lin].to(acc),
                    self.records[emb].x,
                    self.grad_of[emb].to(acc),
                    self.part.fast[emb],
                )
                total = vl["weight"] + ve["weight"] + cross
                self._charge((lin, emb), *_spread(total, square.to(total.dtype)))
                continue
            name = self.owner.get(key)
            if name is None or name not in self.usable:
                continue
            vals = self._values(name, cache)
            if vals is None:
                continue
            local = next(loc for loc, full in self.part.names[name].items() if full == key)
            got = vals.get(local)
            if got is None:
                self.missing.add(name)
            else:
                self._charge((name,), *_spread(got, square))


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
