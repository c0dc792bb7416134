r"""``torch.distributed`` support: sharded Fisher estimates, sampler padding and wrapped models.

The Fisher is a per-sample mean, so a data set split into shards ``D_1, …, D_R`` (one per rank)
gives the Fisher of the union from the per-rank **sums** and **counts**:

.. math::

    F_i = \frac{\sum_r S_{r,i}}{\sum_r N_r},
    \qquad S_{r,i} = \sum_{n \in D_r}
        \mathbb{E}_y\big[(\partial_{\theta_i} \log p(y \mid x_n, \theta))^2\big],
    \qquad N_r = |D_r| .

Each rank accumulates ``S_r`` and ``N_r`` over its own shard; one all-reduce (SUM) of the sums
and one of the count give every rank the same ``Σ_r S_r`` and ``Σ_r N_r``, hence the same
``F``, equal to the single-process estimate over ``∪_r D_r`` for any shard sizes (up to the
order of floating-point additions). Averaging the per-rank *means* instead would weight the
samples of small shards more.

:class:`~torch.utils.data.distributed.DistributedSampler` with ``drop_last=False`` pads a data
set of ``L`` indices to ``total_size = W ⌈L / W⌉`` by repeating its first indices
(``indices += indices[:total_size - L]``) and gives rank ``r`` the positions
``r, r + W, r + 2W, …``. The padded positions are ``≥ L``, so on every rank they come last, and
rank ``r`` holds ``|{k ≥ 0 : r + kW < L}| = ⌈(L − r) / W⌉`` real samples (0 when ``r ≥ L``);
counting only those counts every sample of the data set exactly once.

**Failing cleanly.** A rank that fails (bad labels, a non-finite loss, a loader that raises)
must not leave the others blocked in a collective until the process group's timeout. Every
collective ``ewc`` issues is preceded by a status all-reduce (:meth:`Reduction.agree`), one per
batch: each rank says whether it is still reading data and whether it has failed; if any has,
every rank raises the same :class:`RankFailure`, naming the failing rank and its error, within
one batch's time. Ranks whose shard is exhausted keep answering the status rounds until every
rank is done, so uneven shards need no other coordination.

Models wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` or
:class:`~torch.nn.DataParallel` are unwrapped to their ``.module``: the per-sample passes must
not run through the wrapper (its forward prepares a gradient all-reduce), and parameter names
are the inner module's, without the ``"module."`` prefix. ``torch.compile``'s wrapper is
unwrapped the same way (its ``"_orig_mod."`` prefix dropped; the passes run eagerly).
"""

from __future__ import annotations

import sys
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data.distributed import DistributedSampler

__all__ = [
    "RankFailure",
    "Reduction",
    "run_steps",
    "resolve",
    "unwrap",
    "local_limit",
    "real_samples",
    "find_sampler",
    "MappedBatches",
]

_WRAPPERS: tuple[type[nn.Module], ...] = (
    nn.parallel.DistributedDataParallel,
    nn.parallel.DataParallel,
)


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside (possibly nested) DDP, ``DataParallel`` and ``torch.compile``.

    ``torch.compile(model)`` returns a wrapper whose parameter names carry an ``"_orig_mod."``
    prefix: unwrapped, a compiled model's Fisher and EWC state have the names of the model
    itself, so they load into it and into its compiled form alike. Any other module is returned
    unchanged; one holding FSDP1 (``FullyShardedDataParallel``) modules is refused
    (``ValueError``).
    """
    compiled = _compiled_type()
    while True:
        if isinstance(model, _WRAPPERS):
            model = model.module
        elif compiled is not None and isinstance(model, compiled):
            model = model._orig_mod
        else:
            break
    _refuse_flat(model)
    return model


def _compiled_type() -> type | None:
    """``torch.compile``'s module wrapper, if dynamo is loaded (no wrapper exists otherwise)."""
    frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(frame, "OptimizedModule", None)


def _refuse_flat(model: nn.Module) -> None:
    """Refuse FSDP1 (``FullyShardedDataParallel``): its flat parameters hide the layers'.

    Looks the class up in ``sys.modules`` instead of importing it: a model cannot hold FSDP1
    modules unless ``torch.distributed.fsdp`` was imported, and importing it has a side effect
    on a live process group (with torch 2.13 the default gloo group then outlives
    ``destroy_process_group`` to interpreter exit, where a collective's last reference dropped
    by a gloo worker thread during finalisation aborts the process, at random).
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    FullyShardedDataParallel = getattr(fsdp, "FullyShardedDataParallel", None)
    if FullyShardedDataParallel is None:
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "the model is wrapped in FullyShardedDataParallel (FSDP1), whose flat parameters "
            "hide the layers' own; shard it with torch.distributed.fsdp.fully_shard (FSDP2: "
            "DTensor parameters, which ewc supports) instead"
        )


_MESSAGE_BYTES = 400  # of each failing rank's error, sent as UTF-8 in a uint8 tensor


class RankFailure(RuntimeError):
    """Raised on every rank when one or more ranks failed during a distributed ``ewc`` call.

    Attributes:
        ranks: The failing ranks (in the reduction's group), in order.
        causes: Each failing rank's error, as ``"ExceptionType: message"`` (truncated).
    """

    def __init__(self, ranks: list[int], causes: list[str], world_size: int) -> None:
        self.ranks, self.causes = ranks, causes
        first = f"rank {ranks[0]} of {world_size} failed: {causes[0]}"
        pairs = zip(ranks[1:], causes[1:], strict=True)
        more = "".join(f"; rank {r} failed: {c}" for r, c in pairs)
        super().__init__(first + more + " (every rank of the group stops here)")


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    raw = text.encode("utf-8")[:_MESSAGE_BYTES]
    return raw.decode("utf-8", errors="ignore")


@dataclass(frozen=True)
class Reduction:
    """A process group to sum Fisher accumulators over (this rank's place in it).

    Attributes:
        group: The process group (``None``: the default, world group).
        rank: This process's rank in ``group``.
        world_size: Number of ranks in ``group``.
    """

    group: Any
    rank: int
    world_size: int

    def all_reduce(self, sums: dict[str, Tensor], count: int) -> int:
        """Sum ``sums`` (in place) and ``count`` over the group; return the total count.

        Tensors are flattened into one buffer per ``(device, dtype)`` so each bucket costs one
        collective; the count is reduced as ``int64`` (exact for any data set size) on the
        device of the accumulators (NCCL needs device tensors). Every rank must pass tensors of
        the same names, shapes and dtypes, in the same order: the first collective carries a
        checksum of that layout from each rank, and a mismatch raises on every rank (a
        mismatched sum could otherwise hang, or add unrelated numbers of equal total size).

        Raises:
            ValueError: on every rank, if the ranks' ``sums`` differ in layout.
        """
        buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        for t in sums.values():
            buckets[(t.device, t.dtype)].append(t)
        device = next(iter(sums.values())).device if sums else _collective_device(self.group)
        layout = "|".join(f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in sums.items())
        head = torch.zeros(self.world_size + 1, dtype=torch.int64, device=device)
        head[0] = count
        head[1 + self.rank] = zlib.crc32(layout.encode("utf-8"))
        dist.all_reduce(head, op=dist.ReduceOp.SUM, group=self.group)
        checks = head[1:].tolist()
        if len(set(checks)) > 1:
            odd = [r for r, c in enumerate(checks) if c != checks[0]]
            raise ValueError(
                f"the ranks' accumulators differ (ranks {odd} against rank 0: names, shapes or "
                "dtypes): every rank must estimate over the same parameters and layers"
            )
        total = head[:1]
        for tensors in buckets.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        return int(total.item())

    def agree(
        self,
        failure: BaseException | None,
        active: bool = True,
        device: torch.device | None = None,
    ) -> int:
        """Status round: return how many ranks are ``active``; raise if any rank failed.

        One all-reduce of ``W + 1`` integers (the active count and one failure flag per rank);
        only when a flag is set, a second one carries each failing rank's error message (UTF-8
        bytes, no pickling). Every rank of the group must call it the same number of times.

        Raises:
            RankFailure: on every rank, if any rank passed a ``failure`` (on that rank chained
                to its own exception).
        """
        device = device or _collective_device(self.group)
        status = torch.zeros(self.world_size + 1, dtype=torch.int64, device=device)
        status[0] = int(active)
        status[1 + self.rank] = int(failure is not None)
        dist.all_reduce(status, op=dist.ReduceOp.SUM, group=self.group)
        flags = status[1:].tolist()
        if not any(flags):
            return int(status[0])
        text = torch.zeros(self.world_size, _MESSAGE_BYTES, dtype=torch.uint8, device=device)
        if failure is not None:
            raw = _describe(failure).encode("utf-8")
            text[self.rank, : len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        dist.all_reduce(text, op=dist.ReduceOp.SUM, group=self.group)
        ranks = [r for r, f in enumerate(flags) if f]
        causes = [bytes(text[r].tolist()).rstrip(b"\0").decode("utf-8", "ignore") for r in ranks]
        raise RankFailure(ranks, causes, self.world_size) from failure


def _collective_device(group: Any) -> torch.device:
    """Return a device the group's backend reduces on: the current CUDA device for NCCL."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run_steps(
    items: Iterable[Any],
    reduction: Reduction | None,
    step: Callable[[Any], None],
    device: torch.device | None = None,
) -> None:
    """Call ``step(item)`` for each item, every rank agreeing before each one that all are well.

    Without a reduction this is a plain loop. With one, each round starts with
    :meth:`Reduction.agree`: a rank's error while reading an item or in ``step`` is reported at
    the next round, where every rank raises the same :class:`RankFailure`; a rank out of items
    keeps joining the rounds (inactive) until no rank is active.
    """
    if reduction is None:
        for item in items:
            step(item)
        return
    iterator = iter(items)
    failure: BaseException | None = None
    while True:
        item = None
        if failure is None:
            try:
                item = next(iterator, None)
            except Exception as e:  # noqa: BLE001 - reported to every rank by agree()
                failure = e
        if reduction.agree(failure, active=item is not None, device=device) == 0:
            return
        if item is not None:
            try:
                step(item)
            except Exception as e:  # noqa: BLE001 - reported to every rank by agree()
                failure = e


def resolve(distributed: bool | None, group: Any = None) -> Reduction | None:
    """Decide whether to all-reduce, from ``fisher_diagonal``'s ``distributed`` argument.

    ``None`` (auto): reduce when a process group is initialised and ``group`` has more than one
    rank. ``True``: reduce (a process group must be initialised). ``False``: never.

    Raises:
        ValueError: for ``distributed=True`` without an initialised process group, or a
            ``distributed`` that is not a bool or ``None``.
    """
    if distributed is False:
        return None
    if distributed is not None and distributed is not True:
        raise ValueError(f"distributed must be True, False or None, got {distributed!r}")
    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise ValueError(
                "distributed=True needs an initialised process group "
                "(torch.distributed.init_process_group)"
            )
        return None
    world_size = dist.get_world_size(group)
    if world_size <= 1 and not distributed:
        return None
    return Reduction(group=group, rank=dist.get_rank(group), world_size=world_size)


def find_sampler(data: Iterable[Any]) -> DistributedSampler[Any] | None:
    """Return the ``DistributedSampler`` a ``DataLoader`` draws from, or ``None``.

    Looks at ``data.sampler`` and then at ``data.batch_sampler.sampler`` (a ``DataLoader``
    built with ``batch_sampler=BatchSampler(DistributedSampler(...), ...)``).
    """
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        return sampler
    sampler = getattr(getattr(data, "batch_sampler", None), "sampler", None)
    return sampler if isinstance(sampler, DistributedSampler) else None


class MappedBatches:
    """``data`` with ``fn`` applied to each batch; every other attribute is ``data``'s.

    For adapting a loader's batches to the ``(inputs, targets)`` form of
    :func:`ewc.fisher_diagonal` without hiding the loader: :func:`find_sampler` still sees its
    ``sampler`` (and so the padding of a ``DistributedSampler``).
    """

    def __init__(self, data: Iterable[Any], fn: Callable[[Any], Any]) -> None:
        self._data = data
        self._fn = fn

    def __iter__(self) -> Iterator[Any]:
        return (self._fn(batch) for batch in self._data)

    def __len__(self) -> int:
        return len(self._data)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_data", "_fn"):
            raise AttributeError(name)
        return getattr(self._data, name)


def _share(total: int, rank: int, world_size: int) -> int:
    """``|{k ≥ 0 : rank + k·world_size < total}|``: rank's part of ``total`` dealt round-robin."""
    return max(0, -(-(total - rank) // world_size))


def real_samples(sampler: DistributedSampler[Any]) -> int:
    """Count this rank's ``sampler`` indices that are not padding (see the module doc).

    ``⌈(L − r) / W⌉`` with ``L = len(sampler.dataset)``, ``r = sampler.rank`` and
    ``W = sampler.num_replicas``, at most ``len(sampler)``; with ``drop_last=True`` there is no
    padding and all ``len(sampler)`` indices are real.
    """
    if sampler.drop_last:
        return int(sampler.num_samples)
    size = len(sampler.dataset)  # type: ignore[arg-type]
    return min(int(sampler.num_samples), _share(size, sampler.rank, sampler.num_replicas))


def local_limit(
    data: Iterable[Any], n_samples: int | None, reduction: Reduction | None
) -> int | None:
    """Return this rank's cap on the samples it reads from ``data`` (``None``: no cap).

    * Without a reduction, ``n_samples`` is this process's cap, as in a single process.
    * With one, ``n_samples`` is the cap on the **total** over the ranks: rank ``r`` of ``W``
      takes ``⌈(n_samples − r) / W⌉`` of it (the round-robin share, so the shares add up to
      ``n_samples``). A rank whose shard is smaller than its share does not pass the rest on,
      so uneven shards can give fewer than ``n_samples`` in total.
    * If ``data`` is a ``DataLoader`` over a ``DistributedSampler``, the cap is at most the
      number of real (non-padded) samples of this rank (the sampler's rank and
      ``num_replicas`` must be the group's): the ranks together then read exactly the first
      ``min(n_samples, len(dataset))`` indices of the sampler's global order (the data set's
      first samples with ``shuffle=False``).

    Raises:
        ValueError: if the sampler's replicas or rank differ from the process group's, or if
            this rank holds padding but the loader does not yield batches in sampler order
            (``in_order=False`` with worker processes).
    """
    sampler = find_sampler(data)
    if sampler is None:
        if reduction is None or n_samples is None:
            return n_samples
        return _share(n_samples, reduction.rank, reduction.world_size)
    if reduction is not None and (sampler.num_replicas, sampler.rank) != (
        reduction.world_size,
        reduction.rank,
    ):
        raise ValueError(
            f"the DistributedSampler has num_replicas={sampler.num_replicas}, rank="
            f"{sampler.rank} but this process is rank {reduction.rank} of "
            f"{reduction.world_size} in the process group"
        )
    real = real_samples(sampler)
    in_order = getattr(data, "in_order", True) or getattr(data, "num_workers", 0) == 0
    if real < len(sampler) and not in_order:
        raise ValueError(
            "the DataLoader has in_order=False: its batches may not come in sampler order, "
            "so the DistributedSampler's padding cannot be told apart; use in_order=True"
        )
    if n_samples is None:
        return real
    if reduction is not None:
        n_samples = _share(n_samples, reduction.rank, reduction.world_size)
    return min(real, n_samples)
