"""The train function each Ray Train worker runs: one DeepSpeed engine, one stage (a core.tasks task).

Batching: each rank iterates its own shard of the training stream (dd_dist.train.rows, split over
the ranks by Ray Train: get_dataset_shard / iter_torch_batches) in micro batches of batch_size / world
rows; Ray Data gives every rank the same number of rows, so the ranks take the same steps and their
micro batches make one global batch. Every epoch ends with a DeepSpeed checkpoint reported to Ray
Train; a restarted group resumes from it (model, optimizer, epoch and step; the lr follows from the epoch).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from dd_dist.config import Config
from dd_dist.core.loop import lr_at, print_epoch
from dd_dist.core.models import save_model
from dd_dist.core.splitmix import row_rng_seed
from dd_dist.data.splits import run_split
from dd_dist.infra.tracking import Tracker
from dd_dist.layout import HISTORY, MODEL
from dd_dist.train.rows import stream_batches


def train_worker(config: dict) -> None:
    # DeepSpeed's ZeRO gathers with a torch call that torch 2.13 deprecates, on every step; and since any
    # catch_warnings() re-arms a shown warning, the log would repeat it hundreds of times an epoch
    warnings.filterwarnings("ignore", r"`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks its accelerator
    import ray.train  # heavy, and present only inside a Ray Train worker
    import ray.train.torch

    began = time.perf_counter()
    cfg, task = Config.model_validate(config["cfg"]), config["task"]
    opt = task.options(cfg)
    torch.set_num_threads(cfg.cluster.cpus_per_worker)  # what the plain loop gets for the same CPUs
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    nodes = [None] * world  # where each rank runs, for the history
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    split = run_split(cfg, "train")  # its metadata: the rows come from the stream
    setup = task.setup(cfg, split, config["label_seed"], ray.train.torch.get_device())  # an online teacher's device
    shard = ray.train.get_dataset_shard("train")
    engine, optimizer = _engine(setup.model, opt, config["ds"], world)

    start_epoch, step, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag="ds")
            history = json.loads((Path(d) / HISTORY).read_text())
        start_epoch, step = client["epoch"], client["step"]
    log = _epoch_logger(cfg, rank, config["tracking"])
    if start_epoch:
        log(f"{task.role}: resuming from the checkpoint of epoch {start_epoch}")

    device, dtype = engine.device, _input_dtype(engine)
    setup_seconds = time.perf_counter() - began
    for epoch in range(start_epoch, opt.epochs):
        if opt.optimizer != "deepspeed":  # the paper's step schedule; a DeepSpeed optimizer keeps its own lr
            for group in optimizer.param_groups:
                group["lr"] = lr_at(opt, epoch)
        # Dropout masks from (seed, epoch, rank): a restarted group draws the ones the lost one drew.
        torch.manual_seed(row_rng_seed(cfg.seed, epoch, rank))
        task.train_mode(engine, opt)  # DeepSpeedEngine.train() and the student's dropout off
        total, epoch_began = torch.zeros(2, dtype=torch.float64), time.perf_counter()
        for batch in stream_batches(shard, opt.batch_size // world, cfg.data.shuffle_buffer, cfg.seed, epoch, rank):
            inputs, targets = setup.prepare(batch["id"], batch["x"], batch["target"], epoch, step)
            # Every rank holds as many rows (an equal split), so DeepSpeed's mean over the ranks of
            # their mean losses is the mean over the global batch.
            loss = task.loss(engine, inputs.to(device, dtype), targets.to(device))
            engine.backward(loss)
            engine.step()
            total += torch.tensor([loss.item() * len(inputs), len(inputs)], dtype=torch.float64)
            step += 1
        total = total.to(device)  # NCCL reduces only GPU tensors
        dist.all_reduce(total)  # mean loss over every rank's rows
        seconds = time.perf_counter() - epoch_began
        row = {"epoch": epoch + 1, "loss": (total[0] / total[1]).item(), "lr": optimizer.param_groups[0]["lr"],
               "rows": int(total[1].item()), "samples_per_s": total[1].item() / seconds, "epoch_seconds": seconds,
               "setup_seconds": setup_seconds, "threads": torch.get_num_threads(), "world": world,
               "nodes": nodes, "resumed_from": start_epoch}
        history.append(row)
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag="ds", client_state={"epoch": epoch + 1, "step": step})
            last = epoch + 1 == opt.epochs
            master = _master_weights(engine) if last else None  # a collective: every rank takes part
            if rank == 0:
                (Path(d) / HISTORY).write_text(json.dumps(history))
                if last:  # the export, for the driver to copy out of the final checkpoint
                    save_model(Path(d) / MODEL, _with_weights(engine.module, master), setup.spec,
                               {"data_fingerprint": setup.fingerprint, "stage": task.role, "final_loss": row["loss"]})
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"epoch-{epoch + 1:04d}")
        log({"stage": task.role, "epochs": opt.epochs, **row})


def _engine(model: torch.nn.Module, opt, ds_json: dict, world: int):
    """deepspeed.initialize with the global batch split over the workers; SGD with momentum and
    weight decay unless the config asks for the JSON's own optimizer block."""
    import deepspeed  # heavy: only inside a training worker

    ds = dict(ds_json, train_batch_size=opt.batch_size, train_micro_batch_size_per_gpu=opt.batch_size // world,
              gradient_accumulation_steps=1)
    # DeepSpeed clips the gradient norm at 1.0 unless told otherwise; the plain loop and the paper do
    # not clip, and clipping slowed the teacher's first epochs (loss 0.38 vs 0.26 after epoch 2).
    ds.setdefault("gradient_clipping", 0.0)
    if opt.optimizer == "deepspeed":
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    else:
        sgd = torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
        ds["zero_allow_untested_optimizer"] = True  # DeepSpeed's requirement for a torch optimizer under ZeRO
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=sgd, config=ds)
    return engine, optimizer


def _master_weights(engine) -> dict[str, torch.Tensor]:
    """The optimizer's full fp32 copy of each parameter, where DeepSpeed keeps one (ZeRO 1/2, its bf16
    optimizer): under bf16 / fp16 the module holds only the rounded weights. Gathered over the ranks."""
    from deepspeed.utils import safe_get_full_fp32_param  # heavy: only inside a training worker

    out = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is not None:
            out[name] = full.detach().float().cpu()
    return out


def _with_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The module in float32 with `weights` (by parameter name) copied in: what the export saves."""
    module = module.float()
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name in weights:
                param.copy_(weights[name].to(param.device))
    return module


def _input_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else torch.float32


def _epoch_logger(cfg: Config, rank: int, tracking: dict):
    """Rank 0 prints progress and logs each epoch to MLflow; the other ranks stay silent."""
    tracker, run_id = Tracker.from_workers(cfg, tracking)
    if rank == 0 and run_id:
        tracker.use_store()

    def log(row: dict | str) -> None:
        if rank != 0:
            return
        if isinstance(row, str):
            print(row, flush=True)
            return
        print_epoch(row)
        if run_id:
            metrics = {k: row[k] for k in ("loss", "lr", "samples_per_s", "epoch_seconds")}
            tracker.log_metrics(metrics, step=row["epoch"], run_id=run_id)

    return log
