"""The stages wired together: teacher -> label -> distill -> evaluate, one MLflow run each,
children of one pipeline run; plus the paths and splits every stage shares, and the
single-process reference versions of the training stages (plain PyTorch, used by tests and
benchmarks as the baseline of the distributed ones).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from dd_dist.config import Config
from dd_dist.data import Split, augment, load_split
from dd_dist.files import check_writable
from dd_dist.mc import mc_probs
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


def check_outputs_writable(cfg: Config, folder: str) -> None:
    """Refuse an unwritable run_dir/<folder> or storage_path in one line before a stage starts
    anything (an MLflow run, Ray, hours of work that could not be saved)."""
    check_writable(Path(cfg.run_dir) / folder, "run_dir")
    if cfg.cluster.storage_path:
        check_writable(cfg.cluster.storage_path, "cluster.storage_path")


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


def teacher_stage(cfg: Config, parent: str | None = None) -> Path:
    """DeepSpeed on Ray Train, hard labels; the final model logged as an artifact."""
    from dd_dist import tracking
    from dd_dist.trainer import train

    check_outputs_writable(cfg, "teacher")
    with tracking.stage_run(cfg, "teacher", parent) as run:
        path, _ = train(cfg, "teacher", run)
        tracking.log_model_file(path, run)
    return path


def label_stage(cfg: Config, parent: str | None = None) -> Path:
    from dd_dist import tracking
    from dd_dist.labels import run_label

    check_outputs_writable(cfg, "labels")
    with tracking.stage_run(cfg, "label", parent) as run:
        began = time.perf_counter()
        out = run_label(cfg)
        tracking.log_metrics({"label_seconds": time.perf_counter() - began}, run_id=run)
        tracking.log_artifact(out / "manifest.json", run_id=run)
    return out


def distill_stage(cfg: Config, parent: str | None = None) -> Path:
    from dd_dist import tracking
    from dd_dist.trainer import train

    check_outputs_writable(cfg, "student")
    with tracking.stage_run(cfg, "distill", parent, mode=cfg.distill.mode) as run:
        path, _ = train(cfg, "student", run)
        tracking.log_model_file(path, run)
    return path


def run_pipeline(cfg: Config, reuse: tuple[str, ...] = ()) -> dict:
    """Every stage in one Ray session and one MLflow parent run; prints the comparison at the end.
    Stages named in `reuse` are not run: their outputs are already in run_dir (a smaller student
    distilled from the teacher and labels of another run, for instance)."""
    from dd_dist import tracking
    from dd_dist.cluster import check_shared_storage, ray_session
    from dd_dist.compare import compare
    from dd_dist.evaluate import evaluate

    began, seconds = time.perf_counter(), {}
    with ray_session(cfg.cluster), tracking.pipeline_run(cfg) as parent:
        check_shared_storage(cfg)  # a multi-node cluster needs storage every node sees
        stages = [("teacher", teacher_stage), ("label", label_stage), ("distill", distill_stage),
                  ("evaluate", evaluate)]
        for name, stage in stages:
            if name in reuse or (name == "label" and cfg.distill.mode == "online"):
                continue  # reused, or Algorithm 2 that needs no stored labels
            started = time.perf_counter()
            stage(cfg, parent)
            seconds[f"{name}_seconds"] = time.perf_counter() - started
        tracking.log_metrics({**seconds, "total_seconds": time.perf_counter() - began}, run_id=parent)
    print("\n" + compare(cfg))
    print(f"pipeline finished in {time.perf_counter() - began:.0f} s: " +
          ", ".join(f"{k.removesuffix('_seconds')} {v:.0f} s" for k, v in seconds.items()))
    return seconds
