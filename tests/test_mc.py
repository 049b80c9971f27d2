"""MC dropout against exact answers: enumerable nets, Theorem 1, per-row determinism, the KL loss, Algorithm 2."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dd_dist.core.masks import keep_masks
from dd_dist.core.mc import (dropout_layers, mc_probs, mc_probs_naive, naive_mc_loop, online_targets, soft_target_kl,
                             standard_probs)
from dd_dist.core.models import build_model

X = torch.tensor([[0.3, -1.2], [1.5, 0.7], [-0.4, 0.9]], dtype=torch.double)
IDS = torch.tensor([11, 12, 13])


def tiny_net(p=0.5, linear_after_dropout=False, seed=0) -> nn.Sequential:
    """2 -> 3 -> dropout -> 3 -> dropout -> 2: six dropout units, 64 masks to enumerate."""
    torch.manual_seed(seed)
    if linear_after_dropout:
        net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Dropout(p), nn.Linear(4, 3))
    else:
        net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Dropout(p), nn.Linear(3, 3), nn.Tanh(), nn.Dropout(p),
                            nn.Linear(3, 2))
    with torch.no_grad():
        for param in net.parameters():
            param.mul_(3)  # large enough weights that the tanh bends: weight scaling then visibly misses the mean
    return net.double()


def masked_logits(net, x, masks):
    """Forward pass with one given keep-mask per dropout layer (inverted dropout), written independently of mc.py."""
    masks = iter(masks)
    for module in net:
        x = x * next(masks).reshape(-1, *x.shape[1:]) / (1 - module.p) if isinstance(module, nn.Dropout) else module(x)
    return x


def enumerate_masks(net, in_features=2):
    """Every combination of keep-masks with its probability p^dropped (1-p)^kept."""
    widths, h = [], torch.zeros(1, in_features, dtype=torch.double)
    for module in net:
        if isinstance(module, nn.Dropout):
            widths.append(h.shape[1])
        h = module.eval()(h)
    p = dropout_layers(net)[0].p
    for bits in itertools.product([0.0, 1.0], repeat=sum(widths)):
        bits = torch.tensor(bits, dtype=torch.double)
        yield p ** (bits == 0).sum().item() * (1 - p) ** (bits == 1).sum().item(), list(bits.split(widths))


def exact_moments(net, x):
    """E_sigma[f_sigma(x)] and the per-class std of f_sigma(x), by enumeration."""
    with torch.no_grad():
        pairs = [(w, F.softmax(masked_logits(net, x, m), 1)) for w, m in enumerate_masks(net)]
    mean = sum(w * f for w, f in pairs)
    return mean, (sum(w * f**2 for w, f in pairs) - mean**2).sqrt()


def sample_logits(net, x, ids, k, seed):
    """(rows, k, C) logits under mc.py's masks (keep_masks), by plain expansion: the layout reference."""
    h, layer = x.repeat_interleave(k, 0), 0
    masks = []
    for module in net:
        if isinstance(module, nn.Dropout):
            masks.append(keep_masks(ids.tolist(), layer, k, h[0].numel(), module.p, seed))
            layer += 1
        h = module.eval()(h)
    return masked_logits(net, x.repeat_interleave(k, 0), masks).view(len(x), k, -1)


@pytest.mark.parametrize("p", [0.5, 0.3])  # 0.3 is not a multiple of 1/256: exercises the tie-breaking draws
def test_mc_converges_to_the_exact_expectation(p):
    net = tiny_net(p)
    exact, _ = exact_moments(net, X)
    estimate, stderr = mc_probs(net, X, IDS, 20_000, seed=3, return_stderr=True)
    assert (stderr > 0).all() and (stderr < 0.01).all()
    assert ((estimate - exact).abs().max(1).values <= 4 * stderr).all()
    assert (standard_probs(net, X) - exact).abs().max() > 10 * stderr.max()  # the gap the paper is about


def test_stderr_is_the_largest_class_standard_error_of_the_same_samples():
    net = tiny_net(0.3)
    probs = F.softmax(sample_logits(net, X, IDS, 9, seed=4), 2)
    mean, stderr = mc_probs(net, X, IDS, 9, seed=4, return_stderr=True)
    assert torch.allclose(mean, probs.mean(1), atol=1e-12)
    assert torch.allclose(stderr, probs.std(1).amax(1) / 3, atol=1e-12)
    assert torch.equal(mc_probs(net, X, IDS, 1, seed=4, return_stderr=True)[1], torch.zeros(3, dtype=torch.double))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.2, 0.5, 0.3])
def test_keep_masks_drop_with_probability_p(p):
    keep = keep_masks(list(range(40)), 2, 50, 100, p, seed=1)
    assert keep.shape == (40, 50, 100) and keep.dtype == torch.bool
    drop_rate = 1 - keep.double().mean().item()
    assert abs(drop_rate - p) < 4 * math.sqrt(p * (1 - p) / keep.numel()) + 1e-12


def test_keep_masks_depend_only_on_seed_row_layer_and_sample():
    masks = keep_masks([5, 9, 2], 1, 6, 40, 0.3, seed=7)
    assert torch.equal(keep_masks([2, 5], 1, 6, 40, 0.3, seed=7), masks[[2, 0]])  # batch composition and order
    assert torch.equal(keep_masks([5, 9, 2], 1, 3, 40, 0.3, seed=7), masks[:, :3])  # sample j is the same for any k > j
    for other in (keep_masks([5, 9, 2], 1, 6, 40, 0.3, seed=8), keep_masks([5, 9, 2], 0, 6, 40, 0.3, seed=7),
                  keep_masks([6, 10, 3], 1, 6, 40, 0.3, seed=7)):
        assert (other != masks).float().mean() > 0.2
    assert (masks[:, 0] != masks[:, 1]).any() and (masks[0] != masks[1]).any()


def test_prefix_shared_batched_pass_equals_the_naive_loop_with_the_same_masks():
    for net in (tiny_net(0.5), tiny_net(0.3)):
        assert torch.allclose(mc_probs(net, X, IDS, 7, 0), mc_probs_naive(net, X, IDS, 7, 0), atol=1e-12)
    torch.manual_seed(0)
    for arch, shape in (("lenet_all", (1, 28, 28)), ("lenet_all_prepool", (1, 28, 28)),
                        ("allconv", (3, 16, 16))):  # allconv: 0.2 input dropout, no prefix
        model, x, ids = build_model(arch, shape, 10), torch.rand(3, *shape), torch.arange(3)
        assert torch.allclose(mc_probs(model, x, ids, 4, 1), mc_probs_naive(model, x, ids, 4, 1), atol=1e-6)


def test_batch_norm_stays_in_eval_mode_under_mc():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 5), nn.Dropout(0.5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    net[2].running_mean.uniform_(-1, 1)
    net[2].running_var.uniform_(0.5, 2)
    before = net[2].running_mean.clone()
    net.train()
    probs = mc_probs(net, X, IDS, 16, seed=2)
    assert torch.allclose(probs, F.softmax(sample_logits(net, X, IDS, 16, seed=2), 2).mean(1), atol=1e-12)
    assert torch.equal(net[2].running_mean, before)


def test_weight_scaling_is_exact_in_the_logits_for_a_net_linear_after_its_only_dropout():
    net = tiny_net(linear_after_dropout=True)
    with torch.no_grad():
        eval_logits = net.eval()(X)
        mean_logits = sum(w * masked_logits(net, X, m) for w, m in enumerate_masks(net))
        assert torch.allclose(mean_logits, eval_logits, atol=1e-12)
        samples = sample_logits(net, X, IDS, 20_000, seed=5)
        assert ((samples.mean(1) - eval_logits).abs() <= 4 * samples.std(1) / math.sqrt(20_000)).all()
        # with a nonlinearity after the dropout, weight scaling is only an approximation
        deep = tiny_net()
        deep_mean = sum(w * masked_logits(deep, X, m) for w, m in enumerate_masks(deep))
        assert (deep_mean - deep.eval()(X)).abs().max() > 1e-3


def test_a_rows_estimate_ignores_batch_composition_order_and_chunking():
    torch.manual_seed(0)
    model = build_model("lenet_all", (1, 28, 28), 10)
    x, ids = torch.rand(6, 1, 28, 28), torch.arange(100, 106)
    whole, err = mc_probs(model, x, ids, 8, seed=5, return_stderr=True)
    order = torch.tensor([4, 1, 5, 0, 3, 2])

    def same(a, b):  # the masks are bitwise the same; float kernels may round differently for other batch shapes
        return torch.allclose(a, b, rtol=0, atol=1e-6)

    assert same(mc_probs(model, x[order], ids[order], 8, seed=5), whole[order])
    assert same(mc_probs(model, x[2:3], ids[2:3], 8, seed=5), whole[2:3])
    chunked, chunked_err = mc_probs(model, x, ids, 8, seed=5, return_stderr=True, max_elems=1)  # one row a chunk
    assert same(chunked, whole) and same(chunked_err, err)
    mixed = torch.cat([x[:2], torch.rand(3, 1, 28, 28)])
    assert same(mc_probs(model, mixed, torch.cat([ids[:2], torch.arange(3)]), 8, seed=5)[:2], whole[:2])
    assert (mc_probs(model, x, ids, 8, seed=6) - whole).abs().max() > 1e-3
    assert (mc_probs(model, x, ids + 1, 8, seed=5) - whole).abs().max() > 1e-3  # the row id is part of the seed


def test_offline_gradient_equals_the_average_online_gradient():
    """Theorem 1 for a Bregman loss: KL to the mean target and the mean KL differ by a constant in q."""
    net = tiny_net()
    student_logits = torch.randn(3, 2, dtype=torch.double, requires_grad=True)
    with torch.no_grad():
        samples = [(w, F.softmax(masked_logits(net, X, m), 1)) for w, m in enumerate_masks(net)]
    assert math.isclose(sum(w for w, _ in samples), 1.0)

    def grad(target):
        return torch.autograd.grad(soft_target_kl(student_logits, target), student_logits)[0]

    offline = grad(sum(w * f for w, f in samples))
    online = sum(w * grad(f) for w, f in samples)
    assert offline.abs().max() > 1e-3 and torch.allclose(offline, online, atol=1e-10)


def test_soft_target_kl_values():
    target = torch.tensor([[0.25, 0.75]])
    half = torch.log(torch.tensor([[0.5, 0.5]]))
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert soft_target_kl(half, target).item() == pytest.approx(expected, abs=1e-6)
    assert soft_target_kl(torch.log(target) + 3.0, target).item() == pytest.approx(0, abs=1e-6)  # logits shift freely
    assert soft_target_kl(torch.randn(5, 4), F.softmax(torch.randn(5, 4), 1)).item() > 0
    one_hot = torch.tensor([[0.0, 1.0]])
    assert soft_target_kl(half, one_hot).item() == pytest.approx(math.log(2), abs=1e-6)  # 0 log 0 = 0
    logits = half.clone().requires_grad_()
    soft_target_kl(logits, one_hot).backward()
    assert torch.isfinite(logits.grad).all()
    batch = torch.cat([target, one_hot])
    assert soft_target_kl(half.expand(2, 2), batch).item() == pytest.approx((expected + math.log(2)) / 2, abs=1e-6)


def test_online_targets_are_single_mask_distributions_that_average_to_the_mc_mean():
    net = tiny_net()
    exact, std = exact_moments(net, X)
    draws = torch.stack([online_targets(net, X, IDS, seed=0, step=s) for s in range(3000)])
    assert not draws.is_inference() and (draws >= 0).all()
    assert torch.allclose(draws.sum(2), torch.ones(3000, 3, dtype=torch.double))
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(online_targets(net, X, IDS, seed=0, step=1), draws[1])
    assert ((draws.mean(0) - exact).abs() <= 4 * std / math.sqrt(3000) + 1e-9).all()
    with torch.no_grad():  # each target is f_sigma(x) for one of the enumerable masks
        outcomes = torch.stack([F.softmax(masked_logits(net, X, m), 1) for _, m in enumerate_masks(net)])
    assert all(((outcomes[:, r] - draws[7, r]).abs().amax(1) < 1e-12).any() for r in range(3))


def test_naive_mc_loop_uses_torch_dropout_and_restores_eval_mode():
    net = tiny_net()
    exact, std = exact_moments(net, X)
    torch.manual_seed(0)
    probs = naive_mc_loop(net, X, 4000)
    assert ((probs - exact).abs() <= 4 * std / math.sqrt(4000) + 1e-9).all()
    assert not any(m.training for m in net.modules())


def test_structural_errors():
    alpha = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.AlphaDropout(0.5), nn.Linear(3, 2))).double()
    with pytest.raises(ValueError, match=r"cannot seed 1\.0 \(AlphaDropout\)"):
        mc_probs(alpha, X, IDS, 2, 0)
    with pytest.raises(ValueError, match="row ids"):
        mc_probs(tiny_net(), X, IDS[:2], 2, 0)
    probs, err = mc_probs(tiny_net(), X[:0], IDS[:0], 4, 0, return_stderr=True)
    assert probs.shape == (0, 2) and err.shape == (0,)
    assert len(dropout_layers(build_model("lenet_all", (1, 28, 28), 10))) == 3
