"""Training pieces shared by the plain single-process loop and the DeepSpeed/Ray Train trainer.

A stage is described by a `batch_fn(ids, epoch, step) -> (inputs, targets)` and a loss:
hard labels + cross-entropy for the teacher, soft labels + KL for the student.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from dd_dist.config import DistillConfig, TrainConfig
from dd_dist.data import Split, augment
from dd_dist.mc import dropout_layers, online_targets, soft_target_kl

BatchFn = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """The paper's step schedule: lr times lr_gamma after each epoch listed in lr_steps."""
    return cfg.lr * cfg.lr_gamma ** sum(epoch >= s for s in cfg.lr_steps)


def train_mode(model: torch.nn.Module, stage: str, cfg: TrainConfig) -> None:
    """model.train(), except that a student's dropout stays off (unless distill.dropout): it learns as the
    deterministic predictor q it is at test time, since J(q) compares q(x) itself, not a masked q, with
    the MC mean of the teacher."""
    model.train()
    if stage == "student" and not (isinstance(cfg, DistillConfig) and cfg.dropout):
        for module in dropout_layers(model):
            module.eval()


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer != "sgd":
        raise ValueError("the plain loop only builds SGD; other optimizers come from the DeepSpeed config")
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def epoch_batches(ids: np.ndarray, batch_size: int, seed: int, epoch: int) -> Iterator[torch.Tensor]:
    """Row ids of one epoch, shuffled by (seed, epoch) so every worker and every resume sees the same order."""
    order = np.random.default_rng([seed, epoch]).permutation(ids)
    for start in range(0, len(order), batch_size):
        yield torch.from_numpy(order[start : start + batch_size])


def loss_for(stage: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return F.cross_entropy if stage == "teacher" else soft_target_kl


def teacher_batches(split: Split) -> BatchFn:
    x, y = torch.from_numpy(split.x), torch.from_numpy(split.y)
    return lambda ids, epoch, step: (x[ids], y[ids])


def offline_batches(split: Split, soft_labels: torch.Tensor, seed: int, zero_p: float, flip_p: float) -> BatchFn:
    """Student inputs are the augmented view the labels were computed on (augmentation epoch 0)."""
    x = torch.from_numpy(split.x)
    return lambda ids, epoch, step: (augment(x[ids], ids, seed, 0, zero_p, flip_p), soft_labels[ids])


def online_batches(split: Split, teacher: torch.nn.Module, seed: int, zero_p: float, flip_p: float) -> BatchFn:
    """Algorithm 2: a fresh augmentation and ONE teacher dropout mask per example and step."""
    x = torch.from_numpy(split.x)

    def batch(ids, epoch, step):
        inputs = augment(x[ids], ids, seed, epoch, zero_p, flip_p)
        return inputs, online_targets(teacher, inputs, ids, seed, step)

    return batch


def print_epoch(m: dict) -> None:
    print(f"{m['stage']} epoch {m['epoch']}/{m['epochs']}  loss {m['loss']:.4f}  lr {m['lr']:.2g}  "
          f"{m['samples_per_s']:.0f} samples/s", flush=True)


def fit(model: torch.nn.Module, cfg: TrainConfig, n_rows: int, batch_fn: BatchFn, stage: str, seed: int,
        log: Callable[[dict], None] = print_epoch) -> list[float]:
    """The plain single-process reference loop; returns the mean loss of each epoch."""
    torch.manual_seed(seed)
    optimizer = make_optimizer(model.parameters(), cfg)
    loss_fn, losses, step = loss_for(stage), [], 0
    for epoch in range(cfg.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        train_mode(model, stage, cfg)
        total, seen, start = 0.0, 0, time.perf_counter()
        for ids in epoch_batches(np.arange(n_rows), cfg.batch_size, seed, epoch):
            inputs, targets = batch_fn(ids, epoch, step)
            loss = loss_fn(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen, step = total + loss.item() * len(ids), seen + len(ids), step + 1
        losses.append(total / seen)
        log({"stage": stage, "epoch": epoch + 1, "epochs": cfg.epochs, "loss": losses[-1], "lr": lr_at(cfg, epoch),
             "samples_per_s": seen / (time.perf_counter() - start)})
    return losses
