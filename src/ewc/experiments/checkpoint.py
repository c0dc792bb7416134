"""Checkpoints of nested training state as safetensors + JSON (nothing is pickled).

A state is any tree of dicts (str or int keys), lists, tuples, tensors and JSON scalars, e.g.
``{"model": model.state_dict(), "optimizer": opt.state_dict(), "ewc": reg.state_dict(),
"rng": torch.get_rng_state()}``. Tensors go into the safetensors body; the tree's shape, with
each tensor replaced by a reference, goes into the header's metadata as JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["save_checkpoint", "load_checkpoint"]

_KEY = "ewc-checkpoint"


def _encode(node: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(node, Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = node.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(node, dict):
        return {"__dict__": [[k, _encode(v, tensors)] for k, v in node.items()]}
    if isinstance(node, (list, tuple)):
        kind = "__tuple__" if isinstance(node, tuple) else "__list__"
        return {kind: [_encode(v, tensors) for v in node]}
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise TypeError(f"cannot checkpoint a value of type {type(node).__name__}")


def _decode(node: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__dict__" in node:
            return {k: _decode(v, tensors) for k, v in node["__dict__"]}
        if "__tuple__" in node:
            return tuple(_decode(v, tensors) for v in node["__tuple__"])
        if "__list__" in node:
            return [_decode(v, tensors) for v in node["__list__"]]
        raise ValueError(f"malformed checkpoint node with keys {sorted(node)}")
    return node


def save_checkpoint(path: str | os.PathLike[str], state: Any) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    tree = _encode(state, tensors)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={_KEY: json.dumps(tree)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Read a state written by :func:`save_checkpoint`; ``ValueError`` if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if raw is None:
        raise ValueError(f"{path}: a safetensors file without ewc checkpoint metadata")
    try:
        return _decode(json.loads(raw), tensors)
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path}: corrupted checkpoint metadata ({e})") from e


def rng_state() -> dict[str, Tensor]:
    """Return the global torch RNG state (CPU, and CUDA when available)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Tensor]) -> None:
    """Restore a state from :func:`rng_state`."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
