"""MC dropout's keep-masks, drawn on the model's device by a counter-based generator.

Every mask bit is a pure function of (seed, layer, row id, sample j, unit): bit b = j * units + unit of a
splitmix64 stream per (seed, layer, row, bit plane), in its word b // 64 at bit b % 64. So a row's masks are the
same in any batch, order, chunking, process, machine or device, and sample j does not depend on k.
It is integer arithmetic on 64-bit words (core/splitmix.py), with no Python loop over rows: numpy's uint64 on
the CPU, a cache-sized block of rows at a time, and torch's int64 on a GPU, every row in each launch. The bits
are the same (tests/test_masks.py checks both on the CPU).

One 64-bit word decides 64 units at once (bit-sliced): a unit is dropped when its 16-bit uniform u,
one bit from each of up to PLANES words, is below t = round(p * 2^16), compared bit by bit from the
lowest set bit of t upwards. Dropout at p = 0.5 costs one word per 64 units, p = 0.25 two; a p that
is no multiple of 2^-16 (0.2) is rounded to the nearest one, within 2^-17 of p, far below MC's noise.
Antithetic partners use the complemented words, u' = 2^16 - 1 - u: each still drops a unit with the
same probability; at p = 0.5 the partner is the complement, and for p < 0.5 no unit is dropped by both.
"""
from __future__ import annotations

import functools
import operator

import numpy
import torch

from dd_dist.core.splitmix import draws, draws_torch, row_rng_seed, streams

PLANES = 16  # bits of precision of p
CACHE_WORDS = 1 << 16  # a CPU block's words per bit plane: 512 KiB, so that its few arrays stay in a core's cache


def words(row_ids: numpy.ndarray, stream: int, count: int) -> numpy.ndarray:
    """(rows, count) uint64: draws 1..count of each row's stream, which is seeded by draw `row id` of `stream`."""
    return streams(draws(stream, row_ids.astype(numpy.uint64)), count)  # a stream per row


def words_torch(row_ids: torch.Tensor, stream: int, count: int) -> torch.Tensor:
    """words in torch, on row_ids' device: (rows, count) int64 of the same bits."""
    start = draws_torch(stream, row_ids.to(torch.int64))
    return draws_torch(start[:, None], torch.arange(1, count + 1, dtype=torch.int64, device=row_ids.device))


@functools.cache
def _byte_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Byte b's 8 bits as 0/1 of dtype, bit i at position i (little-endian words), row b read as int64 words
    (index_select moves whole rows); 8 bools are one int64, so that table is 1-D: index_select's fastest path (2x)."""
    table = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(device=device, dtype=dtype).view(torch.int64)
    return table.view(-1) if table.shape[1] == 1 else table


def unpack(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """(rows, n) 0/1 of dtype, contiguous, of the first n bits of each row of (rows, words) int64, bit i of
    word w at w * 64 + i. On the CPU numpy's unpackbits (up to twice as fast as the byte table); elsewhere each
    byte is looked up as its 8 values at once (_byte_table: several times faster than indexing)."""
    if packed.device.type != "cpu":
        return unpack_by_table(packed, n, dtype)
    as_bytes = packed.contiguous().numpy().view(numpy.uint8)
    bits = torch.from_numpy(numpy.unpackbits(as_bytes, axis=1, count=n, bitorder="little"))
    return bits.view(torch.bool) if dtype == torch.bool else bits.to(dtype)


def unpack_by_table(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """unpack on any device, in torch alone."""
    as_bytes = packed.contiguous().view(torch.uint8)[:, : -(-n // 8)]
    # int32 indices: half the bytes of int64
    values = _byte_table(packed.device, dtype).index_select(0, as_bytes.int().reshape(-1))
    values = values.view(dtype).view(len(packed), -1)
    return values if values.shape[1] == n else values[:, :n].contiguous()


def drop_bits(row_ids: torch.Tensor, layer: int, bits: int, p: float, seed: int,
              antithetic: bool = False) -> list[torch.Tensor]:
    """[(rows, ceil(bits / 64)) int64] whose bits are set where a unit is dropped (with probability
    round(p * 2^16) / 2^16); antithetic: a second one, the partners' drop bits from the complemented
    uniforms of the same words (each plane's words are hashed once for both)."""
    count, cut = -(-bits // 64), round(p * 2**PLANES)
    if row_ids.device.type != "cpu":  # a GPU takes every row in each launch
        return _drop_bits(words_torch, row_ids, layer, count, cut, seed, antithetic)
    # numpy on the CPU (core/splitmix.py says why), a few rows at a time, so that the hash's passes over a
    # plane's words run in the core's cache (1.1x faster than all rows at once at p = 0.5, 1.5x at p = 0.2)
    ids, rows = row_ids.numpy(), max(1, CACHE_WORDS // count)
    blocks = [_drop_bits(words, ids[i : i + rows], layer, count, cut, seed, antithetic)
              for i in range(0, max(len(ids), 1), rows)]  # no rows: one empty block
    # one block (an MC chunk that fits the cache, as lenet's labels do) is returned as it is, not copied
    return [torch.from_numpy((parts[0] if len(blocks) == 1 else numpy.concatenate(parts)).view(numpy.int64))
            for parts in zip(*blocks)]


def _drop_bits(plane_words, row_ids, layer: int, count: int, cut: int, seed: int, antithetic: bool) -> list:
    """drop_bits of some rows, `count` words each, dropping where the 16-bit uniform is below `cut`: numpy arrays
    from words, or tensors from words_torch (plane_words)."""
    dropped = []
    lowest = (cut & -cut).bit_length()  # the plane of t's lowest set bit, counted from its least significant
    for plane in range(lowest, PLANES + 1):  # weight 2^(plane - 1 - PLANES), least significant first
        v = plane_words(row_ids, row_rng_seed(seed, layer, plane), count)
        # u < t, compared from this bit upwards: v is the complement of u's bit (as uniform as u's bit); the
        # partner's uniform is u's complement, whose bit's complement is ~v
        planes = [v, ~v] if antithetic else [v]
        combine = operator.ior if (cut >> (plane - 1)) & 1 else operator.iand
        # in place (each of dropped is its own array, a first plane's v or ~v): no new array per plane
        dropped = planes if not dropped else [combine(d, w) for d, w in zip(dropped, planes)]
    return dropped


def keep_masks(row_ids, layer: int, k: int, n: int, p: float, seed: int, antithetic: bool = False,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """(rows, k, n) keep-masks (1 keeps) of one dropout layer with n units on `device`; each unit is dropped
    with probability p (rounded to 16 bits, see above), as 0/1 of dtype (that of what they multiply saves a cast).

    antithetic (k even): samples 2i and 2i+1 are a pair: sample 2i is sample i of the plain stream
    (keep_masks with k / 2), sample 2i+1 its partner from the complemented uniforms."""
    if antithetic and k % 2:
        raise ValueError(f"antithetic masks come in pairs: k must be even, got {k}")
    ids = torch.as_tensor(row_ids, dtype=torch.int64, device=device)
    cut = round(p * 2**PLANES)
    if cut in (0, 2**PLANES):  # nothing to draw
        return torch.full((len(ids), k, n), cut == 0, dtype=dtype, device=ids.device)
    base = k // 2 if antithetic else k
    # each drop_bits tensor is its own: complemented in place into the keep bits
    keep = [unpack(d.bitwise_not_(), base * n, dtype).view(-1, base, n)
            for d in drop_bits(ids, layer, base * n, p, seed, antithetic)]
    return (torch.stack(keep, 2) if antithetic else keep[0]).reshape(-1, k, n)
