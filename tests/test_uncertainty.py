"""Each row's MC uncertainty (dd_dist.core.mc.uncertainty): every MC scheme's expected entropy E_k H[p_k] is an
unbiased estimate of the exact E_sigma H[softmax(f_sigma(x))], enumerated over all 32 masks of a small net, and
the predictive entropy and mutual information converge to the exact ones as K grows."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dd_dist.core.mc import entropy, mc_estimate, uncertainty
from dd_dist.core.mc_schemes import mc_label
from dd_dist.schemes import MCScheme

from test_adaptive_k import N, SCHEMES, X, exact_mean, small_net, z_scores
from test_mc import enumerate_masks, masked_logits


def exact_expected_entropy(net, x) -> torch.Tensor:
    with torch.no_grad():
        return sum(w * entropy(F.softmax(masked_logits(net, x, m), 1)) for w, m in enumerate_masks(net))


@pytest.mark.parametrize("p", [0.5, 0.3])
@pytest.mark.parametrize("name", ["plain", *SCHEMES])
def test_each_schemes_expected_entropy_is_unbiased(name, p):
    net, scheme = small_net(p), SCHEMES.get(name, MCScheme(k=6))
    estimate = mc_label(net, X.repeat(N, 1), torch.arange(3 * N), 1, scheme)
    replicates = estimate.expected_entropy.view(N, 3, 1)
    exact = exact_expected_entropy(net, X).unsqueeze(1)
    assert z_scores(replicates, exact).abs().max() < 5
    assert exact.min() > 0.05 and (exact.max() - exact.min()) > 0.05  # rows that tell the entropy apart


def test_predictive_entropy_and_mutual_information_converge_to_the_exact_ones():
    net = small_net()
    mean, expected = exact_mean(net, X), exact_expected_entropy(net, X)
    exact = {"entropy": entropy(mean), "expected_entropy": expected, "mutual_info": entropy(mean) - expected}
    assert exact["mutual_info"].min() > 0.01  # the net's masks really disagree
    errors = {}
    for k in (16, 1024):
        estimate = mc_estimate(net, X.repeat(64, 1), torch.arange(3 * 64), k, seed=3)
        got = uncertainty(estimate.probs, estimate.expected_entropy)
        errors[k] = {key: (got[key].view(64, 3) - exact[key]).abs().mean().item() for key in exact}
    for key in exact:
        # the plug-in H[mean] is biased by O(1/K): its error falls at least ~8x from K=16 to K=1024
        assert errors[1024][key] < errors[16][key] / 4 and errors[1024][key] < 0.01, (key, errors)


def test_mutual_information_is_the_difference_and_never_negative():
    net = small_net()
    estimate = mc_estimate(net, X.repeat(50, 1), torch.arange(150), 1, seed=0)  # one mask: H[mean] = E H
    single = uncertainty(estimate.probs, estimate.expected_entropy)
    assert torch.allclose(single["mutual_info"], torch.zeros(150, dtype=torch.double), atol=1e-6)
    estimate = mc_label(net, X.repeat(50, 1), torch.arange(150), 0, SCHEMES["control variate"])
    u = uncertainty(estimate.probs, estimate.expected_entropy)
    assert (u["mutual_info"] >= 0).all()
    assert torch.allclose(u["mutual_info"], (u["entropy"] - u["expected_entropy"]).clamp_min(0))


def test_entropy_in_nats_with_zero_probabilities():
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert entropy(probs).tolist() == pytest.approx([math.log(2), 0.0, math.log(3)])


# The student's uncertainty head: its checkpoint, its training, and what evaluate reports of it.

from dd_dist.cli import main  # noqa: E402
from dd_dist.config import load_config  # noqa: E402
from dd_dist.core.splitmix import row_rng_seed
from dd_dist.data.splits import load_split, run_split  # noqa: E402
from dd_dist.errors import UserError  # noqa: E402
from dd_dist.core.heads import FLOOR, FORM, UncertaintyStudent, uncertainty_loss  # noqa: E402
from dd_dist.core.loop import train_student, train_teacher  # noqa: E402
from dd_dist.core.models import build_model, load_model, model_spec, save_model  # noqa: E402
from dd_dist.labels.format import label_table, shard_name, write_shard  # noqa: E402
from dd_dist.layout import RunDir  # noqa: E402
from dd_dist.stages.evaluate import EVAL_SEED_SALT, evaluate  # noqa: E402
from dd_dist.train.rows import read_chunks  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402


def head_config(run_dir, *more):
    return load_config(None, [
        "data.name=synthetic", "model.arch=mlp", f"run_dir={run_dir}", f"tracking.uri=sqlite:///{run_dir}/mlruns.db",
        "teacher.epochs=4", "teacher.lr=0.05", "teacher.lr_steps=[3]", "label.k=32", "distill.epochs=20",
        "distill.lr=0.05", "distill.lr_steps=[15]", "distill.uncertainty=true", "eval.ks=[32]", "eval.repeats=1", *more])


def test_a_head_checkpoint_records_the_head_and_loads_with_weights_only(tmp_path):
    spec = model_spec("lenet", (1, 28, 28), 10, 0.5, 0.5, uncertainty_head={"hidden": 8, "form": FORM})
    model = build_model(**spec).eval()
    assert isinstance(model, UncertaintyStudent) and model.net.get_submodule(model.classifier) is model.net[-1]
    save_model(tmp_path / "model.pt", model, spec)
    loaded, loaded_spec = load_model(tmp_path / "model.pt")  # torch.load(weights_only=True) inside
    assert loaded_spec["uncertainty_head"] == {"hidden": 8, "form": FORM}
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        logits, mi = loaded(x, uncertainty=True)
        assert torch.equal(loaded(x), logits) and logits.shape == (3, 10) and (mi >= 0).all()
        assert torch.equal(mi, model(x, uncertainty=True)[1])


def test_a_head_from_before_the_entropy_term_is_refused_in_one_line(tmp_path):
    spec = model_spec("mlp", (1, 28, 28), 10, 0.5, 0.5, uncertainty_head={"hidden": 8, "form": FORM})
    save_model(tmp_path / "model.pt", build_model(**spec), {**spec, "uncertainty_head": {"hidden": 8}})
    with pytest.raises(UserError) as caught:
        load_model(tmp_path / "model.pt")
    message = str(caught.value)
    assert "features-only" in message and "distil the student again" in message and "\n" not in message


def test_the_head_corrects_the_students_entropy_and_never_trains_the_student():
    torch.manual_seed(0)
    model = build_model(**model_spec("mlp", (1, 28, 28), 10, 0.5, 1.0, uncertainty_head={"hidden": 8, "form": FORM}))
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():  # a zero correction: the head gives the student's own entropy (plus FLOOR)
        model.head[-1].weight.zero_()
        logits, mi = model(x, uncertainty=True)
    assert torch.allclose(mi, entropy(torch.softmax(logits, 1)) + FLOOR, rtol=1e-5)
    model.head[-1].weight.data.normal_()
    uncertainty_loss(model(x, uncertainty=True)[1], torch.rand(16)).backward()
    assert all(p.grad is None for p in model.net.parameters())  # its inputs are detached
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())


@pytest.fixture(scope="module")
def trained_head(tmp_path_factory):
    cfg = head_config(tmp_path_factory.mktemp("head") / "run")
    train_teacher(cfg)
    train_student(cfg)
    return cfg, evaluate(cfg)


def test_the_head_learns_the_teachers_mutual_information(trained_head):
    cfg, results = trained_head
    student, spec = load_model(RunDir(cfg).student)
    assert isinstance(student, UncertaintyStudent) and spec["uncertainty_head"]
    agreement = results["methods"]["distilled"]["uncertainty"]
    assert agreement["reference"] == "mc-32"
    # ranks the test rows as MC's mutual information does, far from chance, with values of its scale
    assert agreement["spearman"] > 0.5, agreement
    assert agreement["mae"] < agreement["reference_mean"], agreement
    # what results.json says is what the two models give
    split = run_split(cfg, "test")
    x = torch.from_numpy(split.x)
    with torch.no_grad():
        head = student(x, uncertainty=True)[1]
    teacher = load_model(RunDir(cfg).teacher)[0]
    estimate = mc_estimate(teacher, x, torch.arange(len(x)), 32, row_rng_seed(cfg.seed, EVAL_SEED_SALT, 0))
    reference = uncertainty(estimate.probs, estimate.expected_entropy)["mutual_info"]
    assert agreement["spearman"] == pytest.approx(spearmanr(head.double(), reference).statistic)


def test_the_head_trains_beside_the_kl_and_the_student_still_classifies(trained_head, tmp_path):
    cfg, results = trained_head
    plain = head_config(tmp_path / "plain", "distill.uncertainty=false")
    RunDir(plain).teacher.parent.mkdir(parents=True)
    RunDir(plain).teacher.write_bytes(RunDir(cfg).teacher.read_bytes())
    train_student(plain)
    without = evaluate(plain)["methods"]["distilled"]
    assert "uncertainty" not in without
    # the head's loss never reaches the net: the same student as without the head, to the bit
    assert results["methods"]["distilled"]["error"] == without["error"]
    assert results["methods"]["distilled"]["nll"] == without["nll"]


def test_head_mistakes_are_one_line(tmp_path, capsys):
    code = main(["distill", "data.name=synthetic", "distill.uncertainty=true", "distill.mode=online",
                 f"run_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "uncertainty=true needs mode=offline" in err and "\n" not in err


def test_a_head_reads_the_mutual_info_beside_top_k_labels(tmp_path):
    """Top-k storage keeps the uncertainty columns whole: the training stream's targets are the rebuilt
    top-k distribution and the stored mutual information, beside the rows' images."""
    probs = np.array([[0.7, 0.2, 0.1, 0.0], [0.1, 0.1, 0.8, 0.0]], np.float32)
    columns = {"entropy": np.array([0.8, 0.64]), "expected_entropy": np.array([0.5, 0.6]),
               "mutual_info": np.array([0.3, 0.04])}
    write_shard(tmp_path / shard_name(0), label_table(np.array([0, 1]), probs, np.zeros(2), "topk", 2,
                                                      uncertainty=columns))
    split = load_split("synthetic", "train")
    chunk = {"start": np.array([0]), "stop": np.array([2]), "file": np.array([shard_name(0)]), "offset": np.array([0])}
    rows = read_chunks(chunk, split, str(tmp_path), uncertainty=True)
    targets = torch.from_numpy(rows["target"])
    assert rows["id"].tolist() == [0, 1] and targets.shape == (2, 5)
    assert np.array_equal(rows["x"], split.images([0, 1]))
    assert torch.allclose(targets[:, -1], torch.tensor([0.3, 0.04]))
    assert torch.allclose(targets[0, :2], torch.tensor([0.7, 0.2])) and torch.allclose(targets[:, :4].sum(1), torch.ones(2))
    assert torch.allclose(targets[0, 2:4], torch.tensor([0.05, 0.05]))  # the rest spread over the other classes
