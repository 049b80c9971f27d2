"""GPU figures (issue 20), on one CUDA GPU: run by benchmarks/gpu_check.sh after the gpu tests.

    .venv/bin/python -m benchmarks.gpu

writes benchmarks/results/gpu.{json,md}:
- label rows/s for lenet and lenet_all at K=100, in fp32 and bf16 (label_rows: masks drawn on the GPU),
  against the textbook K-pass loop on the same GPU (untrained nets: speed does not depend on weights);
- the demo pipeline on the GPU (DeepSpeed bf16 with 1 worker, eval.ks=[100]): the distilled student's
  latency against MC-100's, and DeepSpeed's samples/s.
Absolute times: this is the GPU the report names.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.label_throughput import BATCH, K, SEED, ZERO_P
from benchmarks.report import machine, write_report
from dd_dist.config import load_config
from dd_dist.core.augment import augment
from dd_dist.core.mc import naive_mc_loop
from dd_dist.core.models import build_model, model_spec
from dd_dist.labels.actors import label_rows
from dd_dist.layout import RunDir

ROWS = {"lenet": 65_536, "lenet_all": 16_384}
NAIVE_ROWS = 4096
PIPELINE = ["cluster.use_gpu=true", "cluster.num_workers=1", "cluster.deepspeed=configs/deepspeed/zero2_bf16_gpu.json",
            "label.actors=1", "eval.ks=[100]", "eval.repeats=2"]


def rows_per_s(rows: int, label_batch) -> float:
    label_batch(torch.arange(BATCH, device="cuda"))  # warm-up
    torch.cuda.synchronize()
    began = time.perf_counter()
    for start in range(0, rows, BATCH):
        label_batch(torch.arange(start, min(start + BATCH, rows), device="cuda"))
    torch.cuda.synchronize()
    return rows / (time.perf_counter() - began)


def label_rates() -> dict:
    x = torch.rand(max(ROWS.values()), 1, 28, 28, device="cuda")
    out = {}
    for arch, rows in ROWS.items():
        torch.manual_seed(SEED)
        model = build_model(**model_spec(arch, (1, 28, 28), 10, 0.5)).cuda()
        naive = rows_per_s(NAIVE_ROWS, lambda ids: naive_mc_loop(model, augment(x[ids], ids, SEED, 0, ZERO_P), K))
        out[arch] = {"naive_rows_per_s": naive}
        for precision in ("fp32", "bf16"):
            rate = rows_per_s(rows, lambda ids: label_rows(model, x[ids], ids, K, SEED, ZERO_P, 0.0, precision))
            out[arch][precision] = {"rows_per_s": rate, "vs_naive": rate / naive}
        print(f"{arch}: {out[arch]}", flush=True)
    return out


def pipeline(workdir: Path) -> dict:
    overrides = [f"run_dir={workdir}/run", f"tracking.uri=sqlite:///{workdir}/mlruns.db", *PIPELINE]
    subprocess.run([sys.executable, "-m", "dd_dist", "pipeline", "-c", "configs/demo.yaml", *overrides], check=True)
    run = RunDir(load_config("configs/demo.yaml", overrides))
    methods = json.loads(run.results.read_text())["methods"]
    student = json.loads(run.history("student").read_text())["epochs"]
    mc, distilled = methods[f"mc-{K}"], methods["distilled"]
    return {"distilled_latency_ms": distilled["latency_ms"], "mc_latency_ms": mc["latency_ms_mean"],
            "mc_vs_distilled_latency": mc["latency_ms_mean"] / distilled["latency_ms"],
            "distilled_error": distilled["error"], "mc_error": mc["error_mean"],
            "deepspeed_samples_per_s": student[-1]["samples_per_s"], "deepspeed_workers": 1}


def markdown(r: dict) -> str:
    lines = ["# dd-dist on a GPU (`benchmarks/gpu_check.sh`)", "", f"{r['device']}; {r['machine']}.", "",
             f"| net, K={K} | naive K-pass loop | fp32 labels | bf16 labels |", "|---|---:|---:|---:|"]
    for arch, net in r["labels"].items():
        lines.append(f"| {arch} | {net['naive_rows_per_s']:.0f} rows/s | {net['fp32']['rows_per_s']:.0f} rows/s "
                     f"({net['fp32']['vs_naive']:.1f}x) | {net['bf16']['rows_per_s']:.0f} rows/s "
                     f"({net['bf16']['vs_naive']:.1f}x) |")
    p = r["pipeline"]
    lines += ["", f"Demo pipeline on the GPU: distilled student {p['distilled_latency_ms']:.4f} ms/image "
              f"({100 * p['distilled_error']:.2f} % error) against MC-{K} {p['mc_latency_ms']:.4f} ms/image "
              f"({100 * p['mc_error']:.2f} %): {p['mc_vs_distilled_latency']:.1f}x; DeepSpeed (bf16, ZeRO-2, 1 worker) "
              f"{p['deepspeed_samples_per_s']:.0f} samples/s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs a CUDA device")
    report = {**machine(), "device": torch.cuda.get_device_name(), "labels": label_rates()}
    with tempfile.TemporaryDirectory() as tmp:
        report["pipeline"] = pipeline(Path(tmp))
    print(markdown(report))
    print(f"wrote {write_report('gpu', report, markdown(report))}")


if __name__ == "__main__":
    main()
