"""Connecting to Ray: an existing cluster (cluster.address / RAY_ADDRESS) or a local one on 127.0.0.1."""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path

from dd_dist.config import ClusterConfig, Config
from dd_dist.errors import UserError

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


def storage_dir(cfg: Config) -> str:
    """Where a run keeps what every node must read (teacher, label shards, Ray Train checkpoints):
    cluster.storage_path/<name of run_dir> when set, else run_dir. A local path, NFS mount or URI."""
    if not cfg.cluster.storage_path:
        return cfg.run_dir
    return f"{cfg.cluster.storage_path.rstrip('/')}/{Path(cfg.run_dir).name}"


def check_shared_storage(cfg: Config) -> int:
    """Refuse, in one line, a multi-node Ray cluster on which some node cannot see storage_dir(cfg).

    Call it with Ray initialised (inside ray_session), before the first stage. A URI (s3://, gs://, ...)
    is shared by nature; a path is probed: this process writes a file there and a task pinned to each
    node looks for it. Returns the number of alive nodes."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    path = storage_dir(cfg)
    if len(nodes) < 2 or "://" in path:
        return len(nodes)
    token = uuid.uuid4().hex
    probe = Path(path).resolve() / f".storage-probe-{token}"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text(token)
    try:
        sees = ray.remote(num_cpus=0)(_holds_token)
        checks = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                  .remote(str(probe), token) for n in nodes]
        seen = ray.get(checks, timeout=180)
    finally:
        probe.unlink()
    blind = [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise UserError(f"storage {path} is node-local: {len(blind)} of {len(nodes)} Ray nodes cannot see it "
                        f"({', '.join(blind[:3])}); set cluster.storage_path to NFS or an s3:// / gs:// bucket")
    return len(nodes)


def _holds_token(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False
