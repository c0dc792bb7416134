"""The figures of Kirkpatrick et al. (2017), Fig. 2, from a results dict, as PNG files.

* :func:`plot_training_curves` — Fig. 2A: each task's test accuracy during training, one panel
  per method;
* :func:`plot_average_accuracy` — Fig. 2B: average accuracy over the tasks seen so far against
  the number of tasks;
* :func:`plot_fisher_overlap` — Fig. 2C: Fisher overlap per layer for tasks of different
  similarity.

Figures are drawn with :class:`matplotlib.figure.Figure` on an Agg canvas, never through
``pyplot``, so importing or calling this module leaves the user's backend and open figures
alone. ``matplotlib`` is imported on first use; it is needed only here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .results import _check_methods, _check_overlap, validate_results

__all__ = ["plot_training_curves", "plot_average_accuracy", "plot_fisher_overlap", "plot_all"]

_DPI = 150


def _figure(width: float, height: float) -> Any:
    """Return a new ``Figure`` with an Agg canvas attached (no pyplot, no global state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "the plots need matplotlib, which ewc does not install: pip install matplotlib"
        ) from e
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png", dpi=_DPI)
    return p


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](k) for k in range(n)]
    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.95, n)]


def _task_label(j: int, n_tasks: int) -> str:
    return f"task {chr(ord('A') + j)}" if n_tasks <= 26 else f"task {j + 1}"


def _title(name: str, method: dict[str, Any]) -> str:
    return name if method["lam"] is None else f"{name} (λ = {method['lam']:g})"


def _seed_runs(m: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the per-seed entries of a several-seed method entry (empty for a single run)."""
    seeds = m.get("seeds") or {}
    return list(seeds.values()) if len(seeds) > 1 else []


def _band(ax: Any, x: np.ndarray, rows: list[Any], color: Any) -> None:
    """Shade mean ± std (sample) of ``rows`` around the plotted mean."""
    a = np.asarray(rows, dtype=np.float64)
    mean, std = a.mean(axis=0), a.std(axis=0, ddof=1)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0, clip_on=False)


def plot_training_curves(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Fig. 2A: test accuracy of every task over training iterations, one panel per method.

    Task ``j`` is drawn from the start of its own training (``curves["task_boundaries"][j]``)
    onward; dashed vertical lines mark the task boundaries. Methods without curves are left
    out. Over several seeds the lines are the means and the bands mean ± std (when every seed
    was evaluated at the same iterations).

    Args:
        results: A results dict (see :mod:`ewc.experiments.results`).
        path: The PNG file to write (parent directories are created).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``results`` is malformed or no method has curves.
    """
    _check_methods(results, "results", check_summary=False)
    methods = [(n, m) for n, m in results["methods"].items() if m["curves"] is not None]
    if not methods:
        raise ValueError(
            "results: no method has training curves (every methods.<name>.curves is null); "
            "record them during training to plot Fig. 2A"
        )
    fig = _figure(8.0, 0.8 + 2.0 * len(methods))
    axes = fig.subplots(len(methods), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, m) in zip(axes, methods, strict=True):
        it = np.asarray(m["curves"]["iteration"])
        acc = np.asarray(m["curves"]["accuracy"], dtype=np.float64)
        starts = m["curves"]["task_boundaries"]
        n_tasks = acc.shape[1]
        seeds = [
            r["curves"]
            for r in _seed_runs(m)
            if r["curves"] is not None and r["curves"]["iteration"] == m["curves"]["iteration"]
        ]
        for j, color in enumerate(_colors(n_tasks)):
            keep = it >= starts[j]
            label = _task_label(j, n_tasks)
            ax.plot(it[keep], acc[keep, j], color=color, lw=1.2, label=label, clip_on=False)
            if len(seeds) > 1:
                rows = [np.asarray(c["accuracy"])[keep, j] for c in seeds]
                _band(ax, it[keep], rows, color)
        for x in starts[1:]:
            ax.axvline(x, color="0.5", ls="--", lw=0.8)
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("test accuracy")
        ax.set_title(_title(name, m), loc="left", fontsize="medium")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    axes[-1].set_xlabel("training iteration")
    return _save(fig, path)


def plot_average_accuracy(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Fig. 2B: average accuracy over the tasks seen so far against the number of tasks.

    Args:
        results: A results dict (its ``average_accuracy_curve`` per method is used; over
            several seeds the mean, with a band of mean ± std).
        path: The PNG file to write.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``results`` is malformed.
    """
    _check_methods(results, "results", check_summary=False)
    fig = _figure(5.5, 4.0)
    ax = fig.subplots()
    methods = results["methods"]
    colors = _colors(len(methods))
    n_max = 1
    for color, (name, m) in zip(colors, methods.items(), strict=True):
        curve = m["average_accuracy_curve"]
        x = np.arange(1, len(curve) + 1)
        n_max = max(n_max, len(curve))
        ax.plot(x, curve, marker="o", ms=4, color=color, label=_title(name, m), clip_on=False)
        runs = _seed_runs(m)
        if runs:
            _band(ax, x, [r["average_accuracy_curve"] for r in runs], color)
    ax.set_xticks(np.arange(1, n_max + 1))
    ax.set_xlim(0.8, n_max + 0.2)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("number of tasks")
    ax.set_ylabel("average accuracy (tasks seen so far)")
    ax.legend(loc="lower left", fontsize="small")
    return _save(fig, path)


def plot_fisher_overlap(overlap: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Fig. 2C: Fisher overlap per layer (input to output) for each task similarity.

    Args:
        overlap: ``{"layers": [names], "curves": [{"label": str, "overlap": [float per
            layer]}, ...]}`` (e.g. from :func:`ewc.experiments.overlap.overlap_table`).
        path: The PNG file to write.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``overlap`` is malformed (a curve of the wrong length, a value outside
            ``[0, 1]``).
    """
    _check_overlap(overlap, "plot_fisher_overlap", "overlap")
    layers = overlap["layers"]
    fig = _figure(5.5, 4.0)
    ax = fig.subplots()
    x = np.arange(1, len(layers) + 1)
    for color, c in zip(_colors(len(overlap["curves"])), overlap["curves"], strict=True):
        ax.plot(x, c["overlap"], marker="o", ms=4, color=color, label=c["label"], clip_on=False)
    ax.set_xticks(x, labels=layers)
    ax.set_xlim(0.8, len(layers) + 0.2)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("layer (input to output)")
    ax.set_ylabel("Fisher overlap")
    ax.legend(loc="lower left", fontsize="small")
    return _save(fig, path)


def plot_all(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write every figure the results allow into ``out_dir``.

    ``fig2a.png`` when some method has training curves, ``fig2b.png`` always, and
    ``fig2c.png`` when ``results`` has a ``"fisher_overlap"`` entry.

    Args:
        results: A results dict (validated as :func:`~ewc.experiments.results.read_results`
            does).
        out_dir: Directory to write into; created if missing.

    Returns:
        The paths written, in the order above.
    """
    validate_results(results)
    out = Path(out_dir)
    paths = []
    if any(m["curves"] is not None for m in results["methods"].values()):
        paths.append(plot_training_curves(results, out / "fig2a.png"))
    paths.append(plot_average_accuracy(results, out / "fig2b.png"))
    if results.get("fisher_overlap") is not None:
        paths.append(plot_fisher_overlap(results["fisher_overlap"], out / "fig2c.png"))
    return paths
