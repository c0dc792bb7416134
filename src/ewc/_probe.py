"""The probing step: run a batch under a route that is known to be right for it.

:class:`Router` keeps what an estimate has learned about a model (layers to exclude, inputs that
are shared, in-place ops, embedding expansions, whether ``vmap`` traces the model) and one
verified :class:`~ewc._route.Route` per input signature. :meth:`Router.forward` runs the
capture forward pass of a batch; the first batch of each signature is also probed: a sub-batch
of two samples goes through the checks of :mod:`ewc._verify`, and what fails is routed to the
generic path before anything is accumulated. Later batches only get the cheap checks that every
fast layer was called once, on rows of the batch, and that nothing changed its output in place.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import _memo, _rules
from ._batches import Layout, call
from ._capture import Capture, Record
from ._generic import loop_squares, vmap_squares
from ._options import FisherOptions
from ._route import Partition, Route, route_key
from ._verify import LEAK, Verdict, check_sample, rel_err, tolerance

__all__ = ["Router"]

PROBE_SIZE = 2  # samples per probe: the fewest that can show a gradient reaching another row
_MAX_ROUNDS = 64


class Router:
    """Routes for one estimate over ``model`` (see the module doc).

    Args:
        model: The model (in eval mode).
        trainable: The selected trainable parameters by name.
        opts: The estimate's options (``output_fn`` is read).
        memo: Start from what earlier estimates of the same model learned and verified, and
            leave what this one verifies for later ones (:mod:`ewc._memo`: keyed by a
            fingerprint of the model's structure, hooks, parameters and these options).
    """

    memo_allowed = True  # a subclass whose checks depend on more than the fingerprint: False

    def __init__(
        self,
        model: nn.Module,
        trainable: Mapping[str, nn.Parameter],
        opts: FisherOptions,
        memo: bool = True,
    ) -> None:
        self.model = model
        self.trainable = dict(trainable)
        self.output_fn = opts.output_fn
        self.excluded: dict[str, str] = {}
        self.clone = False
        self.prepend: set[str] = set()
        self.no_expand: set[str] = set()
        self.unexpanded: dict[str, str] = {}  # why an expansion was given up
        self.shared: dict[str, set[int]] = {}
        self.generic = "vmap"
        self.why_loop = ""
        self.routes: dict[tuple[Any, ...], Route] = {}
        self._gen = torch.Generator().manual_seed(0)
        self._verified: dict[tuple[Any, ...], _memo.RouteFacts] = {}
        self._memo_key: tuple[Any, ...] | None = None
        if memo and self.memo_allowed:
            self._memo_key = _memo.fingerprint(model, self.trainable, opts.output_fn)
            facts = _memo.recall(model, self._memo_key)
            if facts is not None:
                self._restore(facts)

    # --- Memory across estimates (ewc._memo) -------------------------------------------
    def _restore(self, facts: _memo.Facts) -> None:
        self.excluded, self.clone = facts.excluded, facts.clone
        self.prepend, self.no_expand = facts.prepend, facts.no_expand
        self.unexpanded, self.shared = facts.unexpanded, facts.shared
        self.generic, self._verified = facts.generic, facts.verified

    def _save(self) -> None:
        if self._memo_key is None:
            return
        facts = _memo.Facts(
            self.excluded,
            self.clone,
            self.prepend,
            self.no_expand,
            self.unexpanded,
            self.shared,
            self.generic,
            self._verified,
        )
        _memo.remember(self.model, self._memo_key, facts)

    def _recalled(self, key: tuple[Any, ...], layout: Layout) -> Route | None:
        """Return the route an earlier estimate verified for ``key``, rebuilt on this model."""
        facts = self._verified.get(key)
        if facts is None:
            return None
        part = Partition.of(self.model, self.trainable, facts.excluded)
        return Route(
            part,
            layout,
            facts.clone,
            dict(facts.expand),
            facts.generic,
            dict(facts.excluded),
            facts.how + " (in an earlier estimate of this model)",
        )

    def checked(self) -> Mapping[str, Tensor]:
        """Return the parameters the probe differentiates against: those in the forward's graph.

        The selected parameters themselves; a subclass for sharded models (:mod:`ewc._fsdp`)
        returns the unsharded tensors the forward pass used instead.
        """
        return self.trainable

    def check_groups(self) -> list[list[str]] | None:
        """Return groups of parameter names whose gradients the probe forms one at a time.

        ``None``: all at once (one backward pass). A subclass for sharded models groups them by
        FSDP unit, so the probe never holds more than one unit's full gradients.
        """
        return None

    # --- Running a batch ---------------------------------------------------------------
    def layout(self, inputs: Any, size: int) -> Layout:
        """Return the layout of ``inputs`` with what is known about shared leaves."""
        spec = str(Layout.of(inputs, size).spec)
        return Layout.of(inputs, size, self.shared.get(spec, ()))

    def candidate(self, layout: Layout) -> Route:
        """Return the route the facts learned so far give (not yet verified)."""
        part = Partition.of(self.model, self.trainable, self.excluded)
        expand = {
            n: ("prepend" if n in self.prepend else "auto")
            for n, r in part.rules.items()
            if r.diagonal is _rules.embedding and n not in self.no_expand
        }
        return Route(part, layout, self.clone, expand, self.generic, dict(self.excluded))

    def _outputs(self, inputs: Any) -> Any:
        z = call(self.model, inputs)
        if self.output_fn is not None:
            z = self.output_fn(z)
        if not isinstance(z, Tensor):
            raise TypeError(
                f"the model must return a tensor of outputs, got {type(z).__name__}; pass "
                "output_fn= to pick it (e.g. output_fn=lambda out: out.logits), or use "
                "ewc.integrations.lm.hf_fisher for Hugging Face models"
            )
        return z

    def run(self, route: Route, inputs: Any, size: int) -> tuple[Tensor, Capture]:
        """One forward pass of ``inputs`` under ``route``'s capture hooks."""
        capture = route.capture(size)
        try:
            with torch.enable_grad():
                z = self._outputs(inputs)
        except Exception:
            if not capture.expanded:
                raise
            self.no_expand |= set(capture.expanded)  # the model rejects an expanded lookup
            z = None
        finally:
            capture.remove()
        return z, capture  # type: ignore[return-value]

    def forward(self, inputs: Any, size: int) -> tuple[Route, Tensor, dict[str, Record]]:
        """Run the capture forward pass of one batch under a verified route.

        Returns the route, the outputs ``z`` (with their graph) and one record per fast layer.
        """
        for _ in range(_MAX_ROUNDS):
            layout = self.layout(inputs, size)
            key = route_key(layout, inputs, size)
            route = self.routes.get(key) or self._recalled(key, layout) or self.candidate(layout)
            z, capture = self.run(route, inputs, size)
            if z is None or self._inconsistent(route, capture, size):
                self.routes.pop(key, None)
                self._verified.pop(key, None)
                continue
            if not route.verified:
                checked = self.probe(route, inputs, size, z)
                if checked is None:
                    continue  # a fact changed what the capture must do: run the batch again
                done = route_key(checked.layout, inputs, size)
                self.routes[done] = checked
                self._verified[done] = _memo.RouteFacts(
                    dict(checked.excluded),
                    checked.clone,
                    dict(checked.expand),
                    checked.generic,
                    checked.verified,
                )
                self._save()
                if any(capture.expanded.get(n) != checked.expand.get(n) for n in checked.fast):
                    continue  # the verified expansions differ from this pass's: run it again
                route = checked
            records = {n: capture.records[n][0] for n in route.fast}
            return route, z, records
        raise RuntimeError("the Fisher estimator could not settle on a route for this model")

    def _inconsistent(self, route: Route, capture: Capture, size: int) -> bool:
        """Record why fast layers cannot take their closed form here; return whether any did."""
        found = False
        for name in route.fast:
            recs = capture.records.get(name, [])
            why = None
            if name in capture.unusable:
                why = "it is called other than as module(tensor) -> tensor"
            elif not recs:
                why = "it is never called (its parameters are used functionally elsewhere)"
            elif len(recs) > 1:
                why = f"it is called {len(recs)} times in one forward pass"
            elif recs[0].x.shape[:1] != (size,) or recs[0].out.shape[:1] != (size,):
                lead = recs[0].out.shape[0] if recs[0].out.dim() else "none"
                why = self.unexpanded.get(name) or (
                    f"the leading dimension of its output ({lead}) does not index the samples "
                    "(a sequence-first layout, or a tensor without the batch dimension)"
                )
            if why is not None:
                self.excluded[name] = why
                found = True
        if (
            not found
            and not self.clone
            and any(r.out._version != r.version for recs in capture.records.values() for r in recs)
        ):
            self.clone = True  # an in-place op changed a layer output: capture copies instead
            found = True
        return found

    # --- Probing -----------------------------------------------------------------------
    def probe(self, route: Route, inputs: Any, size: int, z_full: Tensor) -> Route | None:
        """Verify ``route`` on a sub-batch; return it checked, or ``None`` to run again.

        ``None`` means a fact that changes the capture itself was learned (copy outputs,
        expand a lookup differently); exclusions, shared inputs and the generic path's mode
        only change the route.
        """
        m = min(size, PROBE_SIZE)
        tol = tolerance(z_full.dtype)
        for _ in range(_MAX_ROUNDS):
            sub = route.layout.take(inputs, m) if m < size else inputs
            try:
                z, capture = self.run(route, sub, m)
            except Exception:
                if m == size:
                    raise
                route = self._resolve_layout(route, inputs, size, m, z_full, tol)
                continue
            if z is None:
                return None
            plain = z.detach()  # hooks that only record or copy leave the values as they are
            if capture.expanded:
                with torch.no_grad():
                    plain = self._outputs(sub)
                if z.shape != plain.shape or rel_err(z.detach(), plain) > tol:
                    self.no_expand |= set(capture.expanded)  # expanding changed the outputs
                    return None
            if m < size and (plain.shape != z_full[:m].shape or rel_err(plain, z_full[:m]) > tol):
                route = self._resolve_layout(route, inputs, size, m, z_full, tol)
                continue
            clone = self.clone
            if self._inconsistent(route, capture, m):
                if self.clone != clone:
                    return None
                route = self._refresh(inputs, size)
                continue
            records = {n: capture.records[n][0] for n in route.fast}
            # every sample's locality; the squares (the same for any sample) once, the last
            verdicts = [
                check_sample(
                    self.model,
                    route,
                    self.checked(),
                    sub,
                    z,
                    records,
                    self._column(z, i),
                    i,
                    self.output_fn,
                    squares_too=i == m - 1,
                    groups=self.check_groups(),
                )
                for i in range(m)
            ]
            changed = self._learn(route, capture, verdicts, inputs, size)
            if changed == "rerun":
                return None
            if changed:
                route = self._refresh(inputs, size)
                continue
            how = f"{m} sample{'s' if m > 1 else ''} against autograd"
            fixed = {n: capture.expanded[n] for n in route.expand if n in capture.expanded}
            return Route(
                route.partition,
                route.layout,
                route.clone,
                fixed,
                route.generic,
                dict(self.excluded),
                how,
            )
        raise RuntimeError("the Fisher estimator's probe did not converge for this model")

    def _refresh(self, inputs: Any, size: int) -> Route:
        """Return the candidate route from the facts learned so far."""
        return self.candidate(self.layout(inputs, size))

    def _column(self, z: Tensor, i: int) -> Tensor:
        """Return a random cotangent for ``z`` that is non-zero only in sample ``i``."""
        c = torch.zeros(z.shape, dtype=torch.float64)
        c[i] = torch.randn(z.shape[1:], generator=self._gen, dtype=torch.float64)
        return c.to(device=z.device, dtype=z.dtype)

    def _learn(
        self, route: Route, capture: Capture, verdicts: list[Verdict], inputs: Any, size: int
    ) -> bool | str:
        """Turn failed checks into facts; ``"rerun"`` when the capture itself must change."""
        failed: dict[str, str] = {}
        for v in verdicts:
            for name, why in v.failed.items():
                failed.setdefault(name, why)
        rerun = False
        for name, why in failed.items():
            mode = route.expand.get(name)
            if mode == "auto" and name not in capture.expanded and why == LEAK:
                self.prepend.add(name)  # rows looked like samples but are positions: try again
                rerun = True
            elif mode is not None and name in capture.expanded:
                self.no_expand.add(name)
                self.prepend.discard(name)
                self.unexpanded[name] = (
                    "its lookup without a batch dimension, expanded to the batch, does not give "
                    "per-sample gradients (the model indexes or reduces over that dimension): "
                    + why
                )
                rerun = True
            else:
                self.excluded[name] = why
        generic = next((v.generic for v in verdicts if v.generic is not None), None)
        if generic is not None and not failed:
            if route.generic == "vmap":
                self.generic, self.why_loop = "loop", generic
                return True
            alt = self._alternatives(route)
            if alt is None:
                raise ValueError(
                    "the per-sample gradients of the parameters without a closed form do not "
                    f"match autograd even one sample at a time ({generic}): the model does not "
                    "treat the samples of a batch independently"
                )
            self._share(alt)
            return True
        if rerun:
            return "rerun"
        return bool(failed)

    # --- Which inputs are per sample ----------------------------------------------------
    def _alternatives(self, route: Route) -> Layout | None:
        """Return the layout with one more input shared, or ``None`` when none is left."""
        ambiguous = route.layout.ambiguous[1:]  # the first tensor defines the batch size
        return route.layout.with_shared(ambiguous[:1]) if ambiguous else None

    def _share(self, layout: Layout) -> None:
        idx = {i for i, f in enumerate(layout.batched) if f is False}
        self.shared.setdefault(str(layout.spec), set()).update(idx)

    def _resolve_layout(
        self, route: Route, inputs: Any, size: int, m: int, z_full: Tensor, tol: float
    ) -> Route:
        """Find which inputs are shared: the sub-batch must reproduce the batch's outputs."""
        ambiguous = route.layout.ambiguous[1:]
        for r in range(1, len(ambiguous) + 1):
            for subset in itertools.combinations(ambiguous, r):
                alt = route.layout.with_shared(subset)
                try:
                    with torch.no_grad():
                        plain = self._outputs(alt.take(inputs, m))
                except Exception:
                    continue
                if plain.shape == z_full[:m].shape and rel_err(plain, z_full[:m]) <= tol:
                    self._share(alt)
                    return Route(
                        route.partition,
                        alt,
                        route.clone,
                        route.expand,
                        route.generic,
                        route.excluded,
                    )
        names = [route.layout.names[i] for i in route.layout.ambiguous]
        raise ValueError(
            f"the model's outputs for the first {m} samples alone differ from its outputs for "
            f"them within the batch of {size}: either it mixes the samples of a batch (batch "
            "statistics in eval mode, attention or pooling across the batch), for which a "
            "per-sample Fisher is not defined, or an input without a batch dimension has a "
            f"leading dimension equal to the batch size (inputs taken as per-sample: {names}); "
            "bind such an input in the model or give it a leading dimension of 1"
        )

    def generic_squares(
        self, route: Route, inputs: Any, s: Tensor, quantity: str = "square"
    ) -> dict[str, Tensor]:
        """Return the sums of squared per-sample gradients of ``route.rest`` for one batch.

        If ``vmap`` fails on a later batch (the probe saw it work on another), this batch and
        every later one take the per-sample loop instead, with a warning. ``quantity="abs"``
        sums absolute values instead (:mod:`ewc.mas`).
        """
        names = list(route.rest)
        args = (self.model, names, inputs, route.layout, s, self.output_fn, quantity)
        if route.generic == "vmap" and self.generic == "vmap":
            try:
                return vmap_squares(*args)
            except RuntimeError as e:
                self.generic, self.why_loop = "loop", str(e).splitlines()[0][:120]
                self.routes.clear()  # later batches are probed again with the loop
                self._verified.clear()
                self._save()
        self._warn_loop(names)
        return loop_squares(*args)

    def _warn_loop(self, names: list[str], stacklevel: int = 5) -> None:
        """Warn once that the generic path loops over samples, and why."""
        if self.why_loop:
            warnings.warn(
                f"per-sample gradients of {len(names)} parameter(s) without a closed form "
                f"(e.g. {names[0]!r}) fall back to one pass per sample, because "
                f"torch.func.vmap cannot trace the model or gives wrong numbers ({self.why_loop}); "
                "leave them out with params= to skip this cost",
                stacklevel=stacklevel,
            )
            self.why_loop = ""
