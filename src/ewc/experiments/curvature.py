"""``ewc curvature``: how well each Fisher stands in for the Hessian during training.

The demo network (784-400-400-10, ReLU by default) is trained with Adam on one task (the
unpermuted digits). At initialisation, midway and at the end, the sampled, empirical and exact
diagonal Fishers and the exact diagonal Hessian of the per-sample-mean negative log-likelihood
(:func:`ewc.hessian_diagonal`) are computed on the same ``--samples`` training points, and each
Fisher is compared with the Hessian entry by entry:

* ``correlation``: Pearson correlation of the entries (all parameters together);
* ``log_correlation``: Pearson correlation of ``log10`` of the entries where both are positive
  (what the log-log scatter shows);
* ``relative_error``: ``‖F − H‖₂ / ‖H‖₂`` over all entries;
* ``seconds``: wall-clock time of each estimate; and for the Hessian the fraction and the most
  negative of its entries;
* ``hutchinson``: the same comparison for the unbiased Hutchinson estimate of the Hessian
  diagonal with ``--probes`` Rademacher probes, against the exact one.

Writes ``curvature.json`` and ``curvature.png`` (one log-log scatter panel per stage).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..estimate import fisher_diagonal
from ..hessian import hessian_diagonal
from .models import MLP

__all__ = ["add_parser", "run_curvature", "compare", "plot_curvature"]

KINDS = ("sampled", "empirical", "exact")
_PLOT_POINTS = 3000


def add_parser(sub: Any) -> None:
    """Add the ``curvature`` subcommand to the ``ewc`` command's subparsers."""
    c = sub.add_parser(
        "curvature",
        help="Fisher vs Hessian diagonal during training (offline)",
        description="Train the demo network on one task and compare the sampled, empirical "
        "and exact Fisher with the exact Hessian diagonal at initialisation, midway and at "
        "the end: correlation, relative error, negative Hessian entries, cost. Writes "
        "curvature.json and curvature.png.",
    )
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument(
        "--source",
        choices=["mnist5k", "mnist", "fashion-mnist", "kmnist"],
        help="mnist5k (embedded, the default) or a dataset read from --data-dir (default mnist)",
    )
    c.add_argument("--data-dir", help="directory with the standard IDX files of --source")
    c.add_argument(
        "--hidden",
        type=lambda s: tuple(int(v) for v in s.split(",")),
        default=(400, 400),
        metavar="400,400",
        help="hidden layer sizes (default: the demo's 400,400)",
    )
    c.add_argument("--activation", choices=["relu", "tanh"], default="relu")
    c.add_argument("--epochs", type=float, default=3.0, help="training epochs (default 3)")
    c.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument(
        "--samples", type=int, default=500, help="training points of every estimate (500)"
    )
    c.add_argument(
        "--probes", type=int, default=20, help="Hutchinson probes, compared with the exact (20)"
    )
    c.add_argument("--seed", type=int, default=0)


def _network(in_features: int, hidden: tuple[int, ...], activation: str) -> nn.Module:
    model = MLP(in_features, hidden, 10)
    if activation == "tanh":
        for i, m in enumerate(model.body):
            if isinstance(m, nn.ReLU):
                model.body[i] = nn.Tanh()
    return model


def _flat(d: Any) -> Tensor:
    return torch.cat([d[n].detach().double().reshape(-1) for n in d])


def _pearson(a: Tensor, b: Tensor) -> float:
    if a.numel() < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def compare(fisher: Any, hessian: Any) -> dict[str, float]:
    """Return correlation, log-correlation and relative error of ``fisher`` against ``hessian``."""
    f, h = _flat(fisher), _flat(hessian)
    both = (f > 0) & (h > 0)
    hn = float(h.norm())
    return {
        "correlation": _pearson(f, h),
        "log_correlation": _pearson(f[both].log10(), h[both].log10()),
        "relative_error": float((f - h).norm()) / hn if hn > 0 else float("nan"),
        "trace": float(f.sum()),
    }


def _train_steps(
    model: nn.Module, x: Tensor, y: Tensor, steps: int, opt: Any, gen: torch.Generator, bs: int
) -> None:
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (bs,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _stage(
    name: str, step: int, model: nn.Module, x: Tensor, y: Tensor, seed: int, probes: int
) -> dict[str, Any]:
    data = [(x, y)]
    with torch.no_grad():
        z = model(x)
        loss = float(nn.functional.cross_entropy(z, y))
        acc = float((z.argmax(1) == y).double().mean())
    t = time.perf_counter()
    hess = hessian_diagonal(model, data)
    h_seconds = time.perf_counter() - t
    h = _flat(hess)
    out: dict[str, Any] = {
        "stage": name,
        "step": step,
        "train_loss": loss,
        "train_accuracy": acc,
        "hessian": {
            "seconds": h_seconds,
            "negative_fraction": float((h < 0).double().mean()),
            "min": float(h.min()),
            "max": float(h.max()),
            "trace": float(h.sum()),
        },
        "fisher": {},
    }
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    hutch = hessian_diagonal(model, data, method="hutchinson", n_probes=probes, generator=gen)
    seconds = time.perf_counter() - t
    out["hutchinson"] = {"probes": probes, "seconds": seconds, **compare(hutch, hess)}
    values = {"hessian": h}
    for kind in KINDS:
        gen = torch.Generator().manual_seed(seed)
        t = time.perf_counter()
        f = fisher_diagonal(model, data, kind=kind, generator=gen)
        seconds = time.perf_counter() - t
        out["fisher"][kind] = {"seconds": seconds, **compare(f, hess)}
        values[kind] = _flat(f)
    out["_values"] = values  # for the plot; not written to the JSON
    return out


def run_curvature(args: argparse.Namespace) -> str:
    """Run ``ewc curvature`` for ``args``; write the JSON and the plot; return a summary."""
    from ..data import load_source

    start = time.perf_counter()
    if args.samples < 2 or args.batch_size < 1 or args.epochs < 0 or args.probes < 1:
        raise ValueError(
            "--samples must be >= 2, --batch-size >= 1, --epochs >= 0 and --probes >= 1"
        )
    source = args.source or ("mnist" if args.data_dir else "mnist5k")
    base = load_source(source, args.data_dir, seed=args.seed)
    x = torch.as_tensor(base.x_train, dtype=torch.float32).reshape(len(base.y_train), -1) / 255.0
    y = torch.as_tensor(base.y_train, dtype=torch.int64)
    n = min(args.samples, len(y))
    torch.manual_seed(args.seed)
    model = _network(x.shape[1], tuple(args.hidden), args.activation).float()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    steps = max(1, round(args.epochs * len(y) / args.batch_size)) if args.epochs > 0 else 0
    marks = [("init", 0), ("midway", steps // 2), ("end", steps)]
    stages, done = [], 0
    for name, step in marks:
        _train_steps(model, x, y, step - done, opt, gen, args.batch_size)
        done = step
        stages.append(_stage(name, step, model, x[:n], y[:n], args.seed, args.probes))
    n_params = sum(p.numel() for p in model.parameters())
    result = {
        "config": {
            "source": source,
            "hidden": list(args.hidden),
            "activation": args.activation,
            "epochs": args.epochs,
            "steps": steps,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "samples": n,
            "seed": args.seed,
            "probes": args.probes,
            "parameters": n_params,
            "threads": torch.get_num_threads(),
        },
        "stages": [{k: v for k, v in s.items() if k != "_values"} for s in stages],
        "elapsed_seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    (out / "curvature.json").write_text(json.dumps(result, indent=2))
    png = plot_curvature(stages, out / "curvature.png", seed=args.seed)
    return format_summary(result) + f"\n\nwrote {out / 'curvature.json'} and {png}"


def format_summary(result: dict[str, Any]) -> str:
    """Return a plain-text table of a ``curvature.json`` result."""
    cfg = result["config"]
    lines = [
        f"{cfg['activation']} network {'-'.join(map(str, [784, *cfg['hidden'], 10]))} "
        f"({cfg['parameters']:,} parameters), estimates on {cfg['samples']} training points",
        f"{'stage':7s} {'loss':>6s} {'acc':>5s} {'H<0':>6s} {'H s':>6s} "
        f"{'hutch relerr/s':>15s}   "
        + "   ".join(f"{k + ' corr/logcorr/relerr/s':>32s}" for k in KINDS),
    ]
    for s in result["stages"]:
        h = s["hessian"]
        cells = [
            f"{f['correlation']:8.4f} {f['log_correlation']:8.4f} {f['relative_error']:8.2g} "
            f"{f['seconds']:5.2f}"
            for f in (s["fisher"][k] for k in KINDS)
        ]
        lines.append(
            f"{s['stage']:7s} {s['train_loss']:6.3f} {s['train_accuracy']:5.3f} "
            f"{h['negative_fraction']:6.3f} {h['seconds']:6.2f} "
            f"{s['hutchinson']['relative_error']:9.3g} {s['hutchinson']['seconds']:5.2f}   "
            + "   ".join(cells)
        )
    return "\n".join(lines)


def plot_curvature(stages: list[dict[str, Any]], path: Path, *, seed: int = 0) -> Path:
    """One log-log panel per stage: each Fisher's entries against the Hessian diagonal's.

    Negative Hessian entries are drawn at ``|H|`` with an ``×``; the dashed line is ``F = H``.
    At most 3,000 entries (the same ones in every panel) are drawn.
    """
    from .plots import _colors, _figure, _save

    fig = _figure(4.2 * len(stages), 4.2)
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    total = stages[0]["_values"]["hessian"].numel()
    rng = np.random.default_rng(seed)
    pick = rng.choice(total, size=min(total, _PLOT_POINTS), replace=False)
    colors = dict(zip(KINDS, _colors(len(KINDS)), strict=True))
    for ax, s in zip(axes, stages, strict=True):
        h = s["_values"]["hessian"].numpy()[pick]
        lo, hi = math.inf, 0.0
        for kind in ("exact", "sampled", "empirical"):  # exact first: the others stay visible
            f = s["_values"][kind].numpy()[pick]
            ok = (f > 0) & (h != 0)
            pos, neg = ok & (h > 0), ok & (h < 0)
            label = f"{kind} (r={s['fisher'][kind]['log_correlation']:.2f})"
            ax.scatter(np.abs(h[pos]), f[pos], s=4, alpha=0.4, color=colors[kind], label=label)
            if neg.any():
                ax.scatter(np.abs(h[neg]), f[neg], s=10, marker="x", color=colors[kind])
            if ok.any():
                vals = np.concatenate([np.abs(h[ok]), f[ok]])
                lo, hi = min(lo, float(vals.min())), max(hi, float(vals.max()))
        if hi > 0:
            ax.plot([lo, hi], [lo, hi], ls="--", color="0.3", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        neg_frac = s["hessian"]["negative_fraction"]
        ax.set_title(
            f"{s['stage']} (step {s['step']}, loss {s['train_loss']:.2f}); "
            f"H<0: {100 * neg_frac:.1f}%",
            fontsize="medium",
        )
        ax.set_xlabel("|Hessian diagonal| (× = negative)")
        ax.set_ylabel("Fisher diagonal")
        ax.legend(loc="upper left", fontsize="small", markerscale=3)
    return _save(fig, path)
