"""Fisher and penalty cost as ratios to one ordinary forward+backward pass over the same data.

Every figure is a ratio measured side by side in one run: each round times the baseline (one
batched forward+backward pass of the mean cross-entropy over all the data, batch 256) right
before the method, and the table reports the median ratio over rounds (the penalty rows: one
training step of every form per round, in a random order, 20 rounds per ``--rounds``, each
form's median step time over the plain step's). Competitors (BackPACK,
nngeometry) are timed when importable; install them with ``pip install --no-deps
backpack-for-pytorch einops unfoldNd nngeometry`` (their torchvision requirement must not come
in).

Usage::

    python benchmarks/bench_fisher.py [--rounds 5] [--quick] [--json out.json]
    OMP_NUM_THREADS=1 python benchmarks/bench_fisher.py --penalty-only --cpu-time
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

import ewc


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 12 * 12, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def _timeit(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _faults(fn: Callable[[], object]) -> float:
    """Minor page faults of one call (fresh memory the allocator had handed back to the OS)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)


def _ratio(base: Callable[[], object], fn: Callable[[], object], rounds: int) -> float:
    fn()  # warm-up
    ratios = []
    for _ in range(rounds):
        tb = _timeit(base)
        ratios.append(_timeit(fn) / tb)
    return statistics.median(ratios)


# --- Competitors ------------------------------------------------------------------------
def naive_loop(model, data, n_max=None):
    """Per-sample forward+backward with the data's labels (empirical), batch size 1."""
    params = [p for p in model.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    model.eval()
    seen = 0
    for xb, yb in data:
        for i in range(xb.shape[0]):
            loss = nn.functional.cross_entropy(model(xb[i : i + 1]), yb[i : i + 1])
            for a, g in zip(acc, torch.autograd.grad(loss, params), strict=True):
                a += g.square()
            seen += 1
            if n_max is not None and seen >= n_max:
                return acc
    return acc


def func_vmap(model, data):
    """torch.func: vmap(grad) per-sample gradients of the loss, squared and summed."""
    from torch.func import functional_call, grad, vmap

    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    acc = {k: torch.zeros_like(v) for k, v in params.items()}

    def loss(p, x, y):
        out = functional_call(model, p, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    for xb, yb in data:
        for k, g in per_sample(params, xb, yb).items():
            acc[k] += g.square().sum(0)
    return acc


def backpack_fn(model, data, ext_name):
    from backpack import backpack, extend, extensions

    m = extend(copy.deepcopy(model).eval())
    lossf = extend(nn.CrossEntropyLoss(reduction="sum"))
    ext = {
        "SumGradSquared": (extensions.SumGradSquared, "sum_grad_squared"),
        "DiagGGNMC": (extensions.DiagGGNMC, "diag_ggn_mc"),
        "DiagGGNExact": (extensions.DiagGGNExact, "diag_ggn_exact"),
    }[ext_name]

    def run():
        acc = [torch.zeros_like(p) for p in m.parameters()]
        for xb, yb in data:
            m.zero_grad()
            loss = lossf(m(xb), yb)
            with backpack(ext[0]()):
                loss.backward()
            for a, p in zip(acc, m.parameters(), strict=True):
                a += getattr(p, ext[1])
        return acc

    return run


def nngeometry_fn(model, data, variant):
    from nngeometry.metrics import FIM, FIM_MonteCarlo
    from nngeometry.object import PMatDiag

    xs = torch.cat([x for x, _ in data])
    ys = torch.cat([y for _, y in data])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=256)
    model.eval()
    if variant == "exact":
        return lambda: FIM(model, loader, PMatDiag, variant="classif_logits").get_diag()
    return lambda: FIM_MonteCarlo(model, loader, PMatDiag, variant="classif_logits").get_diag()


def _available(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except Exception:
        return False


# --- Fisher table -----------------------------------------------------------------------
def fisher_rows(name, model, n, shape, rounds, quick):
    torch.manual_seed(0)
    x, y = torch.randn(n, *shape), torch.randint(0, 10, (n,))
    data = [(x[i : i + 256], y[i : i + 256]) for i in range(0, n, 256)]

    def base():
        model.train()
        for xb, yb in data:
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()

    rows = []

    def add(method, kind, fn, r=rounds, note=""):
        ratio = _ratio(base, fn, r)
        rows.append(
            {"model": name, "N": n, "kind": kind, "method": method, "ratio": ratio, "note": note}
        )
        print(f"  {name:4s} {kind:9s} {method:28s} {ratio:8.2f}x {note}", flush=True)

    for kind in ["sampled", "empirical", "exact"]:
        add("ewc", kind, lambda k=kind: ewc.fisher_diagonal(model, data, kind=k))
    if _available("backpack"):
        add("BackPACK DiagGGNMC", "sampled", backpack_fn(model, data, "DiagGGNMC"))
        add("BackPACK SumGradSquared", "empirical", backpack_fn(model, data, "SumGradSquared"))
        add("BackPACK DiagGGNExact", "exact", backpack_fn(model, data, "DiagGGNExact"))
    if _available("nngeometry"):
        add("nngeometry FIM_MonteCarlo", "sampled", nngeometry_fn(model, data, "sampled"))
        add("nngeometry FIM", "exact", nngeometry_fn(model, data, "exact"))
    add("torch.func vmap", "empirical", lambda: func_vmap(model, data), r=max(1, rounds // 2))
    if _available("backpack"):
        _agreement(name, model, data[:2])
    n_naive = min(n, 500 if quick else 2000)
    t_naive = _timeit(lambda: naive_loop(model, data, n_naive)) * n / n_naive
    t_base = statistics.median(_timeit(base) for _ in range(3))
    note = f"(timed on {n_naive} samples, scaled to N)" if n_naive < n else ""
    rows.append(
        {
            "model": name,
            "N": n,
            "kind": "empirical",
            "method": "naive per-sample loop",
            "ratio": t_naive / t_base,
            "note": note,
        }
    )
    print(f"  {name:4s} empirical naive per-sample loop        {t_naive / t_base:8.2f}x {note}")
    return rows


def _agreement(name, model, data):
    """Cross-check: ours against BackPACK (a sum over samples) on the same batches."""
    n = sum(len(y) for _, y in data)
    pairs = [("empirical", "SumGradSquared"), ("exact", "DiagGGNExact")]
    for kind, ext in pairs:
        ours = ewc.fisher_diagonal(model, data, kind=kind)
        theirs = backpack_fn(model, data, ext)()
        rel = max(
            float((ours[k] - t / n).abs().max() / ours[k].abs().max().clamp_min(1e-30))
            for k, t in zip(ours, theirs, strict=True)
        )
        print(f"  {name:4s} {kind:9s} agreement with BackPACK {ext}: max rel. diff {rel:.1e}")


# --- Penalty training step --------------------------------------------------------------
class _ReturnedGrads(torch.autograd.Function):
    """The autograd penalty before issue 12: its backward returns new gradient tensors, which
    autograd then sums with the task gradient (kept here for the side-by-side rows)."""

    @staticmethod
    def forward(ctx, lam, offset, precs, anchors, *params):
        diffs = torch._foreach_sub(list(params), anchors)
        weighted = torch._foreach_mul(diffs, precs)
        pairs = zip(diffs, weighted, strict=True)
        dots = [torch.dot(d.reshape(-1), w.reshape(-1)) for d, w in pairs]
        ctx.lam = lam
        ctx.save_for_backward(*weighted)
        return 0.5 * lam * (torch.stack(dots).sum() + offset)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grads = torch._foreach_mul(list(ctx.saved_tensors), grad_out * ctx.lam)
        return (None, None, None, None, *grads)


def _returned_grads_penalty(reg):
    ps, precs, anchors = reg._operands()
    return _ReturnedGrads.apply(reg.lam, float(reg.offset), precs, anchors, *ps)


def _fresh_penalty(reg):
    """The penalty of 5ed6e9e: gradient written in place, fresh tensors for θ − μ and A ⊙ d."""
    from ewc._quadratic import Quadratic

    ps, precs, anchors = reg._operands()
    return Quadratic.apply(reg.lam, float(reg.offset), precs, anchors, None, *ps)


@torch.no_grad()
def _fresh_injection(reg):
    """add_penalty_grad of 5ed6e9e: a fresh tensor for θ − μ."""
    ps, precs, anchors = reg._operands()
    diffs = torch._foreach_sub(ps, anchors)
    torch._foreach_addcmul_([p.grad for p in ps], precs, diffs, value=reg.lam)


CLOCK: Callable[[], float] = time.perf_counter  # --cpu-time: time.thread_time


def _interleaved(steps: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each step, the steps run in a new random order every round.

    One call of each per round, so that a burst of load on this shared machine falls on every
    form alike; the medians over all rounds are what the ratios compare.
    """
    import random

    rng = random.Random(0)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():  # warm-up: scratch buffers, allocator, caches
        for _ in range(5):
            fn()
    for _ in range(rounds):
        order = list(steps)
        rng.shuffle(order)
        for k in order:
            t0 = CLOCK()
            steps[k]()
            times[k].append(CLOCK() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def wide() -> nn.Module:
    """A layer of 8.4M weights (33.5 MB in float32): above glibc's largest mmap threshold
    (32 MiB), so every fresh tensor of its size is new memory from the OS, faulted in."""
    return nn.Sequential(nn.Linear(4096, 2048), nn.ReLU(), nn.Linear(2048, 10))


@torch.no_grad()
def _arithmetic_only(reg, scratch):
    """The explicit form's tensor work with no autograd: ``d = θ − μ``, ``w = A ⊙ d``, ``Σ d·w``
    (flat), then ``.grad += λ w`` after the backward pass: the floor for any explicit form made
    of separate (unfused) operations. Returns the value and a function adding the gradient."""
    from ewc._quadratic import _value  # the penalty's own forward arithmetic, no Function

    ps, precs, anchors = reg._operands()
    value, ws = _value(reg.lam, float(reg.offset), precs, anchors, scratch, ps)
    return value, lambda: torch._foreach_add_([p.grad for p in ps], ws, alpha=reg.lam)


def penalty_rows(rounds, label="MLP", model=None, batch=256, task_counts=(1, 10, 100)):
    torch.manual_seed(0)
    model = mlp() if model is None else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    n_in = model[0].in_features
    x, y = torch.randn(batch, n_in), torch.randint(0, 10, (batch,))
    explicit = {
        "returned": _returned_grads_penalty,
        "fresh": _fresh_penalty,
        "new": lambda reg: reg.penalty(),
    }
    injected = {"fresh": _fresh_injection, "new": lambda reg: reg.add_penalty_grad()}

    def step(reg=None, form=None):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if reg is not None and form[0] == "penalty":
            loss = loss + explicit[form[1]](reg)
        if reg is not None and form[0] == "floor":
            value, add = _arithmetic_only(reg, floor_scratch)
            loss = loss + value
        loss.backward()
        if reg is not None and form[0] == "inject":
            injected[form[1]](reg)
        if reg is not None and form[0] == "floor":
            add()
        opt.step()

    rows = []
    gen = torch.Generator().manual_seed(0)
    reg = ewc.EWC(model, lam=1.0)
    floor_scratch = None
    done = 0
    forms = (
        ("penalty() returned (before issue 12)", ("penalty", "returned")),
        ("penalty() fresh tensors (5ed6e9e)", ("penalty", "fresh")),
        ("penalty()", ("penalty", "new")),
        ("explicit arithmetic only (floor)", ("floor", None)),
        ("add_penalty_grad() fresh (5ed6e9e)", ("inject", "fresh")),
        ("add_penalty_grad()", ("inject", "new")),
    )
    for n_tasks in task_counts:
        while done < n_tasks:
            f = {k: torch.rand(p.shape, generator=gen) for k, p in model.named_parameters()}
            reg.consolidate(fisher=f)
            done += 1
        from ewc._quadratic import Pool  # here: bench_ab imports this file with older trees

        floor_scratch = Pool().take(*reg._operands())
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "s.safetensors")
            reg.save(path)
            size = os.path.getsize(path)
        fns = {"plain": step} | {name: (lambda f=form: step(reg, f)) for name, form in forms}
        med = _interleaved(fns, rounds * 20)
        print(
            f"  {label} tasks={n_tasks:3d} plain step {med['plain'] * 1e3:.2f} ms (median)"
            f", {_faults(lambda: [step() for _ in range(20)]) / 20:.0f} page faults/step"
        )
        for name, form in forms:
            ratio = med[name] / med["plain"]
            faults = _faults(lambda f=form: [step(reg, f) for _ in range(20)]) / 20
            rows.append(
                {
                    "model": label,
                    "batch": batch,
                    "tasks": n_tasks,
                    "form": name,
                    "ratio": ratio,
                    "overhead_us": (med[name] - med["plain"]) * 1e6,
                    "faults_per_step": faults,
                    "state_bytes": size,
                }
            )
            print(
                f"  {label} tasks={n_tasks:3d} {name:38s} {ratio:6.3f}x"
                f"  (+{(med[name] - med['plain']) * 1e6:4.0f} us)  {faults:5.0f} page faults/step"
                f"  state file {size} bytes"
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smaller N, fewer rounds")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--penalty-only", action="store_true", help="only the penalty step rows")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="penalty rows: time the main thread's CPU time (with OMP_NUM_THREADS=1: the work "
        "itself, not the time other jobs on the machine took from it)",
    )
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.thread_time
    rounds = 2 if args.quick else args.rounds
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    rows = []
    if not args.penalty_only:
        rows = fisher_rows("MLP", mlp(), 2000 if args.quick else 10000, (784,), rounds, args.quick)
        rows += fisher_rows(
            "CNN", cnn(), 500 if args.quick else 2000, (1, 28, 28), rounds, args.quick
        )
    prow = penalty_rows(rounds)
    prow += penalty_rows(max(1, rounds // 5), "wide", wide(), batch=32, task_counts=(1,))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"fisher": rows, "penalty": prow, "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
