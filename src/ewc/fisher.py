"""The :class:`Fisher` container: a diagonal Fisher information, one tensor per parameter.

Scale convention (the one every λ in this library refers to)::

    F_i = (1/N) Σ_n E_y[(∂ log p(y | x_n, θ) / ∂θ_i)²]

a per-sample **mean** over the N data points, with the expectation over labels ``y`` taken as
the estimator's ``kind`` says (sampled, empirical or exact). A ``Fisher`` supports ``+`` and
multiplication by a scalar, so online EWC reads like the math: ``F = γ * F + F_new``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

__all__ = ["Fisher"]


class Fisher(Mapping[str, Tensor]):
    """A diagonal Fisher information matrix, keyed by parameter name.

    Each value has the shape of its parameter. The mapping is read-only; arithmetic returns new
    objects.

    Args:
        tensors: ``{parameter name: tensor}`` with the diagonal entries; they must be finite
            and non-negative.
        n_samples: Number of data points the estimate averaged over (``None`` for a Fisher
            built by arithmetic or by hand).
        kind: The estimator that produced it (``"sampled"``, ``"empirical"``, ``"exact"``,
            or ``None``).

    Example:
        >>> import torch
        >>> f = Fisher({"w": torch.ones(2)})
        >>> g = 0.5 * f + f
        >>> g["w"]
        tensor([1.5000, 1.5000])
    """

    __slots__ = ("_tensors", "n_samples", "kind")

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        *,
        n_samples: int | None = None,
        kind: str | None = None,
    ) -> None:
        tensors = dict(tensors)
        for name, t in tensors.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"Fisher entry {name!r} must be a torch.Tensor, got {type(t)}")
            if not t.is_floating_point():
                raise TypeError(f"Fisher entry {name!r} must be floating point, got {t.dtype}")
        self._tensors: dict[str, Tensor] = tensors
        self.n_samples = n_samples
        self.kind = kind

    # Mapping protocol -------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        n = sum(t.numel() for t in self._tensors.values())
        return (
            f"Fisher({len(self)} tensors, {n} entries, kind={self.kind!r}, "
            f"n_samples={self.n_samples}, trace={self.trace():.4g})"
        )

    # Arithmetic -------------------------------------------------------------------------
    def _check_same_keys(self, other: Fisher) -> None:
        if set(self) != set(other):
            missing = sorted(set(self) ^ set(other))
            raise KeyError(f"cannot combine Fishers over different parameters: {missing[:5]}")
        for k in self:
            if self[k].shape != other[k].shape:
                raise ValueError(
                    f"cannot combine Fishers: {k!r} has shape {tuple(self[k].shape)} "
                    f"and {tuple(other[k].shape)}"
                )

    def __add__(self, other: object) -> Fisher:
        if not isinstance(other, Fisher):
            return NotImplemented
        self._check_same_keys(other)
        return Fisher({k: self[k] + other[k] for k in self})

    def __mul__(self, scalar: object) -> Fisher:
        if isinstance(scalar, Tensor) and scalar.numel() == 1:
            scalar = scalar.item()
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        return Fisher({k: v * scalar for k, v in self.items()})

    __rmul__ = __mul__

    def __truediv__(self, scalar: object) -> Fisher:
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        return self * (1.0 / scalar)

    # Utilities --------------------------------------------------------------------------
    def trace(self) -> float:
        """Return ``Σ_i F_i``, the trace of the diagonal Fisher."""
        return float(sum(t.double().sum().item() for t in self._tensors.values()))

    def quadratic(self, delta: Mapping[str, Tensor]) -> Tensor:
        """Return the quadratic form ``Σ_i F_i δ_i²`` for a displacement ``δ`` (same keys)."""
        terms = [(self[k] * delta[k].to(self[k].dtype) ** 2).sum() for k in self]
        return torch.stack(terms).sum()

    def to(self, *args: object, **kwargs: object) -> Fisher:
        """Return a copy with every tensor moved or cast as :meth:`torch.Tensor.to` would."""
        out = {k: v.to(*args, **kwargs) for k, v in self.items()}  # type: ignore[arg-type]
        return Fisher(out, n_samples=self.n_samples, kind=self.kind)

    def validate(self) -> None:
        """Raise :class:`ValueError` unless every entry is finite and non-negative."""
        for name, t in self.items():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"Fisher entry {name!r} has non-finite values; check the model for "
                    "overflow (lower the learning rate, use float32/float64)"
                )
            if bool((t < 0).any()):
                raise ValueError(f"Fisher entry {name!r} has negative values; a Fisher is PSD")

    @property
    def numel(self) -> int:
        """Total number of diagonal entries."""
        return sum(t.numel() for t in self._tensors.values())

    def normalized(self) -> Fisher:
        """Return ``F / trace(F)`` (the trace-normalised Fisher used for Fisher overlap)."""
        tr = self.trace()
        if not math.isfinite(tr) or tr <= 0:
            raise ValueError("cannot normalise a Fisher with zero or non-finite trace")
        return self / tr
