r"""Fisher overlap between two tasks, per layer (Kirkpatrick et al. 2017, supplement; Fig. 2C).

For two diagonal Fishers restricted to a group of parameters (one layer), normalise each by its
trace, :math:`\hat f = F / \operatorname{tr} F`, and take

.. math::

    \mathrm{overlap}(F_1, F_2) = 1 - \tfrac12 \sum_i \Big(\sqrt{\hat f_{1,i}}
        - \sqrt{\hat f_{2,i}}\Big)^2 = \sum_i \sqrt{\hat f_{1,i} \hat f_{2,i}},

one minus the paper's squared Fréchet distance ``½ tr(F̂₁ + F̂₂ − 2 (F̂₁F̂₂)^½)`` (for diagonal
Fishers, the squared Hellinger distance of the normalised diagonals): 1 when they are
proportional, 0 when their supports are disjoint. In the paper, tasks that differ more
(more pixels permuted) overlap less, and the overlap falls in the layers close to the input.

Example:
    >>> import torch
    >>> f1 = {"fc.weight": torch.tensor([1.0, 0.0]), "fc.bias": torch.tensor([1.0])}
    >>> f2 = {"fc.weight": torch.tensor([0.0, 1.0]), "fc.bias": torch.tensor([1.0])}
    >>> round(fisher_overlap(f1, f2), 4)
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["fisher_overlap", "layer_groups", "layer_overlaps", "overlap_table"]


def _flat(f: Mapping[str, Tensor], names: Sequence[str], which: str) -> Tensor:
    parts = []
    for n in names:
        t = f[n]
        if not isinstance(t, Tensor):
            raise TypeError(f"the {which} Fisher's entry {n!r} must be a Tensor, got {type(t)}")
        t = t.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(
                f"the {which} Fisher's entry {n!r} has negative or non-finite values; "
                "a diagonal Fisher is finite and non-negative"
            )
        parts.append(t)
    return torch.cat(parts)


def fisher_overlap(
    f1: Mapping[str, Tensor], f2: Mapping[str, Tensor], names: Iterable[str] | None = None
) -> float:
    r"""Return the overlap :math:`1 - \frac12 \sum_i (\sqrt{\hat f_{1,i}} - \sqrt{\hat f_{2,i}})^2`.

    Both Fishers are normalised by their trace over the group ``names`` (not over the whole
    model), so the result compares where the curvature lies inside that group.

    Args:
        f1: First diagonal Fisher, parameter name -> tensor (e.g. an :class:`ewc.Fisher`).
        f2: Second diagonal Fisher over the same parameters and shapes.
        names: The parameters forming the group; default every name the two share (in
            ``f1``'s order).

    Returns:
        The overlap: 1 for proportional Fishers, 0 for disjoint supports.

    Raises:
        ValueError: If the group is empty, a name is missing from either Fisher, shapes differ,
            values are negative or non-finite, or a trace over the group is zero.
    """
    if names is None:
        group = [n for n in f1 if n in f2]
        if not group:
            raise ValueError(
                f"the two Fishers share no parameter names (first: {sorted(f1)[:3]}, second: "
                f"{sorted(f2)[:3]}); were they estimated on the same model?"
            )
    else:
        group = list(dict.fromkeys(names))
        if not group:
            raise ValueError("names is empty; pass at least one parameter name")
        for which, f in (("first", f1), ("second", f2)):
            missing = [n for n in group if n not in f]
            if missing:
                raise ValueError(f"the {which} Fisher has no entries {missing[:5]}")
    for n in group:
        if tuple(f1[n].shape) != tuple(f2[n].shape):
            raise ValueError(
                f"parameter {n!r} has shape {tuple(f1[n].shape)} in the first Fisher and "
                f"{tuple(f2[n].shape)} in the second"
            )
    a, b = _flat(f1, group, "first"), _flat(f2, group, "second")
    traces = []
    for which, v in (("first", a), ("second", b)):
        tr = float(v.sum())
        if not math.isfinite(tr) or tr <= 0:
            raise ValueError(
                f"the {which} Fisher has zero trace over {group[:5]}; the overlap of a group "
                "without curvature is undefined (leave that group out)"
            )
        traces.append(tr)
    d = (a / traces[0]).sqrt() - (b / traces[1]).sqrt()
    return float(min(1.0, max(0.0, 1.0 - 0.5 * float(d.square().sum()))))


def layer_groups(fisher: Iterable[str]) -> dict[str, list[str]]:
    """Group parameter names by the module that owns them, preserving their order.

    A name's module prefix is the name without its last dotted component (``"0.weight"`` ->
    ``"0"``, ``"encoder.fc1.bias"`` -> ``"encoder.fc1"``, ``"lstm.weight_ih_l0"`` ->
    ``"lstm"``); a name without a dot is its own group.

    Args:
        fisher: A Fisher mapping, or any iterable of parameter names.

    Returns:
        ``{module prefix: [parameter names]}`` in order of first appearance.
    """
    groups: dict[str, list[str]] = {}
    for name in fisher:
        groups.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return groups


def layer_overlaps(f1: Mapping[str, Tensor], f2: Mapping[str, Tensor]) -> dict[str, float]:
    """Fisher overlap of each layer (see :func:`layer_groups`), from input to output order.

    Args:
        f1: First diagonal Fisher.
        f2: Second diagonal Fisher, over exactly the same parameters and shapes.

    Returns:
        ``{layer: overlap}`` in ``f1``'s parameter order (input to output for most models).

    Raises:
        ValueError: If the parameter names differ, or for any error of :func:`fisher_overlap`
            (a layer whose Fisher is zero in either task, e.g. a dead layer, included).
    """
    if set(f1) != set(f2):
        diff = sorted(set(f1) ^ set(f2))
        raise ValueError(f"the two Fishers cover different parameters: {diff[:5]}")
    out = {}
    for layer, names in layer_groups(f1).items():
        try:
            out[layer] = fisher_overlap(f1, f2, names)
        except ValueError as e:
            raise ValueError(f"layer {layer!r}: {e}") from None
    return out


def overlap_table(
    per_label: Mapping[str, Mapping[str, float]], layers: Sequence[str] | None = None
) -> dict[str, object]:
    """Build the ``"fisher_overlap"`` entry of a results file (the input of Fig. 2C).

    Args:
        per_label: ``{curve label: {layer: overlap}}``, e.g.
            ``{"similar (10% pixels permuted)": layer_overlaps(F_a, F_b), ...}``.
        layers: Display names of the layers, one per layer in order; default ``"layer 1"``,
            ``"layer 2"``, ... (the keys of the first curve give the order and count).

    Returns:
        ``{"layers": [...], "curves": [{"label": str, "overlap": [float per layer]}, ...]}``.

    Raises:
        ValueError: If the curves cover different layers or ``layers`` has the wrong length.
    """
    if not per_label:
        raise ValueError("per_label is empty; pass at least one curve")
    keys = list(next(iter(per_label.values())))
    curves = []
    for label, values in per_label.items():
        if list(values) != keys:
            raise ValueError(f"curve {label!r} covers layers {list(values)}, expected {keys}")
        curves.append({"label": str(label), "overlap": [float(values[k]) for k in keys]})
    names = [f"layer {i + 1}" for i in range(len(keys))] if layers is None else list(layers)
    if len(names) != len(keys):
        raise ValueError(f"layers has {len(names)} names for {len(keys)} layers")
    return {"layers": names, "curves": curves}
