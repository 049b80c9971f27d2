"""Quality of predicted class probabilities: error, NLL, expected calibration error, Brier score."""
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


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Sum over equal-width confidence bins of |accuracy - confidence| weighted by the bin's share of rows."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    # Bin b holds confidences in (b/bins, (b+1)/bins]; confidence 0 cannot occur for a softmax.
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.double().mean().item() * abs(correct[inside].mean().item() - confidence[inside].double().mean().item())
    return ece
