"""A student that gives its class logits and an estimate of the teacher's MC uncertainty in one pass.

UncertaintyStudent wraps any student net. Its head predicts the row's mutual information between the
teacher's prediction and its dropout mask, as stored in the label shards (`mutual_info`), as a correction
of the student's own predictive entropy H[q] in log space:

    log MI = log(H[q] + FLOOR) + head(features, q)

where the features are those entering the net's last nn.Linear (the classifier; captured by a forward
hook, so the net itself is untouched) and head is Linear(features + C, hidden) -> ReLU -> Linear(hidden, 1).
- The entropy term carries the signal that transfers beyond the training images: on inputs unlike them
  the student's own prediction flattens, and MC's mutual information grows with it. A head that read the
  features alone learned the training images' mutual information (Spearman 0.88 on the test split) but
  ranked out-of-distribution images below max-softmax: on LeNetAll, Fashion-MNIST against MNIST, AUROC
  0.79 against MC-100's 0.98 (`make bench-ood`, benchmarks/results/ood.md, has the current figures).
- The head's inputs are detached: its loss trains the head alone, so the student's classifier is the
  same with or without it. (Trained through, the head bent the features towards itself and cost the
  student accuracy.)
- It starts at the student's entropy (output bias 0; MI <= H[mean] always), and a head whose ReLUs die
  still gives that entropy, never a constant.

The loss (uncertainty_loss) is the mean squared error between that log and log(mutual information +
FLOOR): the log spreads the many near-zero values of confident rows, which an error on the raw values
would leave to a few uncertain rows, and what evaluate measures is a ranking (Spearman). It is added
to the distillation KL with the weight distill.uncertainty_weight.

`model(x)` gives the logits, as of any student (evaluate, MLflow, export); `model(x, uncertainty=True)`
gives (logits, mutual information).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dd_dist.core.mc import entropy, softmax

HIDDEN = 32
FLOOR = 1e-3  # nats: stored mutual information below this counts as "confident" alike in the log loss
FORM = "entropy-residual"  # recorded in the checkpoint: what the head's output means


class UncertaintyStudent(nn.Module):
    def __init__(self, net: nn.Module, hidden: int = HIDDEN, form: str | None = None):
        super().__init__()
        if form != FORM:
            raise ValueError(f"its uncertainty head is of form {form or 'features-only'}, which this version "
                             f"does not build (only {FORM}): distil the student again")
        linears = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
        if not linears:
            raise ValueError(f"an uncertainty head reads the features entering the last nn.Linear; "
                             f"this {type(net).__name__} has none")
        self.net, self.classifier = net, linears[-1]  # by name: the module itself would be a second state_dict entry
        classifier = net.get_submodule(self.classifier)
        self.head = nn.Sequential(nn.Linear(classifier.in_features + classifier.out_features, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 1))
        with torch.no_grad():  # start at the student's own entropy
            self.head[-1].bias.zero_()
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
        features = seen[-1].detach().flatten(1)
        q = softmax(logits.detach())  # float32 even under bf16, as MC's probabilities
        correction = self.head(torch.cat([features, q.to(features.dtype)], 1)).squeeze(1).float()
        return logits, (correction + (entropy(q) + FLOOR).log()).exp()


def uncertainty_loss(predicted_mi: torch.Tensor, mutual_info: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the head's log mutual information and log(stored + FLOOR)."""
    return F.mse_loss(predicted_mi.log(), (mutual_info.clamp_min(0) + FLOOR).log())
