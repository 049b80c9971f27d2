"""A split of a dataset: its metadata, and its rows read from the Parquet cache on demand.

`Split` holds no pixels. `split.images(ids)` reads and decodes only those rows and applies the
data.* transforms (what a label actor does with its shard, and each read task of the training stream,
dd_dist.train.rows); `split.x` / `split.y` load the whole split into memory once per process, for the
plain single-process loop, tests and benchmarks on small data (do not write into them). Splits
are train / val / test; row ids run 0..N-1 within a split, and `rows` > 0 keeps the first rows.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from dd_dist.config import Config
from dd_dist.data.cache import Cached, open_source
from dd_dist.data.sources import SPLITS
from dd_dist.data.transforms import Transform, convert, from_pil, to_pil
from dd_dist.errors import UserError
from dd_dist.layout import RunDir

DEFAULT_CACHE_DIR = "data/cache"


@dataclass(frozen=True)
class Split:
    name: str  # dataset name as given
    split: str  # train | val | test
    rows: int
    num_classes: int
    in_shape: tuple[int, int, int]  # C, H, W after the transforms
    fingerprint: str  # 16 hex chars; changes with the data, the split, the subset and the transforms
    source: Cached
    transform: Transform
    channels: int | None  # data.channels: the conversion of image files

    def __len__(self) -> int:
        return self.rows

    @property
    def skipped(self) -> int:
        """Files of an image folder left out by data.skip_bad."""
        return len(self.source.info["splits"][self.split]["skipped"])

    def images(self, ids) -> np.ndarray:
        """float32 (len(ids), C, H, W): the rows `ids`, decoded and transformed."""
        return self.examples(ids, with_labels=False)[0]

    def examples(self, ids, with_labels: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(images as `images` gives them, int64 labels) of the rows `ids`, read together."""
        ids = np.asarray(ids, np.int64)
        if not len(ids):
            return np.zeros((0, *self.in_shape), np.float32), np.zeros(0, np.int64)
        if ids.min() < 0 or ids.max() >= self.rows:
            raise IndexError(f"row ids outside 0..{self.rows - 1} of {self.name} {self.split}")
        columns = ["shape", "file"] if self.source.info["kind"] == "files" else ["shape", "image"]
        table = self.source.read(self.split, ids, columns + ["label"] * with_labels)
        return self.decode(table), table.column("label").to_numpy() if with_labels else None

    def decode(self, table: pa.Table) -> np.ndarray:
        """float32 (rows, C, H, W) of cache rows (their `shape` and `image` or `file` columns)."""
        info = self.source.info
        shapes = table.column("shape").to_pylist()
        if info["kind"] == "files":
            pixels = [self._read_file(f) for f in table.column("file").to_pylist()]
        else:
            dtype = np.dtype(info["dtype"])
            pixels = [np.frombuffer(b, dtype).reshape(s) for b, s in zip(table.column("image").to_pylist(), shapes)]
            if self.transform.resamples:
                pixels = [from_pil(self.transform.resample(to_pil(p))) for p in pixels]
        out = np.stack(pixels) if pixels else np.zeros((0, *self.in_shape), np.uint8)
        return self.transform.finish(out, info["scale"])

    def _read_file(self, file: str) -> np.ndarray:
        with Image.open(Path(self.source.files_root) / file) as image:
            return from_pil(self.transform.resample(convert(image, self.channels)))

    @property
    def x(self) -> np.ndarray:
        """The whole split, float32 (N, C, H, W), loaded once per process."""
        return _whole(self.source, self.split, self.transform, self.channels, self.name)[: self.rows]

    @property
    def y(self) -> np.ndarray:
        """The labels, int64 (N,): one column read, no pixels."""
        return _labels(self.source, self.split)[: self.rows]


@lru_cache(maxsize=4)
def _whole(source: Cached, split: str, transform: Transform, channels: int | None, name: str):
    full = _split(source, split, transform, channels, name, rows=0)
    x = np.concatenate([full.images(np.arange(a, min(a + 8192, len(full))))
                        for a in range(0, len(full), 8192)]) if len(full) else full.images([])
    return np.ascontiguousarray(x)


@lru_cache(maxsize=8)
def _labels(source: Cached, split: str) -> np.ndarray:
    return source.column(split, "label")


def load_split(name: str, split: str, path: str | None = None, rows: int = 0, seed: int = 0,
               cache_dir: str = DEFAULT_CACHE_DIR, transform: dict | None = None, channels: int | None = None,
               skip_bad: bool = False) -> Split:
    """One split of a dataset (cached as Parquet on first use); rows > 0 keeps its first `rows` rows.

    `path` is the file or directory for fashion-mnist, cifar*, imagefolder and local hf: data; `seed`
    only shapes the synthetic data; transform: dd_dist.data.transforms.Transform.of's arguments."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (allowed: {', '.join(SPLITS)})")
    if rows < 0:
        raise UserError(f"data: rows must be >= 0 (0 = all), got {rows}")
    source = open_source(name, path, seed, cache_dir, channels, skip_bad)
    return _split(source, split, Transform.of(**(transform or {})), channels, name, rows)


def _split(source: Cached, split: str, transform: Transform, channels: int | None, name: str, rows: int) -> Split:
    info = source.info
    part = info["splits"][split]
    if rows > part["rows"]:
        raise UserError(f"data: asked for {rows} rows but {name} {split} has only {part['rows']}")
    rows = rows or part["rows"]
    sizes = sorted({(c, *transform.out_size(h, w)) for c, h, w, _ in part["shapes"]})
    if len(sizes) > 1:
        (c, h, w), (c2, h2, w2) = sizes[0], sizes[-1]
        raise UserError(f"{name} {split}: images differ in size ({c}x{h}x{w} and {c2}x{h2}x{w2} after the "
                        f"transforms): set data.resize=[H, W], or data.resize and data.center_crop")
    if transform.resamples and info["dtype"] != "uint8":
        raise UserError(f"data.resize / data.center_crop need 8-bit images; {name} stores {info['dtype']}")
    in_shape = sizes[0] if sizes else (1, 1, 1)
    transform.check_channels(in_shape[0])
    fingerprint = hashlib.sha256(json.dumps([info["fingerprint"], split, rows, transform.record()]).encode())
    return Split(name, split, rows, info["num_classes"], tuple(in_shape), fingerprint.hexdigest()[:16], source,
                 transform, channels)


def run_split(cfg: Config, which: str) -> Split:
    """The `which` split (train, val, test) of the run that `cfg` configures (layout.RunDir.split), its cache
    built here if missing (in Ray Data tasks where Ray is up: infra.cluster.open_split starts it for a large
    source)."""
    return load_split(**RunDir(cfg).split(which))
