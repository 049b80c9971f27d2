"""One trainer for teacher and student: DeepSpeed engines inside a Ray Train TorchTrainer.

Batching: the teacher and the online student slice each global batch of a (seed, epoch)
permutation across ranks, so N workers follow the same trajectory as one. The offline student
reads its label shard through Ray Data (`get_dataset_shard`) and batches its own rows.
Every epoch ends with a DeepSpeed checkpoint reported to Ray Train; a restarted worker group
resumes from it (model, optimizer, epoch; the lr schedule and data order follow from the epoch).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dd_dist.config import Config
from dd_dist.errors import UserError

REPO = Path(__file__).resolve().parent.parent
HISTORY = "history.jsonl"


def stage_dir(cfg: Config, stage: str) -> Path:
    return Path(cfg.run_dir).resolve() / stage


def load_deepspeed_config(cfg: Config) -> dict:
    path = Path(cfg.cluster.deepspeed)
    if not path.is_file() and (REPO / path).is_file():
        path = REPO / path
    if not path.is_file():
        raise UserError(f"DeepSpeed config not found: {cfg.cluster.deepspeed}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    half = [k for k in ("fp16", "bf16") if ds.get(k, {}).get("enabled")]
    if half and not cfg.cluster.use_gpu:
        raise UserError(f"DeepSpeed config {path} enables {half[0]}, which needs GPUs (cluster.use_gpu=true)")
    return ds


def train(cfg: Config, stage: str, run_id: str | None = None) -> tuple[Path, list[dict]]:
    """Train the teacher (hard labels, cross-entropy) or the student (soft labels, KL).

    Rank 0 logs each epoch's metrics to the MLflow run `run_id` when one is given.
    """
    import ray
    from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig  # noqa: F401
    from ray.train.torch import TorchConfig, TorchTrainer

    from dd_dist.cluster import ray_session
    from dd_dist.pipeline import teacher_path, train_split
    from dd_dist.tracking import tracking_uri

    opt = cfg.teacher if stage == "teacher" else cfg.distill
    workers = cfg.cluster.num_workers
    if opt.batch_size % workers:
        raise UserError(f"batch size {opt.batch_size} must be divisible by cluster.num_workers={workers}")
    ds_config = load_deepspeed_config(cfg)
    if opt.optimizer == "deepspeed" and "optimizer" not in ds_config:
        raise UserError(f"optimizer=deepspeed needs an 'optimizer' block in {cfg.cluster.deepspeed}")
    split = train_split(cfg)
    datasets = {}
    if stage == "student":
        if not teacher_path(cfg).is_file():
            raise UserError(f"no teacher at {teacher_path(cfg)}: run `dd-dist teacher` first")
        if cfg.distill.mode == "offline":
            labels = _checked_labels(cfg, split)
    out = stage_dir(cfg, stage)
    out.mkdir(parents=True, exist_ok=True)
    (out / HISTORY).unlink(missing_ok=True)
    # The store's URI as the driver resolves it: a relative SQLite path means the driver's directory.
    tracking = {"run_id": run_id, "uri": tracking_uri(cfg.tracking)}
    loop_config = {"cfg": cfg.model_dump(), "stage": stage, "ds": ds_config, "out": str(out), "tracking": tracking}
    with ray_session(cfg.cluster):
        if stage == "student" and cfg.distill.mode == "offline":
            datasets["labels"] = ray.data.read_parquet(str(labels / "train"))
        trainer = TorchTrainer(
            _train_worker, train_loop_config=loop_config, datasets=datasets or None,
            torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.cluster.use_gpu),
            run_config=RunConfig(name=f"{Path(cfg.run_dir).name}-{stage}",
                                 storage_path=cfg.cluster.storage_path or str(Path(cfg.run_dir).resolve() / "ray_results"),
                                 failure_config=FailureConfig(max_failures=cfg.cluster.max_failures)),
        )
        trainer.fit()
    history = [json.loads(line) for line in (out / HISTORY).read_text().splitlines()]
    return out / "model.pt", history


def _checked_labels(cfg: Config, split) -> Path:
    from dd_dist.labels import labels_dir
    from dd_dist.shards import check_labels_match, check_shards, read_manifest

    labels = labels_dir(cfg).resolve()
    manifest = read_manifest(labels)
    check_labels_match(manifest, data_fingerprint=split.fingerprint, num_classes=split.num_classes,
                       zero_p=cfg.data.zero_p, flip_p=cfg.data.flip_p)
    check_shards(labels, manifest)
    return labels


# ----------------------------------------------------------------------------- inside each worker

def _train_worker(config: dict) -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from dd_dist.train import epoch_batches, loss_for, lr_at

    cfg, stage, out = Config.model_validate(config["cfg"]), config["stage"], Path(config["out"])
    opt = cfg.teacher if stage == "teacher" else cfg.distill
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    model, spec, batch_fn, split, own_ids = _build_stage(cfg, stage)

    ds = dict(config["ds"], train_batch_size=opt.batch_size, train_micro_batch_size_per_gpu=opt.batch_size // world,
              gradient_accumulation_steps=1)
    if opt.optimizer == "deepspeed":
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    else:
        sgd = torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=sgd, config=ds)

    start_epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag="ds")
        start_epoch, step = client["epoch"] + 1, client["step"]
    log = _epoch_logger(cfg, out, rank, config["tracking"])
    log({"event": "start", "start_epoch": start_epoch + 1, "world": world})

    local_batch = opt.batch_size // world
    loss_fn, device = loss_for(stage), engine.device
    for epoch in range(start_epoch, opt.epochs):
        lr = lr_at(opt, epoch) if opt.optimizer != "deepspeed" else None
        for group in optimizer.param_groups:
            group["lr"] = lr if lr is not None else group["lr"]
        engine.train()
        if own_ids is None:  # global batches sliced across ranks: N workers == 1 worker
            batches = [b[rank::world] for b in epoch_batches(np.arange(len(split)), opt.batch_size, cfg.seed, epoch)
                       if len(b) >= world]
        else:  # this rank's label shard, with an equal number of steps on every rank
            batches = list(epoch_batches(own_ids, local_batch, cfg.seed + 7919 * rank, epoch))
            n = torch.tensor(len(batches))
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
            batches = batches[: int(n)]
        total, seen, began = torch.zeros(2, dtype=torch.float64), 0, time.perf_counter()
        for ids in batches:
            inputs, targets = batch_fn(ids, epoch, step)
            loss = loss_fn(engine(inputs.to(device)), targets.to(device))
            engine.backward(loss)
            engine.step()
            total += torch.tensor([loss.item() * len(ids), len(ids)], dtype=torch.float64)
            seen, step = seen + len(ids), step + 1
        dist.all_reduce(total)  # mean loss over every rank's rows
        seconds = time.perf_counter() - began
        metrics = {"epoch": epoch + 1, "loss": (total[0] / total[1]).item(), "lr": optimizer.param_groups[0]["lr"],
                   "samples_per_s": total[1].item() / seconds, "epoch_seconds": seconds}
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag="ds", client_state={"epoch": epoch, "step": step})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        log({"event": "epoch", "stage": stage, "epochs": opt.epochs, **metrics})
    if rank == 0:
        from dd_dist.models import save_model

        save_model(out / "model.pt", engine.module, spec, {"data_fingerprint": split.fingerprint, "stage": stage})


def _epoch_logger(cfg: Config, out: Path, rank: int, tracking: dict):
    """Rank 0 appends to the stage's history (read by the driver, kept across restarts), prints
    progress and logs the epoch to MLflow; the other ranks stay silent."""
    from dd_dist import tracking as mlflow_tracking
    from dd_dist.train import print_epoch

    if rank == 0 and tracking["run_id"]:
        mlflow_tracking.use_store(cfg.tracking.model_copy(update={"uri": tracking["uri"]}))

    def log(row: dict) -> None:
        if rank != 0:
            return
        with open(out / HISTORY, "a") as f:
            f.write(json.dumps(row) + "\n")
        if row["event"] == "start":
            if row["start_epoch"] > 1:
                print(f"resuming from the checkpoint of epoch {row['start_epoch'] - 1}", flush=True)
            return
        print_epoch(row)
        if tracking["run_id"]:
            metrics = {k: row[k] for k in ("loss", "lr", "samples_per_s", "epoch_seconds")}
            mlflow_tracking.log_metrics(metrics, step=row["epoch"], run_id=tracking["run_id"])

    return log


def _build_stage(cfg: Config, stage: str):
    from dd_dist.models import init_student_from_teacher, load_model
    from dd_dist.pipeline import build_for, teacher_path, train_split
    from dd_dist.train import offline_batches, online_batches, teacher_batches

    split = train_split(cfg)
    if stage == "teacher":
        model, spec = build_for(cfg, split)
        return model, spec, teacher_batches(split), split, None
    teacher, _ = load_model(teacher_path(cfg))
    model, spec = build_for(cfg, split, cfg.distill.width)
    if cfg.distill.init == "teacher":
        init_student_from_teacher(model, teacher)
    if cfg.distill.mode == "online":
        return model, spec, online_batches(split, teacher, cfg.seed, cfg.data.zero_p, cfg.data.flip_p), split, None
    ids, probs = _shard_labels(split.num_classes)
    soft = torch.zeros(len(split), split.num_classes)
    soft[ids] = probs
    batches = offline_batches(split, soft, cfg.seed, cfg.data.zero_p, cfg.data.flip_p)
    return model, spec, batches, split, ids.numpy()


def _shard_labels(num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the label shards, from Ray Data, as full float32 distributions."""
    import ray.train

    from dd_dist.shards import rebuild_topk

    ids, probs = [], []
    for batch in ray.train.get_dataset_shard("labels").iter_batches(batch_size=4096, batch_format="numpy"):
        ids.append(torch.from_numpy(batch["id"]))
        if "probs" in batch:
            rows = np.stack(batch["probs"]).astype(np.float32)
        else:
            rows = rebuild_topk(np.stack(batch["idx"]), np.stack(batch["val"]), batch["rest"], num_classes)
        probs.append(torch.from_numpy(rows))
    return torch.cat(ids), torch.cat(probs)
