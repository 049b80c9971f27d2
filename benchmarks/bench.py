"""`make bench`: the project's speed in one report, every ratio measured side by side in this run.

    .venv/bin/python -m benchmarks.bench [--config configs/demo.yaml] [--quick]

writes benchmarks/results/bench.{json,md} and bench_label_scaling.png with
- soft labels: the project's MC code vs the naive K-pass loop, 1 vs 2 Ray actors (benchmarks.label_throughput);
- training: DeepSpeed on Ray Train vs the plain PyTorch loop, 2 vs 1 workers (benchmarks.train_throughput);
- inference: MC dropout with K=100 vs the distilled student of a finished run (by default `make demo`'s),
  each with the test error it reaches, through `dd-dist evaluate`'s own scoring;
- MC masks drawn per second: the counter-based generator vs the per-row generators it replaced (benchmarks.masks);
- bf16 labels on this CPU: their cost against fp32 and their mean KL to the fp32 labels;
- label bytes per row for each storage option;
- label time against K (in-process) and against the number of Ray actors, as a plot.
One torch thread per process throughout, so that a ratio compares code, not core counts. On this CPU
machine absolute times are only indicative; on a GPU the same command gives absolute times.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import matplotlib
import torch

from benchmarks import label_throughput, masks, train_throughput
from benchmarks.report import RESULTS, machine, write_report
from dd_dist.config import load_config
from dd_dist.data.splits import load_split, run_split
from dd_dist.core.mc import naive_mc_loop
from dd_dist.core.models import load_model
from dd_dist.labels.actors import label_rows
from dd_dist.layout import RunDir

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KS = (10, 30, 100, 300)
K_SCALING_ROWS = {"lenet": 2048, "lenet_all": 128}
MC_K = 100
PRECISION_ROWS = {"lenet": 4096, "lenet_all": 512}  # labels timed in fp32 and in bf16
NAIVE_IMAGES = 1000  # the textbook loop is slow: timed on the first test images


def label_time_vs_k(rows: dict) -> dict:
    """Seconds per 1000 rows of MC labels at each K, in-process on one thread (untrained nets)."""
    torch.set_num_threads(1)
    split = load_split("mnist", "train")
    x = torch.from_numpy(split.x)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch, n in rows.items():
            model, _ = label_throughput.untrained(arch, split, Path(tmp))
            out[arch] = {}
            for k in KS:
                rate = label_throughput.timed_rate(n, lambda ids: label_rows(model, x[ids], ids, k, label_throughput.SEED,
                                                                                    label_throughput.ZERO_P, 0.0))
                out[arch][k] = 1000 / rate
                print(f"{arch}: K={k} {out[arch][k]:.2f} s per 1000 rows", flush=True)
    return out


def inference(config: Path, repeats: int) -> dict:
    """MC-100 and the distilled student of config's run, scored by `dd-dist evaluate` on a copy of its models."""
    from dd_dist.stages.evaluate import evaluate

    source = load_config(config).resolved()
    if not RunDir(source).student.is_file():
        raise SystemExit(f"bench: no distilled student at {RunDir(source).student}: run `make demo` first")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, [f"run_dir={tmp}/run", f"eval.ks=[{MC_K}]", f"eval.repeats={repeats}",
                                   "eval.threads=1", f"tracking.uri=sqlite:///{tmp}/mlruns.db"])
        for role in ("teacher", "student"):
            RunDir(cfg).model(role).parent.mkdir(parents=True)
            shutil.copyfile(RunDir(source).model(role), RunDir(cfg).model(role))
        methods = evaluate(cfg)["methods"]
        naive_ms = naive_latency_ms(cfg)
    mc, student = methods[f"mc-{MC_K}"], methods["distilled"]
    return {"run_dir": os.path.relpath(source.run_dir, REPO), "arch": cfg.model.arch, "dataset": cfg.data.name, "repeats": repeats,
            "mc": {"error": mc["error_mean"], "error_std": mc["error_std"], "latency_ms": mc["latency_ms_mean"]},
            "distilled": {"error": student["error"], "latency_ms": student["latency_ms"]},
            "standard": {"error": methods["standard"]["error"], "latency_ms": methods["standard"]["latency_ms"]},
            "naive_mc_latency_ms": naive_ms, "naive_mc_images": NAIVE_IMAGES,
            "mc_vs_distilled_latency": mc["latency_ms_mean"] / student["latency_ms"],
            "naive_mc_vs_distilled_latency": naive_ms / student["latency_ms"]}


def naive_latency_ms(cfg) -> float:
    """ms per image of the textbook MC loop (K full passes, dropout in train mode) on the first test images."""
    torch.set_num_threads(1)
    teacher = load_model(RunDir(cfg).teacher)[0]
    x = torch.from_numpy(run_split(cfg, "test").x[:NAIVE_IMAGES])
    naive_mc_loop(teacher, x[:64], MC_K)  # warm-up
    began = time.perf_counter()
    for i in range(0, len(x), 256):
        naive_mc_loop(teacher, x[i : i + 256], MC_K)
    return 1000 * (time.perf_counter() - began) / len(x)


def plot(report: dict, path: Path) -> None:
    fig, (by_k, by_actors) = plt.subplots(1, 2, figsize=(10, 4))
    for arch, times in report["label_time_vs_k"].items():
        by_k.plot(list(KS), [times[k] for k in KS], marker="o", label=arch)
    by_k.set(xscale="log", yscale="log", xlabel="K (masks per image)", ylabel="s per 1000 rows (1 thread)",
             title="MC label time vs K")
    by_k.legend()
    for arch, net in report["labels"]["nets"].items():
        one, two = net["ray_1_actor"]["steady_rows_per_s"], net["ray_2_actor"]["steady_rows_per_s"]
        by_actors.plot([1, 2], [1, two / one], marker="o", label=arch)
    by_actors.plot([1, 2], [1, 2], "k:", label="linear")
    by_actors.set(xticks=[1, 2], xlabel="Ray label actors (1 thread each)", ylabel="rows/s vs 1 actor",
                  title=f"label throughput vs actors, K={label_throughput.K}")
    by_actors.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(r: dict) -> str:
    lab, tr, inf = r["labels"], r["training"], r["inference"]
    lines = ["# dd-dist speed (`make bench`)", "",
             f"{r['machine']}; load average at start {r['load_average']}; {r['device']}; one torch thread per "
             f"process; measured in one run of {r['seconds'] / 60:.1f} min.", "",
             "| what | measured | ratio |", "|---|---|---:|"]
    for arch, net in lab["nets"].items():
        lines.append(f"| labels {arch}, K={lab['k']}: naive K-pass loop -> project MC code | "
                     f"{net['naive_rows_per_s']:.0f} -> {net['mc_rows_per_s']:.0f} rows/s | {net['mc_speedup']:.1f}x |")
    for p, m in r["masks"].items():
        if p.startswith("p="):
            lines.append(f"| MC masks ({r['masks']['rows']} rows x K={r['masks']['k']} x {r['masks']['units']} units, "
                         f"{p}): per-row generators -> counter-based | {m['per_row_generators_per_s'] / 1e6:.0f} -> "
                         f"{m['counter_based_per_s'] / 1e6:.0f} M masks/s | {m['speedup']:.1f}x |")
    for arch, c in r["precision"].items():
        lines.append(f"| labels {arch}, K={lab['k']}: fp32 -> bf16 on this CPU (mean KL(fp32 \\|\\| bf16) "
                     f"{c['mean_kl_fp32_to_bf16']:.1e}) | {c['fp32_rows_per_s']:.0f} -> {c['bf16_rows_per_s']:.0f} rows/s | "
                     f"{c['bf16_time_vs_fp32']:.2f}x the time |")
    for arch, net in lab["nets"].items():
        lines.append(f"| labels {arch}: 1 -> 2 Ray actors | {net['ray_1_actor']['steady_rows_per_s']:.0f} -> "
                     f"{net['ray_2_actor']['steady_rows_per_s']:.0f} rows/s | {net['two_vs_one_actor']:.2f}x |")
    plain = tr["plain_loop"]["samples_per_s"]
    for name, label in [("deepspeed_1_worker_zero0", "ZeRO-0"), ("deepspeed_1_worker_zero2", "ZeRO-2")]:
        lines.append(f"| training: plain loop -> DeepSpeed on Ray Train, 1 worker, {label} (time per sample) | "
                     f"{plain:.0f} -> {tr[name]['samples_per_s']:.0f} samples/s | "
                     f"{plain / tr[name]['samples_per_s']:.2f}x |")
    lines.append(f"| training: 1 -> 2 workers, ZeRO-2 | {tr['deepspeed_1_worker_zero2']['samples_per_s']:.0f} -> "
                 f"{tr['deepspeed_2_workers_zero2']['samples_per_s']:.0f} samples/s | {tr['two_vs_one_worker']:.2f}x |")
    lines.append(f"| inference {inf['dataset']}/{inf['arch']}: MC K={MC_K} ({100 * inf['mc']['error']:.2f} ± "
                 f"{100 * inf['mc']['error_std']:.2f} % error) vs distilled ({100 * inf['distilled']['error']:.2f} %) | "
                 f"{inf['mc']['latency_ms']:.4f} vs {inf['distilled']['latency_ms']:.4f} ms/image | "
                 f"{inf['mc_vs_distilled_latency']:.1f}x |")
    lines.append(f"| inference: textbook MC K={MC_K} loop (K full passes) vs distilled | "
                 f"{inf['naive_mc_latency_ms']:.4f} vs {inf['distilled']['latency_ms']:.4f} ms/image | "
                 f"{inf['naive_mc_vs_distilled_latency']:.0f}x |")
    lines += ["", f"Inference: the models of `{inf['run_dir']}`, all {inf['dataset']} test images, MC over "
              f"{inf['repeats']} seeds; standard dropout reaches {100 * inf['standard']['error']:.2f} % at "
              f"{inf['standard']['latency_ms']:.4f} ms/image. The MC cost is below K times the student's because "
              "the layers before the first dropout run once per image (prefix sharing) and the K masks are batched; "
              f"the textbook loop is timed on the first {inf['naive_mc_images']} test images.",
              "", "| storage | label bytes per row (Parquet, zstd, id + mc_stderr included) |", "|---|---:|"]
    lines += [f"| {name} | {size:.1f} |" for name, size in lab["bytes_per_row"].items()]
    lines += ["", "## Label time against K and actors", "", "![label scaling](bench_label_scaling.png)", "",
              "| net | " + " | ".join(f"K={k}" for k in KS) + " |", "|---|" + "---:|" * len(KS)]
    lines += [f"| {arch} | " + " | ".join(f"{times[k]:.2f} s" for k in KS) + " |"
              for arch, times in r["label_time_vs_k"].items()]
    lines += ["", "Seconds per 1000 rows, one thread. Details: `label_throughput` and `train_throughput` "
              "(`python -m benchmarks.label_throughput`, `python -m benchmarks.train_throughput`) measure the same "
              "things on more rows."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"),
                        help="the finished run whose teacher and student are timed (default: make demo's)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer rows and repeats")
    args = parser.parse_args()
    began = time.perf_counter()
    report = {**machine(), "device": "CPU only (no GPU here)" if not torch.cuda.is_available()
              else torch.cuda.get_device_name(), "quick": args.quick}
    report["inference"] = inference(Path(args.config), 2 if args.quick else 3)
    report["label_time_vs_k"] = label_time_vs_k({a: max(n // 4, 32) for a, n in K_SCALING_ROWS.items()}
                                                if args.quick else K_SCALING_ROWS)
    report["masks"] = masks.measure()
    report["precision"] = label_throughput.precision_cost({a: max(n // 8, 64) for a, n in PRECISION_ROWS.items()}
                                                          if args.quick else PRECISION_ROWS)
    report["labels"] = label_throughput.measure(label_throughput.scaled(label_throughput.ROWS, 8 if args.quick else 2))
    report["training"] = train_throughput.measure(2048 if args.quick else 8192, 2 if args.quick else 3)
    report["seconds"] = time.perf_counter() - began
    plot(report, RESULTS / "bench_label_scaling.png")
    text = markdown(report)
    print(text)
    print(f"wrote {write_report('bench', report, text)}")


if __name__ == "__main__":
    main()
