"""Saving and loading EWC state: safetensors for tensors, JSON for metadata, nothing pickled."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .likelihoods import KINDS

if TYPE_CHECKING:
    from .penalty import EWC

_META_KEY = "ewc"


def save_state(state: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``{"tensors": ..., "metadata": ...}`` to ``path`` atomically (temp file + rename)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state["tensors"].items()}
    meta = {_META_KEY: json.dumps(state["metadata"], sort_keys=True)}
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


INDEX = "ewc.safetensors.index.json"
_SHARD_BYTES = 1 << 30


def _plan(tensors: Mapping[str, Tensor], limit: int) -> list[list[str]]:
    """Group tensor names into files of at most ``limit`` bytes (a larger tensor alone)."""
    files: list[list[str]] = [[]]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if files[-1] and size + n > limit:
            files.append([])
            size = 0
        files[-1].append(k)
        size += n
    return files


def save_sharded(
    state: Mapping[str, Any], path: str | os.PathLike[str], max_shard_bytes: int | None = None
) -> None:
    """Write the Hugging Face sharded layout: ``path/ewc-0000i-of-0000n.safetensors`` + index.

    Tensors may be DTensors: each is gathered (``full_tensor()``, every rank takes part) one
    at a time, and rank 0 holds at most one file's tensors before writing it. The directory is
    written under a temporary name and renamed into place. Under ``torch.distributed`` a
    failure on the writing rank is raised on every rank (:class:`ewc.distributed.RankFailure`).
    """
    import shutil

    import torch.distributed as dist
    from safetensors.torch import save_file

    from . import _fsdp
    from .distributed import resolve

    reduction = resolve(None)
    writer = reduction is None or reduction.rank == 0
    tensors: Mapping[str, Tensor] = state["tensors"]
    files = _plan(tensors, max_shard_bytes or _SHARD_BYTES)
    names = [f"ewc-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    failure: BaseException | None = None
    if writer:
        try:
            os.makedirs(tmp, exist_ok=False)
        except OSError as e:
            failure = e
    for name, keys in zip(names, files, strict=True):  # every rank gathers, in the same order
        part = {k: _fsdp.total(tensors[k]).detach().contiguous().cpu() for k in keys}
        if writer and failure is None:
            try:
                save_file(part, os.path.join(tmp, name), metadata={"format": "pt"})
            except Exception as e:  # noqa: BLE001 - keep gathering with the others
                failure = e
        del part
    if writer and failure is None:
        try:
            _finish(state, tensors, files, names, tmp, path)
        except Exception as e:  # noqa: BLE001 - raised below, on every rank
            failure = e
    if writer and os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    if reduction is not None and dist.is_initialized():
        reduction.agree(failure)
    elif failure is not None:
        raise failure


def _finish(
    state: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    files: list[list[str]],
    names: list[str],
    tmp: str,
    path: str,
) -> None:
    """Write the index into ``tmp`` and move ``tmp`` to ``path`` (replacing a directory)."""
    import shutil

    index = {
        "metadata": {
            "total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
            _META_KEY: json.dumps(state["metadata"], sort_keys=True),
        },
        "weight_map": {k: n for n, keys in zip(names, files, strict=True) for k in keys},
    }
    with open(os.path.join(tmp, INDEX), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
    old = f"{path}.old-{os.getpid()}"
    if os.path.isdir(path):
        os.replace(path, old)
    elif os.path.exists(path):
        raise FileExistsError(f"{path!r} exists and is not a directory")
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _load_sharded(path: str) -> dict[str, Any]:
    """Read the layout of :func:`save_sharded` (``path`` is the directory or its index)."""
    from safetensors import safe_open

    folder = path if os.path.isdir(path) else os.path.dirname(path)
    index_path = os.path.join(folder, INDEX) if os.path.isdir(path) else path
    try:
        with open(index_path) as f:
            index = json.load(f)
        weight_map = index["weight_map"]
        meta_raw = index["metadata"][_META_KEY]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{index_path!r} is not an ewc sharded-state index ({type(e).__name__}: {e})"
        ) from e
    tensors: dict[str, Tensor] = {}
    for name in sorted(set(weight_map.values())):
        file = os.path.join(folder, os.path.basename(name))
        try:
            with safe_open(file, framework="pt") as f:
                keys = set(f.keys())
                want = {k for k, v in weight_map.items() if v == name}
                if want - keys:
                    raise ValueError(f"lacks {sorted(want - keys)[:3]} listed in the index")
                tensors.update({k: f.get_tensor(k) for k in sorted(want)})
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"shard {file!r} of the EWC state is unreadable: {e}") from e
    try:
        meta = json.loads(meta_raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{index_path!r} has malformed ewc metadata: {e}") from e
    return {"tensors": tensors, "metadata": meta}


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a file written by :func:`save_state` or a directory by :func:`save_sharded`.

    Raises ``ValueError`` if it is neither.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(".index.json"):
        return _load_sharded(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no EWC state file at {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            meta_raw = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(
            f"{path!r} is not a readable safetensors file ({type(e).__name__}: {e}); it may be "
            "truncated or corrupted, or not written by ewc"
        ) from e
    if meta_raw is None:
        raise ValueError(
            f"{path!r} is a safetensors file but has no ewc metadata; it was not written by "
            "EWC.save()"
        )
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} has malformed ewc metadata: {e}") from e
    return {"tensors": tensors, "metadata": meta}


def parse_state(state: Mapping[str, Any], ewc: EWC) -> tuple[Any, ...]:
    """Validate ``state`` against ``ewc`` and its model; return the fields to assign."""
    from .penalty import FORMAT_VERSION, MODES, _check_gamma, _check_lam

    try:
        tensors: Mapping[str, Tensor] = state["tensors"]
        meta: Mapping[str, Any] = state["metadata"]
    except (KeyError, TypeError) as e:
        raise ValueError("an EWC state needs 'tensors' and 'metadata' entries") from e
    if not isinstance(meta, Mapping) or meta.get("format") != "ewc":
        raise ValueError("this is not an ewc state (metadata 'format' is not 'ewc')")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"unsupported ewc state format_version {version!r}; this ewc reads version "
            f"{FORMAT_VERSION} (upgrade the package to read newer files)"
        )
    check_method(meta, type(ewc).__name__)
    mode = meta.get("mode")
    if mode not in MODES:
        raise ValueError(f"the state has an unknown mode {mode!r}; expected one of {MODES}")
    try:
        lam, gamma = _check_lam(meta.get("lam")), _check_gamma(meta.get("gamma"))
    except ValueError as e:
        raise ValueError(f"the state's metadata: {e}") from e
    kind = meta.get("kind", ewc.kind)
    kinds = getattr(ewc, "state_kinds", KINDS)  # MAS and SI have one kind of their own
    if kind not in kinds:
        raise ValueError(f"the state has an unknown kind {kind!r}; expected one of {kinds}")
    tasks = _check_tasks(meta)
    offset = _check_offset(tensors, mode)

    params = dict(ewc.model.named_parameters())
    prec = {k[len("precision.") :]: v for k, v in tensors.items() if k.startswith("precision.")}
    anch = {k[len("anchor.") :]: v for k, v in tensors.items() if k.startswith("anchor.")}
    known = {"offset"} | {f"precision.{n}" for n in prec} | {f"anchor.{n}" for n in anch}
    stray = sorted(set(tensors) - known)
    if stray:
        raise ValueError(f"the state has unexpected tensors {stray[:5]}")
    if set(prec) != set(anch):
        raise ValueError(
            f"the state's precision and anchor tensors cover different parameters: "
            f"{sorted(set(prec) ^ set(anch))[:5]}"
        )
    selected = ewc._diagonal_params()
    if tasks and not prec and selected:
        raise ValueError("the state lists tasks but holds no tensors")
    if prec and not tasks:
        raise ValueError(
            "the state holds precision tensors but its 'tasks' list is empty: the file is corrupt"
        )
    unknown = sorted(set(prec) - set(params))
    if unknown:
        raise ValueError(
            f"the state has parameters the model lacks: {unknown[:5]}; was it saved for "
            "another model?"
        )
    missing = sorted(n for n in selected if n not in prec)
    if prec and missing:
        raise ValueError(
            f"the model has trainable parameters the state lacks: {missing[:5]}; was it saved "
            "for another model, or with another params= selection (pass the same params=)?"
        )
    outside = sorted(n for n in prec if n not in selected)
    if outside:
        raise ValueError(
            f"the state covers parameters outside this object's params= selection (or frozen "
            f"ones): {outside[:5]}; pass the params= it was saved with"
        )
    precision: dict[str, Tensor] = {}
    anchor: dict[str, Tensor] = {}
    for n, p in params.items():
        if n not in prec:
            continue
        for label, t in (("precision", prec[n]), ("anchor", anch[n])):
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(
                    f"{label} of {n!r} has shape {tuple(t.shape)} but the model's parameter has "
                    f"shape {tuple(p.shape)}"
                )
            want = (ewc.fisher_dtype or p.dtype) if label == "precision" else p.dtype
            if t.dtype != want:
                raise ValueError(
                    f"{label} of {n!r} has dtype {t.dtype} but {want} is expected (the "
                    f"parameter's dtype is {p.dtype}, fisher_dtype={ewc.fisher_dtype}); cast the "
                    "model, or pass the fisher_dtype it was saved with"
                )
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{label} of {n!r} has non-finite values: the file is corrupt")
        if bool((prec[n] < 0).any()):
            raise ValueError(f"precision of {n!r} has negative values: the file is corrupt")
        precision[n] = prec[n].detach().clone().to(p.device)
        anchor[n] = anch[n].detach().clone().to(p.device)
    return lam, gamma, mode, kind, tasks, precision, anchor, offset


def check_method(meta: Mapping[str, Any], name: str) -> None:
    """Raise ``ValueError`` unless the state was saved by the class ``name``."""
    if not isinstance(meta, Mapping):
        return  # parse_state names what is wrong with it
    method = meta.get("method")
    if method != name:
        raise ValueError(f"the state was saved by {method!r} but is being loaded into {name!r}")


_TASK_FIELDS = {"n_samples", "kind"}


def _check_tasks(meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Return a copy of the metadata's task records, each checked; name the first bad one."""
    tasks = meta.get("tasks")
    if not isinstance(tasks, list):
        raise ValueError(f"the state's metadata 'tasks' must be a list, got {type(tasks).__name__}")
    out = []
    for i, t in enumerate(tasks):
        if not isinstance(t, Mapping):
            raise ValueError(f"task record {i} of the state is a {type(t).__name__}, not a dict")
        extra = sorted(set(t) - _TASK_FIELDS)
        if extra:
            raise ValueError(f"task record {i} of the state has unknown fields {extra}")
        n = t.get("n_samples")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
            raise ValueError(f"task record {i} has n_samples={n!r}; expected an int > 0 or null")
        if not isinstance(t.get("kind"), (str, type(None))):
            raise ValueError(f"task record {i} has kind={t.get('kind')!r}; expected a str or null")
        out.append(dict(t))
    num = meta.get("num_tasks", len(out))
    if num != len(out):
        raise ValueError(f"the state says num_tasks={num!r} but lists {len(out)} task records")
    return out


def _check_offset(tensors: Mapping[str, Tensor], mode: str) -> Tensor:
    """Return the merged quadratic's constant ``c`` (float64), checked: finite, >= 0."""
    t = tensors.get("offset")
    if not isinstance(t, Tensor) or t.shape != () or not t.is_floating_point():
        raise ValueError("the state has no scalar floating-point 'offset' tensor")
    offset = t.detach().to(torch.float64).clone()
    value = float(offset)
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"the state's offset is {value!r}; the constant of a sum of quadratics is finite and "
            ">= 0: the file is corrupt"
        )
    if mode == "online" and value != 0.0:
        raise ValueError(f"the state's offset is {value!r} but mode='online' keeps no offset")
    return offset


def parse_l2_anchor(state: Mapping[str, Any]) -> str:
    """Return the ``anchor`` of an :class:`~ewc.L2` state (``"all"`` for files without one)."""
    meta = state.get("metadata") if isinstance(state, Mapping) else None
    if not isinstance(meta, Mapping):
        raise ValueError("an EWC state needs 'tensors' and 'metadata' entries")
    anchor = meta.get("anchor", "all")
    if anchor not in ("all", "latest"):
        raise ValueError(
            f"the state has an unknown L2 anchor {anchor!r}; expected 'all' or 'latest'"
        )
    return str(anchor)
