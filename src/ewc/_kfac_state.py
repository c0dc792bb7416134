"""Validating a saved KFAC-EWC state: the Kronecker part (the diagonal part is ``_state``'s)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .kfac_penalty import KFACEWC

__all__ = ["parse_kron"]

_EXACT = ("A", "G", "anchor")
_EXACT_LOW = ("Q_A", "Q_G", "S", "anchor")
_EIGEN = ("Q_A", "Q_G", "S", "mean", "sum_A", "sum_G")


def parse_kron(state: Mapping[str, Any], ewc: KFACEWC) -> tuple[Any, ...]:
    """Validate the Kronecker part of ``state``.

    Returns ``(merge, rank, layers, kron, offset, rest)``.

    ``rest`` holds the other tensors (the diagonal part, validated by the caller).
    """
    try:
        tensors: Mapping[str, Tensor] = state["tensors"]
        meta: Mapping[str, Any] = state["metadata"]
    except (KeyError, TypeError) as e:
        raise ValueError("an EWC state needs 'tensors' and 'metadata' entries") from e
    if not isinstance(meta, Mapping) or meta.get("curvature") != "kfac":
        raise ValueError(
            "this state has no Kronecker-factored curvature (metadata 'curvature' is not "
            "'kfac'); load it with curvature='diagonal'"
        )
    merge = meta.get("merge")
    from .kfac_penalty import MERGES

    if merge not in MERGES:
        raise ValueError(f"the state has an unknown merge {merge!r}; expected one of {MERGES}")
    rank = meta.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"the state has rank={rank!r}; expected a positive integer or null")
    layers = _check_layers(meta.get("layers"), ewc)
    offset = tensors.get("kron_offset")
    if not isinstance(offset, Tensor) or offset.shape != () or not offset.is_floating_point():
        raise ValueError("the state has no scalar floating-point 'kron_offset' tensor")
    value = float(offset)
    if not (value >= 0 and value < float("inf")) or (meta.get("mode") == "online" and value):
        raise ValueError(f"the state's kron_offset is {value!r}: the file is corrupt")
    fields = (_EXACT if rank is None else _EXACT_LOW) if merge == "exact" else _EIGEN
    kron: dict[str, dict[str, Tensor]] = {}
    rest: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if key == "kron_offset":
            continue
        if not key.startswith("kfac."):
            rest[key] = t
            continue
        layer, _, field = key[len("kfac.") :].rpartition(".")
        if layer not in layers or field not in fields:
            raise ValueError(f"the state has an unexpected tensor {key!r}")
        kron.setdefault(layer, {})[field] = t
    if meta.get("tasks") and set(kron) != set(layers):
        raise ValueError(f"the state lacks the factors of layers {sorted(set(layers) - set(kron))}")
    params = ewc._params()
    for layer, st in kron.items():
        missing = [f for f in fields if f not in st]
        if missing:
            raise ValueError(f"the state lacks {missing} of layer {layer!r}")
        w, b, shape = layers[layer]
        o, i = shape[0], int(torch.Size(shape[1:]).numel()) + (b is not None)
        first = st[fields[0]]
        lead = (first.shape[0],) if merge == "exact" and first.dim() == 3 else ()
        ka, kg = (i, o) if rank is None else (min(rank, i), min(rank, o))
        want = {
            "A": (*lead, i, i), "G": (*lead, o, o), "anchor": (*lead, o, i),
            "Q_A": (*lead, i, ka), "Q_G": (*lead, o, kg), "S": (*lead, kg, ka), "mean": (o, i),
            "sum_A": (i, i), "sum_G": (o, o),
        }  # fmt: skip
        for f in fields:
            t = st[f]
            if tuple(t.shape) != want[f] or (merge == "exact" and not lead):
                raise ValueError(
                    f"kfac.{layer}.{f} has shape {tuple(t.shape)}, expected {want[f]} (one "
                    "entry per term for merge='exact')"
                )
            store = ewc.fisher_dtype or params[w].dtype
            dt = params[w].dtype if f in ("anchor", "mean") else store
            if t.dtype != dt:
                raise ValueError(f"kfac.{layer}.{f} has dtype {t.dtype}, expected {dt}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"kfac.{layer}.{f} has non-finite values: the file is corrupt")
        for f in ("A", "G", "S"):
            t = st.get(f)
            if t is None:
                continue
            if bool(((t if f == "S" else torch.diagonal(t, 0, -2, -1)) < 0).any()):
                raise ValueError(f"kfac.{layer}.{f} has negative curvature: the file is corrupt")
        kron[layer] = {k: v.detach().clone().to(params[w].device) for k, v in st.items()}
    return merge, rank, layers, kron, offset.detach().to(torch.float64).clone(), rest


def _check_layers(raw: Any, ewc: KFACEWC) -> dict[str, tuple[str, str | None, tuple[int, ...]]]:
    if not isinstance(raw, Mapping):
        raise ValueError("the state's metadata 'layers' must map layer names to their parameters")
    params = ewc._params()
    out = {}
    for name, spec in raw.items():
        try:
            w, b, shape = spec["weight"], spec["bias"], tuple(int(v) for v in spec["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"the state's layer record {name!r} is malformed: {e}") from e
        if w not in params or tuple(params[w].shape) != shape:
            raise ValueError(
                f"the state's layer {name!r} has weight {w!r} of shape {shape}, which the model "
                "lacks; was it saved for another model?"
            )
        if b is not None and (b not in params or tuple(params[b].shape) != (shape[0],)):
            raise ValueError(f"the state's layer {name!r} has a bias {b!r} the model lacks")
        out[str(name)] = (w, b, shape)
    return out
