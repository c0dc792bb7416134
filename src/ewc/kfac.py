r"""Kronecker-factored Fisher (KFAC): a block per ``nn.Linear`` / ``nn.Conv2d``, diagonal elsewhere.

For a layer with weight ``W`` (``O × I``; a convolution's ``C_out × C_in·kh·kw``) and bias
``b``, write ``W̃ = [W | b]`` (``O × I'``, ``I' = I + 1`` with a bias) and ``ã = [a; 1]`` for its
input. Sample ``n`` applies the layer at ``R_n`` positions ``r`` (one for a plain ``(N, I)``
input; the tokens of a sequence ``(N, T, I)``; the output pixels of a convolution, whose inputs
are the unfolded patches), and its gradient for factor column ``k`` (see
:mod:`ewc.likelihoods`) is ``Σ_r g_nkr ã_nrᵀ``. The exact block of our diagonal's per-sample
mean Fisher (:func:`ewc.fisher_diagonal`) is

.. math::

    F = \frac{1}{N}\sum_n \sum_k \operatorname{vec}\Big(\sum_r g_{nkr}\tilde a_{nr}^\top\Big)
        \operatorname{vec}(\cdot)^\top ,

and KFAC (Martens & Grosse 2015; for positions, *KFAC-expand* of Eschenhagen et al. 2023, which
for a convolution is the KFC of Grosse & Martens 2016) replaces it by ``A ⊗ G`` with

.. math::

    A = \frac{1}{N}\sum_n \frac{1}{R_n}\sum_r \tilde a_{nr}\tilde a_{nr}^\top ,\qquad
    G = \frac{1}{N}\sum_n \sum_k \sum_r g_{nkr} g_{nkr}^\top .

Assumptions made (and nothing else): the per-sample expectation of the product is the product
of the expectations, and the cross terms ``r ≠ r'`` between positions are dropped. So for a
layer without positions and one sample the block is exact (``F = ã ãᵀ ⊗ Σ_k g gᵀ``); with many
samples its diagonal, ``diag(A)[i] · diag(G)[o]``, differs from our diagonal Fisher
``(1/N) Σ_n Σ_k (g_nko ã_ni)²`` only by that factorisation, on the same per-sample-mean scale
(the same λ applies). Split of the scale between the factors: ``A`` is a per-position mean,
``G`` a per-sample sum over positions. ``vec`` stacks columns, so
``vec(ΔW̃)ᵀ (A ⊗ G) vec(ΔW̃) = tr(G ΔW̃ A ΔW̃ᵀ)``, never formed as a matrix.

Every other parameter (norms, embeddings, a grouped or tied layer, a layer whose route is not
verified, see :func:`ewc.fisher_route`) keeps our diagonal Fisher, from the same pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from . import _rules
from . import distributed as _dist
from ._capture import Record
from ._columns import DiagonalSums, column_grads, live_layers
from ._options import FisherOptions, OutputFn, acc_dtype
from ._probe import Router
from ._route import Route
from ._select import ParamSelector
from .estimate import _batches, _factor, prepared
from .fisher import Fisher
from .likelihoods import Likelihood

__all__ = ["fisher_kfac", "estimate_kfac", "KFAC", "KronBlock", "kron_layers"]


# --- The result type ----------------------------------------------------------------------
@dataclass(frozen=True)
class KronBlock:
    r"""One layer's curvature ``Σ_j A_j ⊗ G_j`` (one term from an estimate; more after ``+``).

    Attributes:
        weight: The weight's parameter name; its shape is ``shape``.
        bias: The bias's parameter name (its column is the last of ``A``), or ``None``.
        shape: The weight's shape (``(O, I)``, or ``(C_out, C_in, kh, kw)``).
        terms: ``((A_j (I', I'), G_j (O, O)), ...)``, symmetric PSD.
    """

    weight: str
    bias: str | None
    shape: tuple[int, ...]
    terms: tuple[tuple[Tensor, Tensor], ...]

    @property
    def keys(self) -> tuple[str, ...]:
        """The parameter names the block covers."""
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    def matrix(self, delta: Mapping[str, Tensor], dtype: torch.dtype) -> Tensor:
        """``ΔW̃ = [ΔW | Δb]`` of shape ``(O, I')`` from a displacement keyed by parameter name."""
        dw = delta[self.weight].reshape(self.shape[0], -1).to(dtype)
        if self.bias is None:
            return dw
        return torch.cat([dw, delta[self.bias].reshape(-1, 1).to(dtype)], 1)

    def split(self, m: Tensor) -> dict[str, Tensor]:
        """Inverse of :meth:`matrix`: ``{weight: ..., bias: ...}`` from an ``(O, I')`` matrix."""
        if self.bias is None:
            return {self.weight: m.reshape(self.shape)}
        return {self.weight: m[:, :-1].reshape(self.shape), self.bias: m[:, -1]}

    def quadratic(self, delta: Mapping[str, Tensor]) -> Tensor:
        """``Σ_j tr(G_j ΔW̃ A_j ΔW̃ᵀ)``."""
        a0 = self.terms[0][0]
        d = self.matrix(delta, a0.dtype)
        return torch.stack([((g @ d) @ a * d).sum() for a, g in self.terms]).sum()

    def diagonal(self) -> dict[str, Tensor]:
        """Return the diagonal of ``Σ_j A_j ⊗ G_j``, keyed and shaped as the parameters."""
        m = sum(torch.outer(torch.diagonal(g), torch.diagonal(a)) for a, g in self.terms)
        assert isinstance(m, Tensor)
        return self.split(m)

    def scaled(self, c: float) -> KronBlock:
        """``c · Σ_j A_j ⊗ G_j`` (the scalar goes into the ``G_j``)."""
        terms = tuple((a, c * g) for a, g in self.terms)
        return KronBlock(self.weight, self.bias, self.shape, terms)

    def __add__(self, other: KronBlock) -> KronBlock:
        if (other.weight, other.bias, other.shape) != (self.weight, self.bias, self.shape):
            raise ValueError(
                f"cannot add KFAC blocks of {self.weight!r} {self.shape} and {other.weight!r} "
                f"{other.shape}"
            )
        return KronBlock(self.weight, self.bias, self.shape, self.terms + other.terms)


class KFAC(Mapping[str, KronBlock]):
    r"""A Kronecker-factored Fisher: one :class:`KronBlock` per layer, a diagonal for the rest.

    A mapping ``layer name -> KronBlock``; :attr:`rest` is the :class:`~ewc.Fisher` of every
    other covered parameter. The scale is the per-sample mean of :func:`ewc.fisher_diagonal`
    (see :mod:`ewc.kfac`), so ``quadratic`` is comparable with :meth:`ewc.Fisher.quadratic` and
    takes the same λ. ``+`` is exact (a sum of Kronecker products is kept as a sum of terms;
    the quadratic's cost grows with the number of terms), ``*`` by a scalar scales each term.

    Args:
        blocks: ``{layer name: KronBlock}``.
        rest: The diagonal Fisher of the other parameters (may be empty).
        n_samples: Data points averaged over (``None`` after arithmetic).
        kind: ``"sampled"``, ``"empirical"``, ``"exact"`` or ``None``.
    """

    def __init__(
        self,
        blocks: Mapping[str, KronBlock],
        rest: Fisher | None = None,
        *,
        n_samples: int | None = None,
        kind: str | None = None,
    ) -> None:
        self._blocks = dict(blocks)
        self.rest = rest if rest is not None else Fisher({})
        self.n_samples = n_samples
        self.kind = kind

    def __getitem__(self, name: str) -> KronBlock:
        return self._blocks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    def __repr__(self) -> str:
        terms = max((len(b.terms) for b in self._blocks.values()), default=0)
        return (
            f"KFAC({len(self)} Kronecker blocks of up to {terms} term(s), {len(self.rest)} "
            f"diagonal tensors, kind={self.kind!r}, n_samples={self.n_samples})"
        )

    @property
    def params(self) -> list[str]:
        """Every parameter name covered: the blocks' weights and biases, then the rest."""
        return [k for b in self._blocks.values() for k in b.keys] + list(self.rest)

    def quadratic(self, delta: Mapping[str, Tensor]) -> Tensor:
        r"""``Σ_layers Σ_j tr(G_j ΔW̃ A_j ΔW̃ᵀ) + Σ_i F_i δ_i²`` (rest) for a displacement ``δ``."""
        terms = [b.quadratic(delta) for b in self._blocks.values()]
        if len(self.rest):
            terms.append(self.rest.quadratic(delta))
        if not terms:
            raise ValueError("the KFAC covers no parameters")
        return torch.stack([t.to(terms[0].dtype) for t in terms]).sum()

    def diagonal(self) -> Fisher:
        """Return the approximation's diagonal, a :class:`~ewc.Fisher` over :attr:`params`."""
        out: dict[str, Tensor] = {}
        for b in self._blocks.values():
            out.update(b.diagonal())
        out.update(self.rest)
        return Fisher(out, n_samples=self.n_samples, kind=self.kind)

    def __add__(self, other: object) -> KFAC:
        if not isinstance(other, KFAC):
            return NotImplemented
        if set(self) != set(other):
            diff = sorted(set(self) ^ set(other))
            raise KeyError(f"cannot add KFACs over different layers: {diff}")
        blocks = {n: self[n] + other[n] for n in self}
        return KFAC(blocks, self.rest + other.rest)

    def __mul__(self, scalar: object) -> KFAC:
        if isinstance(scalar, Tensor) and scalar.numel() == 1:
            scalar = scalar.item()
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        if scalar < 0:
            raise ValueError(f"a Fisher is PSD: cannot scale it by {scalar}")
        c = float(scalar)
        return KFAC({n: b.scaled(c) for n, b in self._blocks.items()}, self.rest * c)

    __rmul__ = __mul__

    def validate(self) -> None:
        """Raise :class:`ValueError` unless the factors are finite, square, non-negative diagonal.

        The rest must be a valid diagonal Fisher.
        """
        for name, b in self._blocks.items():
            for j, (a, g) in enumerate(b.terms):
                for label, t in (("A", a), ("G", g)):
                    if not bool(torch.isfinite(t).all()):
                        raise ValueError(
                            f"KFAC factor {label} of layer {name!r} (term {j}) has non-finite "
                            "values; check the model for overflow"
                        )
                    if t.dim() != 2 or t.shape[0] != t.shape[1]:
                        raise ValueError(f"KFAC factor {label} of {name!r} is not square")
                    if bool((torch.diagonal(t) < 0).any()):
                        raise ValueError(f"KFAC factor {label} of {name!r} is not PSD")
        self.rest.validate()


# --- Which layers get a Kronecker block ---------------------------------------------------
@dataclass(frozen=True)
class _Layer:
    """A KFAC layer of a route: its module, parameter keys and whether it is a convolution."""

    module: nn.Module
    weight: str
    bias: str | None
    conv: bool


def kron_layers(route: Route) -> dict[str, _Layer]:
    """Return the fast layers of a verified ``route`` that take a Kronecker block.

    ``nn.Linear`` and ``nn.Conv2d`` (``groups=1``, zero padding) whose weight is selected and
    is not tied to another layer; every other fast layer keeps its diagonal closed form.
    """
    part = route.partition
    tied = {n for _, lin, emb in part.ties for n in (lin, emb)}
    out: dict[str, _Layer] = {}
    for name, module in part.fast.items():
        rule, names = part.rules[name], part.names[name]
        if name in tied or "weight" not in names:
            continue
        if rule.diagonal is _rules.linear and type(module).forward is nn.Linear.forward:
            conv = False
        elif isinstance(module, nn.Conv2d) and rule.diagonal is _rules.conv and module.groups == 1:
            conv = True
        else:
            continue
        out[name] = _Layer(module, names["weight"], names.get("bias"), conv)
    return out


def _positions(layer: _Layer, x: Tensor, n: int) -> Tensor:
    """Return the layer's inputs as ``(N, R, I')`` rows (bias column of ones appended)."""
    if layer.conv:
        m = layer.module
        xp, padding = _rules._conv_padding(m, x, 2)
        cols = F.unfold(xp, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
        a = cols.transpose(1, 2)  # (N, L, C_in·kh·kw)
    else:
        a = x.reshape(n, -1, x.shape[-1])
    if layer.bias is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], 2)
    return a


def _out_rows(layer: _Layer, g: Tensor) -> Tensor:
    """Return an output gradient as ``(N·R, O)`` rows."""
    if layer.conv:
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2).reshape(-1, g.shape[1])
    return g.reshape(-1, g.shape[-1])


# --- The per-batch math -------------------------------------------------------------------
def accumulate_kfac(
    route: Route,
    layers: Mapping[str, _Layer],
    records: Mapping[str, Record],
    z: Tensor,
    s: Tensor,
    sums: dict[str, Tensor],
) -> None:
    """Add one batch to the factor sums and to the other fast layers' diagonal sums.

    Factor sums are keyed ``"A:<layer>"``, ``"G:<layer>"``; diagonal sums by parameter name.

    ``A += (1/R) Σ_{n,r} ã ãᵀ`` once per batch; ``G += Σ_{n,r} g gᵀ`` per factor column, from
    the shared column backprop (:func:`ewc._columns.column_grads`), in float32 or wider.
    """
    n = z.shape[0]
    acc = acc_dtype(z.dtype)
    for name, layer in layers.items():
        a = _positions(layer, records[name].x.to(acc), n)
        _gram_upper_(sums[f"A:{name}"], a.reshape(-1, a.shape[-1]), 1.0 / a.shape[1])
    live = live_layers(route, records, z)
    if not live:
        return
    diag = DiagonalSums(route, records, z, sums, live, skip=frozenset(layers))
    kron = [(name, layers[name]) for name in live if name in layers]
    for grads in column_grads(route, records, z, s, live):
        diag.column(grads)
        for name, layer in kron:
            g = _out_rows(layer, grads[name].to(acc))
            _gram_upper_(sums[f"G:{name}"], g, 1.0)
    diag.finish()


def _gram_upper_(acc: Tensor, rows: Tensor, alpha: float) -> None:
    """``acc += alpha · rowsᵀ rows`` on and above the diagonal only (``rows``: ``(M, D)``).

    Row blocks of the upper triangle: about half the multiply-adds of the full product for
    large ``D`` (torch has no symmetric rank-k update); :func:`_symmetric` fills the rest.
    """
    d = rows.shape[1]
    nb = max(1, min(8, d // 128))
    edges = [round(k * d / nb) for k in range(nb + 1)]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        acc[lo:hi, lo:].addmm_(rows[:, lo:hi].T, rows[:, lo:], alpha=alpha)


def _symmetric(upper: Tensor) -> Tensor:
    """Return the symmetric matrix whose upper triangle is that of ``upper``."""
    return torch.triu(upper) + torch.triu(upper, 1).T


# --- The public entry ---------------------------------------------------------------------
def fisher_kfac(
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
) -> KFAC:
    r"""Estimate a Kronecker-factored Fisher of ``model`` over ``data``.

    Each ``nn.Linear`` and ``nn.Conv2d`` (``groups=1``) whose route is verified (see
    :func:`ewc.fisher_route`) gets a block ``A ⊗ G`` with ``A (I', I')`` the per-position
    mean of its inputs' outer products (bias column of ones folded in) and ``G (O, O)`` the
    per-sample sum over positions of its output gradients' outer products, both means over the
    ``N`` samples (see :mod:`ewc.kfac` for the exact expectation and its scale). Every other
    selected parameter gets our diagonal Fisher from the same forward and backward passes.

    The arguments mean what they mean for :func:`ewc.fisher_diagonal` (the same per-sample
    convention: eval mode, batch-size independent, float32 or wider accumulation, the same
    ``kind`` and label draws); ``dtype`` sets the storage dtype of factors and diagonal.

    Returns:
        A :class:`KFAC`.

    Cost: one forward pass and one backward pass per factor column to the layer outputs (as
    the diagonal), plus per layer ``aᵀa`` and ``gᵀg`` (``N·R·(I'² + O²)`` multiply-adds).
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
    return estimate_kfac(model, data, opts)


def estimate_kfac(model: nn.Module, data: Iterable[Any], opts: FisherOptions) -> KFAC:
    """:func:`fisher_kfac` with its options as one validated object."""
    with prepared(model, data, opts) as (model, trainable, limit, reduction):
        return _estimate(model, data, opts, trainable, limit, reduction)


def _estimate(
    model: nn.Module,
    data: Iterable[Any],
    opts: FisherOptions,
    trainable: dict[str, nn.Parameter],
    limit: int | None,
    reduction: _dist.Reduction | None,
) -> KFAC:
    device = next(iter(trainable.values())).device
    router = Router(model, trainable, opts)
    layers: dict[str, _Layer] | None = None
    sums: dict[str, Tensor] = {}
    seen = 0

    def step(item: tuple[int, Any, Tensor | None, int]) -> None:
        nonlocal layers, sums, seen
        idx, inputs, targets, size = item
        route, z, records = router.forward(inputs, size)
        if layers is None:
            layers = kron_layers(route)
            sums = _init_sums(trainable, layers)
        else:
            _check_same(layers, route, idx)
        s = _factor(z, targets, size, idx, opts).to(z.dtype)
        accumulate_kfac(route, layers, records, z, s, sums)
        del records, z
        if route.rest:
            for n, val in router.generic_squares(route, inputs, s).items():
                sums[n] += val.to(sums[n].dtype)
        seen += size

    # under a reduction, every batch starts with a status round: a failing rank stops all
    _dist.run_steps(_batches(data, opts, limit, device), reduction, step, device)
    if reduction is not None:
        # the factors' layout comes from a forward pass: a rank without one cannot join
        empty = None
        if layers is None:
            empty = ValueError(
                "this rank's data yielded no batches: fisher_kfac reads the Kronecker layers "
                "from a forward pass, so every rank needs at least one batch"
            )
        reduction.agree(empty, device=device)
        seen = reduction.all_reduce(sums, seen)
    if seen == 0 or layers is None:
        raise ValueError("data yielded no samples: the Fisher needs at least one data point")
    return _result(trainable, layers, sums, seen, opts)


def _init_sums(
    trainable: Mapping[str, nn.Parameter], layers: Mapping[str, _Layer]
) -> dict[str, Tensor]:
    covered = {k for layer in layers.values() for k in (layer.weight, layer.bias) if k}
    sums = {
        n: torch.zeros(p.shape, dtype=acc_dtype(p.dtype), device=p.device)
        for n, p in trainable.items()
        if n not in covered
    }
    for name, layer in layers.items():
        w = trainable[layer.weight]
        i = w[0].numel() + (layer.bias is not None)
        kw = {"dtype": acc_dtype(w.dtype), "device": w.device}
        sums[f"A:{name}"] = torch.zeros(i, i, **kw)
        sums[f"G:{name}"] = torch.zeros(w.shape[0], w.shape[0], **kw)
    return sums


def _check_same(layers: Mapping[str, _Layer], route: Route, idx: int) -> None:
    now = kron_layers(route)
    lost = [n for n in layers if n not in now]
    if lost:
        why = route.excluded.get(lost[0], "its route changed")
        raise ValueError(
            f"layer {lost[0]!r} took a Kronecker block on the first batch but not on batch "
            f"{idx} ({why}); give every batch the same input structure, or leave the layer out "
            "with params="
        )


def _result(
    trainable: Mapping[str, nn.Parameter],
    layers: Mapping[str, _Layer],
    sums: Mapping[str, Tensor],
    seen: int,
    opts: FisherOptions,
) -> KFAC:
    def store(t: Tensor, like: str) -> Tensor:
        return (t / seen).to(opts.dtype or trainable[like].dtype)

    blocks = {}
    for name, layer in layers.items():
        a, g = sums[f"A:{name}"], sums[f"G:{name}"]
        a, g = _symmetric(a), _symmetric(g)
        shape = tuple(trainable[layer.weight].shape)
        term = (store(a, layer.weight), store(g, layer.weight))
        blocks[name] = KronBlock(layer.weight, layer.bias, shape, (term,))
    rest = Fisher(
        {n: store(v, n) for n, v in sums.items() if n in trainable},
        n_samples=seen,
        kind=opts.kind,
    )
    kfac = KFAC(blocks, rest, n_samples=seen, kind=opts.kind)
    kfac.validate()
    return kfac
