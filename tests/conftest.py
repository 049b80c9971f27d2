"""Suite-wide settings: no telemetry, DeepSpeed on CPU where there is no GPU, and no MLflow store left in the checkout."""
import os
import tempfile
import uuid
from pathlib import Path

import pytest
import torch

from dd_dist.infra.cluster import LOCAL_ENV

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
