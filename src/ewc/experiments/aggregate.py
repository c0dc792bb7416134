"""Results over several seeds: one λ per method for all seeds, mean and standard deviation.

A method's entry in ``results.json`` is the usual single-run entry (see
:mod:`ewc.experiments.results`) built from the **mean** accuracy matrix over the seeds (so its
summary numbers agree with that matrix), plus:

* ``"seeds"``: ``{str(seed): single-run entry}``, every seed's own matrix and metrics;
* ``"mean"`` and ``"std"``: ``{metric: value}`` over the per-seed values of
  ``average_accuracy``, ``bwt``, ``fwt``, ``forgetting`` and ``val_average_accuracy`` (the
  sample standard deviation, ``ddof=1``; ``null`` with one seed). For forgetting the mean of
  the per-seed values differs from the forgetting of the mean matrix (a max is not linear); the
  table prints ``mean``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .results import method_result

__all__ = ["STAT_KEYS", "combine_seeds", "mean_std"]

STAT_KEYS = ("average_accuracy", "bwt", "fwt", "forgetting", "val_average_accuracy")


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``ddof=1``; ``None`` for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else None)


def _final_average(r: list[list[float]]) -> float:
    last = [v for v in r[-1] if not math.isnan(v)]
    return sum(last) / len(last) if last else float("nan")


def _mean_curves(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Average the curves if every seed evaluated at the same iterations, else seed 0's."""
    first = runs[0]["curves"]
    same = all(
        r["curves"]["iteration"] == first["iteration"]
        and r["curves"]["task_boundaries"] == first["task_boundaries"]
        for r in runs
    )
    if not same:
        return first
    acc = np.mean([np.asarray(r["curves"]["accuracy"], dtype=np.float64) for r in runs], axis=0)
    return {**first, "accuracy": acc.tolist()}


def combine_seeds(
    method: str,
    lams: Sequence[float],
    seeds: Sequence[int],
    runs: Mapping[tuple[str, float, int], Mapping[str, Any]],
    diverged: Mapping[tuple[str, float], str],
    *,
    with_curves: bool,
) -> dict[str, Any]:
    """Build the results entry of one method, λ chosen on the seed-averaged validation accuracy.

    Args:
        method: The method's name.
        lams: Its λ candidates.
        seeds: The seeds run.
        runs: ``(method, λ, seed) -> run`` with ``R_test``, ``R_val``, ``baseline``, ``curves``
            (the dict :func:`~ewc.experiments.trainer.run_sequence` returns).
        diverged: ``(method, λ) -> message`` of the candidates that diverged on some seed.
        with_curves: Keep the training curves.

    Raises:
        FloatingPointError: If every candidate diverged.
    """
    scores = {}
    for lam in lams:
        if (method, lam) in diverged:
            continue
        vals = [_final_average(runs[(method, lam, s)]["R_val"]) for s in seeds]
        scores[lam] = None if any(math.isnan(v) for v in vals) else float(np.mean(vals))
    if not scores:
        raise FloatingPointError(f"{method} diverged for every λ candidate: lower --lr")
    # the best seed-averaged validation accuracy (the first of equal ones; no validation split:
    # a single candidate, which Config.validate ensures)
    lam = max(scores, key=lambda k: -math.inf if scores[k] is None else scores[k])
    chosen = [runs[(method, lam, s)] for s in seeds]
    lam_out = lam if method != "finetune" else None
    per_seed = {}
    for s, r in zip(seeds, chosen, strict=True):
        e = method_result(
            r["R_test"],
            curves=r["curves"] if with_curves else None,
            baseline=r["baseline"],
            lam=lam_out,
        )
        val = _final_average(r["R_val"])
        e["val_average_accuracy"] = None if math.isnan(val) else val
        per_seed[str(s)] = e
    mean_r = np.mean([np.asarray(r["R_test"], dtype=np.float64) for r in chosen], axis=0)
    mean_b = np.mean([np.asarray(r["baseline"], dtype=np.float64) for r in chosen], axis=0)
    entry = method_result(
        mean_r,
        curves=_mean_curves(chosen) if with_curves else None,
        baseline=mean_b,
        lam=lam_out,
    )
    entry["val_average_accuracy"] = scores[lam]
    entry["mean"], entry["std"] = {}, {}
    for key in STAT_KEYS:
        vals = [e[key] for e in per_seed.values()]
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in vals):
            entry["mean"][key], entry["std"][key] = None, None
        else:
            entry["mean"][key], entry["std"][key] = mean_std(vals)
    entry["seeds"] = per_seed
    if len(lams) > 1:
        entry["lam_sweep"] = [
            {"lam": c, "val_average_accuracy": scores[c]} for c in lams if c in scores
        ] + [{"lam": c, "diverged": diverged[(method, c)]} for c in lams if c not in scores]
    return entry
