"""The core method in plain PyTorch: standard (weight-scaling) and MC-dropout prediction, the
soft-target KL loss, and the online single-mask targets of the paper's Algorithm 2.

MC masks are drawn by dd_dist.core.masks, not by nn.Dropout's global RNG: the mask of (row, dropout
layer, sample j) depends on (seed, row id, layer, j) only, so it is the same in any batch, order,
chunking, process, machine or device, and for any k > j.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dd_dist.core.masks import keep_masks
from dd_dist.core.precision import HALF
from dd_dist.core.splitmix import row_rng_seed


ELEMENTWISE, CHANNELWISE = (nn.Dropout,), (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)  # the dropouts MC can seed


class MCEstimate(NamedTuple):
    """One MC estimate per row: the mean softmax (B, C), its standard error (largest class) (B,), the masks
    used (B,) int64, and the mean over those masks of each mask's predictive entropy, E_k H[p_k] (B,)."""

    probs: torch.Tensor
    stderr: torch.Tensor
    k: torch.Tensor
    expected_entropy: torch.Tensor

    def uncertainty(self) -> dict[str, torch.Tensor]:
        """Its rows' MC uncertainty (`uncertainty`)."""
        return uncertainty(self.probs, self.expected_entropy)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats over the last dimension, 0 log 0 = 0."""
    return torch.special.entr(probs).sum(-1)


def uncertainty(probs: torch.Tensor, expected_entropy: torch.Tensor) -> dict[str, torch.Tensor]:
    """The MC uncertainty of each row: predictive entropy H[mean], expected entropy E_k H[p_k], and their
    difference, the mutual information between the prediction and the mask (>= 0 by Jensen; clipped at 0,
    which only a control-variate mean can undercut)."""
    predictive = entropy(probs.double())
    return {"entropy": predictive, "expected_entropy": expected_entropy.double(),
            "mutual_info": (predictive - expected_entropy.double()).clamp_min(0)}


def dropout_layers(model: nn.Module) -> list[nn.Module]:
    """Every dropout module of the model, in the order of model.modules(): MC's layer index."""
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def is_flat(model: nn.Module) -> bool:
    """A flat nn.Sequential whose dropouts are all top-level nn.Dropout: MC shares its prefix and may branch.
    Not a subclass: one may override forward(), which a module-by-module walk would skip."""
    return type(model) is nn.Sequential and all(type(m) is nn.Dropout for m in dropout_layers(model)) and \
        sum(type(m) is nn.Dropout for m in model) == len(dropout_layers(model))


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """A half-precision tensor (from an autocast forward) as float32; anything else as it is."""
    return t.float() if t.dtype in HALF.values() else t


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes, in float32 at least: under autocast only the layers round, never the probabilities."""
    return F.softmax(full_precision(logits), dim=1)


def channels_last(h: torch.Tensor) -> torch.Tensor:
    """Images channels-last: convolutions and pools on CPU run faster on them (lenet's prefix ~2x, its
    max-pools ~3x; lenet_all / allconv's masked part ~1.3x)."""
    return h.contiguous(memory_format=torch.channels_last) if h.dim() == 4 else h


def run_channels_last(modules, h: torch.Tensor) -> torch.Tensor:
    """The modules in turn on h, images between them channels-last."""
    for module in modules:
        h = channels_last(module(h))
    return h


def standard_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Weight scaling: what model.eval() does with inverted dropout."""
    model.eval()
    with torch.inference_mode():
        return softmax(run_channels_last(model, x) if type(model) is nn.Sequential else model(x))


def split_at_first_dropout(model: nn.Sequential) -> tuple[list[nn.Module], list[nn.Module]]:
    if not is_flat(model):
        raise ValueError("this needs a flat nn.Sequential whose dropouts are top-level nn.Dropout modules")
    modules = list(model)
    first = next((i for i, m in enumerate(modules) if isinstance(m, nn.Dropout)), len(modules))
    return modules[:first], modules[first:]


def check_dropouts(model: nn.Module) -> None:
    """ValueError naming a dropout module MC cannot seed (a dropout of another kind than nn.Dropout and
    nn.Dropout1d/2d/3d, e.g. AlphaDropout): in eval mode it would silently stay off and bias the estimate."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and not isinstance(module, ELEMENTWISE + CHANNELWISE):
            raise ValueError(f"MC dropout cannot seed {name or 'the model'} ({type(module).__name__}): "
                             f"use nn.Dropout or nn.Dropout2d")


@contextlib.contextmanager
def _hooked(model: nn.Module, hook):
    """Forward hooks on every dropout module: hook(layer, module, input) -> output, layer = its index."""
    handles = [m.register_forward_hook(lambda m, args, out, i=i: hook(i, m, args[0]))
               for i, m in enumerate(dropout_layers(model))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def mask_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype of the keep-masks that multiply h: on the CPU h's own (h * bool casts the whole mask to a
    copy first: ~20 % of lenet's label time), on a GPU bool (the cast is fused there; a quarter of the bytes)."""
    return h.dtype if h.device.type == "cpu" else torch.bool


def times(keep: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """keep * h, written into keep where it has h's dtype (the CPU): a new (rows, k, units) tensor for the
    product cost more than the multiply (lenet's labels 1.3x faster in place)."""
    return keep.mul_(h) if keep.dtype == h.dtype else keep * h


def masked_forward(model: nn.Module, x: torch.Tensor, masks, samples: int) -> torch.Tensor:
    """Any model with inverted dropout: x's rows each repeated `samples` times, and every dropout module
    (model in eval mode: the identity) replaced by its input times the keep-masks masks(layer, units, p, dtype)
    (rows, samples, units) and 1 / (1 - p); units are the elements of a row for nn.Dropout and its
    channels for nn.Dropout1d/2d/3d. A dropout module that runs twice in one forward is refused: its
    two uses would share one mask."""
    calls = set()

    def mask(layer, module, h):
        if layer in calls:
            raise ValueError(f"a {type(module).__name__} module runs twice in one forward pass: give each use "
                             f"its own module (MC draws one mask per module and row)")
        calls.add(layer)
        channels = isinstance(module, CHANNELWISE)
        units = h.shape[1] if channels else h[0].numel()
        keep = masks(layer, units, module.p, mask_dtype(h)).to(h.device)
        shape = (len(h), units, *[1] * (h.dim() - 2)) if channels else h.shape
        return h * keep.reshape(shape) * (1 / (1 - module.p) if module.p < 1 else 0.0)

    with _hooked(model, mask):
        return model(x.repeat_interleave(samples, dim=0))


def widest_in_forward(model: nn.Module, x1: torch.Tensor) -> int:
    """Largest per-sample output of any module of the model in a one-row forward pass (dropout off)."""
    widest = [x1[0].numel()]

    def record(module, args, out):
        if isinstance(out, torch.Tensor):
            widest.append(out[0].numel())

    handles = [m.register_forward_hook(record) for m in model.modules()]
    try:
        model(x1)
    finally:
        for handle in handles:
            handle.remove()
    return max(widest)


class MaskedModel:
    """How MC runs a model under given masks. A flat nn.Sequential runs the modules before its first
    dropout once per input (prefix sharing) and the rest on rows x samples (run_masked, which can also
    branch: mask trees); any other nn.Module runs whole on rows x samples with its dropout modules'
    outputs masked by forward hooks (masked_forward). Either way a row's masks come from keep_masks with
    the dropout's index in model.modules(), so both give the same result on the same net."""

    def __init__(self, model: nn.Module):
        check_dropouts(model)
        self.model, self.flat = model.eval(), is_flat(model)
        self.prefix, self.rest = split_at_first_dropout(model) if self.flat else ([], [model])

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """What runs once per input: the flat net's prefix, else x itself."""
        return run_channels_last(self.prefix, x)

    def run(self, h: torch.Tensor, masks, samples: int) -> torch.Tensor:
        return run_masked(self.rest, h, masks, samples) if self.flat else masked_forward(self.model, h, masks, samples)

    def widest(self, h1: torch.Tensor) -> int:
        return widest_activation(self.rest, h1) if self.flat else widest_in_forward(self.model, h1)

    def plain(self, h: torch.Tensor) -> torch.Tensor:
        """The output without masks (eval mode), from what shared() gave."""
        return run_channels_last(self.rest, h)


def run_masked(modules, h, masks, samples: int) -> torch.Tensor:
    """Run modules with inverted dropout, masks(layer, units, p, dtype) giving the (rows, samples, units)
    keep-masks of the layer-th dropout (mask_dtype), a new tensor each call (times() may overwrite it). h has one
    row per input until the first dropout broadcasts it to rows*samples rows: cheaper than copying h for each
    sample and then masking the copy. A later layer may get more samples per row than the one above (a mask
    tree, MCScheme.fanout): each sample then branches into that many, its children next to each other."""
    layer, expanded = 0, False
    for module in modules:
        if not isinstance(module, nn.Dropout):
            h = module(h)
            continue
        shape = h.shape[1:]
        keep = masks(layer, shape.numel(), module.p, mask_dtype(h)).to(h.device)
        scale = 1 / (1 - module.p) if module.p < 1 else 0.0
        if expanded:
            branches = keep.shape[0] * keep.shape[1] // len(h)
            if branches > 1:
                h = h.repeat_interleave(branches, dim=0)
            h = h.mul_(keep.view(h.shape)).mul_(scale)  # in place: h is this function's own (and keeps its layout)
        else:
            h = channels_last(times(keep, (h * scale).reshape(len(h), 1, -1)).view(-1, *shape))
        layer, expanded = layer + 1, True
    return h if expanded else h.repeat_interleave(samples, dim=0)


def widest_activation(modules, h1: torch.Tensor) -> int:
    """Largest per-sample activation among h1 and the modules' outputs: a one-row dry run, dropout off."""
    widest = h1[0].numel()
    for module in modules:
        h1 = module(h1)
        widest = max(widest, h1[0].numel())
    return widest


def mc_probs(model: nn.Module, x: torch.Tensor, row_ids, k: int, seed: int,
             return_stderr: bool = False, max_elems: int = 2**22):
    """MC dropout: the mean over k masks of the softmax probabilities (never of the logits), (B, C);
    with return_stderr also each row's MC standard error (see mc_estimate)."""
    estimate = mc_estimate(model, x, row_ids, k, seed, max_elems)
    return (estimate.probs, estimate.stderr) if return_stderr else estimate.probs


def mc_estimate(model: nn.Module, x: torch.Tensor, row_ids, k: int, seed: int, max_elems: int = 2**22) -> MCEstimate:
    """MC dropout with k masks per row: the mean softmax, its standard error (max over classes of
    std_k(prob) / sqrt(k), unbiased std; 0 when k == 1) and the expected entropy E_k H[p_k].

    Any nn.Module whose dropouts are nn.Dropout / nn.Dropout2d modules (MaskedModel); in a flat
    nn.Sequential the modules before the first dropout run once per input (prefix sharing). The rest
    runs on rows x k samples at once, in chunks of rows with k * rows * (largest activation) <= max_elems
    (at least one row), so tensors stay cache-sized and the allocator reuses them. A row's k samples
    always run together, so chunking does not change the result.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    model.eval()  # batch norm and friends keep their inference behaviour; masks come from keep_masks
    ids = torch.as_tensor(row_ids).tolist()
    if len(ids) != len(x):
        raise ValueError(f"{len(ids)} row ids for {len(x)} inputs")
    net = MaskedModel(model)
    means, errors, entropies = [], [], []
    with torch.inference_mode():
        h = net.shared(x)
        if not ids:  # an empty batch: nothing to sample, but the caller still gets (0, C)
            out = full_precision(net.plain(h))
            return MCEstimate(out, out[:, 0], torch.zeros(0, dtype=torch.int64), out[:, 0])
        chunk = max(1, max_elems // (k * net.widest(h[:1])))
        for start in range(0, len(ids), chunk):
            rows = ids[start : start + chunk]
            masks = lambda layer, n, p, dtype: keep_masks(rows, layer, k, n, p, seed,  # noqa: E731
                                                          device=x.device, dtype=dtype)
            logits = net.run(h[start : start + chunk], masks, k)
            probs = softmax(logits).view(len(rows), k, -1)
            means.append(probs.mean(1))
            spread = probs.std(1).amax(1) if k > 1 else probs.new_zeros(len(rows))
            errors.append(spread / math.sqrt(k))
            entropies.append(entropy(probs).mean(1))
    mean = torch.cat(means)
    return MCEstimate(mean, torch.cat(errors), torch.full((len(mean),), k, dtype=torch.int64), torch.cat(entropies))


def mc_probs_naive(model: nn.Module, x: torch.Tensor, row_ids, k: int, seed: int) -> torch.Tensor:
    """The same masks as mc_probs, but k full forward passes of the whole model in a Python loop, each
    dropout masked by a hook (masked_forward): the test reference."""
    MaskedModel(model)  # the same structural checks
    ids = torch.as_tensor(row_ids).tolist()
    draw = functools.cache(lambda layer, n, p, dtype: keep_masks(ids, layer, k, n, p, seed, device=x.device,
                                                                 dtype=dtype))
    with torch.inference_mode():
        passes = [masked_forward(model, x, lambda layer, n, p, dtype, j=j: draw(layer, n, p, dtype)[:, j : j + 1], 1)
                  for j in range(k)]
        return sum(F.softmax(logits, dim=1) for logits in passes) / k


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


def online_targets(teacher: nn.Module, x: torch.Tensor, row_ids, seed: int, step: int) -> torch.Tensor:
    """Algorithm 2: the teacher's probabilities under ONE fresh mask per example and step."""
    # clone() outside inference mode: targets must be ordinary tensors to enter an autograd graph
    return mc_probs(teacher, x, row_ids, 1, row_rng_seed(seed, step)).clone()
