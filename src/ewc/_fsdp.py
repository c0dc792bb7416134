r"""FSDP2 models (``torch.distributed.fsdp.fully_shard``): Fisher estimates into DTensor shards.

Under FSDP2 a parameter is a DTensor: each rank holds a shard (dimension 0 split by
``torch.chunk``) and the forward and backward passes all-gather each unit's full weights just
before they are used. The estimate keeps that shape:

* every rank runs its own data through the sharded model; the capture hooks and the closed
  forms of :mod:`ewc._rules` see the **unsharded** weights of the unit being run, as in one
  process;
* each batch's per-layer sums ``S_b`` (full layer shapes) are reduce-scattered into the
  parameters' placements (``Partial → Shard``) as they are formed, a layer at a time
  (:class:`ShardSums`: no rank holds more than the largest layer's full-shape sums), so rank
  ``r`` accumulates only its shard ``Σ_b Σ_r' S_{b,r'}[shard_r]``; parameters outside FSDP units
  (plain tensors) are summed on each rank and all-reduced at the end, as today;
* ``F = Σ S / Σ_r N_r``: the Fisher of the union of the shards, the entries DTensors with their
  parameters' mesh and placements.

**Lockstep.** An FSDP forward or backward pass is a sequence of collectives, so every rank must
run the same passes in the same order. Each round starts with a status all-reduce
(:meth:`ewc.distributed.Reduction.agree`); a rank whose shard is exhausted (or empty) repeats a
batch it already has (or one borrowed from another rank) with its contribution dropped, and a
batch whose input signature has no verified route yet is probed by **every** rank on that same
batch (broadcast, no pickling), so the probe's passes and its decisions are the same on all
ranks. A second status round after the forward pass (bad labels, non-finite outputs) comes
before any backward pass. A failure *inside* a pass (the model's forward, the column
backward passes) leaves the other ranks in one of FSDP's collectives, out of reach of a status
round: the failing rank posts its error to the process group's store and raises at once, and
the others raise the same :class:`~ewc.distributed.RankFailure` when their collective breaks
(:func:`_stranded`).

Limits: every selected parameter needs a closed form of :mod:`ewc._rules` (the generic
per-sample paths re-run the model per sample, which FSDP's collectives do not allow, and the
module-local VJP of other leaf modules would call them on sharded weights). The probe (the
first batch of each input signature, on two samples) forms autograd's full per-sample
gradients for its check one FSDP unit at a time (:meth:`ShardRouter.check_groups`: one
backward pass of the two-sample sub-batch per unit), so it holds one unit's full gradients,
squares and closed forms at a time.
"""

from __future__ import annotations

import datetime
import itertools
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten, treespec_dumps, treespec_loads

from . import distributed as _dist
from ._options import FisherOptions, acc_dtype
from ._probe import Router
from ._route import Route, route_key
from .fisher import Fisher

__all__ = [
    "is_sharded",
    "sharded_names",
    "local",
    "like",
    "shard_like",
    "total",
    "AllSum",
    "estimate",
    "penalty",
]

_MAX_PROBE_ROUNDS = 8


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter or a tensor stored like one)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without torch.distributed
        return False
    return isinstance(t, DTensor)


def sharded_names(params: Mapping[str, Tensor]) -> list[str]:
    """Names of the DTensor entries of ``params``, in order."""
    return [n for n, p in params.items() if is_sharded(p)]


def local(t: Tensor) -> Tensor:
    """Return this rank's shard of a DTensor (differentiable), any other tensor as it is."""
    return t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined]


def like(shard: Tensor, ref: Tensor) -> Tensor:
    """Wrap this rank's ``shard`` as a DTensor with ``ref``'s mesh, placements and shape."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        shard,
        ref.device_mesh,  # type: ignore[attr-defined]
        ref.placements,  # type: ignore[attr-defined]
        shape=ref.shape,
        stride=ref.stride(),
    )


def shard_like(t: Tensor, ref: Tensor) -> Tensor:
    """Return ``t`` (full or a DTensor) laid out as ``ref``: this rank's shard, or full.

    A full tensor is cut locally (every rank holds it; no communication).
    """
    if not is_sharded(ref):
        return total(t)
    if is_sharded(t):
        return t.redistribute(ref.device_mesh, ref.placements)  # type: ignore[attr-defined]
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        t.to(local(ref).device),
        ref.device_mesh,  # type: ignore[attr-defined]
        ref.placements,  # type: ignore[attr-defined]
        src_data_rank=None,
    )


def total(t: Tensor) -> Tensor:
    """Return the full value of a DTensor (gathered or reduced), any other tensor as it is."""
    return t.full_tensor() if is_sharded(t) else t  # type: ignore[attr-defined]


def shard_groups(ref: Tensor) -> list[Any]:
    """Process groups over which ``ref``'s shards are split (one per ``Shard`` mesh dimension)."""
    from torch.distributed.tensor import Shard

    mesh = ref.device_mesh  # type: ignore[attr-defined]
    return [mesh.get_group(d) for d, p in enumerate(ref.placements) if isinstance(p, Shard)]  # type: ignore[attr-defined]


class AllSum(torch.autograd.Function):
    """``Σ_r x_r`` over ``groups`` (a sum of per-shard parts); the gradient passes straight through.

    Each rank's scalar loss is the same total ``Σ_r x_r``, whose derivative in this rank's
    ``x_r`` is 1: the backward pass is the identity (an all-reduce there would count it ``W``
    times).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, groups: tuple[Any, ...]) -> Tensor:  # type: ignore[override]
        out = x.detach().clone()
        for g in groups:
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=g)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


# --- The estimate ----------------------------------------------------------------------------
class ShardSums:
    """One batch's sums for sharded parameters, reduce-scattered into the shards as they come.

    The closed forms give each contribution at its layer's full (unsharded) shape. It is added
    to a pending full-shape buffer of its parameter; before a new buffer would take the pending
    bytes past ``budget`` (the largest fast layer's selected sharded parameters), the oldest
    buffers are reduce-scattered (``Partial`` → the parameter's placements) into this rank's
    shard accumulator and freed. So one layer's worth of full-shape sums is held at a time,
    never the model's (the contribution being formed comes on top). Every rank forms the same
    contributions in the same order (the same route, the same columns of the likelihood's
    factor), so the reduce-scatters match across ranks. With ``K > 1`` columns (``exact``,
    ``mc_samples > 1``) a layer whose rule is not factorised is reduce-scattered once per
    column. Parameters outside FSDP units go to their one-process accumulators.

    Args:
        trainable: The selected parameters (sharded ones are DTensors).
        route: The batch's route (its fast layers set the budget).
        acc: This rank's shard accumulators, by the sharded parameters' names.
        plain: Full accumulators of the other parameters.
        keep: ``False`` for a repeated batch: the collectives run, the values are dropped.
    """

    def __init__(
        self,
        trainable: Mapping[str, Tensor],
        route: Route,
        acc: dict[str, Tensor],
        plain: dict[str, Tensor],
        keep: bool,
    ) -> None:
        self.trainable, self.acc, self.plain, self.keep = trainable, acc, plain, keep
        size = {n: trainable[n].numel() * acc[n].element_size() for n in acc}
        layers = [
            sum(size.get(full, 0) for full in names.values())
            for names in route.partition.names.values()
        ]
        self.budget = max(layers + list(size.values()) + [0])
        self.pending: OrderedDict[str, Tensor] = OrderedDict()
        self.held = 0
        self.peak = 0
        self.flushes = 0

    def add(self, key: str, val: Tensor) -> None:  # noqa: D102 - see ewc._columns.Sink
        if key not in self.acc:
            if self.keep:
                self.plain[key] += val.to(self.plain[key].dtype)
            return
        buf = self.pending.get(key)
        if buf is not None:
            buf += val
            return
        need = val.numel() * self.acc[key].element_size()
        while self.pending and self.held + need > self.budget:
            self._flush(next(iter(self.pending)))
        self.pending[key] = val.to(
            dtype=self.acc[key].dtype, memory_format=torch.contiguous_format, copy=True
        )
        self.held += need
        self.peak = max(self.peak, self.held)

    def close(self) -> None:
        """Reduce-scatter what is still pending (in order)."""
        while self.pending:
            self._flush(next(iter(self.pending)))

    def _flush(self, key: str) -> None:
        from torch.distributed.tensor import DTensor, Partial

        full = self.pending.pop(key)
        self.held -= full.numel() * full.element_size()
        if not self.keep:
            full.zero_()
        p = self.trainable[key]
        mesh = p.device_mesh  # type: ignore[attr-defined]
        part = DTensor.from_local(full, mesh, [Partial()] * mesh.ndim)
        self.acc[key] += part.redistribute(mesh, p.placements).to_local()  # type: ignore[attr-defined]
        self.flushes += 1


def _unsharded(model: nn.Module) -> dict[int, Tensor]:
    """``id(sharded parameter) -> the unsharded parameter`` FSDP's forward pass uses."""
    from torch.distributed.fsdp import FSDPModule

    out: dict[int, Tensor] = {}
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        group = m._get_fsdp_state()._fsdp_param_group  # noqa: SLF001 - no public accessor
        for fp in [] if group is None else group.fsdp_params:
            try:
                out[id(fp.sharded_param)] = fp.unsharded_param
            except (AssertionError, AttributeError, RuntimeError):
                continue  # not unsharded yet: the probe then sees no gradient and says so
    return out


def _reshard(model: nn.Module) -> None:
    """Put every FSDP unit's sharded parameters back on its modules.

    (The root keeps its full weights after a forward pass without a backward pass.)
    """
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class ShardRouter(Router):
    """A :class:`~ewc._probe.Router` for FSDP2 models (see the module doc)."""

    memo_allowed = False  # unsharded parameters are rebuilt by each forward pass: probe each time

    def checked(self) -> Mapping[str, Tensor]:  # noqa: D102
        live = _unsharded(self.model)
        return {n: live.get(id(p), p) for n, p in self.trainable.items()}

    def check_groups(self) -> list[list[str]] | None:  # noqa: D102 - one group per FSDP unit
        from torch.distributed.fsdp import FSDPModule

        unit: dict[int, int] = {}
        for i, m in enumerate(self.model.modules()):
            if isinstance(m, FSDPModule):
                group = m._get_fsdp_state()._fsdp_param_group  # noqa: SLF001
                for fp in [] if group is None else group.fsdp_params:
                    unit[id(fp.sharded_param)] = i
        groups: dict[Any, list[str]] = {}
        for n, p in self.trainable.items():  # a parameter outside every unit: its own group
            groups.setdefault(unit.get(id(p), ("plain", n)), []).append(n)
        return list(groups.values())

    def candidate(self, layout: Any) -> Route:  # noqa: D102
        _reshard(self.model)
        route = super().candidate(layout)
        if route.rest:
            why = {**route.partition.skipped, **route.excluded}
            reasons = "; ".join(f"{k}: {v}" for k, v in list(why.items())[:3])
            raise ValueError(
                "under FSDP every selected parameter needs a closed form (the generic "
                "per-sample paths re-run the model per sample, which FSDP's collectives do not "
                f"allow); these have none: {list(route.rest)[:5]}"
                + (f" ({reasons})" if reasons else "")
                + "; leave them out with params= (ewc.fisher_route on an unsharded copy shows "
                "every layer's path)"
            )
        return route


def _flags(reduction: _dist.Reduction, flag: bool, device: torch.device) -> list[int]:
    """All-reduce one flag per rank; return every rank's flag."""
    t = torch.zeros(reduction.world_size, dtype=torch.int64, device=device)
    t[reduction.rank] = int(flag)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=reduction.group)
    return [int(v) for v in t.tolist()]


def _global_rank(reduction: _dist.Reduction, rank: int) -> int:
    return rank if reduction.group is None else dist.get_global_rank(reduction.group, rank)


def _broadcast(
    item: tuple[int, Any, Tensor | None, int] | None,
    src: int,
    reduction: _dist.Reduction,
    device: torch.device,
) -> tuple[int, Any, Tensor | None, int]:
    """Send rank ``src``'s batch ``(index, inputs, targets, size)`` to every rank.

    A JSON header (structure, dtypes, shapes, non-tensor values) then one broadcast per tensor.
    """
    header = torch.zeros(1, dtype=torch.int64, device=device)
    raw = b""
    leaves: list[Any] = []
    if reduction.rank == src:
        assert item is not None
        idx, inputs, targets, size = item
        leaves, spec = tree_flatten((inputs, targets))
        desc = [
            {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            if isinstance(t, Tensor)
            else {"value": t}
            for t in leaves
        ]
        try:
            raw = json.dumps(
                {"spec": treespec_dumps(spec), "idx": idx, "size": size, "leaves": desc}
            ).encode()
            header[0] = len(raw)
        except TypeError:
            header[0] = -1
    grank = _global_rank(reduction, src)
    dist.broadcast(header, grank, group=reduction.group)
    n = int(header[0])
    if n < 0:
        raise ValueError(
            "under FSDP a rank without data borrows another rank's batch, which must hold "
            "only tensors and JSON values (numbers, strings)"
        )
    buf = torch.zeros(n, dtype=torch.uint8, device=device)
    if reduction.rank == src:
        buf.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    dist.broadcast(buf, grank, group=reduction.group)
    meta = json.loads(bytes(buf.cpu().tolist()).decode())
    out: list[Any] = []
    for i, d in enumerate(meta["leaves"]):
        if "value" in d:
            out.append(d["value"])
            continue
        if reduction.rank == src:
            t = leaves[i].to(device).contiguous()
        else:
            t = torch.empty(d["shape"], dtype=getattr(torch, d["dtype"]), device=device)
        dist.broadcast(t, grank, group=reduction.group)
        out.append(t)
    inputs, targets = tree_unflatten(out, treespec_loads(meta["spec"]))
    return meta["idx"], inputs, targets, meta["size"]


def estimate(
    model: nn.Module,
    data: Iterable[Any],
    opts: FisherOptions,
    trainable: dict[str, nn.Parameter],
    limit: int | None,
    reduction: _dist.Reduction | None,
) -> Fisher:
    """Run the lockstep estimate over an FSDP2 model (see the module doc)."""
    from .estimate import _batches, _factor, accumulate_fast

    if reduction is None:  # distributed=False, or a group of one rank
        if opts.distributed is False or not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "the model's parameters are FSDP-sharded (DTensors): every rank of the process "
                "group must take part in the estimate; do not pass distributed=False"
            )
        group = opts.group
        reduction = _dist.Reduction(group, dist.get_rank(group), dist.get_world_size(group))
    device = local(next(iter(trainable.values()))).device
    shards = sharded_names(trainable)
    acc = {
        n: torch.zeros(
            local(trainable[n]).shape, dtype=acc_dtype(trainable[n].dtype), device=device
        )
        for n in shards
    }
    plain = {
        n: torch.zeros(p.shape, dtype=acc_dtype(p.dtype), device=p.device)
        for n, p in trainable.items()
        if n not in acc
    }
    router = ShardRouter(model, trainable, opts)
    throwaway = opts.replace(generator=None)
    batches = iter(_batches(data, opts, limit, device))
    seen, failure = 0, None
    spare: tuple[int, Any, Tensor | None, int] | None = None  # a batch to repeat, uncounted
    tag = _next_tag()
    while True:
        item = None
        if failure is None:
            try:
                item = next(batches, None)
            except Exception as e:  # noqa: BLE001 - reported to every rank by agree()
                failure = e
        try:
            if reduction.agree(failure, active=item is not None, device=device) == 0:
                break
            real = item is not None
            spare = item if real else spare
            lacking = _flags(reduction, spare is None, device)
            if any(lacking):  # a rank has read nothing yet: lend it the first reader's batch
                src = lacking.index(0)
                lent = _broadcast(spare if reduction.rank == src else None, src, reduction, device)
                spare = spare if spare is not None else lent
            assert spare is not None
            idx, inputs, targets, size = item if real else spare
            _probe_together(router, reduction, (idx, inputs, targets, size), device)
            route, z, records = router.forward(inputs, size)
            s = None
            try:
                if real:
                    s = _factor(z, targets, size, idx, opts)
                else:  # the labels of a repeated batch are drawn apart from the user's generator
                    gen = torch.Generator(device=z.device).manual_seed(0)
                    s = _factor(z, targets, size, idx, throwaway.replace(generator=gen))
            except Exception as e:  # noqa: BLE001 - reported to every rank by agree()
                failure = e
            reduction.agree(failure, device=device)  # before any backward pass
            assert s is not None
            sink = ShardSums(trainable, route, acc, plain, keep=real)
            accumulate_fast(route, records, z, s.to(z.dtype), sink)
            del records, z
            sink.close()
        except _dist.RankFailure:
            raise
        except Exception as e:  # inside FSDP's passes: the ranks' collectives are out of step
            raise _stranded(reduction, tag, e) from e
        seen += size if real else 0
    _reshard(model)
    seen = reduction.all_reduce(plain, seen)
    if seen == 0:
        raise ValueError("data yielded no samples: the Fisher needs at least one data point")
    out: dict[str, Tensor] = {}
    for n, p in trainable.items():
        dtype = opts.dtype or p.dtype
        out[n] = like((acc[n] / seen).to(dtype), p) if n in acc else (plain[n] / seen).to(dtype)
    bad = [n for n, v in out.items() if not bool(torch.isfinite(local(v)).all())]
    if any(_flags(reduction, bool(bad), device)):
        raise ValueError(
            "the Fisher has non-finite entries"
            + (f" ({bad[:3]} on this rank)" if bad else " (on another rank)")
            + "; check the data and the model's outputs"
        )
    return Fisher(out, n_samples=seen, kind=opts.kind)


# --- A failure inside FSDP's passes ------------------------------------------------------------
_TAGS = itertools.count()
_WAIT_S = 5.0  # how long a rank whose collective broke waits for the failing rank's report
_BROKEN = ("Connection closed", "Connection reset", "gloo", "NCCL", "timed out", "Timeout")


def _next_tag() -> int:
    """Return this FSDP estimate's number (the same on every rank: estimates run in lockstep)."""
    return next(_TAGS)


def _store() -> Any:
    try:
        return dist.distributed_c10d._get_default_store()  # noqa: SLF001 - no public accessor
    except (AttributeError, RuntimeError, ValueError):
        return None


def _stranded(reduction: _dist.Reduction, tag: int, error: BaseException) -> BaseException:
    """Return the error to raise for a failure inside a forward or backward pass under FSDP.

    FSDP's all-gathers and reduce-scatters run inside the passes, so a rank whose pass raised
    has left the others waiting in a collective that no status round can reach. That rank
    posts ``(rank, error)`` to the process group's store (the first post wins) and raises at
    once, issuing no further collective; the other ranks' collective fails when its process
    exits (a script's uncaught error), and each of them reads the post and raises the same
    :class:`~ewc.distributed.RankFailure`. A rank that finds no post within a few seconds
    reports its own error. The process group is out of step afterwards: end the job.
    """
    store = _store()
    key = f"ewc/fsdp/{tag}/failure"
    cause = _dist._describe(error)
    broken = any(b in str(error) for b in _BROKEN)  # most likely another rank's failure
    if broken:
        cause = (
            "its collective broke, most likely because another rank failed inside a pass and "
            f"exited (no report of it could be read from the store): {cause}"
        )
    mine = json.dumps({"rank": reduction.rank, "cause": cause})
    posted: bytes | str = mine
    if store is not None:
        if broken:
            try:
                store.wait([key], datetime.timedelta(seconds=_WAIT_S))
            except Exception:  # noqa: BLE001 - no post in time: this rank's own error
                pass
        try:
            posted = store.compare_set(key, "", mine) or mine
        except Exception:  # noqa: BLE001 - the store went with the failing rank's process
            posted = mine
    first = json.loads(posted)
    return _dist.RankFailure([int(first["rank"])], [str(first["cause"])], reduction.world_size)


def _probe_together(
    router: ShardRouter,
    reduction: _dist.Reduction,
    item: tuple[int, Any, Tensor | None, int],
    device: torch.device,
) -> None:
    """Probe, on every rank, each rank's batch whose signature has no verified route yet."""
    _, inputs, _, size = item
    for _ in range(_MAX_PROBE_ROUNDS):
        key = route_key(router.layout(inputs, size), inputs, size)
        needs = _flags(reduction, key not in router.routes, device)
        if not any(needs):
            return
        for src, need in enumerate(needs):
            if need:
                _, b_inputs, _, b_size = _broadcast(
                    item if reduction.rank == src else None, src, reduction, device
                )
                try:  # the same probe, passes and decisions on all
                    router.forward(b_inputs, b_size)
                except Exception as e:
                    raise RuntimeError(f"probing rank {src}'s batch: {_dist._describe(e)}") from e
    raise RuntimeError("the ranks could not agree on the routes of their batches under FSDP")


# --- The penalty -----------------------------------------------------------------------------
def penalty(
    quadratic: Any,
    lam: float,
    offset: float,
    ps: list[Tensor],
    precs: list[Tensor],
    anchors: list[Tensor],
) -> Tensor:
    r"""``(λ/2) [Σ_i A_i (θ_i − μ_i)² + c]`` over sharded and plain parameters, on every rank.

    ``quadratic(lam, offset, precs, anchors, *params)`` is the one-process penalty. Each rank
    applies it to its shards (``to_local()``, so the gradient lands in its gradient shard);
    :class:`AllSum` adds the parts over each mesh's shard groups; plain parameters (outside
    FSDP units, the same on every rank) and the constant ``c`` are added once, after the sum.
    """
    out: Tensor | None = None
    by_mesh: dict[int, list[int]] = {}
    for i, p in enumerate(ps):
        if is_sharded(p):
            by_mesh.setdefault(id(p.device_mesh), []).append(i)  # type: ignore[attr-defined]
    for idx in by_mesh.values():
        part = quadratic(
            lam,
            0.0,
            [local(precs[i]) for i in idx],
            [local(anchors[i]) for i in idx],
            *[local(ps[i]) for i in idx],
        )
        part = AllSum.apply(part, tuple(shard_groups(ps[idx[0]])))
        out = part if out is None else out + part
    rest = [i for i, p in enumerate(ps) if not is_sharded(p)]
    assert out is not None
    if not rest:
        return out + 0.5 * lam * offset
    plain = quadratic(
        lam, offset, [precs[i] for i in rest], [anchors[i] for i in rest], *[ps[i] for i in rest]
    )
    return out + plain.to(out.device)
