"""The `data.*` transforms: decoded uint8 images -> resized, center-cropped, scaled to [0, 1], normalised.

They run where the rows are read (a label actor, a Ray Data task, a training worker), never over a
whole split at once. `resize` is either one number, the shorter side (aspect kept, as torchvision's
Resize(int)), or [H, W], the exact size; `center_crop` (a number or [H, W]) is applied after it;
`mean` / `std` normalise each channel after the scaling to [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from dd_dist.errors import UserError

MODES = {1: "L", 3: "RGB"}  # data.channels -> the PIL mode images are converted to


@dataclass(frozen=True)
class Transform:
    resize: tuple[int, ...] | None = None  # (short side,) or (H, W)
    center_crop: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def of(cls, resize=None, center_crop=None, mean=None, std=None) -> Transform:
        size = lambda v: None if v is None else tuple(v) if isinstance(v, (list, tuple)) else (int(v),)  # noqa: E731
        crop = size(center_crop)
        return cls(size(resize), crop * 2 if crop and len(crop) == 1 else crop,
                   None if mean is None else tuple(mean), None if std is None else tuple(std))

    @property
    def resamples(self) -> bool:
        return self.resize is not None or self.center_crop is not None

    def record(self) -> dict:
        """What the fingerprint of transformed data includes."""
        return {"resize": self.resize, "center_crop": self.center_crop, "mean": self.mean, "std": self.std}

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) an image of this size has after resize and crop."""
        if self.resize is not None:
            height, width = self._resized(height, width)
        if self.center_crop is not None:
            crop_h, crop_w = self.center_crop
            if crop_h > height or crop_w > width:
                raise UserError(f"data.center_crop {list(self.center_crop)} is larger than the {height}x{width} "
                                f"images it crops")
            height, width = crop_h, crop_w
        return height, width

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        if len(self.resize) == 2:
            return self.resize
        short = self.resize[0]
        if height <= width:
            return short, max(1, round(width * short / height))
        return max(1, round(height * short / width)), short

    def resample(self, image: Image.Image) -> Image.Image:
        """An 8-bit PIL image resized and cropped."""
        if self.resize is not None:
            height, width = self._resized(image.height, image.width)
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        if self.center_crop is not None:
            crop_h, crop_w = self.center_crop  # checked against every image size when the split was opened
            top, left = (image.height - crop_h) // 2, (image.width - crop_w) // 2
            image = image.crop((left, top, left + crop_w, top + crop_h))
        return image

    def check_channels(self, channels: int) -> None:
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, channels):
                raise UserError(f"data.{name} has {len(values)} values for images with {channels} channels")
        if self.std is not None and min(self.std) <= 0:
            raise UserError(f"data.std must be > 0, got {list(self.std)}")

    def finish(self, pixels: np.ndarray, scale: float) -> np.ndarray:
        """(N, C, H, W) pixels -> float32 in [0, 1] (divided by scale), then normalised."""
        x = np.divide(pixels, np.float32(scale), dtype=np.float32) if scale != 1 else pixels.astype(np.float32)
        if self.mean is not None:
            x -= np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        if self.std is not None:
            x /= np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        return x


def to_pil(pixels: np.ndarray) -> Image.Image:
    """A uint8 (C, H, W) array as a PIL image (L or RGB)."""
    return Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))


def from_pil(image: Image.Image) -> np.ndarray:
    """A PIL image as uint8 (C, H, W)."""
    array = np.asarray(image)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def channels_of(image: Image.Image) -> int:
    """Channels of an image as decoded, without conversion (a palette image counts as RGB)."""
    return {"1": 1, "L": 1, "I": 1, "F": 1, "I;16": 1, "LA": 2, "P": 3, "RGB": 3, "YCbCr": 3}.get(image.mode, 4)


def convert(image: Image.Image, channels: int | None) -> Image.Image:
    """The image in the configured channel count (data.channels), or as decoded (1 or 3 channels) without one."""
    mode = MODES.get(channels) or ("L" if channels_of(image) == 1 else "RGB")
    return image if image.mode == mode else image.convert(mode)
