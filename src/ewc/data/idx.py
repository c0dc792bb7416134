"""Readers for the IDX format of MNIST, Fashion-MNIST and KMNIST.

An IDX file is a big-endian header followed by raw values: ``magic (uint32)``, one ``uint32``
per dimension, then the data. The files used here hold unsigned bytes, so the magic number is
``0x00000800 | ndim``: **2051** for images ``(N, rows, cols)`` and **2049** for labels ``(N,)``.
Files may be gzip-compressed (detected from their content, not their name).

Two directory layouts are accepted for a dataset under ``root``:

* torchvision's, ``root/MNIST/raw/``, ``root/FashionMNIST/raw/``, ``root/KMNIST/raw/``;
* plain, the four files directly in ``root`` (the layout of the original sites).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = [
    "DATASETS",
    "IDX_FILES",
    "canonical_name",
    "find_idx_files",
    "load_idx",
    "read_idx_images",
    "read_idx_labels",
]

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

#: Canonical dataset names and their folder in torchvision's layout.
DATASETS: dict[str, str] = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}

#: The four standard files, keyed by role, without the optional ``.gz`` suffix.
IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_ALIASES = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}


def canonical_name(name: str) -> str:
    """Return the canonical dataset name (``"mnist"``, ``"fashion-mnist"`` or ``"kmnist"``).

    Case, underscores and the aliases ``"fashionmnist"`` / ``"fmnist"`` are accepted.

    Raises:
        ValueError: For an unknown name; the message lists the known ones.
    """
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key.replace("-", ""), key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return key


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as err:
            raise DataError(
                f"{path}: corrupt or truncated gzip data ({err}); delete it and download it again"
            ) from err
    return data


def _header(path: Path, data: bytes, magic: int, ndim: int, what: str) -> tuple[int, ...]:
    size = 4 + 4 * ndim
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes is too short to be an IDX file")
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        hint = {IMAGES_MAGIC: "an images file", LABELS_MAGIC: "a labels file"}.get(got)
        extra = f" (that is {hint}: are the file names swapped?)" if hint else ""
        raise DataError(
            f"{path}: bad magic number {got} (0x{got:08x}); an IDX {what} file of unsigned "
            f"bytes starts with {magic} (0x{magic:08x}){extra}"
        )
    if len(data) < size:
        raise DataError(
            f"{path}: {len(data)} bytes is too short for an IDX {what} header ({size} bytes); "
            "the file is truncated"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(data) - size
    if actual != expected:
        shape = " x ".join(str(d) for d in dims)
        state = "truncated" if actual < expected else "has trailing bytes"
        raise DataError(
            f"{path}: header says {shape} = {expected} bytes of data but the file holds "
            f"{actual}; the file {state} (re-download it)"
        )
    return dims


def read_idx_images(
    path: str | os.PathLike[str], *, shape: tuple[int, int] = (28, 28)
) -> np.ndarray:
    """Read an IDX images file (magic 2051), gzip-compressed or raw.

    Args:
        path: The file, e.g. ``train-images-idx3-ubyte.gz``.
        shape: Required ``(rows, cols)`` of each image.

    Returns:
        ``uint8`` array of shape ``(N, rows, cols)``, writable.

    Raises:
        DataError: Missing file, bad magic number, size disagreeing with the header, or images
            that are not ``shape``.
    """
    path = Path(path)
    data = _read_bytes(path)
    n, rows, cols = _header(path, data, IMAGES_MAGIC, 3, "images")
    if (rows, cols) != tuple(shape):
        raise DataError(
            f"{path}: images are {rows}x{cols}, expected {shape[0]}x{shape[1]}; "
            "this is not an MNIST-like file"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols).copy()


def read_idx_labels(path: str | os.PathLike[str], *, num_classes: int = 10) -> np.ndarray:
    """Read an IDX labels file (magic 2049), gzip-compressed or raw.

    Args:
        path: The file, e.g. ``train-labels-idx1-ubyte.gz``.
        num_classes: Labels must lie in ``0 .. num_classes - 1``.

    Returns:
        ``int64`` array of shape ``(N,)``.

    Raises:
        DataError: Missing file, bad magic number, size disagreeing with the header, or a label
            out of range.
    """
    path = Path(path)
    data = _read_bytes(path)
    _header(path, data, LABELS_MAGIC, 1, "labels")
    labels = np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64)
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        raise DataError(
            f"{path}: {bad.size} label(s) outside 0..{num_classes - 1}, first at index "
            f"{bad[0]} (value {labels[bad[0]]})"
        )
    return labels


def _candidates(root: Path, name: str) -> list[Path]:
    return [root / DATASETS[name] / "raw", root]


def _present(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_idx_files(root: str | os.PathLike[str], name: str = "mnist") -> dict[str, Path]:
    """Locate the four IDX files of a dataset under ``root``.

    ``root/<Folder>/raw/`` (torchvision's layout, ``<Folder>`` in :data:`DATASETS`) is tried
    first, then ``root`` itself. In each folder a raw file wins over its ``.gz``. All four files
    must come from the same folder.

    Args:
        root: The data directory.
        name: ``"mnist"``, ``"fashion-mnist"`` or ``"kmnist"``.

    Returns:
        ``{role: path}`` with the roles of :data:`IDX_FILES`.

    Raises:
        DataError: No folder holds all four files; the message lists the names looked for and
            what each folder lacks.
    """
    name = canonical_name(name)
    root = Path(root)
    report = []
    for folder in _candidates(root, name):
        found = {role: _present(folder, stem) for role, stem in IDX_FILES.items()}
        if all(found.values()):
            return {role: p for role, p in found.items() if p is not None}
        if folder.is_dir():
            missing = [IDX_FILES[r] for r, p in found.items() if p is None]
            report.append(f"{folder} lacks {', '.join(missing)}")
        else:
            report.append(f"{folder} does not exist")
    looked_for = ", ".join(f"{stem}[.gz]" for stem in IDX_FILES.values())
    raise DataError(
        f"{name} IDX files not found under {root}: looked for {looked_for} in "
        f"{' and '.join(str(p) for p in _candidates(root, name))} ({'; '.join(report)}). "
        f"Put the files there, or fetch them with ewc.data.download({name!r}, root)"
    )


def load_idx(
    root: str | os.PathLike[str], name: str = "mnist"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load a dataset's official train and test sets from its IDX files.

    Args:
        root: The data directory (see :func:`find_idx_files` for the layouts).
        name: ``"mnist"``, ``"fashion-mnist"`` or ``"kmnist"``.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images ``uint8 (N, 28, 28)``, labels
        ``int64 (N,)``; 60,000 and 10,000 samples for the real datasets.

    Raises:
        DataError: A file is missing or invalid, or images and labels disagree in number.
    """
    files = find_idx_files(root, name)
    out = []
    for split in ("train", "test"):
        x = read_idx_images(files[f"{split}_images"])
        y = read_idx_labels(files[f"{split}_labels"])
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"{files[f'{split}_images']} holds {x.shape[0]} images but "
                f"{files[f'{split}_labels']} holds {y.shape[0]} labels; the two files must come "
                "from the same release"
            )
        out += [x, y]
    return out[0], out[1], out[2], out[3]
