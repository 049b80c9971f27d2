"""The two training stages as tasks: the model a stage trains, its batches, its loss and its train mode.

The plain single-process loop (dd_dist.core.loop) and every DeepSpeed worker (dd_dist.train.worker)
build a stage the same way, from the config and the training split:

    TeacherTask   the dropout net on hard labels, cross-entropy
    StudentTask   the student on the teacher's soft labels, KL: offline, the stored MC labels of the
                  augmented view at epoch 0; online (the paper's Algorithm 2), a fresh augmentation and
                  ONE teacher mask per example and step

A stage's `prepare(ids, images, targets, epoch, step) -> (inputs, targets)` turns the rows of one step
(streamed to a DeepSpeed worker, or taken from arrays in memory by a batch function
`batches(ids, epoch, step)` in the plain loop) into the model's inputs and targets, and the task's
`loss(model, inputs, targets)` runs the model (a module, or the DeepSpeed engine around it) on them. A student with an uncertainty head (distill.uncertainty) has targets of C + 1 columns: the soft
label and the row's mutual information.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dd_dist.config import Config, DistillConfig, TrainConfig
from dd_dist.core.augment import augment
from dd_dist.core.heads import FORM, HIDDEN, UncertaintyStudent, uncertainty_loss
from dd_dist.core.mc import dropout_layers, online_targets, soft_target_kl
from dd_dist.core.models import build_model, check_for_mc, init_student_from_teacher, load_model, model_spec
from dd_dist.data.splits import Split
from dd_dist.layout import RunDir

BatchFn = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]
# (ids, images, targets, epoch, step) -> (inputs, targets): what a stage makes of the rows of one step, wherever
# they come from (the streamed training dataset of dd_dist.train.rows, or arrays in memory)
Prepare = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Setup:
    """What a stage trains: the model (and its checkpoint spec) and what it makes of a step's rows."""

    model: nn.Module
    spec: dict
    prepare: Prepare
    fingerprint: str  # the training data's, recorded in the exported checkpoint


def build_for(cfg: Config, split: Split, width: float = 1.0) -> tuple[nn.Module, dict]:
    """model.arch (with its kwargs) for the split's images and classes, at `width`."""
    spec = model_spec(cfg.model.arch, split.in_shape, split.num_classes, cfg.model.p, width, cfg.model.kwargs)
    return build_model(**spec), spec


def build_teacher(cfg: Config, split: Split) -> tuple[nn.Module, dict]:
    """The teacher: model.arch, checked for MC dropout where it is a net of the user's."""
    model, spec = build_for(cfg, split)
    check_for_mc(model, spec)
    return model, spec


def build_student(cfg: Config, split: Split) -> tuple[nn.Module, dict]:
    """The student: distill.arch with distill.kwargs where set (a net of another family), else model.arch;
    at distill.width either way; wrapped in an UncertaintyStudent with distill.uncertainty."""
    d = cfg.distill
    arch, kwargs = (cfg.model.arch, cfg.model.kwargs) if d.arch is None else (d.arch, d.kwargs)
    head = {"hidden": HIDDEN, "form": FORM} if d.uncertainty else None
    spec = model_spec(arch, split.in_shape, split.num_classes, cfg.model.p, d.width, kwargs, head)
    return build_model(**spec), spec


def teacher_inputs(ids, x, labels, epoch, step):
    return x, labels


def offline_inputs(seed: int, zero_p: float, flip_p: float) -> Prepare:
    """Student inputs are the augmented view the labels were computed on (augmentation epoch 0)."""
    return lambda ids, x, soft, epoch, step: (augment(x, ids, seed, 0, zero_p, flip_p), soft)


def online_inputs(teacher: nn.Module, seed: int, zero_p: float, flip_p: float) -> Prepare:
    """Algorithm 2: a fresh augmentation and ONE teacher dropout mask per example and step."""

    device = next(teacher.parameters()).device

    def prepare(ids, x, labels, epoch, step):
        inputs = augment(x, ids, seed, epoch, zero_p, flip_p).to(device)  # where the teacher lives
        return inputs, online_targets(teacher, inputs, ids, seed, step)

    return prepare


def in_memory(x: torch.Tensor, targets: torch.Tensor, prepare: Prepare) -> BatchFn:
    """The batches of the plain loop: rows `ids` of arrays in memory."""
    return lambda ids, epoch, step: prepare(ids, x[ids], targets[ids], epoch, step)


def teacher_batches(split: Split) -> BatchFn:
    return in_memory(torch.from_numpy(split.x), torch.from_numpy(split.y), teacher_inputs)


def offline_batches(split: Split, soft_labels: torch.Tensor, seed: int, zero_p: float, flip_p: float) -> BatchFn:
    return in_memory(torch.from_numpy(split.x), soft_labels, offline_inputs(seed, zero_p, flip_p))


def online_batches(split: Split, teacher: nn.Module, seed: int, zero_p: float, flip_p: float) -> BatchFn:
    return in_memory(torch.from_numpy(split.x), torch.from_numpy(split.y), online_inputs(teacher, seed, zero_p, flip_p))


class TeacherTask:
    """`dd-dist teacher`: the dropout net on hard labels."""

    stage = "teacher"  # the CLI command and the MLflow stage
    role = "teacher"  # the model it makes: run_dir/teacher/model.pt

    @staticmethod
    def options(cfg: Config) -> TrainConfig:
        return cfg.teacher

    @staticmethod
    def loss(model, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(inputs).float(), labels)

    @staticmethod
    def train_mode(model: nn.Module, opt: TrainConfig) -> None:
        model.train()

    @staticmethod
    def setup(cfg: Config, split: Split, label_seed: int | None = None, device: str | torch.device = "cpu") -> Setup:
        torch.manual_seed(cfg.seed)
        model, spec = build_teacher(cfg, split)
        return Setup(model, spec, teacher_inputs, split.fingerprint)


class StudentTask:
    """`dd-dist distill`: the student on the teacher's soft labels."""

    stage = "distill"
    role = "student"

    @staticmethod
    def options(cfg: Config) -> DistillConfig:
        return cfg.distill

    @staticmethod
    def loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """KL to the soft labels; with an uncertainty head plus its weighted regression on the mutual information."""
        student = getattr(model, "module", model)  # a DeepSpeed engine's module
        if not isinstance(student, UncertaintyStudent):
            return soft_target_kl(model(inputs).float(), targets)
        logits, mutual_info = model(inputs, uncertainty=True)
        return (soft_target_kl(logits.float(), targets[:, :-1])
                + student.loss_weight * uncertainty_loss(mutual_info.float(), targets[:, -1]))

    @staticmethod
    def train_mode(model: nn.Module, opt: TrainConfig) -> None:
        """model.train(), except that the student's dropout stays off (unless distill.dropout): it learns as
        the deterministic predictor q it is at test time, since J(q) compares q(x) itself, not a masked q,
        with the MC mean of the teacher."""
        model.train()
        if not (isinstance(opt, DistillConfig) and opt.dropout):
            for module in dropout_layers(model):
                module.eval()

    @staticmethod
    def setup(cfg: Config, split: Split, label_seed: int | None = None, device: str | torch.device = "cpu") -> Setup:
        """Offline, the targets are the soft labels of labels made with augmentation seed `label_seed`
        (default cfg.seed); online (distill.mode=online), the rows' hard labels, unused, and the teacher
        on `device` (the worker's) gives each step's targets."""
        torch.manual_seed(cfg.seed)
        teacher, _ = load_model(RunDir(cfg).teacher)
        model, spec = build_student(cfg, split)
        net = model
        if isinstance(model, UncertaintyStudent):
            net, model.loss_weight = model.net, cfg.distill.uncertainty_weight
        if cfg.distill.init == "teacher":
            init_student_from_teacher(net, teacher)
        zero_p, flip_p = cfg.data.zero_p, cfg.data.flip_p
        if cfg.distill.mode == "online":
            return Setup(model, spec, online_inputs(teacher.to(device), cfg.seed, zero_p, flip_p), split.fingerprint)
        # The inputs the labels were computed on: augmentation epoch 0 with the labels' own seed.
        seed = cfg.seed if label_seed is None else label_seed
        return Setup(model, spec, offline_inputs(seed, zero_p, flip_p), split.fingerprint)


Task = type[TeacherTask] | type[StudentTask]  # a stage is its class: picklable by name, for Ray Train workers
