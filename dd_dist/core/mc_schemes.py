"""Cheaper MC labels at equal quality: variance-reduced and adaptive-K estimates of E_sigma[softmax(f_sigma(x))].

A scheme (dd_dist.schemes.MCScheme) switches on, each on its own:

- antithetic masks: masks come in pairs (keep_masks(..., antithetic=True)): the second of a pair
  drops a unit when the first's uniform u, reflected to 1 - u, falls below p. Each mask still drops
  each unit with the same probability (dd_dist.core.masks), so each sample is still an unbiased draw of f_sigma(x); a
  pair is averaged into one "unit" of the estimate.
- a control variate: y = f - g with g = J(zbar) (z - zbar), the first-order expansion of the softmax
  f around zbar, where z are a sample's logits and zbar = E[z | the masks of every dropout but the
  last] = the logits with the last dropout weight-scaled (its mask averaged out). That conditional
  mean is exact when everything after the last dropout is affine (the Linear output layer of mlp,
  lenet, lenet_all, cifar_quick), so E[g] = 0 exactly and y has the mean of f. The coefficient is
  fixed at 1: fitting it per row and class (Cov(f, g) / Var(g)) on a handful of samples made the
  labels worse on MNIST lenet_all (see benchmarks/results/label_efficiency.md), and a coefficient
  fitted on the samples it corrects is biased by O(1/K). The mean of y sums to 1 but a class can in
  principle come out below 0 (a mask that swings a minority class's logit far up): such a class is
  clipped at 0 and the row renormalised, the one departure from an unbiased estimate (it never
  happened on 1,000 MNIST rows at K = 10..50 nor on the enumerable test net).
- a mask tree (fanout): the masks of the first dropout are K full samples; each sample of the 2nd
  dropout layer branches into fanout[0] masks, each of those into fanout[1] at the 3rd, and so on,
  so the layers after a dropout run once per branch and the label is the mean over all K * prod(fanout)
  leaves. Each leaf is an exact draw of every layer's mask (the layers' masks come from independent
  streams), so the mean stays unbiased, and the K first-layer subtrees are independent units of the
  standard error. On lenet_all the conv layer after the first dropout costs ~8x the rest, while much
  of the spread comes from the later dropouts: cheap masks there buy most of the quality
  (benchmarks/results/label_efficiency.md). With antithetic masks, siblings pair up where a fanout is even;
  at p = 0.5 a sibling pair under the last dropout then cancels the control variate exactly (z - zbar
  is linear in that mask and the partner is its complement), so the two are not worth combining.
- adaptive K (k = None): masks are drawn in rounds and a row gets as many rounds as its own spread
  needs for the MC standard error (largest class) to reach stderr_target, between k_min and k_max
  masks; the K used is returned per row.

Adaptive K cross-fits two independent mask streams A and B per row: each stream's first round
(k_min / 2 masks) is its pilot, and stream A's number of rounds is planned from stream B's pilot
and vice versa (var / (2 target^2) units, rounded up to whole rounds, so that the two halves
together reach the target). So stream A's samples are independent of how many of them are drawn,
each stream's mean is an exactly unbiased estimate of E_sigma[softmax], and so is the label, their
mean with fixed weights 1/2. Stopping a row when the spread of its own samples looks small would
not be: a row whose first masks happen to agree stops early with an estimate pulled towards them.
The price is a noisy plan: a pilot of n units (k_min / 2 masks, or k_min / 4 antithetic pairs)
estimates the variance with n - 1 degrees of freedom, so the rows' standard error reaches the target
only in root mean square and up to the factor sqrt((n - 1) / (n - 3)): 1.7 at k_min = 8, 1.2 at
k_min = 16 without antithetic masks (the stored mc_stderr tells).
Masks of stream s, round r come from keep_masks with the seed row_rng_seed(seed, s, r) (a fixed K
uses stream 0, round 0): a row's label depends on (seed, row id, scheme) only, never on the batch
or the other rows.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dd_dist.core.masks import keep_masks
from dd_dist.core.mc import (MCEstimate, MaskedModel, dropout_layers, entropy, full_precision, mc_estimate, run_masked,
                             softmax)
from dd_dist.core.splitmix import row_rng_seed
from dd_dist.schemes import MCScheme

AFFINE = (nn.Linear, nn.Flatten, nn.Identity)  # modules that may follow the last dropout under the control variate


def passes_per_mask(model: nn.Module, scheme: MCScheme, in_shape) -> float:
    """The compute of one first-layer mask with its subtree, in full passes of the network after its first
    dropout (the part MC repeats; the prefix runs once per image), counted in multiply-adds of the Conv
    and Linear layers: 1 without a tree, so K masks cost K passes; with a fanout, each segment between
    two dropouts counts as often as it runs."""
    sampler = _Sampler(MaskedModel(model), scheme, 0, 1)
    if not sampler.net.flat:
        return 1.0  # no mask tree outside a flat nn.Sequential: one mask is one pass
    prefix, rest = sampler.net.prefix, sampler.net.rest
    cost, h = [], nn.Sequential(*prefix).eval()(torch.zeros(1, *in_shape))  # cost[l]: after the l-th dropout
    with torch.inference_mode():
        for module in rest:
            if isinstance(module, nn.Dropout):
                cost.append(0.0)
            layer = len(cost) - 1
            out = module(h)
            if isinstance(module, nn.Conv2d):
                cost[layer] += out.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
            elif isinstance(module, nn.Linear):
                cost[layer] += module.in_features * module.out_features
            h = out
    return sum(n * c for n, c in zip(sampler.per_mask, cost)) / sum(cost) if sum(cost) else 1.0


def check_model(model: nn.Module, scheme: MCScheme) -> None:
    """ValueError when the scheme cannot run on the model (a dropout MC cannot seed; a mask tree or the
    control variate outside a flat nn.Sequential; the control variate without an affine tail after the
    last dropout)."""
    _Sampler(MaskedModel(model), scheme, 0, 1)


def mc_label(model: nn.Module, x: torch.Tensor, row_ids, seed: int, scheme: MCScheme,
             max_elems: int = 2**22) -> MCEstimate:
    """The scheme's estimate per row; the plain scheme is mc_estimate exactly.

    stderr is the largest class's standard error of the estimate, from the spread of its units
    (0 where a stream has fewer than two units to tell it). The expected entropy is averaged exactly as
    the probabilities are (over pairs, leaves and streams), from each sample's own softmax: under the
    control variate too, which corrects the mean only."""
    if scheme.plain:
        return mc_estimate(model, x, row_ids, scheme.k, seed, max_elems)
    model.eval()
    ids = torch.as_tensor(row_ids).tolist()
    if len(ids) != len(x):
        raise ValueError(f"{len(ids)} row ids for {len(x)} inputs")
    sampler = _Sampler(MaskedModel(model), scheme, seed, max_elems)
    with torch.inference_mode():
        h = sampler.net.shared(x)
        if not ids:
            out = full_precision(sampler.net.plain(h))
            return MCEstimate(out, out[:, 0], torch.zeros(0, dtype=torch.int64), out[:, 0])
        sampler.size(h[:1])
        mean, var, units = (_adaptive if scheme.adaptive else _fixed)(sampler, h, ids, scheme)
        (mean, expected_entropy), stderr = mean.split([mean.shape[1] - 1, 1], 1), var[:, :-1].sqrt().amax(1)
        if scheme.control_variate:  # y = f - g can dip below 0 for a class after an extreme mask; a label cannot
            mean = mean.clamp_min(0)
            mean /= mean.sum(1, keepdim=True)
    return MCEstimate(mean.to(x.dtype), stderr.to(x.dtype), units * scheme.unit, expected_entropy[:, 0].to(x.dtype))


class _Sampler:
    """Unit values y of rows, (rows, units, C + 1) float64: the softmax f, minus the control variate g with
    the control variate, and then the entropy H[f] of that sample, each averaged over the unit's samples
    (an antithetic pair, a mask tree's leaves). Carrying H[f] as one more column lets every estimator
    (_fixed, _adaptive) average it exactly as it averages the probabilities."""

    def __init__(self, net: MaskedModel, scheme: MCScheme, seed: int, max_elems: int):
        self.net, self.scheme, self.seed, self.max_elems = net, scheme, seed, max_elems
        rest, layers = net.rest, len(dropout_layers(net.model))
        if not net.flat and (scheme.fanout or scheme.control_variate):
            raise ValueError(f"{'a mask tree (fanout)' if scheme.fanout else 'the control variate'} needs a flat "
                             f"nn.Sequential; this model is a {type(net.model).__name__}")
        if len(scheme.fanout) > max(layers - 1, 0):
            raise ValueError(f"fanout {list(scheme.fanout)} has {len(scheme.fanout)} entries but the model has "
                             f"{max(layers - 1, 0)} dropout layers after the first")
        # samples per first-layer mask at each dropout layer: 1, fanout[0], fanout[0] * fanout[1], ...
        branches = [1, *scheme.fanout, *[1] * (layers - 1 - len(scheme.fanout))][:max(layers, 1)]
        self.per_mask = [math.prod(branches[: i + 1]) for i in range(len(branches))]
        if scheme.control_variate:
            if not rest:
                raise ValueError("the control variate needs a dropout layer; this model has none")
            last = max(i for i, m in enumerate(rest) if isinstance(m, nn.Dropout))
            tail = rest[last + 1 :]
            if not tail or not all(isinstance(m, AFFINE) for m in tail):
                raise ValueError("the control variate needs the last dropout to feed only affine layers "
                                 f"(Linear, Flatten); this model has {', '.join(type(m).__name__ for m in tail) or 'nothing'} "
                                 "after it")
            self.body, self.last, self.tail = rest[:last], rest[last], nn.Sequential(*tail)
            self.last_layer = sum(isinstance(m, nn.Dropout) for m in self.body)

    def size(self, h1: torch.Tensor) -> None:
        self.widest = self.net.widest(h1)

    def __call__(self, h: torch.Tensor, ids: list[int], stream: int, round_: int, units: int):
        k, unit, leaves = units * self.scheme.unit, self.scheme.unit, self.scheme.leaves
        seed = row_rng_seed(self.seed, stream, round_)
        chunk = max(1, self.max_elems // (k * leaves * self.widest))
        ys = []
        for start in range(0, len(ids), chunk):
            rows = ids[start : start + chunk]
            masks = lambda layer, n, p, dtype: keep_masks(rows, layer, k * self.per_mask[layer], n, p, seed,  # noqa: E731
                                                          self.scheme.antithetic, device=h.device, dtype=dtype)
            if not self.scheme.control_variate:
                f = y = softmax(self.net.run(h[start : start + chunk], masks, k))
            else:
                pre = run_masked(self.body, h[start : start + chunk], masks, k)  # (rows * k, ...): every mask but the last
                if self.last_layer:  # the last layer's own branches of each sample above it
                    pre = pre.repeat_interleave(self.per_mask[-1] // self.per_mask[-2], dim=0)
                last = lambda layer, n, p, dtype: masks(self.last_layer, n, p, dtype).reshape(-1, 1, n)  # noqa: E731
                z = full_precision(run_masked([self.last, *self.tail], pre, last, 1))
                zbar = full_precision(self.tail(pre))  # E[z | the other masks]: the tail is affine
                sbar, d = softmax(zbar), z - zbar
                g = sbar * (d - (sbar * d).sum(1, keepdim=True))  # J(zbar) (z - zbar), J = diag(s) - s s^T
                f = softmax(z)
                y = f - g
            y = torch.cat([y, entropy(f).unsqueeze(1)], 1)
            ys.append(y.double().view(len(rows), units, unit * leaves, -1).mean(2))
        return torch.cat(ys)


def _sums(y: torch.Tensor) -> torch.Tensor:
    """(rows, 2, C): the sum and the sum of squares over units of y (rows, units, C)."""
    return torch.stack([y.sum(1), (y * y).sum(1)], 1)


def _var_of_mean(sums: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Variance of a stream's mean, per row and class, from its sums over n units (0 where n < 2)."""
    n = n.double().unsqueeze(1)
    var = (sums[:, 1] - sums[:, 0] ** 2 / n) / (n - 1).clamp_min(1)
    return torch.where(n >= 2, var.clamp_min(0) / n, torch.zeros_like(var))


def _fixed(sample: _Sampler, h, ids, scheme: MCScheme):
    """K masks in one stream: K / unit units."""
    units = scheme.k // scheme.unit
    y = sample(h, ids, 0, 0, units)
    n = torch.full((len(ids),), units)
    return y.mean(1), _var_of_mean(_sums(y), n), n


def _adaptive(sample: _Sampler, h, ids, scheme: MCScheme):
    """Pilot rounds of both streams, then each stream's planned rounds, batched over the rows still running."""
    step, most = scheme.k_min // (2 * scheme.unit), scheme.k_max // (2 * scheme.unit)  # units per round, per stream
    pilots = [sample(h, ids, s, 0, step) for s in (0, 1)]
    sums = [_sums(y) for y in pilots]
    # stream s's size, planned from the other stream's pilot: n units of variance v give the two halves
    # together a variance (v / n_A + v / n_B) / 4 = v / (2 n) when n_A = n_B = n
    spread = [pilots[1 - s][..., :-1].var(1).amax(1) for s in (0, 1)]  # the classes, not the entropy column
    n = [torch.ceil(v / (2 * scheme.stderr_target**2) / step).clamp(1, most // step).long() * step for v in spread]
    for round_ in range(1, most // step):
        for s in (0, 1):
            running = (n[s] > round_ * step).nonzero().squeeze(1)
            if len(running):
                sums[s][running] += _sums(sample(h[running], [ids[i] for i in running.tolist()], s, round_, step))
    mean = (sums[0][:, 0] / n[0].unsqueeze(1) + sums[1][:, 0] / n[1].unsqueeze(1)) / 2
    var = (_var_of_mean(sums[0], n[0]) + _var_of_mean(sums[1], n[1])) / 4
    return mean, var, n[0] + n[1]
