r"""Which layer takes which path: the partition of a model's parameters and its verified route.

A **partition** says, from the model's structure alone, which layers have a closed form
(:mod:`ewc._rules`) under which parameter names and which parameters are left to the exact
generic path (:mod:`ewc._generic`). A **route** adds what was learned by running the model:
which inputs are per sample, whether layer outputs are changed in place (so the capture must
hand a copy downstream), which embedding lookups are expanded to the batch, whether ``vmap``
can trace the model, and why each excluded layer was excluded. Routes are immutable;
:class:`Router` builds them and checks each one against autograd (:mod:`ewc._verify`) once per
input signature before any of its closed forms is trusted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import _rules
from ._batches import Layout
from ._capture import Capture

__all__ = ["Partition", "Route"]


@dataclass(frozen=True, eq=False)
class Partition:
    """Which layers take a closed form, under which parameter names, and what is left over.

    Attributes:
        fast: Layers with a closed-form rule, by module name.
        rules: Each fast layer's rule.
        names: For each fast layer, its local parameter names -> the estimate's keys (the
            names of ``model.named_parameters()``, so a tied weight has one key).
        ties: ``(key, linear, embedding)`` for a weight shared by one ``nn.Linear`` (an output
            head) and one ``nn.Embedding`` (the input table): each layer's closed form covers
            its own term of ``(L_n + E_n)²`` and :func:`_rules.tied_cross` adds ``2 L_n E_n``.
        rest: Selected parameters without a closed form (the generic path).
        skipped: Layers with a rule that the structure rules out, and why.
    """

    fast: Mapping[str, nn.Module]
    rules: Mapping[str, _rules.LayerRule]
    names: Mapping[str, Mapping[str, str]]
    ties: tuple[tuple[str, str, str], ...]
    rest: tuple[str, ...]
    skipped: Mapping[str, str]

    @staticmethod
    def of(
        model: nn.Module, trainable: Mapping[str, nn.Parameter], exclude: Mapping[str, str]
    ) -> Partition:
        """Partition ``trainable`` (the selected parameters), leaving out the layers ``exclude``."""
        key = {id(p): n for n, p in trainable.items()}
        owners: dict[int, list[tuple[str, nn.Module]]] = {}
        for mname, module in model.named_modules(remove_duplicate=False):
            for _, p in module.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append((mname, module))
        tieable = {pid for pid, own in owners.items() if pid in key and _tieable(own, exclude)}
        fast: dict[str, nn.Module] = {}
        rules: dict[str, _rules.LayerRule] = {}
        names: dict[str, dict[str, str]] = {}
        skipped: dict[str, str] = {}
        ties: list[tuple[str, str, str]] = []
        for mname, module in model.named_modules():
            rule = _rules.rule_for(module)
            if rule is None or mname in exclude:
                continue
            own = {
                local: p
                for local, p in module.named_parameters(recurse=False)
                if p.requires_grad and id(p) in key
            }
            if not own:
                continue  # nothing selected here (e.g. a frozen base layer beside LoRA adapters)
            shared = [local for local, p in own.items() if len(owners[id(p)]) > 1]
            if any(id(own[local]) not in tieable for local in shared):
                skipped[mname] = f"parameter {shared[0]!r} is shared with another module"
                continue
            fast[mname], rules[mname] = module, rule
            names[mname] = {local: key[id(p)] for local, p in own.items()}
        for pid in tieable:
            (lin, _), (emb, _) = sorted(owners[pid], key=lambda o: type(o[1]) is nn.Embedding)
            if lin in fast and emb in fast:
                ties.append((key[pid], lin, emb))
                continue
            for m in (lin, emb):  # the tied weight needs both closed forms or none
                if fast.pop(m, None) is not None:
                    del rules[m], names[m]
                    skipped[m] = "its weight is tied to a layer that takes the generic path"
        covered = {full for local_names in names.values() for full in local_names.values()}
        rest = tuple(n for n in trainable if n not in covered)
        return Partition(fast, rules, names, tuple(ties), rest, skipped)


def _tieable(own: list[tuple[str, nn.Module]], exclude: Mapping[str, str]) -> bool:
    """Whether a weight is shared by exactly one ``nn.Linear`` and one ``nn.Embedding``."""
    if len(own) != 2 or any(m in exclude for m, _ in own):
        return False
    return (
        {type(mod) for _, mod in own} == {nn.Linear, nn.Embedding}
        and all(_rules.rule_for(mod) is not None for _, mod in own)
        and own[0][1].weight is own[1][1].weight
    )


@dataclass(frozen=True, eq=False)
class Route:
    """A partition plus the facts learned by running the model (see the module doc).

    Attributes:
        partition: The layers and parameters, after the exclusions below.
        layout: Which model inputs are per sample.
        clone: Layer outputs are copied before going downstream (an in-place op changed one).
        expand: Embedding layers whose lookups without a batch dimension are expanded to the
            batch (``"auto"`` or ``"prepend"``, see :mod:`ewc._capture`).
        generic: ``"vmap"`` or ``"loop"``: how the generic path takes per-sample gradients.
        excluded: Layers that have a rule but take the generic path, and why.
        verified: How the route was checked against autograd (``""``: not yet).
    """

    partition: Partition
    layout: Layout
    clone: bool = False
    expand: Mapping[str, str] = field(default_factory=dict)
    generic: str = "vmap"
    excluded: Mapping[str, str] = field(default_factory=dict)
    verified: str = ""

    @property
    def fast(self) -> Mapping[str, nn.Module]:
        """The layers that take their closed forms."""
        return self.partition.fast

    @property
    def rest(self) -> tuple[str, ...]:
        """The parameters of the generic path."""
        return self.partition.rest

    @property
    def leaves(self) -> frozenset[str]:
        """Fast layers whose rule replays the module alone (called as ``module(x)`` only)."""
        return frozenset(n for n, r in self.partition.rules.items() if r is _rules.LEAF)

    def capture(self, size: int) -> Capture:
        """Hooks recording the fast layers of this route for a batch of ``size`` samples."""
        return Capture(
            self.partition.fast,
            clone=self.clone,
            size=size,
            expand=self.expand,
            single_input=self.leaves,
        )

    def describe(self) -> list[tuple[str, str, str]]:
        """Return rows ``(layer or parameter, path, reason)`` covering every parameter."""
        p = self.partition
        generic = f"generic ({self.generic})"
        rows = [(n, p.rules[n].name, _expanded(self.expand.get(n))) for n in p.fast]
        why = {**p.skipped, **self.excluded}
        rows += [(n, generic, r) for n, r in why.items() if n not in p.fast]
        for n in p.rest:
            if n.rpartition(".")[0] not in why:
                rows.append((n, generic, "no closed form for its module"))
        return rows

    def __str__(self) -> str:
        rows = self.describe()
        width = max([len(r[0]) for r in rows] + [5])
        lines = [f"{'layer':{width}s}  path"]
        for name, path, why in rows:
            lines.append(f"{name:{width}s}  {path}" + (f"  ({why})" if why else ""))
        shared = [
            n for n, f in zip(self.layout.names, self.layout.batched, strict=True) if f is False
        ]
        if shared:
            lines.append("shared inputs (broadcast to every sample): " + ", ".join(shared))
        if self.clone:
            lines.append("layer outputs are copied downstream (an in-place op changes one)")
        lines.append(f"verified: {self.verified or 'not yet'}")
        return "\n".join(lines)


def _expanded(mode: str | None) -> str:
    return "" if mode is None else "lookups without a batch dimension are expanded to it"


def route_key(layout: Layout, inputs: Any, size: int) -> tuple[Any, ...]:
    """Routes are verified per input signature, and separately for batches of one sample."""
    return (layout.signature(inputs), min(size, 2))
