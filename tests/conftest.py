"""Suite-wide settings: no telemetry, DeepSpeed on CPU, and no MLflow store left in the checkout."""
import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The tests' own Ray instances are loopback-only and token-less; a ~/.ray/auth_token left by a
# cluster would otherwise switch token auth on for them without giving the client the token.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(autouse=True)
def _mlflow_store_in_tmp(tmp_path, monkeypatch):
    """Each test gets its own SQLite MLflow store unless it sets one itself."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
