"""Pure image transforms for task streams: scaling, pixel permutations, rotations.

All functions are deterministic and allocate only their output. Rotations use
:func:`torch.nn.functional.grid_sample` (bilinear, zero padding); no torchvision or scipy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

__all__ = ["pad_images", "permute_pixels", "random_permutations", "rotate_images", "to_float"]


def to_float(images: np.ndarray | Tensor) -> Tensor:
    """Scale ``uint8`` images to ``float32`` in ``[0, 1]``.

    Args:
        images: ``uint8 (N, H, W)`` (numpy or torch).

    Returns:
        ``float32 (N, H, W)``, ``images / 255``.
    """
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {t.dtype}")
    return t.to(torch.float32).div_(255.0)


def pad_images(x: Tensor, pad: int) -> Tensor:
    """Add ``pad`` zero pixels on every side of ``(N, H, W)`` images.

    Args:
        x: ``(N, H, W)`` images.
        pad: Pixels on each side (``pad=2`` turns MNIST's 28×28 into 32×32).

    Returns:
        ``(N, H + 2 pad, W + 2 pad)``, same dtype, the original in the middle.
    """
    if x.ndim != 3:
        raise ValueError(f"pad_images expects (N, H, W) images, got shape {tuple(x.shape)}")
    return F.pad(x, (pad, pad, pad, pad))


def random_permutations(
    n: int, n_pixels: int = 784, *, seed: int = 0, first_identity: bool = True
) -> list[np.ndarray]:
    """Draw ``n`` seeded pixel permutations.

    Permutation ``t`` is the ``t``-th draw of ``numpy.random.default_rng(seed)``; with
    ``first_identity`` the first one is replaced by the identity, which leaves the others
    unchanged.

    Args:
        n: Number of permutations.
        n_pixels: Length of each permutation.
        seed: Seed.
        first_identity: Make permutation 0 the identity (task 0 is the plain dataset).

    Returns:
        ``n`` ``int64 (n_pixels,)`` arrays.
    """
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(n_pixels).astype(np.int64) for _ in range(n)]
    if first_identity and n:
        perms[0] = np.arange(n_pixels, dtype=np.int64)
    return perms


def permute_pixels(x: Tensor, perm: np.ndarray | Tensor) -> Tensor:
    """Apply a pixel permutation to flattened images: ``out[:, j] = x[:, perm[j]]``.

    Args:
        x: ``(N, D)`` flattened images, or ``(N, H, W)`` (flattened first).
        perm: ``(D,)`` permutation of ``0 .. D - 1``.

    Returns:
        ``(N, D)``, same dtype as ``x``.
    """
    flat = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))
    p = torch.as_tensor(perm, dtype=torch.int64)
    if p.shape != (flat.shape[1],):
        raise ValueError(f"permutation has shape {tuple(p.shape)}, expected ({flat.shape[1]},)")
    return flat[:, p]


def rotate_images(x: Tensor, angle: float) -> Tensor:
    """Rotate images **counter-clockwise** (as displayed, row 0 at the top) about their centre.

    The convention of ``numpy.rot90`` and ``torchvision.transforms.functional.rotate``:
    ``rotate_images(x, 90)`` equals ``np.rot90(x, 1, axes=(1, 2))`` for square images, to about
    1e-5 in float32 (the sampling positions are rounded). Bilinear interpolation, zeros outside
    the image, ``align_corners=False``: the centre lies between the middle pixels, so multiples
    of 90° map pixels onto pixels.

    Args:
        x: Floating ``(N, H, W)`` images.
        angle: Angle in degrees; positive is counter-clockwise.

    Returns:
        ``(N, H, W)``, same dtype as ``x``.
    """
    if x.ndim != 3 or not x.is_floating_point():
        raise ValueError(
            f"rotate_images expects floating (N, H, W) images, got {x.dtype} {tuple(x.shape)}"
        )
    n, h, w = x.shape
    if angle % 360 == 0 or n == 0:
        return x.clone()
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    # affine_grid maps each output location (u, v) (u rightwards, v downwards, both in [-1, 1])
    # to the input location it samples; a counter-clockwise turn on screen samples R^-1 (u, v).
    theta = torch.tensor([[[c, -s * h / w, 0.0], [s * w / h, c, 0.0]]], dtype=x.dtype)
    grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False)
    # One grid for all images: they ride along as channels of a single batch element.
    out = F.grid_sample(
        x.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out.squeeze(0)
