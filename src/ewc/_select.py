"""Which parameters a Fisher estimate or an EWC penalty covers."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

from torch import nn

ParamSelector = str | Iterable[str] | Callable[[str, nn.Parameter], bool] | None
"""``None`` (every trainable parameter), a name or glob pattern, a list of them, or a predicate
``(name, parameter) -> bool``. Only parameters with ``requires_grad=True`` are ever selected."""


def select_params(model: nn.Module, params: ParamSelector = None) -> dict[str, nn.Parameter]:
    """Return the selected trainable parameters of ``model`` by name, in model order.

    Patterns use :mod:`fnmatch` syntax on the names of ``model.named_parameters()``, e.g.
    ``"*.lora_*"`` or ``"encoder.layer.*.attention.*"``; an exact name is also a pattern.

    Raises:
        ValueError: if the model has no trainable parameter, a pattern or name matches no
            trainable parameter (naming it, and whether it matched a frozen one), or nothing is
            selected.
    """
    named = dict(model.named_parameters())
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    if not trainable:
        raise ValueError(
            "the model has no trainable parameters (all have requires_grad=False); unfreeze the "
            "parameters EWC should protect"
        )
    if params is None:
        return trainable
    if callable(params):
        chosen = {n: p for n, p in trainable.items() if params(n, p)}
        if not chosen:
            raise ValueError("the parameter predicate selected no trainable parameter")
        return chosen
    patterns = [params] if isinstance(params, str) else list(params)
    if not patterns or not all(isinstance(s, str) for s in patterns):
        raise ValueError(
            "params must be None, a name or glob pattern, a non-empty list of them, or a "
            f"predicate (name, parameter) -> bool; got {params!r}"
        )
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in trainable):
            frozen = [n for n in named if n not in trainable and fnmatch.fnmatchcase(n, pat)]
            hint = (
                f" (it matches only frozen parameters, e.g. {frozen[0]!r})"
                if frozen
                else f" (names look like {next(iter(trainable))!r})"
            )
            raise ValueError(f"params pattern {pat!r} matches no trainable parameter{hint}")
    return {
        n: p for n, p in trainable.items() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)
    }
