r"""KFAC-EWC: the EWC penalty with a Kronecker-factored curvature per layer.

For a layer with ``W̃ = [W | b]`` (``O × I'``, see :mod:`ewc.kfac`) and tasks ``t`` with factors
``A_t, G_t`` and optima ``W̃*_t``, the penalty is

.. math::

    \frac{\lambda}{2}\sum_t \operatorname{vec}(\Delta_t)^\top (A_t \otimes G_t)
    \operatorname{vec}(\Delta_t) = \frac{\lambda}{2}\sum_t \operatorname{tr}(G_t \Delta_t A_t
    \Delta_t^\top), \qquad \Delta_t = \tilde W - \tilde W^*_t,

never forming ``A_t ⊗ G_t``; parameters outside the Kronecker blocks keep the diagonal EWC
penalty of :class:`ewc.EWC` (its merged exact quadratic). A sum of Kronecker products is not a
Kronecker product, so there are two ways to keep several tasks (``merge=``):

* ``"exact"``: every task's ``(A_t, G_t, W̃*_t)``; memory and step cost grow with the tasks
  (one batched pair of matmuls per layer covers all of them). With ``rank=r`` each task keeps
  its own ``r`` leading eigenpairs of ``A_t`` and ``G_t`` (``A_t ⊗ G_t`` restricted to the
  ``r × r`` leading Kronecker eigen-directions), much cheaper per task.
* ``"eigenbasis"``: constant memory. The curvature is kept diagonal in the Kronecker eigenbasis
  ``Q_A ⊗ Q_G`` of the factor sums ``Σ_t A_t``, ``Σ_t G_t``: ``H ≈ (Q_A ⊗ Q_G) diag(s)
  (Q_A ⊗ Q_G)ᵀ`` with ``s`` an ``O × I'`` matrix. A new task's ``A ⊗ G`` is added in the new
  basis of the updated sums by its diagonal there (``s += outer(diag(Q_Gᵀ G Q_G), diag(Q_Aᵀ A
  Q_A))``), and the old ``s`` is carried over by the diagonal of its projection
  (``s ← (P_G ∘ P_G) s (P_A ∘ P_A)ᵀ``, ``P = Q_newᵀ Q_old``). Exact for one task, and for
  any number of tasks whose factors commute (share eigenvectors); otherwise it keeps, in that
  basis, the diagonal of the exact sum (the Frobenius-nearest matrix diagonal in the basis) for
  the last task and for the projected history. The anchors combine as in the diagonal penalty,
  elementwise in the rotated coordinates. The approximation's cost is measured in
  ``benchmarks/bench_kfac.py``; on permuted-input tasks (factors far from commuting) it loses
  most of KFAC's advantage in training (``docs/REPRODUCTION.md``), so ``"exact"`` is the
  default.

``mode="online"`` keeps ``H ← γ H + H_new`` anchored at the latest optimum, in either form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._quadratic import wide_sum
from .kfac import KFAC, KronBlock, estimate_kfac
from .penalty import EWC

__all__ = ["KFACEWC", "MERGES"]

MERGES = ("exact", "eigenbasis")


class KFACEWC(EWC):
    r"""EWC with a Kronecker-factored Fisher (:func:`ewc.fisher_kfac`); ``EWC(curvature="kfac")``.

    Args:
        model, lam, mode, gamma, kind, likelihood, n_samples, mc_samples, params: As for
            :class:`ewc.EWC`; λ multiplies the same per-sample-mean curvature.
        merge: ``"exact"`` (every task's factors; memory grows with the tasks) or
            ``"eigenbasis"`` (constant memory, the approximation of :mod:`ewc.kfac_penalty`).
        rank: Keep only the ``rank`` leading eigenvectors of each factor (``None``: all): of
            each task's ``A_t`` and ``G_t`` for ``merge="exact"``, of the factor sums for
            ``"eigenbasis"``. Drops the directions of least curvature; the step cost per layer
            and term falls from about ``O·I'·(O + I')`` to ``2·O·I'·rank`` multiply-adds.
        fisher_dtype: Storage dtype of the factors and of the diagonal precision.

    Attributes:
        layers: The Kronecker layers (fixed by the first consolidation): ``{layer: (weight key,
            bias key or None, weight shape)}``.
    """

    def __init__(
        self,
        model: nn.Module,
        lam: float,
        *,
        merge: str = "exact",
        rank: int | None = None,
        curvature: str = "kfac",
        **kwargs: Any,
    ) -> None:
        if curvature != "kfac":
            raise ValueError(f"KFACEWC has curvature='kfac', got {curvature!r}")
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        super().__init__(model, lam, **kwargs)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
        self.merge = merge
        self.rank = rank
        self.layers: dict[str, tuple[str, str | None, tuple[int, ...]]] = {}
        self.kron: dict[str, dict[str, Tensor]] = {}
        self.kron_offset = torch.zeros((), dtype=torch.float64)

    # --- Recording tasks --------------------------------------------------------------
    def _diagonal_params(self) -> dict[str, nn.Parameter]:
        covered = {k for w, b, _ in self.layers.values() for k in (w, b) if k}
        return {n: p for n, p in super()._diagonal_params().items() if n not in covered}

    def _block(self, name: str) -> KronBlock:
        w, b, shape = self.layers[name]
        return KronBlock(w, b, shape, ())

    def consolidate(  # type: ignore[override]
        self,
        data: Iterable[Any] | None = None,
        *,
        fisher: KFAC | None = None,
        **fisher_kwargs: Any,
    ) -> KFAC:
        """Record the current parameters as a task's optimum with its KFAC.

        Pass the task's ``data`` (estimated with :func:`ewc.fisher_kfac` and this object's
        defaults, overridable by ``fisher_kwargs``) or a precomputed ``fisher=`` (a
        :class:`~ewc.KFAC` over the same layers; a sum of KFACs adds each term at this anchor).
        """
        if (data is None) == (fisher is None):
            raise ValueError("consolidate needs exactly one of `data` or `fisher=`")
        if fisher is None:
            fisher = estimate_kfac(self.model, data, self.options.replace(**fisher_kwargs))
        if not isinstance(fisher, KFAC):
            raise TypeError(f"fisher= must be an ewc.KFAC, got {type(fisher).__name__}")
        self._check_kfac(fisher)
        self._check_fisher(fisher.rest)
        self._merge(fisher.rest)
        self._merge_kron(fisher)
        self.tasks.append({"n_samples": fisher.n_samples, "kind": fisher.kind})
        return fisher

    def _check_kfac(self, kfac: KFAC) -> None:
        layers = {n: (b.weight, b.bias, tuple(b.shape)) for n, b in kfac.items()}
        if not self.layers:
            params = self._params()
            wanted = set(super()._diagonal_params())
            for n, (w, b, shape) in layers.items():
                own = {w} if b is None else {w, b}
                if w not in params or tuple(params[w].shape) != shape or not own <= wanted:
                    raise ValueError(f"the KFAC block {n!r} does not match the model's parameters")
            self.layers = layers
        elif layers != self.layers:
            raise ValueError(
                "the KFAC's Kronecker layers differ from the first task's: "
                f"{sorted(set(layers) ^ set(self.layers)) or 'the same names, other parameters'}"
            )
        kfac.validate()

    @torch.no_grad()
    def _merge_kron(self, kfac: KFAC) -> None:
        params = self._params()
        for name, block in kfac.items():
            w = params[block.weight]
            # a copy: without a bias the matrix is a view of the live weight
            anchor = block.matrix({k: params[k].detach() for k in block.keys}, w.dtype).clone()
            store = self.fisher_dtype or w.dtype
            for j, (a, g) in enumerate(block.terms):
                a, g = a.to(w.device, w.dtype), g.to(w.device, w.dtype)
                decay = self.gamma if (self.mode == "online" and j == 0) else 1.0
                if self.merge == "exact":
                    self._add_exact(name, a, g, anchor, decay, store)
                else:
                    self._add_eigen(name, a, g, anchor, decay, store)

    def _add_exact(
        self, name: str, a: Tensor, g: Tensor, anchor: Tensor, decay: float, store: torch.dtype
    ) -> None:
        old = self.kron.get(name)
        if self.rank is None:
            new = {"A": a[None].to(store), "G": g[None].to(store)}
            scaled = "G"
        else:  # the term's own leading eigenpairs: A ⊗ G ≈ (U_A ⊗ U_G) diag(s) (U_A ⊗ U_G)ᵀ
            ea, ua = _top_eigenpairs(a.double(), self.rank)
            eg, ug = _top_eigenpairs(g.double(), self.rank)
            new = {
                "Q_A": ua[None].to(store),
                "Q_G": ug[None].to(store),
                "S": torch.outer(eg, ea)[None].to(store),
            }
            scaled = "S"
        new["anchor"] = anchor[None].clone()
        if old is None:
            self.kron[name] = new
            return
        if self.mode == "online":  # H ← γ H + H_new, every term anchored at the latest optimum
            old = {**old, scaled: old[scaled] * decay}
            old["anchor"] = anchor.expand_as(old["anchor"]).clone()
        self.kron[name] = {k: torch.cat([old[k], new[k]]) for k in new}

    def _add_eigen(
        self, name: str, a: Tensor, g: Tensor, anchor: Tensor, decay: float, store: torch.dtype
    ) -> None:
        old = self.kron.get(name)
        a64, g64 = a.double(), g.double()
        if old is None:
            sum_a, sum_g = a64, g64
        else:
            sum_a = decay * old["sum_A"].double() + a64
            sum_g = decay * old["sum_G"].double() + g64
        qa, qg = _top_eigenvectors(sum_a, self.rank), _top_eigenvectors(sum_g, self.rank)
        dg = torch.diagonal(qg.T @ g64 @ qg).clamp_min(0)
        d_new = torch.outer(dg, torch.diagonal(qa.T @ a64 @ qa).clamp_min(0))
        theta = anchor.double()
        if old is None:
            s, mean = d_new, theta
        else:
            pa = (qa.T @ old["Q_A"].double()).square()
            pg = (qg.T @ old["Q_G"].double()).square()
            s_old = decay * (pg @ old["S"].double() @ pa.T)
            s = s_old + d_new
            if self.mode == "online":
                mean = theta
            else:  # the diagonal penalty's parallel combination, in the rotated coordinates
                mean = old["mean"].double()
                diff = qg.T @ (theta - mean) @ qa
                safe = torch.where(s > 0, s, torch.ones_like(s))
                wgt = torch.where(s > 0, d_new / safe, torch.ones_like(s))
                self.kron_offset += (s_old * wgt * diff.square()).sum().cpu()
                mean = mean + qg @ (wgt * diff) @ qa.T  # outside a truncated basis: unchanged
        self.kron[name] = {
            "Q_A": qa.to(store),
            "Q_G": qg.to(store),
            "S": s.to(store),
            "mean": mean.to(anchor.dtype),
            "sum_A": sum_a.to(store),
            "sum_G": sum_g.to(store),
        }

    # --- The penalty --------------------------------------------------------------------
    def _kron_state(self, name: str, device: torch.device) -> dict[str, Tensor]:
        st = self.kron[name]
        if next(iter(st.values())).device != device:
            st = self.kron[name] = {k: v.to(device) for k, v in st.items()}
        return st

    def _kron_grad(self, name: str, wt: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(Σ quadratic, ∂/∂W̃ of ½ Σ quadratic)`` of one layer at ``W̃ = wt``.

        Exact: ``Σ_t tr(G_t Δ_t A_t Δ_tᵀ)`` and ``Σ_t G_t Δ_t A_t`` (one batched pair of
        matmuls over the tasks). Eigenbasis: ``Σ s ⊙ R²`` and ``Q_G (s ⊙ R) Q_Aᵀ`` with
        ``R = Q_Gᵀ (W̃ − μ) Q_A``.
        """
        st = self._kron_state(name, wt.device)
        if self.merge == "exact" and "A" in st:
            a, g = st["A"].to(wt.dtype), st["G"].to(wt.dtype)
            d = wt.unsqueeze(0) - st["anchor"]  # (T, O, I')
            gda = torch.bmm(torch.bmm(g, d), a)
            return wide_sum(gda * d), gda.sum(0)
        if self.merge == "exact":  # per-task truncated eigenpairs, batched over the tasks
            qa, qg, s = (st[k].to(wt.dtype) for k in ("Q_A", "Q_G", "S"))
            d = wt.unsqueeze(0) - st["anchor"]
            rot = torch.bmm(torch.bmm(qg.transpose(1, 2), d), qa)  # (T, r_G, r_A)
            srot = s * rot
            return wide_sum(srot * rot), torch.bmm(torch.bmm(qg, srot), qa.transpose(1, 2)).sum(0)
        qa, qg, s = (st[k].to(wt.dtype) for k in ("Q_A", "Q_G", "S"))
        rot = qg.T @ (wt - st["mean"]) @ qa
        srot = s * rot
        return wide_sum(srot * rot), qg @ srot @ qa.T

    def _kron_parts(
        self, wanted: set[int] | None = None, *, graph: bool = False
    ) -> tuple[Tensor | None, list[Tensor], list[Tensor]]:
        """Return the Kronecker part's summed quadratics, its parameters and their gradients.

        The gradients are of half the sum; only trainable parameters (and only ``wanted`` ids
        if given) are listed. ``graph``: the gradients as a graph in the parameters.
        """
        with torch.set_grad_enabled(graph):
            return self._kron_sums(wanted)

    def _kron_sums(
        self, wanted: set[int] | None
    ) -> tuple[Tensor | None, list[Tensor], list[Tensor]]:
        params = self._params()
        value: Tensor | None = None
        ps: list[Tensor] = []
        grads: list[Tensor] = []
        for name in self.kron:
            block = self._block(name)
            own = {k: params[k] for k in block.keys}
            v, grad = self._kron_grad(name, block.matrix(own, own[block.weight].dtype))
            value = v if value is None else value + v
            for k, gk in block.split(grad).items():
                p = own[k]
                if p.requires_grad and (wanted is None or id(p) in wanted):
                    ps.append(p)
                    grads.append(gk.to(p.dtype))
        return value, ps, grads

    def penalty(self) -> Tensor:
        r"""Return ``(λ/2) [Σ_layers Σ_t tr(G_t Δ_t A_t Δ_tᵀ) + c] +`` the diagonal part.

        Differentiable in the parameters (0 before the first consolidation); the gradient is
        formed in the forward pass, with the same products as :meth:`add_penalty_grad`. The
        value is summed in float32 at least, as :meth:`ewc.EWC.penalty`'s.
        """
        total = super().penalty()
        value, ps, grads = self._kron_parts()
        if value is None:
            return total
        value = 0.5 * self.lam * (value + float(self.kron_offset))

        def again() -> list[Tensor]:  # for create_graph=True: the same gradients, as a graph
            return self._kron_parts(graph=True)[2]

        return total + _Precomputed.apply(value.to(total.dtype), self.lam, grads, again, *ps)

    __call__ = penalty

    @torch.no_grad()
    def add_penalty_grad(
        self, params: Iterable[Tensor] | None = None, *, scale: float = 1.0
    ) -> None:
        """Add the penalty's gradient to ``.grad``, as :meth:`ewc.EWC.add_penalty_grad` does.

        Per layer ``λ Σ_t G_t Δ_t A_t`` (or the merged form's), plus the diagonal part's.
        """
        wanted = None if params is None else {id(p) for p in params}
        super().add_penalty_grad(params, scale=scale)
        _, ps, grads = self._kron_parts(wanted)
        for p, g in zip(ps, grads, strict=True):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(g, alpha=self.lam * float(scale))

    # --- State --------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        meta = super()._metadata()
        meta["curvature"] = "kfac"
        meta["merge"] = self.merge
        meta["rank"] = self.rank
        meta["layers"] = {
            n: {"weight": w, "bias": b, "shape": list(s)} for n, (w, b, s) in self.layers.items()
        }
        return meta

    def state_dict(self) -> dict[str, Any]:
        """Return the diagonal state plus ``kfac.<layer>.<tensor>`` and ``kron_offset``."""
        state = super().state_dict()
        state["tensors"]["kron_offset"] = self.kron_offset.clone()
        for name, st in self.kron.items():
            for k, v in st.items():
                state["tensors"][f"kfac.{name}.{k}"] = v.detach().clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a state from :meth:`state_dict`, validated against the model.

        As :meth:`ewc.EWC.load_state_dict`; the object is unchanged on error.
        """
        from ._kfac_state import parse_kron
        from ._state import parse_state

        merge, rank, layers, kron, kron_offset, rest = parse_kron(state, self)
        saved = (self.layers, self.merge, self.rank)
        self.layers, self.merge, self.rank = layers, merge, rank
        try:
            parsed = parse_state({"tensors": rest, "metadata": state["metadata"]}, self)
        except ValueError:
            self.layers, self.merge, self.rank = saved
            raise
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
        self.kron, self.kron_offset = kron, kron_offset

    def __repr__(self) -> str:
        return (
            f"KFACEWC(lam={self.lam}, mode={self.mode!r}, merge={self.merge!r}, "
            f"gamma={self.gamma}, kind={self.kind!r}, tasks={self.num_tasks}, "
            f"layers={len(self.layers)})"
        )


def _top_eigenvectors(m: Tensor, rank: int | None) -> Tensor:
    """Eigenvectors of the symmetric ``m``, by decreasing eigenvalue, the first ``rank``."""
    return _top_eigenpairs(m, rank)[1]


def _top_eigenpairs(m: Tensor, rank: int | None) -> tuple[Tensor, Tensor]:
    """Return ``(eigenvalues ≥ 0, eigenvectors)`` of ``m``, decreasing, the first ``rank``."""
    vals, vecs = torch.linalg.eigh(m)
    vals, vecs = vals.flip(-1).clamp_min(0), vecs.flip(-1)
    return (vals, vecs) if rank is None else (vals[:rank], vecs[:, :rank])


class _Precomputed(torch.autograd.Function):
    """A value whose gradient ``λ · grads`` was formed with it.

    Under ``create_graph=True`` the gradients are formed again as a graph in the parameters
    (``again()``), so second derivatives through the penalty are autograd's.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        value: Tensor,
        lam: float,
        grads: list[Tensor],
        again: Callable[[], list[Tensor]],
        *params: Tensor,
    ) -> Tensor:
        ctx.lam, ctx.again = lam, again
        ctx.save_for_backward(*grads)
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():
            return (None, None, None, None, *[grad_out * ctx.lam * g for g in ctx.again()])
        grads = torch._foreach_mul(list(ctx.saved_tensors), grad_out * ctx.lam)
        return (None, None, None, None, *grads)
