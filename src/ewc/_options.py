"""The options of a Fisher estimate, validated once and carried as one frozen object.

:func:`ewc.fisher_diagonal` builds a :class:`FisherOptions` from its keyword arguments; the
estimator, its probing step and the generic paths read that object, and :class:`ewc.EWC` keeps
one for its consolidations and serialises it once (:meth:`FisherOptions.config`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._select import ParamSelector
from .likelihoods import KINDS, Likelihood, get_likelihood

__all__ = ["FisherOptions", "OutputFn", "acc_dtype"]

OutputFn = Callable[[Any], Tensor]
"""Maps whatever a model returns to the output tensor ``(N, ..., C)`` a likelihood reads."""


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the accumulation dtype for tensors of ``dtype``: float64 stays, the rest is float32.

    Squares of per-sample gradients are formed in this dtype, never in half precision (where
    squares below about 6e-8 flush to zero although the gradients themselves are representable).
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_params(params: ParamSelector) -> None:
    if params is None or isinstance(params, str) or callable(params):
        return
    try:
        items = list(params)  # type: ignore[arg-type]
    except TypeError:
        items = None
    if not items or not all(isinstance(s, str) for s in items):
        raise ValueError(
            "params must be None, a name or glob pattern, a non-empty list of them, or a "
            f"predicate (name, parameter) -> bool; got {params!r}"
        )


@dataclass(frozen=True, eq=False)
class FisherOptions:
    """Every option of a diagonal Fisher estimate (see :func:`ewc.fisher_diagonal`).

    Validated on construction; ``likelihood`` is resolved to a :class:`~ewc.Likelihood`.
    Use :meth:`replace` for a changed copy (validated again).
    """

    kind: str = "sampled"
    likelihood: Likelihood | str | Callable[[Tensor, Tensor], Tensor] = "classification"
    n_samples: int | None = None
    mc_samples: int = 1
    params: ParamSelector = None
    dtype: torch.dtype | None = None
    output_fn: OutputFn | None = None
    generator: torch.Generator | None = None
    progress: bool = False
    distributed: bool | None = None
    group: Any = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        n = self.n_samples
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
            raise ValueError(f"n_samples must be a positive integer or None, got {n!r}")
        mc = self.mc_samples
        if isinstance(mc, bool) or not isinstance(mc, int) or mc <= 0:
            raise ValueError(f"mc_samples must be a positive integer, got {mc!r}")
        if self.dtype is not None and not (
            isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point
        ):
            raise ValueError(
                f"dtype must be a floating-point torch.dtype or None, got {self.dtype!r}"
            )
        if self.output_fn is not None and not callable(self.output_fn):
            raise ValueError(f"output_fn must be callable, got {type(self.output_fn).__name__}")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {self.generator!r}")
        if self.distributed not in (None, True, False):
            raise ValueError(f"distributed must be True, False or None, got {self.distributed!r}")
        _check_params(self.params)
        object.__setattr__(self, "likelihood", get_likelihood(self.likelihood))

    @property
    def lik(self) -> Likelihood:
        """The resolved likelihood."""
        assert isinstance(self.likelihood, Likelihood)
        return self.likelihood

    def replace(self, **changes: Any) -> FisherOptions:
        """Return a copy with ``changes`` applied (unknown names are an error)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown Fisher option(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def config(self) -> dict[str, Any]:
        """Return the JSON-serialisable part: what a saved EWC state records of its estimates."""
        return {
            "kind": self.kind,
            "likelihood": self.lik.config(),
            "n_samples": self.n_samples,
            "mc_samples": self.mc_samples,
            "params": describe_params(self.params),
            "dtype": None if self.dtype is None else str(self.dtype),
        }


def describe_params(params: ParamSelector) -> list[str] | str | None:
    """JSON form of a parameter selector: patterns as a list, a predicate as ``"callable"``."""
    if params is None:
        return None
    if isinstance(params, str):
        return [params]
    if callable(params):
        return "callable"
    return list(params)
