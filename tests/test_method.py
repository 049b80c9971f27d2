"""The core method against exact answers: enumerable dropout nets, Theorem 1, determinism, training."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dd_dist.data import load_split
from dd_dist.mc import mc_probs, mc_probs_naive, online_targets, soft_target_kl, standard_probs
from dd_dist.models import build_model, init_student_from_teacher
from dd_dist.train import fit, offline_batches, online_batches, teacher_batches
from dd_dist.config import TrainConfig

P = 0.5


def tiny_net(seed=0, linear_after_dropout=False) -> nn.Sequential:
    """2 -> 3 -> dropout -> 3 -> dropout -> 2: six dropout units, 64 masks to enumerate."""
    torch.manual_seed(seed)
    if linear_after_dropout:
        return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Dropout(P), nn.Linear(4, 3)).double()
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Dropout(P), nn.Linear(3, 3), nn.Tanh(), nn.Dropout(P),
                         nn.Linear(3, 2)).double()


def masked_logits(net: nn.Sequential, x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """Forward with explicit inverted-dropout masks, one per dropout layer."""
    it = iter(masks)
    for module in net:
        x = x * next(it) / (1 - module.p) if isinstance(module, nn.Dropout) else module(x)
    return x


def all_masks(net: nn.Sequential):
    """Every combination of masks with its probability."""
    widths, h = [], torch.zeros(1, 2, dtype=torch.double)
    for module in net:
        if isinstance(module, nn.Dropout):
            widths.append(h.shape[1])
        else:
            h = module(h)
    for bits in itertools.product([0.0, 1.0], repeat=sum(widths)):
        bits = torch.tensor(bits, dtype=torch.double)
        prob = float(P ** (bits == 0).sum() * (1 - P) ** (bits == 1).sum())
        yield prob, list(bits.split(widths))


X = torch.tensor([[0.3, -1.2], [1.5, 0.7], [-0.4, 0.9]], dtype=torch.double)
IDS = torch.tensor([11, 12, 13])


def exact_mc_mean(net, x):
    with torch.no_grad():
        return sum(prob * F.softmax(masked_logits(net, x, m), 1) for prob, m in all_masks(net))


def test_mc_converges_to_exact_expectation():
    net = tiny_net()
    exact = exact_mc_mean(net, X)
    estimate, stderr = mc_probs(net, X, IDS, 20_000, seed=3, return_stderr=True)
    assert (stderr > 0).all()
    assert ((estimate - exact).abs().max(1).values <= 4 * stderr).all()
    assert not torch.allclose(exact, standard_probs(net, X))  # the problem the paper solves


def test_prefix_shared_equals_naive_loop_with_the_same_masks():
    net = tiny_net()
    assert torch.allclose(mc_probs(net, X, IDS, 7, 0), mc_probs_naive(net, X, IDS, 7, 0), atol=1e-12)
    lenet_all = build_model("lenet_all", (1, 28, 28), 10)
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(mc_probs(lenet_all, x, torch.arange(4), 5, 1), mc_probs_naive(lenet_all, x, torch.arange(4), 5, 1),
                          atol=1e-6)


def test_weight_scaling_is_exact_for_a_net_linear_after_its_only_dropout():
    net = tiny_net(linear_after_dropout=True)
    with torch.no_grad():
        mean_logits = sum(prob * masked_logits(net, X, m) for prob, m in all_masks(net))
        assert torch.allclose(mean_logits, net.eval()(X), atol=1e-12)


def test_mc_output_of_a_row_ignores_batch_composition_and_order():
    model = build_model("lenet_all", (1, 28, 28), 10)
    x, ids = torch.rand(6, 1, 28, 28), torch.arange(100, 106)
    whole = mc_probs(model, x, ids, 8, seed=5)
    order = torch.tensor([4, 1, 5, 0, 3, 2])
    assert torch.equal(mc_probs(model, x[order], ids[order], 8, seed=5), whole[order])
    assert torch.equal(mc_probs(model, x[2:3], ids[2:3], 8, seed=5), whole[2:3])
    assert torch.equal(mc_probs(model, x, ids, 8, seed=5, max_elems=1), whole)  # one row per chunk
    assert not torch.equal(mc_probs(model, x, ids, 8, seed=6), whole)


def test_offline_gradient_equals_average_online_gradient():
    """Theorem 1 with a Bregman loss: the two objectives differ by a constant, so gradients agree."""
    net = tiny_net()
    student_logits = torch.randn(3, 2, dtype=torch.double, requires_grad=True)
    with torch.no_grad():
        samples = [(prob, F.softmax(masked_logits(net, X, m), 1)) for prob, m in all_masks(net)]
    offline = torch.autograd.grad(soft_target_kl(student_logits, sum(p * t for p, t in samples)), student_logits)[0]
    online = sum(p * torch.autograd.grad(soft_target_kl(student_logits, t), student_logits)[0] for p, t in samples)
    assert torch.allclose(offline, online, atol=1e-12)


def test_soft_target_kl_values():
    target = torch.tensor([[0.25, 0.75]])
    logits = torch.log(torch.tensor([[0.5, 0.5]]))
    expected = 0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5)
    assert soft_target_kl(logits, target).item() == pytest.approx(expected, abs=1e-6)
    assert soft_target_kl(torch.log(target), target).item() == pytest.approx(0, abs=1e-7)
    assert soft_target_kl(logits, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(np.log(2), abs=1e-6)


def test_online_targets_average_to_the_mc_mean():
    net = tiny_net()
    exact = exact_mc_mean(net, X)
    draws = torch.stack([online_targets(net, X, IDS, 0, step) for step in range(4000)])
    assert torch.allclose(draws.sum(2), torch.ones(4000, 3, dtype=torch.double))
    assert not torch.equal(draws[0], draws[1])
    assert (draws.mean(0) - exact).abs().max() < 4 * draws.std(0).max() / np.sqrt(4000)


def kl_to_mc_teacher(teacher, model, x, ids):
    target = mc_probs(teacher, x, ids, 200, seed=9)
    with torch.no_grad():
        return soft_target_kl(model.eval()(x), target).item()


@pytest.fixture(scope="module")
def toy():
    """A synthetic task, and a teacher trained on it with heavy dropout."""
    split = load_split("synthetic", "train")
    torch.manual_seed(0)
    teacher = build_model("mlp", split.in_shape, split.num_classes, p=0.5, width=0.1)
    cfg = TrainConfig(epochs=8, lr=0.05, lr_steps=[6], batch_size=32)
    losses = fit(teacher, cfg, len(split), teacher_batches(split), "teacher", seed=0, log=lambda m: None)
    return split, teacher, losses


def test_teacher_loss_falls(toy):
    _, _, losses = toy
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_distilled_student_is_closer_to_the_mc_teacher_than_weight_scaling(toy, mode):
    split, teacher, _ = toy
    x, ids = torch.from_numpy(split.x), torch.arange(len(split))
    student = build_model("mlp", split.in_shape, split.num_classes, p=0.5, width=0.1)
    init_student_from_teacher(student, teacher)
    if mode == "offline":
        batches = offline_batches(split, mc_probs(teacher, x, ids, 64, seed=0).clone(), 0, 0.0, 0.0)
    else:
        batches = online_batches(split, teacher, 0, 0.0, 0.0)
    cfg = TrainConfig(epochs=6, lr=0.05, lr_steps=[4], batch_size=32, weight_decay=0)
    losses = fit(student, cfg, len(split), batches, "student", seed=0, log=lambda m: None)
    assert losses[-1] < losses[0]
    assert kl_to_mc_teacher(teacher, student, x, ids) < kl_to_mc_teacher(teacher, teacher, x, ids)
