"""Sequential training on a task stream: fine-tuning, L2, EWC and online EWC, side by side.

Every method trains the same initial network on the tasks in order and is evaluated on every
task after every task (the accuracy matrix ``R[i][j]``), and optionally at intervals within a
task (the paper's Fig. 2A curves). A λ given as several values is chosen on the validation
split (final average validation accuracy), never on the test set.

Reproducibility: all randomness of task ``t`` (shuffling, dropout, sampled Fisher labels) is
seeded from ``(seed, t)``, so a run killed after a finished task and resumed from its checkpoint
ends with exactly the results of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..penalty import EWC, L2
from .checkpoint import load_checkpoint, save_checkpoint
from .models import MLP

__all__ = ["Config", "METHODS", "register_method", "run_experiment", "Interrupted"]


@dataclass
class Config:
    """Everything that defines an experiment (saved in ``results.json``)."""

    benchmark: str = "permuted-mnist"
    scenario: str | None = None
    source: str = "mnist5k"
    data_dir: str | None = None
    tasks: int = 10
    methods: list[str] = field(default_factory=lambda: ["finetune", "l2", "ewc"])
    lam: dict[str, list[float]] = field(default_factory=dict)
    hidden: list[int] = field(default_factory=lambda: [400, 400])
    dropout: float = 0.0
    input_dropout: float = 0.0
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    batch_size: int = 64
    epochs: float | None = 5
    iterations: int | None = None
    early_stopping: bool = False
    patience: int = 3
    eval_every: int = 0
    eval_samples: int = 1000
    fisher_kind: str = "sampled"
    fisher_samples: int | None = None
    gamma: float = 1.0
    kfac_rank: int | None = None  # kfac-ewc: eigenpairs kept per task's factor (None: all)
    seed: int = 0
    first_identity: bool = True
    val_fraction: float = 0.1

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad option."""
        if self.tasks < 1:
            raise ValueError(f"--tasks must be >= 1, got {self.tasks}")
        unknown = [m for m in self.methods if m not in METHODS]
        if not self.methods or unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
        for m, values in self.lam.items():
            if m not in METHODS:
                raise ValueError(f"--lam names unknown method {m!r}")
            if not values or any(not math.isfinite(v) or v < 0 for v in values):
                raise ValueError(f"λ values for {m} must be finite and >= 0, got {values}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"--optimizer must be sgd or adam, got {self.optimizer!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if (self.epochs is None) == (self.iterations is None):
            raise ValueError("give exactly one of --epochs and --iterations")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"--iterations must be >= 1, got {self.iterations}")
        for name in ("dropout", "input_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1)")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"--gamma must be in (0, 1], got {self.gamma}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Build from a dict (e.g. a JSON config file), rejecting unknown keys."""
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown config keys {bad}; known: {sorted(known)}")
        return cls(**d)


# --- Methods ------------------------------------------------------------------------------
Regularizer = EWC  # EWC and L2 share the interface: consolidate(), penalty()
MethodFactory = Callable[[nn.Module, float, Config], Regularizer | None]


def _finetune(model: nn.Module, lam: float, cfg: Config) -> Regularizer | None:
    return None


def _l2(model: nn.Module, lam: float, cfg: Config) -> Regularizer | None:
    return L2(model, lam)


def _ewc(model: nn.Module, lam: float, cfg: Config) -> Regularizer | None:
    return EWC(model, lam, kind=cfg.fisher_kind, n_samples=cfg.fisher_samples)


def _online_ewc(model: nn.Module, lam: float, cfg: Config) -> Regularizer | None:
    return EWC(
        model,
        lam,
        mode="online",
        gamma=cfg.gamma,
        kind=cfg.fisher_kind,
        n_samples=cfg.fisher_samples,
    )


def _kfac_ewc(model: nn.Module, lam: float, cfg: Config) -> Regularizer | None:
    """KFAC-EWC (Ritter et al. 2018): every task's Kronecker factors (``kfac_rank`` eigenpairs)."""
    return EWC(
        model,
        lam,
        curvature="kfac",
        rank=cfg.kfac_rank,
        kind=cfg.fisher_kind,
        n_samples=cfg.fisher_samples,
    )


def _online_kfac_ewc(model: nn.Module, lam: float, cfg: Config) -> Regularizer | None:
    """Online KFAC-EWC: ``H ← γ H + H_new`` (each task's factors) at the latest optimum."""
    return EWC(
        model,
        lam,
        curvature="kfac",
        rank=cfg.kfac_rank,
        mode="online",
        gamma=cfg.gamma,
        kind=cfg.fisher_kind,
        n_samples=cfg.fisher_samples,
    )


METHODS: dict[str, MethodFactory] = {
    "finetune": _finetune,
    "l2": _l2,
    "ewc": _ewc,
    "online-ewc": _online_ewc,
    "kfac-ewc": _kfac_ewc,
    "online-kfac-ewc": _online_kfac_ewc,
}
DEFAULT_LAM = {
    "finetune": 0.0,
    "l2": 1e-4,
    "ewc": 100.0,
    "online-ewc": 100.0,
    "kfac-ewc": 100.0,
    "online-kfac-ewc": 100.0,
}


def register_method(name: str, factory: MethodFactory, default_lam: float = 0.0) -> None:
    """Add a method to the trainer.

    ``factory(model, lam, config)`` returns an object with ``consolidate(data)`` and
    ``penalty()`` (like :class:`ewc.EWC`), or ``None`` for plain training.
    """
    METHODS[name] = factory
    DEFAULT_LAM[name] = default_lam


class Interrupted(RuntimeError):
    """Raised by ``stop_after_tasks`` (testing the resume path)."""


# --- One run: one method, one λ -----------------------------------------------------------
@dataclass
class _Data:
    """The stream with every task's validation and test tensors cached (train built per task)."""

    stream: Any
    val: list[tuple[Tensor, Tensor]]
    test: list[tuple[Tensor, Tensor]]


def _accuracy(model: MLP, x: Tensor, y: Tensor, task: int) -> float:
    if len(y) == 0:
        return float("nan")
    return float((model.predict(x, task) == y).double().mean())


def _evaluate(
    model: MLP, sets: list[tuple[Tensor, Tensor]], limit: int | None = None
) -> list[float]:
    return [_accuracy(model, x[:limit], y[:limit], t) for t, (x, y) in enumerate(sets)]


def _seed(cfg: Config, task: int, salt: int) -> int:
    return (cfg.seed * 1_000_003 + task * 7919 + salt) % (2**63)


def _optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)


def _steps(cfg: Config, n: int) -> int:
    per_epoch = math.ceil(n / cfg.batch_size)
    if cfg.iterations is not None:
        return cfg.iterations
    assert cfg.epochs is not None
    return max(1, round(cfg.epochs * per_epoch))


def run_sequence(
    cfg: Config,
    method: str,
    lam: float,
    data: _Data,
    run_dir: Path | None,
    *,
    on_step: Callable[[int], None] | None = None,
    stop_after_tasks: int | None = None,
) -> dict[str, Any]:
    """Train ``method`` with ``lam`` on every task in order; return matrices and curves."""
    stream = data.stream
    torch.manual_seed(cfg.seed)  # the same initial network for every method
    model = MLP(
        data.test[0][0].shape[1],
        tuple(cfg.hidden),
        stream.num_outputs,
        heads=stream.num_heads,
        dropout=cfg.dropout,
        input_dropout=cfg.input_dropout,
    )
    reg = METHODS[method](model, lam, cfg)
    progress: dict[str, Any] = {
        "R_test": [],
        "R_val": [],
        "curves": {"iteration": [], "accuracy": [], "task_boundaries": []},
        "baseline": _evaluate(model, data.test),
        "iteration": 0,
    }
    start = 0
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        start = _resume(run_dir, model, reg, progress)
    curves = progress["curves"]
    for t in range(start, len(stream)):
        task = stream[t]
        x, y = task.x_train, task.y_train
        opt = _optimizer(model, cfg)
        torch.manual_seed(_seed(cfg, t, 1))  # dropout
        shuffle = torch.Generator().manual_seed(_seed(cfg, t, 2))
        curves["task_boundaries"].append(progress["iteration"])
        best: tuple[float, dict[str, Tensor]] | None = None
        stale = 0
        per_epoch = math.ceil(len(y) / cfg.batch_size)
        order = torch.randperm(len(y), generator=shuffle)
        for step in range(_steps(cfg, len(y))):
            i = step % per_epoch
            if i == 0 and step > 0:
                order = torch.randperm(len(y), generator=shuffle)
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            model.train()
            loss = nn.functional.cross_entropy(model(x[idx], t), y[idx])
            if reg is not None and reg.num_tasks:
                loss = loss + reg.penalty()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{method} (λ={lam}) diverged on task {t} at step {step}: lower --lr or λ"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            progress["iteration"] += 1
            if on_step is not None:
                on_step(1)
            if cfg.eval_every and progress["iteration"] % cfg.eval_every == 0:
                curves["iteration"].append(progress["iteration"])
                curves["accuracy"].append(_evaluate(model, data.test, cfg.eval_samples))
            if cfg.early_stopping and i == per_epoch - 1:
                acc = _accuracy(model, *data.val[t], t)
                if best is None or acc > best[0]:
                    best, stale = (acc, {k: v.clone() for k, v in model.state_dict().items()}), 0
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        break
        if best is not None:
            model.load_state_dict(best[1])
        if reg is not None:
            batches = [((x[i : i + 256], t), y[i : i + 256]) for i in range(0, len(y), 256)]
            gen = torch.Generator().manual_seed(_seed(cfg, t, 3))
            if isinstance(reg, L2):
                reg.consolidate()
            else:
                reg.consolidate(batches, generator=gen)
        progress["R_test"].append(_evaluate(model, data.test))
        progress["R_val"].append(_evaluate(model, data.val))
        if cfg.eval_every:
            curves["iteration"].append(progress["iteration"])
            curves["accuracy"].append(_evaluate(model, data.test, cfg.eval_samples))
        if run_dir is not None:
            _save(run_dir, t, model, reg, progress)
        if stop_after_tasks is not None and t + 1 >= stop_after_tasks and t + 1 < len(stream):
            raise Interrupted(f"stopped after task {t} as asked")
    return progress


def _save(
    run_dir: Path, t: int, model: nn.Module, reg: Regularizer | None, progress: dict[str, Any]
) -> None:
    state: dict[str, Any] = {"model": model.state_dict()}
    if reg is not None:
        state["ewc"] = reg.state_dict()
    save_checkpoint(run_dir / f"task-{t}.safetensors", state)
    tmp = run_dir / ".progress.json.tmp"
    tmp.write_text(json.dumps({"task": t, **progress}))
    os.replace(tmp, run_dir / "progress.json")
    old = run_dir / f"task-{t - 1}.safetensors"
    old.unlink(missing_ok=True)


def _resume(
    run_dir: Path, model: nn.Module, reg: Regularizer | None, progress: dict[str, Any]
) -> int:
    """Load the last finished task of ``run_dir`` (if any); return the next task index."""
    path = run_dir / "progress.json"
    if not path.exists():
        return 0
    saved = json.loads(path.read_text())
    t = saved.pop("task")
    state = load_checkpoint(run_dir / f"task-{t}.safetensors")
    model.load_state_dict(state["model"])
    if reg is not None:
        reg.load_state_dict(state["ewc"])
    progress.update(saved)
    return t + 1


# --- The experiment -------------------------------------------------------------------------
def load_data(cfg: Config) -> _Data:
    """Build the task stream and cache every task's validation and test tensors."""
    from ..data import make_stream

    stream = make_stream(
        cfg.benchmark,
        source=cfg.source,
        root=cfg.data_dir,
        n_tasks=cfg.tasks,
        scenario=cfg.scenario,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        first_identity=cfg.first_identity,
    )
    val, test = [], []
    for task in stream:
        val.append(task.split("val"))
        test.append(task.split("test"))
    return _Data(stream, val, test)


def _n_train(task: Any) -> int:
    """Training-set size of ``task``, counted from the base labels (no tensors are built)."""
    y = task.base.split("train")[1]
    return int(np.isin(y, task.classes).sum())


def _lams(cfg: Config, method: str) -> list[float]:
    return (
        list(cfg.lam.get(method, [DEFAULT_LAM.get(method, 0.0)])) if method != "finetune" else [0.0]
    )


def run_experiment(
    cfg: Config,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after_tasks: int | None = None,
) -> dict[str, Any]:
    """Run every method (and λ candidate), choose λ on validation, write the results.

    Returns the results dict (also written to ``out_dir/results.json`` with CSVs and plots).
    """
    from .results import method_result, versions, write_results

    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoints"
    cfg_path = ckpt / "config.json"
    if resume:
        if not cfg_path.exists():
            raise FileNotFoundError(f"nothing to resume in {out}: no {cfg_path}")
        saved = json.loads(cfg_path.read_text())
        if saved != asdict(cfg):
            diff = sorted(k for k in saved if saved.get(k) != asdict(cfg).get(k))
            raise ValueError(f"--resume with a different configuration (differs in {diff})")
    elif ckpt.exists() and any(ckpt.iterdir()):
        raise FileExistsError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )
    ckpt.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(asdict(cfg), indent=1))
    t0 = time.perf_counter()
    data = load_data(cfg)
    runs = [(m, lam) for m in cfg.methods for lam in _lams(cfg, m)]
    total = sum(_steps(cfg, _n_train(task)) for task in data.stream)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total * len(runs), unit="step", desc="training", leave=False)
    results: dict[str, Any] = {"config": asdict(cfg), "versions": versions(), "methods": {}}
    try:
        for method in cfg.methods:
            candidates, diverged = [], []
            for lam in _lams(cfg, method):
                run_dir = ckpt / f"{method}-lam{lam:g}"
                done = run_dir / "result.json"
                failed = run_dir / "diverged.txt"
                if failed.exists():
                    diverged.append({"lam": lam, "diverged": failed.read_text()})
                    continue
                if done.exists():
                    res = json.loads(done.read_text())
                    if bar is not None:
                        bar.update(total)
                else:
                    try:
                        res = run_sequence(
                            cfg,
                            method,
                            lam,
                            data,
                            run_dir,
                            on_step=bar.update if bar is not None else None,
                            stop_after_tasks=stop_after_tasks,
                        )
                    except FloatingPointError as e:
                        if len(_lams(cfg, method)) == 1:
                            raise
                        log(f"{e}; skipping this λ candidate")
                        failed.write_text(str(e))
                        diverged.append({"lam": lam, "diverged": str(e)})
                        continue
                    done.write_text(json.dumps(res))
                candidates.append((lam, res))
            if not candidates:
                raise FloatingPointError(f"{method} diverged for every λ candidate: lower --lr")
            lam, best = max(candidates, key=lambda c: _final_average(c[1]["R_val"]))
            entry = method_result(
                best["R_test"],
                curves=best["curves"] if cfg.eval_every else None,
                baseline=best["baseline"],
                lam=lam if method != "finetune" else None,
            )
            entry["val_average_accuracy"] = _final_average(best["R_val"])
            if len(candidates) + len(diverged) > 1:
                entry["lam_sweep"] = [
                    {"lam": c[0], "val_average_accuracy": _final_average(c[1]["R_val"])}
                    for c in candidates
                ] + diverged
            results["methods"][method] = entry
    finally:
        if bar is not None:
            bar.close()
    results["elapsed_seconds"] = round(time.perf_counter() - t0, 2)
    write_results(results, out)
    return results


def _final_average(r: list[list[float]]) -> float:
    last = r[-1]
    return sum(last) / len(last)
