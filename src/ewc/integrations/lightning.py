r"""PyTorch Lightning integration: :class:`EWCCallback` adds EWC to a ``Trainer`` loop.

One ``trainer.fit`` is one task. The callback

* adds the penalty's gradient ``λ A ⊙ (θ − μ)`` of
  ``(λ/2) Σ_t Σ_i F_t,i (θ_i − θ*_t,i)²`` (:meth:`ewc.EWC.add_penalty_grad`) to the parameters'
  ``.grad`` before every optimizer step,
* consolidates at the end of each fit: the Fisher of the task's data at the trained parameters
  becomes a new penalty term (every rank estimates it; under DDP the ranks' per-sample sums
  and counts are all-reduced, so all ranks hold the same penalty),
* saves its EWC state (tensors and metadata) in Lightning checkpoints and restores it on
  ``trainer.fit(..., ckpt_path=...)``.

Example:
    >>> import lightning.pytorch as pl  # doctest: +SKIP
    >>> from ewc.integrations.lightning import EWCCallback
    >>> callback = EWCCallback(lam=100.0)  # EWC(pl_module, lam=100.0) is created at setup
    >>> for task_loader in tasks:  # doctest: +SKIP
    ...     pl.Trainer(max_epochs=5, callbacks=[callback]).fit(module, task_loader)
    >>> callback.ewc.num_tasks  # doctest: +SKIP
    2

**The explicit alternative.** Instead of the callback's gradient hook, add the penalty to the
loss in ``training_step``; the gradient is the same, ``∇ (λ/2) Σ_i A_i (θ_i − μ_i)² =
λ A ⊙ (θ − μ)``::

    reg = ewc.EWC(module, lam=100.0)
    module.reg = reg  # used in training_step
    callback = EWCCallback(reg, penalty=False)  # consolidation and checkpoints only

    def training_step(self, batch, batch_idx):  # in the LightningModule
        x, y = batch
        return F.cross_entropy(self(x), y) + self.reg.penalty()

With gradient accumulation over ``k`` batches Lightning divides each loss by ``k``, so the
penalty is counted ``k × 1/k = 1`` time per optimizer step, as with the callback. Use one form
or the other, not both (``penalty=False`` above), or the penalty counts twice. The callback's
form is the cheaper one (no autograd graph for the penalty) and is safe with DDP's
``find_unused_parameters=True``.

**Where the gradient is added** (Lightning 2.6 source). ``on_before_optimizer_step`` is called by
``Precision._after_closure`` (``lightning/pytorch/plugins/precision/precision.py``), which runs
after the closure (``training_step`` and ``backward``, ``Precision._wrap_closure``), and which
calls the ``configure_gradient_clipping`` hook only *after* the callbacks' hook: gradients are
clipped with the penalty's gradient included. With AMP, ``MixedPrecision.optimizer_step``
(``plugins/precision/amp.py``) runs ``self.scaler.unscale_(optimizer)`` before
``self._after_closure(...)``, so the gradients the callback adds to are unscaled (except for
optimizers that unscale inside ``step``, ``_step_supports_amp_scaling``, e.g. ``fused=True``:
their gradients are still scaled, and the callback scales the penalty gradient to match). With
``accumulate_grad_batches=k``, ``_AutomaticOptimization.run``
(``loops/optimization/automatic.py``) runs the closure without an optimizer step while
``fit_loop._should_accumulate()``: the hook, hence the penalty, comes once per optimizer step.
Under DDP it comes after the gradient all-reduce of ``backward`` and adds the same value on
every rank.

**Where the task is consolidated.** ``on_train_end`` is called by ``_FitLoop.on_run_end``
(``loops/fit_loop.py``) inside ``Trainer._run_stage``. ``Trainer._run`` (``trainer/trainer.py``)
then calls ``self._teardown()``, whose ``Strategy.teardown`` (``strategies/strategy.py``) moves
the module to the CPU (``self.lightning_module.cpu()``), and only after that ``on_fit_end``. So
``on_train_end`` is the last hook with the model still on its device and the training
dataloader still attached (``trainer.train_dataloader``, which under DDP draws from the
``DistributedSampler`` Lightning inserted, so :func:`ewc.fisher_diagonal` all-reduces and skips
the sampler's padding); under NCCL a reduction of CPU tensors in ``on_fit_end`` would fail. When
a fit is interrupted (an exception, ``KeyboardInterrupt``, SIGTERM) ``on_run_end`` is not
reached and nothing is consolidated. A fit whose loop has nothing left to do (resumed from a
checkpoint of a fit that had finished) trains no task and is not consolidated either; the
callback warns in ``on_fit_end`` then (:meth:`EWCCallback.consolidate_task` consolidates by
hand). Checkpoints that ``ModelCheckpoint`` writes during a fit hold the state *before* that
fit's consolidation (they are saved in epoch or validation hooks, before ``on_train_end``); to
keep a consolidated state, call ``trainer.save_checkpoint(path)`` after ``fit``.

**Several optimizers** (manual optimization): ``on_before_optimizer_step`` comes with the
optimizer being stepped, and only the penalised parameters in that optimizer's
``param_groups`` receive the penalty gradient, so each parameter gets it once, at its own
optimizer's step. A step whose parameters have no ``.grad`` at all (``training_step``
returned ``None``: Lightning skipped ``backward``) gets no penalty either, so a skipped batch
moves nothing.

Supported strategies: single device and DDP (``"ddp"``). Under ``"ddp_spawn"``/``"ddp_fork"``
everything above holds inside the worker processes, but Lightning brings only the model's
weights back to the launching process, not the callback's state, so the next ``fit`` would start
without the consolidated tasks (the callback warns). ``ModelParallelStrategy`` (FSDP2: the
module's ``configure_model`` applies ``fully_shard``) is supported: the Fisher, precision and
anchors are DTensor shards like the parameters (see :mod:`ewc._fsdp`), and the checkpointed state
holds full tensors (gathered on every rank, one at a time) that any world size loads back.
``FSDPStrategy`` (FSDP1's flat parameters) and DeepSpeed flatten the parameters that EWC keys by
name and are refused in ``setup``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .. import _fsdp
from ..distributed import MappedBatches
from ..fisher import Fisher
from ..penalty import EWC
from ..si import SI

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError(
            "ewc.integrations.lightning needs PyTorch Lightning (`lightning` or "
            "`pytorch_lightning`): pip install 'ewc[lightning]'"
        ) from e

__all__ = ["EWCCallback"]

FisherData = Iterable[Any] | Callable[[pl.Trainer, pl.LightningModule], Iterable[Any]]

_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy")  # flat parameters; FSDP2 is supported
_STATE_FORMAT = "ewc.lightning"
_STATE_VERSION = 1


class EWCCallback(pl.Callback):
    r"""Elastic Weight Consolidation for a Lightning ``Trainer``: one ``fit`` per task.

    Adds ``λ A ⊙ (θ − μ)``, the gradient of the consolidated penalty
    ``(λ/2) Σ_t Σ_i F_t,i (θ_i − θ*_t,i)²``, to the gradients before each optimizer step, and
    consolidates the task at the end of each fit (see the module documentation for the hooks).

    Args:
        ewc: An existing :class:`ewc.EWC` (or :class:`ewc.L2`, :class:`ewc.MAS`,
            :class:`ewc.SI`) object to use, e.g. one built on a submodule. An ``SI`` object is
            attached to the fit's optimizers for its path integral and consolidated without
            data; ``MAS`` estimates its importances on ``data`` as EWC its Fisher. Leave
            ``None`` to have one created for the ``LightningModule`` at ``setup`` from ``lam``
            and ``ewc_kwargs``; the module's ``forward`` must then map a
            batch's inputs to outputs (logits for classification).
        lam: λ of the created :class:`ewc.EWC` (required when ``ewc`` is ``None``).
        data: The data of the Fisher estimate at the end of each fit: ``None`` (default) uses
            the fit's training dataloader ``trainer.train_dataloader`` (all of it, whatever
            ``limit_train_batches``); an iterable of batches; or a callable
            ``data(trainer, pl_module) -> iterable`` evaluated at consolidation, so each task
            can have its own. Under DDP each rank passes its own shard (or all of the data:
            the all-reduced per-sample mean is the same).
        batch_to_fisher: Maps one of ``data``'s batches to what
            :func:`ewc.fisher_diagonal` takes: ``(inputs, targets)`` (or bare inputs for
            ``kind="sampled"``/``"exact"``). Default: the batch as it is.
        consolidate: Consolidate at the end of each (not interrupted) fit. With ``False``,
            call :meth:`consolidate_task` yourself.
        penalty: Add the penalty's gradient before each optimizer step. ``False`` when the
            ``LightningModule`` adds :meth:`ewc.EWC.penalty` to its loss itself.
        log_penalty: Log the penalty's value as ``"ewc/penalty"`` (``pl_module.log``, per step)
            before each optimizer step.
        fisher_kwargs: Keyword arguments of every consolidation's Fisher estimate
            (:meth:`ewc.EWC.consolidate`, e.g. ``{"kind": "exact"}``, ``{"generator": g}``,
            ``{"n_samples": 1000}``), overriding the EWC object's defaults.
        name: Distinguishes the checkpoint state of several ``EWCCallback`` in one ``Trainer``
            (see :attr:`state_key`).
        **ewc_kwargs: Keyword arguments of the created :class:`ewc.EWC` (``mode``, ``gamma``,
            ``kind``, ``likelihood``, ``n_samples``, ``mc_samples``, ...); only without
            ``ewc``.

    Raises:
        TypeError: for both ``ewc`` and ``lam``/``ewc_kwargs``, or neither ``ewc`` nor ``lam``.

    Attributes:
        data, batch_to_fisher, auto_consolidate, add_penalty, log_penalty, fisher_kwargs: The
            options above (``auto_consolidate`` is ``consolidate``, ``add_penalty`` is
            ``penalty``).
    """

    def __init__(
        self,
        ewc: EWC | None = None,
        *,
        lam: float | None = None,
        data: FisherData | None = None,
        batch_to_fisher: Callable[[Any], Any] | None = None,
        consolidate: bool = True,
        penalty: bool = True,
        log_penalty: bool = False,
        fisher_kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
        **ewc_kwargs: Any,
    ) -> None:
        if ewc is not None and (lam is not None or ewc_kwargs):
            extra = sorted(ewc_kwargs) + (["lam"] if lam is not None else [])
            raise TypeError(
                f"pass either an EWC object or lam= and EWC options, not both (got ewc and {extra})"
            )
        if ewc is None and lam is None:
            raise TypeError("EWCCallback needs an EWC object or lam= to create one")
        if ewc is not None and not isinstance(ewc, EWC):
            raise TypeError(f"ewc must be an ewc.EWC object, got {type(ewc).__name__}")
        self._ewc = ewc
        self._lam = lam
        self._ewc_kwargs = dict(ewc_kwargs)
        self._pending: dict[str, Any] | None = None
        self._trained = False
        self._si_hooks: list[Any] = []
        self.data = data
        self.batch_to_fisher = batch_to_fisher
        self.auto_consolidate = bool(consolidate)
        self.add_penalty = bool(penalty)
        self.log_penalty = bool(log_penalty)
        self.fisher_kwargs: dict[str, Any] = dict(fisher_kwargs or {})
        self.name = name

    # --- The EWC object ---------------------------------------------------------------
    @property
    def ewc(self) -> EWC | None:
        """The EWC object (``None`` until ``setup`` creates it for the ``LightningModule``).

        A state restored from a checkpoint is loaded into it on first access.
        """
        if self._ewc is not None and self._pending is not None:
            state, self._pending = self._pending, None
            self._ewc.load_state_dict(state)
        return self._ewc

    def ewc_for(self, pl_module: torch.nn.Module) -> EWC:
        """Return the EWC object, creating it for ``pl_module`` first if there is none.

        A state restored from a checkpoint is loaded into it (validated against its model).
        """
        if self._ewc is None:
            assert self._lam is not None
            self._ewc = EWC(pl_module, self._lam, **self._ewc_kwargs)
        ewc = self.ewc
        assert ewc is not None
        return ewc

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint's ``"callbacks"``.

        ``"EWCCallback"`` (or ``"EWCCallback[name]"``), independent of λ and the other options
        so a run resumed with other settings still finds its state.
        """
        base = type(self).__qualname__
        return base if self.name is None else f"{base}[{self.name}]"

    # --- Consolidation ----------------------------------------------------------------
    def _fisher_data(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, data: FisherData | None
    ) -> Iterable[Any]:
        source = data if data is not None else self.data
        if source is None:
            source = trainer.train_dataloader
            if source is None:
                raise ValueError(
                    "the trainer has no training dataloader to estimate the Fisher on; pass "
                    "data= to EWCCallback (or to consolidate_task)"
                )
            if isinstance(source, (Mapping, list, tuple)):
                raise ValueError(
                    "the fit has several training dataloaders; pass data= (an iterable of "
                    "batches or a callable (trainer, pl_module) -> iterable) to EWCCallback"
                )
        elif callable(source) and not isinstance(source, Iterable):
            source = source(trainer, pl_module)
        if self.batch_to_fisher is not None:
            source = MappedBatches(source, self.batch_to_fisher)  # type: ignore[arg-type]
        return source  # type: ignore[return-value]

    def consolidate_task(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        data: FisherData | None = None,
        **fisher_kwargs: Any,
    ) -> Fisher:
        """Consolidate the current parameters as a task's optimum, with its Fisher.

        What ``on_train_end`` does after each fit (with ``consolidate=True``). Under DDP every
        rank must call it (the Fisher estimate all-reduces).

        Args:
            trainer: The trainer (its training dataloader is the default data).
            pl_module: The module (the EWC object is created for it if there is none).
            data: Overrides the callback's ``data`` for this call.
            **fisher_kwargs: Override ``fisher_kwargs`` for this call.

        Returns:
            The Fisher that was added.
        """
        ewc = self.ewc_for(pl_module)
        if isinstance(ewc, SI):  # its importance was gathered during the fit: no data
            return ewc.consolidate()
        source = self._fisher_data(trainer, pl_module, data)
        return ewc.consolidate(source, **{**self.fisher_kwargs, **fisher_kwargs})

    # --- Lightning hooks --------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse sharded strategies; create the EWC object for ``pl_module`` when fitting."""
        sharded = [c.__name__ for c in type(trainer.strategy).__mro__ if c.__name__ in _SHARDED]
        if sharded:
            raise NotImplementedError(
                f"EWCCallback does not support the {sharded[0]}: it flattens the parameters "
                "that EWC keys by name; use ModelParallelStrategy with fully_shard (FSDP2) in "
                "configure_model, DDP or a single device"
            )
        launcher = getattr(trainer.strategy, "launcher", None)
        spawned = type(launcher).__name__ == "_MultiProcessingLauncher"
        if stage == "fit" and spawned and trainer.global_rank == 0:
            warnings.warn(
                "EWCCallback under a spawn/fork strategy (ddp_spawn, ddp_fork, ...): each task "
                "is consolidated in the worker processes, and Lightning brings only the model's "
                "weights back to this process, not the callback's state; for several tasks use "
                "strategy='ddp', or save the state in the workers (e.g. a checkpoint) and "
                "restore it",
                stacklevel=2,
            )
        if stage == "fit" and self._ewc is None:
            self.ewc_for(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Load a restored checkpoint state (the model is now on its device, in its dtype)."""
        self._trained = False
        self.ewc_for(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Note that this fit trains (its loop was not already complete)."""
        self._trained = True
        ewc = self.ewc_for(pl_module)  # states restored after on_fit_start (restore after setup)
        if isinstance(ewc, SI):  # its path integral: every step of the fit's optimizers
            names = set(ewc.omega)
            tracked = {id(p) for n, p in ewc.model.named_parameters() if n in names}
            self._si_hooks = [
                ewc.attach(opt)
                for opt in trainer.optimizers
                if any(id(p) in tracked for g in opt.param_groups for p in g["params"])
            ]

    def on_before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        r"""Add ``λ A ⊙ (θ − μ)`` to the ``.grad`` of the penalised parameters ``optimizer`` steps.

        Runs after ``backward`` (and AMP unscaling), once per optimizer step with gradient
        accumulation, before gradient clipping (see the module documentation).
        """
        if trainer.sanity_checking or not (self.add_penalty or self.log_penalty):
            return
        ewc = self.ewc_for(pl_module)
        if self.log_penalty:
            with torch.no_grad():
                value = ewc.penalty().detach()
            pl_module.log("ewc/penalty", value, on_step=True, on_epoch=False)
        if not self.add_penalty or not ewc.precision:
            return
        stepped = [p for group in optimizer.param_groups for p in group["params"]]
        if all(p.grad is None for p in stepped):
            return  # backward was skipped: the optimizer will move nothing, nor should we
        ewc.add_penalty_grad(stepped, scale=_grad_scale(trainer, optimizer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Consolidate the task that was just trained, on every rank (see the module doc)."""
        for hooks in self._si_hooks:
            hooks.remove()
        self._si_hooks = []
        if not self.auto_consolidate or trainer.interrupted or trainer.sanity_checking:
            return
        self.consolidate_task(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn when a fit ran no training loop, so that no task was consolidated."""
        if self.auto_consolidate and not trainer.interrupted and not self._trained:
            warnings.warn(
                "EWCCallback: this fit ran no training loop (it resumed from a checkpoint of a "
                "fit that had already finished, or limit_train_batches=0), so no task was "
                "consolidated; call callback.consolidate_task(trainer, module) if it should be",
                stacklevel=2,
            )

    # --- Checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Return ``{"format", "version", "ewc": EWC.state_dict()}`` (``{}`` with no EWC yet).

        Only tensors, dicts, lists, strings and numbers: loadable with
        ``torch.load(weights_only=True)``.
        """
        if self._pending is not None:
            state = self._pending
        elif self._ewc is not None:
            state = self._ewc.state_dict()
            tensors = state["tensors"]  # FSDP2 shards: full tensors, loadable at any world size
            state["tensors"] = {k: _fsdp.total(t) for k, t in tensors.items()}
        else:
            return {}
        return {"format": _STATE_FORMAT, "version": _STATE_VERSION, "ewc": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a state from :meth:`state_dict`; it is loaded into the EWC object at its next use.

        Loading waits until the model is set up (on its device, converted to its precision),
        and until the EWC object exists when the callback creates it.

        Raises:
            ValueError: if ``state_dict`` is not an ``EWCCallback`` state.
        """
        if state_dict.get("format") != _STATE_FORMAT or "ewc" not in state_dict:
            raise ValueError("this is not an EWCCallback state (no 'format'/'ewc' entries)")
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(
                f"unsupported EWCCallback state version {state_dict.get('version')!r}; this ewc "
                f"reads version {_STATE_VERSION}"
            )
        self._pending = dict(state_dict["ewc"])

    def __repr__(self) -> str:
        inner = "" if self._ewc is None else repr(self._ewc)
        return f"{type(self).__name__}({inner})"


def _grad_scale(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> float:
    """Return the factor the gradients still carry in ``on_before_optimizer_step`` (1: none).

    Lightning's ``MixedPrecision.optimizer_step`` unscales before the hook unless the optimizer
    unscales inside its own ``step`` (``_step_supports_amp_scaling``: the fused optimizers, to
    which ``GradScaler.step`` passes the scale); then the gradients are still multiplied by the
    scaler's scale, and so must the added penalty gradient be.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return 1.0
    if hasattr(scaler, "is_enabled") and not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())
