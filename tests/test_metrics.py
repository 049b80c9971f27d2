"""Metrics against numbers worked out by hand on four rows."""
import math

import pytest
import torch

from dd_dist.core.metrics import classification_metrics, expected_calibration_error, reliability_bins

# Row: probabilities, label -> predicted class, confidence, probability of the true class.
PROBS = torch.tensor([
    [0.70, 0.20, 0.10],  # label 0: right, confidence 0.70, p(true) 0.70
    [0.08, 0.62, 0.30],  # label 2: wrong, confidence 0.62, p(true) 0.30
    [0.90, 0.05, 0.05],  # label 0: right, confidence 0.90, p(true) 0.90
    [0.25, 0.25, 0.50],  # label 1: wrong, confidence 0.50, p(true) 0.25
])
LABELS = torch.tensor([0, 2, 0, 1])


def test_error_nll_brier_by_hand():
    m = classification_metrics(PROBS, LABELS)
    assert m["error"] == pytest.approx(2 / 4)
    assert m["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.9) + math.log(0.25)) / 4)
    # Squared distance to the one-hot label, row by row.
    brier_rows = [0.3**2 + 0.2**2 + 0.1**2, 0.08**2 + 0.62**2 + 0.7**2,
                  0.1**2 + 0.05**2 + 0.05**2, 0.25**2 + 0.75**2 + 0.5**2]
    assert brier_rows == pytest.approx([0.14, 0.8808, 0.015, 0.875])
    assert m["brier"] == pytest.approx(sum(brier_rows) / 4)


def test_ece_with_15_bins_puts_each_row_alone():
    # Confidences 0.70, 0.62, 0.90, 0.50 fall in bins 10, 9, 13 and 7 of width 1/15: ECE = mean |correct - conf|.
    expected = (abs(1 - 0.70) + abs(0 - 0.62) + abs(1 - 0.90) + abs(0 - 0.50)) / 4
    assert expected == pytest.approx(0.38)
    assert classification_metrics(PROBS, LABELS)["ece"] == pytest.approx(expected)
    r = reliability_bins(PROBS, LABELS)
    assert [i for i, n in enumerate(r["count"]) if n] == [7, 9, 10, 13]


def test_ece_and_reliability_with_shared_bins():
    # Two bins: (0, .5] holds the 0.50 row (wrong); (.5, 1] holds 0.70, 0.62, 0.90 with 2 of 3 right.
    r = reliability_bins(PROBS, LABELS, bins=2)
    assert r["count"] == [1, 3]
    assert r["accuracy"] == pytest.approx([0.0, 2 / 3])
    assert r["confidence"] == pytest.approx([0.50, 0.74])
    expected = 1 / 4 * abs(0 - 0.50) + 3 / 4 * abs(2 / 3 - 0.74)
    assert expected == pytest.approx(0.18)
    assert expected_calibration_error(PROBS, LABELS, bins=2) == pytest.approx(expected)


def test_confident_and_right_scores_zero_and_float32_agrees():
    onehot = torch.eye(3)[[0, 2, 1]]
    m = classification_metrics(onehot, torch.tensor([0, 2, 1]))
    assert m == pytest.approx({"error": 0.0, "nll": 0.0, "ece": 0.0, "brier": 0.0})
    assert classification_metrics(PROBS.float(), LABELS) == pytest.approx(classification_metrics(PROBS.double(), LABELS))
