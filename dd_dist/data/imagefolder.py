"""Image folders: `data.name=imagefolder`, `data.path=DIR` with one folder of images per class in each split.

    DIR/train/<class>/*.png|jpg|...   required
    DIR/val/<class>/...               optional (or validation/); without it every 6th training image, by
                                      a hash of its path, is held out as val
    DIR/test/<class>/...              required

Classes are the class folders of train, sorted by name (their index is the label); val and test may
lack some but not add any. Row ids follow the sorted paths. Indexing reads and decodes every image
once (in Ray Data tasks when Ray is up), so a file that does not decode, and images of mixed channel
counts without data.channels, are found before any stage starts.
"""
from __future__ import annotations

import hashlib
import io
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from dd_dist.data.decoding import in_order
from dd_dist.data.transforms import channels_of, convert
from dd_dist.errors import UserError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
HOLD_OUT_EVERY = 6
FILES_PER_TASK = 512  # images one indexing task checks


@dataclass(frozen=True)
class Row:
    file: str  # relative to the folder
    label: int
    sha256: str
    shape: tuple[int, int, int]  # C, H, W after the channel conversion


@dataclass(frozen=True)
class Index:
    classes: list[str]
    splits: dict[str, list[Row]]
    skipped: dict[str, list[str]]  # with data.skip_bad: the files that did not decode, per split


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in EXTENSIONS)


def _split_folder(root: Path, split: str) -> Path | None:
    return next((root / n for n in SPLIT_FOLDERS[split] if (root / n).is_dir()), None)


def listing(root: Path) -> list:
    """Every image file's (path, size, mtime): what the cache key of a folder is made of (cheap: no reads)."""
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    return [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in _images_in(root)]


def index(root: Path, channels: int | None, skip_bad: bool) -> Index:
    folders = {split: _split_folder(root, split) for split in SPLIT_FOLDERS}
    for split in ("train", "test"):
        if folders[split] is None:
            raise UserError(f"image folder {root} has no {split}/ folder (it needs train/ and test/, val/ optional, "
                            f"each with one folder of images per class)")
    classes = sorted(d.name for d in folders["train"].iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"image folder {folders['train']} has no class folders")
    splits, skipped, native = {}, {}, {}  # native: channel count as decoded -> its first file
    files = {split: _class_files(folder, classes, every_class=split == "train")
             for split, folder in folders.items() if folder is not None}
    bar = tqdm(total=sum(len(f) for f in files.values()), desc=f"indexing {root}", unit="images")
    for split, entries in files.items():
        splits[split], skipped[split] = [], []
        paths = [file for file, _ in entries]
        chunks = [paths[a:a + FILES_PER_TASK] for a in range(0, len(paths), FILES_PER_TASK)]
        with closing(in_order(partial(_check_files, channels=channels), chunks)) as stream:  # closed on an error
            checked = (one for chunk in stream for one in chunk)
            for (file, label), (digest, decoded) in zip(entries, checked, strict=True):
                rel = str(file.relative_to(root))
                bar.update()
                if isinstance(decoded, str):  # why it did not decode
                    if not skip_bad:
                        raise UserError(f"image {rel} (id {len(splits[split])} of {split}) cannot be decoded: "
                                        f"{decoded} (data.skip_bad=true skips such files)")
                    skipped[split].append(rel)
                else:
                    native.setdefault(decoded[0], rel)
                    splits[split].append(Row(rel, label, digest, decoded[1]))
    bar.close()
    if folders["val"] is None:
        splits, skipped = _hold_out(splits, skipped)
    for split, rows in splits.items():
        if not rows:
            raise UserError(f"image folder {root}: the {split} split has no images that decode")
    if channels is None and len(native) > 1:
        shown = ", ".join(f"{file} has {c}" for c, file in sorted(native.items()))
        raise UserError(f"image folder {root} mixes channel counts ({shown}): set data.channels=3 or 1 to "
                        f"convert every image")
    return Index(classes, splits, skipped)


def _class_files(folder: Path, classes: list[str], every_class: bool) -> list[tuple[Path, int]]:
    """(file, label) of a split's images; every_class: each class folder must hold images (train's)."""
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"image folder {folder} has class folders that train/ lacks: {', '.join(unknown)}")
    out = []
    for label, name in enumerate(classes):
        images = _images_in(folder / name) if (folder / name).is_dir() else []
        if not images and every_class:
            raise UserError(f"class folder {folder / name} has no images ({', '.join(sorted(EXTENSIONS))})")
        out.extend((f, label) for f in images)
    return out


def _check_files(files: list[Path], channels: int | None) -> list[tuple[str, tuple | str]]:
    """Each file's (sha256, (channels as decoded, (C, H, W) as read)), or (sha256, why it does not decode):
    read once, decoded in full (a truncated file fails here). In a Ray Data task when Ray is up."""
    out = []
    for file in files:
        data = b""
        try:
            data = file.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                native, converted = channels_of(image), convert(image, channels)
                decoded = native, (len(converted.getbands()), converted.height, converted.width)
        except Exception as e:  # PIL raises many types for broken files
            decoded = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        out.append((hashlib.sha256(data).hexdigest(), decoded))
    return out


def _hold_out(splits: dict, skipped: dict) -> tuple[dict, dict]:
    """val = the training images whose path hashes to 0 mod HOLD_OUT_EVERY: spread over every class."""
    held = lambda row: int(hashlib.sha256(row.file.encode()).hexdigest(), 16) % HOLD_OUT_EVERY == 0  # noqa: E731
    train = splits["train"]
    return ({"train": [r for r in train if not held(r)], "val": [r for r in train if held(r)], "test": splits["test"]},
            {"train": skipped["train"], "val": [], "test": skipped["test"]})

