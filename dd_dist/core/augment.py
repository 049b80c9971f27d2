"""Per-row randomness and the paper's distillation augmentation, keyed by (seed, row id, epoch)."""
from __future__ import annotations

import numpy as np
import torch

_M64 = 0xFFFFFFFFFFFFFFFF
# splitmix64's constants (core/masks.py draws its own streams with them too)
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15  # the increment (2^64 / golden ratio)
SPLITMIX_MUL1, SPLITMIX_MUL2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # the finaliser's multipliers


def row_rng_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 steps), so nearby rows get unrelated streams."""
    h = SPLITMIX_GAMMA
    for part in parts:
        h = (h ^ (int(part) & _M64)) * SPLITMIX_MUL1 & _M64
        h = (h ^ (h >> 31)) * SPLITMIX_MUL2 & _M64
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def _splitmix_streams(seeds: np.ndarray, count: int) -> np.ndarray:
    """(len(seeds), count) uint64: the first `count` outputs of splitmix64 started at each seed.

    A counter-based generator: output k of a row depends only on that row's seed and k, so a
    whole batch is drawn with a few vectorised operations (uint64 arithmetic wraps mod 2^64).
    """
    z = seeds.astype(np.uint64)[:, None] + np.arange(1, count + 1, dtype=np.uint64) * np.uint64(SPLITMIX_GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(SPLITMIX_MUL1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(SPLITMIX_MUL2)
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
