r"""Continual-learning metrics of an accuracy matrix.

The accuracy matrix ``R`` of a run over ``T`` tasks has shape ``(T, T)``: ``R[i][j]`` is the
test accuracy (a fraction in ``[0, 1]``) on task ``j`` after training on tasks ``0 .. i``. Every
task is evaluated after every task, including the tasks not trained yet (``j > i``), which
forward transfer needs. With ``b_j`` the accuracy of the randomly initialised model on task ``j``:

.. math::

    \mathrm{ACC}_t = \frac{1}{t + 1} \sum_{j=0}^{t} R_{t,j}, \qquad
    \mathrm{BWT} = \frac{1}{T - 1} \sum_{i=0}^{T-2} (R_{T-1,i} - R_{i,i}), \qquad
    \mathrm{FWT} = \frac{1}{T - 1} \sum_{i=1}^{T-1} (R_{i-1,i} - b_i),

    \mathrm{Forgetting} = \frac{1}{T - 1} \sum_{j=0}^{T-2}
        \Big(\max_{l \le T-2} R_{l,j} - R_{T-1,j}\Big).

References: Lopez-Paz & Ranzato (2017), *Gradient Episodic Memory for Continual Learning*
(ACC, BWT, FWT); Chaudhry et al. (2018), *Riemannian Walk for Incremental Learning*
(forgetting); Kirkpatrick et al. (2017), Fig. 2B (the average-accuracy curve).

Example:
    >>> R = [[0.9, 0.1], [0.7, 0.8]]
    >>> round(average_accuracy(R), 4), round(backward_transfer(R), 4)
    (0.75, -0.2)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "AccuracyMatrix",
    "as_accuracy_matrix",
    "average_accuracy",
    "average_accuracy_curve",
    "backward_transfer",
    "forward_transfer",
    "forgetting",
    "summarize",
]

AccuracyMatrix = Sequence[Sequence[float]] | np.ndarray
"""``(T, T)`` accuracies as nested sequences or an array; ``R[i][j]`` is task ``j`` after ``i``."""


def _as_float_array(values: Any, what: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must hold numbers only, in rows of equal length") from None


def _check_fractions(a: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{what} has a non-finite value {a[idx]} at index {list(idx)}")
    bad = (a < 0) | (a > 1)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        hint = "; accuracies are fractions, not percentages" if a.max() <= 100 else ""
        raise ValueError(f"{what} has {a[idx]} at index {list(idx)}, outside [0, 1]{hint}")


def as_accuracy_matrix(R: AccuracyMatrix) -> np.ndarray:
    """Validate an accuracy matrix and return it as a ``float64 (T, T)`` array (a copy).

    Args:
        R: ``(T, T)`` accuracies, ``R[i][j]`` on task ``j`` after training task ``i``.

    Returns:
        The matrix as a new ``numpy`` array.

    Raises:
        ValueError: If ``R`` is not square, is empty, or has values that are not finite or lie
            outside ``[0, 1]``.
    """
    a = _as_float_array(R, "the accuracy matrix").copy()
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(
            f"the accuracy matrix must be square, (T, T) with T >= 1 (row i: after task i, "
            f"column j: task j), got shape {a.shape}"
        )
    _check_fractions(a, "the accuracy matrix")
    return a


def _as_baseline(baseline: Sequence[float] | np.ndarray, T: int) -> np.ndarray:
    b = _as_float_array(baseline, "baseline")
    if b.shape != (T,):
        raise ValueError(
            f"baseline must hold one accuracy per task, shape ({T},), got shape {b.shape}"
        )
    _check_fractions(b, "baseline")
    return b


def average_accuracy(R: AccuracyMatrix, after: int | None = None) -> float:
    r"""Mean accuracy over the tasks seen so far: :math:`\frac{1}{t+1}\sum_{j \le t} R_{t,j}`.

    Args:
        R: ``(T, T)`` accuracy matrix.
        after: The task ``t`` after whose training to evaluate, ``0 .. T-1``; default ``T - 1``
            (the final average accuracy, ACC of Lopez-Paz & Ranzato 2017).

    Returns:
        The average accuracy, in ``[0, 1]``.

    Raises:
        ValueError: For an invalid matrix or ``after`` outside ``0 .. T-1``.
    """
    a = as_accuracy_matrix(R)
    T = a.shape[0]
    t = T - 1 if after is None else after
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < T:
        raise ValueError(f"after must be a task index in 0..{T - 1}, got {after!r}")
    return float(a[t, : t + 1].mean())


def average_accuracy_curve(R: AccuracyMatrix) -> list[float]:
    """Average accuracy over the tasks seen so far after each task (Kirkpatrick et al., Fig. 2B).

    Args:
        R: ``(T, T)`` accuracy matrix.

    Returns:
        ``[average_accuracy(R, after=t) for t in 0 .. T-1]``.
    """
    a = as_accuracy_matrix(R)
    return [float(a[t, : t + 1].mean()) for t in range(a.shape[0])]


def backward_transfer(R: AccuracyMatrix) -> float:
    r"""Backward transfer, :math:`\frac{1}{T-1}\sum_{i<T-1} (R_{T-1,i} - R_{i,i})`.

    The change in accuracy on each earlier task between just after learning it and the end;
    negative values mean forgetting (Lopez-Paz & Ranzato, 2017).

    Args:
        R: ``(T, T)`` accuracy matrix.

    Returns:
        BWT in ``[-1, 1]``; ``0.0`` for a single task.
    """
    a = as_accuracy_matrix(R)
    T = a.shape[0]
    if T == 1:
        return 0.0
    return float((a[T - 1, : T - 1] - np.diag(a)[: T - 1]).mean())


def forward_transfer(R: AccuracyMatrix, baseline: Sequence[float] | np.ndarray) -> float:
    r"""Forward transfer, :math:`\frac{1}{T-1}\sum_{i=1}^{T-1} (R_{i-1,i} - b_i)`.

    How much training on tasks ``0 .. i-1`` helps task ``i`` before it is trained, relative
    to the randomly initialised model (Lopez-Paz & Ranzato, 2017).

    Args:
        R: ``(T, T)`` accuracy matrix (the entries above the diagonal are used).
        baseline: ``(T,)`` accuracy of the randomly initialised model on each task.

    Returns:
        FWT in ``[-1, 1]``; ``0.0`` for a single task.

    Raises:
        ValueError: For an invalid matrix, or a baseline of the wrong length or range.
    """
    a = as_accuracy_matrix(R)
    T = a.shape[0]
    b = _as_baseline(baseline, T)
    if T == 1:
        return 0.0
    return float((np.diag(a, k=1) - b[1:]).mean())


def forgetting(R: AccuracyMatrix) -> float:
    r"""Average forgetting, :math:`\frac{1}{T-1}\sum_{j<T-1} (\max_{l<T-1} R_{l,j} - R_{T-1,j})`.

    The drop on each earlier task from its best accuracy before the last task to the final
    accuracy (Chaudhry et al., 2018).

    Args:
        R: ``(T, T)`` accuracy matrix.

    Returns:
        Forgetting in ``[-1, 1]`` (non-negative unless the final task improved an old one
        beyond its best); ``0.0`` for a single task.
    """
    a = as_accuracy_matrix(R)
    T = a.shape[0]
    if T == 1:
        return 0.0
    best = a[: T - 1, : T - 1].max(axis=0)
    return float((best - a[T - 1, : T - 1]).mean())


def summarize(
    R: AccuracyMatrix, baseline: Sequence[float] | np.ndarray | None = None
) -> dict[str, Any]:
    """All metrics of one accuracy matrix.

    Args:
        R: ``(T, T)`` accuracy matrix.
        baseline: ``(T,)`` accuracies of the randomly initialised model, for forward transfer.

    Returns:
        ``{"average_accuracy": float, "average_accuracy_curve": list[float], "bwt": float,
        "fwt": float | None, "forgetting": float}`` (``fwt`` is ``None`` without a baseline).
    """
    a = as_accuracy_matrix(R)
    return {
        "average_accuracy": average_accuracy(a),
        "average_accuracy_curve": average_accuracy_curve(a),
        "bwt": backward_transfer(a),
        "fwt": None if baseline is None else forward_transfer(a, baseline),
        "forgetting": forgetting(a),
    }
