r"""The Laplace view of EWC: a diagonal Gaussian posterior over the weights, and its predictive.

EWC's penalty is the negative log-density of a Gaussian. After the consolidated tasks, with the
merged precision ``A = Σ_t F_t`` (per-sample-mean Fishers) and anchor ``μ`` of :class:`ewc.EWC`,

.. math::

    q(\theta) = \mathcal{N}\big(\theta;\ \mu,\ \operatorname{diag}(\lambda A + \tau)^{-1}\big),
    \qquad -\log q(\theta) = \tfrac{\lambda}{2} \textstyle\sum_i A_i (\theta_i - \mu_i)^2
    + \tfrac{\tau}{2} \sum_i (\theta_i - \mu_i)^2 + \text{const},

where ``τ`` is an optional isotropic prior precision. Because our Fisher is a **mean** over the
``N`` data points, ``λ = N`` gives the Laplace posterior of those ``N`` points (the Hessian of the
summed negative log-likelihood is ``N`` times the mean one); a smaller λ tempers it.

:class:`DiagonalGaussian` holds ``(mean, precision)`` per parameter; :func:`predictive` averages
a model's softmax over weights drawn from it, through :func:`torch.func.functional_call`, so the
model itself is never modified.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed as _dist

__all__ = ["DiagonalGaussian", "predictive", "laplace_posterior"]

_LOG_2PI = math.log(2.0 * math.pi)


class DiagonalGaussian:
    r"""A Gaussian with diagonal covariance over named parameter tensors.

    Args:
        mean: ``{name: tensor}``, the mean ``μ`` of each parameter (any shape).
        precision: ``{name: tensor}`` with the same keys and shapes: the precision
            ``1/σ²`` of every entry, finite and ``≥ 0``. An entry of precision 0 is
            unconstrained (an improper flat density): :meth:`sample`, :meth:`log_prob`,
            :meth:`entropy` and :meth:`kl` refuse it and ask for a prior precision.

    Tensors are copied (detached); the precision is cast to each mean's dtype and device.

    Example:
        >>> import torch
        >>> q = DiagonalGaussian({"w": torch.zeros(2)}, {"w": torch.tensor([1.0, 4.0])})
        >>> q.variance["w"]
        tensor([1.0000, 0.2500])
        >>> len(q.sample(3))
        3
    """

    __slots__ = ("_mean", "_precision")

    def __init__(self, mean: Mapping[str, Tensor], precision: Mapping[str, Tensor]) -> None:
        if set(mean) != set(precision):
            diff = sorted(set(mean) ^ set(precision))
            raise ValueError(f"mean and precision must have the same keys; differing: {diff[:5]}")
        if not mean:
            raise ValueError("a DiagonalGaussian needs at least one parameter tensor")
        self._mean: dict[str, Tensor] = {}
        self._precision: dict[str, Tensor] = {}
        for name, mu in mean.items():
            prec = precision[name]
            if not isinstance(mu, Tensor) or not isinstance(prec, Tensor):
                raise TypeError(f"mean and precision of {name!r} must be torch.Tensors")
            if not mu.is_floating_point():
                raise TypeError(f"the mean of {name!r} must be floating point, got {mu.dtype}")
            if tuple(mu.shape) != tuple(prec.shape):
                raise ValueError(
                    f"{name!r}: mean has shape {tuple(mu.shape)} but precision has shape "
                    f"{tuple(prec.shape)}"
                )
            prec = prec.detach().to(device=mu.device, dtype=mu.dtype)
            if not bool(torch.isfinite(prec).all()) or bool((prec < 0).any()):
                raise ValueError(f"the precision of {name!r} must be finite and >= 0")
            if not bool(torch.isfinite(mu).all()):
                raise ValueError(f"the mean of {name!r} has non-finite values")
            self._mean[name] = mu.detach().clone()
            self._precision[name] = prec.clone()

    # --- Moments ------------------------------------------------------------------------
    @property
    def mean(self) -> dict[str, Tensor]:
        """``{name: μ}`` (a new dict of the stored tensors; do not modify them in place)."""
        return dict(self._mean)

    @property
    def precision(self) -> dict[str, Tensor]:
        """``{name: 1/σ²}`` per entry."""
        return dict(self._precision)

    @property
    def variance(self) -> dict[str, Tensor]:
        """``{name: σ² = 1/precision}`` (``inf`` where the precision is 0)."""
        return {n: p.reciprocal() for n, p in self._precision.items()}

    @property
    def numel(self) -> int:
        """Number of scalar dimensions ``d``."""
        return sum(t.numel() for t in self._mean.values())

    def __repr__(self) -> str:
        return f"DiagonalGaussian({len(self._mean)} tensors, {self.numel} entries)"

    def _proper(self, what: str) -> None:
        for name, p in self._precision.items():
            zero = int((p == 0).sum())
            if zero:
                raise ValueError(
                    f"cannot {what}: {zero} entries of {name!r} have precision 0 (no data "
                    "constrains them, so the density is improper); pass a prior, e.g. "
                    "ewc.posterior(prior_precision=1e-4), or add one to the precision"
                )

    # --- Densities ----------------------------------------------------------------------
    def sample(
        self, n: int = 1, generator: torch.Generator | None = None
    ) -> list[dict[str, Tensor]]:
        """Draw ``n`` independent samples ``θ = μ + ε / √precision``, ``ε ~ N(0, I)``.

        Draws are made one sample and one tensor at a time, in key order, on the generator's
        device (CPU by default) and then moved, so ``sample(n)`` gives the same values as ``n``
        calls of ``sample(1)`` with the same generator.

        Returns:
            A list of ``n`` dicts ``{name: tensor}`` shaped like :attr:`mean`.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        self._proper("sample")
        where = generator.device if generator is not None else None
        out: list[dict[str, Tensor]] = []
        for _ in range(n):
            draw: dict[str, Tensor] = {}
            for name, mu in self._mean.items():
                eps = torch.randn(
                    mu.shape, generator=generator, dtype=mu.dtype, device=where or mu.device
                ).to(mu.device)
                draw[name] = mu + eps * self._precision[name].rsqrt()
            out.append(draw)
        return out

    def log_prob(self, params: Mapping[str, Tensor]) -> Tensor:
        r"""Return ``log q(θ) = Σ_i [½ log(τ_i / 2π) − ½ τ_i (θ_i − μ_i)²]`` (a 0-dim tensor).

        ``params`` maps every key of the mean to a tensor of its shape (extra keys, such as
        parameters the posterior does not cover, are ignored). Differentiable in ``params``;
        summed in float64.
        """
        self._proper("evaluate log_prob")
        missing = [n for n in self._mean if n not in params]
        if missing:
            raise KeyError(
                f"log_prob needs every parameter of the posterior; missing {missing[:5]}"
            )
        total: Tensor | None = None
        for name, mu in self._mean.items():
            theta = params[name]
            if tuple(theta.shape) != tuple(mu.shape):
                raise ValueError(
                    f"{name!r} has shape {tuple(theta.shape)}, the posterior expects "
                    f"{tuple(mu.shape)}"
                )
            prec = self._precision[name].to(theta.device).double()
            diff = theta.double() - mu.to(theta.device).double()
            term = 0.5 * (prec.log() - _LOG_2PI).sum() - 0.5 * (prec * diff.square()).sum()
            total = term if total is None else total + term
        assert total is not None
        return total

    def entropy(self) -> Tensor:
        r"""Return ``H[q] = ½ Σ_i (1 + log 2π − log τ_i)`` (float64, 0-dim)."""
        self._proper("compute the entropy")
        terms = [0.5 * (1.0 + _LOG_2PI - p.double().log()).sum() for p in self._precision.values()]
        return torch.stack([t.cpu() for t in terms]).sum()

    def kl(self, other: DiagonalGaussian) -> Tensor:
        r"""Return ``KL(self ‖ other)`` (float64, 0-dim).

        .. math::

            \mathrm{KL} = \tfrac12 \sum_i \Big[\frac{\tau^o_i}{\tau_i}
            + \tau^o_i (\mu_i - \mu^o_i)^2 - 1 + \log\frac{\tau_i}{\tau^o_i}\Big],

        with ``τ`` the precisions of ``self`` and ``τᵒ`` those of ``other`` (same keys and shapes).
        """
        if not isinstance(other, DiagonalGaussian):
            raise TypeError(f"kl needs another DiagonalGaussian, got {type(other).__name__}")
        if set(other._mean) != set(self._mean):
            diff = sorted(set(other._mean) ^ set(self._mean))
            raise ValueError(f"kl needs posteriors over the same parameters; differing: {diff[:5]}")
        self._proper("compute the KL divergence")
        other._proper("compute the KL divergence")
        terms = []
        for name, mu in self._mean.items():
            t = self._precision[name].double()
            to = other._precision[name].double().to(t.device)
            d = mu.double() - other._mean[name].double().to(mu.device)
            terms.append((0.5 * (to / t + to * d.square() - 1.0 + t.log() - to.log())).sum().cpu())
        return torch.stack(terms).sum()


def laplace_posterior(reg: Any, prior_precision: float = 0.0) -> DiagonalGaussian:
    """Return the posterior of an :class:`ewc.EWC` or :class:`ewc.L2` (:meth:`ewc.EWC.posterior`).

    ``mean = μ`` (the merged anchor), ``precision = λ · A + prior_precision`` (``A`` cast to
    the anchor's dtype), over the parameters the penalty covers.
    """
    ok = isinstance(prior_precision, (int, float)) and not isinstance(prior_precision, bool)
    if not ok or not math.isfinite(prior_precision) or prior_precision < 0:
        raise ValueError(f"prior_precision must be a finite number >= 0, got {prior_precision!r}")
    if not reg.precision:
        raise ValueError(
            "the posterior needs at least one consolidated task: call consolidate() first"
        )
    mean = {n: mu.detach() for n, mu in reg.anchor.items()}
    prec = {
        n: reg.lam * reg.precision[n].detach().to(mean[n].dtype) + float(prior_precision)
        for n in mean
    }
    return DiagonalGaussian(mean, prec)


def _as_call(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def predictive(
    model: nn.Module,
    posterior: DiagonalGaussian,
    inputs: Any,
    *,
    n_samples: int = 32,
    generator: torch.Generator | None = None,
    output_fn: Any = None,
) -> Tensor:
    r"""Monte Carlo predictive probabilities ``p(y|x) ≈ (1/S) Σ_s softmax(f(x; θ_s))``.

    Weights ``θ_s ~ posterior`` are drawn one at a time (:meth:`DiagonalGaussian.sample`) and
    substituted with :func:`torch.func.functional_call`; parameters the posterior does not
    cover keep the model's values. The model runs in eval mode under ``torch.no_grad()``; its
    parameters, buffers and train/eval modes are left exactly as they were.

    Args:
        model: The network (a DDP/DataParallel wrapper is unwrapped).
        posterior: E.g. :meth:`ewc.EWC.posterior`; its keys are parameter names of ``model``.
        inputs: A batch as the model takes it: a tensor, a tuple (``model(*inputs)``) or a dict
            (``model(**inputs)``).
        n_samples: Number ``S`` of weight samples.
        generator: Random generator for the draws (reproducible predictions).
        output_fn: Maps the model's return value to logits ``(N, ..., C)`` (class dim last).

    Returns:
        Probabilities of shape ``(N, ..., C)`` in float32 or wider, summing to 1 over ``C``.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    model = _dist.unwrap(model)
    named = dict(model.named_parameters())
    unknown = [n for n in posterior.mean if n not in named]
    if unknown:
        raise ValueError(
            f"the posterior covers parameters the model does not have: {unknown[:5]}; build it "
            "from an EWC object of this model"
        )
    args, kwargs = _as_call(inputs)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    total: Tensor | None = None
    try:
        with torch.no_grad():
            for _ in range(n_samples):
                (theta,) = posterior.sample(1, generator=generator)
                out = torch.func.functional_call(model, theta, args, kwargs, strict=False)
                z = output_fn(out) if output_fn is not None else out
                if not isinstance(z, Tensor) or z.dim() < 1:
                    raise ValueError(
                        "predictive needs logits (N, ..., C) from the model; pass output_fn= "
                        "to extract them"
                    )
                z = z.to(torch.float64 if z.dtype == torch.float64 else torch.float32)
                p = torch.softmax(z, dim=-1)
                total = p if total is None else total.add_(p)
    finally:
        for m, mode in modes.items():
            m.training = mode
    assert total is not None
    return total.div_(n_samples)
