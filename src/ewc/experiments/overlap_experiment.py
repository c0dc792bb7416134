"""The paper's Fig. 2C: Fisher overlap per layer for permutations of varying similarity.

For each fraction ``f`` of pixels permuted, task B is task A with ``f·784`` pixels shuffled
among themselves (``f = 0``: the same task, ``f = 1``: a full permutation). A 2×400 network is
trained on A, then on B with EWC; the Fishers of both tasks are estimated at the final weights
and compared layer by layer with the overlap ``1 − ½ Σ (√f̂_A − √f̂_B)²`` of the trace-normalised
diagonals (1 = the same parameters matter, 0 = disjoint).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..estimate import fisher_diagonal
from ..penalty import EWC
from .models import MLP

__all__ = ["partial_permutation", "run_overlap"]


def partial_permutation(n: int, fraction: float, generator: torch.Generator) -> Tensor:
    """Return a permutation of ``range(n)`` shuffling ``round(fraction·n)`` chosen indices."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fractions must be in [0, 1], got {fraction}")
    perm = torch.arange(n)
    k = round(fraction * n)
    chosen = torch.randperm(n, generator=generator)[:k]
    perm[chosen] = chosen[torch.randperm(k, generator=generator)]
    return perm


def _train(
    model: nn.Module, x: Tensor, y: Tensor, epochs: float, reg: EWC | None, seed: int
) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    steps = max(1, round(epochs * len(y) / 64))
    order = torch.randperm(len(y), generator=gen)
    for s in range(steps):
        i = s % ((len(y) + 63) // 64)
        if i == 0 and s:
            order = torch.randperm(len(y), generator=gen)
        idx = order[i * 64 : (i + 1) * 64]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        if reg is not None:
            loss = loss + reg.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()


def run_overlap(args: argparse.Namespace) -> str:
    """Run the experiment for ``args`` (see ``ewc overlap --help``); return a summary."""
    from ..data import load_source
    from .overlap import layer_overlaps
    from .plots import plot_fisher_overlap

    base = load_source(args.source, args.data_dir, seed=args.seed)
    x = torch.as_tensor(base.x_train, dtype=torch.float32).reshape(len(base.y_train), -1) / 255.0
    y = torch.as_tensor(base.y_train, dtype=torch.int64)
    n_fisher = min(args.fisher_samples, len(y))
    curves: list[dict[str, Any]] = []
    layers: list[str] = []
    for f in args.fractions:
        gen = torch.Generator().manual_seed(args.seed + 1)
        perm = partial_permutation(x.shape[1], f, gen)
        xb = x[:, perm]
        torch.manual_seed(args.seed)
        model = MLP(x.shape[1], (400, 400), 10)
        _train(model, x, y, args.epochs, None, args.seed)
        reg = EWC(model, lam=100.0)
        reg.consolidate([(x[:n_fisher], y[:n_fisher])])
        _train(model, xb, y, args.epochs, reg, args.seed + 2)
        fa = fisher_diagonal(model, [(x[:n_fisher], y[:n_fisher])], n_samples=n_fisher)
        fb = fisher_diagonal(model, [(xb[:n_fisher], y[:n_fisher])], n_samples=n_fisher)
        per_layer = layer_overlaps(fa, fb)
        layers = [f"layer {i + 1}" for i in range(len(per_layer))]
        curves.append(
            {
                "label": f"{round(100 * f)}% of pixels permuted",
                "fraction": f,
                "overlap": list(per_layer.values()),
            }
        )
    result = {"layers": layers, "curves": curves}
    out = Path(args.out)
    (out / "fisher_overlap.json").write_text(json.dumps(result, indent=2))
    png = plot_fisher_overlap(result, out / "fig2c.png")
    lines = ["fraction permuted  " + "  ".join(f"{name:>8s}" for name in layers)]
    for c in curves:
        lines.append(f"{c['fraction']:17.2f}  " + "  ".join(f"{v:8.3f}" for v in c["overlap"]))
    return "\n".join(lines) + f"\n\nwrote {out / 'fisher_overlap.json'} and {png}"
