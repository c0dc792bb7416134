r"""SI, synaptic intelligence (Zenke et al., 2017): importance from the path integral of training.

While a task ``μ`` is trained, every optimizer step moves the parameters by ``Δθ(t)``; SI sums

.. math::

    \omega_i^\mu = -\sum_t g_i(t)\, \Delta\theta_i(t),

each parameter's share of the decrease of the task loss along the training path (to first
order), where ``g(t)`` is the gradient of the **task loss alone** at the parameters the step
started from. When the task ends (:meth:`SI.consolidate`) the importance of the task is

.. math::

    \Omega_i \mathrel{+}= \max\!\Big(0, \frac{\omega_i^\mu}{(\Delta_i^\mu)^2 + \xi}\Big),
    \qquad \Delta^\mu = \theta(\text{end of } \mu) - \theta(\text{start of } \mu),

and the penalty while training later tasks is ``c Σ_i Ω_i (θ_i − θ̃_i)²`` with ``θ̃`` the
parameters at the end of the latest task (Eq. 4 and 5 of the paper).

Which gradient: the un-regularised one, as in the authors' code (``unreg_grads`` in
``pathint/protocols.py``) and in Hsu et al.'s (``unreg_gradients``). ``ω`` measures how much a
parameter's motion lowered *this task's* loss; with the total gradient, the pull of the penalty
towards old optima would count as importance for the new task, and every parameter held in place
by the penalty would look important although it did not help the task. The user's loop adds the
penalty as usual (``loss + si.penalty()``, or :meth:`SI.add_penalty_grad`); SI records what its
own penalty put into each ``.grad`` since the last optimizer step and subtracts it, so the
optimizer still steps on the total gradient while ``ω`` uses the task's.

Clipping: a parameter whose motion raised the task loss (possible with momentum or Adam) has
``ω < 0``; its term is clipped to 0 (Zenke et al. clip the accumulated ``Ω``, Hsu et al. do not
clip), so every importance is ``≥ 0`` and the penalty is a convex quadratic, stored as
:class:`~ewc.EWC`'s merged quadratic in ``mode="online"`` with ``γ = 1`` and ``λ = 2c``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._options import acc_dtype
from ._quadratic import Quadratic
from ._select import ParamSelector, select_params
from .fisher import Fisher
from .penalty import EWC, _check_lam, _dtype_from_name

__all__ = ["SI"]

KIND = "si"
_OMEGA, _START = "si_omega.", "si_start."


def _check_xi(xi: float) -> float:
    ok = isinstance(xi, (int, float)) and not isinstance(xi, bool)
    if not ok or not math.isfinite(xi) or xi <= 0:
        raise ValueError(f"xi must be a finite number > 0 (SI's damping), got {xi!r}")
    return float(xi)


class Hooks:
    """The optimizer hooks :meth:`SI.attach` registered; :meth:`remove` them after the task."""

    def __init__(self, handles: list[Any], on_remove: Any = None) -> None:
        self.handles = handles
        self._on_remove = on_remove

    def remove(self) -> None:
        """Remove the hooks (the path integral gathered so far stays)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        if self._on_remove is not None:
            self._on_remove()
            self._on_remove = None

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class SI(EWC):
    r"""Synaptic intelligence for ``model``: the path integral of training as importance.

    Args:
        model: The network being trained (a DDP/DataParallel wrapper is unwrapped).
        c: The strength ``c ≥ 0`` in the paper's penalty ``c Σ_i Ω_i (θ_i − θ̃_i)²`` (Hsu et al.'s
            ``reg_coef``); stored as EWC's ``λ = 2c``.
        xi: The damping ``ξ > 0`` in ``ω / (Δ² + ξ)`` (Zenke et al.: 0.1 for permuted and 1e-3
            for split MNIST; Hsu et al.: 0.1).
        params: Which trainable parameters to track and penalise (as for :class:`~ewc.EWC`).
        fisher_dtype: Storage dtype of the merged importance (as for :class:`~ewc.EWC`).

    Usage: one line per optimizer, then the usual loop::

        si = ewc.SI(model, c=1.0, xi=0.1)
        for task in tasks:
            opt = torch.optim.Adam(model.parameters())
            with si.attach(opt):                     # records θ and the gradient at each step
                for x, y in task:
                    loss = F.cross_entropy(model(x), y) + si.penalty()
                    opt.zero_grad(); loss.backward(); opt.step()
            si.consolidate()                          # Ω += ω / (Δ² + ξ); anchor at θ

    The path integral ``ω`` and each parameter's start of the task are part of the saved state
    (tensors ``si_omega.<name>`` and ``si_start.<name>``), so a run saved mid-task resumes
    exactly. With a ``GradScaler``, add the penalty by :meth:`add_penalty_grad` after
    ``scaler.unscale_(opt)`` (the recorded penalty gradient must be the unscaled one), and
    optimizers that evaluate a closure several times per step (L-BFGS) are not supported; a
    closure evaluated once (Lightning's) is.
    """

    state_kinds = (KIND,)

    def __init__(
        self,
        model: nn.Module,
        c: float,
        xi: float = 0.1,
        *,
        params: ParamSelector = None,
        fisher_dtype: torch.dtype | None = None,
    ) -> None:
        try:
            c = _check_lam(c)
        except ValueError as e:
            raise ValueError(str(e).replace("lam", "c", 1)) from None
        super().__init__(
            model, 2.0 * c, mode="online", gamma=1.0, params=params, fisher_dtype=fisher_dtype
        )
        self.xi = _check_xi(xi)
        tracked = select_params(self.model, params)
        self._name_of = {id(p): n for n, p in tracked.items()}
        self.omega: dict[str, Tensor] = {
            n: torch.zeros(p.shape, dtype=acc_dtype(p.dtype), device=p.device)
            for n, p in tracked.items()
        }
        self.start: dict[str, Tensor] = {}
        self._penalty_grad: dict[str, Tensor] = {}
        self._pending: dict[int, list[tuple[str, Tensor]]] = {}
        self._attached: set[int] = set()

    @property
    def c(self) -> float:
        """The paper's ``c`` (``λ / 2``)."""
        return self.lam / 2.0

    @property
    def kind(self) -> str:
        """Always ``"si"``."""
        return KIND

    @kind.setter
    def kind(self, value: str) -> None:
        if value != KIND:
            raise ValueError(f"an SI object's kind is {KIND!r}, got {value!r}")

    # --- Gathering the path integral ---------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> Hooks:
        """Record every step of ``optimizer``; return the hooks (``.remove()``, or ``with``).

        Before each step: the parameters; after it, ``ω −= g ⊙ (θ_after − θ_before)`` with the
        task-loss gradient ``g`` (``.grad`` minus what this object's penalty added since the last
        step). Only the parameters SI tracks are read; parameters with no ``.grad`` add nothing.
        The optimizer must not change ``.grad`` in place (PyTorch's optimizers do not, except
        fused ones unscaling an AMP ``GradScaler``'s gradients inside ``step``).
        """
        if not any(id(p) in self._name_of for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("the optimizer holds none of the parameters this SI object tracks")
        key = id(optimizer)
        if key in self._attached:
            raise ValueError(
                "this optimizer is already attached (its steps would count twice); remove the "
                "hooks attach() returned first"
            )
        handles = [
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before(opt)),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after(opt)),
        ]
        self._attached.add(key)
        return Hooks(handles, lambda: self._attached.discard(key))

    def _names(self, optimizer: torch.optim.Optimizer) -> list[str]:
        return [
            self._name_of[id(p)]
            for g in optimizer.param_groups
            for p in g["params"]
            if id(p) in self._name_of
        ]

    @torch.no_grad()
    def _before(self, optimizer: torch.optim.Optimizer) -> None:
        params = self._params()
        record = []
        for n in self._names(optimizer):
            p = params[n]
            acc = self.omega[n].dtype
            before = p.detach().to(acc, copy=True)
            self.start.setdefault(n, before)
            record.append((n, before))
        self._pending[id(optimizer)] = record

    @torch.no_grad()
    def _after(self, optimizer: torch.optim.Optimizer) -> None:
        """``ω −= g ⊙ (θ_after − θ_before)`` with ``g = .grad −`` this object's penalty gradient.

        The gradient is read after the step: it is the one the step used, also when the
        optimizer computes it inside ``step(closure)`` (as Lightning does), after the pre-hook.
        """
        params = self._params()
        for n, before in self._pending.pop(id(optimizer), []):
            p = params[n]
            pen = self._penalty_grad.pop(n, None)
            if p.grad is None:
                continue
            g = p.grad.detach().to(before.dtype, copy=True)
            if pen is not None:
                g -= pen
            self.omega[n].addcmul_(g, p.detach().to(before.dtype) - before, value=-1.0)

    def _record(self, name: str, grad: Tensor) -> None:
        grad = grad.detach().to(self.omega[name].dtype)
        prev = self._penalty_grad.get(name)
        self._penalty_grad[name] = grad.clone() if prev is None else prev.add_(grad)

    # --- The penalty, recorded ---------------------------------------------------------
    def penalty(self) -> Tensor:
        """Return ``c Σ_i Ω_i (θ_i − θ̃_i)²`` (EWC's penalty), recording its gradient for ``ω``."""
        if not self.precision:
            return super().penalty()
        ps, precs, anchors = self._operands()
        names = list(self.precision)
        return _Recorded.apply(self, names, self.lam, float(self.offset), precs, anchors, *ps)

    __call__ = penalty

    @torch.no_grad()
    def add_penalty_grad(
        self, params: Iterable[Tensor] | None = None, *, scale: float = 1.0
    ) -> None:
        """:meth:`EWC.add_penalty_grad`, recording what it added for ``ω``."""
        tracked = self._params()
        before = {
            n: (tracked[n].grad.clone() if tracked[n].grad is not None else None)
            for n in self.precision
        }
        super().add_penalty_grad(params, scale=scale)
        for n, old in before.items():  # what was added (zero for parameters not in params)
            new = tracked[n].grad
            if new is not None:
                self._record(n, new if old is None else new - old)

    # --- Consolidating ------------------------------------------------------------------
    def importance(self) -> Fisher:
        """Return this task's ``max(0, ω / (Δ² + ξ))`` so far, without consolidating."""
        params = self._params()
        names = list(self.precision) or list(select_params(self.model, self.params))
        out: dict[str, Tensor] = {}
        for n in names:
            p = params[n]
            w = self.omega.get(n)
            if w is None:
                w = torch.zeros(p.shape, dtype=acc_dtype(p.dtype), device=p.device)
            start = self.start.get(n)
            delta = torch.zeros_like(w) if start is None else p.detach().to(w.dtype) - start
            out[n] = (w / (delta.square() + self.xi)).clamp_min_(0.0).to(p.dtype)
        return Fisher(out, kind=KIND)

    def consolidate(  # type: ignore[override]
        self,
        data: Iterable[Any] | None = None,
        *,
        importance: Mapping[str, Tensor] | None = None,
    ) -> Fisher:
        """End the task: add its importance (or ``importance=``), anchor at the parameters.

        Resets the path integral; the next step of an attached optimizer starts the next
        task's. Takes no data: SI's importance is gathered during training.

        Returns:
            The importance that was added.
        """
        if data is not None:
            raise ValueError(
                "SI gathers its importance during training (attach the optimizer with "
                "si.attach(opt)); consolidate() takes no data"
            )
        if importance is None:
            importance = self.importance()
        elif not isinstance(importance, Fisher):
            importance = Fisher(importance, kind=KIND)
        added = super().consolidate(fisher=importance)
        for w in self.omega.values():
            w.zero_()
        self.start.clear()
        self._penalty_grad.clear()
        return added

    # --- State --------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        meta = super()._metadata()
        meta.update(likelihood=None, c=self.c, xi=self.xi)
        return meta

    def state_dict(self) -> dict[str, Any]:
        """EWC's state plus the path integral (``si_omega.*``) and task start (``si_start.*``)."""
        state = super().state_dict()
        for n, w in self.omega.items():
            state["tensors"][_OMEGA + n] = w.detach().clone()
        for n, s in self.start.items():
            state["tensors"][_START + n] = s.detach().clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a state from :meth:`state_dict`, validated (the object is unchanged on error)."""
        try:
            tensors: Mapping[str, Tensor] = state["tensors"]
            meta: Mapping[str, Any] = state["metadata"]
        except (KeyError, TypeError) as e:
            raise ValueError("an SI state needs 'tensors' and 'metadata' entries") from e
        own = {k: v for k, v in tensors.items() if k.startswith((_OMEGA, _START))}
        rest = {k: v for k, v in tensors.items() if k not in own}
        xi = meta.get("xi") if isinstance(meta, Mapping) else None
        try:
            xi = _check_xi(xi)  # type: ignore[arg-type]
        except ValueError as e:
            raise ValueError(f"the state's metadata: {e}") from e
        omega, start = self._parse_own(own)
        super().load_state_dict({"tensors": rest, "metadata": meta})
        self.xi, self.omega, self.start = xi, omega, start
        self._penalty_grad.clear()

    def _parse_own(self, own: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params = self._params()
        omega = {k[len(_OMEGA) :]: v for k, v in own.items() if k.startswith(_OMEGA)}
        start = {k[len(_START) :]: v for k, v in own.items() if k.startswith(_START)}
        if set(omega) != set(self.omega):
            diff = sorted(set(omega) ^ set(self.omega))
            raise ValueError(
                f"the state's SI path integral does not cover the tracked parameters: {diff[:5]}"
                " (was it saved for another model or params= selection?)"
            )
        stray = sorted(set(start) - set(self.omega))
        if stray:
            raise ValueError(f"the state has SI start values for untracked parameters {stray[:5]}")
        out: list[dict[str, Tensor]] = [{}, {}]
        for i, (label, group) in enumerate((("si_omega", omega), ("si_start", start))):
            for n, t in group.items():
                want = self.omega[n]
                if tuple(t.shape) != tuple(want.shape) or t.dtype != want.dtype:
                    raise ValueError(
                        f"{label} of {n!r} has shape {tuple(t.shape)} and dtype {t.dtype}; "
                        f"expected {tuple(want.shape)} and {want.dtype}"
                    )
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{label} of {n!r} has non-finite values: the file is corrupt")
                out[i][n] = t.detach().clone().to(params[n].device)
        return out[0], out[1]

    @classmethod
    def _from_meta(cls, model: nn.Module, meta: Mapping[str, Any], **kwargs: Any) -> SI:
        saved = meta.get("params")
        if isinstance(saved, list):
            kwargs.setdefault("params", saved)
        kwargs.setdefault("fisher_dtype", _dtype_from_name(meta.get("fisher_dtype")))
        try:
            return cls(model, meta["lam"] / 2.0, meta["xi"], **kwargs)
        except (KeyError, TypeError) as e:
            raise ValueError(f"the SI state's metadata is incomplete or malformed: {e}") from e

    def __repr__(self) -> str:
        return f"SI(c={self.c}, xi={self.xi}, tasks={self.num_tasks})"


class _Recorded(torch.autograd.Function):
    """EWC's quadratic whose backward also hands each parameter's gradient to the SI object."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        si: SI,
        names: list[str],
        lam: float,
        offset: float,
        precs: list[Tensor],
        anchors: list[Tensor],
        *params: Tensor,
    ) -> Tensor:
        ctx.si, ctx.names = si, names
        return Quadratic.forward(ctx, lam, offset, precs, anchors, None, *params)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: λ g A ⊙ (θ − μ) as a graph in θ
            parts = zip(ctx.params, ctx.precs, ctx.anchors, strict=True)
            grads = [(grad_out * ctx.lam) * a * (p - m) for p, a, m in parts]
        else:
            grads = torch._foreach_mul(list(ctx.weighted), grad_out * ctx.lam)  # A ⊙ (θ − μ)
        for i, (name, g) in enumerate(zip(ctx.names, grads, strict=True)):
            if ctx.needs_input_grad[6 + i]:
                ctx.si._record(name, g.detach())
        return (None, None, None, None, None, None, *grads)
