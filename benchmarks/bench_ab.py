"""Before/after comparison of two source trees of ``ewc`` on the estimator rows, interleaved.

On a shared, noisy machine two benchmark runs made minutes apart differ by more than most code
changes do. This script therefore alternates: for every repetition it starts one fresh process
per tree (``PYTHONPATH=<tree>/src``, the order swapped every repetition), each process times
the baseline right before each method (as ``bench_fisher.py`` and ``bench_lm.py`` do) and
reports its median ratio, and the table gives, per tree, the median over repetitions and the
range. Only ``ewc`` rows are timed (no competitors).

Usage::

    python benchmarks/bench_ab.py --before /path/to/old/checkout --after . \\
        [--cases mlp,cnn,lm] [--reps 4] [--rounds 3] [--lm-n 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _worker(case: str, rounds: int, lm_n: int, fresh: bool = False) -> dict[str, float]:
    import torch
    from torch import nn

    sys.path.insert(0, str(HERE))
    import bench_fisher as bf

    import ewc

    def ratio(base: Any, fn: Any, rounds: int) -> float:
        if fresh:  # forget the verified routes before every call: each call pays the probe
            return bf._ratio(base, lambda: (ewc.clear_route_cache(), fn())[1], rounds)
        return bf._ratio(base, fn, rounds)

    torch.manual_seed(0)
    out: dict[str, float] = {}
    if case in ("mlp", "cnn"):
        if case == "mlp":
            model, n, shape = bf.mlp(), 10000, (784,)
        else:
            model, n, shape = bf.cnn(), 2000, (1, 28, 28)
        x, y = torch.randn(n, *shape), torch.randint(0, 10, (n,))
        data = [(x[i : i + 256], y[i : i + 256]) for i in range(0, n, 256)]

        def base() -> None:
            model.train()
            for xb, yb in data:
                model.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(xb), yb).backward()

        for kind in ("sampled", "empirical", "exact"):
            out[f"{case} {kind}"] = ratio(
                base, lambda k=kind: ewc.fisher_diagonal(model, data, kind=k), rounds
            )
        return out
    import bench_lm

    from ewc.integrations.lm import hf_fisher

    args = argparse.Namespace(
        layers=4,
        width=256,
        vocab=8192,
        seq=128,
        n=lm_n,
        batch=8,
        device="cpu",
        dtype="float32",
        preset=None,
    )
    model, batches, base = bench_lm.setup(args)
    out[f"lm{lm_n} all"] = ratio(base, lambda: hf_fisher(model, batches), rounds)
    out[f"lm{lm_n} blocks"] = ratio(
        base, lambda: hf_fisher(model, batches, params="transformer.h.*"), rounds
    )
    return out


def _run(tree: str, case: str, rounds: int, lm_n: int, fresh: bool = False) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve() / "src"))
    cmd = [sys.executable, __file__, "--worker", case, "--rounds", str(rounds), "--lm-n", str(lm_n)]
    cmd += ["--fresh"] if fresh else []
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", help="checkout of the old code (its src/ is imported)")
    ap.add_argument("--after", default=".", help="checkout of the new code")
    ap.add_argument("--cases", default="mlp,cnn,lm")
    ap.add_argument("--reps", type=int, default=4, help="processes per tree and case")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds inside each process")
    ap.add_argument("--lm-n", type=int, default=32, help="sequences in the LM case")
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="also time the new tree with its route cache cleared before every call",
    )
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.rounds, args.lm_n, args.fresh)))
        return
    if not args.before:
        ap.error("--before is required")
    trees = {"before": args.before, "after": args.after, "after, fresh": args.after}
    series = ["before", "after"] + (["after, fresh"] if args.fresh else [])
    got: dict[str, dict[str, list[float]]] = {w: {} for w in series}
    for case in args.cases.split(","):
        for rep in range(args.reps):
            order = series if rep % 2 == 0 else series[::-1]
            for which in order:
                fresh = which == "after, fresh"
                for row, r in _run(trees[which], case, args.rounds, args.lm_n, fresh).items():
                    got[which].setdefault(row, []).append(r)
            print(f"  {case} repetition {rep + 1}/{args.reps} done", flush=True)
    print(f"{'row':18s}" + "".join(f" {w:>22s}" for w in series))
    table = []
    for row in got["before"]:
        cells = []
        for which in series:
            v = got[which][row]
            cells.append(f"{statistics.median(v):5.2f}x ({min(v):.2f}-{max(v):.2f})")
        print(f"{row:18s}" + "".join(f" {c:>22s}" for c in cells))
        table.append({"row": row, **{w: got[w][row] for w in series}})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=2)


if __name__ == "__main__":
    main()
