"""Per-row randomness: splitmix64 as a counter-based generator.

Draw c of the stream seeded s is mix(s + c * GAMMA), a pure function of (s, c): a row's draws (its
augmentation, its MC masks) are the same in any batch, order, chunking, process, machine or device.
The same bits three ways: Python ints (row_rng_seed: a few per batch), numpy uint64 (draws: the CPU,
where its logical shifts and vectorised 64-bit products hash 1.7x as fast as torch's int64) and
torch int64 (draws_torch: a GPU; tested against draws on the CPU).
"""
from __future__ import annotations

import numpy as np
import torch

_M64 = 0xFFFFFFFFFFFFFFFF
GAMMA = 0x9E3779B97F4A7C15  # the increment (2^64 / golden ratio)
MUL1, MUL2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # the finaliser's multipliers
_STEPS = ((30, MUL1), (27, MUL2), (31, None))  # the finaliser: z ^= z >> shift, then z *= multiplier


def row_rng_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 steps), so nearby rows get unrelated streams."""
    h = GAMMA
    for part in parts:
        h = (h ^ (int(part) & _M64)) * MUL1 & _M64
        h = (h ^ (h >> 31)) * MUL2 & _M64
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def draws(seeds: np.ndarray | int, counters: np.ndarray) -> np.ndarray:
    """uint64 draws `counters` of the streams seeded `seeds` (uint64, broadcast against each other): in place
    after the first step, with one scratch array. uint64 products wrap mod 2^64."""
    z = np.add(seeds, counters * np.uint64(GAMMA))
    scratch = np.empty_like(z)
    for shift, multiplier in _STEPS:
        np.right_shift(z, np.uint64(shift), out=scratch)
        z ^= scratch
        if multiplier:
            z *= np.uint64(multiplier)
    return z


def streams(seeds: np.ndarray, count: int) -> np.ndarray:
    """(len(seeds), count) uint64: draws 1..count of the stream of each of seeds."""
    return draws(seeds[:, None], np.arange(1, count + 1, dtype=np.uint64))


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 with the same bits (torch has no uint64 products)."""
    value &= _M64
    return value - 2**64 if value >= 2**63 else value


def draws_torch(seeds: torch.Tensor | int, counters: torch.Tensor) -> torch.Tensor:
    """draws in torch on any device: int64 tensors holding the same bits. torch's >> is arithmetic: masking its
    copies of the sign bit makes it logical."""
    z = seeds + counters * _signed(GAMMA)
    scratch = torch.empty_like(z)
    for shift, multiplier in _STEPS:
        torch.bitwise_right_shift(z, shift, out=scratch)
        scratch &= (1 << (64 - shift)) - 1
        z ^= scratch
        if multiplier:
            z *= _signed(multiplier)
    return z
