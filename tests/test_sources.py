"""Every data source loads the right shapes and labels from files in its real format; bad input is one line."""
import gzip
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch

from dd_dist.data import augment, load_split
from dd_dist.errors import UserError


def test_bundled_mnist_classic_split():
    sizes = {s: len(load_split("mnist", s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 50_000, "val": 10_000, "test": 10_000}
    split = load_split("mnist", "test", rows=100)
    assert split.x.shape == (100, 1, 28, 28) and split.x.dtype == np.float32 and split.y.dtype == np.int64
    assert 0 <= split.x.min() and split.x.max() <= 1 and set(split.y) <= set(range(10)) and split.num_classes == 10


def test_fingerprints_tell_data_apart():
    a = load_split("mnist", "train", rows=1000)
    assert a.fingerprint == load_split("mnist", "train", rows=1000).fingerprint
    others = [load_split("mnist", "train", rows=999), load_split("mnist", "val", rows=1000), load_split("synthetic", "train")]
    assert len({a.fingerprint, *(o.fingerprint for o in others)}) == 4


def write_idx(path, array, compress):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    (gzip.open if compress else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx_files(tmp_path, compress):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    train_x, train_y = rng.integers(0, 256, (10_010, 28, 28)), rng.integers(0, 10, 10_010)
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", train_x, compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", train_y, compress)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", train_x[:7], compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", train_y[:7], compress)
    train = load_split("fashion-mnist", "train", str(tmp_path))
    assert train.x.shape == (10, 1, 28, 28) and len(load_split("fashion-mnist", "val", str(tmp_path))) == 10_000
    assert np.allclose(train.x[3, 0] * 255, train_x[3]) and (train.y == train_y[:10]).all()
    assert len(load_split("fashion-mnist", "test", str(tmp_path))) == 7


def write_cifar(root, classes):
    """A small archive in the real python-pickle layout (5,002 training rows so a val split exists)."""
    rng = np.random.default_rng(classes)
    folder = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    key = b"labels" if classes == 10 else b"fine_labels"

    def batch(n):
        return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: list(rng.integers(0, classes, n))}

    names = [f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else ["train"]
    for name in names:
        pickle.dump(batch(5_002 // len(names) + 1), open(folder / name, "wb"))
    pickle.dump(batch(20), open(folder / ("test_batch" if classes == 10 else "test"), "wb"))
    with tarfile.open(root / "archive.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return folder


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_pickle_archive_dir_and_tarball(tmp_path, classes):
    folder = write_cifar(tmp_path, classes)
    name = f"cifar{classes}"
    for path in (folder, tmp_path / "archive.tar.gz"):
        test = load_split(name, "test", str(path))
        assert test.x.shape == (20, 3, 32, 32) and test.num_classes == classes and test.y.max() < classes
        assert len(load_split(name, "val", str(path))) == 5_000
    raw = pickle.load(open(folder / ("test_batch" if classes == 10 else "test"), "rb"), encoding="bytes")
    assert np.allclose(test.x[0].reshape(-1) * 255, raw[b"data"][0])


def test_hf_local_parquet_copy(tmp_path):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    for part, n in (("train", 12), ("test", 5)):
        images = [Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)) for _ in range(n)]
        rows = {"image": images, "label": list(rng.integers(0, 3, n))}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / f"{part}.parquet"))
    train = load_split(f"hf:{tmp_path}", "train")
    assert train.x.shape == (10, 1, 6, 6) and train.num_classes == 3  # 1/6 of train held out as val
    assert len(load_split(f"hf:{tmp_path}", "test")) == 5


def test_synthetic_is_deterministic():
    a, b = load_split("synthetic", "train", seed=1), load_split("synthetic", "train", seed=1)
    assert a.x.shape == (512, 1, 8, 8) and a.num_classes == 4 and np.array_equal(a.x, b.x)


@pytest.mark.parametrize("name, split, path, rows, words", [
    ("imagenet", "train", None, 0, "unknown dataset 'imagenet'"),
    ("mnist", "dev", None, 0, "unknown split 'dev'"),
    ("mnist", "test", None, 10_001, "only 10000"),
    ("fashion-mnist", "train", "/nonexistent/fmnist", 0, "/nonexistent/fmnist"),
    ("cifar10", "train", "/nonexistent/cifar.tar.gz", 0, "/nonexistent/cifar.tar.gz"),
    ("hf:/nonexistent/parquet-dir", "train", None, 0, "hf:/nonexistent/parquet-dir"),
])
def test_bad_sources_are_one_line_errors(name, split, path, rows, words):
    with pytest.raises(UserError, match=words.replace(".", r"\.")) as error:
        load_split(name, split, path, rows)
    assert "\n" not in str(error.value)


def test_augmentation_is_reproducible_per_row_and_epoch():
    x, ids = torch.rand(16, 1, 28, 28) + 0.1, torch.arange(500, 516)
    a = augment(x, ids, seed=1, epoch=0, zero_p=0.2, flip_p=0.5)
    order = torch.randperm(16)
    assert torch.equal(augment(x[order], ids[order], 1, 0, 0.2, 0.5), a[order])
    assert torch.equal(augment(x[5:6], ids[5:6], 1, 0, 0.2, 0.5), a[5:6])
    assert not torch.equal(augment(x, ids, 1, 1, 0.2, 0.5), a)
    zeroed = (augment(x, ids, 1, 0, 0.2, 0.0) == 0).double().mean().item()
    assert abs(zeroed - 0.2) < 0.01  # 12,544 pixels: 4 standard errors is about 0.014
    assert torch.equal(augment(x, ids, 1, 0, 0.0, 1.0), x.flip(-1))
    assert torch.equal(augment(x, ids, 1, 0, 0.0, 0.0), x)
