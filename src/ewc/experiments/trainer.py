"""Sequential training on a task stream: fine-tuning, L2, EWC, online EWC, SI and MAS, side by side.

Every method trains the same initial network on the tasks in order and is evaluated on every
task after every task (the accuracy matrix ``R[i][j]``), and optionally at intervals within a
task (the paper's Fig. 2A curves). A λ given as several values is chosen on the validation
split (final average validation accuracy), never on the test set.

Reproducibility: all randomness of task ``t`` (shuffling, dropout, sampled Fisher labels) is
seeded from ``(seed, t)``, so a run killed after a finished task and resumed from its checkpoint
ends with exactly the results of an uninterrupted run, and the same seed gives the same results
on the same device. With ``seeds=[0, 1, 2]`` every (method, λ) runs once per seed (each seed
also draws its own permutations); λ is chosen on the validation accuracy averaged over the seeds,
and the results keep every seed's matrix beside the mean and standard deviation.

Device: the model, the cached validation and test sets and each task's training set live on
``device`` (moved once); the loop synchronises with the host only for metrics (evaluations,
early stopping) and one divergence check per task.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..mas import MAS
from ..penalty import EWC, L2
from ..si import SI
from .checkpoint import load_checkpoint, save_checkpoint
from .models import MLP

__all__ = [
    "Config",
    "METHODS",
    "register_method",
    "run_experiment",
    "Interrupted",
    "resolve_device",
]

DEVICES = ("cpu", "cuda", "mps", "auto")
OUTPUT_MASKS = ("none", "seen")


@dataclass
class Config:
    """Everything that defines an experiment (saved in ``results.json``).

    The protocol options the published setups need:

    * ``seeds``: run every method once per seed (``None``: the single ``seed``);
    * ``device``: ``"cpu"``, ``"cuda"``, ``"mps"`` or ``"auto"`` (the first available);
    * ``pad`` and ``normalize``: zero pixels on every side (2: MNIST at 32×32) and
      ``[mean, std]`` of the inputs after padding (Hsu et al.: ``[0.1, 0.2752]``);
    * ``reset_optimizer``: a fresh optimizer for every task (``True``) or one optimizer, its
      moment estimates kept, for the whole stream (``False``, as Hsu et al. and van de Ven et
      al. do);
    * ``output_mask``: ``"seen"`` restricts the training loss and the Fisher of a single head
      to the classes seen so far (Hsu et al.'s class-incremental protocol); evaluation always
      uses every output;
    * ``unpermuted_task``: which permuted task keeps the original pixel order (overrides
      ``first_identity``);
    * ``val_fraction``: the validation split of the training set (0: none, then λ must be a
      single value);
    * ``l2_anchor``: ``"all"`` (a pull towards every past optimum) or ``"latest"`` (towards
      the latest only, Hsu et al.), see :class:`ewc.L2`;
    * ``method_options``: extra keyword options per method, read by its factory.
    """

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
    xi: float = 0.1
    kfac_rank: int | None = None  # kfac-ewc: eigenpairs kept per task's factor (None: all)
    seed: int = 0
    first_identity: bool = True
    val_fraction: float = 0.1
    seeds: list[int] | None = None
    device: str = "cpu"
    pad: int = 0
    normalize: list[float] | None = None
    reset_optimizer: bool = True
    output_mask: str = "none"
    unpermuted_task: int | None = None
    l2_anchor: str = "all"
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)

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
        if self.kfac_rank is not None and self.kfac_rank < 1:
            raise ValueError(f"--kfac-rank must be >= 1 (or absent: all), got {self.kfac_rank}")
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
        if not (self.xi > 0 and math.isfinite(self.xi)):
            raise ValueError(f"--xi must be > 0 (SI's damping), got {self.xi}")
        self._validate_protocol()

    def _validate_protocol(self) -> None:
        if self.seeds is not None:
            ok = all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds)
            if not self.seeds or not ok or len(set(self.seeds)) != len(self.seeds):
                raise ValueError(f"--seeds must be distinct integers >= 0, got {self.seeds}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {DEVICES}, got {self.device!r}")
        if isinstance(self.pad, bool) or not isinstance(self.pad, int) or self.pad < 0:
            raise ValueError(f"--pad must be an integer >= 0, got {self.pad!r}")
        if self.normalize is not None and (
            len(self.normalize) != 2
            or not all(math.isfinite(v) for v in self.normalize)
            or self.normalize[1] <= 0
        ):
            raise ValueError(f"--normalize must be MEAN,STD with STD > 0, got {self.normalize}")
        if self.output_mask not in OUTPUT_MASKS:
            raise ValueError(
                f"--output-mask must be one of {OUTPUT_MASKS}, got {self.output_mask!r}"
            )
        if self.output_mask == "seen" and self.scenario != "class":
            raise ValueError("--output-mask seen applies to the class-incremental scenario only")
        if self.l2_anchor not in L2.ANCHORS:
            raise ValueError(f"--l2-anchor must be one of {L2.ANCHORS}, got {self.l2_anchor!r}")
        if self.unpermuted_task is not None and not 0 <= self.unpermuted_task < self.tasks:
            raise ValueError(
                f"--unpermuted-task must be a task index in 0..{self.tasks - 1}, got "
                f"{self.unpermuted_task}"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        several = [m for m in self.methods if len(self.lam.get(m, [])) > 1]
        if several and self.val_fraction == 0:
            raise ValueError(
                f"λ is swept for {several} but --val-fraction is 0: nothing to choose λ on"
            )
        if self.early_stopping and self.val_fraction == 0:
            raise ValueError("--early-stopping needs a validation split (--val-fraction > 0)")
        if not isinstance(self.method_options, dict) or not all(
            isinstance(v, dict) for v in self.method_options.values()
        ):
            raise ValueError("method_options must map method names to objects of options")
        unknown = sorted(set(self.method_options) - set(METHODS))
        if unknown:
            raise ValueError(f"method_options names unknown method(s) {unknown}")

    @property
    def seed_list(self) -> list[int]:
        """The seeds to run: ``seeds``, or ``[seed]``."""
        return list(self.seeds) if self.seeds is not None else [self.seed]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Build from a dict (e.g. a JSON config file), rejecting unknown keys."""
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown config keys {bad}; known: {sorted(known)}")
        return cls(**d)


# --- Methods ------------------------------------------------------------------------------
Regularizer = EWC  # EWC, L2, SI and MAS share the interface: consolidate(), penalty()
MethodFactory = Callable[[nn.Module, float, Config], Regularizer | None]


def _finetune(model: nn.Module, lam: float, cfg: Config) -> Regularizer | None:
    return None


def _l2(model: nn.Module, lam: float, cfg: Config) -> Regularizer | None:
    return L2(model, lam, anchor=cfg.l2_anchor)


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


def _si(model: nn.Module, lam: float, cfg: Config) -> Regularizer | None:
    return SI(model, c=lam, xi=cfg.xi)  # λ is the paper's c: c Σ Ω (θ − θ̃)²


def _mas(model: nn.Module, lam: float, cfg: Config) -> Regularizer | None:
    return MAS(model, lam, n_samples=cfg.fisher_samples)


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
    "si": _si,
    "mas": _mas,
    "kfac-ewc": _kfac_ewc,
    "online-kfac-ewc": _online_kfac_ewc,
}
# One value, or a list of candidates chosen on the validation split (si: c; mas: λ). On the
# demo's data (4 permuted tasks, 1 epoch, Adam) the sweeps chose c = 100 and λ = 0.1.
DEFAULT_LAM: dict[str, float | list[float]] = {
    "finetune": 0.0,
    "l2": 1e-4,
    "ewc": 100.0,
    "online-ewc": 100.0,
    "si": [0.1, 1.0, 10.0, 100.0, 1000.0],
    "mas": [0.01, 0.1, 1.0, 10.0, 100.0],
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


# --- One run: one method, one λ, one seed -------------------------------------------------
@dataclass
class _Data:
    """The stream with every task's validation and test tensors cached on the device."""

    stream: Any
    val: list[tuple[Tensor, Tensor]]
    test: list[tuple[Tensor, Tensor]]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"mps"`` or ``"auto"`` (CUDA, else MPS, else CPU) as a device.

    Raises:
        ValueError: If the named accelerator is not available here.
    """
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use cpu or auto)")
    if name == "mps" and not has_mps:
        raise ValueError("--device mps: the MPS backend is not available (use cpu or auto)")
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {DEVICES}, got {name!r}")
    return torch.device(name)


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


def _seen_outputs(stream: Any, t: int, device: torch.device) -> Tensor:
    """``bool (num_outputs,)``: the output units of the labels of tasks ``0 .. t``."""
    seen = torch.zeros(stream.num_outputs, dtype=torch.bool)
    for task in stream[: t + 1]:
        labels = torch.as_tensor(task.label_map)
        seen[labels[labels >= 0]] = True
    return seen.to(device)


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
    stream, device = data.stream, data.device
    torch.manual_seed(cfg.seed)  # the same initial network for every method
    model = MLP(
        data.test[0][0].shape[1],
        tuple(cfg.hidden),
        stream.num_outputs,
        heads=stream.num_heads,
        dropout=cfg.dropout,
        input_dropout=cfg.input_dropout,
    ).to(device)
    reg = METHODS[method](model, lam, cfg)
    progress: dict[str, Any] = {
        "R_test": [],
        "R_val": [],
        "curves": {"iteration": [], "accuracy": [], "task_boundaries": []},
        "baseline": _evaluate(model, data.test),
        "iteration": 0,
    }
    opt = None if cfg.reset_optimizer else _optimizer(model, cfg)
    start = 0
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        start = _resume(run_dir, model, reg, opt, progress)
    curves = progress["curves"]
    for t in range(start, len(stream)):
        task = stream[t]
        x, y = task.x_train.to(device), task.y_train.to(device)
        if cfg.reset_optimizer or opt is None:
            opt = _optimizer(model, cfg)
        hooks = reg.attach(opt) if isinstance(reg, SI) else None  # SI's path integral
        mask = _seen_outputs(stream, t, device) if cfg.output_mask == "seen" else None
        torch.manual_seed(_seed(cfg, t, 1))  # dropout
        if device.type == "cuda":
            torch.cuda.manual_seed_all(_seed(cfg, t, 1))
        shuffle = torch.Generator().manual_seed(_seed(cfg, t, 2))
        curves["task_boundaries"].append(progress["iteration"])
        best: tuple[float, dict[str, Tensor]] | None = None
        stale = 0
        per_epoch = math.ceil(len(y) / cfg.batch_size)
        finite = torch.ones((), dtype=torch.bool, device=device)
        order = torch.randperm(len(y), generator=shuffle).to(device)
        model.active_outputs = mask
        for step in range(_steps(cfg, len(y))):
            i = step % per_epoch
            if i == 0 and step > 0:
                order = torch.randperm(len(y), generator=shuffle).to(device)
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            model.train()
            loss = nn.functional.cross_entropy(model(x[idx], t), y[idx])
            if reg is not None and reg.num_tasks:
                loss = loss + reg.penalty()
            finite &= torch.isfinite(loss.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            progress["iteration"] += 1
            if on_step is not None:
                on_step(1)
            if cfg.eval_every and progress["iteration"] % cfg.eval_every == 0:
                model.active_outputs = None
                curves["iteration"].append(progress["iteration"])
                curves["accuracy"].append(_evaluate(model, data.test, cfg.eval_samples))
                model.active_outputs = mask
            if cfg.early_stopping and i == per_epoch - 1:
                _check_finite(finite, method, lam, t, step)
                model.active_outputs = None
                acc = _accuracy(model, *data.val[t], t)
                model.active_outputs = mask
                if best is None or acc > best[0]:
                    best, stale = (acc, {k: v.clone() for k, v in model.state_dict().items()}), 0
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        break
        if hooks is not None:
            hooks.remove()
        _check_finite(finite, method, lam, t, step)
        if best is not None:
            model.load_state_dict(best[1])
        if reg is not None:
            batches = [((x[i : i + 256], t), y[i : i + 256]) for i in range(0, len(y), 256)]
            gen = torch.Generator().manual_seed(_seed(cfg, t, 3))
            if isinstance(reg, (L2, SI)):
                reg.consolidate()
            elif isinstance(reg, MAS):
                reg.consolidate(batches)
            else:
                reg.consolidate(batches, generator=gen)
        model.active_outputs = None
        progress["R_test"].append(_evaluate(model, data.test))
        progress["R_val"].append(_evaluate(model, data.val))
        if cfg.eval_every:
            curves["iteration"].append(progress["iteration"])
            curves["accuracy"].append(_evaluate(model, data.test, cfg.eval_samples))
        if run_dir is not None:
            _save(run_dir, t, model, reg, None if cfg.reset_optimizer else opt, progress)
        if stop_after_tasks is not None and t + 1 >= stop_after_tasks and t + 1 < len(stream):
            raise Interrupted(f"stopped after task {t} as asked")
    return progress


def _check_finite(finite: Tensor, method: str, lam: float, t: int, step: int) -> None:
    """Raise if a loss of this task was not finite (one host sync, at an evaluation point)."""
    if not bool(finite):
        raise FloatingPointError(
            f"{method} (λ={lam}) diverged on task {t} (a non-finite loss by step {step}): lower "
            "--lr or λ"
        )


def _save(
    run_dir: Path,
    t: int,
    model: nn.Module,
    reg: Regularizer | None,
    opt: torch.optim.Optimizer | None,
    progress: dict[str, Any],
) -> None:
    state: dict[str, Any] = {"model": model.state_dict()}
    if reg is not None:
        state["ewc"] = reg.state_dict()
    if opt is not None:
        state["optimizer"] = opt.state_dict()
    save_checkpoint(run_dir / f"task-{t}.safetensors", state)
    tmp = run_dir / ".progress.json.tmp"
    tmp.write_text(json.dumps({"task": t, **progress}))
    os.replace(tmp, run_dir / "progress.json")
    old = run_dir / f"task-{t - 1}.safetensors"
    old.unlink(missing_ok=True)


def _resume(
    run_dir: Path,
    model: nn.Module,
    reg: Regularizer | None,
    opt: torch.optim.Optimizer | None,
    progress: dict[str, Any],
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
    if opt is not None:
        opt.load_state_dict(state["optimizer"])
    progress.update(saved)
    return t + 1


# --- The experiment -------------------------------------------------------------------------
def load_data(cfg: Config, device: torch.device | None = None) -> _Data:
    """Build the task stream and cache every task's validation and test tensors on ``device``."""
    from ..data import make_stream

    device = torch.device("cpu") if device is None else device
    stream = make_stream(
        cfg.benchmark,
        source=cfg.source,
        root=cfg.data_dir,
        n_tasks=cfg.tasks,
        scenario=cfg.scenario,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        first_identity=cfg.first_identity,
        unpermuted_task=cfg.unpermuted_task,
        pad=cfg.pad,
        normalize=None if cfg.normalize is None else (cfg.normalize[0], cfg.normalize[1]),
    )
    val, test = [], []
    for task in stream:
        val.append(tuple(v.to(device) for v in task.split("val")))
        test.append(tuple(v.to(device) for v in task.split("test")))
    return _Data(stream, val, test, device)  # type: ignore[arg-type]


def _n_train(task: Any) -> int:
    """Training-set size of ``task``, counted from the base labels (no tensors are built)."""
    y = task.base.split("train")[1]
    return int(np.isin(y, task.classes).sum())


def _lams(cfg: Config, method: str) -> list[float]:
    if method == "finetune":
        return [0.0]
    default = DEFAULT_LAM.get(method, 0.0)
    return list(cfg.lam.get(method, default if isinstance(default, list) else [default]))


def _run_dir(ckpt: Path, method: str, lam: float, seed: int, cfg: Config) -> Path:
    if cfg.seeds is None:  # the layout of single-seed runs, as before --seeds
        return ckpt / f"{method}-lam{lam:g}"
    return ckpt / f"{method}-lam{lam:g}-seed{seed}"


def _check_resume(cfg: Config, out: Path, resume: bool) -> Path:
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
    return ckpt


def run_experiment(
    cfg: Config,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after_tasks: int | None = None,
) -> dict[str, Any]:
    """Run every method (and λ candidate) over every seed, choose λ on validation, write results.

    λ is chosen per method on the final average validation accuracy, averaged over the seeds
    (one λ for all seeds). A λ candidate that diverges on any seed is skipped (and recorded).

    Returns the results dict (also written to ``out_dir/results.json`` with CSVs and plots).
    """
    from .aggregate import combine_seeds
    from .results import versions, write_results

    cfg.validate()
    device = resolve_device(cfg.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = _check_resume(cfg, out, resume)
    t0 = time.perf_counter()
    seeds = cfg.seed_list
    runs = [(m, lam) for m in cfg.methods for lam in _lams(cfg, m)]
    bar = None
    done_runs: dict[tuple[str, float, int], dict[str, Any]] = {}
    diverged: dict[tuple[str, float], str] = {}
    try:
        for seed in seeds:
            scfg = replace(cfg, seed=seed)
            data = load_data(scfg, device)
            total = sum(_steps(cfg, _n_train(task)) for task in data.stream)
            if progress and bar is None:
                from tqdm.auto import tqdm

                bar = tqdm(total=total * len(runs) * len(seeds), unit="step", leave=False)
            for method, lam in runs:
                if (method, lam) in diverged:
                    continue
                run_dir = _run_dir(ckpt, method, lam, seed, cfg)
                res = _one_run(scfg, method, lam, data, run_dir, bar, total, stop_after_tasks)
                if isinstance(res, str):
                    if len(_lams(cfg, method)) == 1:
                        raise FloatingPointError(res)
                    log(f"{res}; skipping this λ candidate")
                    diverged[(method, lam)] = res
                    continue
                done_runs[(method, lam, seed)] = res
            del data
    finally:
        if bar is not None:
            bar.close()
    results: dict[str, Any] = {"config": asdict(cfg), "versions": versions(), "methods": {}}
    results["versions"]["device"] = str(device)
    for method in cfg.methods:
        results["methods"][method] = combine_seeds(
            method, _lams(cfg, method), seeds, done_runs, diverged, with_curves=bool(cfg.eval_every)
        )
    results["seeds"] = seeds
    results["elapsed_seconds"] = round(time.perf_counter() - t0, 2)
    write_results(results, out)
    return results


def _one_run(
    cfg: Config,
    method: str,
    lam: float,
    data: _Data,
    run_dir: Path,
    bar: Any,
    total: int,
    stop_after_tasks: int | None,
) -> dict[str, Any] | str:
    """One (method, λ, seed) run, or read back from ``run_dir``; a string if it diverged."""
    done, failed = run_dir / "result.json", run_dir / "diverged.txt"
    if failed.exists():
        return failed.read_text()
    if done.exists():
        if bar is not None:
            bar.update(total)
        return json.loads(done.read_text())
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
        failed.write_text(str(e))
        return str(e)
    done.write_text(json.dumps(res))
    return res
