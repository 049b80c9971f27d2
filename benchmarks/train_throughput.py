"""Student training throughput on MNIST LeNet: the plain single-process PyTorch loop (train.fit)
vs DeepSpeed on Ray Train with 1 worker (ZeRO-0 and ZeRO-2) and 2 workers (ZeRO-2), same global batch.

    .venv/bin/python -m benchmarks.train_throughput [--rows N] [--epochs E]

writes benchmarks/results/train_throughput.{json,md}. The soft labels are real MC labels of an
untrained LeNet teacher at K=4 (made by `dd_dist.labels.run_label`; the speed of a student epoch
does not depend on their values). Every measurement uses ONE torch thread (the driver for the
plain loop, each Ray Train worker for DeepSpeed). Throughput is steady state: samples/s of the best
epoch after the first, timed inside the workers; start-up (Ray Train worker group, DeepSpeed
engine, data, checkpoints) is reported separately.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import machine, write_report
from dd_dist.config import load_config
from dd_dist.data.splits import run_split
from dd_dist.core.loop import fit
from dd_dist.core.models import init_student_from_teacher, load_model, save_model
from dd_dist.core.tasks import StudentTask, build_for, offline_batches
from dd_dist.labels.format import load_soft_labels
from dd_dist.layout import RunDir

BATCH = 64
RUNS = [("deepspeed_1_worker_zero0", 1, "zero0"), ("deepspeed_1_worker_zero2", 1, "zero2"),
        ("deepspeed_2_workers_zero2", 2, "zero2")]


def steady(rows: list[dict]) -> float:
    """Best samples/s of the epochs after the first (warm-up: allocator, first DeepSpeed steps); the
    best, not the mean, because the 2 cores are shared and other processes only ever slow an epoch."""
    return max(r["samples_per_s"] for r in rows[1:])


def measured(run, cfg) -> dict:
    """run(cfg)'s figures plus the 1-minute load average before and after it (contention shows there)."""
    before = os.getloadavg()[0]
    return {**run(cfg), "load_before": round(before, 2), "load_after": round(os.getloadavg()[0], 2)}


def plain_loop(cfg) -> dict:
    torch.set_num_threads(1)
    split = run_split(cfg, "train")
    student, _ = build_for(cfg, split)
    init_student_from_teacher(student, load_model(RunDir(cfg).teacher)[0])  # distill.init=teacher, as with DeepSpeed
    ids, probs = load_soft_labels(Path(cfg.run_dir) / "labels")
    soft = torch.zeros(len(split), split.num_classes)
    soft[ids] = probs
    rows: list[dict] = []
    fit(student, cfg.distill, len(split), offline_batches(split, soft, cfg.seed, cfg.data.zero_p, cfg.data.flip_p),
        StudentTask, cfg.seed, log=rows.append)
    return {"samples_per_s": steady(rows), "epochs": rows}


def deepspeed_run(cfg) -> dict:
    from dd_dist.train.driver import train

    began = time.perf_counter()
    _, rows = train(cfg, StudentTask)
    wall = time.perf_counter() - began
    return {"samples_per_s": steady(rows), "setup_seconds": rows[0]["setup_seconds"],
            "threads": rows[0]["threads"], "wall_seconds": wall,
            "overhead_seconds": wall - sum(r["epoch_seconds"] for r in rows), "epochs": rows}


def markdown(r: dict) -> str:
    plain = r["plain_loop"]["samples_per_s"]
    lines = [f"# Student training throughput (MNIST {r['rows']} rows, LeNet, global batch {r['batch_size']})", "",
             f"{r['machine']}; load average at start {r['load_average']}; ONE torch thread in the plain loop "
             f"and in each Ray Train worker (1 logical CPU each); {r['epochs']} epochs, the best epoch after "
             "the first (warm-up) counts; soft labels: MC labels of an untrained LeNet at K=4.", "",
             "| trainer | samples/s (steady) | vs plain | worker setup s | train() overhead s | load before/after |",
             "|---|---|---|---|---|---|", f"| plain PyTorch loop (train.fit), 1 process | {plain:.0f} | 1.00x | - | - | "
             f"{r['plain_loop']['load_before']}/{r['plain_loop']['load_after']} |"]
    for name, *_ in RUNS:
        m = r[name]
        lines.append(f"| {name.replace('_', ' ')} | {m['samples_per_s']:.0f} | {m['samples_per_s'] / plain:.2f}x | "
                     f"{m['setup_seconds']:.1f} | {m['overhead_seconds']:.1f} | {m['load_before']}/{m['load_after']} |")
    lines += ["", f"- 1-worker overhead (plain / DeepSpeed 1 worker time per sample): ZeRO-0 "
              f"{r['overhead_1_worker_zero0']:.2f}x, ZeRO-2 {r['overhead_1_worker_zero2']:.2f}x (target <= 1.25x)",
              f"- 2 workers vs 1 (ZeRO-2): {r['two_vs_one_worker']:.2f}x",
              "- 2 workers on this 2-core machine share the cores with Ray's own processes (raylet, GCS, the "
              "Ray Train controller) and with whatever else runs: the load column shows that contention.",
              "- worker setup: imports, data, DeepSpeed engine (inside the train function); train() overhead: "
              "the train() call's wall time minus its epochs (Ray Train controller and worker group start-up, "
              "worker setup, per-epoch checkpoints, export, teardown)."]
    return "\n".join(lines) + "\n"


def measure(rows: int, epochs: int) -> dict:
    """Every figure of the report on `rows` MNIST rows, `epochs` per trainer; starts and stops its own local Ray."""
    import ray

    from dd_dist.infra.cluster import LOCAL_ENV
    from dd_dist.stages.label import run_label

    report = {"rows": rows, "batch_size": BATCH, "epochs": epochs, "threads": 1, **machine()}
    with tempfile.TemporaryDirectory() as tmp:
        base = [f"run_dir={tmp}/run", "data.name=mnist", f"data.train_rows={rows}", "model.arch=lenet",
                f"distill.epochs={epochs}", f"distill.lr_steps=[{epochs - 1}]", f"distill.batch_size={BATCH}",
                "label.k=4", "label.actors=1", "label.rows_per_shard=1024", "cluster.cpus_per_worker=1",
                f"cluster.storage_path={tmp}/ray_results"]
        cfg = load_config(None, base)
        torch.manual_seed(0)
        teacher, spec = build_for(cfg, run_split(cfg, "train"))
        save_model(RunDir(cfg).teacher, teacher, spec)
        ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {**LOCAL_ENV, "DS_ACCELERATOR": "cpu"}})
        try:
            run_label(cfg)
            report["plain_loop"] = measured(plain_loop, cfg)
            for name, workers, zero in RUNS:
                run_cfg = load_config(None, base + [f"cluster.num_workers={workers}",
                                                    f"cluster.deepspeed=configs/deepspeed/{zero}.json"])
                report[name] = measured(deepspeed_run, run_cfg)
        finally:
            ray.shutdown()
    plain = report["plain_loop"]["samples_per_s"]
    report["overhead_1_worker_zero0"] = plain / report["deepspeed_1_worker_zero0"]["samples_per_s"]
    report["overhead_1_worker_zero2"] = plain / report["deepspeed_1_worker_zero2"]["samples_per_s"]
    report["two_vs_one_worker"] = (report["deepspeed_2_workers_zero2"]["samples_per_s"]
                                   / report["deepspeed_1_worker_zero2"]["samples_per_s"])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384, help="MNIST training rows")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per measurement (>= 2)")
    args = parser.parse_args()
    report = measure(args.rows, args.epochs)
    write_report("train_throughput", report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
