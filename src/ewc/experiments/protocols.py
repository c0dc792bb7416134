"""Published protocols as JSON files in ``configs/``, and the comparison ``ewc reproduce`` prints.

A protocol file (``configs/NAME.json``) holds::

    {
      "name": "hsu2018-split-mnist-task",          # = the file name without .json
      "title": "...", "reference": "...",           # what is reproduced, and where from
      "code": "...",                                # optional: where the hyperparameters are from
      "notes": ["...", ...],                        # conversions (λ convention), deviations
      "config": {...},                              # an ewc.experiments.trainer.Config
      "published": {                                # the published numbers (or {})
        "metric": "average_accuracy",               # a summary key of results.json
        "unit": "%",
        "spread": "std over 10 runs",               # what the ± means
        "values": {"finetune": [93.46, 2.01], ...}, # method -> [mean, spread or null]
        "labels": {"finetune": "Adam"}              # optional: the paper's names
      }
    }

Every key is checked: unknown keys, a config the trainer rejects, or published values for a
method the config does not run are errors that name the file and the key.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .trainer import METHODS, Config

__all__ = ["Protocol", "config_dir", "list_protocols", "load_protocol", "compare"]

_KEYS = {"name", "title", "reference", "code", "notes", "config", "published"}
_REQUIRED = {"name", "title", "reference", "config", "published"}
_PUBLISHED_KEYS = {"metric", "unit", "spread", "values", "labels", "approximate"}
_METRICS = ("average_accuracy", "bwt", "fwt", "forgetting")


@dataclass(frozen=True)
class Protocol:
    """A validated protocol file (see the module docstring)."""

    name: str
    title: str
    reference: str
    config: dict[str, Any]
    published: dict[str, Any]
    notes: tuple[str, ...] = ()
    code: str | None = None
    path: Path | None = None

    def make_config(self, **overrides: Any) -> Config:
        """Return the trainer's :class:`Config`, with ``overrides`` (``None`` values ignored)."""
        d = dict(self.config)
        d.update({k: v for k, v in overrides.items() if v is not None})
        if "iterations" in overrides and overrides["iterations"] is not None:
            d["epochs"] = None
        return Config.from_dict(d)


def config_dir() -> Path:
    """Return where the protocol files are: ``$EWC_CONFIGS``, else the ones shipped with ewc.

    The shipped ones are package data (``ewc/experiments/configs/``, which a checkout's
    ``configs/`` links to), so ``ewc reproduce`` works from an installed wheel too.
    """
    env = os.environ.get("EWC_CONFIGS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "configs"


def list_protocols(directory: str | os.PathLike[str] | None = None) -> list[Protocol]:
    """Return every protocol in ``directory`` (default :func:`config_dir`), sorted by name.

    Methods this installation lacks are allowed (``ewc reproduce --list`` names them).
    """
    d = Path(directory) if directory is not None else config_dir()
    if not d.is_dir():
        raise FileNotFoundError(
            f"no protocol directory {d}: set EWC_CONFIGS to a directory of protocol files"
        )
    return [load_protocol(p, check_methods=False) for p in sorted(d.glob("*.json"))]


def _fail(where: str, problem: str) -> ValueError:
    return ValueError(f"{where}: {problem}")


def load_protocol(name_or_path: str | os.PathLike[str], *, check_methods: bool = True) -> Protocol:
    """Load and validate a protocol by name (in :func:`config_dir`) or path.

    Args:
        name_or_path: ``"hsu2018-split-mnist-task"`` or a path to a JSON file.
        check_methods: Also require every method to be available in this installation.

    Raises:
        FileNotFoundError: No such protocol (the message lists the known names).
        ValueError: A malformed file, naming the key.
    """
    p = Path(name_or_path)
    if p.suffix != ".json":
        p = config_dir() / f"{name_or_path}.json"
        if not p.is_file():
            names = sorted(q.stem for q in config_dir().glob("*.json"))
            raise FileNotFoundError(f"no protocol {str(name_or_path)!r}; known: {names}")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise _fail(str(p), f"not valid JSON ({e})") from None
    where = str(p)
    if not isinstance(raw, dict):
        raise _fail(where, "must be a JSON object")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise _fail(where, f"unknown keys {unknown}; known: {sorted(_KEYS)}")
    missing = sorted(_REQUIRED - set(raw))
    if missing:
        raise _fail(where, f"missing keys {missing}")
    for key in ("name", "title", "reference"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise _fail(where, f"{key!r} must be a non-empty string")
    if raw["name"] != p.stem:
        raise _fail(where, f"'name' is {raw['name']!r} but the file is {p.name}")
    notes = raw.get("notes", [])
    notes = [notes] if isinstance(notes, str) else notes
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise _fail(where, "'notes' must be a string or a list of strings")
    if not isinstance(raw["config"], dict):
        raise _fail(where, "'config' must be an object of trainer options")
    try:
        cfg = Config.from_dict(dict(raw["config"]))
        (cfg if check_methods else _without_missing_methods(cfg)).validate()
    except (TypeError, ValueError) as e:
        raise _fail(f"{where}: config", str(e)) from None
    published = _check_published(raw["published"], cfg.methods, f"{where}: published")
    return Protocol(
        name=raw["name"],
        title=raw["title"],
        reference=raw["reference"],
        config=dict(raw["config"]),
        published=published,
        notes=tuple(notes),
        code=raw.get("code"),
        path=p,
    )


def _without_missing_methods(cfg: Config) -> Config:
    """Return ``cfg`` without the methods this installation lacks (to validate the rest)."""
    from dataclasses import replace

    keep = [m for m in cfg.methods if m in METHODS] or ["finetune"]
    return replace(
        cfg,
        methods=keep,
        lam={m: v for m, v in cfg.lam.items() if m in METHODS},
        method_options={m: v for m, v in cfg.method_options.items() if m in METHODS},
    )


def _check_published(pub: Any, methods: list[str], where: str) -> dict[str, Any]:
    if not isinstance(pub, dict):
        raise _fail(where, "must be an object (or {} when there is no number to compare)")
    if not pub:
        return {}
    unknown = sorted(set(pub) - _PUBLISHED_KEYS)
    if unknown:
        raise _fail(where, f"unknown keys {unknown}; known: {sorted(_PUBLISHED_KEYS)}")
    if pub.get("metric") not in _METRICS:
        raise _fail(where, f"'metric' must be one of {_METRICS}, got {pub.get('metric')!r}")
    if pub.get("unit") not in ("%", "fraction"):
        raise _fail(where, "'unit' must be '%' or 'fraction'")
    values = pub.get("values")
    if not isinstance(values, dict) or not values:
        raise _fail(where, "'values' must map method names to [mean, spread or null]")
    for m, v in values.items():
        if m not in methods:
            raise _fail(where, f"values names {m!r}, which the config does not run ({methods})")
        ok = isinstance(v, list) and len(v) == 2 and _num(v[0]) and (v[1] is None or _num(v[1]))
        if not ok:
            raise _fail(f"{where}.values.{m}", f"must be [mean, spread or null], got {v!r}")
    labels = pub.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(x, str) for x in labels.values()):
        raise _fail(where, "'labels' must map method names to strings")
    return dict(pub)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def compare(protocol: Protocol, results: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """Our numbers beside the published ones: a text table and its rows.

    Each row: ``method``, ``label``, ``ours`` (mean), ``ours_std`` (or ``None``), ``seeds``,
    ``published``, ``published_spread``, ``difference`` (ours − published), in the protocol's
    unit.
    """
    pub = protocol.published
    metric = pub.get("metric", "average_accuracy")
    scale = 100.0 if pub.get("unit", "%") == "%" else 1.0
    unit = "%" if scale == 100.0 else ""
    values = pub.get("values", {})
    labels = pub.get("labels", {})
    rows = []
    for method, m in results["methods"].items():
        mean, std = m.get("mean", {}), m.get("std", {})
        ours = mean.get(metric, m[metric]) if isinstance(mean, Mapping) else m[metric]
        ours_std = std.get(metric) if isinstance(std, Mapping) else None
        ref = values.get(method)
        row = {
            "method": method,
            "label": labels.get(method, method),
            "lam": m["lam"],
            "ours": None if ours is None else ours * scale,
            "ours_std": None if ours_std is None else ours_std * scale,
            "seeds": len(m.get("seeds") or {}) or 1,
            "published": None if ref is None else ref[0],
            "published_spread": None if ref is None else ref[1],
        }
        row["difference"] = (
            None
            if row["ours"] is None or row["published"] is None
            else row["ours"] - row["published"]
        )
        rows.append(row)

    def pm(v: float | None, s: float | None) -> str:
        if v is None:
            return "—"
        return f"{v:.2f}" if s is None else f"{v:.2f} ± {s:.2f}"

    header = ("method", "paper's name", "λ", f"ours {unit}", "seeds", f"published {unit}", "diff")
    table = [header]
    for r in rows:
        table.append(
            (
                r["method"],
                r["label"],
                "—" if r["lam"] is None else f"{r['lam']:g}",
                pm(r["ours"], r["ours_std"]),
                str(r["seeds"]),
                pm(r["published"], r["published_spread"]),
                "—" if r["difference"] is None else f"{r['difference']:+.2f}",
            )
        )
    widths = [max(len(t[k]) for t in table) for k in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip() for t in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    spread = pub.get("spread")
    foot = f"{metric} ({unit or 'fraction'}); ours: mean ± sample std over seeds"
    if spread:
        foot += f"; published ±: {spread}"
    if pub.get("approximate"):
        foot += "; published values read off a figure (approximate)"
    return "\n".join([*lines, "", foot]), rows


def available_methods() -> list[str]:
    """Return the methods this installation's trainer knows."""
    return sorted(METHODS)
