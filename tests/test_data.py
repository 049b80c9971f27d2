"""dd_dist.data: every source from files in its real format, fingerprints, the augmentation, user errors."""
import gzip
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dd_dist.core.augment import augment
from dd_dist.core.splitmix import row_rng_seed
from dd_dist.data.sources import DATASETS
from dd_dist.data.splits import load_split
from dd_dist.errors import UserError

REAL_FASHION_MNIST = Path(__file__).resolve().parents[1] / "data" / "fashion-mnist"


def check_split(split, n, in_shape, num_classes):
    assert len(split) == n and split.x.shape == (n, *in_shape) and split.in_shape == in_shape
    assert split.x.dtype == np.float32 and split.y.dtype == np.int64 and split.y.shape == (n,)
    assert split.x.min() >= 0 and split.x.max() <= 1 and split.num_classes == num_classes
    assert split.y.min() >= 0 and split.y.max() < num_classes
    assert split.x.flags.c_contiguous and len(split.fingerprint) == 16 and int(split.fingerprint, 16) >= 0


# --- mnist, synthetic, fingerprints, the cache ----------------------------------------------

def test_mnist_classic_split_and_row_prefix():
    for split, n in (("train", 50_000), ("val", 10_000), ("test", 10_000)):
        check_split(load_split("mnist", split), n, (1, 28, 28), 10)
    full, head = load_split("mnist", "val"), load_split("mnist", "val", rows=300)
    check_split(head, 300, (1, 28, 28), 10)
    assert np.array_equal(head.x, full.x[:300]) and np.array_equal(head.y, full.y[:300])
    assert set(np.unique(full.y)) == set(range(10))


def test_loaded_arrays_are_cached_whatever_the_ignored_arguments():
    a = load_split("mnist", "test", rows=10)
    b = load_split("mnist", "test", path="/ignored", seed=5)  # mnist ignores path and seed
    assert np.shares_memory(a.x, b.x)


def test_synthetic_is_small_deterministic_and_learnable():
    parts = {s: load_split("synthetic", s, seed=3) for s in ("train", "val", "test")}
    for split, n in (("train", 512), ("val", 128), ("test", 256)):
        check_split(parts[split], n, (1, 8, 8), 4)
    assert np.array_equal(load_split("synthetic", "train", seed=3).x, parts["train"].x)
    assert not np.array_equal(load_split("synthetic", "train", seed=4).x, parts["train"].x)
    # Nearest class mean of the training rows already separates the test rows.
    train, test = parts["train"], parts["test"]
    means = np.stack([train.x[train.y == c].mean(0) for c in range(4)]).reshape(4, -1)
    guess = ((test.x.reshape(len(test), 1, -1) - means) ** 2).sum(-1).argmin(1)
    assert (guess == test.y).mean() > 0.9


def test_fingerprints_are_stable_and_tell_data_apart():
    a = load_split("mnist", "train", rows=500)
    assert a.fingerprint == load_split("mnist", "train", rows=500).fingerprint
    others = [load_split("mnist", "train", rows=499), load_split("mnist", "train", rows=501),
              load_split("mnist", "val", rows=500), load_split("mnist", "train"),
              load_split("synthetic", "train"), load_split("synthetic", "train", seed=1),
              load_split("synthetic", "val")]
    prints = [a.fingerprint, *(o.fingerprint for o in others)]
    assert len(set(prints)) == len(prints)


# --- fashion-mnist ------------------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: zero, zero, type 0x08 (ubyte), ndim, big-endian int32 dims, then the bytes; gzipped for *.gz."""
    data = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=1)
    path.write_bytes(data)


def write_fashion_mnist(directory: Path, train_rows: int, test_rows: int, suffix: str = "") -> dict:
    rng = np.random.default_rng(7)
    files = {"train-images-idx3-ubyte": rng.integers(0, 256, (train_rows, 28, 28), dtype=np.uint8),
             "train-labels-idx1-ubyte": rng.integers(0, 10, train_rows, dtype=np.uint8),
             "t10k-images-idx3-ubyte": rng.integers(0, 256, (test_rows, 28, 28), dtype=np.uint8),
             "t10k-labels-idx1-ubyte": rng.integers(0, 10, test_rows, dtype=np.uint8)}
    directory.mkdir(parents=True, exist_ok=True)
    for stem, array in files.items():
        write_idx(directory / f"{stem}{suffix}", array)
    return files


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_fashion_mnist_from_idx_files(tmp_path, suffix):
    files = write_fashion_mnist(tmp_path, 10_006, 9, suffix)
    train, val, test = (load_split("fashion-mnist", s, str(tmp_path)) for s in ("train", "val", "test"))
    check_split(train, 6, (1, 28, 28), 10)
    check_split(val, 10_000, (1, 28, 28), 10)
    check_split(test, 9, (1, 28, 28), 10)
    images, labels = files["train-images-idx3-ubyte"], files["train-labels-idx1-ubyte"]
    assert np.array_equal(train.x[:, 0] * 255, images[:6]) and np.array_equal(train.y, labels[:6])
    assert np.array_equal(val.x[-1, 0] * 255, images[-1]) and np.array_equal(val.y, labels[6:])  # val = the tail
    assert np.array_equal(test.y, files["t10k-labels-idx1-ubyte"])


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="no data/fashion-mnist (run `make fashion-mnist`)")
def test_real_fashion_mnist():
    for split, n in (("train", 50_000), ("val", 10_000), ("test", 10_000)):
        part = load_split("fashion-mnist", split, str(REAL_FASHION_MNIST))
        check_split(part, n, (1, 28, 28), 10)
        assert set(np.unique(part.y)) == set(range(10)) and part.x.max() == 1.0


# --- cifar10 / cifar100 -------------------------------------------------------------------

def write_cifar(root: Path, classes: int, train_rows: int = 5_003, test_rows: int = 11) -> Path:
    """A small archive in the real layout: Python-2-style protocol-2 pickles with bytes keys, plus its .tar.gz."""
    rng = np.random.default_rng(classes)
    folder = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)

    def batch(n: int, label: bytes) -> dict:
        labels = [int(v) for v in rng.integers(0, classes, n)]
        data = np.zeros((n, 3072), np.uint8)  # rows past the 50th stay blank: gzip then writes the tarball fast
        data[:50] = rng.integers(0, 256, (min(n, 50), 3072))
        content = {b"batch_label": label, b"data": data,
                   b"filenames": [b"img_%d.png" % i for i in range(n)]}
        if classes == 10:
            return {**content, b"labels": labels}
        return {**content, b"fine_labels": labels, b"coarse_labels": [v // 5 for v in labels]}

    def dump(name: str, content: dict) -> None:
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))

    if classes == 10:
        sizes = np.diff(np.linspace(0, train_rows, 6).astype(int))
        for i, n in enumerate(sizes, 1):
            dump(f"data_batch_{i}", batch(n, b"training batch %d of 5" % i))
        dump("test_batch", batch(test_rows, b"testing batch 1 of 1"))
        dump("batches.meta", {b"label_names": [b"c%d" % i for i in range(10)], b"num_cases_per_batch": 10_000})
    else:
        dump("train", batch(train_rows, b"training batch 1 of 1"))
        dump("test", batch(test_rows, b"testing batch 1 of 1"))
        dump("meta", {b"fine_label_names": [b"f%d" % i for i in range(100)], b"coarse_label_names": []})
    with tarfile.open(root / f"cifar-{classes}-python.tar.gz", "w:gz", compresslevel=1) as tar:
        tar.add(folder, arcname=folder.name)
    return folder


def raw_cifar(folder: Path, names: list[str], key: bytes):
    batches = [pickle.loads((folder / n).read_bytes(), encoding="bytes") for n in names]
    return np.concatenate([b[b"data"] for b in batches]), np.concatenate([b[key] for b in batches])


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_from_directory_and_tarball(tmp_path, classes):
    folder = write_cifar(tmp_path, classes)
    name = f"cifar{classes}"
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else ["train"]
    key = b"labels" if classes == 10 else b"fine_labels"
    data, labels = raw_cifar(folder, train_files, key)
    test_data, test_labels = raw_cifar(folder, ["test_batch" if classes == 10 else "test"], key)
    # The extracted folder, its parent, and the tarball itself all read the same.
    for path in (folder, tmp_path, tmp_path / f"cifar-{classes}-python.tar.gz"):
        train, val, test = (load_split(name, s, str(path)) for s in ("train", "val", "test"))
        check_split(train, 3, (3, 32, 32), classes)
        check_split(val, 5_000, (3, 32, 32), classes)
        check_split(test, 11, (3, 32, 32), classes)
        assert np.array_equal(train.y, labels[:3]) and np.array_equal(val.y, labels[3:])
        assert np.array_equal(test.y, test_labels)
        # Rows are channel planes: red 32x32, then green, then blue.
        assert np.array_equal(np.round(train.x[1] * 255).astype(np.uint8), data[1].reshape(3, 32, 32))
        assert np.array_equal(np.round(test.x[-1, 2, 31] * 255), test_data[-1, -32:])


def test_cifar_archive_of_the_other_kind_is_a_user_error(tmp_path):
    write_cifar(tmp_path, 100, train_rows=2, test_rows=1)  # refused before any split is cut
    with pytest.raises(UserError, match="lacks data_batch_1"):
        load_split("cifar10", "train", str(tmp_path / "cifar-100-python.tar.gz"))


# --- hf: a local Parquet copy -------------------------------------------------------------

@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the datasets cache in tmp_path and forbid the hub, so no test can reach the network."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return datasets


def write_parquet(datasets, directory: Path, sizes: dict, image_col="image", label_col="label", rgb=False):
    from PIL import Image

    rng = np.random.default_rng(len(sizes))
    features = datasets.Features({image_col: datasets.Image(), label_col: datasets.ClassLabel(num_classes=5)})
    shape = (7, 6, 3) if rgb else (7, 6)
    for split, n in sizes.items():
        images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(n)]
        rows = {image_col: images, label_col: [int(v) for v in rng.integers(0, 3, n)]}  # class 3, 4 unused
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(directory / f"{split}.parquet"))


def test_hf_local_parquet_grayscale_holds_out_a_sixth(tmp_path, hf_cache):
    source = tmp_path / "gray"
    source.mkdir()
    write_parquet(hf_cache, source, {"train": 12, "test": 4})
    name = f"hf:{source}"
    train, val, test = (load_split(name, s) for s in ("train", "val", "test"))
    check_split(train, 10, (1, 7, 6), 5)  # num_classes from the ClassLabel, not max(label) + 1
    check_split(val, 2, (1, 7, 6), 5)
    check_split(test, 4, (1, 7, 6), 5)
    first = np.asarray(hf_cache.load_dataset("parquet", data_dir=str(source))["train"][0]["image"])
    assert np.array_equal(np.round(train.x[0, 0] * 255), first)


def test_hf_local_parquet_rgb_with_validation_split(tmp_path, hf_cache):
    source = tmp_path / "rgb"  # not tmp_path itself: the datasets cache is there
    source.mkdir()
    write_parquet(hf_cache, source, {"train": 6, "validation": 3, "test": 2}, "img", "fine_label", rgb=True)
    sizes = {s: len(load_split(f"hf:{source}", s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 6, "val": 3, "test": 2}
    check_split(load_split(f"hf:{source}", "val"), 3, (3, 7, 6), 5)


def test_hf_missing_column_or_dataset_is_named(tmp_path, hf_cache):
    write_parquet(hf_cache, tmp_path, {"train": 6, "test": 2}, "picture", "label")
    with pytest.raises(UserError, match="no image column .*picture"):
        load_split(f"hf:{tmp_path}", "train")
    with pytest.raises(UserError, match="hf:nobody/no-such-dataset"):
        load_split("hf:nobody/no-such-dataset", "train")  # offline: fails without a request


# --- errors a user can cause --------------------------------------------------------------

@pytest.mark.parametrize("name, split, path, rows, words", [
    ("imagenet", "train", None, 0, "unknown dataset 'imagenet' (allowed: " + ", ".join(DATASETS)),
    ("mnist", "dev", None, 0, "unknown split 'dev'"),
    ("synthetic", "val", None, 129, "asked for 129 rows but synthetic val has only 128"),
    ("synthetic", "val", None, -1, "rows must be >= 0"),
    ("fashion-mnist", "train", "/nonexistent/fmnist", 0, "not found: /nonexistent/fmnist"),
    ("cifar10", "train", "/nonexistent/cifar.tar.gz", 0, "not found: /nonexistent/cifar.tar.gz"),
    ("cifar100", "train", None, 0, "cifar100 needs a path"),
    ("hf:/nonexistent/parquet-dir", "train", None, 0, "hf:/nonexistent/parquet-dir: directory not found"),
    ("hf:", "train", None, 0, "hf: needs a dataset name"),
])
def test_bad_arguments_are_one_line_user_errors(name, split, path, rows, words):
    with pytest.raises(UserError) as error:
        load_split(name, split, path, rows)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_broken_files_are_user_errors_naming_the_file(tmp_path):
    write_fashion_mnist(tmp_path, 10_001, 2)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])  # one label short of its header
    with pytest.raises(UserError, match=f"{labels} is truncated"):
        load_split("fashion-mnist", "test", str(tmp_path))
    (tmp_path / "not-a-tarball.tar.gz").write_bytes(b"hello")
    with pytest.raises(UserError, match="cannot read cifar archive .*not-a-tarball"):
        load_split("cifar10", "test", str(tmp_path / "not-a-tarball.tar.gz"))
    (tmp_path / "cifar").mkdir()
    with pytest.raises(UserError, match="lacks data_batch_1"):
        load_split("cifar10", "test", str(tmp_path / "cifar"))


# --- per-row randomness and the augmentation ----------------------------------------------

def test_row_rng_seed_mixes_every_part():
    seeds = {row_rng_seed(s, r, e) for s in range(3) for r in range(50) for e in range(3)}
    assert len(seeds) == 450 and all(0 <= s < 2**63 for s in seeds)
    assert row_rng_seed(1, 2, 3) == row_rng_seed(1, 2, 3) != row_rng_seed(3, 2, 1)
    assert row_rng_seed(-1, 2**70) == row_rng_seed(2**64 - 1, 2**70 % 2**64)  # parts taken mod 2^64


def images(n=32, shape=(1, 28, 28)):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(0)) + 0.01  # no zero pixel to start with


def test_augment_depends_only_on_seed_row_and_epoch():
    x, ids = images(), torch.arange(1000, 1032)
    batch = augment(x, ids, seed=1, epoch=0, zero_p=0.2, flip_p=0.5)
    order = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(augment(x[order], ids[order], 1, 0, 0.2, 0.5), batch[order])
    for i in (0, 7, 31):
        assert torch.equal(augment(x[i : i + 1], ids[i : i + 1], 1, 0, 0.2, 0.5), batch[i : i + 1])
    mixed = augment(torch.cat([images(5), x[:3]]), torch.cat([torch.arange(5), ids[:3]]), 1, 0, 0.2, 0.5)
    assert torch.equal(mixed[5:], batch[:3])  # other rows in the batch change nothing
    for seed, shift, epoch in ((1, 0, 1), (2, 0, 0), (1, 1, 0)):  # another epoch, seed or row id
        assert not torch.equal(augment(x, ids + shift, seed, epoch, 0.2, 0.5), batch)


def test_augment_zeroes_about_zero_p_of_each_row():
    x = images(64)
    out = augment(x, torch.arange(64), seed=0, epoch=0, zero_p=0.2)
    zeroed = (out == 0).double()
    assert abs(zeroed.mean().item() - 0.2) < 0.007  # 50,176 pixels: 4 standard errors = 0.0071
    assert zeroed.mean(dim=(1, 2, 3)).min() > 0.1  # every row is masked, not a few rows heavily
    kept = out != 0
    assert torch.equal(out[kept], x[kept])  # untouched pixels keep their values
    assert (augment(x, torch.arange(64), 0, 0, zero_p=0.5) == 0).double().mean().item() == pytest.approx(0.5, abs=0.01)


def test_augment_flips():
    x, ids = images(), torch.arange(32)
    assert torch.equal(augment(x, ids, 3, 0, zero_p=0.0, flip_p=1.0), x.flip(-1))
    assert torch.equal(augment(x, ids, 3, 0, zero_p=0.0, flip_p=0.0), x)
    no_flip = augment(x, ids, 3, 0, zero_p=0.3, flip_p=0.0)
    assert torch.equal(no_flip != 0, (augment(x, ids, 3, 0, 0.3, 0.0) != 0))  # zero masks do not depend on flip_p=0
    half = augment(images(400), torch.arange(400), 3, 0, zero_p=0.0, flip_p=0.5)
    flipped = (half == images(400).flip(-1)).flatten(1).all(1)
    assert torch.equal(flipped, ~(half == images(400)).flatten(1).all(1))  # each row: exactly flipped or not
    assert 150 < flipped.sum().item() < 250


def test_augment_returns_a_new_tensor_of_the_same_kind():
    x, ids = images(8), torch.arange(8)
    before = x.clone()
    for zero_p, flip_p in ((0.0, 0.0), (0.2, 0.5)):
        out = augment(x, ids, 0, 0, zero_p, flip_p)
        assert out.shape == x.shape and out.dtype == x.dtype and out.data_ptr() != x.data_ptr()
    assert torch.equal(x, before)
    reference = augment(x, ids, 0, 0, 0.2, 0.5)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        out = augment(x.to(dtype), ids, 0, 0, 0.2, 0.5)
        assert out.dtype == dtype and torch.equal(out, reference.to(dtype))
    cifar = augment(images(4, (3, 32, 32)), torch.arange(4), 0, 0, 0.2, 0.5)
    assert cifar.shape == (4, 3, 32, 32)
