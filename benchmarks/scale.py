"""Memory and throughput against dataset size: `make bench-scale`.

    .venv/bin/python -m benchmarks.scale [--rows 100000,400000,1600000] [--stages label,distill,evaluate]
                                          [--label-only-above 0]

Data: a synthetic Hugging Face Parquet folder of 32x32 RGB images (PNG bytes, as image datasets on the hub
store them; ten classes, a class colour plus noise) of N training rows, 1k validation and 10k test rows, written once per
N under --workdir. At each N the real CLI runs, each stage a process of its own on a local Ray:

    label     2 actors, lenet (untrained: speed and memory do not depend on the weights), K=10
    distill   one epoch on the labels, 2 DeepSpeed workers
    evaluate  the 10k test rows, standard / MC-10 / distilled

A sampler walks each stage's process tree every 0.2 s with psutil and keeps the peak RSS per process kind:
the driver (the CLI process), the label actors (Ray's MapWorker processes), the train workers
(RayTrainWorker), the evaluate process, and every other Ray worker process (ray_other: Ray Data's tasks that
decode the source into the cache and read the training stream, Ray's own actors). Label rows/s and distill samples/s come from the stages' own
logs (steady state: actors up); lost and duplicate rows compare the label shards' ids with the data's.
Sizes above --label-only-above run the label stage only. Writes benchmarks/results/scale.{json,md}.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from benchmarks.report import machine, write_report
from dd_dist.core.models import build_model, model_spec, save_model

TEST_ROWS = 10_000
VAL_ROWS = 1_000  # a validation split of its own: the N training rows are all labelled
ARCH, K = "lenet", 10
# In a Ray worker's process title, first match wins; ray_other: Ray Data's tasks (decoding the source into the
# cache, reading the training stream) and Ray's own actors (the dataset split coordinator, idle workers...).
KINDS = {"label_actor": "MapWorker", "train_worker": "RayTrainWorker", "ray_other": "ray::"}
REPORTED = ("driver", "label_actor", "train_worker", "evaluate", "ray_other")
GOAL_RSS_RATIO, GOAL_RSS_MB, GOAL_TIME_RATIO = 1.2, 2048, 1.15  # issue 16
FEATURES = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"_type": "ClassLabel", "names": [str(c) for c in range(10)]}}}}


def write_dataset(folder: Path, rows: int) -> None:
    """folder/{train,validation,test}-00000.parquet (rows, VAL_ROWS, TEST_ROWS), written 10k rows at a time."""
    if (folder / "done").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(rows)
    colours = rng.integers(0, 256, (10, 1, 1, 3))
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                       metadata={"huggingface": json.dumps(FEATURES)})
    for split, n in (("train", rows), ("validation", VAL_ROWS), ("test", TEST_ROWS)):
        with pq.ParquetWriter(folder / f"{split}-00000.parquet", schema) as writer:
            for start in range(0, n, 10_000):
                labels = rng.integers(0, 10, min(10_000, n - start))
                pixels = np.clip(colours[labels] + rng.normal(0, 60, (len(labels), 32, 32, 3)), 0, 255).astype(np.uint8)
                encoded = []
                for image in pixels:
                    buffer = io.BytesIO()
                    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
                    encoded.append({"bytes": buffer.getvalue(), "path": None})
                writer.write_table(pa.table({"image": encoded, "label": labels}, schema=schema))
    (folder / "done").write_text("")


class PeakRSS:
    """The peak RSS (MB) of each process kind in a process tree, sampled in a thread."""

    def __init__(self, root_pid: int, root_kind: str):
        self.root, self.root_kind, self.peak = psutil.Process(root_pid), root_kind, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _kind(self, process: psutil.Process) -> str | None:
        if process.pid == self.root.pid:
            return self.root_kind
        title = " ".join(process.cmdline())
        return next((kind for kind, word in KINDS.items() if word in title), None)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                for process in [self.root, *self.root.children(recursive=True)]:
                    try:
                        kind = self._kind(process)
                        if kind:
                            self.peak[kind] = max(self.peak.get(kind, 0.0), process.memory_info().rss / 2**20)
                    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                        pass
            except psutil.NoSuchProcess:
                return
            time.sleep(0.2)

    def close(self) -> dict:
        self.stop.set()
        self.thread.join()
        return self.peak


def run_stage(stage: str, overrides: list[str], kind: str, log: Path) -> tuple[dict, str, float]:
    """`dd-dist <stage> overrides`; returns (peak RSS per kind, its output, seconds)."""
    began = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "dd_dist", stage, *overrides], stdout=out,
                                   stderr=subprocess.STDOUT)
        sampler = PeakRSS(process.pid, kind)
        code = process.wait()
    peak, seconds, text = sampler.close(), time.perf_counter() - began, log.read_text()
    if code:
        raise SystemExit(f"dd-dist {stage} failed (exit {code}); its output: {log}")
    return peak, text, seconds


def lost_and_duplicates(labels: Path, rows: int) -> tuple[int, int]:
    ids = np.concatenate([pq.read_table(f, columns=["id"]).column("id").to_numpy()
                          for f in sorted((labels / "train").glob("*.parquet"))])
    return rows - len(np.unique(ids[(ids >= 0) & (ids < rows)])), len(ids) - len(np.unique(ids))


def measure(rows: int, stages: list[str], workdir: Path) -> dict:
    data, run = workdir / f"data-{rows}", workdir / f"run-{rows}"
    write_dataset(data, rows)
    overrides = [f"data.name=hf:{data}", f"data.cache_dir={workdir}/cache", f"run_dir={run}", f"model.arch={ARCH}",
                 f"label.k={K}", "label.actors=2", "label.rows_per_shard=8192", "distill.epochs=1",
                 "distill.lr_steps=[]", "distill.batch_size=256", "cluster.num_workers=2", "eval.ks=[10]",
                 "eval.repeats=1", f"data.test_rows={TEST_ROWS}", f"tracking.uri=sqlite:///{workdir}/mlruns.db",
                 "tracking.experiment=dd-dist-scale"]
    if not (run / "teacher" / "model.pt").is_file():  # untrained: label speed and memory do not depend on weights
        torch.manual_seed(0)
        spec = model_spec(ARCH, (3, 32, 32), 10, 0.5)
        save_model(run / "teacher" / "model.pt", build_model(**spec), spec)
    out = {"rows": rows, "seconds": {}, "peak_rss_mb": {}}
    for stage in stages:
        kind = {"evaluate": "evaluate"}.get(stage, "driver")
        peak, text, seconds = run_stage(stage, overrides, kind, workdir / f"{stage}-{rows}.log")
        out["seconds"][stage] = seconds
        for key, value in peak.items():
            out["peak_rss_mb"][key] = max(out["peak_rss_mb"].get(key, 0.0), value)
        if stage == "label":
            out["label_rows_per_s"] = float(re.search(r"([\d.]+) rows/s once the", text).group(1))
            out["lost_rows"], out["duplicate_rows"] = lost_and_duplicates(run / "labels", rows)
        if stage == "distill":
            out["distill_samples_per_s"] = float(re.findall(r"([\d.]+) samples/s", text)[-1])
        print(f"N={rows} {stage}: {seconds:.0f} s, peak RSS {peak}", flush=True)
    return out


def markdown(report: dict) -> str:
    runs, kinds = report["runs"], REPORTED
    head = " | ".join(kinds)
    lines = ["# Memory and throughput against dataset size", "",
             f"`{report['command']}` on {report['machine']} (load average at start {report['load_average']}).",
             f"Data: hf: Parquet of 32x32 RGB PNGs; label: {ARCH}, K={K}, 2 actors; distill: one epoch, 2 workers; "
             f"evaluate: {TEST_ROWS} test rows. A stage not run at a size shows –.", "",
             f"| rows | peak RSS MB: {head} | label rows/s | distill samples/s | stage s: label / distill / "
             f"evaluate | lost | duplicated |",
             "|---:|" + "---:|" * (len(kinds) + 5)]
    for r in runs:
        rss = " | ".join(f"{r['peak_rss_mb'][k]:.0f}" if k in r["peak_rss_mb"] else "–" for k in kinds)
        distill = f"{r['distill_samples_per_s']:.0f}" if "distill_samples_per_s" in r else "–"
        seconds = " / ".join(f"{r['seconds'][s]:.0f}" if s in r["seconds"] else "–"
                             for s in ("label", "distill", "evaluate"))
        lines.append(f"| {r['rows']} | {rss} | {r['label_rows_per_s']:.0f} | {distill} | {seconds} | "
                     f"{r['lost_rows']} | {r['duplicate_rows']} |")
    return "\n".join(lines + ["", report["finding"], ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,400000,1600000")
    parser.add_argument("--stages", default="label,distill,evaluate")
    parser.add_argument("--label-only-above", type=int, default=0, help="sizes above this run the label stage only")
    parser.add_argument("--workdir", default="runs/bench-scale")
    args = parser.parse_args()
    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    runs = []
    for rows in map(int, args.rows.split(",")):
        only_label = args.label_only_above and rows > args.label_only_above
        runs.append(measure(rows, ["label"] if only_label else stages, workdir))
    report = {"command": "python -m benchmarks.scale " + " ".join(sys.argv[1:]), **machine(), "runs": runs,
              "rows": [r["rows"] for r in runs],
              "peak_rss_mb": {k: [r["peak_rss_mb"].get(k) for r in runs] for k in REPORTED},
              "label_rows_per_s": [r["label_rows_per_s"] for r in runs],
              "distill_samples_per_s": [r.get("distill_samples_per_s") for r in runs],
              "lost_rows": [r["lost_rows"] for r in runs], "duplicate_rows": [r["duplicate_rows"] for r in runs]}
    report["finding"] = finding(report)
    print(write_report("scale", report, markdown(report)))


def finding(report: dict) -> str:
    """The goals (issue 16) checked on what ran: flat memory per process kind, flat time per row, no rows lost."""
    first, last = 0, len(report["rows"]) - 1
    parts, met = [], []
    for kind, peaks in report["peak_rss_mb"].items():
        measured = [(n, p) for n, p in zip(report["rows"], peaks) if p is not None]
        if len(measured) > 1:
            ratio = measured[-1][1] / measured[0][1]
            parts.append(f"{kind} peak RSS {measured[-1][1]:.0f} MB at {measured[-1][0]} rows = {ratio:.2f}x that "
                         f"at {measured[0][0]}")
            met.append(ratio <= GOAL_RSS_RATIO and measured[-1][1] <= GOAL_RSS_MB)
    rates = report["label_rows_per_s"]
    parts.append(f"label time per row at {report['rows'][last]} = {rates[first] / rates[last]:.2f}x that at "
                 f"{report['rows'][first]}")
    met.append(rates[first] / rates[last] <= GOAL_TIME_RATIO)
    distill = [(n, r) for n, r in zip(report["rows"], report["distill_samples_per_s"]) if r]
    if len(distill) > 1:
        parts.append(f"distill time per sample at {distill[-1][0]} = {distill[0][1] / distill[-1][1]:.2f}x that at "
                     f"{distill[0][0]}")
        met.append(distill[0][1] / distill[-1][1] <= GOAL_TIME_RATIO)
    parts.append(f"{sum(report['lost_rows'])} rows lost, {sum(report['duplicate_rows'])} duplicated")
    met.append(sum(report["lost_rows"]) + sum(report["duplicate_rows"]) == 0)
    goals = (f"Goals (every process kind's peak RSS at the largest size <= {GOAL_RSS_RATIO}x that at the smallest "
             f"and <= {GOAL_RSS_MB} MB, time per row <= {GOAL_TIME_RATIO}x, no row lost or duplicated): "
             f"{'met' if all(met) else 'NOT met'}.")
    return "Measured: " + "; ".join(parts) + ". " + goals


if __name__ == "__main__":
    main()
