"""The out-of-distribution benchmark's arithmetic (benchmarks/ood.py): AUROC, the goal, the rows it accepts."""
import sys

import numpy as np
import pytest

from benchmarks import ood


def test_auroc_is_the_mann_whitney_probability_with_ties_counting_half():
    # outside 1 beats inside 0, ties inside 1, loses to inside 2: 1.5 of 3; outside 3 beats all three
    assert ood.auroc(np.array([0.0, 1.0, 2.0]), np.array([1.0, 3.0])) == pytest.approx(4.5 / 6)
    assert ood.auroc(np.zeros(4), np.ones(4)) == 1.0
    assert ood.auroc(np.ones(4), np.ones(4)) == 0.5


def run(seed: int, head: float, mutual_info: float, max_softmax: float = 0.9) -> dict:
    """One seed's AUROCs on one pair: the three given, every other score 0.9."""
    auroc = {f"{m}/{s}": 0.9 for m, names in ood.SCORES.items() for s in names}
    auroc |= {"distilled/uncertainty head": head, "mc/mutual information": mutual_info,
              "standard/max-softmax": max_softmax}
    return {"row": "mnist-lenet", "seed": seed, "auroc": {"fashion-mnist": auroc}}


def test_the_goal_compares_the_students_best_one_pass_score_with_mc_and_max_softmax():
    runs = [run(0, head=0.980, mutual_info=0.982, max_softmax=0.970),
            run(1, head=0.984, mutual_info=0.984, max_softmax=0.974)]
    s = ood.summary(runs)["mnist-lenet / fashion-mnist"]
    assert s["best_student"] == "distilled/uncertainty head" and s["best_mc"] == "mc/mutual information"
    assert s["student_minus_mc"] == pytest.approx(-0.001) and s["within_0.003_of_mc"] and s["above_max_softmax"]
    assert s["scores"]["mc/mutual information"]["std"] == pytest.approx(np.std([0.982, 0.984], ddof=1))
    behind = ood.summary([run(0, head=0.975, mutual_info=0.982)])["mnist-lenet / fashion-mnist"]
    assert not behind["within_0.003_of_mc"]


def test_only_rows_trained_on_mnist_are_accepted(monkeypatch, capsys):
    assert ood.MNIST_ROWS == ["mnist-lenet", "mnist-lenet_all", "mnist-lenet_all_prepool", "mnist-mlp"]
    monkeypatch.setattr(sys, "argv", ["ood", "--rows", "fashion-lenet"])
    with pytest.raises(SystemExit) as exit_:
        ood.main()
    assert exit_.value.code == 2
    assert "fashion-lenet not trained on MNIST" in capsys.readouterr().err.strip().splitlines()[-1]
