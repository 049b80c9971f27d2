"""One trainer for teacher and student: DeepSpeed engines inside a Ray Train TorchTrainer.

The driver checks everything a user can get wrong (DeepSpeed JSON, batch split, teacher, label
manifest) before Ray Train starts, runs the worker group (dd_dist/trainer_worker.py) and copies
the model that rank 0 exported into the final checkpoint to run_dir/<stage>/model.pt
(pipeline.teacher_path / student_path). Going through the checkpoint keeps multi-node runs
right: rank 0 may live on another machine than the driver, the checkpoint storage is shared.
"""
from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

from dd_dist.config import Config, TrainConfig
from dd_dist.errors import UserError
from dd_dist.files import atomic_write, write_json

REPO = Path(__file__).resolve().parent.parent
HISTORY = "history.json"  # per-epoch metrics, carried from checkpoint to checkpoint by rank 0
MODEL = "model.pt"


def stage_options(cfg: Config, stage: str) -> TrainConfig:
    if stage not in ("teacher", "student"):
        raise ValueError(f"stage must be 'teacher' or 'student', not {stage!r}")
    return cfg.teacher if stage == "teacher" else cfg.distill


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


def train(cfg: Config, stage: str, run_id: str | None = None) -> tuple[Path, list[dict]]:
    """Train the teacher (hard labels, cross-entropy) or the student (soft labels, KL) with
    cluster.num_workers DeepSpeed workers; returns (pipeline.teacher_path / student_path, per-epoch metrics).

    Each metrics row holds epoch, loss, lr, samples_per_s, epoch_seconds, setup_seconds,
    threads, world, nodes (the Ray node id of each rank) and resumed_from (the epoch of the
    checkpoint its worker group started from, 0 for a fresh start). Rank 0 also logs each epoch
    to the MLflow run `run_id`.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dd_dist.cluster import ray_session
    from dd_dist.pipeline import student_path, teacher_path, train_split
    from dd_dist.tracking import tracking_uri
    from dd_dist.trainer_worker import train_worker

    opt, workers = stage_options(cfg, stage), cfg.cluster.num_workers
    if opt.batch_size % workers:
        raise UserError(f"batch size {opt.batch_size} must be divisible by cluster.num_workers={workers}")
    ds_config = load_deepspeed_config(cfg)
    if opt.optimizer == "deepspeed" and "optimizer" not in ds_config:
        raise UserError(f"optimizer=deepspeed needs an 'optimizer' block in {cfg.cluster.deepspeed}")
    split = train_split(cfg)
    labels, label_seed = None, cfg.seed
    if stage == "student":
        _check_teacher(cfg, split)
        if cfg.distill.mode == "offline":
            labels, label_seed = _checked_labels(cfg, split)
    out = (teacher_path if stage == "teacher" else student_path)(cfg)
    # The store's URI as the driver resolves it: a relative SQLite path means the driver's directory.
    tracking = {"run_id": run_id, "uri": tracking_uri(cfg.tracking)}
    absolute = cfg.resolved()  # the workers may start in another directory or on another node
    loop_config = {"cfg": absolute.model_dump(), "stage": stage, "ds": ds_config, "label_seed": label_seed,
                   "tracking": tracking}
    # A fresh name per call: Ray Train V2 would otherwise resume an earlier run of the same name,
    # whatever its settings were. Restarts inside this run resume from its own checkpoints.
    name = f"{Path(cfg.run_dir).name}-{stage}-{datetime.datetime.now():%Y%m%d-%H%M%S-%f}"
    storage = absolute.cluster.storage_path or f"{absolute.run_dir}/ray_results"  # local, NFS or s3://
    with ray_session(cfg.cluster):
        # Read once here into the object store: each worker then iterates the blocks instead of running
        # its own read of every shard (two readers on 2 cores tripled a short student's start-up).
        datasets = {"labels": ray.data.read_parquet(str(labels / "train")).materialize()} if labels else None
        trainer = TorchTrainer(
            train_worker, train_loop_config=loop_config, datasets=datasets,
            # Every worker reads ALL labels (they are small: N x classes) and takes its slice of each
            # global batch, exactly as for the teacher: N workers then follow the trajectory of one,
            # and a restarted group sees the same batches. A split dataset would tie rows to ranks.
            dataset_config=DataConfig(datasets_to_split=[]),
            torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.cluster.use_gpu,
                                         resources_per_worker={"CPU": cfg.cluster.cpus_per_worker},
                                         placement_strategy=cfg.cluster.placement),
            run_config=RunConfig(name=name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        result = trainer.fit()
    with result.checkpoint.as_directory() as final:
        history = json.loads((Path(final) / HISTORY).read_text())
        atomic_write(out, lambda tmp: shutil.copyfile(Path(final) / MODEL, tmp))
    write_json(out.parent / HISTORY, {"stage": stage, "epochs": history})
    return out, history


def _check_teacher(cfg: Config, split) -> None:
    from dd_dist.models import read_checkpoint
    from dd_dist.pipeline import teacher_path

    path = teacher_path(cfg)
    if not path.is_file():
        raise UserError(f"no teacher at {path}: run `dd-dist teacher` first")
    spec = read_checkpoint(path)["spec"]
    if tuple(spec["in_shape"]) != split.in_shape or spec["num_classes"] != split.num_classes:
        raise UserError(f"teacher {path} takes {spec['in_shape']} with {spec['num_classes']} classes, "
                        f"the data has {list(split.in_shape)} with {split.num_classes}")
    if cfg.distill.init == "teacher" and spec["arch"] != cfg.model.arch:
        raise UserError(f"distill.init=teacher needs the teacher's architecture: teacher is {spec['arch']}, "
                        f"model.arch is {cfg.model.arch}")
    teacher_width = spec.get("width", 1.0)
    if cfg.distill.init == "teacher" and cfg.distill.width > teacher_width:
        raise UserError(f"distill.width={cfg.distill.width} is wider than the teacher ({teacher_width}): "
                        f"a student initialised from the teacher can only be as wide or smaller")


def _checked_labels(cfg: Config, split) -> tuple[Path, int]:
    """The label directory, checked against the configured data; and the seed its augmentation used."""
    from dd_dist.labels import labels_dir
    from dd_dist.shards import check_labels_match, check_shards, read_manifest

    labels = labels_dir(cfg).resolve()
    manifest = read_manifest(labels)
    check_labels_match(manifest, data_fingerprint=split.fingerprint, num_classes=split.num_classes,
                       zero_p=cfg.data.zero_p, flip_p=cfg.data.flip_p)
    if manifest["rows"] != len(split):
        raise UserError(f"labels in {labels} cover {manifest['rows']} rows, the training split has {len(split)}")
    check_shards(labels, manifest)
    return labels, int(manifest["seed"])
