"""label.precision / eval.precision: bf16 and fp16 forward passes under autocast, probabilities and MC means in
float32, close to the fp32 labels, replayable in another batch, and a device that lacks the dtype refused."""
import pytest
import torch

from dd_dist.core.models import build_model, model_spec
from dd_dist.core.precision import check_precision
from dd_dist.errors import UserError
from dd_dist.labels.actors import label_rows
from dd_dist.labels.verify import KL_TOLERANCE
from dd_dist.schemes import MCScheme


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    p, q = p.double(), q.double()
    return (torch.xlogy(p, p) - p * q.log()).sum(1)


@pytest.fixture(scope="module")
def teacher_and_rows():
    torch.manual_seed(0)
    model = build_model(**model_spec("lenet_all", (1, 28, 28), 10, 0.5))
    return model, torch.rand(96, 1, 28, 28), torch.arange(96) * 3


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_labels_are_float32_means_close_to_fp32(teacher_and_rows, precision):
    model, x, ids = teacher_and_rows
    full = label_rows(model, x, ids, 20, 0, 0.2, 0.0, "fp32")
    half = label_rows(model, x, ids, 20, 0, 0.2, 0.0, precision)
    assert half.probs.dtype == torch.float32 and half.expected_entropy.dtype == torch.float32
    assert torch.allclose(half.probs.sum(1), torch.ones(len(x)), atol=1e-5)
    assert kl(full.probs, half.probs).mean() < 1e-3  # the layers round, the softmax and the mean do not
    assert not torch.equal(full.probs, half.probs)  # and they do round: autocast was on


def test_half_precision_labels_replay_in_another_batch_within_verify_tolerance(teacher_and_rows):
    model, x, ids = teacher_and_rows
    for scheme in (MCScheme(k=20), MCScheme(k=8, antithetic=True, control_variate=True)):
        whole = label_rows(model, x, ids, scheme, 0, 0.2, 0.0, "bf16").probs
        picked = torch.tensor([90, 3, 41, 7, 64])
        again = label_rows(model, x[picked], ids[picked], scheme, 0, 0.2, 0.0, "bf16").probs
        assert kl(whole[picked], again).mean() < KL_TOLERANCE


def test_a_precision_the_device_lacks_is_one_line():
    check_precision("bf16", "cpu")
    with pytest.raises(UserError, match="eval.precision: bf16 was asked for, but torch .* cannot compute in it on "
                                        "meta") as refused:
        check_precision("bf16", "meta", "eval.precision")
    assert "\n" not in str(refused.value)
    with pytest.raises(UserError, match="not one of fp32, bf16, fp16"):
        check_precision("fp8", "cpu")
