"""MAS importance cost as ratios to one ordinary forward+backward pass over the same data.

Measured side by side in one run, as in bench_fisher.py: each round times the baseline (a batched
forward+backward of the mean cross-entropy over all the data, batch 256) right before the method;
the table gives the median ratio over rounds. Beside ``ewc.mas_importance``: the sampled Fisher
over the same data (the same route, squares instead of absolute values) and a naive per-sample
loop of ``|∂‖f(x_n)‖²/∂θ|`` (batch size 1).

Usage::

    python benchmarks/bench_mas.py [--rounds 5] [--n 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch
from bench_fisher import _ratio, cnn, mlp
from torch import nn

import ewc


def naive_mas(model, data):
    params = [p for p in model.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    model.eval()
    seen = 0
    for xb, _ in data:
        for i in range(xb.shape[0]):
            q = model(xb[i : i + 1]).pow(2).sum()
            for a, g in zip(acc, torch.autograd.grad(q, params), strict=True):
                a += g.abs()
            seen += 1
    return [a / seen for a in acc]


def run(name: str, model: nn.Module, shape: tuple[int, ...], n: int, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(n, *shape)
    y = torch.randint(0, 10, (n,))
    data = [(x[i : i + 256], y[i : i + 256]) for i in range(0, n, 256)]

    def base():
        model.train()
        for xb, yb in data:
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()

    got = ewc.mas_importance(model, data)
    want = naive_mas(model, data)
    err = max(
        float((got[k] - w).abs().max() / w.abs().max())
        for (k, _), w in zip(model.named_parameters(), want, strict=True)
    )
    rows = [
        ("ewc.mas_importance", lambda: ewc.mas_importance(model, data)),
        ("ewc.fisher_diagonal (sampled)", lambda: ewc.fisher_diagonal(model, data)),
        ("naive per-sample loop", lambda: naive_mas(model, data)),
    ]
    out = []
    for label, fn in rows:
        r = _ratio(base, fn, rounds if "naive" not in label else max(1, rounds // 2))
        out.append({"model": name, "n": n, "method": label, "ratio": round(r, 2)})
        print(f"{name:4s} N={n:5d}  {label:32s} {r:7.2f}x")
    print(f"{name:4s} max relative error of mas_importance vs the naive loop: {err:.1e}")
    out.append({"model": name, "n": n, "method": "max rel. error vs naive", "ratio": err})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    rows = run("mlp", mlp(), (784,), args.n, args.rounds)
    rows += run("cnn", cnn(), (1, 28, 28), args.n // 4, args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
