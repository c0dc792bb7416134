r"""``fisher_diagonal``: the diagonal Fisher information of a model over a data set.

.. math::

    F_i = \frac{1}{N} \sum_{n=1}^{N} \sum_{k} \big(J_n^\top s_{nk}\big)_i^2,
    \qquad J_n = \partial z_n / \partial \theta,

where ``z_n`` is the model output for sample ``n`` and ``s_nk`` the columns of the likelihood's
output-space factor (:mod:`ewc.likelihoods`). For ``kind="sampled"`` and ``"empirical"`` there is
one column, the gradient ``∇_z log p(y_n | z_n)`` for a label drawn from the model or taken from
the data; for ``kind="exact"`` the columns factor the output-space Fisher exactly, so the result
is ``(1/N) Σ_n E_{y~p(·|x_n)}[(∂ log p(y|x_n)/∂θ)²]``.

How it is computed, in three parts:

* the **route** (:mod:`ewc._probe`, :mod:`ewc._route`, :mod:`ewc._verify`): which layers take a
  closed form, decided once per input signature and checked against autograd on a sub-batch
  before it is trusted;
* the **per-batch math** (:func:`accumulate_fast` here, the rules of :mod:`ewc._rules`, the
  generic paths of :mod:`ewc._generic`): one forward pass with hooks on the fast layers, one
  backward pass per factor column from the outputs to those layers' outputs (``C − 1`` for the
  exact softmax Fisher), the closed-form sums of squared per-sample gradients per layer, and
  exact per-sample gradients for every other parameter;
* the **loop** (:func:`_estimate`): moves batches, counts samples and reduces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import _fsdp
from . import distributed as _dist
from ._batches import batch_size, split_batch, take, to_device
from ._capture import Record
from ._columns import DiagonalSums, Sink, column_grads, live_layers
from ._options import FisherOptions, OutputFn, acc_dtype
from ._probe import Router
from ._route import Route
from ._select import ParamSelector, select_params
from .fisher import Fisher
from .likelihoods import Likelihood

__all__ = ["fisher_diagonal", "fisher_route", "accumulate_fast"]


# --- The per-batch math ------------------------------------------------------------------
def accumulate_fast(
    route: Route,
    records: Mapping[str, Record],
    z: Tensor,
    s: Tensor,
    sums: dict[str, Tensor] | Sink,
) -> None:
    """Back-propagate the columns of ``s`` to the fast layers and add their closed forms.

    One backward pass per column (only to the layers' outputs: no weight gradients), the rules
    applied column by column so only one column's gradients are held at a time
    (:func:`ewc._columns.column_grads`, :class:`ewc._columns.DiagonalSums`). Layers whose
    rule only needs ``Σ_k g_k²`` (Linear on 2-D inputs) accumulate that and do one matmul.
    Layer outputs that do not require gradients (a layer called under ``torch.no_grad()``)
    contribute zero. Squares are formed in the accumulators' dtype (float32 or wider).
    """
    live = live_layers(route, records, z)
    if not live:
        return
    diag = DiagonalSums(route, records, z, sums, live)
    for grads in column_grads(route, records, z, s, live):
        diag.column(grads)
    diag.finish()


# --- The public entry --------------------------------------------------------------------
def fisher_diagonal(
    model: nn.Module,
    data: Iterable[Any],
    *,
    kind: str = "sampled",
    n_samples: int | None = None,
    likelihood: str | Likelihood | Callable[[Tensor, Tensor], Tensor] = "classification",
    progress: bool = False,
    generator: torch.Generator | None = None,
    mc_samples: int = 1,
    distributed: bool | None = None,
    group: Any = None,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    output_fn: OutputFn | None = None,
) -> Fisher:
    r"""Estimate the diagonal Fisher information of ``model`` over ``data``.

    The result is the per-sample **mean**

    .. math::

        F_i = \frac{1}{N} \sum_{n=1}^N \mathbb{E}_{y}\Big[\Big(
        \frac{\partial \log p(y \mid x_n, \theta)}{\partial \theta_i}\Big)^2\Big],

    computed from per-sample gradients (never the square of a mini-batch mean), so it does not
    depend on the loader's batch size. EWC's penalty is ``(λ/2) Σ_i F_i (θ_i − θ*_i)²`` with this
    ``F``. To convert λ: Avalanche squares mini-batch-mean gradients and omits the ½
    (``λ_ours ≈ 2 λ_avalanche / batch_size``); laplace-torch's diagonal Fisher is a sum over the
    N samples (``λ_ours = N`` gives its posterior precision); see the README.

    Args:
        model: Any ``nn.Module`` mapping a batch of inputs ``(N, ...)`` to outputs ``(N, ...)``
            that treats samples independently (in eval mode). Only parameters with
            ``requires_grad=True`` are included. A ``DistributedDataParallel`` or
            ``DataParallel`` wrapper is unwrapped: the passes run on its ``.module`` and the
            keys are the inner module's parameter names (no ``"module."`` prefix).
        data: Iterable of ``(inputs, targets)`` batches, e.g. a ``DataLoader``. ``inputs`` may
            be a tensor, a tuple (``model(*inputs)``) or a dict (``model(**inputs)``). For
            ``"sampled"`` and ``"exact"`` the targets are ignored and bare input batches are
            accepted.
        kind: ``"sampled"`` (labels drawn from the model's predictive distribution: the
            paper's Fisher), ``"empirical"`` (the data's labels) or ``"exact"`` (the expectation
            over all labels in closed form, by back-propagating a factor of the output-space
            Fisher).
        n_samples: Use at most this many data points (``None``: all of ``data``). When the
            estimate is all-reduced (``distributed``), this is the total over the ranks: rank
            ``r`` of ``W`` reads at most ``⌈(n_samples − r) / W⌉`` of its own data (see
            :func:`ewc.distributed.local_limit`).
        likelihood: ``"classification"`` (softmax cross-entropy over the last output
            dimension), ``"regression"`` (Gaussian, σ = 1; pass ``ewc.Gaussian(sigma)`` for
            another σ), or a callable ``nll(outputs, targets) -> (N,)`` per-sample negative
            log-likelihood (``"empirical"`` only).
        progress: Show a tqdm progress bar.
        generator: Random generator for ``"sampled"`` labels (reproducible draws).
        mc_samples: Labels drawn per input for ``"sampled"``; the estimate averages over them.
        distributed: Under ``torch.distributed``, each rank passes its own shard as ``data``;
            the per-parameter sums of squared per-sample gradients and the sample counts are
            all-reduced (SUM), and ``F = Σ_r S_r / Σ_r N_r`` is the single-process Fisher over
            the union of the shards (of any sizes), the same on every rank; every rank of the
            group must call this function. ``None`` (default): do so when a process group is
            initialised and has more than one rank; ``True``: require it; ``False``: this
            process's data only, no communication. Whether or not it reduces, the indices a
            ``DistributedSampler`` pads in (``drop_last=False``) are never counted when
            ``data`` is a ``DataLoader`` over one.
        group: The process group to reduce over (``None``: the default group).
        params: Which trainable parameters to cover: ``None`` (all), a name or :mod:`fnmatch`
            pattern (``"*.lora_*"``), a list of them, or a predicate ``(name, param) -> bool``.
            Frozen parameters (``requires_grad=False``) are never included; a pattern that
            matches no trainable parameter is an error. Layers with nothing selected cost no
            extra work.
        dtype: Storage dtype of the returned tensors (default: each parameter's dtype), e.g.
            ``torch.bfloat16`` to halve the memory of a large model's Fisher. Sums are always
            accumulated in float32 or wider; only the final mean is cast. (float16 flushes
            entries below about 6e-8 to zero; bfloat16 keeps float32's range.)
        output_fn: Maps whatever the model returns to the output tensor ``(N, ..., C)`` the
            likelihood reads, e.g. ``lambda out: out.logits`` for a Hugging Face model, or
            ``lambda out: out[:, :-1]`` to drop positions. Applied in every pass.

    Returns:
        A :class:`~ewc.Fisher` with one tensor per selected trainable parameter, keyed by
        name, each of its parameter's shape and of its dtype (or ``dtype``).

    Memory: the data are streamed batch by batch; besides the model and one batch's
    activations and backward pass, the estimate holds one float32 (or float64) accumulator per
    selected parameter, so memory does not grow with the size of ``data``.

    Raises:
        ValueError: on empty data, non-finite outputs or Fisher, labels out of range, a model
            with no trainable parameters, an invalid option, or a model whose outputs for a
            sample depend on the other samples of its batch (a per-sample Fisher is not
            defined for it).

    How the fast path is kept right: for each new input signature (the inputs' structure,
    dtypes and ranks, and which inputs are per sample) the estimator probes a sub-batch of two
    samples before accumulating anything. It compares the sub-batch's outputs with the
    batch's (which inputs are shared, whether samples are independent), back-propagates a
    random cotangent of one sample at a time, and requires every closed form to match
    ``torch.autograd.grad`` (the squared gradient of that one sample) and every layer's output
    gradient to vanish in the other samples' rows. What fails takes the exact generic path;
    :func:`fisher_route` shows the outcome per layer. Squares are formed in float32 or wider
    whatever the model's dtype; layers called under ``torch.no_grad()`` contribute zero.

    The model's train/eval mode of every submodule, its parameters, buffers and any existing
    ``.grad`` are left as they were.
    """
    opts = FisherOptions(
        kind=kind,
        likelihood=likelihood,
        n_samples=n_samples,
        mc_samples=mc_samples,
        params=params,
        dtype=dtype,
        output_fn=output_fn,
        generator=generator,
        progress=progress,
        distributed=distributed,
        group=group,
    )
    return estimate(model, data, opts)


class Setup(NamedTuple):
    """What every estimator's entry resolves once: the unwrapped model and its data budget."""

    model: nn.Module
    trainable: dict[str, nn.Parameter]
    limit: int | None
    reduction: _dist.Reduction | None


@contextmanager
def prepared(model: nn.Module, data: Iterable[Any], opts: FisherOptions) -> Iterator[Setup]:
    """Resolve what every estimator needs once, and run the body in eval mode.

    Unwraps ``model``, resolves the reduction, the local sample limit and the parameters;
    every submodule's train/eval mode is restored afterwards. The shared entry of
    :func:`estimate`, the KFAC estimator and MAS.
    """
    model = _dist.unwrap(model)
    reduction = _dist.resolve(opts.distributed, opts.group)
    limit = _dist.local_limit(data, opts.n_samples, reduction)
    trainable = select_params(model, opts.params)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield Setup(model, trainable, limit, reduction)
    finally:
        for m, mode in modes.items():
            m.training = mode


def estimate(model: nn.Module, data: Iterable[Any], opts: FisherOptions) -> Fisher:
    """:func:`fisher_diagonal` with its options as one validated object."""
    with prepared(model, data, opts) as (model, trainable, limit, reduction):
        if _fsdp.sharded_names(trainable):  # FSDP2: a lockstep loop into DTensor shards
            return _fsdp.estimate(model, data, opts, trainable, limit, reduction)
        return _estimate(model, data, opts, trainable, limit, reduction)


def _batches(
    data: Iterable[Any], opts: FisherOptions, limit: int | None, device: torch.device
) -> Iterator[tuple[int, Any, Tensor | None, int]]:
    """Yield ``(index, inputs, targets, size)``, cut to ``limit`` samples, on ``device``."""
    iterator: Iterable[Any] = data if limit != 0 else ()  # 0: this rank's share is empty
    if opts.progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"Fisher ({opts.kind})", unit="batch")
    seen = 0
    for idx, batch in enumerate(iterator):
        inputs, targets = split_batch(batch, opts.kind == "empirical")
        size = batch_size(inputs)
        if limit is not None and seen + size > limit:
            size = limit - seen
            inputs, targets = take(inputs, size), take(targets, size)
        if size == 0:
            continue
        targets = to_device(targets, device) if targets is not None else None
        yield idx, to_device(inputs, device), targets, size
        seen += size
        if limit is not None and seen >= limit:
            return


def _estimate(
    model: nn.Module,
    data: Iterable[Any],
    opts: FisherOptions,
    trainable: dict[str, nn.Parameter],
    limit: int | None,
    reduction: _dist.Reduction | None,
) -> Fisher:
    device = next(iter(trainable.values())).device
    sums = {
        n: torch.zeros(p.shape, dtype=acc_dtype(p.dtype), device=p.device)
        for n, p in trainable.items()
    }
    router = Router(model, trainable, opts)
    seen = 0

    def step(item: tuple[int, Any, Tensor | None, int]) -> None:
        nonlocal seen
        idx, inputs, targets, size = item
        route, z, records = router.forward(inputs, size)
        s = _factor(z, targets, size, idx, opts)
        z_dtype = z.dtype
        accumulate_fast(route, records, z, s.to(z_dtype), sums)
        del records, z
        if route.rest:
            for n, val in router.generic_squares(route, inputs, s.to(z_dtype)).items():
                sums[n] += val.to(sums[n].dtype)
        seen += size

    # under a reduction, every batch starts with a status round: a failing rank stops all
    _dist.run_steps(_batches(data, opts, limit, device), reduction, step, device)
    if reduction is not None:  # Σ_r S_r and Σ_r N_r: the Fisher of the union of the shards
        seen = reduction.all_reduce(sums, seen)
    if seen == 0:
        raise ValueError("data yielded no samples: the Fisher needs at least one data point")
    fisher = Fisher(
        {n: (v / seen).to(opts.dtype or trainable[n].dtype) for n, v in sums.items()},
        n_samples=seen,
        kind=opts.kind,
    )
    fisher.validate()
    return fisher


def _factor(z: Tensor, targets: Tensor | None, size: int, idx: int, opts: FisherOptions) -> Tensor:
    """Check the outputs and targets of batch ``idx``; return the likelihood's factor columns.

    The factor is formed from the outputs in float32 or wider (a half-precision softmax loses
    the small probabilities) and cast to the outputs' dtype by the caller for the backward pass.
    """
    if z.shape[:1] != (size,):
        raise ValueError(
            f"model output has shape {tuple(z.shape)}, expected a leading batch dimension of {size}"
        )
    if not bool(torch.isfinite(z).all()):
        raise ValueError(
            f"the model produced non-finite outputs on batch {idx}; the loss is not finite "
            "(check the inputs and the weights)"
        )
    lik = opts.lik
    lik.check(z, targets, opts.kind)
    zd = z.detach().to(acc_dtype(z.dtype))
    return lik.factor(zd, targets, opts.kind, mc_samples=opts.mc_samples, generator=opts.generator)


def fisher_route(
    model: nn.Module,
    inputs: Any,
    *,
    params: ParamSelector = None,
    output_fn: OutputFn | None = None,
) -> Route:
    """Show which path each layer of ``model`` takes for inputs like ``inputs``, and why.

    Runs the estimator's probe on one batch of model inputs (a tensor, a tuple or a dict, as
    the model takes them; nothing is accumulated) and returns the verified route;
    ``print(route)`` gives one line per layer: its closed form, or the generic path and the
    reason (a check against autograd that failed, a layer called twice, a shared parameter).
    """
    model = _dist.unwrap(model)
    opts = FisherOptions(params=params, output_fn=output_fn)
    trainable = select_params(model, params)
    if _fsdp.sharded_names(trainable):
        raise ValueError(
            "fisher_route runs the probe on one process: call it on the model before "
            "fully_shard (or on an unsharded copy); the route is the same"
        )
    device = next(iter(trainable.values())).device
    inputs = to_device(inputs, device)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        route, _, _ = Router(model, trainable, opts, memo=False).forward(inputs, batch_size(inputs))
    finally:
        for m, mode in modes.items():
            m.training = mode
    return route
