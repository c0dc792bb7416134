r"""Closed-form sums of squared per-sample gradients, one rule per layer type.

Every rule has the signature ``rule(module, x, g) -> {local parameter name: tensor}`` where

* ``x`` is the layer's input for the batch, shape ``(N, ...)`` (detached), and
* ``g`` is the gradient of the back-propagated quantity with respect to the layer's output,
  shape ``(K, N, ...)``: one slice per column ``k`` of the output-space factor,

and returns, for each trainable parameter ``w`` of the layer,

.. math::

    \sum_{k} \sum_{n} \big(\partial_w \langle s_{nk}, z_n \rangle\big)^2

without a per-sample loop. The per-sample gradient of a layer applied at several positions
(a sequence, the pixels of a convolution) is the **sum over positions**; that sum is taken
*inside* the square. Where the layer has no extra positions the square factorises and no
per-sample gradient is materialised at all (for Linear: ``(Σ_k g²)ᵀ (x²)``, one matmul).

Rules receive ``x`` and ``g`` in the accumulation dtype (float32, or float64 for a float64
model), so squares never underflow in half precision; a rule registered ``native`` (the
module-local VJP) takes them in the model's dtypes and casts before squaring. A rule is a
closed form for a layer *type*; whether a given model uses the layer the way the rule assumes
(rows are samples, the parameters are used only inside the layer's call, no hook changes its
output) is checked against autograd by :mod:`ewc._verify` before the rule is trusted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from ._options import acc_dtype

Rule = Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]]

# Per-sample gradients are materialised in chunks of at most this many elements.
_CHUNK_ELEMENTS = 1 << 22


def _wants(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, nn.Parameter) and p.requires_grad


def _sq_sum(per_sample: Tensor) -> Tensor:
    """``Σ_b per_sample[b]²`` over the leading dimension."""
    return per_sample.square().sum(0)


def _chunk(n: int, per_sample: int) -> int:
    """Return samples per chunk so that a chunk's per-sample tensors hold ``_CHUNK_ELEMENTS``."""
    return max(1, min(n, _CHUNK_ELEMENTS // max(1, per_sample)))


def _outer_sq(g: Tensor, a: Tensor) -> Tensor:
    r"""``Σ_k Σ_n (g[k, n]ᵀ a[n])²`` for ``g: (K, N, T, O)`` and ``a: (N, T, I)``.

    One ``bmm`` per chunk of samples, with the ``K`` columns stacked as rows so the input is
    never repeated: ``(n, K·O, T) @ (n, T, I)``.
    """
    k, n, _, o = g.shape
    i = a.shape[-1]
    gt = g.permute(1, 0, 3, 2).reshape(n, k * o, -1)  # (N, K·O, T)
    out = g.new_zeros(o, i)
    step = _chunk(n, k * o * i)
    for s in range(0, n, step):
        per_sample = torch.bmm(gt[s : s + step], a[s : s + step])  # (n, K·O, I)
        out += per_sample.reshape(-1, o, i).square().sum(0)
    return out


# --- Linear -----------------------------------------------------------------------------
def linear(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """``nn.Linear`` on ``(N, in)`` or ``(N, *positions, in)`` inputs."""
    k, n = g.shape[:2]
    if x.dim() == 2:
        return linear_from_sq(module, x, g[0].square() if k == 1 else g.square().sum(0))
    out: dict[str, Tensor] = {}
    gg = g.reshape(k, n, -1, g.shape[-1])  # (K, N, T, out)
    if _wants(module, "weight"):
        out["weight"] = _outer_sq(gg, x.reshape(n, -1, x.shape[-1]))
    if _wants(module, "bias"):
        out["bias"] = _sq_sum(gg.sum(2).reshape(k * n, -1))
    return out


def conv1d_transposed(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Hugging Face's ``Conv1D`` (GPT-2): ``x @ W + b`` with ``W`` stored ``(in, out)``.

    The same layer as :class:`torch.nn.Linear` with a transposed weight.
    """
    out = linear(module, x, g)
    if "weight" in out:
        out["weight"] = out["weight"].transpose(0, 1)
    return out


def tied_cross(x_lin: Tensor, g_lin: Tensor, idx: Tensor, g_emb: Tensor, emb: nn.Module) -> Tensor:
    r"""Cross term of a weight ``W (V, d)`` tied between an embedding and a linear head.

    Per sample the gradient is ``G_n = L_n + E_n`` with ``L_n = Σ_t g_lin,nt x_lin,ntᵀ`` (the
    head) and ``E_n`` the embedding's rows ``E_n[r] = Σ_{t: idx_nt = r} g_emb,nt``. The layers'
    own rules give ``Σ_n L_n²`` and ``Σ_n E_n²``; this returns the rest,
    ``2 Σ_n L_n ⊙ E_n``, which is non-zero only on the rows a sample looks up:
    ``L_n[idx_nt] = g_lin,n[:, idx_nt]ᵀ x_lin,n`` for each position ``t`` (one ``bmm``).

    Shapes: ``x_lin (N, ..., d)``, ``g_lin (N, ..., V)``, ``idx (N, ...)``, ``g_emb (N, ..., d)``.
    """
    weight = emb.weight
    vocab, dim = weight.shape
    n = idx.shape[0]
    xl = x_lin.reshape(n, -1, dim)
    gl = g_lin.reshape(n, -1, vocab)
    ids = idx.reshape(n, -1).long()
    ge = g_emb.reshape(n, -1, dim)
    if emb.padding_idx is not None:  # no gradient reaches the padding row through the lookup
        ge = ge.masked_fill((ids == emb.padding_idx).unsqueeze(-1), 0.0)
    t_lin, t_emb = xl.shape[1], ids.shape[1]
    out = ge.new_zeros(vocab, dim)
    step = _chunk(n, t_lin * t_emb + t_emb * dim)
    for s in range(0, n, step):
        sl = slice(s, s + step)
        a = gl[sl].gather(2, ids[sl].unsqueeze(1).expand(-1, t_lin, -1))  # (n, T_lin, T_emb)
        rows = torch.bmm(a.transpose(1, 2), xl[sl])  # (n, T_emb, d): L_n at the looked-up rows
        out.index_add_(0, ids[sl].reshape(-1), (rows * ge[sl]).reshape(-1, dim))
    return out.mul_(2.0)


def linear_from_sq(
    module: nn.Module, x: Tensor, g2: Tensor, into: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """``nn.Linear`` on ``(N, in)`` from ``g2 = Σ_k g_k²`` of shape ``(N, out)``.

    The per-sample gradient is the outer product ``g_kn a_nᵀ``, so its square is
    ``g_kn² (a_n²)ᵀ`` and the sum over samples and columns is one matmul ``g2ᵀ (x²)``. With
    ``into`` (accumulators keyed ``"weight"``/``"bias"`` of the same dtype) the results are
    added in place (``addmm_``) and an empty dict is returned.
    """
    out: dict[str, Tensor] = {}
    if _wants(module, "weight"):
        acc = None if into is None else into.get("weight")
        if acc is not None and acc.dtype == g2.dtype:
            acc.addmm_(g2.transpose(0, 1), x.square())
        else:
            out["weight"] = g2.transpose(0, 1) @ x.square()
    if _wants(module, "bias"):
        acc = None if into is None else into.get("bias")
        if acc is not None and acc.dtype == g2.dtype:
            acc.add_(g2.sum(0))
        else:
            out["bias"] = g2.sum(0)
    return out


# --- Convolutions -----------------------------------------------------------------------
def _conv_padding(module: nn.Module, x: Tensor, spatial: int) -> tuple[Tensor, tuple[int, ...]]:
    """Apply string paddings by hand; return the input and the numeric padding."""
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            return x, (0,) * spatial
        pads: list[int] = []
        for d, kk in zip(reversed(module.dilation), reversed(module.kernel_size), strict=True):
            total = d * (kk - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0,) * spatial
    return x, tuple(padding)


def conv(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """``nn.Conv1d`` / ``nn.Conv2d`` (zero padding, any stride, dilation and groups).

    Per-sample weight gradients come from the convolution's own weight-gradient kernel run as a
    grouped convolution with one group per (sample, layer group): the ``K`` columns are stacked
    as extra output channels of each sample's group, so the input is never repeated.
    """
    k, n = g.shape[:2]
    spatial = x.dim() - 2
    x, padding = _conv_padding(module, x, spatial)
    out: dict[str, Tensor] = {}
    c_out = g.shape[2]
    if _wants(module, "weight"):
        w = module.weight
        groups = module.groups
        c_in = x.shape[1]
        per_group = c_out // groups
        # (K, N, Cout, *S) -> (N, G, K, Cout/G, *S)
        gs = g.reshape(k, n, groups, per_group, *g.shape[3:]).movedim(0, 2)
        acc = g.new_zeros(groups, per_group, *w.shape[1:])
        step = _chunk(n, k * w.numel())
        for s in range(0, n, step):
            m = min(step, n - s)
            go = gs[s : s + m].reshape(1, m * groups * k * per_group, *g.shape[3:])
            xi = x[s : s + m].reshape(1, m * c_in, *x.shape[2:])
            wshape = (m * groups * k * per_group, *w.shape[1:])
            _, gw, _ = torch.ops.aten.convolution_backward(
                go,
                xi,
                g.new_empty(1).expand(wshape),  # shape only (w may be an FSDP shard)
                None,
                module.stride,
                padding,
                module.dilation,
                False,
                (0,) * spatial,
                m * groups,
                (False, True, False),
            )
            gw = gw.reshape(m, groups, k, per_group, *w.shape[1:])
            acc += gw.square().sum((0, 2))
        out["weight"] = acc.reshape(w.shape)
    if _wants(module, "bias"):
        out["bias"] = _sq_sum(g.reshape(k * n, c_out, -1).sum(2))
    return out


# --- Embedding --------------------------------------------------------------------------
def embedding(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """``nn.Embedding``: per sample, the gradients of repeated indices add up before squaring."""
    if not _wants(module, "weight"):
        return {}
    k, n = g.shape[:2]
    vocab, dim = module.weight.shape
    idx = x.reshape(n, -1).long()
    pos = idx.shape[1]
    sample = torch.arange(k * n, device=idx.device).repeat_interleave(pos)
    key = sample * vocab + idx.repeat(k, 1).reshape(-1)
    uniq, inverse = torch.unique(key, return_inverse=True)
    summed = g.new_zeros(uniq.numel(), dim).index_add_(0, inverse, g.reshape(-1, dim))
    w = g.new_zeros(vocab, dim).index_add_(0, uniq % vocab, summed.square())
    if module.padding_idx is not None:
        w[module.padding_idx] = 0
    return {"weight": w}


# --- Normalisation layers (affine parameters) -------------------------------------------
def _affine(module: nn.Module, xhat: Tensor, g: Tensor, keep: tuple[int, ...]) -> dict[str, Tensor]:
    """Sum squared per-sample ``Σ_pos g ⊙ x̂`` (weight) and ``Σ_pos g`` (bias).

    Positions are every dimension of ``(K, N, ...)`` except ``K``, ``N`` and ``keep``.
    """
    k, n = g.shape[:2]
    nd = g.dim()
    red = [d for d in range(2, nd) if d not in keep]
    out: dict[str, Tensor] = {}
    pshape = None
    if _wants(module, "weight"):
        pshape = module.weight.shape
        ps = (g * xhat.unsqueeze(0)).sum(red) if red else g * xhat.unsqueeze(0)
        out["weight"] = _sq_sum(ps.reshape(k * n, *pshape))
    if _wants(module, "bias"):
        pshape = module.bias.shape
        ps = g.sum(red) if red else g
        out["bias"] = _sq_sum(ps.reshape(k * n, *pshape))
    return out


def layer_norm(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """``nn.LayerNorm`` with elementwise affine parameters."""
    ns = tuple(module.normalized_shape)
    xhat = F.layer_norm(x, ns, None, None, module.eps)
    keep = tuple(range(g.dim() - len(ns), g.dim()))
    return _affine(module, xhat, g, keep)


def rms_norm(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """``nn.RMSNorm`` (weight only)."""
    ns = tuple(module.normalized_shape)
    xhat = F.rms_norm(x, ns, None, module.eps)
    keep = tuple(range(g.dim() - len(ns), g.dim()))
    return _affine(module, xhat, g, keep)


def batch_norm(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """``nn.BatchNorm1d/2d/3d`` in eval mode, normalising with the running statistics."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = module.running_mean.reshape(shape).to(x.dtype)
    var = module.running_var.reshape(shape).to(x.dtype)
    xhat = (x - mean) * torch.rsqrt(var + module.eps)
    return _affine(module, xhat, g, (2,))


def group_norm(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """``nn.GroupNorm`` (per-sample statistics, so per-sample gradients are well defined)."""
    xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
    return _affine(module, xhat, g, (2,))


# --- Any other leaf module: per-sample VJPs of the module alone ---------------------------
def leaf_vjp(
    module: nn.Module, x: Tensor, g: Tensor, quantity: str = "square"
) -> dict[str, Tensor]:
    """Handle a module without children called as ``module(x)`` (e.g. a model's RMSNorm class).

    The per-sample gradients of its own parameters are the vector-Jacobian products of the
    module alone at ``x_n`` with the cotangents ``g_kn`` (``torch.func.vmap`` over the samples
    of this one module, not of the whole model), squared in float32 or wider and summed. The
    ``K`` columns are a Python loop inside the vmapped function, never a nested ``vmap``: some
    batching rules (``nn.PReLU``'s) give wrong numbers under ``vmap(vmap(vjp))``.

    ``x`` and ``g`` are in the module's own dtypes (the rule is registered ``native``).
    ``quantity="abs"`` sums absolute values instead of squares (:mod:`ewc.mas`).
    """
    from torch.func import functional_call, vjp, vmap

    reduce = QUANTITIES[quantity]
    params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    const = {n: p.detach() for n, p in module.named_parameters(recurse=False) if n not in params}
    const.update(dict(module.named_buffers(recurse=False)))
    k, n = g.shape[:2]

    def one(x_n: Tensor, g_n: Tensor) -> dict[str, Tensor]:
        def f(p: dict[str, Tensor]) -> Tensor:
            return functional_call(module, {**p, **const}, (x_n.unsqueeze(0),)).squeeze(0)

        _, vjp_fn = vjp(f, params)
        return reduce([vjp_fn(g_n[j])[0] for j in range(k)])

    numel = sum(p.numel() for p in params.values()) * k
    per = vmap(one, chunk_size=_chunk(n, numel))(x, g.movedim(0, 1))
    return {name: v.sum(0) for name, v in per.items()}


def sum_squares(grads: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """``Σ_k grads[k]²`` per key, squared in float32 or wider (never in half precision)."""
    out: dict[str, Tensor] = {}
    for gk in grads:
        for name, v in gk.items():
            v = v.to(acc_dtype(v.dtype))
            out[name] = v.square() if name not in out else out[name] + v.square()  # vmap-safe
    return out


def sum_abs(grads: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """``Σ_k |grads[k]|`` per key, in float32 or wider (the quantity of :mod:`ewc.mas`)."""
    out: dict[str, Tensor] = {}
    for gk in grads:
        for name, v in gk.items():
            v = v.to(acc_dtype(v.dtype)).abs()
            out[name] = v if name not in out else out[name] + v  # vmap-safe
    return out


# The per-sample quantities the generic paths can sum: squares (the Fisher), absolute values.
QUANTITIES: dict[str, Callable[[list[dict[str, Tensor]]], dict[str, Tensor]]] = {
    "square": sum_squares,
    "abs": sum_abs,
}


# --- The registry -----------------------------------------------------------------------
@dataclass(frozen=True)
class LayerRule:
    """A closed form for one layer type.

    Attributes:
        name: A readable name (shown by :func:`ewc.fisher_route`).
        diagonal: ``rule(module, x, g) -> {local name: Σ_k Σ_n (per-sample gradient)²}``.
        params: The local parameter names the rule covers; a layer with any other trainable
            parameter of its own takes no rule.
        applies: Whether the rule covers this instance (e.g. zero padding only).
        factorised: On 2-D inputs the rule only needs ``Σ_k g_k²`` (:func:`linear_from_sq`).
        native: The rule takes ``x`` and ``g`` in the model's dtypes and forms its squares in
            float32 itself; other rules get both cast to the accumulation dtype.
    """

    name: str
    diagonal: Rule
    params: tuple[str, ...]
    applies: Callable[[nn.Module], bool] = field(default=lambda m: True)
    factorised: bool = False
    native: bool = False


RULES: dict[type[nn.Module], LayerRule] = {}
# Layers of optional libraries, matched by qualified class name so they are never imported.
RULES_BY_NAME: dict[str, LayerRule] = {}
LEAF = LayerRule("module-local VJP", leaf_vjp, (), native=True)


def register(
    *types: type[nn.Module] | str,
    params: tuple[str, ...] = ("weight", "bias"),
    applies: Callable[[nn.Module], bool] | None = None,
    factorised: bool = False,
) -> Callable[[Rule], Rule]:
    """Register the decorated function as the rule of ``types`` (classes or qualified names)."""

    def deco(fn: Rule) -> Rule:
        rule = LayerRule(
            fn.__name__, fn, params, applies or (lambda m: True), factorised=factorised
        )
        for t in types:
            if isinstance(t, str):
                RULES_BY_NAME[t] = rule
            else:
                RULES[t] = rule
        return fn

    return deco


register(nn.Linear, factorised=True)(linear)
register("transformers.pytorch_utils.Conv1D")(conv1d_transposed)
register(nn.Conv1d, nn.Conv2d, applies=lambda m: m.padding_mode == "zeros")(conv)
register(
    nn.Embedding,
    params=("weight",),
    applies=lambda m: not m.scale_grad_by_freq and m.max_norm is None,
)(embedding)
register(nn.LayerNorm)(layer_norm)
register(nn.GroupNorm)(group_norm)


def _bn_ok(m: nn.Module) -> bool:
    if m.running_mean is None or m.running_var is None:
        raise ValueError(
            f"{type(m).__name__} without running statistics (track_running_stats=False) "
            "normalises each batch with the batch's own statistics even in eval mode, so a "
            "per-sample Fisher is not defined; use track_running_stats=True, GroupNorm or "
            "LayerNorm"
        )
    return True


register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, applies=_bn_ok)(batch_norm)
if hasattr(nn, "RMSNorm"):
    register(nn.RMSNorm, params=("weight",))(rms_norm)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _registered(cls: type[nn.Module]) -> LayerRule | None:
    """Return the rule of ``cls``, or of its nearest registered base if it keeps ``forward``.

    A subclass that does not override ``forward`` (such as the classes FSDP2's ``fully_shard``
    generates, ``FSDPLinear(FSDPModule, Linear)``) computes what its base computes; one that
    overrides it may compute anything and takes no rule. Either way the estimator's probe checks
    each rule against autograd before it is used.
    """
    for base in cls.__mro__:
        rule = RULES.get(base) or RULES_BY_NAME.get(_qualname(base))
        if rule is not None:
            return rule if cls.forward is base.forward else None
    return None


def rule_for(module: nn.Module) -> LayerRule | None:
    """Return the rule for ``module``, :data:`LEAF` for other leaf modules, or ``None``."""
    rule = _registered(type(module))
    if rule is None:
        return LEAF if _is_leaf(module) else None
    own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    if not own or any(n not in rule.params for n in own) or not rule.applies(module):
        return None
    return rule


def _is_leaf(module: nn.Module) -> bool:
    """Whether a module has no children and owns trainable parameters (see :func:`leaf_vjp`)."""
    if next(module.children(), None) is not None:
        return False
    return any(p.requires_grad for p in module.parameters(recurse=False))


__all__ = ["LayerRule", "RULES", "RULES_BY_NAME", "LEAF", "register", "rule_for", "leaf_vjp"]
