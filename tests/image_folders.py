"""Small image folders for the tests: class-coloured RGB images of varying sizes and formats."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"blue": (0, 0, 200), "green": (0, 180, 0), "red": (220, 0, 0)}


def write_image_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """root/<split>/<class>/<i>.png|jpg: a noisy image of the class's colour, 20 to 48 pixels a side."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = rng.integers(20, 49, size=2)
                pixels = np.clip(np.asarray(colour) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                if i % 5 == 0:
                    image = image.convert("L").convert("RGB")  # still 3 channels, not the class colour
                image.save(folder / f"{i:03d}.{'jpg' if i % 2 else 'png'}")
    return root
