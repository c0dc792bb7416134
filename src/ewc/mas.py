r"""MAS, memory aware synapses (Aljundi et al., 2018): importance from the outputs' sensitivity.

.. math::

    \Omega_i = \frac{1}{N} \sum_{n=1}^{N}
    \Big| \frac{\partial \, \lVert f(x_n) \rVert_2^2}{\partial \theta_i} \Big|,

per sample as the paper defines it (the absolute value of each sample's gradient, never the
gradient of a batch mean), where ``f(x_n)`` is the model's output for sample ``n`` (the logits of
a classifier; all of it, e.g. every position of a sequence output). No labels are needed.

How it is computed: the Fisher estimator's machinery with another output function and another
per-sample quantity. The gradient of ``‖f(x_n)‖²`` is the model's vector-Jacobian product with
the one column ``s_n = 2 f(x_n)`` (:mod:`ewc.estimate` back-propagates a likelihood's factor
columns the same way), and the sum over samples is of ``|·|`` instead of ``(·)²``. The Fisher's
route (:mod:`ewc._probe`) decides, once per input signature and checked against autograd, which
layers see per-sample rows. Of those, ``nn.Linear`` on ``(N, in)`` inputs takes the closed form
``Σ_n |g_n a_nᵀ| = |g|ᵀ |a|`` (one matmul; ``g`` its output gradient, ``a`` its input); the
other layers (convolutions, embeddings, norms, linear layers over positions, leaf modules) take
the exact per-sample VJPs of the layer alone at its recorded input (:func:`ewc._rules.leaf_vjp`:
``vmap`` over one module, not the model), whose absolute values are summed; a weight tied
between two layers and every parameter without a layer of its own take the exact per-sample
generic path (``torch.func.vmap`` over the whole model, or one backward pass per sample where
``vmap`` cannot trace it). Before a batch layout's first use, this split is itself checked
against autograd on a sub-batch (:func:`ewc._verify.check_sample`: each layer's per-sample
gradients and the generic path's), so a layer whose rows are not samples never takes a layer
path.

The penalty is EWC's merged quadratic (:class:`MAS` below), accumulated over tasks and
anchored at the latest optimum as in the paper.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import _rules
from . import distributed as _dist
from ._batches import batch_size, to_device
from ._capture import Record
from ._options import FisherOptions, OutputFn, acc_dtype
from ._probe import PROBE_SIZE, Router
from ._route import Partition, Route
from ._select import ParamSelector, select_params
from ._verify import check_sample
from .estimate import _batches, prepared
from .fisher import Fisher
from .penalty import EWC

__all__ = ["mas_importance", "mas_route", "MAS"]

KIND = "mas"
_TIED = "its weight is tied to another layer: |L_n + E_n| does not split into the layers' terms"


def mas_importance(
    model: nn.Module,
    data: Iterable[Any],
    *,
    n_samples: int | None = None,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    output_fn: OutputFn | None = None,
    progress: bool = False,
    distributed: bool | None = None,
    group: Any = None,
) -> Fisher:
    r"""Estimate MAS importances ``Ω_i = (1/N) Σ_n |∂‖f(x_n)‖²/∂θ_i|`` of ``model`` over ``data``.

    Args:
        model: Any ``nn.Module`` mapping inputs ``(N, ...)`` to outputs ``(N, ...)`` that treats
            samples independently (in eval mode); a DDP/DataParallel wrapper is unwrapped.
        data: Iterable of batches: bare inputs or ``(inputs, targets)`` (targets are ignored).
            ``inputs`` may be a tensor, a tuple (``model(*inputs)``) or a dict
            (``model(**inputs)``); a batch that is a 2-tuple is always read as
            ``(inputs, targets)``, as by :func:`ewc.fisher_diagonal`.
        n_samples: Use at most this many data points (``None``: all); a total over the ranks
            when ``distributed``.
        params: Which trainable parameters to cover (as in :func:`ewc.fisher_diagonal`).
        dtype: Storage dtype of the result (default: each parameter's); sums are accumulated in
            float32 or wider.
        output_fn: Maps what the model returns to the output tensor ``f(x)`` (e.g.
            ``lambda out: out.logits``).
        progress: Show a tqdm progress bar.
        distributed: Sum the per-parameter sums and sample counts over the ranks (as for the
            Fisher): ``None`` when a process group of more than one rank is initialised.
        group: The process group to reduce over.

    Returns:
        A :class:`~ewc.Fisher` container (``kind="mas"``) with one tensor per selected
        parameter, each of its parameter's shape. It is a per-sample **mean**, so it does not
        depend on the batch size. Hsu et al. (2018) instead take ``|∂/∂θ mean_{n,c} f_c(x_n)²|``
        per batch: a batch mean over samples and the ``C`` outputs, inside the absolute value.

    The model's train/eval modes, parameters, buffers and ``.grad`` are left as they were.
    """
    opts = FisherOptions(
        n_samples=n_samples,
        params=params,
        dtype=dtype,
        output_fn=output_fn,
        distributed=distributed,
        group=group,
    )
    with prepared(model, data, opts) as (model, trainable, limit, reduction):
        if progress:
            from tqdm.auto import tqdm

            data = tqdm(data, desc="MAS importance", unit="batch")
        return _estimate(model, data, opts, trainable, limit, reduction)


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
    checked: dict[tuple[Route, Layers], Route] = {}
    seen = 0

    def step(item: tuple[int, Any, Tensor | None, int]) -> None:
        nonlocal seen
        idx, inputs, _, size = item
        route, z, records = router.forward(inputs, size)
        _check_outputs(z, size, idx)
        s = (2.0 * z.detach().to(acc_dtype(z.dtype))).to(z.dtype)  # ∂‖z_n‖²/∂z_n, one column
        layers = _layer_paths(route, records)
        key = (route, layers)
        if key not in checked:
            checked[key] = _verified(router, route, layers, inputs, size)
        mroute = checked[key]
        _accumulate_layers(mroute, records, z, s, sums)
        del records, z
        if mroute.rest:
            got = router.generic_squares(mroute, inputs, s.unsqueeze(0), quantity="abs")
            for n, val in got.items():
                sums[n] += val.to(sums[n].dtype)
        seen += size

    # under a reduction, every batch starts with a status round: a failing rank stops all
    _dist.run_steps(_batches(data, opts, limit, device), reduction, step, device)
    if reduction is not None:
        seen = reduction.all_reduce(sums, seen)
    if seen == 0:
        raise ValueError("data yielded no samples: MAS importances need at least one data point")
    out = Fisher(
        {n: (v / seen).to(opts.dtype or trainable[n].dtype) for n, v in sums.items()},
        n_samples=seen,
        kind=KIND,
    )
    out.validate()
    return out


def mas_route(
    model: nn.Module,
    inputs: Any,
    *,
    params: ParamSelector = None,
    output_fn: OutputFn | None = None,
) -> Route:
    """Show which path each layer takes in :func:`mas_importance` for inputs like ``inputs``.

    As :func:`ewc.fisher_route`: one batch of model inputs, nothing accumulated; ``print`` the
    verified route for one line per layer (``linear``: the closed form ``|g|ᵀ|a|``;
    ``module-local VJP``; or the generic path and why).
    """
    model = _dist.unwrap(model)
    opts = FisherOptions(params=params, output_fn=output_fn)
    trainable = select_params(model, params)
    inputs = to_device(inputs, next(iter(trainable.values())).device)
    size = batch_size(inputs)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        router = Router(model, trainable, opts)
        route, _, records = router.forward(inputs, size)
        return _verified(router, route, _layer_paths(route, records), inputs, size)
    finally:
        for m, mode in modes.items():
            m.training = mode


def _check_outputs(z: Tensor, size: int, idx: int) -> None:
    if z.shape[:1] != (size,):
        raise ValueError(
            f"model output has shape {tuple(z.shape)}, expected a leading batch dimension of {size}"
        )
    if not bool(torch.isfinite(z).all()):
        raise ValueError(
            f"the model produced non-finite outputs on batch {idx} (check the inputs and weights)"
        )


# --- Which layers take which path -----------------------------------------------------------
Layers = tuple[tuple[str, bool], ...]  # (layer, takes the Linear closed form) per fast layer


def _layer_paths(route: Route, records: Mapping[str, Record]) -> Layers:
    """Return the route's untied fast layers, each with whether it takes ``|g|ᵀ|a|``.

    ``nn.Linear`` on ``(N, in)`` inputs takes the closed form; the others the module-local VJP.
    """
    part = route.partition
    tied = {m for _, lin, emb in part.ties for m in (lin, emb)}
    return tuple(
        (n, part.rules[n].factorised and records[n].x.dim() == 2)
        for n in part.fast
        if n not in tied
    )


def _derive(route: Route, layers: Layers, trainable: Mapping[str, nn.Parameter]) -> Route:
    """``route`` with only ``layers`` fast (the rest generic), each under its MAS rule.

    A closed-form layer keeps its Fisher rule (the per-sample gradient the checks verify is the
    same); the others get the module-local VJP rule, which the checks verify as such.
    """
    part = route.partition
    keep = dict(layers)
    names = {n: part.names[n] for n in part.fast if n in keep}
    rules = {n: part.rules[n] if keep[n] else _rules.LEAF for n in names}
    covered = {full for local in names.values() for full in local.values()}
    rest = tuple(n for n in trainable if n not in covered)
    why = {n: _TIED for n in part.fast if n not in names}
    new = Partition({n: part.fast[n] for n in names}, rules, names, (), rest, dict(part.skipped))
    return Route(new, route.layout, route.clone, {}, route.generic, {**route.excluded, **why})


def _verified(router: Router, route: Route, layers: Layers, inputs: Any, size: int) -> Route:
    """Check the MAS split of ``route`` against autograd on a sub-batch; return it verified.

    The Fisher's checks (:func:`ewc._verify.check_sample`) run on the derived route: each
    layer's per-sample gradient (its closed form's or its module-local VJP's) and the generic
    path's for every other parameter must match autograd's for a random cotangent in one sample
    (their squares, so their absolute values). A layer that fails takes the generic path; a
    failing ``vmap`` path is replaced by the per-sample loop. A split that is the Fisher
    route's own (every layer under the rule the route verified, the same generic parameters)
    was checked by the route's probe and is not checked again.
    """
    first = _derive(route, layers, router.trainable)
    part = first.partition
    same = all(part.rules[n] is route.partition.rules[n] for n in part.fast)
    if first.rest == route.rest and same:
        return first if first.verified else _with(first, verified=route.verified)  # as checked
    m = min(size, PROBE_SIZE)
    keep = dict(layers)
    generic = route.generic
    for _ in range(len(layers) + 3):
        derived = _derive(route, tuple(keep.items()), router.trainable)
        if generic != derived.generic:
            derived = _with(derived, generic=generic)
        sub = derived.layout.take(inputs, m) if m < size else inputs
        z, capture = router.run(derived, sub, m)
        bad = {n for n in derived.fast if len(capture.records.get(n, [])) != 1}
        bad |= capture.unusable & set(derived.fast)  # the module-local VJP needs module(x)
        if z is None or bad:
            keep = {n: c for n, c in keep.items() if n not in bad}
            continue
        records = {n: capture.records[n][0] for n in derived.fast}
        verdicts = [
            check_sample(
                router.model,
                derived,
                router.trainable,
                sub,
                z,
                records,
                router._column(z, i),
                i,
                router.output_fn,
                squares_too=i == m - 1,
            )
            for i in range(m)
        ]
        failed = {n for v in verdicts for n in v.failed}
        if failed:
            keep = {n: c for n, c in keep.items() if n not in failed}
            continue
        why = next((v.generic for v in verdicts if v.generic is not None), None)
        if why is None:
            how = f"{m} sample{'s' if m > 1 else ''} against autograd (MAS)"
            return _with(derived, verified=how)
        if generic == "loop":
            raise ValueError(
                "the per-sample gradients of the parameters without a closed form do not match "
                f"autograd even one sample at a time ({why}): the model does not treat the "
                "samples of a batch independently"
            )
        generic = "loop"
        router.generic, router.why_loop = "loop", why
    raise RuntimeError("the MAS estimator could not settle on a route for this model")


def _with(route: Route, **changes: Any) -> Route:
    return dataclasses.replace(route, **changes)


# --- The per-batch math ---------------------------------------------------------------------
def _accumulate_layers(
    route: Route, records: Mapping[str, Record], z: Tensor, s: Tensor, sums: dict[str, Tensor]
) -> None:
    r"""Add each fast layer's ``Σ_n |per-sample gradient|``.

    ``g`` is the gradient of ``Σ_n ‖z_n‖²`` with respect to each layer's output (one backward
    pass to the layers' outputs, no weight gradients) and ``a`` its input. ``nn.Linear`` on
    ``(N, in)``: the per-sample weight gradient is the outer product ``g_n a_nᵀ``, whose absolute
    value factorises, so the sum is ``|g|ᵀ |a|`` (and ``Σ_n |g_n|`` for the bias). Other layers:
    the absolute values of the module-local per-sample VJPs (:func:`ewc._rules.leaf_vjp`).
    Outputs that do not require gradients (a layer under ``no_grad``) add zero.
    """
    part = route.partition
    live = [n for n in part.fast if records[n].out.requires_grad]
    if not live or not z.requires_grad:
        return
    gs = torch.autograd.grad(z, [records[n].out for n in live], s, allow_unused=True)
    acc = acc_dtype(z.dtype)
    for name, g in zip(live, gs, strict=True):
        if g is None:
            continue
        local = part.names[name]
        if part.rules[name] is _rules.LEAF:
            vals = _rules.leaf_vjp(part.fast[name], records[name].x, g.unsqueeze(0), "abs")
        else:
            ga, a = g.to(acc).abs(), records[name].x.to(acc).abs()
            vals = {"weight": ga.transpose(0, 1) @ a, "bias": ga.sum(0)}
        for key, full in local.items():
            sums[full] += vals[key].to(sums[full].dtype)


# --- The penalty ----------------------------------------------------------------------------
class MAS(EWC):
    r"""Memory aware synapses: EWC's merged quadratic penalty with MAS importances.

    The penalty is ``(λ/2) Σ_i Ω_i (θ_i − θ*_i)²`` with ``Ω`` from :func:`mas_importance`
    (the library's λ convention, as for :class:`~ewc.EWC`). Aljundi et al. and Hsu et al. write
    ``λ_MAS Σ_i Ω_i (θ_i − θ*_i)²`` without the ½: ``lam = 2 λ_MAS``. By default
    (``mode="online"``, ``gamma=1``, as in the paper) the importances of the tasks add up and the
    anchor is the latest optimum; ``mode="separate"`` keeps one pull per task, as EWC does.

    ``consolidate(data)`` after each task (no labels needed). Everything else (``penalty()``,
    ``add_penalty_grad``, ``save``/``load``, the integrations) is EWC's.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 2)
        >>> mas = MAS(net, lam=1.0)
        >>> _ = mas.consolidate([torch.randn(8, 3)])  # after training task A
        >>> float(mas.penalty())
        0.0
    """

    state_kinds = (KIND,)

    def __init__(
        self,
        model: nn.Module,
        lam: float,
        *,
        mode: str = "online",
        gamma: float = 1.0,
        n_samples: int | None = None,
        params: ParamSelector = None,
        fisher_dtype: torch.dtype | None = None,
        output_fn: OutputFn | None = None,
    ) -> None:
        super().__init__(
            model,
            lam,
            mode=mode,
            gamma=gamma,
            n_samples=n_samples,
            params=params,
            fisher_dtype=fisher_dtype,
        )
        if output_fn is not None and not callable(output_fn):
            raise ValueError(f"output_fn must be callable, got {type(output_fn).__name__}")
        self.output_fn = output_fn

    @property
    def kind(self) -> str:
        """Always ``"mas"`` (the importance of every consolidation)."""
        return KIND

    @kind.setter
    def kind(self, value: str) -> None:
        if value != KIND:
            raise ValueError(f"a MAS object's kind is {KIND!r}, got {value!r}")

    def consolidate(  # type: ignore[override]
        self,
        data: Iterable[Any] | None = None,
        *,
        importance: Mapping[str, Tensor] | None = None,
        **options: Any,
    ) -> Fisher:
        """Record the current parameters as a task's optimum with its MAS importance.

        Pass the task's ``data`` (importances estimated at the current parameters;
        ``options`` such as ``n_samples=`` or ``progress=`` go to :func:`mas_importance`) or a
        precomputed ``importance``.

        Returns:
            The importance that was added.
        """
        if "fisher" in options:
            raise TypeError("MAS.consolidate takes importance=, not fisher=")
        if (data is None) == (importance is None):
            raise ValueError("consolidate needs exactly one of `data` or `importance=`")
        if importance is None:
            assert data is not None
            options.setdefault("n_samples", self.n_samples)
            options.setdefault("output_fn", self.output_fn)
            importance = mas_importance(self.model, data, params=self.params, **options)
        elif not isinstance(importance, Fisher):
            importance = Fisher(importance, kind=KIND)
        return super().consolidate(fisher=importance)

    def _metadata(self) -> dict[str, Any]:
        meta = super()._metadata()
        meta["likelihood"] = None  # MAS reads no likelihood
        return meta

    @classmethod
    def _from_meta(cls, model: nn.Module, meta: Mapping[str, Any], **kwargs: Any) -> MAS:
        saved = meta.get("params")
        if isinstance(saved, list):
            kwargs.setdefault("params", saved)
        from .penalty import _dtype_from_name

        kwargs.setdefault("fisher_dtype", _dtype_from_name(meta.get("fisher_dtype")))
        try:
            return cls(model, meta["lam"], mode=meta["mode"], gamma=meta["gamma"], **kwargs)
        except (KeyError, TypeError) as e:
            raise ValueError(f"the MAS state's metadata is incomplete or malformed: {e}") from e

    def __repr__(self) -> str:
        return (
            f"MAS(lam={self.lam}, mode={self.mode!r}, gamma={self.gamma}, tasks={self.num_tasks})"
        )
