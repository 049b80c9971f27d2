"""The stages wired together: teacher -> soft labels -> student -> evaluation.

This is the single-process reference pipeline (one Python process, plain PyTorch loops).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from dd_dist.config import Config
from dd_dist.data import Split, augment, load_split
from dd_dist.mc import mc_probs, standard_probs
from dd_dist.metrics import classification_metrics
from dd_dist.models import build_model, init_student_from_teacher, load_model, model_spec, save_model
from dd_dist.train import fit, offline_batches, online_batches, teacher_batches


def train_split(cfg: Config) -> Split:
    return load_split(cfg.data.name, "train", cfg.data.path, cfg.data.train_rows, cfg.seed)


def test_split(cfg: Config) -> Split:
    return load_split(cfg.data.name, "test", cfg.data.path, cfg.data.test_rows, cfg.seed)


def teacher_path(cfg: Config) -> Path:
    return Path(cfg.run_dir) / "teacher" / "model.pt"


def student_path(cfg: Config) -> Path:
    return Path(cfg.run_dir) / "student" / "model.pt"


def build_for(cfg: Config, split: Split, width: float = 1.0):
    spec = model_spec(cfg.model.arch, split.in_shape, split.num_classes, cfg.model.p, width)
    return build_model(**spec), spec


def train_teacher(cfg: Config) -> Path:
    split = train_split(cfg)
    torch.manual_seed(cfg.seed)
    model, spec = build_for(cfg, split)
    fit(model, cfg.teacher, len(split), teacher_batches(split), "teacher", cfg.seed)
    save_model(teacher_path(cfg), model, spec, {"data_fingerprint": split.fingerprint})
    return teacher_path(cfg)


def soft_labels_in_memory(cfg: Config, teacher: torch.nn.Module, split: Split) -> torch.Tensor:
    """K-mask MC labels for the augmented training view, computed in this process."""
    x, out = torch.from_numpy(split.x), []
    for start in range(0, len(split), cfg.label.batch_size):
        ids = torch.arange(start, min(start + cfg.label.batch_size, len(split)))
        inputs = augment(x[ids], ids, cfg.seed, 0, cfg.data.zero_p, cfg.data.flip_p)
        out.append(mc_probs(teacher, inputs, ids, cfg.label.k, cfg.seed))
    return torch.cat(out)


def train_student(cfg: Config, soft_labels: torch.Tensor | None = None) -> Path:
    split, d = train_split(cfg), cfg.distill
    teacher, _ = load_model(teacher_path(cfg))
    torch.manual_seed(cfg.seed)
    student, spec = build_for(cfg, split, d.width)
    if d.init == "teacher":
        init_student_from_teacher(student, teacher)
    if d.mode == "online":
        batches = online_batches(split, teacher, cfg.seed, cfg.data.zero_p, cfg.data.flip_p)
    else:
        if soft_labels is None:
            soft_labels = soft_labels_in_memory(cfg, teacher, split)
        batches = offline_batches(split, soft_labels, cfg.seed, cfg.data.zero_p, cfg.data.flip_p)
    fit(student, d, len(split), batches, "student", cfg.seed)
    save_model(student_path(cfg), student, spec, {"data_fingerprint": split.fingerprint})
    return student_path(cfg)


def quick_evaluate(cfg: Config) -> dict[str, dict[str, float]]:
    """Test metrics of standard dropout, MC dropout at the largest configured K, and the student."""
    split = test_split(cfg)
    x, y = torch.from_numpy(split.x), torch.from_numpy(split.y)
    ids = torch.arange(len(split))
    teacher, _ = load_model(teacher_path(cfg))
    student, _ = load_model(student_path(cfg))
    k = max(cfg.eval.ks)
    return {
        "standard": classification_metrics(standard_probs(teacher, x), y),
        f"mc{k}": classification_metrics(mc_probs(teacher, x, ids, k, cfg.seed + 1), y),
        "distilled": classification_metrics(standard_probs(student, x), y),
    }


def run_local(cfg: Config) -> dict[str, dict[str, float]]:
    """All stages in this process; prints the test errors and writes run_dir/results.json."""
    start = time.perf_counter()
    train_teacher(cfg)
    train_student(cfg)
    results = quick_evaluate(cfg)
    (Path(cfg.run_dir) / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nTest error on {cfg.data.name} ({cfg.model.arch}, {time.perf_counter() - start:.0f} s):")
    for method, m in results.items():
        print(f"  {method:<10} error {100 * m['error']:.2f} %   nll {m['nll']:.4f}")
    return results
