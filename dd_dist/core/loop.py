"""The single-process reference of the training stages, in plain PyTorch, on a split held in memory: the
loop whose steps a DeepSpeed engine takes on the same batches (test_trainer), and whole teacher / student
runs on it, used by tests and benchmarks as the baseline of the distributed ones (which stream their
rows instead, in other batches: dd_dist.train.rows).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from dd_dist.config import Config, TrainConfig
from dd_dist.core.augment import augment
from dd_dist.core.mc import mc_estimate
from dd_dist.core.models import load_model, save_model
from dd_dist.core.tasks import BatchFn, StudentTask, Task, TeacherTask, in_memory
from dd_dist.data.splits import Split, run_split
from dd_dist.layout import RunDir

def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """The paper's step schedule: lr times lr_gamma after each epoch listed in lr_steps."""
    return cfg.lr * cfg.lr_gamma ** sum(epoch >= s for s in cfg.lr_steps)


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer != "sgd":
        raise ValueError("the plain loop only builds SGD; other optimizers come from the DeepSpeed config")
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def epoch_batches(ids: np.ndarray, batch_size: int, seed: int, epoch: int) -> Iterator[torch.Tensor]:
    """Row ids of one epoch, shuffled by (seed, epoch) so every worker and every resume sees the same order."""
    order = np.random.default_rng([seed, epoch]).permutation(ids)
    for start in range(0, len(order), batch_size):
        yield torch.from_numpy(order[start : start + batch_size])


def print_epoch(m: dict) -> None:
    print(f"{m['stage']} epoch {m['epoch']}/{m['epochs']}  loss {m['loss']:.4f}  lr {m['lr']:.2g}  "
          f"{m['samples_per_s']:.0f} samples/s", flush=True)


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, n_rows: int, batch_fn: BatchFn, task: Task,
                batch_size: int, seed: int, epoch: int, step: int) -> tuple[float, int, int]:
    """One epoch of SGD steps over the rows in (seed, epoch) order, the model already in its train mode;
    returns (summed loss, rows seen, the step count after it)."""
    total, seen = 0.0, 0
    for ids in epoch_batches(np.arange(n_rows), batch_size, seed, epoch):
        inputs, targets = batch_fn(ids, epoch, step)
        loss = task.loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, seen, step = total + loss.item() * len(ids), seen + len(ids), step + 1
    return total, seen, step


def fit(model: torch.nn.Module, cfg: TrainConfig, n_rows: int, batch_fn: BatchFn, task: Task, seed: int,
        log: Callable[[dict], None] = print_epoch) -> list[float]:
    """The plain single-process reference loop; returns the mean loss of each epoch."""
    torch.manual_seed(seed)
    optimizer = make_optimizer(model.parameters(), cfg)
    losses, step = [], 0
    for epoch in range(cfg.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        task.train_mode(model, cfg)
        start = time.perf_counter()
        total, seen, step = train_epoch(model, optimizer, n_rows, batch_fn, task, cfg.batch_size, seed, epoch, step)
        losses.append(total / seen)
        log({"stage": task.role, "epoch": epoch + 1, "epochs": cfg.epochs, "loss": losses[-1], "lr": lr_at(cfg, epoch),
             "samples_per_s": seen / (time.perf_counter() - start)})
    return losses


def soft_labels_in_memory(cfg: Config, teacher: torch.nn.Module, split: Split) -> torch.Tensor:
    """K-mask MC labels for the augmented training view, computed in this process; with distill.uncertainty
    the mutual information as one more column."""
    x, out = torch.from_numpy(split.x), []
    for start in range(0, len(split), cfg.label.batch_size):
        ids = torch.arange(start, min(start + cfg.label.batch_size, len(split)))
        inputs = augment(x[ids], ids, cfg.seed, 0, cfg.data.zero_p, cfg.data.flip_p)
        estimate = mc_estimate(teacher, inputs, ids, cfg.label.k, cfg.seed)
        targets = [estimate.probs]
        if cfg.distill.uncertainty:
            targets.append(estimate.uncertainty()["mutual_info"].float()[:, None])
        out.append(torch.cat(targets, 1))
    return torch.cat(out)


def _train(cfg: Config, task: Task, targets: torch.Tensor | None = None) -> Path:
    """`task` on the training split in memory; targets: the soft labels of its rows in order (default: the
    hard labels)."""
    split = run_split(cfg, "train")
    setup = task.setup(cfg, split)
    targets = torch.from_numpy(split.y) if targets is None else targets
    batches = in_memory(torch.from_numpy(split.x), targets, setup.prepare)
    fit(setup.model, task.options(cfg), len(split), batches, task, cfg.seed)
    path = RunDir(cfg).model(task.role)
    save_model(path, setup.model, setup.spec, {"data_fingerprint": setup.fingerprint})
    return path


def train_teacher(cfg: Config) -> Path:
    """The teacher, trained in this process; returns run_dir/teacher/model.pt."""
    return _train(cfg, TeacherTask)


def train_student(cfg: Config, soft_labels: torch.Tensor | None = None) -> Path:
    """The student, trained in this process on `soft_labels` (rows in order; default: MC labels computed
    here) or online; returns run_dir/student/model.pt."""
    if cfg.distill.mode == "offline" and soft_labels is None:
        split = run_split(cfg, "train")
        soft_labels = soft_labels_in_memory(cfg, load_model(RunDir(cfg).teacher)[0], split)
    return _train(cfg, StudentTask, soft_labels)
