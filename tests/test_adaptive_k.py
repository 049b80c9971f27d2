"""Variance-reduced and adaptive-K MC labels (dd_dist.mc_schemes): unbiased against an exactly enumerated
MC mean, antithetic masks, per-row K, determinism, config errors, and label + verify end to end."""
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dd_dist.config import load_config
from dd_dist.data.splits import run_split
from dd_dist.core.loop import train_teacher
from dd_dist.core.masks import keep_masks
from dd_dist.core.mc import mc_probs
from dd_dist.core.mc_schemes import check_model, mc_label
from dd_dist.core.models import build_model, load_model
from dd_dist.errors import UserError
from dd_dist.files import file_sha256
from dd_dist.labels.actors import label_rows
from dd_dist.labels.format import load_soft_labels, read_manifest, stored_probs, write_manifest
from dd_dist.labels.verify import verify_labels
from dd_dist.schemes import MCScheme
from dd_dist.stages.label import run_label
from test_mc import enumerate_masks, masked_logits  # the exact enumeration of tests/test_mc.py

X = torch.tensor([[0.3, -1.2], [1.5, 0.7], [-0.4, 0.9]], dtype=torch.double)
N = 2000  # independent estimates per input: the same input under N row ids


def small_net(p=0.5) -> nn.Sequential:
    """2 -> 3 -> dropout -> 2 -> dropout -> 3 classes: five dropout units, 32 masks; Linear after the last dropout."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Dropout(p), nn.Linear(3, 2), nn.Tanh(), nn.Dropout(p),
                        nn.Linear(2, 3))
    with torch.no_grad():
        for param in net.parameters():
            param.mul_(3)
    return net.double()


def exact_mean(net, x) -> torch.Tensor:
    with torch.no_grad():
        return sum(w * F.softmax(masked_logits(net, x, m), 1) for w, m in enumerate_masks(net))


def replicates(net, scheme, seed=1):
    """N independent estimates of each row of X (row ids differ, so do the masks): (N, 3, C), (N, 3), (N, 3)."""
    probs, stderr, k, _ = mc_label(net, X.repeat(N, 1), torch.arange(3 * N), seed, scheme)
    return probs.view(N, 3, -1), stderr.view(N, 3), k.view(N, 3)


def z_scores(estimates, exact):
    """(mean of the estimates - exact) in standard errors of that mean."""
    return (estimates.mean(0) - exact) / (estimates.std(0) / math.sqrt(len(estimates))).clamp_min(1e-12)


SCHEMES = {
    "antithetic": MCScheme(k=6, antithetic=True),
    "control variate": MCScheme(k=6, control_variate=True),
    "antithetic + control variate": MCScheme(k=8, antithetic=True, control_variate=True),
    "adaptive": MCScheme(k=None, stderr_target=0.05, k_min=8, k_max=48),
    "adaptive + antithetic + control variate": MCScheme(k=None, stderr_target=0.02, k_min=8, k_max=48,
                                                        antithetic=True, control_variate=True),
    "mask tree": MCScheme(k=4, fanout=(3,)),
    "mask tree + antithetic + control variate": MCScheme(k=8, fanout=(2,), antithetic=True, control_variate=True),
    "adaptive mask tree": MCScheme(k=None, stderr_target=0.05, k_min=8, k_max=48, fanout=(2,)),
}


@pytest.mark.parametrize("p", [0.5, 0.3])  # 0.3: no multiple of 2^-k, all 16 bit planes of the mask generator
@pytest.mark.parametrize("name", SCHEMES)
def test_each_scheme_is_an_unbiased_estimate_of_the_exact_mc_mean(name, p):
    net = small_net(p)
    estimates, stderr, k = replicates(net, SCHEMES[name])
    assert z_scores(estimates, exact_mean(net, X)).abs().max() < 5
    # the reported stderr (largest class) is the spread the estimates really have, up to the upward bias of a
    # maximum over classes of noisy spreads: 1.18-1.24x on the first row with 4 units a row (the mask tree with
    # antithetic pairs), over seeds and with either mask generator
    assert torch.allclose(stderr.pow(2).mean(0).sqrt(), estimates.std(0).amax(1), rtol=0.25)
    if SCHEMES[name].adaptive:
        assert k.double().std() > 0  # the rows really did stop at different K


def test_the_unbiasedness_check_catches_stopping_on_a_rows_own_spread():
    """What adaptive K avoids: stop a row at the first K (in steps of 8) whose own stderr is below the target."""
    net = small_net()
    ids, ks = torch.arange(3 * N), range(8, 49, 8)
    runs = [mc_probs(net, X.repeat(N, 1), ids, k, seed=1, return_stderr=True) for k in ks]  # prefix-stable masks
    estimate, done = runs[-1][0].clone(), torch.zeros(3 * N, dtype=torch.bool)
    for probs, stderr in runs:
        stop = ~done & (stderr < 0.05)
        estimate[stop], done = probs[stop], done | stop
    assert z_scores(estimate.view(N, 3, -1), exact_mean(net, X)).abs().max() > 5


def test_antithetic_and_control_variate_cut_the_spread_at_the_same_k():
    net = small_net()
    def spread(scheme):  # the estimates' standard deviation, largest class, averaged over the three inputs
        return replicates(net, scheme)[0].std(0).amax(1).mean().item()

    plain = spread(MCScheme(k=8))
    assert spread(MCScheme(k=8, antithetic=True)) < 0.8 * plain
    assert spread(MCScheme(k=8, control_variate=True)) < 0.8 * plain
    assert spread(MCScheme(k=8, antithetic=True, control_variate=True)) < 0.5 * plain
    # more masks where they are cheap: 4 masks of the 2nd dropout layer under each of the 8 of the 1st
    assert spread(MCScheme(k=8, fanout=(4,))) < 0.8 * plain


def test_a_mask_tree_needs_a_dropout_layer_for_each_fanout():
    check_model(build_model("lenet_all", (1, 28, 28), 10), MCScheme(k=4, fanout=(2, 4)))
    with pytest.raises(ValueError, match=r"fanout \[2, 4\] has 2 entries but the model has 1 dropout layers after"):
        check_model(build_model("mlp", (1, 8, 8), 4), MCScheme(k=4, fanout=(2, 4)))


@pytest.mark.parametrize("p", [0.5, 0.3, 0.8])
def test_antithetic_masks_pair_a_plain_mask_with_its_reflection(p):
    pairs = keep_masks(list(range(30)), 1, 40, 200, p, seed=2, antithetic=True)
    first, second = pairs[:, 0::2], pairs[:, 1::2]
    assert torch.equal(first, keep_masks(list(range(30)), 1, 20, 200, p, seed=2))  # the plain stream
    for masks in (first, second):  # each drops a unit with probability p
        assert abs(1 - masks.double().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / masks.numel())
    if p == 0.5:
        assert torch.equal(second, ~first)
    both_dropped = (~first & ~second).double().mean().item()
    assert both_dropped == 0 if p < 0.5 else abs(both_dropped - (2 * p - 1)) < 0.01  # as anti-correlated as can be
    with pytest.raises(ValueError, match="even"):
        keep_masks([0], 0, 3, 5, p, 0, antithetic=True)


def test_adaptive_k_spends_masks_where_the_spread_is_and_stays_in_bounds():
    net = small_net()
    with torch.no_grad():
        net[0].bias.zero_(), net[3].bias.zero_()  # x = 0: every hidden unit is 0, so no mask changes the output
    x = torch.cat([torch.zeros(50, 2, dtype=torch.double), X.repeat(50, 1)])
    # A pilot of 8 masks per stream: its variance has 7 degrees of freedom, so the planned K misses the
    # target by the factor sqrt(E[v / v_pilot]) = sqrt(7 / 5) = 1.18 in root mean square.
    scheme = MCScheme(k=None, stderr_target=0.03, k_min=16, k_max=128)
    probs, stderr, k, _ = mc_label(net, x, torch.arange(len(x)), 0, scheme)
    assert (k[:50] == 16).all() and (stderr[:50] == 0).all()  # the pilot rounds alone
    assert (k[50:] > 16).float().mean() > 0.9 and k.max() <= 128 and (k % 8 == 0).all()
    uncapped = k[50:] < 128
    assert uncapped.float().mean() > 0.5
    assert stderr[50:][uncapped].pow(2).mean().sqrt() < 1.3 * 0.03  # the target, up to the pilots' noise
    assert torch.allclose(probs.sum(1), torch.ones(len(x), dtype=torch.double))


def test_a_rows_label_ignores_batch_composition_order_and_chunking():
    torch.manual_seed(0)
    model = build_model("lenet_all", (1, 28, 28), 10)
    x, ids = torch.rand(5, 1, 28, 28), torch.arange(40, 45)
    scheme = MCScheme(k=None, stderr_target=0.002, k_min=8, k_max=24, antithetic=True, control_variate=True,
                      fanout=(2, 2))
    whole, err, k, _ = mc_label(model, x, ids, 3, scheme)
    assert k.min() < k.max() or k.max() == 24
    order = torch.tensor([3, 0, 4, 2, 1])
    for part, rows in [(mc_label(model, x[order], ids[order], 3, scheme), order),
                       (mc_label(model, x[2:3], ids[2:3], 3, scheme), slice(2, 3)),
                       (mc_label(model, x, ids, 3, scheme, max_elems=1), slice(None))]:
        assert torch.allclose(part[0], whole[rows], rtol=0, atol=1e-6) and torch.equal(part[2], k[rows])
    other = mc_label(model, x, ids, 4, scheme)[0]
    assert (other - whole).abs().max() > 1e-4


def test_the_plain_scheme_is_mc_probs_exactly():
    net = small_net(0.3)
    probs, stderr, k, _ = mc_label(net, X, [5, 6, 7], 2, MCScheme(k=9))
    expected, expected_err = mc_probs(net, X, [5, 6, 7], 9, 2, return_stderr=True)
    assert torch.equal(probs, expected) and torch.equal(stderr, expected_err) and k.tolist() == [9, 9, 9]


def test_control_variate_needs_an_affine_layer_after_the_last_dropout():
    scheme = MCScheme(k=8, control_variate=True)
    check_model(build_model("lenet_all", (1, 28, 28), 10), scheme)
    with pytest.raises(ValueError, match="affine layers .* ReLU"):
        check_model(build_model("allconv", (3, 16, 16), 10), scheme)


def test_scheme_round_trips_through_a_manifest_record():
    for scheme in [*SCHEMES.values(), MCScheme(k=7)]:
        assert MCScheme.from_record(json.loads(json.dumps(scheme.record())), 0) == scheme
    assert MCScheme.from_record(None, 12) == MCScheme(k=12)
    assert MCScheme(k=5, fanout=[1, 1]) == MCScheme(k=5) and MCScheme(k=5, fanout=[3, 1]).fanout == (3,)


@pytest.mark.parametrize("overrides, words", [
    (["label.k=0"], "'label.k': Input should be greater than or equal to 1"),
    (["label.k=many"], "'label.k': Input should be an integer >= 1 or 'auto'"),
    (["label.k=5", "label.antithetic=true"], "k 5 must be even with antithetic masks"),
    (["label.k=2", "label.control_variate=true"], "k 2 must be at least 4 with the control variate"),
    (["label.k=auto", "label.k_min=6", "label.antithetic=true"], "k_min 6 must be a multiple of 4 and at least 8"),
    (["label.k=auto", "label.k_min=8", "label.k_max=20"], "k_max 20 must be a multiple of k_min 8"),
    (["label.k=auto", "label.stderr_target=0"], "'label.stderr_target': Input should be greater than 0"),
    (["label.fanout=[2,0]"], r"fanout \[2, 0\] must list whole numbers >= 1"),
])
def test_config_errors_are_one_line(overrides, words):
    with pytest.raises(UserError, match=words) as error:
        load_config(None, overrides)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError):
        MCScheme(k=5, antithetic=True)


def test_defaults_keep_the_plain_k_mask_mean():
    lab = load_config(None, []).label
    assert (lab.k, lab.antithetic, lab.control_variate) == (100, False, False)
    assert load_config(None, ["label.k=auto"]).label.k == "auto"


# --- end to end: Ray label actors write adaptive labels, verify replays them ---------------------

BASE = ["data.name=synthetic", "model.arch=mlp", "teacher.epochs=2", "teacher.lr=0.05", "teacher.lr_steps=[1]",
        "label.k=auto", "label.stderr_target=0.003", "label.k_min=8", "label.k_max=64", "label.antithetic=true",
        "label.control_variate=true", "label.fanout=[2]", "label.rows_per_shard=256", "label.batch_size=64", "label.actors=1"]


@pytest.mark.slow
def test_label_and_verify_with_adaptive_k_and_a_mask_tree(tmp_path):
    import ray

    cfg = load_config(None, [*BASE, f"run_dir={tmp_path}"])
    teacher_file = train_teacher(cfg)
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        out = run_label(cfg)
    finally:
        ray.shutdown()
    manifest = read_manifest(out)
    assert manifest["k"] == "auto" and manifest["scheme"] == {
        "k": "auto", "antithetic": True, "control_variate": True, "streams": 2, "stderr_target": 0.003,
        "k_min": 8, "k_max": 64, "fanout": [2]}
    k = np.concatenate([pq.read_table(out / s["file"]).column("k").to_numpy() for s in manifest["shards"]])
    assert len(k) == 512 and k.min() >= 8 and k.max() <= 64 and len(np.unique(k)) > 2 and k.mean() < 64

    ids, probs = load_soft_labels(out)  # what the actors wrote is what this process computes
    teacher, _ = load_model(teacher_file)
    x = torch.from_numpy(run_split(cfg, "train").x)
    expected = label_rows(teacher, x[ids], ids, MCScheme.from_record(manifest["scheme"], "auto"), cfg.seed,
                          cfg.data.zero_p, cfg.data.flip_p)
    assert np.allclose(probs.numpy(), stored_probs(expected.probs.numpy(), "float16", 0), atol=1e-3)
    assert np.array_equal(k, expected.k.numpy())

    report = verify_labels(out, teacher_file, 200, cfg)
    assert report["mean_kl"] <= report["tolerance"]
    # a stored K that is not the scheme's is refused, even with consistent checksums
    shard = out / manifest["shards"][0]["file"]
    table = pq.read_table(shard)
    pq.write_table(table.set_column(table.schema.get_field_index("k"), "k", [table.column("k").to_numpy() + 4]), shard,
                   compression="zstd")
    manifest["shards"][0]["sha256"] = file_sha256(shard)
    write_manifest(out, {key: value for key, value in manifest.items() if key != "digest"})
    with pytest.raises(UserError, match=r"the stored K of \d+ of 200 replayed rows differs"):
        verify_labels(out, teacher_file, 200, cfg)
