"""Optional download of MNIST, Fashion-MNIST and KMNIST (never called implicitly).

The four ``.gz`` files of a dataset are fetched with :mod:`urllib` into torchvision's layout,
``root/<Folder>/raw/`` (``MNIST``, ``FashionMNIST``, ``KMNIST``), where
:func:`~ewc.data.load_idx` and torchvision both find them. Each file is streamed to a temporary
file in the same folder, its MD5 checked, then renamed into place, so an interrupted or corrupt
download never leaves a file under the final name.

Mirrors and MD5 checksums of the ``.gz`` files are those published in torchvision
(``torchvision/datasets/mnist.py``, classes ``MNIST``, ``FashionMNIST``, ``KMNIST``). The MD5
is of the compressed file as served: a re-compressed copy of the same data has another one.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import DownloadError
from .idx import DATASETS, IDX_FILES, canonical_name

__all__ = ["CHECKSUMS", "MIRRORS", "download"]

#: Base URLs tried in order, per dataset (from torchvision).
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    "kmnist": ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
}

#: MD5 of each ``.gz`` file as published by torchvision.
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "kmnist": {
        "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
        "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
        "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
        "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
    },
}

_CHUNK = 1 << 20


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(url: str, dest: Path, md5: str, timeout: float) -> None:
    """Stream ``url`` to a temporary file next to ``dest``, check its MD5, rename it."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for block in iter(lambda: resp.read(_CHUNK), b""):
                h.update(block)
                out.write(block)
        got = h.hexdigest()
        if got != md5.lower():
            raise DownloadError(
                f"{url}: MD5 {got} does not match the expected {md5}; the download was deleted. "
                "The mirror may serve another file: try another base_url, or pass checksums= if "
                "you trust this one"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download(
    name: str,
    root: str | os.PathLike[str],
    *,
    base_url: str | Sequence[str] | None = None,
    timeout: float = 60.0,
    checksums: Mapping[str, str] | None = None,
) -> Path:
    """Download a dataset's four IDX ``.gz`` files into ``root/<Folder>/raw/``.

    Files already there with the right MD5 are kept; others are fetched again.

    Args:
        name: ``"mnist"``, ``"fashion-mnist"`` or ``"kmnist"``.
        root: Data directory (created if needed); pass the same one to
            :func:`~ewc.data.load_source`.
        base_url: Mirror(s) to use instead of :data:`MIRRORS` (each file is the base URL plus
            its name). Tried in order; the next one is used when one fails.
        timeout: Seconds to wait on the network for each request.
        checksums: ``{file name: md5}`` of the ``.gz`` files, replacing :data:`CHECKSUMS`
            (for a mirror that serves other bytes, or for tests).

    Returns:
        The folder holding the four files.

    Raises:
        DownloadError: A file could not be fetched from any mirror (network failure, HTTP
            error) or its MD5 did not match; the bad file is deleted.
    """
    key = canonical_name(name)
    sums = dict(CHECKSUMS[key] if checksums is None else checksums)
    files = [f"{stem}.gz" for stem in IDX_FILES.values()]
    missing = [f for f in files if f not in sums]
    if missing:
        raise ValueError(f"checksums lacks an MD5 for {missing}")
    if base_url is None:
        mirrors = list(MIRRORS[key])
    elif isinstance(base_url, str):
        mirrors = [base_url]
    else:
        mirrors = list(base_url)
    mirrors = [m if m.endswith("/") else m + "/" for m in mirrors]
    for m in mirrors:
        if not m.lower().startswith(("http://", "https://", "file://")):
            raise ValueError(f"base_url must be an http(s) or file URL, got {m!r}")
    folder = Path(root) / DATASETS[key] / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for filename in files:
        dest = folder / filename
        if dest.is_file() and _md5(dest) == sums[filename].lower():
            continue
        errors = []
        for mirror in mirrors:
            url = mirror + filename
            try:
                _fetch(url, dest, sums[filename], timeout)
                break
            except DownloadError as err:
                errors.append(err)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
                errors.append(DownloadError(f"{url}: {err}"))
        else:
            raise DownloadError(
                f"could not download {filename} of {key}: "
                + "; ".join(str(e) for e in errors)
                + ". Check the network (or base_url), or place the file in "
                f"{folder} by hand"
            ) from errors[-1]
    return folder
