"""Suite-wide settings: no telemetry, DeepSpeed on CPU where there is no GPU, and no MLflow store left in the
checkout; and the one pipeline run that two test modules read."""
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import mlflow_server
from dd_dist.cli import main
from dd_dist.infra.cluster import LOCAL_ENV
from tests.image_folders import write_image_folder

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
if not torch.cuda.is_available():  # where CUDA exists, the gpu tests get DeepSpeed's own choice (CUDA)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The settings dd-dist gives a local Ray of its own (cluster.LOCAL_ENV: the venv's tools first on PATH, ...),
# also for the Rays and processes that tests start themselves: they inherit this environment.
os.environ.update(LOCAL_ENV)
# Ray Train's controller polls its workers every 2 s; every report and the end of a run wait for a poll. The
# suite's epochs take a second, so a faster poll saves minutes (on long epochs it would cost ~10 % throughput).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Every Ray the suite starts, local or the two-node test cluster, uses token auth with one token of
# this run: Ray caches the auth mode and token per process, so a process that once spoke to a
# token cluster cannot later drive a token-less one (its workers' calls back are refused).
_RAY_TOKEN = Path(tempfile.mkdtemp(prefix="dd-dist-tests-")) / "ray_token"
_RAY_TOKEN.write_text(uuid.uuid4().hex)
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(_RAY_TOKEN)


@pytest.fixture(autouse=True)
def _mlflow_store_in_tmp(tmp_path, monkeypatch):
    """Each test gets its own SQLite MLflow store unless it sets one itself."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")


@dataclass
class ServedPipeline:
    folder: Path  # the image folder
    cache_dir: Path
    run: Path  # its run_dir
    url: str  # the `mlflow server` it logged to
    experiment: str


@pytest.fixture(scope="session")
def image_folder_pipeline(tmp_path_factory):
    """configs/imagefolder_example.yaml as a user starts from it, through every stage on Ray, logged to a real
    `mlflow server`: test_imagefolder checks its outputs, test_browser the MLflow UI over it (one pipeline
    for both saves a minute and a half of the suite). Variable-size RGB files resized to 64x64, the nested
    CNN of examples/nets.py (a model.arch factory: residual blocks, Dropout2d inside them), offline distillation."""
    root = tmp_path_factory.mktemp("image-folder-pipeline")
    server = mlflow_server.start(root)
    try:
        mlflow_server.wait_until_serving(server)
        served = ServedPipeline(write_image_folder(root / "images", {"train": 24, "val": 4, "test": 8}),
                                root / "cache", root / "run", server["url"], "image-folder")
        assert main(["pipeline", "-c", "configs/imagefolder_example.yaml", f"data.path={served.folder}",
                     f"data.cache_dir={served.cache_dir}", f"run_dir={served.run}",
                     "model.kwargs={channels: 4, hidden: 16}", "teacher.epochs=4", "teacher.lr_steps=[3]",
                     "teacher.batch_size=16", "label.k=8", "label.rows_per_shard=32", "distill.epochs=2",
                     "distill.lr_steps=[1]", "distill.batch_size=16", "eval.ks=[4]", "eval.repeats=1",
                     "cluster.num_cpus=4", f"tracking.uri={served.url}",
                     f"tracking.experiment={served.experiment}"]) == 0
        yield served
    finally:
        server["stop"]()
