"""Forward hooks that record each fast layer's input and output for one batch.

The hooks are registered with ``prepend=True``, so they run before any hook the user put on the
layer: the recorded output is the layer's own ``forward`` result, the tensor whose gradient the
layer's closed form needs, and what the hook returns (the output, a copy, or an expanded view)
is what the user's hooks and the next layers see. Forward pre-hooks have already run, so the
recorded input is what ``forward`` received.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from torch import Tensor, nn

__all__ = ["Capture", "Record"]


class Record(NamedTuple):
    """One call of a fast layer: its input, its output and the output's version counter."""

    x: Tensor
    out: Tensor
    version: int


def _expansion(mode: str, x: Tensor, out: Tensor, size: int) -> str | None:
    """How to give an embedding lookup without a batch dimension one of ``size`` samples.

    ``"expand"``: indices ``(1, ...)`` (a lookup broadcast over the batch) become
    ``(size, ...)``; ``"prepend"``: indices ``(T, ...)`` (``wpe(arange(T))``) become
    ``(size, T, ...)``. ``mode="auto"`` (the probe's first guess) leaves a lookup whose leading
    dimension is ``size`` as it is and decides between the two from the shapes; a verified
    route fixes each layer's mode to what its probe saw, so the choice never depends on the
    size of a later batch.
    """
    if mode == "prepend":
        return "prepend"
    if mode == "expand":
        return "expand" if x.dim() > 0 and x.shape[0] == 1 and out.shape[0] == 1 else None
    if out.dim() > 0 and out.shape[0] == size and x.dim() > 0 and x.shape[0] == size:
        return None
    if size > 1 and x.dim() > 0 and x.shape[0] == 1 and out.shape[0] == 1:
        return "expand"
    return "prepend"


class Capture:
    """Record ``(input, output)`` of each layer in ``modules`` during one forward pass.

    Args:
        modules: The fast layers by name.
        clone: Hand a copy of each output downstream (in-place ops there leave the recorded
            output intact).
        size: The number of samples in the batch.
        expand: Embedding layers whose lookups without a batch dimension are expanded to the
            batch (``name -> "auto" | "prepend"``, see :func:`_expansion`). Broadcasting gives
            the same forward values, and the gradient reaching the expanded view is per sample.
        single_input: Layers that must be called as ``module(x)`` exactly (their rule is the
            module-local VJP, which replays the call with ``x`` alone).

    Attributes:
        records: Every call of each layer, in order.
        expanded: The layers whose lookups were expanded, and how.
        unusable: Layers called other than as ``module(tensor) -> tensor``.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        *,
        clone: bool,
        size: int,
        expand: Mapping[str, str],
        single_input: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        self.clone = clone
        self.size = size
        self.expand = expand
        self.single_input = single_input
        self.records: dict[str, list[Record]] = {}
        self.expanded: dict[str, str] = {}
        self.unusable: set[str] = set()
        self.handles = [
            m.register_forward_hook(self._hook(n), with_kwargs=True, prepend=True)
            for n, m in modules.items()
        ]

    def _hook(self, name: str) -> Callable[..., Tensor | None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Tensor | None:
            if not (args and isinstance(args[0], Tensor) and isinstance(output, Tensor)) or (
                name in self.single_input and (len(args) != 1 or kwargs)
            ):
                self.unusable.add(name)
                return None
            x = args[0]
            changed = False
            mode = self.expand.get(name)
            how = None if mode is None else _expansion(mode, x, output, self.size)
            if how == "expand":
                x = x.expand(self.size, *x.shape[1:])
                output = output.expand(self.size, *output.shape[1:])
            elif how == "prepend":
                x = x.unsqueeze(0).expand(self.size, *x.shape)
                output = output.unsqueeze(0).expand(self.size, *output.shape)
            if how is not None:
                changed = True
                self.expanded[name] = how
            self.records.setdefault(name, []).append(Record(x.detach(), output, output._version))
            if self.clone:
                return output.clone()
            return output if changed else None

        return hook

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
