"""The core method trains: the teacher's loss falls, and a distilled student (offline labels or
online single masks) ends closer to the MC teacher than the teacher's own weight scaling."""
import pytest
import torch

from dd_dist.config import DistillConfig, TrainConfig
from dd_dist.data.splits import load_split
from dd_dist.core.loop import fit
from dd_dist.core.mc import mc_probs, soft_target_kl
from dd_dist.core.models import build_model, init_student_from_teacher
from dd_dist.core.tasks import StudentTask, TeacherTask, offline_batches, online_batches, teacher_batches


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
    losses = fit(teacher, cfg, len(split), teacher_batches(split), TeacherTask, seed=0, log=lambda m: None)
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
    losses = fit(student, cfg, len(split), batches, StudentTask, seed=0, log=lambda m: None)
    assert losses[-1] < losses[0]
    assert kl_to_mc_teacher(teacher, student, x, ids) < kl_to_mc_teacher(teacher, teacher, x, ids)


def test_the_student_learns_as_the_deterministic_net_it_is_at_test_time(toy):
    """J(q) compares the student's own output q(x) with the MC mean: trained with its dropout off (the
    default) it ends closer to the MC teacher than the same student trained with dropout on."""
    split, teacher, _ = toy
    x, ids = torch.from_numpy(split.x), torch.arange(len(split))
    labels = mc_probs(teacher, x, ids, 64, seed=0).clone()

    def distilled(dropout: bool) -> float:
        student = build_model("mlp", split.in_shape, split.num_classes, p=0.5, width=0.1)
        init_student_from_teacher(student, teacher)
        cfg = DistillConfig(epochs=6, lr=0.05, lr_steps=[4], batch_size=32, weight_decay=0, dropout=dropout)
        fit(student, cfg, len(split), offline_batches(split, labels, 0, 0.0, 0.0), StudentTask, seed=0,
            log=lambda m: None)
        return kl_to_mc_teacher(teacher, student, x, ids)

    assert DistillConfig().dropout is False
    deterministic, with_dropout = distilled(False), distilled(True)
    assert deterministic < 0.8 * with_dropout
