"""Every source as Parquet on disk, written once, read row by row: the one format the stages read.

    <data.cache_dir>/<source>-<key>/info.json            written last: a folder with it is complete
    <data.cache_dir>/<source>-<key>/<split>/part-XXXXX.parquet   ROWS_PER_FILE rows each, in id order
    <data.cache_dir>/checksums.json                      the source files' sha256, by path, size and mtime

Columns: `id` (int64, 0..N-1 within the split), `label` (int64), `shape` (C, H, W as stored), and
either `image` (the row's pixels, raw bytes of info["dtype"]) for the built-in and hf: sources, or
`file` (a path relative to data.path) and its `sha256` for image folders, whose images stay where they
are and are decoded when read. The key is a digest of the source's files (their checksums; for an
image folder, its listing with sizes and modification times), so changed files make a new cache entry;
info["fingerprint"] is a digest of the content itself (for an image folder, of every file's checksum
and label). Building writes into a temporary folder renamed into place, so concurrent or killed
builds never leave a half cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dd_dist.data import imagefolder, sources
from dd_dist.data.decoding import in_order
from dd_dist.errors import UserError
from dd_dist.files import file_sha256, write_json

CACHE_VERSION = 1
INFO = "info.json"
CHECKSUMS = "checksums.json"  # the source files' sha256 by (path, size, mtime)
ROWS_PER_FILE = 65_536
ROW_GROUP = 1024  # the unit a row-range read decodes: small, so a shard reads little beyond its rows
CHUNK = 4096  # rows decoded and written at a time while building (ROWS_PER_FILE is a multiple of it)
DECODE_IN_RAY_MB = 64  # image files beyond this are decoded in Ray Data tasks (below it, starting Ray costs more)


@dataclass(frozen=True)
class Cached:
    """One source in the cache (hashable, so reads of it can be cached per process)."""

    root: str
    files_root: str | None  # where an image folder's `file` paths start

    @property
    def info(self) -> dict:
        return _read_info(self.root)

    def split_files(self, split: str) -> list[str]:
        count = -(-self.info["splits"][split]["rows"] // ROWS_PER_FILE)
        return [str(Path(self.root) / split / f"part-{i:05d}.parquet") for i in range(count)]

    def read(self, split: str, ids: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """The rows `ids` (any order) of a split, only the row groups that hold them read."""
        ids = np.asarray(ids, np.int64)
        files = self.split_files(split)
        order = np.argsort(ids, kind="stable")
        parts = []
        for f in np.unique(ids // ROWS_PER_FILE):
            local = ids[order][ids[order] // ROWS_PER_FILE == f] - f * ROWS_PER_FILE
            groups = np.unique(local // ROW_GROUP)
            table = pq.ParquetFile(files[f]).read_row_groups(groups.tolist(), columns=columns)
            parts.append(table.take(_positions(groups, local)))
        return pa.concat_tables(parts).take(np.argsort(order, kind="stable"))  # back to the order asked for

    def column(self, split: str, name: str) -> np.ndarray:
        return np.concatenate([pq.read_table(f, columns=[name]).column(name).to_numpy()
                               for f in self.split_files(split)])


def _positions(groups: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Where each local row lies in the concatenation of `groups` (full row groups but maybe the last)."""
    offsets = np.searchsorted(groups, local // ROW_GROUP) * ROW_GROUP
    return offsets + local % ROW_GROUP


@lru_cache(maxsize=64)
def _read_info(root: str) -> dict:
    return json.loads((Path(root) / INFO).read_text())


def open_source(name: str, path: str | None, seed: int, cache_dir: str, channels: int | None = None,
                skip_bad: bool = False) -> Cached:
    """The cache entry of a source, built first if missing."""
    name, path, seed = source_key(name, path, seed)
    root, key, _ = _entry(name, path, seed, cache_dir, channels, skip_bad)
    if not (root / INFO).is_file():
        _build(root, name, path, seed, channels, skip_bad, key)
    return Cached(str(root), path if name == "imagefolder" else None)


def large_build(name: str, path: str | None, seed: int, cache_dir: str, channels: int | None = None,
                skip_bad: bool = False) -> bool:
    """Whether opening this source would first decode more than DECODE_IN_RAY_MB of image files into the
    cache (an hf: or image folder source not cached yet): worth starting Ray to decode it in tasks."""
    name, path, seed = source_key(name, path, seed)
    if not (name.startswith("hf:") or name == "imagefolder"):
        return False
    root, _, size = _entry(name, path, seed, cache_dir, channels, skip_bad)
    return not (root / INFO).is_file() and size > DECODE_IN_RAY_MB * 2**20


def _entry(name: str, path: str | None, seed: int, cache_dir: str, channels: int | None,
           skip_bad: bool) -> tuple[Path, str, int]:
    """(cache folder, key, bytes of the source's files) of a source as source_key gives it."""
    cache = Path(cache_dir).expanduser().absolute()
    key, size = _key(name, path, seed, channels, skip_bad, cache)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name if path is None else f"{name}-{Path(path).name}")[-60:]
    return cache / f"{slug}-{key}", key, size


def source_key(name: str, path: str | None, seed: int) -> tuple[str, str | None, int]:
    """Drop the arguments a source ignores and make paths absolute, so equal data shares one entry."""
    if name.startswith("hf:"):
        if not name[3:]:
            raise UserError("hf: needs a dataset name or a local directory, e.g. hf:ylecun/mnist")
        return name, None, 0
    if name not in (*sources.DATASETS, "imagefolder"):
        raise UserError(f"unknown dataset {name!r} (allowed: {', '.join(sources.DATASETS)}, imagefolder, "
                        f"hf:<name-or-path>)")
    if name == "synthetic":
        return name, None, seed
    if name == "mnist":
        return name, None, 0
    if name == "fashion-mnist":
        path = path or sources.FASHION_MNIST_DIR
    if not path:
        what = "the image folder (train/, val/, test/ of class folders)" if name == "imagefolder" else \
            "the python-pickle archive or its directory"
        raise UserError(f"{name} needs a path: set data.path to {what}")
    return name, str(Path(path).expanduser().absolute()), 0


def _key(name: str, path: str | None, seed: int, channels: int | None, skip_bad: bool,
         cache_dir: Path) -> tuple[str, int]:
    """(digest of the source's files, their total bytes; a hub dataset not on disk counts as 0)."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, name, seed]).encode())
    if name == "imagefolder":
        files = imagefolder.listing(Path(path))
        h.update(json.dumps([channels, skip_bad, files]).encode())
        return h.hexdigest()[:16], sum(size for _, size, _ in files)
    if name.startswith("hf:"):
        local = Path(name[3:]).expanduser()
        files = sorted(f for f in local.rglob("*") if f.is_file() and ".cache" not in f.parts) if local.is_dir() else []
        h.update(json.dumps(str(local.absolute()) if local.is_dir() else name).encode())
    else:
        local, files = None, sources.source_files(name, path)
    checksums = _checksums(files, cache_dir)
    h.update(json.dumps([(str(f.relative_to(local)) if local else f.name, checksums[str(f)]) for f in files]).encode())
    return h.hexdigest()[:16], sum(f.stat().st_size for f in files)


def _checksums(files: list[Path], cache_dir: Path) -> dict[str, str]:
    """sha256 of each file, remembered in cache_dir/CHECKSUMS by (path, size, mtime): every stage, actor and
    worker opens the source, and a large one would be read in full each time."""
    memo_file = cache_dir / CHECKSUMS
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    out, changed = {}, False
    for f in files:
        stat = f.stat()
        stamp = f"{f}|{stat.st_size}|{stat.st_mtime_ns}"
        if stamp not in memo:
            memo[stamp], changed = file_sha256(f), True
        out[str(f)] = memo[stamp]
    if changed:
        with contextlib.suppress(UserError):  # a read-only cache_dir: only the memo is lost
            cache_dir.mkdir(parents=True, exist_ok=True)
            write_json(memo_file, memo)
    return out


def _build(root: Path, name: str, path: str | None, seed: int, channels: int | None, skip_bad: bool,
           key: str) -> None:
    created = [d for d in (root.parent, *root.parent.parents) if not d.exists()]  # removed again on failure
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".tmp"))
    built = False
    try:
        if name == "imagefolder":
            info = _write_folder(tmp, Path(path), channels, skip_bad)
        else:
            info = _write_raw(tmp, sources.read_source(name, path, seed), key)
        (tmp / INFO).write_text(json.dumps({"version": CACHE_VERSION, "source": name, **info}, indent=2))
        try:
            os.rename(tmp, root)
        except OSError:  # another process built it first: theirs is as good
            if not (root / INFO).is_file():
                raise
        built = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created if not built else ():
            with contextlib.suppress(OSError):  # not empty: another process's cache is there now
                folder.rmdir()


def _write_split(folder: Path, chunks) -> None:
    """Columns (dicts of arrow arrays, CHUNK rows each but the last) into ROWS_PER_FILE-row files, ids added."""
    folder.mkdir()
    writer, rows = None, 0
    for columns in chunks:
        n = len(columns["label"])
        if writer is None or rows % ROWS_PER_FILE == 0:
            if writer:
                writer.close()
            writer = None
        table = pa.table({"id": pa.array(np.arange(rows, rows + n, dtype=np.int64)), **columns})
        if writer is None:
            writer = pq.ParquetWriter(folder / f"part-{rows // ROWS_PER_FILE:05d}.parquet", table.schema,
                                      compression="zstd")
        writer.write_table(table, row_group_size=ROW_GROUP)
        rows += n
    if writer:
        writer.close()


def _shapes(rows: list) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.array(rows, np.int32).reshape(-1)), 3)


def _write_raw(folder: Path, raw: sources.Raw, key: str) -> dict:
    """The splits of a built-in or hf: source as `image` bytes, CHUNK rows at a time (an hf: source is
    decoded a chunk at a time, in Ray Data tasks when Ray is up); their fingerprint is the key, a digest of
    the source's files."""
    splits, dtype = {}, None
    for split, (images, labels) in raw.splits.items():
        shapes: dict[tuple, int] = {}

        def chunks():
            nonlocal dtype
            starts = range(0, len(labels), CHUNK)
            parts = [images[start:start + CHUNK] for start in starts]
            decoded = in_order(_pixels, parts) if hasattr(images, "decode") else map(_pixels, parts)  # arrays: here
            for start, rows in zip(starts, decoded, strict=True):  # strict: the task stream runs to its end
                dtype = dtype or rows[0].dtype.name
                for r in rows:
                    shapes[r.shape] = shapes.get(r.shape, 0) + 1
                yield {"label": pa.array(np.asarray(labels[start:start + CHUNK], np.int64)),
                       "shape": _shapes([r.shape for r in rows]),
                       "image": pa.array([r.tobytes() for r in rows], pa.binary())}

        _write_split(folder / split, chunks())
        splits[split] = {"rows": len(labels), "shapes": [[*s, c] for s, c in sorted(shapes.items())], "skipped": []}
    return {"num_classes": raw.num_classes, "scale": raw.scale, "dtype": dtype or "uint8", "kind": "pixels",
            "fingerprint": key, "splits": splits}


def _pixels(part) -> list[np.ndarray]:
    """A chunk's images as contiguous arrays (an hf: chunk decoded here: in a Ray Data task when Ray is up)."""
    return [np.ascontiguousarray(r) for r in (part.decode() if hasattr(part, "decode") else part)]


def _write_folder(folder: Path, path: Path, channels: int | None, skip_bad: bool) -> dict:
    """An image folder's index: each file's path, label, checksum and shape (every image decoded once here)."""
    index = imagefolder.index(path, channels, skip_bad)
    digest, splits = hashlib.sha256(), {}
    for split, rows in index.splits.items():
        _write_split(folder / split, ({
            "label": pa.array([r.label for r in part], pa.int64()),
            "shape": _shapes([r.shape for r in part]),
            "file": pa.array([r.file for r in part], pa.string()),
            "sha256": pa.array([r.sha256 for r in part], pa.string())}
            for part in (rows[a:a + CHUNK] for a in range(0, len(rows), CHUNK))))
        digest.update(json.dumps([split, [(r.file, r.sha256, r.label) for r in rows]]).encode())
        shapes = np.array([r.shape for r in rows], np.int32).reshape(-1, 3)
        splits[split] = {"rows": len(rows), "shapes": _shape_counts(shapes), "skipped": index.skipped[split]}
    return {"num_classes": len(index.classes), "classes": index.classes, "scale": 255.0, "dtype": "uint8",
            "kind": "files", "fingerprint": digest.hexdigest(), "splits": splits}


def _shape_counts(shapes: np.ndarray) -> list[list[int]]:
    """[[C, H, W, rows], ...] of the distinct stored shapes of a split."""
    distinct, counts = np.unique(shapes, axis=0, return_counts=True) if len(shapes) else (np.zeros((0, 3)), [])
    return [[*map(int, s), int(c)] for s, c in zip(distinct, counts)]
