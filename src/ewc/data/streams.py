"""Task streams for continual learning: permuted, rotated and split MNIST-like benchmarks.

A :class:`Stream` is a sequence of :class:`Task`. Both are cheap: a task holds references to
the base :class:`~ewc.data.Splits` (shared by all tasks) plus what defines it (a permutation, an
angle, a class subset and a label map). Its tensors are computed on first access and cached on
that ``Task`` object only; ``stream[t]`` builds a fresh ``Task`` each time. Iterating
``for task in stream`` therefore holds one task's tensors at a time (10 permuted tasks of the
full MNIST would take 1.9 GB at once).

Scenarios (van de Ven & Tolias, 2019, *Three scenarios for continual learning*):

* ``"task"`` — task-incremental: labels restart at 0 in each task, and ``task.task_id`` tells a
  multi-head model which head (of ``task.num_outputs`` units) to use;
* ``"domain"`` — domain-incremental: the same labels ``0 .. num_outputs - 1`` in every task and
  one shared head;
* ``"class"`` — class-incremental: labels are unique across the stream (split: the original
  digits; permuted/rotated: ``digit + 10 * task_id``) and one head of ``num_outputs`` units.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import overload

import numpy as np
import torch
from torch import Tensor

from .sources import Splits, load_source
from .transforms import pad_images, permute_pixels, random_permutations, rotate_images, to_float

__all__ = [
    "BENCHMARKS",
    "SCENARIOS",
    "Stream",
    "Task",
    "make_stream",
    "permuted_tasks",
    "rotated_tasks",
    "split_tasks",
]

BENCHMARKS = ("permuted-mnist", "rotated-mnist", "split-mnist")
SCENARIOS = ("task", "domain", "class")


@dataclass(frozen=True, eq=False)
class Task:
    """One task of a stream; its tensors are built lazily from the shared base data.

    The ``x_*`` / ``y_*`` attributes are computed on first access and cached on this object:
    ``x_*`` is ``float32 (N, 784)`` in ``[0, 1]`` (flattened row-major), ``y_*`` is ``int64
    (N,)`` in ``0 .. num_outputs - 1``.

    Attributes:
        name: E.g. ``"permuted-mnist/3"``.
        task_id: Position in the stream, from 0.
        scenario: ``"task"``, ``"domain"`` or ``"class"``.
        classes: Original classes of the base data present in this task.
        num_outputs: Output units the labels index: the task's head (``"task"``), the shared
            head (``"domain"``, ``"class"``).
        base: The shared base data.
        label_map: ``int64 (num_classes,)``; ``y = label_map[original label]`` (-1 for classes
            not in the task).
        permutation: ``int64 (784,)`` pixel permutation, or ``None`` (none, or the identity);
            ``(H + 2 pad) (W + 2 pad)`` long with padding.
        angle: Counter-clockwise rotation in degrees, or ``None``.
        pad: Zero pixels added on every side before rotating and permuting (2 turns MNIST's
            28×28 into the 32×32 of Hsu et al. 2018); ``x_*`` is then ``(N, (28 + 2 pad)²)``.
        normalize: ``(mean, std)``: inputs become ``(x − mean) / std`` after padding (Hsu et
            al.: ``(0.1, 0.2752)`` for 32×32 MNIST), or ``None`` (inputs stay in ``[0, 1]``).
    """

    name: str
    task_id: int
    scenario: str
    classes: tuple[int, ...]
    num_outputs: int
    base: Splits = field(repr=False)
    label_map: np.ndarray = field(repr=False)
    permutation: np.ndarray | None = field(default=None, repr=False)
    angle: float | None = None
    pad: int = 0
    normalize: tuple[float, float] | None = None

    def split(self, which: str) -> tuple[Tensor, Tensor]:
        """Return ``(x, y)`` of ``"train"``, ``"val"`` or ``"test"``, computed afresh (uncached)."""
        x, y = self.base.split(which)
        if len(self.classes) < self.base.num_classes:
            keep = np.isin(y, self.classes)
            x, y = x[keep], y[keep]
        images = to_float(x)
        if self.pad:
            images = pad_images(images, self.pad)
        if self.angle is not None:
            images = rotate_images(images, self.angle)
        flat = images.reshape(images.shape[0], images.shape[1] * images.shape[2])
        if self.permutation is not None:
            flat = permute_pixels(flat, self.permutation)
        if self.normalize is not None:
            mean, std = self.normalize
            flat = (flat - mean) / std
        labels = torch.as_tensor(self.label_map[y], dtype=torch.int64)
        return flat.contiguous(), labels

    @cached_property
    def _train(self) -> tuple[Tensor, Tensor]:
        return self.split("train")

    @cached_property
    def _val(self) -> tuple[Tensor, Tensor]:
        return self.split("val")

    @cached_property
    def _test(self) -> tuple[Tensor, Tensor]:
        return self.split("test")

    @property
    def x_train(self) -> Tensor:
        """``float32 (N_train, 784)`` training inputs."""
        return self._train[0]

    @property
    def y_train(self) -> Tensor:
        """``int64 (N_train,)`` training labels."""
        return self._train[1]

    @property
    def x_val(self) -> Tensor:
        """``float32 (N_val, 784)`` validation inputs."""
        return self._val[0]

    @property
    def y_val(self) -> Tensor:
        """``int64 (N_val,)`` validation labels."""
        return self._val[1]

    @property
    def x_test(self) -> Tensor:
        """``float32 (N_test, 784)`` test inputs."""
        return self._test[0]

    @property
    def y_test(self) -> Tensor:
        """``int64 (N_test,)`` test labels."""
        return self._test[1]


class Stream(Sequence[Task]):
    """An ordered, immutable sequence of tasks over one base dataset.

    Indexing and iterating build fresh :class:`Task` objects (cheap; their tensors are computed
    on first access), so memory is bounded by the tasks the caller keeps.

    Args:
        name: Benchmark name.
        scenario: ``"task"``, ``"domain"`` or ``"class"``.
        tasks: The tasks, in order.

    Attributes:
        num_heads: ``len(self)`` for ``"task"`` (one head per task), else 1.
        num_outputs: Units per head.
    """

    def __init__(self, name: str, scenario: str, tasks: Sequence[Task]) -> None:
        if not tasks:
            raise ValueError("a stream needs at least one task")
        self.name = name
        self.scenario = scenario
        self._specs = [_spec(t) for t in tasks]
        self.base: Splits = tasks[0].base
        self.num_outputs = max(t.num_outputs for t in tasks)
        self.num_heads = len(tasks) if scenario == "task" else 1

    def __len__(self) -> int:
        return len(self._specs)

    @overload
    def __getitem__(self, i: int) -> Task: ...
    @overload
    def __getitem__(self, i: slice) -> list[Task]: ...
    def __getitem__(self, i: int | slice) -> Task | list[Task]:
        if isinstance(i, slice):
            return [Task(**s) for s in self._specs[i]]
        return Task(**self._specs[i])

    def __iter__(self) -> Iterator[Task]:
        for spec in self._specs:
            yield Task(**spec)

    def __repr__(self) -> str:
        return (
            f"Stream({self.name!r}, scenario={self.scenario!r}, {len(self)} tasks, "
            f"num_outputs={self.num_outputs}, num_heads={self.num_heads}, base={self.base!r})"
        )


def _spec(t: Task) -> dict[str, object]:
    return {
        "name": t.name,
        "task_id": t.task_id,
        "scenario": t.scenario,
        "classes": t.classes,
        "num_outputs": t.num_outputs,
        "base": t.base,
        "label_map": t.label_map,
        "permutation": t.permutation,
        "angle": t.angle,
        "pad": t.pad,
        "normalize": t.normalize,
    }


def _check_scenario(scenario: str) -> str:
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    return scenario


def _same_labels(base: Splits, t: int, n_tasks: int, scenario: str) -> tuple[np.ndarray, int]:
    """Label map and head size for tasks that all use every class (permuted, rotated)."""
    k = base.num_classes
    offset = k * t if scenario == "class" else 0
    width = k * n_tasks if scenario == "class" else k
    return np.arange(k, dtype=np.int64) + offset, width


def permuted_tasks(
    base: Splits,
    n_tasks: int = 10,
    *,
    seed: int = 0,
    first_identity: bool = True,
    scenario: str = "domain",
    unpermuted_task: int | None = None,
    pad: int = 0,
) -> Stream:
    """Permuted MNIST: each task applies one fixed, seeded pixel permutation to every image.

    Args:
        base: The base data.
        n_tasks: Number of tasks.
        seed: Seed of the permutations (see :func:`~ewc.data.random_permutations`).
        first_identity: Task 0 is the unpermuted data.
        scenario: ``"domain"`` (the EWC paper's setting), ``"task"`` or ``"class"``.
        unpermuted_task: The index of the unpermuted task (overrides ``first_identity``; the
            other tasks keep their permutations).
        pad: Zero padding on every side; the permutations then cover the padded image, as in
            van de Ven et al.'s and Hsu et al.'s 32×32 permuted MNIST.

    Returns:
        The :class:`Stream`.
    """
    _check_scenario(scenario)
    h, w = base.x_train.shape[1:]
    n_pixels = (h + 2 * pad) * (w + 2 * pad)
    perms = random_permutations(
        n_tasks, n_pixels, seed=seed, first_identity=first_identity and unpermuted_task is None
    )
    if unpermuted_task is not None:
        if not 0 <= unpermuted_task < n_tasks:
            raise ValueError(
                f"unpermuted_task must be a task index in 0..{n_tasks - 1}, got {unpermuted_task}"
            )
        perms[unpermuted_task] = np.arange(n_pixels, dtype=np.int64)
    tasks = []
    for t, perm in enumerate(perms):
        label_map, width = _same_labels(base, t, n_tasks, scenario)
        identity = bool((perm == np.arange(n_pixels)).all())
        tasks.append(
            Task(
                name=f"permuted-{base.name}/{t}",
                task_id=t,
                scenario=scenario,
                classes=tuple(range(base.num_classes)),
                num_outputs=width,
                base=base,
                label_map=label_map,
                permutation=None if identity else perm,
                pad=pad,
            )
        )
    return Stream(f"permuted-{base.name}", scenario, tasks)


def rotated_tasks(
    base: Splits,
    n_tasks: int = 10,
    *,
    angles: Sequence[float] | None = None,
    max_angle: float = 180.0,
    scenario: str = "domain",
) -> Stream:
    """Rotated MNIST: each task rotates every image by a fixed angle (counter-clockwise).

    Args:
        base: The base data.
        n_tasks: Number of tasks (ignored when ``angles`` is given).
        angles: Angles in degrees, one per task.
        max_angle: Without ``angles``: ``n_tasks`` angles evenly spaced over ``[0, max_angle]``
            (both ends included; a single task gets 0).
        scenario: ``"domain"``, ``"task"`` or ``"class"``.

    Returns:
        The :class:`Stream`.
    """
    _check_scenario(scenario)
    if angles is None:
        angles = np.linspace(0.0, max_angle, n_tasks).tolist() if n_tasks > 1 else [0.0] * n_tasks
    angles = [float(a) for a in angles]
    tasks = []
    for t, angle in enumerate(angles):
        label_map, width = _same_labels(base, t, len(angles), scenario)
        tasks.append(
            Task(
                name=f"rotated-{base.name}/{t}",
                task_id=t,
                scenario=scenario,
                classes=tuple(range(base.num_classes)),
                num_outputs=width,
                base=base,
                label_map=label_map,
                angle=angle,
            )
        )
    return Stream(f"rotated-{base.name}", scenario, tasks)


def split_tasks(
    base: Splits,
    n_tasks: int = 5,
    *,
    scenario: str = "task",
    groups: Sequence[Sequence[int]] | None = None,
) -> Stream:
    """Split MNIST: each task holds a disjoint subset of the classes (by default 0/1, ..., 8/9).

    Args:
        base: The base data.
        n_tasks: Number of tasks; without ``groups`` it must divide ``base.num_classes`` and the
            classes are cut into consecutive groups of equal size.
        scenario: ``"task"`` (labels = position in the group, one head per task), ``"domain"``
            (the same labels, one shared head) or ``"class"`` (original labels, one head over
            all ``base.num_classes`` classes).
        groups: Explicit class groups, e.g. ``[[0, 1], [2, 3]]``; disjoint and of equal size
            for ``"task"`` / ``"domain"``.

    Returns:
        The :class:`Stream`.
    """
    _check_scenario(scenario)
    k = base.num_classes
    if groups is None:
        if n_tasks < 1 or k % n_tasks:
            raise ValueError(f"n_tasks must divide the {k} classes, got {n_tasks}; or pass groups=")
        size = k // n_tasks
        groups = [list(range(i, i + size)) for i in range(0, k, size)]
    groups = [tuple(int(c) for c in g) for g in groups]
    flat = [c for g in groups for c in g]
    if not groups or any(not g for g in groups):
        raise ValueError(f"groups must be non-empty, got {groups}")
    if len(set(flat)) != len(flat) or min(flat) < 0 or max(flat) >= k:
        raise ValueError(f"groups must be disjoint classes in 0..{k - 1}, got {groups}")
    if scenario != "class" and len({len(g) for g in groups}) != 1:
        raise ValueError(f"scenario {scenario!r} needs groups of equal size, got {groups}")
    tasks = []
    for t, group in enumerate(groups):
        label_map = np.full(k, -1, dtype=np.int64)
        if scenario == "class":
            label_map[list(group)] = list(group)
            width = k
        else:
            label_map[list(group)] = np.arange(len(group))
            width = len(group)
        tasks.append(
            Task(
                name=f"split-{base.name}/{t}",
                task_id=t,
                scenario=scenario,
                classes=group,
                num_outputs=width,
                base=base,
                label_map=label_map,
            )
        )
    return Stream(f"split-{base.name}", scenario, tasks)


def make_stream(
    benchmark: str,
    *,
    source: str | Splits = "mnist5k",
    root: str | os.PathLike[str] | None = None,
    n_tasks: int | None = None,
    scenario: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    first_identity: bool = True,
    angles: Sequence[float] | None = None,
    max_angle: float = 180.0,
    groups: Sequence[Sequence[int]] | None = None,
    unpermuted_task: int | None = None,
    pad: int = 0,
    normalize: tuple[float, float] | None = None,
) -> Stream:
    """Build a continual-learning benchmark.

    Args:
        benchmark: ``"permuted-mnist"``, ``"rotated-mnist"`` or ``"split-mnist"`` (the base
            data need not be MNIST: ``source="fashion-mnist"`` works the same way).
        source: A :class:`~ewc.data.Splits`, or a name for :func:`~ewc.data.load_source`
            (default ``"mnist5k"``, the embedded offline digits; ``"mnist"``,
            ``"fashion-mnist"`` and ``"kmnist"`` read IDX files under ``root``).
        root: Directory of the IDX files.
        n_tasks: Number of tasks; default 10 (permuted, rotated) or 5 (split).
        scenario: ``"task"``, ``"domain"`` or ``"class"``; default ``"domain"`` (permuted,
            rotated) or ``"task"`` (split).
        seed: Seed of the task construction (permutations). The train/val/test split of a named
            source is always seeded with 0 — build a ``Splits`` with :func:`load_source` to
            choose it.
        val_fraction: Validation fraction for a named source.
        first_identity: Permuted: task 0 is unpermuted.
        angles: Rotated: explicit angles (degrees, counter-clockwise).
        max_angle: Rotated: angles evenly spaced over ``[0, max_angle]``.
        groups: Split: explicit class groups.
        unpermuted_task: Permuted: the index of the unpermuted task (overrides
            ``first_identity``).
        pad: Zero pixels on every side of each image (2: 28×28 → 32×32).
        normalize: ``(mean, std)`` applied to the (padded) inputs, or ``None``.

    Returns:
        The :class:`Stream`.

    Example:
        >>> stream = make_stream("split-mnist", scenario="class")
        >>> len(stream), stream.num_outputs, stream[1].classes
        (5, 10, (2, 3))
    """
    key = benchmark.strip().lower().replace("_", "-")
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")
    base = (
        source
        if isinstance(source, Splits)
        else load_source(source, root, val_fraction=val_fraction)
    )
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be an int >= 0 (zero pixels on each side), got {pad!r}")
    if normalize is not None:
        normalize = _check_normalize(normalize)
    if key == "split-mnist":
        stream = split_tasks(
            base, 5 if n_tasks is None else n_tasks, scenario=scenario or "task", groups=groups
        )
        return _with_inputs(stream, pad, normalize)
    n = 10 if n_tasks is None else n_tasks
    if n < 1:
        raise ValueError(f"n_tasks must be at least 1, got {n}")
    if key == "permuted-mnist":
        stream = permuted_tasks(
            base,
            n,
            seed=seed,
            first_identity=first_identity,
            scenario=scenario or "domain",
            unpermuted_task=unpermuted_task,
            pad=pad,
        )
        return _with_inputs(stream, pad, normalize)
    stream = rotated_tasks(
        base, n, angles=angles, max_angle=max_angle, scenario=scenario or "domain"
    )
    return _with_inputs(stream, pad, normalize)


def _check_normalize(normalize: Sequence[float]) -> tuple[float, float]:
    vals = tuple(float(v) for v in normalize)
    if len(vals) != 2 or not all(np.isfinite(vals)) or vals[1] <= 0:
        raise ValueError(f"normalize must be (mean, std) with std > 0, got {normalize!r}")
    return vals[0], vals[1]


def _with_inputs(stream: Stream, pad: int, normalize: tuple[float, float] | None) -> Stream:
    """Return the same tasks with every task's ``pad`` and ``normalize`` set."""
    if not pad and normalize is None:
        return stream
    tasks = [Task(**{**_spec(t), "pad": pad, "normalize": normalize}) for t in stream]
    return Stream(stream.name, stream.scenario, tasks)
