"""Connecting to Ray: an existing cluster (cluster.address / RAY_ADDRESS) or a local one on 127.0.0.1."""
from __future__ import annotations

import os
import sys
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from dd_dist.config import ClusterConfig, Config
from dd_dist.data.cache import large_build
from dd_dist.data.decoding import ray_is_up
from dd_dist.data.splits import Split, run_split
from dd_dist.errors import UserError
from dd_dist.infra.worker_setup import quiet_local_ray
from dd_dist.layout import RunDir

# Passed to every Ray worker: no telemetry, and DeepSpeed on CPU unless a GPU run asks otherwise.
WORKER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
              "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # else each progress line of a train worker shows twice


def venv_path(environ=os.environ) -> str:
    """PATH with this interpreter's bin folder first, for the workers of a local Ray. DeepSpeed builds its
    C++ ops with the `ninja` on PATH, and a system ninja of another version than the venv's (the one a
    cluster from `make launch-cluster` uses) would rebuild them, ~75 s of both cores, at every switch."""
    return os.pathsep.join([str(Path(sys.executable).parent), environ.get("PATH", "")])


# A Ray that dd-dist starts on this machine: nothing can preempt it, and without a dashboard nobody sees
# Ray Train's metrics, so neither is watched (a short fit on 2 cores ~15 % faster).
LOCAL_ENV = {**WORKER_ENV, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0",
             "PATH": venv_path()}


def cluster_address(cfg: ClusterConfig, environ=os.environ) -> str | None:
    """The existing cluster to join: cluster.address, else RAY_ADDRESS; None for a local Ray."""
    return cfg.address or environ.get("RAY_ADDRESS") or None


def default_auth(cfg: ClusterConfig, environ=os.environ) -> None:
    """Token auth for the local Ray the CLI starts, unless the user chose a mode or a cluster.

    Ray 2.60 binds its GCS, raylet and worker ports to every interface even on 127.0.0.1 and cannot
    narrow them, so a stranger on the network could otherwise run code in it; with a token
    (~/.ray/auth_token, made by Ray on first use) it is refused. Ray reads the mode once per process,
    so this must run before the first `import ray`. An existing cluster keeps its own mode."""
    if not cluster_address(cfg, environ):
        environ.setdefault("RAY_AUTH_MODE", "token")


@contextmanager
def ray_session(cfg: ClusterConfig):
    """Yield with Ray initialised; shut down only a Ray this call started."""
    import ray  # heavy, and read only after default_auth has set the auth mode

    if ray.is_initialized():
        yield
        return
    address = cluster_address(cfg)
    if address:
        # A submitted job already carries its runtime env (make submit sets the same variables).
        ray.init(address=address)
    else:
        if cfg.use_gpu and not torch.cuda.is_available():  # before Ray starts: its start-up line is no error
            raise UserError(f"cluster.use_gpu=true, but torch {torch.__version__} sees no CUDA device here and a local "
                            f"Ray cannot grow: set cluster.use_gpu=false, or connect to a cluster with GPUs "
                            f"(cluster.address)")
        # A local Ray: loopback only, no dashboard needed for a single run. More logical CPUs than
        # cores, so that Ray Data's read tasks still run beside the training workers and label actors.
        env = {**LOCAL_ENV, **({} if cfg.use_gpu else {"DS_ACCELERATOR": "cpu"}),
               # the working directory, where a model factory of the user's may live (model.arch=pkg.mod:fn)
               "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
        ray.init(num_cpus=cfg.num_cpus or max(4, 2 * (os.cpu_count() or 1)), include_dashboard=False,
                 _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": env, "worker_process_setup_hook": quiet_local_ray})
    try:
        yield
    finally:
        ray.shutdown()


def open_split(cfg: Config, which: str) -> Split:
    """data.splits.run_split, where a large source that is not cached yet is decoded in Ray Data tasks: in a
    Ray session started for it if none is up (below cache.DECODE_IN_RAY_MB starting Ray costs more)."""
    spec = RunDir(cfg).split(which)
    source = (spec[k] for k in ("name", "path", "seed", "cache_dir", "channels", "skip_bad"))
    with ray_session(cfg.cluster) if not ray_is_up() and large_build(*source) else nullcontext():
        return run_split(cfg, which)


def check_resources(cfg: ClusterConfig, what: str, count: int, cpus: float, gpus: float = 0) -> None:
    """Refuse at once, in one line, `count` actors or workers of `cpus` CPUs and `gpus` GPUs each that this
    Ray can never hold, where it cannot grow: a local one (no cluster.address / RAY_ADDRESS). Call it with
    Ray initialised. On an existing cluster the autoscaler may add nodes (GPU nodes too): there the wait goes on."""
    import ray  # heavy: called inside ray_session only

    if cluster_address(cfg):
        return
    have = ray.cluster_resources()
    need = {"CPU": count * cpus, "GPU": count * gpus}
    if any(need[kind] > have.get(kind, 0) + 1e-9 for kind in need):
        asked = " and ".join(f"{need[kind]:g} {kind}s" for kind in need if need[kind])
        raise UserError(f"{what}={count} need {asked}, but this local Ray has {have.get('CPU', 0):g} CPUs and "
                        f"{have.get('GPU', 0):g} GPUs and cannot grow: ask for fewer, or connect to a cluster "
                        f"(cluster.address)")


def check_shared_storage(cfg: Config) -> int:
    """Refuse, in one line, a multi-node Ray cluster on which some node cannot see run_dir (the teacher,
    the label shards and the exported models live there), data.cache_dir (every process reads the data's
    Parquet copy there) or the local folder of its checkpoints.

    Call it with Ray initialised (inside ray_session), before the first stage. A URI (s3://, gs://, ...)
    is shared by nature; a path is probed: this process writes a file there and a task pinned to each
    node looks for it. Returns the number of alive nodes."""
    import ray  # heavy: only where a run spans nodes

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return len(nodes)
    for key, path in (("run_dir", cfg.run_dir), ("data.cache_dir", cfg.data.cache_dir),
                      ("cluster.storage_path", RunDir(cfg).checkpoints)):
        if "://" in path:
            continue
        blind = _nodes_blind_to(Path(path).resolve(), nodes)
        if blind:
            raise UserError(f"{key} {path} is node-local: {len(blind)} of {len(nodes)} Ray nodes cannot see it "
                            f"({', '.join(blind[:3])}); put it on storage every node mounts (NFS)"
                            + (" or set cluster.storage_path to an s3:// / gs:// bucket" if key == "cluster.storage_path"
                               else ""))
    return len(nodes)


def _nodes_blind_to(folder: Path, nodes: list[dict]) -> list[str]:
    """The nodes (as 'address (id)') on which a file this process writes into `folder` is not there."""
    import ray  # heavy: only where a run spans nodes
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    probe = folder / f".storage-probe-{token}"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text(token)
    try:
        sees = ray.remote(num_cpus=0)(_holds_token)
        checks = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                  .remote(str(probe), token) for n in nodes]
        seen = ray.get(checks, timeout=180)
    finally:
        probe.unlink()
    return [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n, ok in zip(nodes, seen) if not ok]


def _holds_token(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False
