r"""Likelihoods: how a model's outputs define ``p(y | x, θ)`` and its output-space Fisher.

Every Fisher estimator here works by back-propagating, from the model's output ``z_n`` of each
sample, the columns of a factor ``S_n`` (shape ``(K, *z_n.shape)``) with

.. math::

    \sum_k s_{nk} s_{nk}^\top \approx \mathbb{E}_{y}\big[\nabla_z \log p(y|z_n)\,
    \nabla_z \log p(y|z_n)^\top\big],

exactly for ``kind="exact"`` and as an unbiased Monte-Carlo estimate for ``kind="sampled"``
(``kind="empirical"`` uses the dataset's label instead of the expectation). Then the diagonal
Fisher of sample ``n`` is ``Σ_k (J_nᵀ s_nk)²`` with ``J_n = ∂z_n/∂θ``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

__all__ = ["Likelihood", "Categorical", "Gaussian", "CustomNLL", "get_likelihood", "Kind"]

Kind = Literal["sampled", "empirical", "exact"]
KINDS: tuple[str, ...] = ("sampled", "empirical", "exact")


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Draw uniforms in float64 on the CPU, row-major.

    Draws are consumed sample by sample, so they do not depend on how a data set is split into
    batches: the sampled Fisher is batch-size independent for a fixed generator.
    """
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return u.to(like.device)


class Likelihood:
    """Base class: a per-sample likelihood ``p(y | z)`` over the model output ``z``."""

    name: str = "likelihood"

    def check(self, outputs: Tensor, targets: Tensor | None, kind: str) -> None:
        """Raise :class:`ValueError` if ``outputs``/``targets`` do not fit this likelihood."""

    def factor(
        self,
        outputs: Tensor,
        targets: Tensor | None,
        kind: str,
        *,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Return the factor ``S`` of shape ``(K, *outputs.shape)`` described in the module doc.

        ``outputs`` is detached; the result carries no graph.
        """
        raise NotImplementedError

    def config(self) -> dict[str, object]:
        """Return a JSON-serialisable description (stored in saved EWC state)."""
        return {"name": self.name}


class Categorical(Likelihood):
    r"""Softmax cross-entropy classification: ``p(y | z) = softmax(z)_y``.

    ``outputs`` has shape ``(N, C)`` or ``(N, ..., C)`` (class dimension **last**); ``targets``
    has shape ``(N,)`` or ``(N, ...)`` with integer classes in ``[0, C)``. With extra dimensions
    (the tokens of a sequence) one sample is still one ``x_n``: its log-likelihood is the sum
    over positions, ``log p(y_n | x_n) = Σ_t log p(y_nt | x_n)``, and that sum is taken *inside*
    the square of the per-sample gradient.

    Positions whose target equals ``ignore_index`` (PyTorch's and Hugging Face's ``-100``:
    padding, prompt tokens) are left out of the sum, for every ``kind``: with integer targets
    of shape ``outputs.shape[:-1]``, ``"sampled"`` draws labels and ``"exact"`` takes the
    expectation only at the other positions. (For ``"sampled"``/``"exact"`` targets of any other
    shape are ignored, as bare inputs are.) A sample whose positions are all ignored
    contributes zero but still counts in ``N``.

    The output-space Fisher of one position is ``diag(p) − p pᵀ``, factored exactly by ``C − 1``
    columns; positions are independent given ``x_n``, so ``kind="exact"`` uses
    ``(C − 1) × positions`` columns (for a language model's vocabulary, use ``"sampled"``).

    Args:
        ignore_index: Target value marking positions to leave out (``None``: none).
    """

    name = "classification"

    def __init__(self, ignore_index: int | None = -100) -> None:
        if ignore_index is not None and not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")
        self.ignore_index = ignore_index

    def _mask(self, outputs: Tensor, targets: Tensor | None, kind: str) -> Tensor | None:
        """Boolean ``(N, ...)`` mask of the counted positions, or ``None`` (all count)."""
        if targets is None or self.ignore_index is None:
            return None
        if kind != "empirical" and (
            targets.is_floating_point()
            or targets.is_complex()
            or tuple(targets.shape) != tuple(outputs.shape[:-1])
        ):
            return None
        mask = targets != self.ignore_index
        return None if bool(mask.all()) else mask

    def check(self, outputs: Tensor, targets: Tensor | None, kind: str) -> None:  # noqa: D102
        if outputs.dim() < 2:
            raise ValueError(
                "classification needs model outputs of shape (N, C) or (N, ..., C) with the "
                f"class dimension last; got shape {tuple(outputs.shape)}"
            )
        if kind != "empirical" or targets is None:
            return
        if targets.is_floating_point() or targets.is_complex():
            raise ValueError(
                f"classification targets must be integer class indices, got dtype {targets.dtype}"
            )
        if tuple(targets.shape) != tuple(outputs.shape[:-1]):
            raise ValueError(
                f"targets of shape {tuple(targets.shape)} do not match outputs of shape "
                f"{tuple(outputs.shape)} (expected {tuple(outputs.shape[:-1])})"
            )
        n_classes = outputs.shape[-1]
        counted = targets if self.ignore_index is None else targets[targets != self.ignore_index]
        if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= n_classes):
            ignored = "" if self.ignore_index is None else f" besides {self.ignore_index}"
            raise ValueError(
                f"labels out of range: got labels{ignored} in [{int(counted.min())}, "
                f"{int(counted.max())}] but the model has {n_classes} classes [0, {n_classes})"
            )

    def factor(  # noqa: D102
        self,
        outputs: Tensor,
        targets: Tensor | None,
        kind: str,
        *,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        mask = self._mask(outputs, targets, kind)
        s = self._factor(outputs, targets, kind, mc_samples, generator, mask)
        if mask is not None:  # zero the ignored positions of every column
            s.masked_fill_(~mask.unsqueeze(-1), 0.0)  # every branch returns a new tensor
        return s

    def _factor(
        self,
        outputs: Tensor,
        targets: Tensor | None,
        kind: str,
        mc_samples: int,
        generator: torch.Generator | None,
        mask: Tensor | None,
    ) -> Tensor:
        p = torch.softmax(outputs, dim=-1)
        if kind == "exact":
            positions = math.prod(p.shape[1:-1])
            size = positions * (p.shape[-1] - 1) * p.numel()
            if size > _MAX_FACTOR_ELEMENTS:
                raise ValueError(
                    f"kind='exact' needs {positions} positions × {p.shape[-1] - 1} classes = "
                    f"{positions * (p.shape[-1] - 1):,} backward passes per batch and a factor of "
                    f"{size:,} elements for outputs of shape {tuple(p.shape)}; use "
                    "kind='sampled' (mc_samples=... for a lower-variance estimate) or smaller "
                    "batches"
                )
            cols = _softmax_fisher_factor(p)  # (C-1, *outputs.shape)
            if positions == 1:
                return cols
            # one column per (position, class): only that position is non-zero
            mask_p = torch.eye(positions, dtype=p.dtype, device=p.device)
            mask_p = mask_p.reshape(positions, 1, 1, *p.shape[1:-1], 1)
            out = cols.unsqueeze(0) * mask_p  # (P, C-1, N, ..., C)
            return out.reshape(positions * cols.shape[0], *p.shape)
        if kind == "empirical":
            assert targets is not None
            labels = targets.long() if mask is None else targets.long().masked_fill(~mask, 0)
            return _minus_onehot(p.unsqueeze(0), labels.unsqueeze(0))
        # sampled: inverse-CDF draws from the model's own predictive distribution
        u = _uniform((*p.shape[:-1], mc_samples), generator, p)
        labels = _inverse_cdf(p, u)
        grads = _minus_onehot(p.unsqueeze(0).expand(mc_samples, *p.shape), labels.movedim(-1, 0))
        return grads if mc_samples == 1 else grads.div_(math.sqrt(mc_samples))

    def config(self) -> dict[str, object]:  # noqa: D102
        return {"name": self.name, "ignore_index": self.ignore_index}


_MAX_FACTOR_ELEMENTS = 1 << 31  # the exact factor of a large vocabulary would not fit anyway
_BLOCK = 128  # classes per block of the two-level inverse-CDF search


def _inverse_cdf(p: Tensor, u: Tensor) -> Tensor:
    """Return the smallest class ``c`` with ``Σ_{c' ≤ c} p_c' ≥ u`` for each row and draw.

    Shapes: ``p`` ``(..., C)``, ``u`` ``(..., M)`` float64, result ``(..., M)``.

    Sums are formed in float64. For large ``C`` (a vocabulary) the search runs on block sums
    first and then inside the chosen block, which avoids a sequential cumulative sum over ``C``.
    """
    n_classes = p.shape[-1]
    if n_classes < 8 * _BLOCK:
        cdf = p.double().cumsum(-1)
        return torch.searchsorted(cdf.contiguous(), u.contiguous()).clamp_(max=n_classes - 1)
    pad = (-n_classes) % _BLOCK
    pp = torch.nn.functional.pad(p, (0, pad)) if pad else p
    blocks = pp.reshape(*p.shape[:-1], -1, _BLOCK)  # (..., B, K)
    block_cdf = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # (..., B)
    b = torch.searchsorted(block_cdf.contiguous(), u.contiguous())
    b = b.clamp_(max=blocks.shape[-2] - 1)  # (..., M)
    before = torch.where(b > 0, block_cdf.gather(-1, (b - 1).clamp(min=0)), 0.0)
    inside = blocks.unsqueeze(-3).expand(*b.shape, -1, _BLOCK)  # (..., M, B, K) view
    chosen = inside.gather(-2, b[..., None, None].expand(*b.shape, 1, _BLOCK)).squeeze(-2)
    cdf = chosen.double().cumsum(-1) + before.unsqueeze(-1)  # (..., M, K)
    k = torch.searchsorted(cdf.contiguous(), u.unsqueeze(-1).contiguous()).squeeze(-1)
    return (b * _BLOCK + k.clamp_(max=_BLOCK - 1)).clamp_(max=n_classes - 1)


def _minus_onehot(p: Tensor, labels: Tensor) -> Tensor:
    """``p − onehot(labels)`` (the gradient of ``−log p_y`` in the logits) without a one-hot.

    ``p`` is ``(M, ..., C)`` (possibly an expanded view), ``labels`` ``(M, ...)``; returns a new
    tensor.
    """
    out = p.clone(memory_format=torch.contiguous_format)
    out.scatter_add_(-1, labels.unsqueeze(-1), out.new_full((*labels.shape, 1), -1.0))
    return out


def _softmax_fisher_factor(p: Tensor) -> Tensor:
    r"""Return an exact rank-``(C−1)`` factor of ``diag(p) − p pᵀ`` (batched over leading dims).

    With ``q = √p`` (a unit vector), ``diag(p) − p pᵀ = diag(q) (I − q qᵀ) diag(q)``, and
    ``I − q qᵀ = V Vᵀ`` for the ``C − 1`` columns ``V`` of the Householder reflection ``Q`` that
    maps ``q`` to a multiple of ``e_r`` (all columns but ``r``, since ``Q e_r = ±q``). Taking
    ``r = argmax q`` keeps the reflection well conditioned. Returns ``diag(q) V`` as
    ``(C − 1, *p.shape)``: one column fewer to back-propagate than ``√p_c (p − e_c)``.
    """
    n_classes = p.shape[-1]
    if n_classes == 1:
        return p.new_zeros(0, *p.shape)
    q = p.clamp_min(0).sqrt()
    q = q / q.norm(dim=-1, keepdim=True)  # guard against rounding in softmax
    r = q.argmax(-1, keepdim=True)  # (..., 1)
    q_r = q.gather(-1, r)
    w = q.scatter_add(-1, r, torch.ones_like(q_r))  # q + e_r  (q_r > 0: no cancellation)
    # Q = I - 2 w wᵀ / (wᵀw); wᵀw = 2 (1 + q_r)
    eye = torch.eye(n_classes, dtype=p.dtype, device=p.device)
    big_q = eye - (w.unsqueeze(-1) * w.unsqueeze(-2)) / (1.0 + q_r).unsqueeze(-1)
    keep = torch.arange(n_classes - 1, device=p.device)
    keep = keep + (keep >= r).long()  # (..., C-1): every column but r
    cols = big_q.gather(-1, keep.unsqueeze(-2).expand(*p.shape, n_classes - 1))
    return (q.unsqueeze(-1) * cols).movedim(-1, 0)


class Gaussian(Likelihood):
    r"""Gaussian regression: ``p(y | z) = N(y; z, σ² I)``.

    ``outputs`` and ``targets`` have the same shape ``(N, ...)``. The output-space Fisher is
    ``I / σ²``; ``kind="exact"`` factors it by one column per output entry.

    Args:
        sigma: Observation noise standard deviation ``σ > 0``.
    """

    name = "regression"

    def __init__(self, sigma: float = 1.0) -> None:
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
        self.sigma = float(sigma)

    def check(self, outputs: Tensor, targets: Tensor | None, kind: str) -> None:  # noqa: D102
        if kind == "empirical" and targets is not None:
            if tuple(targets.shape) != tuple(outputs.shape):
                raise ValueError(
                    f"regression targets of shape {tuple(targets.shape)} do not match outputs "
                    f"of shape {tuple(outputs.shape)}"
                )
            if not bool(torch.isfinite(targets).all()):
                raise ValueError("regression targets contain NaN or inf")

    def factor(  # noqa: D102
        self,
        outputs: Tensor,
        targets: Tensor | None,
        kind: str,
        *,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        s2 = self.sigma**2
        if kind == "empirical":
            assert targets is not None
            return ((outputs - targets.to(outputs.dtype)) / s2).unsqueeze(0)
        if kind == "exact":
            d = math.prod(outputs.shape[1:])
            eye = torch.eye(d, dtype=outputs.dtype, device=outputs.device) / self.sigma
            cols = eye.reshape(d, 1, *outputs.shape[1:])
            return cols.expand(d, *outputs.shape).contiguous()
        # sampled: y = z + σ ε, gradient (z - y)/σ² = -ε/σ; Box-Muller keeps draws per sample
        u = _uniform((outputs.shape[0], 2, mc_samples, *outputs.shape[1:]), generator, outputs)
        eps = torch.sqrt(-2.0 * torch.log1p(-u[:, 0])) * torch.cos(2.0 * math.pi * u[:, 1])
        return (-eps / self.sigma).to(outputs.dtype).movedim(1, 0) / math.sqrt(mc_samples)

    def config(self) -> dict[str, object]:  # noqa: D102
        return {"name": self.name, "sigma": self.sigma}


class CustomNLL(Likelihood):
    """A user-supplied per-sample negative log-likelihood, for ``kind="empirical"`` only.

    Args:
        nll: ``nll(outputs, targets) -> Tensor`` of shape ``(N,)``: the negative
            log-likelihood of each sample. It must treat samples independently.
    """

    name = "custom"

    def __init__(self, nll: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.nll = nll

    def check(self, outputs: Tensor, targets: Tensor | None, kind: str) -> None:  # noqa: D102
        if kind != "empirical":
            raise ValueError(
                f"a custom negative log-likelihood supports only kind='empirical' (got "
                f"kind={kind!r}): sampling labels or taking the exact expectation needs a "
                "known distribution; use likelihood='classification' or 'regression'"
            )

    def factor(  # noqa: D102
        self,
        outputs: Tensor,
        targets: Tensor | None,
        kind: str,
        *,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        z = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            losses = self.nll(z, targets)  # type: ignore[arg-type]
            if not isinstance(losses, Tensor) or losses.shape != (outputs.shape[0],):
                shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses)
                raise ValueError(
                    f"the custom nll must return per-sample losses of shape "
                    f"({outputs.shape[0]},), got {shape}; use reduction='none' and sum over "
                    "non-batch dimensions"
                )
            if not bool(torch.isfinite(losses).all()):
                raise ValueError("the custom nll returned a non-finite loss")
            (grad,) = torch.autograd.grad(losses.sum(), z)
        return grad.unsqueeze(0)

    def config(self) -> dict[str, object]:  # noqa: D102
        return {"name": self.name, "nll": getattr(self.nll, "__name__", repr(self.nll))}


def get_likelihood(likelihood: str | Likelihood | Callable[[Tensor, Tensor], Tensor]) -> Likelihood:
    """Resolve ``"classification"``, ``"regression"``, a :class:`Likelihood` or a callable."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, str):
        if likelihood == "classification":
            return Categorical()
        if likelihood == "regression":
            return Gaussian()
        raise ValueError(
            f"unknown likelihood {likelihood!r}; use 'classification', 'regression', "
            "ewc.Gaussian(sigma=...), or a callable per-sample nll(outputs, targets)"
        )
    if callable(likelihood):
        return CustomNLL(likelihood)
    raise TypeError(f"likelihood must be a string, a Likelihood or a callable, got {likelihood!r}")
