r"""EWC for the Hugging Face :class:`transformers.Trainer`.

:class:`EWCTrainer` trains on

.. math::

    L(\theta) + \frac{\lambda}{2} \sum_i A_i (\theta_i - \mu_i)^2 + \text{const},

the Trainer's own loss plus the penalty of an :class:`ewc.EWC` object, so that the penalty's
gradient ``λ A ⊙ (θ − μ)`` enters **exactly once per optimizer step**, whatever the gradient
accumulation settings, on one device or many. It also estimates the Fisher of a data set with
the Trainer's collator (:meth:`EWCTrainer.consolidate`) and keeps the EWC state in the Trainer's
checkpoints (``ewc_state.safetensors``), so ``train(resume_from_checkpoint=...)`` restores it.

How the penalty is weighted (transformers 5.24.0, ``trainer.py``; older releases from 4.46 on
differ in details handled by fallbacks, see :meth:`EWCTrainer._trainer_divides`):

* The inner training loop collects the micro-batches of one optimizer step, sets
  ``self.current_gradient_accumulation_steps = len(batch_samples)`` and, before each
  micro-batch's ``training_step``, ``accelerator.gradient_state._set_sync_gradients(
  do_sync_step)``; the optimizer steps after the micro-batch with ``do_sync_step`` True.
  We add the penalty on that micro-batch only (``accelerator.sync_gradients``).
* ``training_step`` divides the loss returned by ``compute_loss`` by
  ``current_gradient_accumulation_steps`` unless it counts as "scaled for gradient
  accumulation": the explicit ``loss_is_scaled_for_ga`` attribute, else
  ``(model_accepts_loss_kwargs and num_items_in_batch is not None) or compute_loss_func is not
  None``. When it divides, we multiply the penalty by the same number, so it counts once.
* With ``average_tokens_across_devices``, ``compute_loss`` multiplies the task loss by the number
  of processes (DDP then averages the gradients); we add the penalty after that, so it is not
  multiplied: it is identical on every rank and DDP's average leaves it unchanged. With
  ``DataParallel`` (``n_gpu > 1``) the per-device losses are averaged, which also leaves an added
  constant unchanged.

As a safety net (other versions, subclasses that rescale the loss), :meth:`training_step`
compares the loss the Trainer reports with the one :meth:`compute_loss` returned; if the
Trainer scaled it otherwise than predicted, it corrects the step's gradient, warns once and uses
the observed behaviour from then on.

FSDP2 (``fsdp_config={"version": 2, ...}``: accelerate applies ``fully_shard``, the parameters
become DTensors) goes through the same code as any FSDP2 model: :meth:`EWCTrainer.consolidate`
estimates into DTensor shards and the penalty is the global sum on every rank (see
:mod:`ewc._fsdp`). accelerate applies FSDP only on GPUs, so this path is tested with FSDP2 on
CPU processes outside the Trainer, not inside it. Not supported: DeepSpeed ZeRO-3 and FSDP1
(flat parameters), and ``model_init`` (the EWC object must hold the Trainer's model).

Note on some models (not on EWC): a model whose ``forward`` takes ``**kwargs`` counts as
accepting ``num_items_in_batch`` even if its loss ignores it (in 5.24.0, e.g.
``BertForSequenceClassification``); the Trainer then sums the micro-batches' mean losses
without dividing, so the task gradient grows with the number of accumulation steps. Set
``model.accepts_loss_kwargs = False`` before building the Trainer for such models.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.distributed import DistributedSampler

try:
    import transformers
    from transformers.trainer_utils import get_last_checkpoint
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "ewc.integrations.hf needs the `transformers` package (with `accelerate`); install it "
        "with `pip install 'ewc[hf]'`"
    ) from e

from ..fisher import Fisher
from ..penalty import EWC
from .lm import hf_fisher

__all__ = ["EWCTrainer", "consolidate", "EWC_STATE_NAME"]

EWC_STATE_NAME = "ewc_state.safetensors"
"""File name of the EWC state inside a checkpoint or model folder."""


def _is_distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _is_dataset(data: Any) -> bool:
    """Whether ``data`` holds examples to batch (a data set) rather than ready batches.

    A ``DataLoader`` or any other plain iterable (a generator) holds batches; a
    ``torch.utils.data`` data set, a ``datasets.Dataset`` or any sized sequence (a list of
    example dicts) holds examples.
    """
    if isinstance(data, DataLoader):
        return False
    if isinstance(data, (Dataset, IterableDataset)):
        return True
    return hasattr(data, "__getitem__") and hasattr(data, "__len__")


def _loader(
    data: Any,
    *,
    batch_size: int,
    collate_fn: Callable[[list[Any]], Any] | None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterable[Any]:
    """Return a ``DataLoader`` over the data set ``data`` in its order (see :func:`_is_dataset`).

    Under ``torch.distributed`` (more than one rank) a map-style data set gets a
    ``DistributedSampler(shuffle=False, drop_last=False)``: each rank reads its shard, and the
    Fisher estimate recognises the indices the sampler pads in and does not count them. An
    iterable-style data set must already yield this rank's shard.
    """
    sampler = None
    if _is_distributed() and not isinstance(data, IterableDataset):
        sampler = DistributedSampler(data, shuffle=False, drop_last=False)
    return DataLoader(
        data,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


def _fisher_options(ewc: EWC, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults for :func:`ewc.integrations.lm.hf_fisher` taken from ``ewc``, then ``overrides``.

    The estimate covers the parameters the penalty covers (``ewc.params``; after the first
    consolidation exactly those already in the penalty: a later Fisher must have the same keys).
    Its storage dtype is left to ``ewc`` (``fisher_dtype`` casts the merged precision).
    """
    opts: dict[str, Any] = {
        "kind": ewc.kind,
        "n_samples": ewc.n_samples,
        "mc_samples": ewc.mc_samples,
    }
    selector = getattr(ewc, "params", None)  # the parameters the penalty covers
    if selector is not None:
        opts["params"] = selector
    if ewc.precision:
        names = frozenset(ewc.precision)
        opts["params"] = lambda name, _p: name in names
    opts.update(overrides)
    return opts


def consolidate(
    ewc: EWC,
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 8,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    **fisher_kwargs: Any,
) -> Fisher:
    """Estimate the Fisher of ``model`` on ``data`` with ``hf_fisher`` and add it to ``ewc``.

    For training loops without the Trainer. ``F_i = (1/N) Σ_n (∂ Σ_t log p(y_nt | x_n) /
    ∂θ_i)²`` over the ``N`` sequences (see :mod:`ewc.integrations.lm`), at the current
    parameters, recorded with them as the task's optimum.

    Args:
        ewc: The penalty to add the task to; its ``kind``, ``n_samples`` and ``mc_samples``
            are the defaults of the estimate.
        model: The model whose parameters ``ewc`` covers (``ewc.model`` or a wrapper of it).
        data: A ``DataLoader`` or other iterable of dict batches (``input_ids``,
            ``attention_mask``, ``labels``, ... each ``(N, T)``), used as is; or a data set of
            examples (a ``torch.utils.data`` or ``datasets`` data set, a list of dicts), batched
            here in order with ``collate_fn`` (default
            :func:`transformers.default_data_collator`), through a ``DistributedSampler`` when
            ``torch.distributed`` has more than one rank.
        batch_size: Batch size when ``data`` is a data set (does not change the result).
        collate_fn: Collator when ``data`` is a data set.
        **fisher_kwargs: Passed to :func:`ewc.integrations.lm.hf_fisher` (``kind``,
            ``generator``, ``shift``, ``params``, ``dtype``, ...).

    Returns:
        The Fisher that was added (keyed by the parameter names of ``ewc.model``).
    """
    if _is_dataset(data):
        data = _loader(
            data, batch_size=batch_size, collate_fn=collate_fn or transformers.default_data_collator
        )
    fisher = hf_fisher(model, data, **_fisher_options(ewc, fisher_kwargs))
    return ewc.consolidate(fisher=fisher)


class EWCTrainer(transformers.Trainer):
    r"""A :class:`transformers.Trainer` that adds an EWC penalty to the training loss.

    The objective of every optimizer step is the Trainer's loss plus ``ewc.penalty() =
    (λ/2) Σ_i A_i (θ_i − μ_i)² + c`` counted once, with any ``gradient_accumulation_steps``,
    under DDP (the penalty is the same on every rank) and with ``average_tokens_across_devices``.
    No penalty is added in evaluation or prediction. The logged training ``loss`` includes the
    penalty; its value alone is logged as ``ewc_penalty`` (mean over the logged steps).

    Typical use::

        reg = ewc.EWC(model, lam=1e3)
        trainer = EWCTrainer(model=model, args=args, train_dataset=task_a, ewc=reg)
        trainer.train()
        trainer.consolidate()                 # Fisher of task A at the trained weights
        trainer.train_dataset = task_b
        trainer.train()                       # task B's loss + the penalty

    Args:
        *args: Passed to :class:`transformers.Trainer`.
        ewc: The penalty (its ``model`` must be the Trainer's model or share its parameters).
        ewc_lam: Instead of ``ewc``: create ``EWC(model, lam=ewc_lam)`` with the default
            options.
        **kwargs: Passed to :class:`transformers.Trainer`.

    The EWC state is written as ``ewc_state.safetensors`` next to every saved model
    (checkpoints and :meth:`save_model`) and loaded by ``train(resume_from_checkpoint=...)``; if
    ``ewc`` was ``None`` and the checkpoint holds a state, an ``EWC`` object is created from it.
    """

    def __init__(
        self,
        *args: Any,
        ewc: EWC | None = None,
        ewc_lam: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if ewc is not None and ewc_lam is not None:
            raise ValueError("pass either ewc= or ewc_lam=, not both")
        if ewc_lam is not None:
            ewc = EWC(self._core_model(), lam=ewc_lam)
        if ewc is not None:
            own = {id(p) for p in self.model.parameters()}
            if not all(id(p) in own for p in ewc.model.parameters()):
                raise ValueError(
                    "the EWC object's model is not the Trainer's model (its parameters are not "
                    "the Trainer's); build it with EWC(trainer_model, ...). model_init is not "
                    "supported"
                )
        self.ewc: EWC | None = ewc
        self._ewc_divides: bool | None = None  # observed Trainer behaviour, once it disagreed
        self._ewc_warned = False
        self._ewc_in_step = False
        self._ewc_pending: tuple[Tensor, float, int] | None = None
        self._ewc_log_sum: Tensor | None = None
        self._ewc_log_count = 0

    def _core_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # --- The penalty in the loss ----------------------------------------------------------
    def _trainer_divides(self, num_items_in_batch: Any) -> bool:
        """Whether ``training_step`` will divide this loss by the accumulation steps.

        Mirrors ``Trainer.training_step`` (5.24.0, lines 2111-2119): the explicit
        ``loss_is_scaled_for_ga`` if set (the attribute is recent; missing counts as ``None``),
        else it divides unless ``(model_accepts_loss_kwargs and num_items_in_batch is not None)
        or compute_loss_func is not None``; 4.5x releases write the same rule as ``(not accepts or
        num_items_in_batch is None) and compute_loss_func is None``. Releases 4.46-4.48 divided
        when ``not accepts and compute_loss_func is None``, which differs only for a model that
        accepts loss kwargs but gets no ``num_items_in_batch`` (no labels in the batch). Any
        disagreement is detected and corrected afterwards (see :meth:`_check_scaling`).
        """
        if self._ewc_divides is not None:
            return self._ewc_divides
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return not explicit
        accepts = bool(getattr(self, "model_accepts_loss_kwargs", False))
        has_loss_func = getattr(self, "compute_loss_func", None) is not None
        return not ((accepts and num_items_in_batch is not None) or has_loss_func)

    def _ga_steps(self) -> int:
        # `current_gradient_accumulation_steps` (the micro-batches of this optimizer step, fewer
        # at the end of an epoch) is what training_step divides by; older versions divide by
        # `args.gradient_accumulation_steps` and lack the attribute.
        steps = getattr(self, "current_gradient_accumulation_steps", None)
        return int(steps) if steps else int(self.args.gradient_accumulation_steps)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """Return the Trainer's loss, plus the weighted EWC penalty on a sync micro-batch.

        The penalty ``P`` is added only when called from :meth:`training_step` with gradients
        enabled, on the micro-batch after which the optimizer steps
        (``accelerator.sync_gradients``), as ``k · P`` if the Trainer will divide this loss by
        ``k = current_gradient_accumulation_steps`` and as ``P`` otherwise.
        """
        out = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not self._penalty_due():
            return out
        loss, outputs = out if return_outputs else (out, None)
        assert self.ewc is not None
        penalty = self.ewc.penalty()
        divides = self._trainer_divides(num_items_in_batch)
        k = self._ga_steps()
        weight = float(k) if divides else 1.0
        loss = loss + weight * penalty.to(loss.dtype)
        self._ewc_pending = (loss.detach(), weight, k)
        self._ewc_log(penalty.detach())
        return (loss, outputs) if return_outputs else loss

    def _penalty_due(self) -> bool:
        return (
            self._ewc_in_step
            and self.ewc is not None
            and bool(self.ewc.precision)
            and torch.is_grad_enabled()
            # set before each micro-batch by the training loop; True without accumulation
            and bool(getattr(self.accelerator, "sync_gradients", True))
        )

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> Tensor:
        """Run the Trainer's step; then check how it scaled a loss that carried the penalty."""
        self._ewc_in_step = True
        self._ewc_pending = None
        try:
            reported = super().training_step(model, inputs, *args, **kwargs)
        finally:
            self._ewc_in_step = False
        if self._ewc_pending is not None:
            self._check_scaling(reported)
        return reported

    @torch.no_grad()
    def _check_scaling(self, reported: Tensor) -> None:
        """Compare the Trainer's scaling of our loss with the prediction; fix the step if wrong.

        ``training_step`` returns ``loss.detach()`` after its own scaling, so ``reported`` is
        ``total`` or ``total / k``. If the scaling was not the predicted one, the penalty entered
        the gradient ``weight / scale`` times instead of once: add ``(1 − weight / scale)`` times
        its gradient to ``.grad`` (times the AMP loss scale, if any).
        """
        assert self._ewc_pending is not None and self.ewc is not None
        total, weight, k = self._ewc_pending
        self._ewc_pending = None
        if k <= 1 or not isinstance(reported, Tensor):
            return
        t = float(total.float().mean())
        r = float(reported.float().mean())
        if t == 0 or not (math.isfinite(t) and math.isfinite(r)):
            return

        def close(a: float, b: float) -> bool:
            return abs(a - b) <= 1e-4 * max(abs(a), abs(b))

        predicted_divides = weight != 1.0
        if close(r, t / k):
            observed_divides = True
        elif close(r, t):
            observed_divides = False
        else:
            return  # some other scaling (e.g. SageMaker MP): nothing we can tell
        if observed_divides == predicted_divides:
            return
        self._ewc_divides = observed_divides
        if not self._ewc_warned:
            self._ewc_warned = True
            warnings.warn(
                "EWCTrainer: the Trainer scaled the loss for gradient accumulation differently "
                f"than predicted (divided: {observed_divides}); the EWC penalty of this step was "
                "corrected and later steps use the observed behaviour",
                RuntimeWarning,
                stacklevel=3,
            )
        if getattr(self, "is_deepspeed_enabled", False):
            warnings.warn(
                "EWCTrainer: cannot correct the gradient under DeepSpeed; this step's EWC penalty "
                "was mis-weighted",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        counted = weight / (k if observed_divides else 1)
        coeff = 1.0 - counted
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            coeff *= float(scaler.get_scale())
        self.ewc.add_penalty_grad(scale=coeff)

    # --- Logging ---------------------------------------------------------------------------
    def _ewc_log(self, penalty: Tensor) -> None:
        value = penalty.float()
        self._ewc_log_sum = value if self._ewc_log_sum is None else self._ewc_log_sum + value
        self._ewc_log_count += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add ``ewc_penalty`` (mean over the steps since the last log) to training logs."""
        if "loss" in logs and self._ewc_log_count and self._ewc_log_sum is not None:
            logs["ewc_penalty"] = float(self._ewc_log_sum) / self._ewc_log_count
            self._ewc_log_sum, self._ewc_log_count = None, 0
        super().log(logs, *args, **kwargs)

    # --- Fisher ------------------------------------------------------------------------------
    def consolidate(
        self,
        dataset: Any = None,
        *,
        batch_size: int | None = None,
        **fisher_kwargs: Any,
    ) -> Fisher:
        """Estimate the Fisher at the current weights and add the task to the penalty.

        The data are batched in order with the Trainer's ``data_collator``, after removing the
        columns the model's ``forward`` does not take (as the Trainer does, when
        ``remove_unused_columns``); under ``torch.distributed`` with more than one rank each
        rank reads its shard through a ``DistributedSampler(shuffle=False, drop_last=False)``
        and the estimate is all-reduced (the sampler's padding is not counted). Every rank must
        call this method.

        Args:
            dataset: Data set of examples (a ``torch.utils.data`` or ``datasets`` data set, a
                list of dicts), or a ``DataLoader`` / other iterable of dict batches used as is
                (default: ``self.train_dataset``).
            batch_size: Batch size (default ``per_device_eval_batch_size``); it does not change
                the result.
            **fisher_kwargs: Passed to :func:`ewc.integrations.lm.hf_fisher` (``kind``,
                ``generator``, ``shift``, ``n_samples``, ``dtype``, ...); defaults come from
                the EWC object.

        Returns:
            The Fisher that was added.
        """
        if self.ewc is None:
            raise ValueError("this EWCTrainer has no EWC object; pass ewc= or ewc_lam=")
        data = self.train_dataset if dataset is None else dataset
        if data is None:
            raise ValueError("consolidate needs a dataset (the Trainer has no train_dataset)")
        if _is_dataset(data):
            data = self._ewc_dataloader(data, batch_size or self.args.per_device_eval_batch_size)
        # The Fisher keys must be the penalty's parameter names: estimate on the EWC's model
        # (the Trainer's model, unwrapped; checked in __init__).
        fisher = hf_fisher(self.ewc.model, data, **_fisher_options(self.ewc, fisher_kwargs))
        return self.ewc.consolidate(fisher=fisher)

    def _ewc_dataloader(self, dataset: Any, batch_size: int) -> Iterable[Any]:
        collator = self.data_collator
        if hasattr(dataset, "column_names") and hasattr(dataset, "remove_columns"):
            # a `datasets.Dataset`: drop the columns as Trainer._get_dataloader does
            dataset = self._remove_unused_columns(dataset, description="EWC Fisher")
        elif hasattr(self, "_get_collator_with_removed_columns"):
            collator = self._get_collator_with_removed_columns(collator, description="EWC Fisher")
        # Our own loader, not accelerate's: a prepared loader pads uneven shards by repeating
        # samples, which the estimate could not tell apart from real ones.
        return _loader(
            dataset,
            batch_size=batch_size,
            collate_fn=collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=bool(self.args.dataloader_pin_memory) and torch.cuda.is_available(),
        )

    # --- Checkpoints -------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model as the Trainer does, and the EWC state as ``ewc_state.safetensors``.

        Checkpoints go through here too (``_save_checkpoint`` calls it with the checkpoint
        folder first), so every checkpoint holds the EWC state of its step.
        """
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.ewc is None or not self.args.should_save:
            return
        folder = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(folder, exist_ok=True)
        self.ewc.save(os.path.join(folder, EWC_STATE_NAME))

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """Train as the Trainer does; when resuming, first restore the checkpoint's EWC state."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)):
            self._load_ewc_state(os.fspath(checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_ewc_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, EWC_STATE_NAME)
        if not os.path.isfile(path):
            if self.ewc is not None and self.ewc.precision:
                warnings.warn(
                    f"{checkpoint!r} has no {EWC_STATE_NAME}; keeping the current EWC state",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return
        if self.ewc is None:
            self.ewc = EWC.load(path, self._core_model())
            return
        loaded = type(self.ewc).load(path, self.ewc.model)
        self.ewc.load_state_dict(loaded.state_dict())
