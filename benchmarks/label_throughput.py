"""Soft-label throughput on MNIST at K=100: the textbook K-pass loop vs this project's MC code, in
one process and on 1 and 2 Ray actors, for lenet and lenet_all; plus the bytes a label row takes.

    .venv/bin/python -m benchmarks.label_throughput [--quick]

writes benchmarks/results/label_throughput.{json,md}. Every measurement runs with ONE torch thread
(the driver for the in-process rates, each actor for the Ray rates), so that 2 actors on 2 cores are
comparable with 1. Nets are untrained (default init): the speed does not depend on the weights.
Ray rates are "steady": rows / (first shard started .. last shard finished), i.e. without Ray and
actor start-up; the overall rate (start-up included) is reported beside it.
"""
from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import machine, write_report
from dd_dist.config import load_config
from dd_dist.core.augment import augment
from dd_dist.data.splits import load_split
from dd_dist.core.mc import naive_mc_loop
from dd_dist.core.models import build_model, model_spec, save_model
from dd_dist.labels.actors import label_rows, label_shards
from dd_dist.labels.format import label_table, write_shard

K, BATCH, SEED, ZERO_P = 100, 256, 0, 0.2
# rows per measurement: naive loop, in-process MC, Ray (and the rows of one shard)
ROWS = {"lenet": (512, 8192, 16384, 1024), "lenet_all": (256, 2048, 4096, 256)}


def timed_rate(rows: int, label_batch, ready=lambda: None) -> float:
    """rows/s of label_batch(ids) over `rows` rows in batches of BATCH, after one warm-up batch and ready()."""
    label_batch(torch.arange(min(BATCH, rows)))
    ready()
    began = time.perf_counter()
    for start in range(0, rows, BATCH):
        label_batch(torch.arange(start, min(start + BATCH, rows)))
    return rows / (time.perf_counter() - began)


def in_process_rates(arch: str, model, x: torch.Tensor, naive_rows: int, mc_rows: int) -> dict:
    torch.set_num_threads(1)
    naive = timed_rate(naive_rows, lambda ids: naive_mc_loop(model, augment(x[ids], ids, SEED, 0, ZERO_P), K))
    mc = timed_rate(mc_rows, lambda ids: label_rows(model, x[ids], ids, K, SEED, ZERO_P, 0.0))
    print(f"{arch}: naive {naive:.0f} rows/s, mc_probs {mc:.0f} rows/s in-process (1 thread)")
    return {"naive_rows_per_s": naive, "mc_rows_per_s": mc, "mc_speedup": mc / naive}


def _bare_worker(arch: str, rows: int, barrier, results) -> None:
    torch.set_num_threads(1)
    split = load_split("mnist", "train")
    torch.manual_seed(SEED)
    model = build_model(**model_spec(arch, split.in_shape, split.num_classes, 0.5))
    x = torch.from_numpy(split.x)
    results.put(timed_rate(rows, lambda ids: label_rows(model, x[ids], ids, K, SEED, ZERO_P, 0.0), barrier.wait))


def bare_process_scaling(arch: str, rows: int) -> float:
    """What 2 cores give at best: rows/s of 2 plain processes (no Ray) at once over 1 alone."""
    ctx = multiprocessing.get_context("spawn")
    totals = []
    for n in (1, 2):
        barrier, results = ctx.Barrier(n), ctx.Queue()  # start timing together, after the warm-up
        procs = [ctx.Process(target=_bare_worker, args=(arch, rows, barrier, results)) for _ in range(n)]
        for proc in procs:
            proc.start()
        totals.append(sum(results.get() for _ in procs))
        for proc in procs:
            proc.join()
    return totals[1] / totals[0]


def ray_rates(arch: str, teacher: Path, rows: int, rows_per_shard: int, workdir: Path) -> dict:
    out = {}
    for actors in (1, 2):
        cfg = load_config(None, [f"run_dir={workdir}", "data.name=mnist", f"data.train_rows={rows}",
                                 f"model.arch={arch}", f"label.k={K}", f"label.actors={actors}",
                                 f"label.batch_size={BATCH}", f"label.rows_per_shard={rows_per_shard}",
                                 "label.threads_per_actor=1", "label.cpus_per_actor=0.5", f"seed={SEED}"])
        shards = list(range(-(-rows // rows_per_shard)))
        stats = label_shards(cfg, shards, rows, teacher, workdir / f"labels-{arch}-{actors}")
        out[f"ray_{actors}_actor"] = stats
    out["two_vs_one_actor"] = out["ray_2_actor"]["steady_rows_per_s"] / out["ray_1_actor"]["steady_rows_per_s"]
    out["two_vs_one_bare_process"] = bare_process_scaling(arch, rows // 2)
    return out


def bytes_per_row(model, x: torch.Tensor, rows: int, workdir: Path) -> dict:
    """Parquet bytes per row (zstd, with id and mc_stderr) of the same labels in each storage format."""
    ids = torch.arange(rows)
    estimate = label_rows(model, x[ids], ids, K, SEED, ZERO_P, 0.0)
    probs, stderr = estimate.probs.numpy(), estimate.stderr.numpy()
    sizes = {}
    for name, dtype, topk in [("float32", "float32", 0), ("float16", "float16", 0), ("topk3", "topk", 3)]:
        path = workdir / f"bytes-{name}.parquet"
        write_shard(path, label_table(ids.numpy(), probs, stderr, dtype, topk))
        sizes[name] = path.stat().st_size / rows
    return sizes


def markdown(report: dict) -> str:
    lines = ["# Label throughput (MNIST, K=100)", "",
             f"{report['machine']}; load average at start {report['load_average']}; torch threads: "
             "1 in the driver (naive, in-process) and 1 per Ray actor (0.5 logical CPU each, Ray started "
             "with 4 logical CPUs).", "",
             "| net | naive K-pass loop | mc_probs in-process | speed-up | Ray 1 actor | Ray 2 actors | 2 vs 1 actor "
             "| 2 vs 1 bare process |", "|---|---|---|---|---|---|---|---|"]
    for arch, r in report["nets"].items():
        one, two = r["ray_1_actor"], r["ray_2_actor"]
        lines.append(f"| {arch} | {r['naive_rows_per_s']:.0f} | {r['mc_rows_per_s']:.0f} | {r['mc_speedup']:.1f}x | "
                     f"{one['steady_rows_per_s']:.0f} ({one['rows_per_s']:.0f}) | "
                     f"{two['steady_rows_per_s']:.0f} ({two['rows_per_s']:.0f}) | {r['two_vs_one_actor']:.2f}x | "
                     f"{r['two_vs_one_bare_process']:.2f}x |")
    lines += ["", "Rows/s. Ray: steady state, first shard started to last shard finished (in brackets: the whole "
              "call, Ray and actor start-up included). 2 vs 1 bare process: the same MC code in 2 plain processes "
              "at once (no Ray) over 1 alone, what the 2 cores allow at best under the load of the moment. "
              "Rows measured: " +
              "; ".join(f"{a}: naive {n}, in-process {m}, Ray {r} in shards of {s}" for a, (n, m, r, s) in report["rows"].items()),
              "", "Targets: mc_probs >= 10x naive on lenet, >= 1.5x on lenet_all; 2 actors >= 1.7x one actor.", "",
              "| storage | bytes per row (Parquet, zstd, with id + mc_stderr) |", "|---|---|"]
    lines += [f"| {name} | {size:.1f} |" for name, size in report["bytes_per_row"].items()]
    lines += ["", "Top-3 stores int16 indices + float32 values + the rest mass: with 10 classes it is no smaller "
              "than float16; it pays off with many classes (CIFAR-100)."]
    return "\n".join(lines) + "\n"


def measure(rows: dict) -> dict:
    """Every figure of the report, for `rows` per net (see ROWS); starts and stops its own local Ray."""
    import ray

    split = load_split("mnist", "train")
    x = torch.from_numpy(split.x)
    report = {"k": K, "batch_size": BATCH, "threads": 1, "rows": rows, "nets": {}, **machine()}
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            for arch, (naive_rows, mc_rows, ray_rows, rows_per_shard) in rows.items():
                model, teacher = untrained(arch, split, workdir)
                report["nets"][arch] = {**in_process_rates(arch, model, x, naive_rows, mc_rows),
                                        **ray_rates(arch, teacher, ray_rows, rows_per_shard, workdir)}
                if arch == "lenet":
                    report["bytes_per_row"] = bytes_per_row(model, x, 4096, workdir)
    finally:
        ray.shutdown()
    return report


def precision_cost(rows: dict[str, int]) -> dict:
    """bf16 labels on this CPU (label.precision=bf16, one thread): rows/s against fp32 on the same rows,
    and their mean KL(fp32 label || bf16 label)."""
    torch.set_num_threads(1)
    split = load_split("mnist", "train")
    x = torch.from_numpy(split.x[: max(rows.values())])
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch, n in rows.items():
            model, _ = untrained(arch, split, Path(tmp))
            labels, rates = {}, {}
            for precision in ("fp32", "bf16"):
                parts = []

                def label(ids, precision=precision, parts=parts):
                    parts.append(label_rows(model, x[ids], ids, K, SEED, ZERO_P, 0.0, precision).probs)

                rates[precision] = timed_rate(n, label)
                labels[precision] = torch.cat(parts[1:]).double()  # parts[0]: the warm-up batch
            p, q = labels["fp32"], labels["bf16"]
            out[arch] = {"fp32_rows_per_s": rates["fp32"], "bf16_rows_per_s": rates["bf16"],
                         "bf16_time_vs_fp32": rates["fp32"] / rates["bf16"],
                         "mean_kl_fp32_to_bf16": (torch.xlogy(p, p) - p * q.log()).sum(1).mean().item(),
                         "max_abs_diff": (p - q).abs().max().item()}
            print(f"{arch}: bf16 vs fp32 labels {out[arch]}", flush=True)
    return out


def untrained(arch: str, split, workdir: Path) -> tuple[torch.nn.Module, Path]:
    """A default-initialised net of `arch` and its checkpoint in workdir (speed does not depend on weights)."""
    torch.manual_seed(SEED)
    spec = model_spec(arch, split.in_shape, split.num_classes, 0.5)
    model = build_model(**spec)
    save_model(workdir / f"{arch}.pt", model, spec)
    return model, workdir / f"{arch}.pt"


def scaled(rows: dict, divisor: int) -> dict:
    """ROWS with every count divided (at least 64 rows a measurement, 32 a shard)."""
    return {arch: tuple(max(n // divisor, 64) for n in r[:3]) + (max(r[3] // divisor, 32),) for arch, r in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="an eighth of the rows (a smoke run)")
    args = parser.parse_args()
    report = measure(scaled(ROWS, 8) if args.quick else ROWS)
    write_report("label_throughput", report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
