"""One trainer for teacher and student: DeepSpeed engines inside a Ray Train TorchTrainer.

The driver checks everything a user can get wrong (DeepSpeed JSON, batch split, teacher, label
manifest) before Ray Train starts, runs the worker group (dd_dist.train.worker) and copies the model
that rank 0 exported into the final checkpoint to run_dir/<role>/model.pt. Going through the
checkpoint keeps multi-node runs right: rank 0 may live on another machine than the driver, the
checkpoint storage (layout.RunDir.checkpoints) is shared.
"""
from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

from dd_dist.config import Config
from dd_dist.core.models import check_fits, is_factory, read_checkpoint
from dd_dist.core.tasks import StudentTask, Task, build_student, build_teacher
from dd_dist.data.splits import Split, run_split
from dd_dist.errors import UserError
from dd_dist.files import atomic_write, write_json
from dd_dist.infra.cluster import check_resources, open_split, ray_session
from dd_dist.infra.tracking import Tracker
from dd_dist.labels.format import check_labels_match, check_shards, read_manifest
from dd_dist.layout import HISTORY, MODEL, RunDir
from dd_dist.train.rows import data_config, training_dataset
from dd_dist.train.worker import train_worker

REPO = Path(__file__).resolve().parent.parent.parent


def load_deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed JSON at cluster.deepspeed (relative paths also from the repository root)."""
    path = Path(cfg.cluster.deepspeed)
    if not path.is_file() and (REPO / path).is_file():
        path = REPO / path
    if not path.is_file():
        raise UserError(f"DeepSpeed config not found: {cfg.cluster.deepspeed}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise UserError(f"DeepSpeed config {path} must be a JSON object")
    half = [k for k in ("fp16", "bf16") if ds.get(k, {}).get("enabled")]
    if half and not cfg.cluster.use_gpu:
        raise UserError(f"DeepSpeed config {path} enables {half[0]}, which needs GPUs (cluster.use_gpu=true)")
    if ds.get("zero_optimization", {}).get("stage", 0) > 2:
        # ZeRO-3 partitions the weights themselves; the plain export below needs them whole on rank 0.
        raise UserError(f"DeepSpeed config {path}: ZeRO stage 3 is not supported (use stage 0, 1 or 2)")
    return ds


def train(cfg: Config, task: Task, run_id: str | None = None) -> tuple[Path, list[dict]]:
    """Train the teacher (TeacherTask: hard labels, cross-entropy) or the student (StudentTask: soft
    labels, KL) with cluster.num_workers DeepSpeed workers; returns (run_dir/<role>/model.pt, per-epoch
    metrics).

    Each metrics row holds epoch, loss, lr, rows (trained on, over all ranks), samples_per_s, epoch_seconds, setup_seconds,
    threads, world, nodes (the Ray node id of each rank) and resumed_from (the epoch of the
    checkpoint its worker group started from, 0 for a fresh start). Rank 0 also logs each epoch
    to the MLflow run `run_id`.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # heavy: only where training runs
    from ray.train.torch import TorchConfig, TorchTrainer

    opt, workers, run = task.options(cfg), cfg.cluster.num_workers, RunDir(cfg)
    if opt.batch_size % workers:
        raise UserError(f"batch size {opt.batch_size} must be divisible by cluster.num_workers={workers}")
    ds_config = load_deepspeed_config(cfg)
    if opt.optimizer == "deepspeed" and "optimizer" not in ds_config:
        raise UserError(f"optimizer=deepspeed needs an 'optimizer' block in {cfg.cluster.deepspeed}")
    split = open_split(cfg, "train")
    if is_factory(cfg.model.arch) or cfg.distill.arch:  # a user's net: fails here, not in each worker
        (build_student if task is StudentTask else build_teacher)(cfg, split)
    labels, shards, label_seed = None, None, cfg.seed
    if task is StudentTask:
        check_teacher(cfg, split)
        if cfg.distill.mode == "offline":
            labels, shards, label_seed = checked_labels(cfg, split)
    absolute = cfg.resolved()  # the workers may start in another directory or on another node
    loop_config = {"cfg": absolute.model_dump(), "task": task, "ds": ds_config, "label_seed": label_seed,
                   "tracking": Tracker(cfg).for_workers(run_id)}
    # A fresh name per call: Ray Train V2 would otherwise resume an earlier run of the same name,
    # whatever its settings were. Restarts inside this run resume from its own checkpoints.
    name = f"{run.root.name}-{task.role}-{datetime.datetime.now():%Y%m%d-%H%M%S-%f}"
    with ray_session(cfg.cluster):
        check_resources(cfg.cluster, "cluster.num_workers", workers, cfg.cluster.cpus_per_worker,
                        1 if cfg.cluster.use_gpu else 0)
        rows = training_dataset(run_split(absolute, "train"), cfg.seed, labels, shards,
                                cfg.distill.uncertainty and labels is not None)
        trainer = TorchTrainer(
            train_worker, train_loop_config=loop_config, datasets={"train": rows},
            dataset_config=data_config(cfg.data.read_ahead_mb),
            torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.cluster.use_gpu,
                                         resources_per_worker={"CPU": cfg.cluster.cpus_per_worker},
                                         placement_strategy=cfg.cluster.placement),
            run_config=RunConfig(name=name, storage_path=RunDir(absolute).checkpoints,
                                 failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        result = trainer.fit()
    out = run.model(task.role)
    with result.checkpoint.as_directory() as final:
        history = json.loads((Path(final) / HISTORY).read_text())
        atomic_write(out, lambda tmp: shutil.copyfile(Path(final) / MODEL, tmp))
    write_json(run.history(task.role), {"stage": task.role, "epochs": history})
    return out, history


def check_teacher(cfg: Config, split: Split) -> None:
    """Refuse, before any work, a missing teacher or one the student cannot be distilled from."""
    path = RunDir(cfg).teacher
    if not path.is_file():
        raise UserError(f"no teacher at {path}: run `dd-dist teacher` first")
    spec = read_checkpoint(path)["spec"]
    check_fits(spec, split, f"teacher {path}")
    if cfg.distill.init == "teacher" and spec["arch"] != cfg.model.arch:
        raise UserError(f"distill.init=teacher needs the teacher's architecture: teacher is {spec['arch']}, "
                        f"model.arch is {cfg.model.arch}")
    teacher_width = spec.get("width", 1.0)
    if cfg.distill.init == "teacher" and cfg.distill.width > teacher_width:
        raise UserError(f"distill.width={cfg.distill.width} is wider than the teacher ({teacher_width}): "
                        f"a student initialised from the teacher can only be as wide or smaller")


def checked_labels(cfg: Config, split: Split) -> tuple[Path, list[dict], int]:
    """The label directory, checked against the configured data; its shards (the manifest's list) and the
    seed its augmentation used."""
    labels = RunDir(cfg).labels.resolve()
    manifest = read_manifest(labels)
    check_labels_match(manifest, data_fingerprint=split.fingerprint, num_classes=split.num_classes,
                       zero_p=cfg.data.zero_p, flip_p=cfg.data.flip_p)
    if manifest["rows"] != len(split):
        raise UserError(f"labels in {labels} cover {manifest['rows']} rows, the training split has {len(split)}")
    if cfg.distill.uncertainty and "mutual_info" not in manifest.get("uncertainty", []):
        raise UserError(f"distill.uncertainty needs labels with the mutual_info column; {labels} has none: "
                        f"label again with label.uncertainty=true into a fresh run_dir")
    check_shards(labels, manifest)
    return labels, manifest["shards"], int(manifest["seed"])
