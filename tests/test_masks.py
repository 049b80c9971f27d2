"""The counter-based MC mask generator: its bits against a plain-Python splitmix64, its drop probability,
its independence of batch and device, and labels of the older generator refused in one line."""
import json

import numpy
import pytest
import torch

from dd_dist.core.masks import (CACHE_WORDS, PLANES, _drop_bits, drop_bits, keep_masks, unpack, unpack_by_table, words,
                                words_torch)
from dd_dist.core.splitmix import row_rng_seed
from dd_dist.errors import UserError
from dd_dist.labels.format import MANIFEST, OLD_FORMAT, manifest_digest, read_manifest

M64 = 2**64 - 1


def splitmix_output(state: int) -> int:
    z = state & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def reference_keep(row: int, layer: int, k: int, n: int, p: float, seed: int, complement: bool = False):
    """keep_masks of one row, the plain way: unit u of sample j reads bit (j*n + u) of each bit plane's
    stream and is dropped when those bits, read as a 16-bit number u, fall below round(p * 2^16)."""
    cut = round(p * 2**PLANES)
    keep = []
    for j in range(k):
        row_masks = []
        for unit in range(n):
            bit = j * n + unit
            value = 0
            for plane in range(1, PLANES + 1):
                start = splitmix_output(row * 0x9E3779B97F4A7C15 + row_rng_seed(seed, layer, plane))
                word = splitmix_output(start + (bit // 64 + 1) * 0x9E3779B97F4A7C15)
                value |= ((word >> (bit % 64)) & 1) << (plane - 1)  # the complement of u's bit
            u = (2**PLANES - 1 - value) if not complement else value
            row_masks.append(u >= cut)
        keep.append(row_masks)
    return torch.tensor(keep)


@pytest.mark.parametrize("p", [0.5, 0.3, 0.8])
def test_mask_bits_are_splitmix64_streams_of_seed_layer_and_row(p):
    rows = [0, 7, 2**40 + 3]
    masks = keep_masks(rows, 2, 3, 70, p, seed=11)  # 210 bits a row: across word boundaries
    for i, row in enumerate(rows):
        assert torch.equal(masks[i], reference_keep(row, 2, 3, 70, p, 11))
    partners = keep_masks(rows, 2, 6, 70, p, seed=11, antithetic=True)[:, 1::2]
    assert torch.equal(partners[1], reference_keep(7, 2, 3, 70, p, 11, complement=True))


@pytest.mark.parametrize("antithetic", [False, True])
def test_a_row_gets_the_same_masks_alone_and_in_a_batch_of_many_cpu_blocks(antithetic):
    """The CPU hashes CACHE_WORDS // words rows at a time: here 300 rows in blocks of 16 (32 antithetic:
    half the words)."""
    rows, (k, n) = torch.arange(300) * 5 + 2**35, (64, 4000)
    block = CACHE_WORDS // (k // (1 + antithetic) * n // 64)
    assert 1 < block < len(rows) // 2
    batch = keep_masks(rows, 1, k, n, 0.3, seed=2, antithetic=antithetic)
    for i in (0, block - 1, block, 150, 299):  # a block's first and last rows, and the next block's first
        assert torch.equal(batch[i : i + 1], keep_masks(rows[i : i + 1], 1, k, n, 0.3, seed=2, antithetic=antithetic))


@pytest.mark.parametrize("p", [0.5, 0.25, 0.125])
def test_a_dyadic_p_is_drawn_exactly(p):
    """For p = j / 2^16 the drop rate is p exactly: checked against the binomial's spread on 4M units."""
    keep = keep_masks(torch.arange(400), 0, 100, 100, p, seed=3)
    rate = 1 - keep.double().mean().item()
    assert abs(rate - p) < 4 * (p * (1 - p) / keep.numel()) ** 0.5


def test_masks_are_uncorrelated_across_units_samples_rows_and_layers():
    keep = keep_masks(torch.arange(200), 1, 64, 64, 0.5, seed=5).double() - 0.5
    other_layer = keep_masks(torch.arange(200), 2, 64, 64, 0.5, seed=5).double() - 0.5
    bound = 4 * 0.25 / keep.numel() ** 0.5  # 4 standard errors of a product of two independent +-1/2
    for a, b in ((keep[:, :, 1:], keep[:, :, :-1]), (keep[:, 1:], keep[:, :-1]), (keep[1:], keep[:-1]),
                 (keep, other_layer)):
        assert abs((a * b).mean().item()) < bound * (keep.numel() / a.numel()) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_masks_in_the_activations_dtype_are_the_boolean_masks(dtype):
    """The MC code asks for masks in the dtype they multiply (no cast on the CPU): the same 0/1 values."""
    for p, antithetic, n in ((0.5, False, 70), (0.3, True, 64), (0.0, False, 5), (1.0, False, 5)):
        keep = keep_masks([3, 11, 2**33], 2, 6, n, p, seed=9, antithetic=antithetic, dtype=dtype)
        assert keep.dtype == dtype and keep.is_contiguous()
        assert torch.equal(keep, keep_masks([3, 11, 2**33], 2, 6, n, p, seed=9, antithetic=antithetic).to(dtype))


def test_the_torch_words_a_gpu_hashes_are_the_numpy_words_of_the_cpu():
    """A GPU draws the bit planes with torch's int64 arithmetic, the CPU with numpy's uint64: the same bits."""
    rows = [0, 1, 7, 2**31 + 5, 2**40 + 3, 2**62 + 1]
    for stream in (0, 1, row_rng_seed(3, 1, 16), 2**63 - 1):
        cpu = words(numpy.array(rows), stream, 130)
        assert torch.equal(words_torch(torch.tensor(rows), stream, 130), torch.from_numpy(cpu.view(numpy.int64)))
        assert cpu[2, 4] == splitmix_output(splitmix_output(7 * 0x9E3779B97F4A7C15 + stream) + 5 * 0x9E3779B97F4A7C15)
    # and the planes combined as a GPU combines them (its whole path, bar the device)
    for p, antithetic in ((0.5, False), (0.3, True), (0.2, False)):
        cut = round(p * 2**PLANES)
        gpu_way = _drop_bits(words_torch, torch.tensor(rows), 2, 9, cut, 5, antithetic)
        cpu_way = drop_bits(torch.tensor(rows), 2, 9 * 64, p, 5, antithetic)
        assert len(gpu_way) == len(cpu_way) == 1 + antithetic
        assert all(torch.equal(a, b) for a, b in zip(gpu_way, cpu_way))


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.bfloat16])
def test_the_byte_table_that_unpacks_on_a_gpu_unpacks_as_numpy_does_on_the_cpu(dtype):
    packed = torch.randint(-(2**63), 2**63 - 1, (5, 9), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    for n in (1, 63, 64, 65, 9 * 64 - 3, 9 * 64):
        assert torch.equal(unpack_by_table(packed, n, dtype), unpack(packed, n, dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_masks_are_bit_identical():
    rows = torch.arange(1000) * 7919
    for p, antithetic in ((0.5, False), (0.3, True), (0.2, False)):
        cpu = keep_masks(rows, 1, 20, 300, p, seed=4, antithetic=antithetic)
        cuda = keep_masks(rows.cuda(), 1, 20, 300, p, seed=4, antithetic=antithetic, device="cuda")
        assert cuda.is_cuda and torch.equal(cpu, cuda.cpu())


def test_labels_of_the_older_mask_generator_are_refused_in_one_line(tmp_path):
    body = {"format": OLD_FORMAT, "teacher": {}, "data": {}, "augmentation": {}, "k": 1, "seed": 0, "storage": {},
            "rows": 0, "shards": []}
    (tmp_path / MANIFEST).write_text(json.dumps({**body, "digest": manifest_digest(body)}))
    with pytest.raises(UserError, match=f"holds {OLD_FORMAT} labels, whose MC masks .* label again") as refused:
        read_manifest(tmp_path)
    assert "\n" not in str(refused.value)
