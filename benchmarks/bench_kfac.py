"""KFAC cost and accuracy: ``fisher_kfac`` and the KFAC-EWC penalty, as side-by-side ratios.

* Estimation: ``ewc.fisher_kfac`` (each kind) against one batched forward+backward epoch of the
  MLP of ``bench_fisher.py`` (784-400-400-10, batch 256), with BackPACK's ``KFAC`` (one MC
  sample) and ``KFLR`` (exact) in the same run when importable (``pip install --no-deps
  backpack-for-pytorch einops unfoldNd``), and the factors' agreement with BackPACK's.
* Penalty: a training step (batch 256) with the KFAC-EWC penalty at 1, 10 and 50 tasks, for the
  exact per-task sum and the constant-memory eigenbasis merge, as a ratio to a plain step.
* Merge accuracy: the eigenbasis merge's penalty against the exact sum of per-task Kronecker
  quadratics, for KFACs estimated on 50 different tasks (permuted inputs, moved weights).

Usage::

    python benchmarks/bench_kfac.py [--rounds 5] [--quick] [--json out.json] [--parts estimation]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics

import torch
from bench_fisher import _available, _ratio, mlp
from torch import nn

import ewc


def backpack_kfac(model, data, ext_name):
    """BackPACK's KFAC (MC, one sample) or KFLR (exact) factors summed over the batches."""
    from backpack import backpack, extend, extensions

    m = extend(copy.deepcopy(model).eval())
    lossf = extend(nn.CrossEntropyLoss(reduction="sum"))
    ext, attr = {
        "KFAC": (lambda: extensions.KFAC(mc_samples=1), "kfac"),
        "KFLR": (extensions.KFLR, "kflr"),
    }[ext_name]

    def run():
        acc = None
        for xb, yb in data:
            m.zero_grad()
            loss = lossf(m(xb), yb)
            with backpack(ext()):
                loss.backward()
            facs = [[f.detach().clone() for f in getattr(p, attr)] for p in m.parameters()]
            acc = (
                facs
                if acc is None
                else [
                    [a + f for a, f in zip(x, y, strict=True)]
                    for x, y in zip(acc, facs, strict=True)
                ]
            )
        return acc

    return run


def estimation_rows(rounds: int, n: int) -> list[dict]:
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(n, 784), torch.randint(0, 10, (n,))
    data = [(x[i : i + 256], y[i : i + 256]) for i in range(0, n, 256)]

    def base():
        model.train()
        for xb, yb in data:
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()

    rows = []

    def add(method, kind, fn):
        ratio = _ratio(base, fn, rounds)
        rows.append({"N": n, "kind": kind, "method": method, "ratio": ratio})
        print(f"  MLP {kind:9s} {method:24s} {ratio:6.2f}x", flush=True)

    for kind in ("sampled", "empirical", "exact"):
        add("ewc.fisher_kfac", kind, lambda k=kind: ewc.fisher_kfac(model, data, kind=k))
    add("ewc.fisher_diagonal", "sampled", lambda: ewc.fisher_diagonal(model, data))
    if _available("backpack"):
        add("BackPACK KFAC", "sampled", backpack_kfac(model, data, "KFAC"))
        add("BackPACK KFLR", "exact", backpack_kfac(model, data, "KFLR"))
        ours = ewc.fisher_kfac(model, data[:2], kind="exact")
        theirs = backpack_kfac(model, data[:2], "KFLR")()
        worst = 0.0
        for block, p_facs in zip(ours.values(), theirs[::2], strict=True):
            ((a, g),) = block.terms
            g_b, a_b = p_facs  # BackPACK: [G, A] of the weight, A without the bias column
            for mine, other in ((g, g_b), (a[:-1, :-1], a_b)):
                mine, other = mine / mine.trace(), other / other.trace()
                worst = max(worst, float((mine - other).abs().max() / mine.abs().max()))
        print(f"  factors vs BackPACK KFLR (normalised by their traces): max rel. diff {worst:.1e}")
        rows.append({"agreement_kflr_max_rel": worst})
    return rows


def _random_kfac(model, gen):
    blocks = {}
    for name, m in model.named_children():
        if isinstance(m, nn.Linear):
            i, o = m.in_features + 1, m.out_features
            xa = torch.randn(i, i + 8, generator=gen)
            xg = torch.randn(o, o + 8, generator=gen)
            terms = ((xa @ xa.T / i, xg @ xg.T / o),)
            blocks[name] = ewc.KronBlock(f"{name}.weight", f"{name}.bias", (o, i - 1), terms)
    return ewc.KFAC(blocks)


FORMS = (("exact", None), ("exact", 64), ("eigenbasis", None), ("eigenbasis", 64))


def penalty_rows(rounds: int) -> list[dict]:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    steps = 10

    def step(reg=None, inject=False):
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            if reg is not None and not inject:
                loss = loss + reg.penalty()
            loss.backward()
            if inject:
                reg.add_penalty_grad()
            opt.step()

    rows = []
    for merge, rank in FORMS:
        gen = torch.Generator().manual_seed(0)
        reg = ewc.EWC(model, lam=1.0, curvature="kfac", merge=merge, rank=rank)
        label = merge if rank is None else f"{merge} rank {rank}"
        done = 0
        for n_tasks in (1, 10, 50):
            while done < n_tasks:
                reg.consolidate(fisher=_random_kfac(model, gen))
                done += 1
            numel = sum(t.numel() for t in reg.state_dict()["tensors"].values())
            for form, inject in (("penalty()", False), ("add_penalty_grad()", True)):
                ratio = _ratio(step, lambda inj=inject, r=reg: step(r, inj), rounds)
                rows.append(
                    {
                        "merge": label,
                        "tasks": n_tasks,
                        "form": form,
                        "ratio": ratio,
                        "state_numel": numel,
                    }
                )
                print(
                    f"  {label:20s} tasks={n_tasks:3d} {form:20s} {ratio:6.3f}x  "
                    f"state {numel} numbers",
                    flush=True,
                )
    return rows


def merge_accuracy(tasks: int, n: int) -> list[dict]:
    """Merged forms vs the exact per-task sum, on KFACs estimated on permuted-input tasks.

    Also the diagonal of the same KFACs (diagonal EWC's structure) against the same reference.
    """
    torch.manual_seed(1)
    model = mlp()
    forms = {
        f"{mode} {merge}" + ("" if rank is None else f" rank {rank}"): ewc.EWC(
            model, 1.0, curvature="kfac", mode=mode, merge=merge, rank=rank
        )
        for mode in ("separate", "online")
        for merge, rank in FORMS
    }
    diag = {mode: ewc.EWC(model, 1.0, mode=mode) for mode in ("separate", "online")}
    x = torch.randn(n, 784)
    rows = []
    for t in range(tasks):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        perm = torch.randperm(784)
        k = ewc.fisher_kfac(model, [x[:, perm]], kind="exact")
        for reg in forms.values():
            reg.consolidate(fisher=k)
        for reg in diag.values():
            reg.consolidate(fisher=k.diagonal())
        if t + 1 not in (1, 10, tasks):
            continue
        saved = [p.detach().clone() for p in model.parameters()]
        errs: dict[str, list[tuple[float, float]]] = {}
        params = list(model.parameters())
        for j in range(5):  # displacements: a gradient step of a new task (new permutation)
            gen = torch.Generator().manual_seed(1000 + j)
            xs = x[:, torch.randperm(784, generator=gen)]
            ys = torch.randint(0, 10, (n,), generator=gen)
            grads = torch.autograd.grad(nn.functional.cross_entropy(model(xs), ys), params)
            norm = torch.sqrt(sum(g.square().sum() for g in grads))
            size = 0.05 * sum(p.numel() for p in params) ** 0.5
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(g * (size / norm))
            values = {}
            for name, reg in [*forms.items(), *((f"{m} diagonal", r) for m, r in diag.items())]:
                v = reg.penalty()
                gv = torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, params)])
                values[name] = (float(v.detach()), gv)
            with torch.no_grad():
                for p, s0 in zip(params, saved, strict=True):
                    p.copy_(s0)
            for name, (v, gv) in values.items():
                ref, gref = values[f"{name.split()[0]} exact"]
                cos = float(gv @ gref / (gv.norm() * gref.norm()))
                errs.setdefault(name, []).append((abs(v - ref) / ref, cos))
        for name, e in errs.items():
            if name.endswith(" exact"):
                continue
            rel = statistics.median(v for v, _ in e)
            cos = statistics.median(c for _, c in e)
            rows.append({"tasks": t + 1, "form": name, "median_rel_err": rel, "grad_cosine": cos})
            print(
                f"  after {t + 1:3d} tasks {name:32s} penalty rel. error vs the exact sum "
                f"{rel:.2e}, gradient cosine {cos:.4f}",
                flush=True,
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smaller N, fewer rounds")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--parts", default="estimation,penalty,accuracy", help="which tables")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    rounds = 2 if args.quick else args.rounds
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    rows = estimation_rows(rounds, 2000 if args.quick else 10000) if "estimation" in parts else []
    prow = penalty_rows(rounds) if "penalty" in parts else []
    arow = merge_accuracy(10 if args.quick else 50, 256) if "accuracy" in parts else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "estimation": rows,
                    "penalty": prow,
                    "merge_accuracy": arow,
                    "torch": torch.__version__,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
