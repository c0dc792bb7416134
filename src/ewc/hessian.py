r"""``hessian_diagonal``: the diagonal of the Hessian of the negative log-likelihood.

At the same per-sample-mean scale as :func:`ewc.fisher_diagonal`, so the two compare entry by
entry:

.. math::

    H_i = \frac{1}{N} \sum_{n=1}^{N}
    \frac{\partial^2 \big(-\log p(y_n \mid x_n, \theta)\big)}{\partial \theta_i^2},

with the data's labels ``y_n`` (the Hessian, unlike the sampled or exact Fisher, depends on
them). It can be negative; it equals the exact Fisher's diagonal when the network is piecewise
linear in its parameters' neighbourhood (ReLU) and the likelihood is a canonical exponential
family (softmax cross-entropy, Gaussian), because the Hessian is then its Gauss-Newton part.

Two methods:

* ``"exact"``: per batch, one forward pass, one backward pass with a graph, then

  - for every ``nn.Linear`` on 2-D inputs ``(N, in)``, called once, with unshared weights: the
    closed form ``∂²L/∂W_ij² = Σ_n x_nj² [H_{a_n}]_ii`` and ``∂²L/∂b_i² = Σ_n [H_{a_n}]_ii``
    (exact, since ``a = W x + b`` is linear in ``W`` and ``x`` does not depend on ``W``), where
    the per-sample diagonal of the Hessian with respect to the layer's output ``a`` costs one
    Hessian-vector product per **output unit** (not per weight), through the graph above the
    layer only, for all samples of the batch at once (samples are independent);
  - for every other parameter (convolutions, embeddings, recurrent and normalisation layers, a
    Linear on sequences): one Hessian-vector product per **entry**, which is exact for any
    model.

  For the demo's 784-400-400-10 network that is 810 partial products per batch instead of
  478,410 full ones. The Linear closed form is checked on every batch, and a layer that fails
  takes the per-entry path: the layer's weight gradient from autograd must equal ``gᵀ x`` (a
  weight also used outside the layer fails it), and one extra product with random values down
  one output column must show no terms between rows (rows that are not samples, such as a
  table of ``N`` rows by coincidence, fail it).
* ``"hutchinson"``: ``H_i ≈ (1/K) Σ_k v_k,i (H v_k)_i`` with Rademacher probes ``v_k``
  (unbiased, with variance ``Σ_{j≠i} H_ij²`` per probe); ``K = n_probes`` Hessian-vector
  products per batch, whatever the model.

Hessian-vector products are batched with ``torch.autograd.grad(..., is_grads_batched=True)`` in
chunks, falling back to a loop if that fails for some operation. The model must treat samples
independently in eval mode (checked on the first batch, as the Fisher estimator does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed as _dist
from ._batches import Layout, call
from ._options import FisherOptions, OutputFn, acc_dtype
from ._select import ParamSelector, select_params
from .estimate import _batches
from .fisher import Fisher
from .likelihoods import Categorical, CustomNLL, Gaussian, Likelihood

__all__ = ["hessian_diagonal", "METHODS"]

METHODS = ("exact", "hutchinson")
_CHUNK = 64  # Hessian-vector products batched into one vmapped backward pass
_CHUNK_ELEMENTS = 1 << 25  # at most this many probe entries at once (memory)


def _chunk(numel: int) -> int:
    """Products per vmapped pass: ``_CHUNK``, fewer when each probe has many entries."""
    return max(1, min(_CHUNK, _CHUNK_ELEMENTS // max(1, numel)))


def hessian_diagonal(
    model: nn.Module,
    data: Iterable[Any],
    *,
    likelihood: str | Likelihood | Callable[[Tensor, Tensor], Tensor] = "classification",
    method: str = "exact",
    n_probes: int = 100,
    n_samples: int | None = None,
    params: ParamSelector = None,
    generator: torch.Generator | None = None,
    output_fn: OutputFn | None = None,
    progress: bool = False,
) -> Fisher:
    r"""Return the per-sample-mean diagonal of the Hessian of the negative log-likelihood.

    Args:
        model: Any ``nn.Module`` mapping inputs ``(N, ...)`` to outputs ``(N, ...)`` that
            treats samples independently (in eval mode; modes are restored afterwards).
        data: Iterable of ``(inputs, targets)`` batches (the labels are needed: the Hessian
            is taken at the data's labels).
        likelihood: ``"classification"`` (softmax cross-entropy over the last dimension,
            ``ignore_index`` positions left out), ``"regression"`` / ``ewc.Gaussian(sigma)``
            (``‖y − z‖² / 2σ²``), or a callable per-sample ``nll(outputs, targets) -> (N,)``.
        method: ``"exact"`` or ``"hutchinson"`` (see the module docstring for the costs).
        n_probes: Rademacher probes per batch for ``"hutchinson"``.
        n_samples: Use at most this many data points (``None``: all of ``data``).
        params: Which trainable parameters to cover (as in :func:`ewc.fisher_diagonal`).
        generator: Random generator for the probes (CPU; reproducible estimates).
        output_fn: Maps the model's return value to the output tensor the likelihood reads.
        progress: Show a tqdm progress bar over batches.

    Returns:
        A :class:`~ewc.Fisher` (``kind="hessian"``) with one tensor per selected parameter, of
        its shape and dtype. Entries may be negative, so it does not pass
        :meth:`~ewc.Fisher.validate` and :meth:`ewc.EWC.consolidate` refuses it unless clipped.

    Not reduced across processes: under ``torch.distributed`` each rank gets the Hessian of its
    own data. The model's parameters, buffers and ``.grad`` are left as they were.

    Raises:
        ValueError: on an unknown method, bad ``n_probes``, empty data, non-finite outputs,
            or a model whose outputs for a sample depend on the other samples of its batch.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive integer, got {n_probes!r}")
    opts = FisherOptions(
        kind="empirical",
        likelihood=likelihood,
        n_samples=n_samples,
        params=params,
        generator=generator,
        output_fn=output_fn,
        progress=progress,
    )
    model = _dist.unwrap(model)
    trainable = select_params(model, params)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return _hessian(model, data, opts, trainable, method, n_probes)
    finally:
        for m, mode in modes.items():
            m.training = mode


def _hessian(
    model: nn.Module,
    data: Iterable[Any],
    opts: FisherOptions,
    trainable: dict[str, nn.Parameter],
    method: str,
    n_probes: int,
) -> Fisher:
    device = next(iter(trainable.values())).device
    sums = {
        n: torch.zeros(p.shape, dtype=acc_dtype(p.dtype), device=device)
        for n, p in trainable.items()
    }
    linears = _candidate_linears(model, trainable)
    if opts.progress:
        from tqdm.auto import tqdm

        data = tqdm(data, desc=f"Hessian ({method})", unit="batch")
    seen = 0
    quiet = opts.replace(progress=False)  # the bar above, with the right name
    for idx, inputs, targets, size in _batches(data, quiet, opts.n_samples, device):
        assert targets is not None
        if seen == 0:
            _check_independent(model, inputs, size, opts)
        if method == "exact":
            vals = _exact_batch(model, inputs, targets, size, idx, opts, trainable, linears)
        else:
            vals = _hutchinson_batch(model, inputs, targets, size, idx, opts, trainable, n_probes)
        for n, v in vals.items():
            sums[n] += v.to(sums[n].dtype)
        seen += size
    if seen == 0:
        raise ValueError("data yielded no samples: the Hessian needs at least one data point")
    for n, v in sums.items():
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"the Hessian diagonal of {n!r} is not finite (overflow in the model)")
    return Fisher(
        {n: (v / seen).to(trainable[n].dtype) for n, v in sums.items()},
        n_samples=seen,
        kind="hessian",
    )


# --- The loss -------------------------------------------------------------------------------
def _outputs(model: nn.Module, inputs: Any, size: int, idx: int, opts: FisherOptions) -> Tensor:
    out = call(model, inputs)
    z = opts.output_fn(out) if opts.output_fn is not None else out
    if not isinstance(z, Tensor):
        raise ValueError(
            f"the model returned {type(z).__name__}, not a tensor; pass output_fn= to pick the "
            "outputs (e.g. output_fn=lambda out: out.logits)"
        )
    if z.shape[:1] != (size,):
        raise ValueError(
            f"model output has shape {tuple(z.shape)}, expected a leading batch dimension of {size}"
        )
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"the model produced non-finite outputs on batch {idx}")
    return z


def _nll(lik: Likelihood, z: Tensor, targets: Tensor) -> Tensor:
    """Return ``Σ_n −log p(y_n | z_n)`` for a batch (a differentiable scalar)."""
    lik.check(z, targets, "empirical")
    if isinstance(lik, Categorical):
        ignore = -100 if lik.ignore_index is None else lik.ignore_index  # labels were checked
        flat = z.reshape(-1, z.shape[-1])
        return nn.functional.cross_entropy(
            flat, targets.reshape(-1).long(), reduction="sum", ignore_index=ignore
        )
    if isinstance(lik, Gaussian):
        return 0.5 * (z - targets.to(z.dtype)).square().sum() / lik.sigma**2
    if isinstance(lik, CustomNLL):
        losses = lik.nll(z, targets)
        if not isinstance(losses, Tensor) or losses.shape != (z.shape[0],):
            raise ValueError(
                f"the custom nll must return per-sample losses of shape ({z.shape[0]},)"
            )
        return losses.sum()
    raise TypeError(
        f"hessian_diagonal supports Categorical, Gaussian and callable likelihoods, not "
        f"{type(lik).__name__}"
    )


def _check_independent(model: nn.Module, inputs: Any, size: int, opts: FisherOptions) -> None:
    """Raise unless the first two samples' outputs alone equal their rows in the batch.

    An input leaf other than the first whose leading dimension only happens to equal the batch
    size (a shared table or mask) is tried as shared before the model is refused.
    """
    if size < 2:
        return
    with torch.no_grad():
        full = _outputs(model, inputs, size, 0, opts)[:2]
    tol = 1e-10 if full.dtype == torch.float64 else 1e-4
    scale = float(full.abs().max()) + 1.0
    layout = Layout.of(inputs, size)
    tries = [layout]
    if len(layout.ambiguous) > 1:
        tries.append(layout.with_shared(layout.ambiguous[1:]))
    for lay in tries:
        with torch.no_grad():
            sub = _outputs(model, lay.take(inputs, 2), 2, 0, opts)
        if sub.shape == full.shape and torch.allclose(full, sub, rtol=tol, atol=tol * scale):
            return
    raise ValueError(
        "the model's outputs for a sample depend on the other samples of its batch (batch "
        "statistics or attention across the batch); a per-sample Hessian is not defined"
    )


# --- Batched Hessian-vector products ----------------------------------------------------------
def _hvps(g: Tensor, x: Tensor, vs: Tensor) -> Tensor:
    """Return ``[∂⟨g, v⟩/∂x for v in vs]`` as ``(K, *x.shape)`` (zeros where unconnected)."""
    if not g.requires_grad:
        return vs.new_zeros((vs.shape[0], *x.shape))
    try:
        (out,) = torch.autograd.grad(
            g, x, vs, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except RuntimeError:  # an op vmap cannot batch: one product at a time
        rows = []
        for v in vs:
            (r,) = torch.autograd.grad(g, x, v, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(x) if r is None else r)
        return torch.stack(rows)
    return vs.new_zeros((vs.shape[0], *x.shape)) if out is None else out


def _batched_hvps(gs: list[Tensor], xs: list[Tensor], vs: list[Tensor]) -> list[Tensor]:
    """``H v`` for the joint Hessian of several tensors, ``K`` probes at once: ``(K, *x.shape)``."""
    try:
        out = torch.autograd.grad(
            gs, xs, vs, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except RuntimeError:  # an op vmap cannot batch: one product at a time
        rows = [
            torch.autograd.grad(gs, xs, [v[j] for v in vs], retain_graph=True, allow_unused=True)
            for j in range(vs[0].shape[0])
        ]
        out = tuple(
            torch.stack([r[i] if r[i] is not None else torch.zeros_like(x) for r in rows])
            for i, x in enumerate(xs)
        )
    return [torch.zeros_like(v) if h is None else h for v, h in zip(vs, out, strict=True)]


def _diag_by_entries(g: Tensor, p: Tensor) -> Tensor:
    """Exact ``diag(∂g/∂p)`` for ``g = ∂L/∂p``: one Hessian-vector product per entry of ``p``."""
    d = p.numel()
    diag = torch.empty(d, dtype=p.dtype, device=p.device)
    step = _chunk(d)
    for start in range(0, d, step):
        idx = torch.arange(start, min(start + step, d), device=p.device)
        vs = torch.zeros(len(idx), d, dtype=p.dtype, device=p.device)
        vs[torch.arange(len(idx)), idx] = 1.0
        hv = _hvps(g, p, vs.reshape(len(idx), *p.shape)).reshape(len(idx), d)
        diag[idx] = hv[torch.arange(len(idx)), idx]
    return diag.reshape(p.shape)


def _diag_of_output(g: Tensor, a: Tensor) -> Tensor:
    """Per-sample ``diag(H_{a_n})`` as ``(N, out)``: one product per output unit, all samples.

    With ``v = e_i`` in every row, row ``n`` of ``H v`` is ``H_{a_n a_n} e_i`` because the
    Hessian is block diagonal over independent samples.
    """
    n, width = a.shape
    diag = torch.empty(n, width, dtype=a.dtype, device=a.device)
    step = _chunk(a.numel())
    for start in range(0, width, step):
        cols = torch.arange(start, min(start + step, width), device=a.device)
        vs = torch.zeros(len(cols), n, width, dtype=a.dtype, device=a.device)
        vs[torch.arange(len(cols)), :, cols] = 1.0
        hv = _hvps(g, a, vs)  # (k, N, out)
        diag[:, cols] = hv[torch.arange(len(cols)), :, cols].T
    return diag


# --- Exact ----------------------------------------------------------------------------------
def _candidate_linears(
    model: nn.Module, trainable: dict[str, nn.Parameter]
) -> dict[str, nn.Linear]:
    """Plain ``nn.Linear`` modules owning a selected parameter that no other module shares."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    chosen = {id(p) for p in trainable.values()}
    out = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if type(m).forward is not nn.Linear.forward or not isinstance(m, nn.Linear):
            continue
        own = [p for p in m.parameters(recurse=False)]
        if any(owners[id(p)] > 1 for p in own) or not any(id(p) in chosen for p in own):
            continue
        out[name] = m
    # a module registered under two names is called through both: leave it to the generic path
    counts: dict[int, int] = {}
    for m in out.values():
        counts[id(m)] = counts.get(id(m), 0) + 1
    return {n: m for n, m in out.items() if counts[id(m)] == 1}


def _exact_batch(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    size: int,
    idx: int,
    opts: FisherOptions,
    trainable: dict[str, nn.Parameter],
    linears: dict[str, nn.Linear],
) -> dict[str, Tensor]:
    records: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in linears}
    handles = [
        m.register_forward_hook(lambda _m, i, o, n=n: records[n].append((i[0], o)))
        for n, m in linears.items()
    ]
    try:
        with torch.enable_grad():
            loss = _nll(opts.lik, _outputs(model, inputs, size, idx, opts), targets)
    finally:
        for h in handles:
            h.remove()
    by_id = {id(p): n for n, p in trainable.items()}
    fast: dict[str, tuple[Tensor, Tensor, nn.Linear]] = {}
    for name, recs in records.items():
        if len(recs) == 1:
            x, a = recs[0]
            if x.dim() == 2 and a.dim() == 2 and x.shape[0] == size and a.requires_grad:
                fast[name] = (x.detach(), a, linears[name])
    fast_params = {id(p) for _, _, m in fast.values() for p in m.parameters(recurse=False)}
    generic = [n for n, p in trainable.items() if id(p) not in fast_params]
    outs = [a for _, a, _ in fast.values()]
    own = [p for _, _, m in fast.values() for p in m.parameters(recurse=False) if p.requires_grad]
    wrt = outs + [trainable[n] for n in generic] + own
    if not loss.requires_grad:
        return {}
    grads = torch.autograd.grad(loss, wrt, create_graph=True, allow_unused=True)
    g_out = dict(zip(fast, grads[: len(outs)], strict=True))
    g_gen = dict(zip(generic, grads[len(outs) : len(outs) + len(generic)], strict=True))
    g_own = {id(p): g for p, g in zip(own, grads[len(outs) + len(generic) :], strict=True)}
    result: dict[str, Tensor] = {}
    for name, (x, a, m) in fast.items():
        g = g_out[name]
        if g is None:
            continue
        d = _diag_of_output(g, a)  # (N, out)
        # the closed form needs the weight used only here and the rows of `a` independent
        if not (_closed_form_holds(m, x, g, g_own) and _rows_independent(g, a, d)):
            for p in m.parameters(recurse=False):
                if id(p) in by_id and g_own[id(p)] is not None:
                    result[by_id[id(p)]] = _diag_by_entries(g_own[id(p)], p)
            continue
        d = d.to(acc_dtype(a.dtype))
        if id(m.weight) in by_id:
            result[by_id[id(m.weight)]] = d.T @ x.to(d.dtype).square()
        if m.bias is not None and id(m.bias) in by_id:
            result[by_id[id(m.bias)]] = d.sum(0)
    for name in generic:
        g = g_gen[name]
        if g is not None:
            result[name] = _diag_by_entries(g, trainable[name])
    return result


def _rows_independent(g: Tensor, a: Tensor, d: Tensor) -> bool:
    """Whether ``H_a`` has no terms between rows, probed in one column: one extra product.

    With random ``r`` in column ``c`` of every row, ``(H v)_{n,c} = Σ_m H_{(n,c),(m,c)} r_m``
    equals ``d_{n,c} r_n`` iff rows do not interact in that column (rows that are not samples,
    such as a parameter table that happens to have ``N`` rows, do).
    """
    n = a.shape[0]
    if n < 2:
        return True
    c = int(d.abs().sum(0).argmax())
    gen = torch.Generator().manual_seed(n)
    r = torch.randn(n, generator=gen, dtype=torch.float64).to(device=a.device, dtype=a.dtype)
    v = torch.zeros_like(a)
    v[:, c] = r
    hv = _hvps(g, a, v.unsqueeze(0))[0][:, c]
    want = d[:, c] * r
    tol = 1e-9 if a.dtype == torch.float64 else 1e-4
    scale = float(want.abs().max()) + float(hv.abs().max()) + 1e-30
    return float((hv - want).abs().max()) <= tol * scale


def _closed_form_holds(m: nn.Linear, x: Tensor, g: Tensor, g_own: dict[int, Tensor | None]) -> bool:
    """Whether autograd's weight (and bias) gradient is ``gᵀ x`` (``Σ_n g_n``): used only here."""
    checks = []
    if m.weight.requires_grad:
        checks.append((g_own.get(id(m.weight)), g.T @ x.to(g.dtype)))
    if m.bias is not None and m.bias.requires_grad:
        checks.append((g_own.get(id(m.bias)), g.sum(0)))
    for got, want in checks:
        got = torch.zeros_like(want) if got is None else got.detach()
        tol = 1e-9 if want.dtype == torch.float64 else 1e-4
        scale = float(want.detach().abs().max()) + float(got.abs().max()) + 1e-30
        if float((got - want.detach()).abs().max()) > tol * scale:
            return False
    return True


# --- Hutchinson -------------------------------------------------------------------------------
def _hutchinson_batch(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    size: int,
    idx: int,
    opts: FisherOptions,
    trainable: dict[str, nn.Parameter],
    n_probes: int,
) -> dict[str, Tensor]:
    names = list(trainable)
    ps = [trainable[n] for n in names]
    with torch.enable_grad():
        loss = _nll(opts.lik, _outputs(model, inputs, size, idx, opts), targets)
    if not loss.requires_grad:
        return {}
    grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    acc = {
        n: torch.zeros(p.shape, dtype=acc_dtype(p.dtype), device=p.device)
        for n, p in trainable.items()
    }
    if not live:
        return acc
    gs, xs = [grads[i] for i in live], [ps[i] for i in live]
    step = _chunk(sum(p.numel() for p in xs))
    for start in range(0, n_probes, step):
        k = min(step, n_probes - start)
        # probe-major draws, so the estimate does not depend on the chunk size
        draws = [[_rademacher(p, opts.generator) for p in xs] for _ in range(k)]
        vs = [torch.stack([d[j] for d in draws]) for j in range(len(xs))]
        for i, v, h in zip(live, vs, _batched_hvps(gs, xs, vs), strict=True):
            acc[names[i]] += (v * h).sum(0).to(acc[names[i]].dtype)
    return {n: v / n_probes for n, v in acc.items()}


def _rademacher(p: Tensor, generator: torch.Generator | None) -> Tensor:
    bits = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8)
    return (bits.to(p.dtype) * 2 - 1).to(p.device)
