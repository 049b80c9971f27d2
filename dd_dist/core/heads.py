"""A student that gives its class logits and an estimate of the teacher's MC uncertainty in one pass.

UncertaintyStudent wraps any student net. Its head reads the features that enter the net's last
nn.Linear (the classifier; captured by a forward hook, so the net itself is untouched) together with
the student's own softmax, and predicts the row's mutual information between the teacher's prediction
and its dropout mask, as stored in the label shards (`mutual_info`). The head is
Linear(features + C, hidden) -> ReLU -> Linear(hidden, 1) and gives the log of the mutual information;
the prediction is its exp (>= 0), so the loss's gradient is linear in the head's output. (A softplus
or a square root on the output saturated or blew up on near-zero targets in tests and left the head
constant.)

The loss (uncertainty_loss) is the mean squared error between that log and log(mutual information +
FLOOR): the log spreads the many near-zero values of confident rows, which an error on the raw values
would leave to a few uncertain rows, and what evaluate measures is a ranking (Spearman). It is added
to the distillation KL with the weight distill.uncertainty_weight.

`model(x)` gives the logits, as of any student (evaluate, MLflow, export); `model(x, uncertainty=True)`
gives (logits, mutual information).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN = 32
FLOOR = 1e-3  # nats: stored mutual information below this counts as "confident" alike in the log loss


class UncertaintyStudent(nn.Module):
    def __init__(self, net: nn.Module, hidden: int = HIDDEN):
        super().__init__()
        linears = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
        if not linears:
            raise ValueError(f"an uncertainty head reads the features entering the last nn.Linear; "
                             f"this {type(net).__name__} has none")
        self.net, self.classifier = net, linears[-1]  # by name: the module itself would be a second state_dict entry
        classifier = net.get_submodule(self.classifier)
        self.head = nn.Sequential(nn.Linear(classifier.in_features + classifier.out_features, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 1))
        with torch.no_grad():  # start near a typical row's log mutual information, not at 1 nat
            self.head[-1].bias.fill_(math.log(10 * FLOOR))
        self.loss_weight = 1.0  # of the head's loss against the KL term, while training (distill.uncertainty_weight)

    def forward(self, x: torch.Tensor, uncertainty: bool = False):
        if not uncertainty:
            return self.net(x)
        seen = []
        hook = self.net.get_submodule(self.classifier).register_forward_hook(lambda m, args, out: seen.append(args[0]))
        try:
            logits = self.net(x)
        finally:
            hook.remove()
        inputs = torch.cat([seen[-1].flatten(1), F.softmax(logits, 1)], 1)  # the features and the prediction
        return logits, self.head(inputs).squeeze(1).exp()


def uncertainty_loss(predicted_mi: torch.Tensor, mutual_info: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the head's log mutual information and log(stored + FLOOR)."""
    return F.mse_loss(predicted_mi.log(), (mutual_info.clamp_min(0) + FLOOR).log())
