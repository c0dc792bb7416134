r"""The diagonal Fisher of a language model or any Hugging Face style model, per sequence.

The unit of the Fisher is one **sequence** ``x_n`` (one row of the batch): its log-likelihood is
the sum of its token log-likelihoods, and that sum is taken inside the square,

.. math::

    F_i = \frac{1}{N} \sum_{n=1}^{N} \Big(\frac{\partial}{\partial \theta_i}
    \sum_{t \in T_n} \log p(y_{nt} \mid x_n, \theta)\Big)^2,

where ``T_n`` are the sequence's counted positions: not padding (``attention_mask == 0``) and
not ignored (``labels == -100``: prompt tokens, padding in the collator). For a causal LM the
logits at position ``t`` predict the token at ``t + 1`` (``shift=1``), as in the models' own
loss. With ``kind="sampled"`` (the default, the paper's Fisher) the token at every counted
position is drawn from the model's predictive distribution given the true prefix (teacher
forcing), so the estimate is the Fisher of ``p(y | x) = Π_t p(y_t | x_{≤t})``; ``"empirical"``
uses the data's tokens.

Nothing here imports ``transformers``: the model only has to take the batch's tensors as keyword
arguments and return logits ``(N, T, V)`` or ``(N, C)`` as ``.logits``, ``["logits"]`` or the
first element of a tuple.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._select import ParamSelector
from ..distributed import MappedBatches
from ..estimate import fisher_diagonal
from ..fisher import Fisher
from ..likelihoods import Categorical

__all__ = ["hf_fisher", "causal_shift", "LMBatches", "Logits"]

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def causal_shift(model: nn.Module) -> int:
    """Return 1 for a causal language model (logits at ``t`` predict token ``t + 1``), else 0.

    Decided from the class name as Hugging Face names them (``*ForCausalLM``,
    ``*LMHeadModel``, e.g. ``GPT2LMHeadModel``), also inside a DDP or PEFT wrapper; pass
    ``shift=`` to :func:`hf_fisher` for anything else.
    """
    seen: list[nn.Module] = [model]
    for _ in range(4):  # unwrap DDP (.module) and PEFT (.get_base_model()) wrappers
        m = seen[-1]
        inner = m.__dict__.get("_modules", {}).get("module")
        if inner is None and callable(getattr(type(m), "get_base_model", None)):
            inner = m.get_base_model()  # type: ignore[operator]
        if not isinstance(inner, nn.Module) or inner is m:
            break
        seen.append(inner)
    return 1 if any(type(m).__name__.endswith(_CAUSAL_SUFFIXES) for m in seen) else 0


class Logits:
    """``output_fn`` for :func:`ewc.fisher_diagonal`: a model output's logits, shifted.

    Args:
        shift: Drop this many positions at the end of the sequence dimension (dim 1).
    """

    def __init__(self, shift: int = 0) -> None:
        self.shift = shift

    def __call__(self, out: Any) -> Tensor:  # noqa: D102
        logits = getattr(out, "logits", None)
        if logits is None:
            if isinstance(out, Mapping) and "logits" in out:
                logits = out["logits"]
            elif isinstance(out, (tuple, list)):
                logits = out[0]
            else:
                logits = out
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"cannot find logits in the model output of type {type(out).__name__}; return "
                "them as .logits, ['logits'] or the first element of a tuple"
            )
        if self.shift:
            if logits.dim() < 3:
                raise ValueError(
                    f"shift={self.shift} needs token logits (N, T, V), got {tuple(logits.shape)}"
                )
            logits = logits[:, : -self.shift]
        return logits


class LMBatches(MappedBatches):
    """Turn dict batches into the ``(inputs, targets)`` pairs :func:`ewc.fisher_diagonal` reads.

    ``inputs`` is the batch without its label key (so the model does not compute a loss), plus
    ``use_cache=False`` when asked. ``targets`` is ``labels`` (or, without labels, the
    ``input_ids``), set to ``ignore_index`` where ``attention_mask == 0``, then shifted left by
    ``shift``. Attribute lookups (``sampler``, ``batch_sampler``) go to the wrapped loader, so
    the padding of a ``DistributedSampler`` is still recognised.

    Args:
        data: Iterable of dict batches with ``input_ids`` and optionally ``attention_mask`` and
            the label key, all ``(N, T)`` (labels may be ``(N,)`` for sequence classification).
        shift: Positions the targets are shifted by (1 for a causal LM).
        ignore_index: Target value of positions left out.
        label_key: Name of the labels in the batch.
        extra: Keyword arguments added to every model call (e.g. ``{"use_cache": False}``).
    """

    def __init__(
        self,
        data: Iterable[Mapping[str, Any]],
        *,
        shift: int = 0,
        ignore_index: int = -100,
        label_key: str = "labels",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(data, self._pair)
        self.shift = shift
        self.ignore_index = ignore_index
        self.label_key = label_key
        self.extra = dict(extra or {})

    def __iter__(self) -> Iterator[tuple[dict[str, Any], Tensor | None]]:
        for i, batch in enumerate(self._data):
            if not isinstance(batch, Mapping):
                raise TypeError(
                    f"batch {i} is a {type(batch).__name__}; expected a dict of tensors such as "
                    "{'input_ids', 'attention_mask', 'labels'} (a Hugging Face collator's output)"
                )
            yield self._pair(batch)

    def _pair(self, batch: Mapping[str, Any]) -> tuple[dict[str, Any], Tensor | None]:
        inputs = {k: v for k, v in batch.items() if k != self.label_key}
        return {**inputs, **self.extra}, self._targets(batch)

    def _targets(self, batch: Mapping[str, Any]) -> Tensor | None:
        targets = batch.get(self.label_key)
        if targets is None:
            targets = batch.get("input_ids")
        if not isinstance(targets, Tensor):
            return None
        mask = batch.get("attention_mask")
        if isinstance(mask, Tensor) and mask.shape == targets.shape:
            targets = targets.masked_fill(mask == 0, self.ignore_index)
        if self.shift and targets.dim() >= 2:
            targets = targets[:, self.shift :]
        return targets


def hf_fisher(
    model: nn.Module,
    data: Iterable[Mapping[str, Any]],
    *,
    kind: str = "sampled",
    shift: int | None = None,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    n_samples: int | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    progress: bool = False,
    distributed: bool | None = None,
    group: Any = None,
    ignore_index: int = -100,
    label_key: str = "labels",
) -> Fisher:
    """Diagonal Fisher of a Hugging Face model over dict batches, one sequence per sample.

    Works for causal LMs (``(N, T, V)`` logits, ``shift=1``), masked LMs and token
    classifiers (``(N, T, C)``, ``shift=0``) and sequence classifiers (``(N, C)`` logits,
    ``labels`` of shape ``(N,)``). See the module doc for the definition.

    Args:
        model: The model (``DistributedDataParallel`` is unwrapped). It runs in eval mode.
        data: Dict batches (e.g. a ``DataLoader`` with a Hugging Face collator). ``labels``
            are needed for ``kind="empirical"``; otherwise they (or the ``input_ids``) only
            mark the counted positions.
        kind: ``"sampled"``, ``"empirical"`` or ``"exact"`` (exact costs ``(V − 1) × T``
            backward passes per batch: only for small label sets).
        shift: 1 for causal LMs, 0 otherwise; ``None`` decides from the class name
            (:func:`causal_shift`).
        params: Parameter subset: names, glob patterns (``"*lora_*"``) or a predicate; only
            trainable parameters are covered (so with frozen base weights and LoRA adapters,
            the adapters).
        dtype: Storage dtype of the result, e.g. ``torch.bfloat16``.
        n_samples: At most this many sequences (as in :func:`ewc.fisher_diagonal`).
        mc_samples: Label draws per sequence for ``"sampled"``.
        generator: Random generator for the sampled labels.
        progress: Show a progress bar.
        distributed: All-reduce over ``torch.distributed`` (see :func:`ewc.fisher_diagonal`).
        group: The process group to reduce over.
        ignore_index: Label value of positions left out.
        label_key: Name of the labels in the batches.

    Returns:
        A :class:`ewc.Fisher` keyed by the model's parameter names.
    """
    if shift is None:
        shift = causal_shift(model)
    if not isinstance(shift, int) or shift < 0:
        raise ValueError(f"shift must be a non-negative int, got {shift!r}")
    config = getattr(getattr(model, "module", model), "config", None)
    extra = {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}
    batches = LMBatches(
        data, shift=shift, ignore_index=ignore_index, label_key=label_key, extra=extra
    )
    return fisher_diagonal(
        model,
        batches,
        kind=kind,
        likelihood=Categorical(ignore_index=ignore_index),
        output_fn=Logits(shift),
        params=params,
        dtype=dtype,
        n_samples=n_samples,
        mc_samples=mc_samples,
        generator=generator,
        progress=progress,
        distributed=distributed,
        group=group,
    )
