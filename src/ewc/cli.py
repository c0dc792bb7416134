"""The ``ewc`` command: ``ewc demo``, ``ewc run``, ``ewc plot``, ``ewc overlap``.

Run ``ewc <command> --help`` for the options of each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "DEMO"]

# The demo's hyperparameters: 10 permuted tasks of the embedded 5,000 MNIST digits, a 2×400
# ReLU network, Adam. λ for L2 and EWC were chosen on the validation split by the sweep in
# docs/REPRODUCTION.md (EWC: 10, 30, 100, 300, 1000, 10000; L2: 1e-4 ... 10).
DEMO: dict[str, Any] = {
    "benchmark": "permuted-mnist",
    "source": "mnist5k",
    "tasks": 10,
    "methods": ["finetune", "l2", "ewc"],
    "lam": {"l2": [1e-4], "ewc": [100.0]},
    "hidden": [400, 400],
    "optimizer": "adam",
    "lr": 1e-3,
    "batch_size": 64,
    "epochs": 5,
    "fisher_kind": "sampled",
    "eval_every": 60,
    "eval_samples": 500,
}


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _lam(text: str) -> dict[str, list[float]]:
    """``100`` (every method), ``ewc=100,l2=0.01`` or ``ewc=1:10:100`` (a sweep)."""
    out: dict[str, list[float]] = {}
    if "=" not in text:
        return {"*": _floats(text.replace(":", ","))}
    for part in text.split(","):
        if "=" not in part:
            raise argparse.ArgumentTypeError(
                f"bad --lam {text!r}: use 100, or method=value pairs like ewc=100,l2=0.01, with "
                "':' between candidates (ewc=10:100:1000)"
            )
        name, values = part.split("=", 1)
        out[name.strip()] = _floats(values.replace(":", ","))
    return out


def _add_training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument(
        "--hidden",
        type=lambda s: [int(v) for v in s.split(",")],
        metavar="400,400",
        help="hidden layer sizes",
    )
    g.add_argument("--dropout", type=float, help="dropout after hidden layers")
    g.add_argument("--input-dropout", type=float, help="dropout on the input")
    g.add_argument("--optimizer", choices=["sgd", "adam"])
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--momentum", type=float, help="SGD momentum")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--epochs", type=float, help="epochs per task")
    g.add_argument("--iterations", type=int, help="minibatch steps per task (instead of epochs)")
    g.add_argument(
        "--early-stopping",
        action="store_true",
        default=None,
        help="stop a task when its validation accuracy stops improving (Fig. 2B)",
    )
    g.add_argument("--patience", type=int, help="epochs without improvement before stopping")
    g.add_argument("--eval-every", type=int, help="evaluate all tasks every N steps (Fig. 2A)")
    g.add_argument("--eval-samples", type=int, help="test samples per task for those curves")
    g.add_argument("--fisher-kind", choices=["sampled", "empirical", "exact"])
    g.add_argument("--fisher-samples", type=int, help="data points for each Fisher estimate")
    g.add_argument("--gamma", type=float, help="online-ewc decay of old Fishers, in (0, 1]")
    g.add_argument("--seed", type=int)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ewc",
        description="Elastic Weight Consolidation experiments: train a network on a sequence of "
        "tasks with fine-tuning, L2 and EWC, and compare how much each forgets.",
        epilog="Start with `ewc demo` (offline, about a minute). Then `ewc run --help`.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser(
        "demo",
        help="10 permuted tasks, fine-tuning vs L2 vs EWC (offline)",
        description="Train on 10 permuted tasks of 5,000 real MNIST digits that "
        "ship with the package; print the metrics and write results and plots.",
    )
    d.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")

    r = sub.add_parser(
        "run",
        help="run an experiment",
        description="Train the chosen methods on a task stream. Options override "
        "a --config JSON file; λ given as several values is chosen on the "
        "validation split.",
    )
    r.add_argument("--config", help="JSON file with any of the options (keys as in results.json)")
    r.add_argument("--benchmark", choices=["permuted-mnist", "rotated-mnist", "split-mnist"])
    r.add_argument(
        "--scenario",
        choices=["task", "domain", "class"],
        help="task-, domain- or class-incremental (default: domain for permuted/"
        "rotated, task for split)",
    )
    r.add_argument(
        "--source",
        choices=["mnist5k", "mnist", "fashion-mnist", "kmnist"],
        help="mnist5k (embedded, default) or a dataset read from --data-dir",
    )
    r.add_argument("--data-dir", help="directory with the standard IDX files of --source")
    r.add_argument("--tasks", type=int, help="number of tasks")
    r.add_argument(
        "--methods",
        type=lambda s: [m.strip() for m in s.split(",")],
        help="comma-separated: finetune,l2,ewc,online-ewc,kfac-ewc,online-kfac-ewc",
    )
    r.add_argument("--lam", type=_lam, help="λ: 100, or ewc=100,l2=0.01; ewc=10:100:1000 sweeps")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_training_options(r)

    pl = sub.add_parser(
        "plot",
        help="draw the figures of a results.json",
        description="Redraw fig2a/fig2b (and fig2c) PNGs from a results.json.",
    )
    pl.add_argument("results", help="path to results.json")
    pl.add_argument("--out", help="directory for the PNGs (default: beside results.json)")

    o = sub.add_parser(
        "overlap",
        help="Fisher overlap per layer (paper Fig. 2C)",
        description="Train a network on permuted tasks of varying similarity and "
        "plot the overlap of their Fishers per layer.",
    )
    o.add_argument("--out", required=True, help="output directory")
    o.add_argument(
        "--source", choices=["mnist5k", "mnist", "fashion-mnist", "kmnist"], default="mnist5k"
    )
    o.add_argument("--data-dir")
    o.add_argument(
        "--fractions",
        type=_floats,
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="fractions of pixels permuted for task B (default 0,0.25,0.5,0.75,1)",
    )
    o.add_argument("--epochs", type=float, default=5)
    o.add_argument("--fisher-samples", type=int, default=1000)
    o.add_argument("--seed", type=int, default=0)
    return p


def _config(args: argparse.Namespace) -> Any:
    from .experiments.trainer import Config

    base: dict[str, Any] = {}
    if getattr(args, "config", None):
        try:
            base = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read --config {args.config}: {e}") from e
    names = {f for f in Config.__dataclass_fields__}
    for key, value in vars(args).items():
        if key in names and value is not None:
            base[key] = value
    if "iterations" in base and "epochs" not in base:
        base["epochs"] = None
    if isinstance(base.get("lam"), dict) and "*" in base["lam"]:
        values = base["lam"].pop("*")
        for m in base.get("methods", ["finetune", "l2", "ewc"]):
            base["lam"].setdefault(m, values)
    if base.get("data_dir") and "source" not in base:
        base["source"] = "mnist"
    return Config.from_dict(base)


def _check_out(path: str) -> None:
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create output directory {p}: {e.strerror}") from e
    if not os.access(p, os.W_OK):
        raise ValueError(f"output directory {p} is not writable")


def _clear_previous_demo(out: str, cfg: Any) -> None:
    """Remove the checkpoints of an earlier demo in ``out`` (and nothing else)."""
    import shutil
    from dataclasses import asdict

    ckpt = Path(out) / "checkpoints"
    saved = ckpt / "config.json"
    if saved.exists():
        try:
            same = json.loads(saved.read_text()) == asdict(cfg)
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            shutil.rmtree(ckpt)


def _run(cfg: Any, out: str, resume: bool, progress: bool) -> None:
    from .experiments.plots import plot_all
    from .experiments.results import format_table
    from .experiments.trainer import run_experiment

    _check_out(out)
    results = run_experiment(cfg, out, resume=resume, progress=progress)
    paths = plot_all(results, out)
    print(format_table(results))
    print(
        f"\n{len(results['methods'])} methods, {cfg.tasks} tasks, "
        f"{results['elapsed_seconds']:.0f} s. Results: {Path(out) / 'results.json'} "
        f"(+ results.csv); plots: {', '.join(str(p) for p in paths)}"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ewc`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .experiments.trainer import Config

            cfg = Config.from_dict(json.loads(json.dumps(DEMO)))
            _clear_previous_demo(args.out, cfg)
            _run(cfg, args.out, resume=False, progress=not args.no_progress)
        elif args.command == "run":
            _run(_config(args), args.out, args.resume, not args.no_progress)
        elif args.command == "plot":
            from .experiments.plots import plot_all
            from .experiments.results import read_results

            results = read_results(args.results)
            out = args.out or str(Path(args.results).parent)
            _check_out(out)
            for path in plot_all(results, out):
                print(path)
        elif args.command == "overlap":
            from .experiments.overlap_experiment import run_overlap

            _check_out(args.out)
            print(run_overlap(args))
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        print(f"ewc {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
