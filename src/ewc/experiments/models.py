"""Networks for the experiments: the paper's fully connected ReLU network, optionally multi-head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MLP", "MASKED_LOGIT"]

#: The constant logit of an inactive output: its softmax probability underflows to exactly 0
#: (as if the unit were sliced off), it is finite (the Fisher estimator checks the outputs) and
#: it carries no gradient.
MASKED_LOGIT = -1e4


class MLP(nn.Module):
    """A ReLU multilayer perceptron with one or several output heads.

    Several heads (task-incremental learning) share one output layer of ``heads × outputs``
    units; ``forward(x, task)`` returns the ``outputs`` logits of head ``task``. The other heads'
    weights get zero gradient and zero Fisher, as separate heads would.

    Args:
        in_features: Input size (784 for MNIST).
        hidden: Hidden layer sizes, e.g. ``(400, 400)``.
        outputs: Output units per head.
        heads: Number of heads.
        dropout: Dropout probability after each hidden layer.
        input_dropout: Dropout probability on the input (the paper's Fig. 2B uses 0.2).

    Attributes:
        active_outputs: ``None``, or ``bool (outputs,)``: the units outside it get the constant
            logit :data:`MASKED_LOGIT` (a softmax over the active units only, exactly as if the
            others were sliced off;
            Hsu et al.'s class-incremental training over the classes seen so far). The trainer
            sets it while training and estimating the Fisher and clears it for evaluation.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: tuple[int, ...] = (400, 400),
        outputs: int = 10,
        *,
        heads: int = 1,
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if heads < 1 or outputs < 1:
            raise ValueError(f"heads and outputs must be >= 1, got {heads} and {outputs}")
        layers: list[nn.Module] = []
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, outputs * heads)
        self.outputs, self.heads = outputs, heads
        self.active_outputs: Tensor | None = None

    def forward(self, x: Tensor, task: int | Tensor | None = None) -> Tensor:
        """Return logits ``(N, outputs)`` for ``x`` of shape ``(N, in_features)``."""
        z = self.head(self.body(x.flatten(1)))
        if self.heads == 1:
            if self.active_outputs is not None:
                z = z.masked_fill(~self.active_outputs, MASKED_LOGIT)
            return z
        if task is None:
            raise ValueError("a multi-head network needs the task id: model(x, task)")
        t = int(task.reshape(-1)[0]) if isinstance(task, Tensor) else int(task)
        if not 0 <= t < self.heads:
            raise ValueError(f"task id {t} out of range for {self.heads} heads")
        return z[:, t * self.outputs : (t + 1) * self.outputs]

    @torch.no_grad()
    def predict(self, x: Tensor, task: int | None = None, batch_size: int = 1024) -> Tensor:
        """Return predicted labels ``(N,)`` (in eval mode, batched)."""
        was = self.training
        self.eval()
        try:
            out = [
                self(x[i : i + batch_size], task).argmax(1) for i in range(0, len(x), batch_size)
            ]
        finally:
            self.train(was)
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)
