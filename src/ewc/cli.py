"""The ``ewc`` command: ``demo``, ``run``, ``reproduce``, ``plot``, ``overlap``, ``curvature``.

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


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
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
    g.add_argument("--xi", type=float, help="SI's damping ξ in ω / (Δ² + ξ) (default 0.1)")
    g.add_argument(
        "--kfac-rank", type=int, help="kfac-ewc: eigenpairs kept per task's Kronecker factor"
    )
    g.add_argument("--seed", type=int)
    g.add_argument(
        "--seeds",
        type=_ints,
        metavar="0,1,2",
        help="run every method once per seed; report mean ± std",
    )
    g.add_argument(
        "--device", choices=["cpu", "cuda", "mps", "auto"], help="where to train (default cpu)"
    )
    p = parser.add_argument_group("protocol")
    p.add_argument("--pad", type=int, help="zero pixels on every side (2: MNIST at 32×32)")
    p.add_argument(
        "--normalize",
        type=lambda t: [] if t.strip().lower() == "none" else _floats(t),
        metavar="MEAN,STD",
        help="normalise the (padded) inputs, e.g. 0.1,0.2752 (Hsu et al.); none: [0, 1] inputs",
    )
    opt = p.add_mutually_exclusive_group()
    opt.add_argument(
        "--keep-optimizer",
        dest="reset_optimizer",
        action="store_false",
        default=None,
        help="one optimizer for the whole stream (default: a fresh one per task)",
    )
    opt.add_argument(
        "--reset-optimizer",
        dest="reset_optimizer",
        action="store_true",
        default=None,
        help="a fresh optimizer for every task (overrides a config's choice)",
    )
    p.add_argument(
        "--output-mask",
        choices=["none", "seen"],
        help="class-incremental: train over the classes seen so far only (Hsu et al.)",
    )
    p.add_argument("--unpermuted-task", type=int, help="permuted: which task keeps pixel order")
    p.add_argument("--val-fraction", type=float, help="validation split (default 0.1; 0: none)")
    p.add_argument(
        "--l2-anchor",
        choices=["all", "latest"],
        help="L2 pulls towards every past optimum (all) or the latest one (latest, Hsu et al.)",
    )


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
        help="comma-separated: finetune,l2,ewc,online-ewc,si,mas,kfac-ewc,online-kfac-ewc",
    )
    r.add_argument(
        "--lam",
        type=_lam,
        help="λ: 100, or ewc=100,l2=0.01; ewc=10:100:1000 sweeps (si: the paper's c, default "
        "sweep 0.1:1:10:100:1000; mas: λ, default sweep 0.01:0.1:1:10:100)",
    )
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_training_options(r)

    rp = sub.add_parser(
        "reproduce",
        help="run a published protocol from configs/ and compare with the paper",
        description="Run one protocol of configs/ (`ewc reproduce --list` names them) and print "
        "our numbers beside the published ones (mean ± std, difference).",
    )
    rp.add_argument("name", nargs="?", help="protocol name (or a path to a protocol JSON)")
    rp.add_argument("--list", action="store_true", help="list the protocols and exit")
    rp.add_argument("--data-dir", help="directory with the IDX files the protocol reads")
    rp.add_argument("--device", choices=["cpu", "cuda", "mps", "auto"])
    rp.add_argument("--seeds", type=_ints, metavar="0,1,2", help="override the protocol's seeds")
    rp.add_argument(
        "--methods",
        type=lambda s: [m.strip() for m in s.split(",")],
        help="run only these of the protocol's methods",
    )
    rp.add_argument("--out", help="output directory (default runs/NAME)")
    rp.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    rp.add_argument("--no-progress", action="store_true", help="no progress bar")

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

    from .experiments.curvature import add_parser as _add_curvature

    _add_curvature(sub)
    return p


def _config(args: argparse.Namespace) -> Any:
    from .experiments.trainer import Config

    base: dict[str, Any] = {}
    if getattr(args, "config", None):
        try:
            base = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read --config {args.config}: {e}") from e
        if isinstance(base, dict) and "published" in base and "config" in base:
            from .experiments.protocols import load_protocol

            base = dict(load_protocol(args.config, check_methods=False).config)
    names = {f for f in Config.__dataclass_fields__}
    for key, value in vars(args).items():
        if key in names and value is not None:
            base[key] = value
    if "iterations" in base and ("epochs" not in base or getattr(args, "iterations", None)):
        base["epochs"] = None
    if getattr(args, "epochs", None) is not None and not getattr(args, "iterations", None):
        base["iterations"] = None
    if getattr(args, "methods", None) and isinstance(base.get("lam"), dict):
        # λ (and options) of methods not run are dropped, e.g. those of a protocol file
        base["lam"] = {m: v for m, v in base["lam"].items() if m in args.methods or m == "*"}
        opts = base.get("method_options") or {}
        base["method_options"] = {m: v for m, v in opts.items() if m in args.methods}
    if isinstance(base.get("lam"), dict) and "*" in base["lam"]:
        values = base["lam"].pop("*")
        for m in base.get("methods", ["finetune", "l2", "ewc"]):
            base["lam"].setdefault(m, values)
    if base.get("normalize") == []:
        base["normalize"] = None
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


def _reproduce(args: argparse.Namespace) -> None:
    import time

    from .experiments.plots import plot_all
    from .experiments.protocols import compare, list_protocols, load_protocol
    from .experiments.results import format_table
    from .experiments.trainer import METHODS, run_experiment

    if args.list:
        for p in list_protocols():
            cfg = p.config
            missing = [m for m in cfg.get("methods", []) if m not in METHODS]
            extra = f"  (needs {', '.join(missing)})" if missing else ""
            print(f"{p.name:34s} {p.title}{extra}")
        return
    if not args.name:
        raise ValueError("name a protocol (ewc reproduce --list shows them)")
    proto = load_protocol(args.name, check_methods=False)
    methods = args.methods or proto.config.get("methods")
    missing = [m for m in methods or [] if m not in METHODS]
    if missing:
        raise ValueError(
            f"this installation has no method(s) {missing} (available: {sorted(METHODS)}); run "
            f"the others with --methods {','.join(m for m in methods if m in METHODS)}"
        )
    lam = proto.config.get("lam", {})
    cfg = proto.make_config(
        data_dir=args.data_dir,
        device=args.device,
        seeds=args.seeds,
        methods=methods,
        lam={m: v for m, v in lam.items() if m in methods} if args.methods else None,
    )
    if cfg.source != "mnist5k" and not cfg.data_dir:
        raise ValueError(f"{proto.name} reads {cfg.source}: pass --data-dir DIR with its IDX files")
    out = args.out or str(Path("runs") / proto.name)
    _check_out(out)
    t0 = time.perf_counter()
    results = run_experiment(cfg, out, resume=args.resume, progress=not args.no_progress)
    plot_all(results, out)
    table, rows = compare(proto, results)
    wall = time.perf_counter() - t0
    print(f"{proto.title}\n{proto.reference}\n")
    print(format_table(results))
    print()
    print(table)
    print(f"\nwall time {wall:.0f} s on {results['versions'].get('device', 'cpu')}; results: {out}")
    (Path(out) / "comparison.json").write_text(
        json.dumps({"protocol": proto.name, "wall_seconds": round(wall, 1), "rows": rows}, indent=1)
    )
    (Path(out) / "comparison.txt").write_text(table + "\n")


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
        elif args.command == "reproduce":
            _reproduce(args)
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
        elif args.command == "curvature":
            from .experiments.curvature import run_curvature

            _check_out(args.out)
            print(run_curvature(args))
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        print(f"ewc {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
