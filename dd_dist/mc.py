"""The core method in plain PyTorch: standard (weight-scaling) and MC-dropout prediction, the
soft-target KL loss, and the online single-mask targets of the paper's Algorithm 2.

MC masks are drawn by this code, not by nn.Dropout's global RNG: the masks of (row, dropout layer)
come from generators seeded by (seed, row id, layer) and read sample after sample, so the mask of
(row, layer, sample j) is the same in any batch, order, chunking, process or machine, and for any k > j.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dd_dist.data import row_rng_seed


def dropout_layers(model: nn.Module) -> list[nn.Dropout]:
    return [m for m in model.modules() if isinstance(m, nn.Dropout)]


def standard_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Weight scaling: what model.eval() does with inverted dropout."""
    model.eval()
    with torch.inference_mode():
        return F.softmax(model(x), dim=1)


def keep_masks(row_ids: list[int], layer: int, k: int, n: int, p: float, seed: int) -> torch.Tensor:
    """(rows, k, n) boolean keep-masks of one dropout layer with n units; each unit is dropped with probability p.

    Drawing K*B*units random values is the cost of MC dropout, so a unit gets 8 random bits, not a
    32-bit float (about 7x cheaper): dropped if its byte is below floor(256p), kept if above, and a
    tie (probability 1/256) is settled by a float uniform from a second per-row stream, so p is exact.
    """
    cut = math.floor(256 * p)
    tie_p = 256 * p - cut
    words = torch.empty(len(row_ids), -(-k * n // 8), dtype=torch.int64)
    gen = torch.Generator()
    for i, row in enumerate(row_ids):
        gen.manual_seed(row_rng_seed(seed, row, layer))
        words[i].random_(-(2**63), None, generator=gen)  # the full 64-bit range: 8 uniform bytes a word
    byte = words.view(torch.uint8)[:, : k * n]
    if not tie_p:
        return byte.ge(cut).view(-1, k, n)
    keep, ties = byte > cut, byte == cut
    draws = []
    for row, count in zip(row_ids, ties.sum(1).tolist()):
        gen.manual_seed(row_rng_seed(seed, row, layer, 1))
        draws.append(torch.rand(count, generator=gen))
    keep[ties] = torch.cat(draws) >= tie_p  # boolean indexing is row-major: each row's ties in sample order
    return keep.view(-1, k, n)


def _split_at_first_dropout(model: nn.Sequential) -> tuple[list[nn.Module], list[nn.Module]]:
    modules = list(model)
    top = [m for m in modules if isinstance(m, nn.Dropout)]
    nested = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if len(nested) != len(top) or any(type(m) is not nn.Dropout for m in nested):
        # a dropout this code cannot see would silently stay off (eval mode) and bias the MC estimate
        raise ValueError("MC dropout needs a flat nn.Sequential whose dropouts are top-level nn.Dropout modules")
    first = next((i for i, m in enumerate(modules) if isinstance(m, nn.Dropout)), len(modules))
    return modules[:first], modules[first:]


def _run(modules, h, row_ids: list[int], k: int, seed: int, expanded: bool, sample: int | None = None):
    """Run modules with this code's masks (inverted dropout); the first dropout index is 0.

    If not `expanded`, h holds one row per input and the first dropout broadcasts it to rows*k samples
    (cheaper than copying h k times and masking the copy). `sample` keeps only mask j of k (naive path).
    """
    layer = 0
    for module in modules:
        if not isinstance(module, nn.Dropout):
            h = module(h)
            continue
        p, shape = module.p, h.shape[1:]
        if p > 0:
            keep = keep_masks(row_ids, layer, k, shape.numel(), p, seed).to(h.device)
            if sample is not None:
                keep = keep[:, sample : sample + 1]
            scale = 1 / (1 - p) if p < 1 else 0.0
            if expanded:
                h = (h * keep.view(h.shape)).mul_(scale)
            else:
                h = ((h * scale).view(len(row_ids), 1, -1) * keep).view(-1, *shape)
        elif not expanded:
            h = h.repeat_interleave(k, dim=0)
        expanded, layer = True, layer + 1
    return h if expanded else h.repeat_interleave(k, dim=0)


def _widest(modules, h1: torch.Tensor) -> int:
    """Largest per-sample activation size among modules' outputs, from a one-row dry run."""
    widest = h1[0].numel()
    for module in modules:
        h1 = module(h1)
        widest = max(widest, h1[0].numel())
    return widest


def mc_probs(model: nn.Sequential, x: torch.Tensor, row_ids, k: int, seed: int,
             return_stderr: bool = False, max_elems: int = 2**22):
    """MC dropout: the mean over k masks of the softmax probabilities (never of the logits), (B, C).

    With return_stderr also each row's MC standard error: max over classes of std_k(prob) / sqrt(k)
    (unbiased std; 0 when k == 1). The modules before the first dropout run once per input (prefix
    sharing); the rest runs on rows x k masks at once, in chunks of rows so that k * rows * (largest
    activation) <= max_elems: tensors stay cache-sized and the allocator reuses them. Chunking does
    not change the result.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    model.eval()  # batch norm and friends keep their inference behaviour; masks come from keep_masks
    ids = torch.as_tensor(row_ids).tolist()
    prefix, rest = _split_at_first_dropout(model)
    means, errors = [], []
    with torch.inference_mode():
        h = nn.Sequential(*prefix)(x)
        chunk = max(1, max_elems // (k * _widest(rest, h[:1])))
        for start in range(0, len(ids), chunk):
            rows = ids[start : start + chunk]
            logits = _run(rest, h[start : start + chunk], rows, k, seed, expanded=False)
            probs = F.softmax(logits, dim=1).view(len(rows), k, -1)
            means.append(probs.mean(1))
            if return_stderr:
                spread = probs.std(1).amax(1) if k > 1 else probs.new_zeros(len(rows))
                errors.append(spread / math.sqrt(k))
    mean = torch.cat(means)
    return (mean, torch.cat(errors)) if return_stderr else mean


def mc_probs_naive(model: nn.Sequential, x: torch.Tensor, row_ids, k: int, seed: int) -> torch.Tensor:
    """The same masks as mc_probs, but k full forward passes in a Python loop: the test reference."""
    model.eval()
    ids = torch.as_tensor(row_ids).tolist()
    _split_at_first_dropout(model)  # same structural check
    with torch.inference_mode():
        return sum(F.softmax(_run(model, x, ids, k, seed, expanded=True, sample=j), dim=1) for j in range(k)) / k


def naive_mc_loop(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """Textbook MC dropout (the benchmark baseline): eval mode, dropout modules back in train mode, k passes."""
    model.eval()
    for m in dropout_layers(model):
        m.train()
    try:
        with torch.inference_mode():
            return sum(F.softmax(model(x), dim=1) for _ in range(k)) / k
    finally:
        model.eval()


def soft_target_kl(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(target || softmax(student)); no temperature, 0 log 0 = 0."""
    log_q = F.log_softmax(student_logits, dim=1)
    return (torch.xlogy(target_probs, target_probs) - target_probs * log_q).sum(1).mean()


def online_targets(teacher: nn.Sequential, x: torch.Tensor, row_ids, seed: int, step: int) -> torch.Tensor:
    """Algorithm 2: the teacher's probabilities under ONE fresh mask per example and step."""
    # clone() outside inference mode: targets must be ordinary tensors to enter an autograd graph
    return mc_probs(teacher, x, row_ids, 1, row_rng_seed(seed, step)).clone()
