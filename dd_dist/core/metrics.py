"""Quality of predicted class probabilities: error, NLL, expected calibration error, Brier score,
and the per-bin data of a reliability diagram."""
from __future__ import annotations

import torch


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, float]:
    probs, labels = probs.double(), labels.long()
    picked = probs.gather(1, labels[:, None]).squeeze(1)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return {
        "error": (probs.argmax(1) != labels).double().mean().item(),
        "nll": -picked.clamp_min(1e-12).log().mean().item(),
        "ece": expected_calibration_error(probs, labels, bins),
        "brier": ((probs - onehot) ** 2).sum(1).mean().item(),
    }


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, list]:
    """Per equal-width confidence bin: row count, accuracy and mean confidence (0 in empty bins)."""
    confidence, predicted = probs.double().max(1)
    correct = (predicted == labels.long()).double()
    # Bin b holds confidences in (b/bins, (b+1)/bins]; confidence 0 cannot occur for a softmax.
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    count = torch.bincount(which, minlength=bins).double()
    seen = count.clamp_min(1)
    return {
        "count": count.long().tolist(),
        "accuracy": (torch.bincount(which, weights=correct, minlength=bins) / seen).tolist(),
        "confidence": (torch.bincount(which, weights=confidence, minlength=bins) / seen).tolist(),
    }


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Sum over equal-width confidence bins of |accuracy - confidence| weighted by the bin's share of rows."""
    r = reliability_bins(probs, labels, bins)
    rows = sum(r["count"])
    return sum(n / rows * abs(acc - conf) for n, acc, conf in zip(r["count"], r["accuracy"], r["confidence"]))
