"""The results files of a continual-learning run: ``results.json`` plus two long-format CSVs.

``results.json`` (all accuracies are fractions in ``[0, 1]``, tasks are numbered from 0)::

    {
      "config":   {...},            # how the run was made (free-form)
      "versions": {...},            # versions(): ewc, torch, numpy, python, platform
      "methods": {
        "<method>": {
          "accuracy_matrix": [[...], ...],      # (T, T), R[i][j]: task j after training task i
          "average_accuracy": float,            # summary of metrics.summarize(R, baseline)
          "average_accuracy_curve": [float, ...],
          "bwt": float, "fwt": float | null, "forgetting": float,
          "baseline_accuracy": [float, ...] | null,   # (T,) the randomly initialised model
          "curves": {                           # or null
            "iteration": [int, ...],            # (P,) evaluation points
            "accuracy": [[float, ...], ...],    # (P, T) accuracy on every task at each point
            "task_boundaries": [int, ...]       # (T,) first iteration of each task
          },
          "lam": float | null                   # the penalty strength λ, if any
        }
      },
      "fisher_overlap": {                       # optional (Fig. 2C)
        "layers": [str, ...],
        "curves": [{"label": str, "overlap": [float per layer]}, ...]
      }
    }

``results.csv`` has one row per matrix entry (``method,after_task,eval_task,accuracy``) and
``curves.csv`` one row per evaluation point and task (``method,iteration,eval_task,accuracy``),
for pandas, R or a spreadsheet.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from .metrics import AccuracyMatrix, as_accuracy_matrix, summarize

__all__ = [
    "versions",
    "method_result",
    "validate_results",
    "write_results",
    "read_results",
    "format_table",
]

_SUMMARY_KEYS = ("average_accuracy", "bwt", "fwt", "forgetting")
_TOLERANCE = 1e-6


def versions() -> dict[str, str]:
    """Versions of the software a run used.

    Returns:
        ``{"ewc", "torch", "numpy", "python", "platform"}`` -> version strings.
    """
    return {
        "ewc": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def method_result(
    R: AccuracyMatrix,
    *,
    curves: Mapping[str, Any] | None = None,
    baseline: Sequence[float] | np.ndarray | None = None,
    lam: float | None = None,
) -> dict[str, Any]:
    """Build the ``methods.<method>`` entry of a results file, with its summary metrics.

    Args:
        R: ``(T, T)`` accuracy matrix, ``R[i][j]`` on task ``j`` after training task ``i``.
        curves: ``{"iteration": (P,) ints, "accuracy": (P, T) fractions, "task_boundaries":
            (T,) ints}`` (lists or arrays), for the training-curve plot; or ``None``.
        baseline: ``(T,)`` accuracies of the randomly initialised model (enables ``fwt``).
        lam: The method's penalty strength λ, or ``None``.

    Returns:
        A JSON-ready dict (plain lists, ints and floats).

    Raises:
        ValueError: If ``R``, ``curves`` or ``baseline`` is malformed (the message says which).
    """
    a = as_accuracy_matrix(R)
    T = a.shape[0]
    entry: dict[str, Any] = {"accuracy_matrix": a.tolist()}
    entry.update(summarize(a, baseline))
    entry["baseline_accuracy"] = None if baseline is None else [float(v) for v in baseline]
    entry["curves"] = None
    if curves is not None:
        if not isinstance(curves, Mapping):
            raise _fail("method_result", "curves", "must be a mapping or None")
        c = {k: _plain(v) for k, v in curves.items()}
        _check_curves(c, "method_result", "curves", T)
        entry["curves"] = {
            "iteration": [int(i) for i in c["iteration"]],
            "accuracy": [[float(v) for v in row] for row in c["accuracy"]],
            "task_boundaries": [int(i) for i in c["task_boundaries"]],
        }
    if lam is not None and not _is_number(lam):
        raise ValueError(f"lam must be a finite number or None, got {lam!r}")
    entry["lam"] = None if lam is None else float(lam)
    return entry


# --- validation ---------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fail(source: str, where: str, problem: str) -> ValueError:
    return ValueError(f"{source}: {where} {problem}")


def _plain(v: Any) -> Any:
    """Turn arrays, tensors and numpy scalars (also nested in lists) into plain Python."""
    if hasattr(v, "tolist") and not isinstance(v, (list, tuple)):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _numbers(v: Any, depth: int) -> bool:
    """Whether ``v`` is a list (nested ``depth`` levels deep) of real numbers."""
    if not isinstance(v, (list, tuple)):
        return False
    if depth == 1:
        return all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    return all(_numbers(x, depth - 1) for x in v)


def _fractions(v: Any, source: str, where: str, shape: tuple[int, ...] | None) -> np.ndarray:
    """Check a list (of lists) of fractions; ``shape`` ``None`` means a square matrix."""
    v = _plain(v)
    depth = 2 if shape is None else len(shape)
    a = None
    if _numbers(v, depth):
        try:
            a = np.asarray(v, dtype=np.float64)
        except ValueError:  # ragged rows
            a = None
    if shape is None:
        if a is None or a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
            raise _fail(source, where, "is not a square matrix (a non-empty list of equal rows)")
    elif a is None or a.shape != shape:
        got = "not a list of numbers with rows of equal length" if a is None else f"{a.shape}"
        raise _fail(source, where, f"must have shape {shape}, got {got}")
    bad = np.argwhere(~np.isfinite(a) | (a < 0) | (a > 1))
    if len(bad):
        idx = "".join(f"[{int(i)}]" for i in bad[0])
        raise _fail(source, f"{where}{idx}", f"= {a[tuple(bad[0])]} is not a fraction in [0, 1]")
    return a


def _ints(v: Any, source: str, where: str, length: int | None) -> list[int]:
    v = _plain(v)
    if not isinstance(v, list) or not all(type(x) is int for x in v):
        raise _fail(source, where, "must be a list of integers")
    if length is not None and len(v) != length:
        raise _fail(source, where, f"must have {length} entries, got {len(v)}")
    if any(b < a for a, b in zip(v, v[1:], strict=False)):
        raise _fail(source, where, "must be non-decreasing")
    return [int(x) for x in v]


def _check_curves(c: Any, source: str, where: str, T: int) -> None:
    if not isinstance(c, Mapping):
        raise _fail(source, where, "must be an object with iteration, accuracy, task_boundaries")
    for key in ("iteration", "accuracy", "task_boundaries"):
        if key not in c:
            raise _fail(source, f"{where}.{key}", "is missing")
    it = _ints(c["iteration"], source, f"{where}.iteration", None)
    if not it:
        raise _fail(source, f"{where}.iteration", "is empty")
    _fractions(c["accuracy"], source, f"{where}.accuracy", (len(it), T))
    _ints(c["task_boundaries"], source, f"{where}.task_boundaries", T)


def _check_method(m: Any, source: str, where: str, check_summary: bool) -> int:
    """Validate one method entry; return its number of tasks."""
    if not isinstance(m, Mapping):
        raise _fail(source, where, "must be an object")
    keys = ("accuracy_matrix", "average_accuracy", "average_accuracy_curve", "bwt", "fwt")
    keys += ("forgetting", "baseline_accuracy", "curves", "lam")
    for key in keys:
        if key not in m:
            raise _fail(source, f"{where}.{key}", "is missing")
    R = _fractions(m["accuracy_matrix"], source, f"{where}.accuracy_matrix", None)
    T = R.shape[0]
    base = m["baseline_accuracy"]
    if base is not None:
        base = _fractions(base, source, f"{where}.baseline_accuracy", (T,))
    for key in _SUMMARY_KEYS:
        v = m[key]
        if not (_is_number(v) or (key == "fwt" and v is None)):
            raise _fail(source, f"{where}.{key}", f"must be a finite number, got {v!r}")
    curve = m["average_accuracy_curve"]
    if not isinstance(curve, (list, tuple)) or not all(_is_number(x) for x in curve):
        raise _fail(source, f"{where}.average_accuracy_curve", "must be a list of numbers")
    if m["lam"] is not None and not _is_number(m["lam"]):
        raise _fail(source, f"{where}.lam", f"must be a finite number or null, got {m['lam']!r}")
    if m["curves"] is not None:
        _check_curves(m["curves"], source, f"{where}.curves", T)
    _check_seed_stats(m, source, where, check_summary)
    if check_summary:
        want = summarize(R, base)
        if (m["fwt"] is None) != (base is None):
            raise _fail(source, f"{where}.fwt", "must be null exactly when baseline_accuracy is")
        want_curve = want["average_accuracy_curve"]
        if len(curve) != T or not np.allclose(curve, want_curve, rtol=0, atol=_TOLERANCE):
            raise _fail(
                source, f"{where}.average_accuracy_curve", "does not match the accuracy matrix"
            )
        for key in _SUMMARY_KEYS:
            if want[key] is not None and abs(m[key] - want[key]) > _TOLERANCE:
                raise _fail(
                    source,
                    f"{where}.{key}",
                    f"is {m[key]!r} but the accuracy matrix gives {want[key]!r}",
                )
    return T


def _check_seed_stats(m: Mapping[str, Any], source: str, where: str, check_summary: bool) -> None:
    """Check the optional ``mean``, ``std`` and ``seeds`` of a several-seed entry."""
    for key in ("mean", "std"):
        if key not in m:
            continue
        stats = m[key]
        if not isinstance(stats, Mapping):
            raise _fail(source, f"{where}.{key}", "must be an object {metric: number or null}")
        for name, v in stats.items():
            if v is not None and not _is_number(v):
                raise _fail(source, f"{where}.{key}.{name}", f"must be a number or null, got {v!r}")
    seeds = m.get("seeds")
    if seeds is None:
        return
    if not isinstance(seeds, Mapping) or not seeds:
        raise _fail(source, f"{where}.seeds", "must be a non-empty object {seed: result}")
    for s, e in seeds.items():
        _check_method(e, source, f"{where}.seeds.{s}", check_summary)


def _check_overlap(o: Any, source: str, where: str) -> None:
    if not isinstance(o, Mapping) or "layers" not in o or "curves" not in o:
        raise _fail(source, where, 'must be an object with "layers" and "curves"')
    layers = o["layers"]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise _fail(source, f"{where}.layers", "must be a non-empty list of layer names")
    if not all(isinstance(x, str) for x in layers):
        raise _fail(source, f"{where}.layers", "must be a list of strings")
    curves = o["curves"]
    if not isinstance(curves, (list, tuple)) or not curves:
        raise _fail(source, f"{where}.curves", "must be a non-empty list")
    for k, c in enumerate(curves):
        here = f"{where}.curves[{k}]"
        if not isinstance(c, Mapping) or not isinstance(c.get("label"), str):
            raise _fail(source, here, 'must be an object with a string "label"')
        _fractions(c.get("overlap"), source, f"{here}.overlap", (len(layers),))


def _check_methods(results: Any, source: str, check_summary: bool) -> None:
    if not isinstance(results, Mapping):
        raise _fail(source, "the top level", "must be an object")
    methods = results.get("methods")
    if methods is None:
        raise _fail(source, "methods", "is missing")
    if not isinstance(methods, Mapping) or not methods:
        raise _fail(source, "methods", "must be a non-empty object {method name: result}")
    for name, m in methods.items():
        if not isinstance(name, str) or not name:
            raise _fail(source, "methods", f"has an invalid method name {name!r}")
        _check_method(m, source, f"methods.{name}", check_summary)


def validate_results(results: Mapping[str, Any], *, source: str = "results") -> None:
    """Check the structure of a results dict (see the module docstring).

    The summary numbers must also agree with each accuracy matrix (to 1e-6).

    Args:
        results: The results, as :func:`read_results` returns or :func:`write_results` takes.
        source: What to call it in error messages (e.g. the file name).

    Raises:
        ValueError: Naming the missing or malformed key, e.g. ``"results.json:
            methods.ewc.accuracy_matrix is not a square matrix ..."``.
    """
    _check_methods(results, source, check_summary=True)
    for key in ("config", "versions"):
        if key not in results:
            raise _fail(source, key, "is missing")
        if not isinstance(results[key], Mapping):
            raise _fail(source, key, "must be an object")
    if results.get("fisher_overlap") is not None:
        _check_overlap(results["fisher_overlap"], source, "fisher_overlap")


# --- files --------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic | torch.Tensor | np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(
        f"cannot write a {type(obj).__name__} to results.json; convert it to a number, "
        "string, list or dict first"
    )


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_results(results: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Validate ``results`` and write ``results.json``, ``results.csv`` and ``curves.csv``.

    Each file is written atomically (a temporary file renamed over the target), so a crash
    never leaves a half-written file. ``after_task`` and ``eval_task`` count from 0;
    ``curves.csv`` holds every task at every evaluation point (also tasks not trained yet)
    and no rows for methods without curves.

    Args:
        results: The results (see the module docstring).
        out_dir: Directory to write into; created if missing.

    Returns:
        ``{"json": path, "csv": path, "curves": path}``.

    Raises:
        ValueError: If ``results`` is malformed (nothing is written then).
        TypeError: If ``config`` holds something JSON cannot represent.
    """
    validate_results(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, default=_jsonable, ensure_ascii=False) + "\n"
    rows, curve_rows = [], []
    for name, m in results["methods"].items():
        for i, row in enumerate(m["accuracy_matrix"]):
            rows += [(name, i, j, float(acc)) for j, acc in enumerate(row)]
        if m["curves"] is not None:
            c = m["curves"]
            for it, accs in zip(c["iteration"], c["accuracy"], strict=True):
                curve_rows += [(name, int(it), j, float(acc)) for j, acc in enumerate(accs)]
    paths = {"json": out / "results.json", "csv": out / "results.csv", "curves": out / "curves.csv"}
    _write_atomic(paths["json"], text)
    _write_atomic(paths["csv"], _csv(("method", "after_task", "eval_task", "accuracy"), rows))
    header = ("method", "iteration", "eval_task", "accuracy")
    _write_atomic(paths["curves"], _csv(header, curve_rows))
    return paths


def read_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a ``results.json``.

    Args:
        path: The file, or the directory that holds ``results.json``.

    Returns:
        The results dict.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not JSON, or a key is missing or malformed; the message starts
            with the file name and names the key, e.g. ``"results.json:
            methods.ewc.accuracy_matrix is not a square matrix ..."``.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e}); was the run interrupted?") from None
    validate_results(data, source=str(p))
    return data


def _pct(v: float | None, signed: bool = False, std: float | None = None) -> str:
    if v is None:
        return "—"
    text = f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"
    return text if std is None else f"{text} ± {100 * std:.1f}"


def _stat(m: Mapping[str, Any], key: str, signed: bool = False) -> str:
    """``m[key]``, or over several seeds its mean ± std."""
    mean, std = m.get("mean"), m.get("std")
    if isinstance(mean, Mapping) and key in mean and isinstance(std, Mapping):
        return _pct(mean[key], signed, std.get(key))
    return _pct(m[key], signed)


def format_table(results: Mapping[str, Any]) -> str:
    """Format the methods' summaries as a plain-text table, one row per method.

    Columns: method, λ, final average accuracy, BWT, FWT and forgetting, all in percent (BWT
    and FWT in signed percentage points); ``—`` marks a missing λ or FWT. Over several seeds
    each cell is ``mean ± std`` (sample standard deviation) and a column gives the seeds.

    Args:
        results: The results (only ``"methods"`` is used).

    Returns:
        The table, without a trailing newline.
    """
    _check_methods(results, "results", check_summary=False)
    header: tuple[str, ...] = ("method", "λ", "avg acc %", "BWT %", "FWT %", "forgetting %")
    n_seeds = max(len(m.get("seeds") or {}) for m in results["methods"].values())
    if n_seeds > 1:
        header += ("seeds",)
    rows = [header]
    for name, m in results["methods"].items():
        lam = "—" if m["lam"] is None else f"{m['lam']:g}"
        row: tuple[str, ...] = (
            name,
            lam,
            _stat(m, "average_accuracy"),
            _stat(m, "bwt", signed=True),
            _stat(m, "fwt", signed=True),
            _stat(m, "forgetting"),
        )
        if n_seeds > 1:
            row += (str(len(m.get("seeds") or {})),)
        rows.append(row)
    widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
