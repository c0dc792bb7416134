r"""The merged quadratic ``(λ/2) (Σ_i A_i (θ_i − μ_i)² + c)``, and the buffers its passes reuse.

Both forms of the penalty are memory-bound passes over every penalised parameter: the explicit
form (:meth:`ewc.EWC.penalty`) forms ``d = θ − μ``, ``w = A ⊙ d`` and ``Σ d·w`` in the forward
pass and adds ``λ g w`` to ``.grad`` in the backward pass; the injection form
(:meth:`ewc.EWC.add_penalty_grad`) forms ``d`` and adds ``λ A ⊙ d``. Fresh parameter-sized
tensors for ``d`` and ``w`` at every step cost more than the arithmetic on a CPU (the allocator
hands large blocks back to the system and every step faults them in again), so a
:class:`Pool` keeps them: a :class:`Scratch` is taken for one pass and given back when the pass
is over (the injection form: at once; the explicit form: at the end of the backward pass that
consumed ``w``). A graph that is never back-propagated keeps its scratch, which is then freed
with the graph; a graph back-propagated again after its scratch was reused by a later
``penalty()`` (``retain_graph=True``) is refused, never computed from overwritten buffers.

Each scratch is one flat buffer per dtype group, with a view per parameter, so the forward
pass's ``Σ d·w`` is a single dot product; the backward pass remembers each parameter's
gradient accumulator between steps rather than looking it up again. Measured in
``benchmarks/bench_fisher.py --penalty-only`` (``BENCHMARKS.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Pool", "Scratch", "Quadratic", "value", "diffs_into", "wide_sum"]


class Scratch:
    """Buffers for one pass: ``diffs[i]`` for ``θ_i − μ_i``, ``weighted[i]`` for ``A_i ⊙ diffs[i]``.

    The buffers are views of one flat tensor per (device, dtypes) group, so that ``Σ d·w`` is one
    dot product per group rather than one per parameter. ``weighted`` is allocated on first use
    (the injection form needs only ``diffs``). ``uses`` counts the passes that took this
    scratch: a graph remembers the count of its own forward pass and checks it before reading
    ``weighted`` in its backward pass.
    """

    __slots__ = ("key", "groups", "diffs", "weighted", "flat_diffs", "flat_weighted", "uses")

    def __init__(self, key: tuple[Any, ...]) -> None:
        self.key = key
        groups: dict[Any, list[int]] = {}
        for i, (_, device, p_dtype, m_dtype, a_dtype) in enumerate(key):
            dtype = torch.promote_types(p_dtype, m_dtype)  # of θ − μ (same shapes)
            groups.setdefault((device, dtype, torch.promote_types(dtype, a_dtype)), []).append(i)
        self.groups = list(groups.items())  # [((device, d dtype, w dtype), indices)]
        self.flat_diffs, self.diffs = self._views(0)
        self.flat_weighted: list[Tensor] | None = None
        self.weighted: list[Tensor] | None = None
        self.uses = 0

    def _views(self, which: int) -> tuple[list[Tensor], list[Tensor]]:
        """One flat buffer per group (``which``: 0 diffs' dtype, 1 weighted's) and its views."""
        flats: list[Tensor] = []
        views: list[Tensor | None] = [None] * len(self.key)
        for (device, *dtypes), idx in self.groups:
            sizes = [math.prod(self.key[i][0]) for i in idx]
            flat = torch.empty(sum(sizes), dtype=dtypes[which], device=device)
            flats.append(flat)
            for i, v in zip(idx, flat.split(sizes), strict=True):
                views[i] = v.view(self.key[i][0])
        return flats, views  # type: ignore[return-value]

    def weighted_buffers(self) -> list[Tensor]:
        """Return ``weighted`` (allocated on first use)."""
        if self.weighted is None:
            self.flat_weighted, self.weighted = self._views(1)
        return self.weighted

    def dot(self) -> Tensor:
        """Return ``Σ_i diffs[i] · weighted[i]``, one dot product per group (overwrites diffs)."""
        assert self.flat_weighted is not None
        dots = [_dot(d, w) for d, w in zip(self.flat_diffs, self.flat_weighted, strict=True)]
        return dots[0] if len(dots) == 1 else torch.stack(dots).sum()


def _dot(d: Tensor, w: Tensor, *, scratch: bool = True) -> Tensor:
    """Return ``Σ d·w`` of flat tensors, in float32 at least.

    A half-precision result overflows at 65504, which the penalty of a float16 model passes
    easily. ``d`` is overwritten with ``d ⊙ w`` when ``scratch`` (the reduced-precision case
    needs the product).
    """
    low = torch.promote_types(d.dtype, w.dtype)
    if d.dtype != low:  # e.g. bfloat16 parameters, float32 precisions: dot wants one dtype
        d, scratch = d.to(low), True
    if not (low.is_floating_point and torch.finfo(low).bits < 32):
        return torch.dot(d, w)
    return wide_sum(d.mul_(w) if scratch else d * w)


def wide_sum(x: Tensor) -> Tensor:
    """``x.sum()`` in float32 at least (a float16 sum overflows at 65504)."""
    return x.sum(dtype=torch.promote_types(x.dtype, torch.float32))


def _key(params: Sequence[Tensor], precs: Sequence[Tensor], anchors: Sequence[Tensor]) -> Any:
    """Shape, device and the dtypes of ``θ``, ``μ`` and ``A``, per parameter."""
    return tuple(
        (p.shape, p.device, p.dtype, m.dtype, a.dtype)
        for p, a, m in zip(params, precs, anchors, strict=True)
    )


class Pool:
    """Free :class:`Scratch` buffers of one penalty, matched by the operands' shapes and dtypes."""

    def __init__(self) -> None:
        self.free: list[Scratch] = []
        # each penalised leaf's gradient accumulator, by id (the node holds its parameter, so an
        # id is not reused while it is here); rebuilt by every backward pass from its inputs
        self.nodes: dict[int, Any] = {}
        self.running: dict[int, _Pass] = {}  # backward passes with hooks not yet removed

    def sweep(self) -> None:
        """Remove the hooks of passes that failed (called outside any backward pass)."""
        if self.running and _graph_task() < 0:
            for run in list(self.running.values()):
                run.close()

    def take(
        self, params: Sequence[Tensor], precs: Sequence[Tensor], anchors: Sequence[Tensor]
    ) -> Scratch:
        """Return a free scratch for these operands (a new one if none matches)."""
        key = _key(params, precs, anchors)
        for i, s in enumerate(self.free):
            if s.key == key:
                s = self.free.pop(i)
                s.uses += 1
                return s
        s = Scratch(key)
        s.uses = 1
        return s

    def give(self, s: Scratch) -> None:
        """Put ``s`` back for the next pass (keeping only the most recent one per key)."""
        if any(f is s for f in self.free):
            return
        self.free = [f for f in self.free if f.key != s.key] + [s]

    def clear(self) -> None:
        """Free the buffers (they are made again by the next pass)."""
        self.free = []


def diffs_into(s: Scratch, params: Sequence[Tensor], anchors: Sequence[Tensor]) -> list[Tensor]:
    """Write ``θ_i − μ_i`` into ``s.diffs`` and return them."""
    with torch.no_grad():
        for d, p, m in zip(s.diffs, params, anchors, strict=True):
            torch.sub(p, m, out=d)
    return s.diffs


class Quadratic(torch.autograd.Function):
    """``(λ/2) (Σ_i A_i (θ_i − μ_i)² + c)`` with the gradient ``λ A ⊙ (θ − μ)``.

    Called as ``Quadratic.apply(lam, offset, precs, anchors, pool, *params)``; ``pool`` is a
    :class:`Pool` or ``None`` (fresh tensors, as for FSDP's per-shard parts).

    The backward pass writes the gradient in place where that is the same as returning it: for
    a parameter whose gradient accumulator this pass runs (``loss.backward()``) and that carries
    no hooks of its own, ``λ g A ⊙ (θ − μ)`` is added to its ``.grad`` right after autograd
    accumulates the rest of its gradient there (a post-accumulate hook; the hooks that DDP and
    DeepSpeed put on the accumulator node run after it and see the whole gradient; autograd runs
    it even when the parameter gets no other gradient). Nothing is allocated or summed for it.
    Otherwise the gradient is returned, and autograd adds it to the rest before any hook sees
    it: ``torch.autograd.grad``, non-leaf inputs such as FSDP's shards, and parameters with
    tensor hooks (``register_hook``: a gradient mask must mask the penalty's part too;
    ``register_post_accumulate_grad_hook``: an optimizer stepping inside the backward pass must
    see it), whose hooks would run before ours. Under ``create_graph=True`` the gradient is
    returned as a graph in ``θ``, so second derivatives (a gradient-norm term, Hessian-vector
    products: ``λ g A``) are autograd's too.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        lam: float,
        offset: float,
        precs: list[Tensor],
        anchors: list[Tensor],
        pool: Pool | None,
        *params: Tensor,
    ) -> Tensor:
        if pool is not None:
            pool.sweep()
        scratch = None if pool is None else pool.take(params, precs, anchors)
        value, weighted = _value(lam, offset, precs, anchors, scratch, params)
        ctx.lam = lam
        ctx.weighted = weighted  # not inputs or outputs: kept on ctx, never modified
        ctx.params, ctx.precs, ctx.anchors = params, precs, anchors
        ctx.pool, ctx.scratch = pool, scratch
        ctx.uses = None if scratch is None else scratch.uses
        return value

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        weighted(ctx)  # refuses buffers a later pass overwrote
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is itself differentiable
            return (None, None, None, None, None, *_differentiable(ctx, grad_out))
        scale = grad_out * ctx.lam
        out: list[Tensor | None] = []
        pool = ctx.pool
        task = _graph_task()
        run = None if pool is None or task < 0 else _Pass(task, scale, ctx)
        nodes: dict[int, Any] = {}
        for i, (p, w) in enumerate(zip(ctx.params, ctx.weighted, strict=True)):
            if not ctx.needs_input_grad[5 + i]:
                out.append(None)
            elif run is not None and not _hooked(p) and _accumulates(p, pool.nodes, nodes):
                run.add(p, w)
                out.append(None)
            else:
                out.append(w * scale)
        if pool is not None:
            pool.nodes = nodes
        if run is not None and run.late:
            pool.running[id(run)] = run
            torch.autograd.Variable._execution_engine.queue_callback(run.finish)
        else:
            release(ctx)
        return (None, None, None, None, None, *out)


def _differentiable(ctx: Any, grad_out: Tensor) -> list[Tensor | None]:
    """``λ g A ⊙ (θ − μ)`` as a graph in ``θ`` and ``g`` (for second derivatives: ``λ g A``)."""
    release(ctx)
    out: list[Tensor | None] = []
    for i, (p, a, m) in enumerate(zip(ctx.params, ctx.precs, ctx.anchors, strict=True)):
        need = ctx.needs_input_grad[5 + i]
        out.append((grad_out * ctx.lam) * a * (p - m) if need else None)
    return out


class _Pass:
    """The in-place additions of one backward pass (graph task ``task``) of one penalty graph.

    A post-accumulate hook per parameter adds ``scale · w`` to ``.grad`` when the accumulator
    runs in this very pass (with torch 2.13 it always does: the accumulator runs its hooks with
    no other gradient too, and after a nested pass of reentrant checkpointing it runs again in
    this one); :meth:`finish` (the end-of-pass callback) removes the hooks and, as a safety net
    for a torch that skipped an accumulator, adds what is left. A pass that fails never
    finishes: its hooks stay inert (they act only in their own graph task, and task ids are
    not reused) until :meth:`Pool.sweep` removes them.
    """

    def __init__(self, task: int, scale: Tensor, ctx: Any) -> None:
        self.task, self.scale, self.ctx = task, scale, ctx
        self.late: dict[int, tuple[Tensor, Tensor]] = {}
        self.handles: list[Any] = []

    def add(self, p: Tensor, w: Tensor) -> None:
        self.late[id(p)] = (p, w)
        self.handles.append(p.register_post_accumulate_grad_hook(_Hook(self)))

    def accumulated(self, p: Tensor) -> None:
        """Add ``p``'s part now that autograd accumulated the rest (only in this pass)."""
        if _graph_task() != self.task:  # a nested pass, or one after this pass failed
            return
        entry = self.late.pop(id(p), None)
        if entry is not None:
            _add_to_grad(p, entry[1], self.scale)

    def finish(self) -> None:
        self.close()
        for p, w in self.late.values():
            _add_to_grad(p, w, self.scale)
        self.late.clear()
        release(self.ctx)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.ctx.pool.running.pop(id(self), None)


class _Hook:
    """Our post-accumulate hook (a type of its own, so that :func:`_hooked` can tell it apart)."""

    __slots__ = ("run",)

    def __init__(self, run: _Pass) -> None:
        self.run = run

    def __call__(self, p: Tensor) -> None:
        self.run.accumulated(p)


def _add_to_grad(p: Tensor, w: Tensor, scale: Tensor) -> None:
    if p.grad is None:  # the accumulator ran with nothing else for this parameter
        p.grad = (w * scale).to(p.dtype)
    else:
        p.grad.addcmul_(w, scale)


_TASK_ID = getattr(torch._C, "_current_graph_task_id", None)


def _graph_task() -> int:
    """Return the running backward pass's graph task id (``-1`` outside one, or if unknown)."""
    return -1 if _TASK_ID is None else int(_TASK_ID())


def value(
    lam: float,
    offset: float,
    precs: Sequence[Tensor],
    anchors: Sequence[Tensor],
    pool: Pool,
    params: Sequence[Tensor],
) -> Tensor:
    """Return the quadratic's value without a graph (``torch.no_grad()``, frozen parameters)."""
    scratch = pool.take(params, precs, anchors)
    with torch.no_grad():
        out = _value(lam, offset, precs, anchors, scratch, params)[0]
    pool.give(scratch)
    return out


def _value(
    lam: float,
    offset: float,
    precs: Sequence[Tensor],
    anchors: Sequence[Tensor],
    scratch: Scratch | None,
    params: Sequence[Tensor],
) -> tuple[Tensor, list[Tensor]]:
    """Return ``(λ/2) (Σ d·w + c)`` and ``w = A ⊙ d``, ``d = θ − μ`` (into ``scratch`` if given)."""
    if scratch is not None:
        diffs = diffs_into(scratch, params, anchors)
        weighted = scratch.weighted_buffers()
        for w, d, a in zip(weighted, diffs, precs, strict=True):
            torch.mul(d, a, out=w)
        total = scratch.dot()  # a new tensor: scaled in place
    else:
        diffs = torch._foreach_sub(list(params), list(anchors))
        weighted = torch._foreach_mul(diffs, list(precs))
        pairs = zip(diffs, weighted, strict=True)
        dots = [_dot(d.reshape(-1), w.reshape(-1), scratch=False) for d, w in pairs]
        total = torch.stack(dots).sum()
    if offset:
        total.add_(offset)
    return total.mul_(0.5 * lam), weighted


def weighted(ctx: Any) -> list[Tensor]:
    """Return the forward pass's ``A ⊙ (θ − μ)``; refuse it if a later pass took its buffers."""
    if ctx.scratch is not None and ctx.scratch.uses != ctx.uses:
        raise RuntimeError(
            "this penalty's graph is back-propagated again after a later penalty() call reused "
            "its buffers; compute penalty() again for each backward pass (or back-propagate "
            "the retained graph before calling penalty() again)"
        )
    return ctx.weighted


def release(ctx: Any) -> None:
    """Give the forward pass's scratch back to its pool.

    A retained graph may still read it until a later pass takes it (:func:`weighted` checks).
    """
    if ctx.scratch is not None:
        ctx.pool.give(ctx.scratch)


def _accumulates(
    p: Tensor, known: dict[int, Any] | None = None, seen: dict[int, Any] | None = None
) -> bool:
    """Whether the running backward pass accumulates into ``p.grad`` (a leaf it reaches).

    ``known`` holds gradient accumulators found before (by ``id``), ``seen`` collects them.
    """
    if not p.is_leaf or not p.requires_grad:
        return False
    try:
        node = None if known is None else known.get(id(p))
        if node is None:
            node = torch.autograd.graph.get_gradient_edge(p).node
        if seen is not None:
            seen[id(p)] = node
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # an older torch, or no engine running
        return False


def _hook_attributes_work() -> bool:
    """Whether registering tensor hooks shows in the attributes :func:`_hooked` reads."""
    t = torch.zeros((), requires_grad=True)
    handles = [t.register_hook(lambda g: g), t.register_post_accumulate_grad_hook(lambda t: None)]
    seen = bool(getattr(t, "_backward_hooks", None)) and bool(
        getattr(t, "_post_accumulate_grad_hooks", None)
    )
    for h in handles:
        h.remove()
    return seen


_HOOKS_VISIBLE = _hook_attributes_work()


def _hooked(p: Tensor) -> bool:
    """Whether ``p`` has tensor hooks (or this torch hides them: then assume it has)."""
    if not _HOOKS_VISIBLE:
        return True
    if p._backward_hooks:
        return True
    post = p._post_accumulate_grad_hooks
    return bool(post) and any(not isinstance(h, _Hook) for h in post.values())
