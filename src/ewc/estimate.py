r"""``fisher_diagonal``: the diagonal Fisher information of a model over a data set.

.. math::

    F_i = \frac{1}{N} \sum_{n=1}^{N} \sum_{k} \big(J_n^\top s_{nk}\big)_i^2,
    \qquad J_n = \partial z_n / \partial \theta,

where ``z_n`` is the model output for sample ``n`` and ``s_nk`` the columns of the likelihood's
output-space factor (:mod:`ewc.likelihoods`). For ``kind="sampled"`` and ``"empirical"`` there is
one column, the gradient ``∇_z log p(y_n | z_n)`` for a label drawn from the model or taken from
the data; for ``kind="exact"`` the columns factor the output-space Fisher exactly, so the result
is ``(1/N) Σ_n E_{y~p(·|x_n)}[(∂ log p(y|x_n)/∂θ)²]``.

How it is computed: one forward pass per batch with hooks on the layers that have a closed form
(:mod:`ewc._rules`), one backward pass from the outputs to those layers' outputs (one per factor
column: ``C − 1`` for the exact softmax Fisher), and the closed-form sum of squared per-sample
gradients per layer.
Parameters of any other module go through a generic per-sample ``torch.func`` path.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from . import _rules
from . import distributed as _dist
from ._select import ParamSelector, select_params
from .fisher import Fisher
from .likelihoods import KINDS, Likelihood, get_likelihood

__all__ = ["fisher_diagonal"]


# --- Batches ----------------------------------------------------------------------------
def _split_batch(batch: Any, needs_targets: bool) -> tuple[Any, Tensor | None]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if needs_targets:
        raise ValueError(
            "kind='empirical' needs (inputs, targets) batches; got a batch of type "
            f"{type(batch).__name__}"
            + (f" with {len(batch)} elements" if isinstance(batch, (tuple, list)) else "")
        )
    return batch, None


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, Tensor) and inputs.dim() > 0:
        return int(inputs.shape[0])
    leaves = [t for t in tree_flatten(inputs)[0] if isinstance(t, Tensor)]
    if not leaves or leaves[0].dim() == 0:
        raise ValueError("inputs must contain a tensor with a leading batch dimension")
    return int(leaves[0].shape[0])


def _to(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, Tensor):
        return tree.to(device)
    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, tree)


def _take(tree: Any, n: int) -> Any:
    return tree_map(lambda t: t[:n] if isinstance(t, Tensor) and t.dim() > 0 else t, tree)


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


OutputFn = Callable[[Any], Tensor]


# --- Partition of the parameters --------------------------------------------------------
class _Plan:
    """Which layers take a closed form, under which parameter names, and what is left over.

    Attributes:
        fast: Layers with a closed-form rule, by module name.
        rules: Each fast layer's rule, looked up once.
        leaves: Fast layers whose rule is the module-local VJP (:func:`_rules.leaf_vjp`).
        names: For each fast layer, its local parameter names -> the estimate's keys (the
            names of ``model.named_parameters()``, so a tied weight has one key).
        ties: ``(key, linear, embedding)`` for a weight shared by one ``nn.Linear`` (an output
            head) and one ``nn.Embedding`` (the input table): each layer's closed form covers
            its own term of ``(L_n + E_n)²`` and :func:`_rules.tied_cross` adds ``2 L_n E_n``.
        rest: Selected parameters without a closed form (the generic path).
    """

    def __init__(self, model: nn.Module, trainable: dict[str, nn.Parameter], exclude: set[str]):
        key = {id(p): n for n, p in trainable.items()}
        owners: dict[int, list[tuple[str, nn.Module]]] = {}
        for mname, module in model.named_modules(remove_duplicate=False):
            for _, p in module.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append((mname, module))
        tieable = {pid for pid, own in owners.items() if pid in key and _tieable(own, exclude)}
        self.fast: dict[str, nn.Module] = {}
        self.rules: dict[str, _rules.Rule] = {}
        self.names: dict[str, dict[str, str]] = {}
        self.ties: list[tuple[str, str, str]] = []
        covered: set[str] = set()
        for mname, module in model.named_modules():
            rule = None if mname in exclude else _rules.rule_for(module)
            if rule is None:
                continue
            own = {
                local: p
                for local, p in module.named_parameters(recurse=False)
                if p.requires_grad and id(p) in key
            }
            if not own:
                continue  # nothing selected here (e.g. a frozen base layer beside LoRA adapters)
            if any(len(owners[id(p)]) > 1 and id(p) not in tieable for p in own.values()):
                continue  # other shared parameters: their per-sample gradients add up
            self.fast[mname] = module
            self.rules[mname] = rule
            self.names[mname] = {local: key[id(p)] for local, p in own.items()}
            covered |= set(self.names[mname].values())
        for pid in tieable:
            (lin, _), (emb, _) = sorted(owners[pid], key=lambda o: type(o[1]) is nn.Embedding)
            if lin in self.fast and emb in self.fast:
                self.ties.append((key[pid], lin, emb))
            else:  # one owner cannot take its closed form: the tied weight needs both or none
                for m in (lin, emb):
                    if self.fast.pop(m, None) is not None:
                        del self.rules[m]
                        covered -= set(self.names.pop(m).values())
        self.rest = [n for n in trainable if n not in covered]
        self.leaves = {n for n, r in self.rules.items() if r is _rules.leaf_vjp}


def _tieable(own: list[tuple[str, nn.Module]], exclude: set[str]) -> bool:
    """Whether a weight is shared by exactly one ``nn.Linear`` and one ``nn.Embedding``."""
    if len(own) != 2 or any(m in exclude for m, _ in own):
        return False
    return (
        {type(mod) for _, mod in own} == {nn.Linear, nn.Embedding}
        and all(_rules.rule_for(mod) is not None for _, mod in own)
        and own[0][1].weight is own[1][1].weight
    )


# --- Back-propagation of the factor columns ---------------------------------------------
def _accumulate_fast(
    plan: _Plan,
    records: dict[str, list[tuple[Tensor, Tensor, int]]],
    z: Tensor,
    s: Tensor,
    sums: dict[str, Tensor],
) -> None:
    """Back-propagate the columns of ``s`` to the fast layers and add their closed forms.

    One backward pass per column (only to the layers' outputs: no weight gradients), the rules
    applied column by column so only one column's gradients are held at a time. Layers whose
    rule only needs ``Σ_k g_k²`` (Linear on 2-D inputs) accumulate that and do one matmul.
    (A vmapped backward over the columns, ``is_grads_batched``, measured no faster here: most
    backward ops have no batching rule and are looped inside vmap anyway.)
    """
    fast = plan.fast
    names = list(fast)
    outs = [records[n][0][1] for n in names]
    k = s.shape[0]

    def add(name: str, vals: dict[str, Tensor]) -> None:
        for local, val in vals.items():
            full = plan.names[name].get(local)
            if full is not None:  # a layer's unselected parameter (``params=``) is dropped
                sums[full] += val.to(sums[full].dtype)

    rules = plan.rules
    squares: dict[str, Tensor] = {}
    for j in range(k):
        gs = torch.autograd.grad(z, outs, s[j], retain_graph=j < k - 1, allow_unused=True)
        grads = {}
        for name, o, g in zip(names, outs, gs, strict=True):
            module, x = fast[name], records[name][0][0]
            g = o.new_zeros(o.shape) if g is None else g
            grads[name] = g
            if _rules.factorises(module, x):
                squares[name] = g.square() if j == 0 else squares[name].addcmul_(g, g)
            else:
                add(name, rules[name](module, x, g.unsqueeze(0)))
        for full, lin, emb in plan.ties:
            cross = _rules.tied_cross(
                records[lin][0][0], grads[lin], records[emb][0][0], grads[emb], fast[emb]
            )
            sums[full] += cross.to(sums[full].dtype)
    for name, g2 in squares.items():
        into = {local: sums[full] for local, full in plan.names[name].items()}
        add(name, _rules.linear_from_sq(fast[name], records[name][0][0], g2, into))


# --- Generic fallback: per-sample gradients with torch.func ------------------------------
def _fallback(
    model: nn.Module, names: list[str], inputs: Any, s: Tensor, output_fn: OutputFn | None
) -> dict[str, Tensor]:
    """``Σ_n Σ_k (∂<s_nk, z_n>/∂θ)²`` for the parameters ``names``, by vmap over samples."""
    from torch.func import functional_call, vjp, vmap

    params = dict(model.named_parameters())
    sub = {n: params[n].detach() for n in names}
    const: dict[str, Tensor] = {n: p.detach() for n, p in params.items() if n not in sub}
    const.update(dict(model.named_buffers()))

    def one(x: Any, s_n: Tensor) -> dict[str, Tensor]:
        def f(p: dict[str, Tensor]) -> Tensor:
            x1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, x)
            if isinstance(x1, Mapping):
                out = functional_call(model, {**p, **const}, (), dict(x1))
            elif isinstance(x1, (tuple, list)):
                out = functional_call(model, {**p, **const}, tuple(x1))
            else:
                out = functional_call(model, {**p, **const}, (x1,))
            if output_fn is not None:
                out = output_fn(out)
            return out.squeeze(0)

        _, vjp_fn = vjp(f, sub)
        (grads,) = vmap(vjp_fn)(s_n)
        return {n: g.square().sum(0) for n, g in grads.items()}

    numel = sum(p.numel() for p in sub.values()) * max(1, s.shape[0])
    chunk = max(1, _rules._CHUNK_ELEMENTS // max(1, numel))
    dims = tree_map(lambda t: 0 if isinstance(t, Tensor) and t.dim() > 0 else None, inputs)
    per = vmap(one, in_dims=(dims, 0), chunk_size=chunk)(inputs, s.movedim(0, 1))
    return {n: g.sum(0) for n, g in per.items()}


def _row(tree: Any, i: int) -> Any:
    return tree_map(lambda t: t[i : i + 1] if isinstance(t, Tensor) and t.dim() > 0 else t, tree)


def _fallback_loop(
    model: nn.Module, names: list[str], inputs: Any, s: Tensor, output_fn: OutputFn | None
) -> dict[str, Tensor]:
    """Compute :func:`_fallback`'s sum with one forward pass per sample (no vmap).

    For models that ``vmap`` cannot trace (data-dependent control flow, ``.item()``, as in
    Hugging Face attention-mask code): exact, but ``N`` small passes instead of one.
    """
    params = dict(model.named_parameters())
    sub = [params[n] for n in names]
    out = {
        n: torch.zeros(p.shape, dtype=_acc_dtype(p.dtype), device=p.device)
        for n, p in zip(names, sub, strict=True)
    }
    k = s.shape[0]
    for i in range(s.shape[1]):
        x_i = _row(inputs, i)
        with torch.enable_grad():
            z = _call(model, x_i)
            if output_fn is not None:
                z = output_fn(z)
        for j in range(k):
            gs = torch.autograd.grad(
                z, sub, s[j, i : i + 1], retain_graph=j < k - 1, allow_unused=True
            )
            for n, g in zip(names, gs, strict=True):
                if g is not None:
                    out[n].addcmul_(g, g)
    return out


# --- The estimator ----------------------------------------------------------------------
def _leaf_rule_ok(name: str, plan: _Plan, capture: _Capture) -> bool:
    """Try a generic leaf module's per-sample VJP on one sample (modules with a closed form pass).

    ``torch.func`` cannot trace every module (data-dependent control flow); such a module then
    takes the whole-model generic path. Run once per module, before anything is accumulated.
    """
    if name not in plan.leaves:
        return True
    module = plan.fast[name]
    x, out, _ = capture.records[name][0]
    try:
        _rules.leaf_vjp(module, x[:1], torch.zeros_like(out[:1]).unsqueeze(0))
    except Exception:
        return False
    return True


@torch.no_grad()
def _same_outputs(model: nn.Module, inputs: Any, output_fn: OutputFn | None, z: Tensor) -> bool:
    """Whether a plain forward pass (no hooks) reproduces the outputs ``z``."""
    ref = _call(model, inputs)
    if output_fn is not None:
        ref = output_fn(ref)
    if not isinstance(ref, Tensor) or ref.shape != z.shape:
        return False
    tol = 1e-2 if z.dtype in (torch.float16, torch.bfloat16) else 1e-5
    return bool(torch.allclose(ref, z.detach(), rtol=tol * 10, atol=tol * float(ref.abs().max())))


class _Capture:
    """Forward hooks that record each fast layer's input and output for one batch.

    With ``expand``, an ``nn.Embedding`` looked up with indices of batch dimension 1 while the
    batch has ``size > 1`` samples (position embeddings broadcast over the batch) hands an
    expanded ``(size, ...)`` view downstream, so the gradient reaching it is per sample.
    Broadcasting gives the same forward values; ``expanded`` records whether it happened.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        clone: bool,
        size: int,
        expand: bool = True,
        single_input: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        self.modules = modules
        self.single_input = single_input  # layers that must be called as module(x) exactly
        self.clone = clone
        self.size = size
        self.expand = expand
        self.expanded = False
        self.records: dict[str, list[tuple[Tensor, Tensor, int]]] = {}
        self.unusable: set[str] = set()  # called other than as module(tensor) -> tensor
        self.handles = [
            m.register_forward_hook(self._hook(n), with_kwargs=True) for n, m in modules.items()
        ]

    def _hook(self, name: str) -> Callable[..., Tensor | None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Tensor | None:
            if not (args and isinstance(args[0], Tensor) and isinstance(output, Tensor)) or (
                name in self.single_input and (len(args) != 1 or kwargs)
            ):
                self.unusable.add(name)
                return None
            x = args[0]
            changed = False
            if (
                self.expand
                and type(module) is nn.Embedding
                and self.size > 1
                and x.dim() > 0
                and x.shape[0] == 1
                and output.shape[0] == 1
            ):
                x = x.expand(self.size, *x.shape[1:])
                output = output.expand(self.size, *output.shape[1:])
                changed = self.expanded = True
            self.records.setdefault(name, []).append((x.detach(), output, output._version))
            # a copy goes downstream, so in-place ops there leave the recorded output intact
            if self.clone:
                return output.clone()
            return output if changed else None

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


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
            with no trainable parameters, or an invalid option.

    The model's train/eval mode of every submodule, its parameters, buffers and any existing
    ``.grad`` are left as they were.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if n_samples is not None and (not isinstance(n_samples, int) or n_samples <= 0):
        raise ValueError(f"n_samples must be a positive integer or None, got {n_samples!r}")
    if not isinstance(mc_samples, int) or mc_samples <= 0:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
    lik = get_likelihood(likelihood)
    model = _dist.unwrap(model)
    reduction = _dist.resolve(distributed, group)
    n_samples = _dist.local_limit(data, n_samples, reduction)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    if output_fn is not None and not callable(output_fn):
        raise ValueError(f"output_fn must be callable, got {type(output_fn).__name__}")
    trainable = select_params(model, params)
    device = next(iter(trainable.values())).device
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return _estimate(
            model,
            data,
            kind,
            n_samples,
            lik,
            progress,
            generator,
            mc_samples,
            trainable,
            device,
            reduction,
            dtype,
            output_fn,
        )
    finally:
        for m, mode in modes.items():
            m.training = mode


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _estimate(
    model: nn.Module,
    data: Iterable[Any],
    kind: str,
    n_samples: int | None,
    lik: Likelihood,
    progress: bool,
    generator: torch.Generator | None,
    mc_samples: int,
    trainable: dict[str, nn.Parameter],
    device: torch.device,
    reduction: _dist.Reduction | None = None,
    dtype: torch.dtype | None = None,
    output_fn: OutputFn | None = None,
) -> Fisher:
    exclude: set[str] = set()
    plan = _Plan(model, trainable, exclude)
    # accumulate in at least float32 (half-precision sums of many squares lose everything)
    sums = {
        n: torch.zeros(p.shape, dtype=_acc_dtype(p.dtype), device=p.device)
        for n, p in trainable.items()
    }
    clone = False
    expand = True  # expand broadcast embedding lookups (see _Capture)
    expand_checked = False
    verified: set[str] = set()  # fast layers whose rule is known to work on this model
    loop = False  # per-sample loop instead of vmap for the generic path
    seen = 0
    iterator: Iterable[Any] = data if n_samples != 0 else ()  # 0: this rank's share is empty
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"Fisher ({kind})", unit="batch")
    for batch_idx, batch in enumerate(iterator):
        inputs, targets = _split_batch(batch, kind == "empirical")
        size = _batch_size(inputs)
        if n_samples is not None and seen + size > n_samples:
            size = n_samples - seen
            inputs, targets = _take(inputs, size), _take(targets, size)
        if size == 0:
            continue
        inputs = _to(inputs, device)
        targets = _to(targets, device) if targets is not None else None
        while True:
            capture = _Capture(plan.fast, clone, size, expand, plan.leaves)
            try:
                with torch.enable_grad():
                    z = _call(model, inputs)
                    if output_fn is not None:
                        z = output_fn(z)
            except Exception:
                if not capture.expanded:
                    raise
                expand = False  # the model rejected an expanded embedding: generic path
                continue
            finally:
                capture.remove()
            if not isinstance(z, Tensor):
                raise TypeError(
                    f"the model must return a tensor of outputs, got {type(z).__name__}; pass "
                    "output_fn= to pick it (e.g. output_fn=lambda out: out.logits), or use "
                    "ewc.integrations.lm.hf_fisher for Hugging Face models"
                )
            bad = [
                n
                for n in plan.fast
                if n in capture.unusable
                or len(capture.records.get(n, ())) != 1
                or capture.records[n][0][0].shape[:1] != (size,)
                or capture.records[n][0][1].shape[:1] != (size,)
            ]
            if bad:
                # a layer called twice (or never), or on a tensor without the batch dimension
                # (e.g. position embeddings broadcast over the batch): generic path
                exclude |= set(bad)
                plan = _Plan(model, trainable, exclude)
                continue
            if not clone and any(
                o._version != v for recs in capture.records.values() for _, o, v in recs
            ):
                clone = True  # an in-place op changed a layer output: capture copies instead
                continue
            failed = [
                n for n in plan.fast if n not in verified and not _leaf_rule_ok(n, plan, capture)
            ]
            verified |= set(plan.fast)
            if failed:  # vmap cannot trace this module alone: the whole-model generic path
                exclude |= set(failed)
                plan = _Plan(model, trainable, exclude)
                continue
            if capture.expanded and not expand_checked:
                # once: the expanded lookup must leave the model's outputs unchanged (it would
                # not if the model reduced over the embedding's batch dimension)
                expand_checked = True
                if not _same_outputs(model, inputs, output_fn, z):
                    expand = False
                    continue
            break
        if z.shape[:1] != (size,):
            raise ValueError(
                f"model output has shape {tuple(z.shape)}, expected a leading batch "
                f"dimension of {size}"
            )
        if not bool(torch.isfinite(z).all()):
            raise ValueError(
                f"the model produced non-finite outputs on batch {batch_idx}; the loss is not "
                "finite (check the inputs and the weights)"
            )
        lik.check(z, targets, kind)
        s = lik.factor(z.detach(), targets, kind, mc_samples=mc_samples, generator=generator)
        if plan.fast:
            _accumulate_fast(plan, capture.records, z, s, sums)
        del capture, z
        if plan.rest:
            vals = None
            if not loop:
                try:
                    vals = _fallback(model, plan.rest, inputs, s, output_fn)
                except RuntimeError as e:  # vmap cannot trace the model: loop over samples
                    loop = True
                    warnings.warn(
                        f"per-sample gradients of {len(plan.rest)} parameter(s) without a closed "
                        f"form (e.g. {plan.rest[0]!r}) fall back to one pass per sample, because "
                        f"torch.func.vmap cannot trace the model ({str(e).splitlines()[0][:120]}); "
                        "leave them out with params= to skip this cost",
                        stacklevel=3,
                    )
            if vals is None:
                vals = _fallback_loop(model, plan.rest, inputs, s, output_fn)
            for n, val in vals.items():
                sums[n] += val.to(sums[n].dtype)
        seen += size
        if n_samples is not None and seen >= n_samples:
            break
    if reduction is not None:  # Σ_r S_r and Σ_r N_r: the Fisher of the union of the shards
        seen = reduction.all_reduce(sums, seen)
    if seen == 0:
        raise ValueError("data yielded no samples: the Fisher needs at least one data point")
    fisher = Fisher(
        {n: (v / seen).to(dtype or trainable[n].dtype) for n, v in sums.items()},
        n_samples=seen,
        kind=kind,
    )
    fisher.validate()
    return fisher
