"""Connecting to Ray: an existing cluster (cluster.address / RAY_ADDRESS) or a local one on 127.0.0.1."""
from __future__ import annotations

import os
from contextlib import contextmanager

from dd_dist.config import ClusterConfig

# Passed to every Ray worker: no telemetry, and DeepSpeed on CPU unless a GPU run asks otherwise.
WORKER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
              "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # else each progress line of a train worker shows twice


@contextmanager
def ray_session(cfg: ClusterConfig):
    """Yield with Ray initialised; shut down only a Ray this call started."""
    import ray

    if ray.is_initialized():
        yield
        return
    env = dict(WORKER_ENV)
    if not cfg.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        # A submitted job already carries its runtime env (make submit sets the same variables).
        ray.init(address=address)
    else:
        # A local Ray: loopback only, no dashboard needed for a single run. More logical CPUs than
        # cores, so that Ray Data's read tasks still run beside the training workers and label actors.
        ray.init(num_cpus=cfg.num_cpus or max(4, 2 * (os.cpu_count() or 1)), include_dashboard=False,
                 _node_ip_address="127.0.0.1", runtime_env={"env_vars": env})
    try:
        yield
    finally:
        ray.shutdown()
