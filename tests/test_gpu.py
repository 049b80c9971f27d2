"""The GPU path, wherever CUDA exists (`pytest -m gpu`; skipped elsewhere): nothing here forces the CPU.

- the demo config end to end on one GPU in bf16 (DeepSpeed bf16, bf16 labels and evaluation), through the CLI;
- CUDA fp32 labels within KL 1e-6 of CPU labels (the masks are bit-identical: tests/test_masks.py);
- two label actors sharing one GPU (label.gpus_per_actor=0.5) write the labels one CPU actor writes.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from dd_dist.config import load_config
from dd_dist.core.loop import train_teacher
from dd_dist.core.models import build_model, model_spec
from dd_dist.labels.actors import label_rows
from dd_dist.labels.format import load_soft_labels, read_manifest
from dd_dist.layout import RunDir
from dd_dist.stages.label import run_label

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
SMALL = ["data.name=synthetic", "model.arch=mlp", "teacher.epochs=2", "teacher.lr=0.05", "teacher.lr_steps=[1]",
         "label.k=16", "label.rows_per_shard=128", "label.batch_size=50"]


def gpu_env() -> dict:
    """The suite's environment without its CPU-only DeepSpeed setting."""
    return {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    p, q = p.double(), q.double()
    return (torch.xlogy(p, p) - p * q.clamp_min(1e-12).log()).sum(1).mean().item()


def test_demo_pipeline_on_one_gpu_in_bf16(tmp_path):
    run = tmp_path / "run"
    overrides = [f"run_dir={run}", f"tracking.uri=sqlite:///{tmp_path}/mlruns.db", "data.test_rows=2000",
                 "cluster.use_gpu=true", "cluster.num_workers=1", "cluster.deepspeed=configs/deepspeed/zero2_bf16_gpu.json",
                 "label.precision=bf16", "label.actors=1", "eval.precision=bf16", "eval.ks=[10]"]
    done = subprocess.run([sys.executable, "-m", "dd_dist", "pipeline", "-c", "configs/demo.yaml", *overrides],
                          env=gpu_env(), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cfg = load_config("configs/demo.yaml", overrides)
    teacher = json.loads(RunDir(cfg).history("teacher").read_text())["epochs"]
    assert teacher[-1]["loss"] < 0.5 * teacher[0]["loss"]
    results = json.loads(RunDir(cfg).results.read_text())
    assert results["device"].startswith("cuda") and results["precision"] == "bf16"
    assert results["methods"]["distilled"]["error"] < 0.05 and results["methods"]["mc-10"]["error_mean"] < 0.06
    assert read_manifest(RunDir(cfg).labels)["precision"] == "bf16"
    # the export holds DeepSpeed's fp32 master weights, not the bf16 module rounded up to float32
    weights = torch.cat([w.flatten() for w in torch.load(RunDir(cfg).teacher, weights_only=True)["state_dict"].values()])
    assert weights.dtype == torch.float32 and (weights != weights.bfloat16().float()).float().mean() > 0.5
    verified = subprocess.run([sys.executable, "-m", "dd_dist", "verify", str(RunDir(cfg).labels), "--teacher",
                               str(RunDir(cfg).teacher), "--rows", "64", *overrides], env=gpu_env(), capture_output=True,
                              text=True, timeout=600)
    assert verified.returncode == 0, verified.stdout[-2000:] + verified.stderr[-2000:]


def test_cuda_fp32_labels_are_the_cpu_labels():
    x, ids = torch.rand(300, 1, 28, 28), torch.arange(300) * 7
    for arch in ("lenet", "lenet_all"):
        torch.manual_seed(0)
        teacher = build_model(**model_spec(arch, (1, 28, 28), 10, 0.5))
        cpu = label_rows(teacher, x, ids, 100, 0, 0.2, 0.0)
        cuda = label_rows(teacher.cuda(), x, ids, 100, 0, 0.2, 0.0)
        assert kl(cpu.probs, cuda.probs) < 1e-6, arch


def test_two_label_actors_share_one_gpu(tmp_path):
    base = [*SMALL, f"run_dir={tmp_path / 'gpu'}"]
    train_teacher(load_config(None, base))
    gpu_labels = run_label(load_config(None, [*base, "cluster.use_gpu=true", "label.actors=2",
                                              "label.gpus_per_actor=0.5"]))
    cpu_run = tmp_path / "cpu"
    (cpu_run / "teacher").mkdir(parents=True)
    (cpu_run / "teacher" / "model.pt").symlink_to(tmp_path / "gpu" / "teacher" / "model.pt")
    cpu_labels = run_label(load_config(None, [*SMALL, f"run_dir={cpu_run}", "label.actors=1"]))
    assert kl(load_soft_labels(cpu_labels)[1], load_soft_labels(gpu_labels)[1]) < 1e-6
