"""Cost of the Hessian diagonal, as ratios to one forward+backward pass over the same data.

Side by side in one run, each round timing the baseline (one batched forward+backward of the
summed cross-entropy) right before each method; the table gives median ratios over rounds:

* ``fisher exact``: :func:`ewc.fisher_diagonal` with ``kind="exact"`` (for scale);
* ``hessian exact``: :func:`ewc.hessian_diagonal` (Linear layers by the per-layer closed form,
  the rest by one Hessian-vector product per entry);
* ``hutchinson K``: ``method="hutchinson"`` with ``K`` probes;
* ``per-entry HVPs``: what one Hessian-vector product per parameter would cost, extrapolated
  from timing 64 of them batched (``numel / 64`` times that): the naive exact diagonal.

Usage::

    python benchmarks/bench_hessian.py [--rounds 3] [--samples 512]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import ewc
from ewc import hessian as hessian_mod


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2),
        nn.Tanh(),
        nn.Conv2d(8, 8, 5, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def _time(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _baseline(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        torch.autograd.grad(loss, list(model.parameters()))

    return _time(step)


def _per_entry(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    ps = list(model.parameters())
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    gs = list(torch.autograd.grad(loss, ps, create_graph=True))
    vs = [torch.randn(64, *p.shape) for p in ps]
    seconds = _time(lambda: hessian_mod._batched_hvps(gs, ps, vs))
    return seconds / 64 * sum(p.numel() for p in ps)


def bench(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, rounds: int) -> None:
    """Print the median ratio and seconds of every method for one model."""
    data = [(x[i : i + 256], y[i : i + 256]) for i in range(0, len(y), 256)]
    methods: dict[str, Callable[[], object]] = {
        "fisher exact": lambda: ewc.fisher_diagonal(model, data, kind="exact"),
        "hessian exact": lambda: ewc.hessian_diagonal(model, data),
        "hutchinson 10": lambda: ewc.hessian_diagonal(
            model, data, method="hutchinson", n_probes=10
        ),
        "per-entry HVPs (extrapolated)": lambda: _per_entry(model, x, y),
    }
    ratios: dict[str, list[float]] = {k: [] for k in methods}
    seconds: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(rounds):
        for k, fn in methods.items():
            base = _baseline(model, x, y)
            s = fn() if k.startswith("per-entry") else _time(fn)
            assert isinstance(s, float)
            ratios[k].append(s / base)
            seconds[k].append(s)
    n = sum(p.numel() for p in model.parameters())
    print(f"\n{name}: {n:,} parameters")
    for k in methods:
        print(
            f"  {k:32s} {statistics.median(ratios[k]):10.1f} x fwd+bwd "
            f"({statistics.median(seconds[k]):.3g} s)"
        )


def main() -> None:
    """Run the benchmark (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=512)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
        f"{args.samples} samples, median of {args.rounds} rounds"
    )
    for name, make, shape in (
        ("mlp 784-400-400-10", mlp, (784,)),
        ("cnn (2 conv, tanh)", cnn, (1, 28, 28)),
    ):
        x, y = torch.randn(args.samples, *shape), torch.randint(0, 10, (args.samples,))
        bench(name, make(), x, y, args.rounds)


if __name__ == "__main__":
    main()
