"""The paper's distillation augmentation, keyed by (seed, row id, epoch)."""
from __future__ import annotations

import numpy as np
import torch

from dd_dist.core.splitmix import row_rng_seed, streams


def _at_least(uniform: np.ndarray, p: float) -> np.ndarray:
    """True with probability 1 - p for each uniform 64-bit draw (compares the top 53 bits, as a double would)."""
    return (uniform >> np.uint64(11)) >= np.uint64(round(p * 2**53))


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
    uniform = streams(seeds, 1 + x[0].numel())  # the first draw decides the flip, the rest the pixels
    keep, flip = _at_least(uniform[:, 1:], zero_p).reshape(x.shape), ~_at_least(uniform[:, 0], flip_p)
    # numpy does these small elementwise steps several times faster than torch on CPU, and does
    # not slow down when other processes hold the cores (torch's thread pool does).
    cpu_dtype = torch.float32 if x.dtype == torch.bfloat16 else x.dtype  # numpy has no bfloat16
    out = x.detach().to("cpu", cpu_dtype).numpy() * keep  # a new array: x is never written
    out[flip] = out[flip][..., ::-1]
    return torch.from_numpy(out).to(x.device, x.dtype)
