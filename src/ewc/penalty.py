r"""EWC penalties: ``(λ/2) Σ_t Σ_i F_t,i (θ_i − θ*_t,i)²`` stored as one exact quadratic.

A sum of quadratics is again a quadratic. For each parameter we keep the total precision
``A = Σ_t F_t`` and the precision-weighted anchor ``μ = Σ_t F_t θ*_t / A``; then

.. math::

    \sum_t F_t (\theta - \theta^*_t)^2 = A (\theta - \mu)^2 + c,
    \qquad c = \sum_t F_t (\theta^*_t - \mu)^2 \ge 0,

exactly, in value and gradient. Adding a task updates ``(A, μ, c)`` with the numerically sound
parallel-combination formulas (no large nearly-equal numbers are subtracted):

.. math::

    A' = A + F,\quad \mu' = \mu + \tfrac{F}{A'}(\theta^* - \mu),\quad
    c' = c + \sum_i \tfrac{A_i F_i}{A'_i}(\theta^*_i - \mu_i)^2 .

So memory is two tensors per parameter (plus one scalar) however many tasks there are.
``mode="online"`` (Schwarz et al. 2018; Huszár 2018 for γ = 1) keeps ``A ← γ A + F`` anchored at
the latest optimum ``μ = θ*``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import _fsdp
from . import _quadratic as _quad
from . import distributed as _dist
from ._options import FisherOptions, describe_params
from ._select import ParamSelector, select_params
from .estimate import estimate
from .fisher import Fisher
from .likelihoods import Likelihood

if TYPE_CHECKING:
    from .posterior import DiagonalGaussian

__all__ = ["EWC", "L2", "FORMAT_VERSION"]

FORMAT_VERSION = 1
MODES = ("separate", "online")
CURVATURES = ("diagonal", "kfac")


def _dtype_from_name(name: Any) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"the EWC state names an unknown fisher_dtype {name!r}")
    return dtype


def _check_lam(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0 (it weights a penalty), got {lam}")
    return float(lam)


def _check_gamma(gamma: float) -> float:
    ok = isinstance(gamma, (int, float)) and not isinstance(gamma, bool)
    if not ok or not (0.0 < gamma <= 1.0):
        raise ValueError(f"gamma must be in (0, 1] (the decay of old Fishers), got {gamma!r}")
    return float(gamma)


class EWC:
    r"""Elastic Weight Consolidation for ``model``.

    Args:
        model: The network being trained. The penalty covers its trainable parameters at the
            time of the first consolidation. A ``DistributedDataParallel`` or ``DataParallel``
            wrapper is unwrapped (``self.model`` is its ``.module``; parameter names have no
            ``"module."`` prefix). Under DDP every rank holds the same parameters and, after a
            distributed :meth:`consolidate`, the same Fisher, so the penalty and
            :meth:`add_penalty_grad` are identical on every rank. If a forward pass leaves
            penalised parameters unused (``find_unused_parameters=True``), prefer
            :meth:`add_penalty_grad` after ``backward()`` to adding :meth:`penalty` to the loss:
            DDP marks unused parameters ready before the penalty's gradient reaches them.
        lam: λ ≥ 0 in ``(λ/2) Σ_i F_i (θ_i − θ*_i)²`` with the per-sample-mean Fisher of
            :func:`ewc.fisher_diagonal`.
        mode: ``"separate"`` (the paper: one penalty per task, stored merged and exact) or
            ``"online"`` (``F ← γ F + F_new`` anchored at the latest optimum).
        gamma: Decay of old Fishers in ``"online"`` mode, in ``(0, 1]``.
        kind, likelihood, n_samples, mc_samples: Defaults for :meth:`consolidate`'s Fisher
            estimate (see :func:`ewc.fisher_diagonal`).
        params: The parameters the penalty covers: ``None`` (every trainable parameter), a
            name or :mod:`fnmatch` pattern, a list of them (e.g. ``["*.lora_*"]``), or a
            predicate ``(name, param) -> bool``; only trainable parameters are selected. Names
            and patterns are saved with the state; a predicate must be passed again to
            :meth:`load`.
        fisher_dtype: Storage dtype of the merged precision ``A`` (e.g. ``torch.bfloat16``
            to halve its memory for a large model); ``None`` keeps each parameter's dtype.
            The anchors stay in the parameters' dtype, so the penalty is exactly zero at the
            optimum; sums are formed in the parameters' dtype before rounding.
        curvature: ``"diagonal"`` (this class) or ``"kfac"``: a Kronecker-factored block per
            ``nn.Linear``/``nn.Conv2d`` (:class:`ewc.kfac_penalty.KFACEWC`, which also takes
            ``merge=``).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 2)
        >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> ewc = EWC(net, lam=100.0)
        >>> ewc.consolidate(data)  # after training task A
        >>> loss = ewc.penalty()   # add to task B's loss
        >>> float(loss)
        0.0
    """

    def __new__(cls, *args: Any, curvature: str = "diagonal", **kwargs: Any) -> EWC:
        """``curvature="kfac"`` makes a :class:`ewc.kfac_penalty.KFACEWC`."""
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if cls is EWC and curvature == "kfac":
            from .kfac_penalty import KFACEWC

            return super().__new__(KFACEWC)
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        lam: float,
        *,
        mode: str = "separate",
        gamma: float = 1.0,
        kind: str = "sampled",
        likelihood: str | Likelihood | Callable[[Tensor, Tensor], Tensor] = "classification",
        n_samples: int | None = None,
        mc_samples: int = 1,
        params: ParamSelector = None,
        fisher_dtype: torch.dtype | None = None,
        curvature: str = "diagonal",
    ) -> None:
        if curvature != "diagonal":
            raise ValueError(f"{type(self).__name__} takes curvature='diagonal' only")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model = _dist.unwrap(model)
        self.lam = _check_lam(lam)
        self.gamma = _check_gamma(gamma)
        self.mode = mode
        # the defaults of every consolidation's estimate, validated once
        self.options = FisherOptions(
            kind=kind,
            likelihood=likelihood,
            n_samples=n_samples,
            mc_samples=mc_samples,
            params=params,
        )
        self.likelihood = likelihood  # as given (a name is saved as the name)
        if fisher_dtype is not None and not (
            isinstance(fisher_dtype, torch.dtype) and fisher_dtype.is_floating_point
        ):
            raise ValueError(
                f"fisher_dtype must be a floating-point torch.dtype or None, got {fisher_dtype!r}"
            )
        self.fisher_dtype = fisher_dtype
        select_params(self.model, params)  # fail early on a pattern that matches nothing
        self.precision: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        self.offset = torch.zeros((), dtype=torch.float64)
        self.tasks: list[dict[str, Any]] = []
        self._pool = _quad.Pool()  # the penalty's reused scratch buffers (ewc._quadratic)

    # --- The estimate's defaults -------------------------------------------------------
    @property
    def kind(self) -> str:
        """The default ``kind`` of a consolidation's Fisher estimate."""
        return self.options.kind

    @kind.setter
    def kind(self, value: str) -> None:
        self.options = self.options.replace(kind=value)

    @property
    def n_samples(self) -> int | None:
        """The default ``n_samples`` of a consolidation's Fisher estimate."""
        return self.options.n_samples

    @property
    def mc_samples(self) -> int:
        """The default ``mc_samples`` of a consolidation's Fisher estimate."""
        return self.options.mc_samples

    @property
    def params(self) -> ParamSelector:
        """The parameters the penalty covers (a selector, see :func:`ewc.fisher_diagonal`)."""
        return self.options.params

    # --- Recording tasks --------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        """Number of consolidated tasks."""
        return len(self.tasks)

    def _params(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    def _diagonal_params(self) -> dict[str, nn.Parameter]:
        """Return the selected parameters that the diagonal precision covers."""
        return select_params(self.model, self.params)

    def _check_fisher(self, fisher: Mapping[str, Tensor]) -> None:
        params = self._params()
        expected = set(self.precision) if self.precision else set(self._diagonal_params())
        got = set(fisher)
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise ValueError(
                "the Fisher does not match the model's parameters: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
            )
        for n, f in fisher.items():
            if tuple(f.shape) != tuple(params[n].shape):
                raise ValueError(
                    f"Fisher entry {n!r} has shape {tuple(f.shape)} but the parameter has "
                    f"shape {tuple(params[n].shape)}"
                )
        if not isinstance(fisher, Fisher):
            fisher = Fisher(fisher)
        fisher.validate()

    def consolidate(
        self,
        data: Iterable[Any] | None = None,
        *,
        fisher: Mapping[str, Tensor] | None = None,
        **fisher_kwargs: Any,
    ) -> Fisher:
        """Record the current parameters as a task's optimum with its Fisher.

        Call it after training on a task. Either pass the task's ``data`` (the Fisher is
        estimated at the current parameters with this object's defaults, overridable by
        ``fisher_kwargs`` such as ``kind=`` or ``generator=``) or a precomputed ``fisher``.

        Returns:
            The Fisher that was added.
        """
        if (data is None) == (fisher is None):
            raise ValueError("consolidate needs exactly one of `data` or `fisher=`")
        if fisher is None:
            assert data is not None
            fisher = estimate(self.model, data, self.options.replace(**fisher_kwargs))
        self._check_fisher(fisher)
        if not isinstance(fisher, Fisher):
            fisher = Fisher(fisher)
        self._merge(fisher)
        self.tasks.append({"n_samples": fisher.n_samples, "kind": fisher.kind})
        return fisher

    @torch.no_grad()
    def _merge(self, fisher: Fisher) -> None:
        params = self._params()
        offset = self.offset.clone()
        new_prec: dict[str, Tensor] = {}
        new_anchor: dict[str, Tensor] = {}
        for n, f in fisher.items():
            theta = params[n].detach().clone()
            f = f.detach().to(device=theta.device, dtype=theta.dtype)
            store = self.fisher_dtype or theta.dtype
            if n not in self.precision:
                new_prec[n], new_anchor[n] = f.to(store, copy=True), theta
                continue
            a, mu = self.precision[n].to(theta.dtype), self.anchor[n]
            if self.mode == "online":
                new_prec[n], new_anchor[n] = (self.gamma * a + f).to(store), theta
                continue
            a_new = a + f
            safe = torch.where(a_new > 0, a_new, torch.ones_like(a_new))
            w = torch.where(a_new > 0, f / safe, torch.ones_like(f))
            diff = theta - mu
            offset += _fsdp.total((a * w * diff.square()).double().sum()).cpu()
            new_prec[n], new_anchor[n] = a_new.to(store), mu + w * diff
        self.precision, self.anchor = new_prec, new_anchor
        self.offset = offset if self.mode == "separate" else torch.zeros((), dtype=torch.float64)

    # --- The penalty --------------------------------------------------------------------
    def _operands(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Return parameters, precisions and anchors as aligned lists.

        The stored tensors follow the parameters if the model moved to another device.
        """
        params = self._params()
        names = list(self.precision)
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(
                f"the model no longer has the penalised parameters {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}: the state was consolidated for them; "
                "restore them, or start a new EWC for the changed model"
            )
        ps = [params[n] for n in names]
        for n, p in zip(names, ps, strict=True):
            if self.precision[n].shape != p.shape:
                raise ValueError(
                    f"parameter {n!r} has shape {tuple(p.shape)} but the state was consolidated "
                    f"for shape {tuple(self.precision[n].shape)}: restore the layer, or start a "
                    "new EWC for the changed model"
                )
            if self.precision[n].device != p.device:
                self.precision[n] = self.precision[n].to(p.device)
                self.anchor[n] = self.anchor[n].to(p.device)
        return ps, [self.precision[n] for n in names], [self.anchor[n] for n in names]

    def penalty(self) -> Tensor:
        r"""Return ``(λ/2) [Σ_i A_i (θ_i − μ_i)² + c]``, differentiable in the parameters.

        Equals ``(λ/2) Σ_t Σ_i F_t,i (θ_i − θ*_t,i)²`` over the consolidated tasks (0 before the
        first consolidation). The backward pass reuses ``A ⊙ (θ − μ)`` from the forward pass.
        The value is a 0-dim tensor summed in float32 at least (a float16 model's penalty
        would overflow at 65504); the gradient is in the parameters' dtype.
        """
        if not self.precision:
            p0 = next(iter(self._params().values()))
            return p0.new_zeros((), dtype=torch.promote_types(p0.dtype, torch.float32))
        ps, precs, anchors = self._operands()
        if any(_fsdp.is_sharded(p) for p in ps):  # FSDP2: per-shard parts, summed over ranks
            return _fsdp.penalty(_fresh_quadratic, self.lam, float(self.offset), ps, precs, anchors)
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in ps)):
            return _quad.value(self.lam, float(self.offset), precs, anchors, self._pool, ps)
        return _quad.Quadratic.apply(self.lam, float(self.offset), precs, anchors, self._pool, *ps)

    __call__ = penalty

    @torch.no_grad()
    def add_penalty_grad(
        self, params: Iterable[Tensor] | None = None, *, scale: float = 1.0
    ) -> None:
        """Add the penalty's gradient ``scale · λ A ⊙ (θ − μ)`` to each parameter's ``.grad``.

        For training loops that cannot change the loss: call it after ``loss.backward()`` (after
        AMP unscaling) and before the optimizer step. Gives the same update as adding
        :meth:`penalty` to the loss, and is the cheaper of the two (no autograd graph).
        Parameters with ``requires_grad=False`` (frozen after consolidation) are skipped, as
        autograd skips them for :meth:`penalty`, so an optimizer over all parameters does not
        move them.

        Args:
            params: Only these parameter tensors (e.g. those of the optimizer about to step,
                when several optimizers share a model); ``None``: every penalised parameter.
                Parameters the penalty does not cover are ignored.
            scale: Multiplies the added gradient, e.g. a ``GradScaler``'s scale when the
                gradients are still scaled.
        """
        if not self.precision:
            return
        ps, precs, anchors = self._operands()
        wanted = None if params is None else {id(p) for p in params}
        # a parameter frozen since (requires_grad=False) gets no gradient, as with penalty()
        keep = [
            i for i, p in enumerate(ps) if p.requires_grad and (wanted is None or id(p) in wanted)
        ]
        if len(keep) < len(ps):
            ps, precs, anchors = ([v[i] for i in keep] for v in (ps, precs, anchors))
        if not ps:
            return
        for p in ps:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in ps]
        value = self.lam * float(scale)
        if any(_fsdp.is_sharded(p) for p in ps):  # DTensor operations on the shards
            diffs = torch._foreach_sub(ps, anchors)
            torch._foreach_addcmul_(grads, precs, diffs, value=value)  # type: ignore[arg-type]
            return
        scratch = self._pool.take(ps, precs, anchors)  # no fresh parameter-sized tensors
        diffs = _quad.diffs_into(scratch, ps, anchors)
        torch._foreach_addcmul_(grads, precs, diffs, value=value)  # type: ignore[arg-type]
        self._pool.give(scratch)

    # --- State --------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        lik = self.likelihood
        lik_desc = (
            lik
            if isinstance(lik, str)
            else (lik.config() if isinstance(lik, Likelihood) else {"name": "custom"})
        )
        return {
            "format": "ewc",
            "format_version": FORMAT_VERSION,
            "method": type(self).__name__,
            "mode": self.mode,
            "lam": self.lam,
            "gamma": self.gamma,
            "kind": self.kind,
            "likelihood": lik_desc,
            "params": describe_params(self.params),
            "fisher_dtype": None if self.fisher_dtype is None else str(self.fisher_dtype),
            "tasks": [dict(t) for t in self.tasks],  # a copy: later tasks do not change it
            "num_tasks": self.num_tasks,
        }

    def state_dict(self) -> dict[str, Any]:
        """Return ``{"tensors": {name: tensor}, "metadata": {...}}`` (JSON-serialisable metadata).

        Tensor keys are ``precision.<param>``, ``anchor.<param>`` and ``offset``.
        """
        tensors: dict[str, Tensor] = {"offset": self.offset.clone()}
        for n in self.precision:
            tensors[f"precision.{n}"] = self.precision[n].detach().clone()
            tensors[f"anchor.{n}"] = self.anchor[n].detach().clone()
        return {"tensors": tensors, "metadata": self._metadata()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a state from :meth:`state_dict`, validated against the model.

        Raises:
            ValueError: naming the first mismatch (format, method, mode, parameter names,
                shapes, dtypes, non-finite values); the object is unchanged on error.
        """
        from ._state import parse_state

        parsed = parse_state(state, self)
        (
            self.lam,
            self.gamma,
            self.mode,
            self.kind,
            self.tasks,
            self.precision,
            self.anchor,
            self.offset,
        ) = parsed
        params = self._params()  # FSDP2: each rank keeps its shards, as its parameters
        self.precision = {n: _fsdp.shard_like(t, params[n]) for n, t in self.precision.items()}
        self.anchor = {n: _fsdp.shard_like(t, params[n]) for n, t in self.anchor.items()}

    def save(self, path: str, *, max_shard_bytes: int | None = None) -> None:
        """Write the state to ``path`` as safetensors with JSON metadata (never pickle).

        A model with FSDP-sharded (DTensor) parameters, or a ``max_shard_bytes``, writes the
        Hugging Face sharded layout instead: ``path`` becomes a directory of safetensors files
        of whole tensors (each at most ``max_shard_bytes``, default 1 GiB, unless one tensor is
        larger) plus ``ewc.safetensors.index.json`` (the tensor -> file map and this object's
        metadata). Every rank must call it; the tensors are gathered one at a time and rank 0
        writes them. :meth:`load` reads either layout into a plain, DDP or FSDP model of any
        world size.
        """
        from ._state import save_sharded, save_state

        state = self.state_dict()
        if max_shard_bytes is not None or any(map(_fsdp.is_sharded, state["tensors"].values())):
            save_sharded(state, path, max_shard_bytes=max_shard_bytes)
        else:
            save_state(state, path)

    @classmethod
    def load(cls, path: str, model: nn.Module, **kwargs: Any) -> EWC:
        """Create an object for ``model`` from a file written by :meth:`save`.

        ``kwargs`` (e.g. ``likelihood=``) are passed to the constructor; λ, γ, mode and kind
        come from the file.
        """
        from ._state import check_method, load_state

        state = load_state(path)
        meta = state["metadata"]
        # Before the constructor reads the metadata; ``EWC.load`` of a structured curvature's
        # state builds that curvature's class, checked once it is known.
        dispatch = (
            cls is EWC
            and isinstance(meta, Mapping)
            and meta.get("curvature", "diagonal") != "diagonal"
        )
        if not dispatch:
            check_method(meta, cls.__name__)
        obj = cls._from_meta(model, meta, **kwargs)
        check_method(meta, type(obj).__name__)
        obj.load_state_dict(state)
        return obj

    @classmethod
    def _from_meta(cls, model: nn.Module, meta: Mapping[str, Any], **kwargs: Any) -> EWC:
        saved = meta.get("params")
        if isinstance(saved, list):
            kwargs.setdefault("params", saved)
        kwargs.setdefault("fisher_dtype", _dtype_from_name(meta.get("fisher_dtype")))
        if meta.get("curvature", "diagonal") != "diagonal":
            kwargs.setdefault("curvature", meta["curvature"])
        try:
            return cls(
                model,
                meta["lam"],
                mode=meta["mode"],
                gamma=meta["gamma"],
                kind=meta["kind"],
                **kwargs,
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"the EWC state's metadata is incomplete or malformed: {e}") from e

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(lam={self.lam}, mode={self.mode!r}, gamma={self.gamma}, "
            f"kind={self.kind!r}, tasks={self.num_tasks})"
        )

    # --- The Laplace view ----------------------------------------------------------------
    def posterior(self, prior_precision: float = 0.0) -> DiagonalGaussian:
        """Return the Gaussian ``N(μ, diag(λ A + prior_precision)⁻¹)`` this penalty is the log of.

        ``μ`` is the merged anchor and ``A`` the merged precision (any mode; for :class:`L2`,
        ``A`` counts the pulls: the number of tasks, or 1 with ``anchor="latest"``). With the
        per-sample-mean Fisher, ``λ = N`` is the Laplace posterior of ``N`` data points. See
        :mod:`ewc.posterior`.
        """
        from .posterior import laplace_posterior

        return laplace_posterior(self, prior_precision)


def _fresh_quadratic(
    lam: float, offset: float, precs: list[Tensor], anchors: list[Tensor], *params: Tensor
) -> Tensor:
    """Apply the quadratic on fresh tensors (FSDP's per-shard parts)."""
    return _quad.Quadratic.apply(lam, offset, precs, anchors, None, *params)


class L2(EWC):
    r"""The L2 baseline: EWC's interface with ``F = 1`` for every parameter.

    ``consolidate()`` (no data needed) anchors at the current parameters. Which optima pull
    depends on ``anchor``:

    * ``"all"`` (the EWC paper's baseline): one unit pull per consolidated task,
      ``(λ/2) Σ_t ||θ − θ*_t||²`` — stored merged as ``(λ/2) (T ||θ − θ̄||² + c)`` with
      ``θ̄`` the mean of the optima, so it grows stiffer with every task;
    * ``"latest"`` (Hsu et al. 2018, whose L2 keeps one slot that each task overwrites): a
      single unit pull towards the latest optimum, ``(λ/2) ||θ − θ*_T||²``, as stiff after
      ten tasks as after one. Hsu et al.'s ``reg_coef · Σ (θ − θ*)²`` is ``λ = 2 reg_coef``.

    Args:
        model: The network.
        lam: λ ≥ 0.
        anchor: ``"all"`` or ``"latest"`` (saved with the state).
        mode, gamma: As for :class:`EWC` (``mode="online"`` with ``anchor="all"`` gives
            ``A ← γ A + 1`` at the latest optimum); ``anchor="latest"`` needs the default
            ``mode="separate"``.
        **kwargs: Passed to :class:`EWC` (``params=``, ``fisher_dtype=``).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> l2 = L2(net, lam=2.0, anchor="latest")
        >>> _ = l2.consolidate()
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> _ = l2.consolidate()   # replaces the first anchor
        >>> float(l2.penalty()), l2.num_tasks
        (0.0, 2)
    """

    ANCHORS = ("all", "latest")

    def __init__(
        self,
        model: nn.Module,
        lam: float,
        *,
        anchor: str = "all",
        mode: str = "separate",
        gamma: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if anchor not in self.ANCHORS:
            raise ValueError(f"anchor must be one of {self.ANCHORS}, got {anchor!r}")
        if anchor == "latest" and mode != "separate":
            raise ValueError(
                "anchor='latest' keeps one unit pull towards the latest optimum; it does not "
                f"combine with mode={mode!r} (use anchor='all' with mode='online' for γ-decayed "
                "sums)"
            )
        super().__init__(model, lam, mode=mode, gamma=gamma, **kwargs)
        self.anchor_kind = anchor

    def consolidate(  # noqa: D102
        self,
        data: Iterable[Any] | None = None,
        *,
        fisher: Mapping[str, Tensor] | None = None,
        **fisher_kwargs: Any,
    ) -> Fisher:
        if fisher is not None:
            raise ValueError("L2 uses F = 1; it takes no fisher=")
        names = self.precision or select_params(self.model, self.params)
        params = self._params()
        ones = Fisher({n: torch.ones_like(params[n]) for n in names}, kind="identity")
        if self.anchor_kind == "all":
            return super().consolidate(fisher=ones)
        saved = (self.precision, self.anchor, self.offset)
        self.precision, self.anchor = {}, {}
        self.offset = torch.zeros((), dtype=torch.float64)
        try:
            return super().consolidate(fisher=ones)
        except BaseException:
            self.precision, self.anchor, self.offset = saved
            raise

    def _metadata(self) -> dict[str, Any]:
        return {**super()._metadata(), "anchor": self.anchor_kind}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        from ._state import parse_l2_anchor

        anchor = parse_l2_anchor(state)
        if anchor == "latest" and state["metadata"].get("mode") != "separate":
            raise ValueError("the state has anchor='latest' with a mode other than 'separate'")
        saved = (self.lam, self.gamma, self.mode, self.kind, self.tasks)
        saved_t = (self.precision, self.anchor, self.offset)
        super().load_state_dict(state)
        if anchor == "latest" and (
            float(self.offset) != 0.0 or any(bool((a != 1).any()) for a in self.precision.values())
        ):
            self.lam, self.gamma, self.mode, self.kind, self.tasks = saved
            self.precision, self.anchor, self.offset = saved_t
            raise ValueError(
                "the state says anchor='latest' but its precision is not 1 everywhere (or its "
                "offset is not 0): the file is corrupt, or not written by L2"
            )
        self.anchor_kind = anchor

    @classmethod
    def _from_meta(cls, model: nn.Module, meta: Mapping[str, Any], **kwargs: Any) -> EWC:
        anchor = meta.get("anchor", "all")
        if anchor in cls.ANCHORS:
            kwargs.setdefault("anchor", anchor)
        return super()._from_meta(model, meta, **kwargs)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, anchor={self.anchor_kind!r})"
