"""MC keep-masks drawn per second: the counter-based generator (dd_dist.core.masks) against the per-row
torch generators it replaced (labels format dd-dist-labels/1, kept here verbatim as the baseline).

    .venv/bin/python -m benchmarks.masks

One thread; a label batch of lenet's first dropout layer (256 rows x K=100 masks x 500 units), the boolean
(rows, K, units) tensor the MC code consumes, at p = 0.5 (every config here) and p = 0.2 (no multiple of 2^-k):
the fastest of 24 calls each, in rounds of 6 calls of the old and of the new.
Part of `make bench`; on its own it prints the figures.
"""
from __future__ import annotations

import math
import time

import torch

from dd_dist.core.masks import keep_masks
from dd_dist.core.splitmix import row_rng_seed

ROWS, K, UNITS, ROUNDS, CALLS = 256, 100, 500, 4, 6


def per_row_keep_masks(row_ids: list[int], layer: int, k: int, n: int, p: float, seed: int) -> torch.Tensor:
    """The generator of dd-dist-labels/1: a torch.Generator per row seeded by (seed, row, layer), 8 bits
    a unit, ties at floor(256p) settled by float uniforms from a second per-row stream."""
    words = torch.empty(len(row_ids), -(-k * n // 8), dtype=torch.int64)
    gen = torch.Generator()
    for i, row in enumerate(row_ids):
        gen.manual_seed(row_rng_seed(seed, row, layer))
        words[i].random_(-(2**63), None, generator=gen)
    byte = words.view(torch.uint8)[:, : k * n]
    cut = math.floor(256 * p)
    tie_p = 256 * p - cut
    if not tie_p:
        return byte.ge(cut).view(-1, k, n)
    keep, ties = byte > cut, byte == cut
    draws = []
    for row, count in zip(row_ids, ties.sum(1).tolist()):
        gen.manual_seed(row_rng_seed(seed, row, layer, 1))
        draws.append(torch.rand(count, generator=gen))
    keep[ties] = torch.cat(draws) >= tie_p
    return keep.view(-1, k, n)


def fastest_seconds(old, new) -> tuple[float, float]:
    """Each draw's fastest call, in ROUNDS rounds of CALLS calls of one, then of the other: load from other
    processes falls on both alike and least on the fastest call, and within a round each draw runs in its own
    steady state, as in a labelling loop (call by call, each would find the allocator as the other left it)."""
    best = [math.inf, math.inf]
    for _ in range(ROUNDS):
        for i, draw in enumerate((old, new)):
            for _ in range(CALLS):
                began = time.perf_counter()
                draw()
                best[i] = min(best[i], time.perf_counter() - began)
    return best[0], best[1]


def measure() -> dict:
    torch.set_num_threads(1)
    ids = list(range(ROWS))
    out = {"rows": ROWS, "k": K, "units": UNITS}
    for p in (0.5, 0.2):
        old, new = (ROWS * K * UNITS / s for s in fastest_seconds(lambda: per_row_keep_masks(ids, 0, K, UNITS, p, 0),
                                                                   lambda: keep_masks(ids, 0, K, UNITS, p, 0)))
        out[f"p={p}"] = {"per_row_generators_per_s": old, "counter_based_per_s": new, "speedup": new / old}
        print(f"masks p={p}: per-row generators {old / 1e6:.0f} M/s, counter-based {new / 1e6:.0f} M/s "
              f"({new / old:.1f}x)", flush=True)
    return out


if __name__ == "__main__":
    measure()
