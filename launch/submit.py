"""`make submit CONFIG=... [OVERRIDES="k=v ..."]`: run `python -m dd_dist pipeline` as a Ray job.

The config is validated here first (a bad key fails in one line before anything is uploaded); this
checkout goes up as the job's working dir (the job's `python` is the one on the cluster nodes' PATH:
the project venv on a cluster from `make launch-cluster`). Prints the job id, streams the job's logs
and exits 0 only if the job SUCCEEDED. Ctrl-C detaches; the job keeps running.

On a loopback address (a cluster on this machine) a relative run_dir and the default MLflow store are
pinned to this checkout, so `make submit` leaves its outputs where `make demo` would. Elsewhere they
would land in the job's temporary working dir on the head node: a warning says so.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from dd_dist.config import TrackingConfig, load_config
from dd_dist.errors import UserError
from dd_dist.infra.cluster import WORKER_ENV

# Never uploaded: environments, outputs and data (the cluster has its own venv and reads data itself).
EXCLUDES = [".venv", "runs", "mlruns", "mlruns.db", "data", ".git", "**/__pycache__", ".pytest_cache"]
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_URI = TrackingConfig.model_fields["uri"].default


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265",
                   help="the cluster's dashboard / job API (default $RAY_ADDRESS, else http://127.0.0.1:8265)")
    p.add_argument("-c", "--config", required=True, help="pipeline config under this checkout, e.g. configs/demo.yaml")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLFLOW_TRACKING_URI of the job (default $MLFLOW_TRACKING_URI); the cluster must reach it")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="more env vars for the job")
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working dir (default: this checkout)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        entrypoint, runtime_env, local_store = job_spec(args)
        client = connect(args.address)
        if local_store:
            create_experiment_beside_store(*local_store)
    except UserError as error:
        print(f"submit: error: {error}", file=sys.stderr)
        return 2
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                               submission_id=f"dd-dist-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    print(f"submitted job {job_id} to {args.address}: {entrypoint}", flush=True)
    print(f"  logs: make logs JOB={job_id}    stop: make stop JOB={job_id}", flush=True)
    if args.no_wait:
        return 0
    try:
        asyncio.run(stream_logs(client, job_id))
    except KeyboardInterrupt:
        print(f"\ndetached: job {job_id} keeps running (make logs JOB={job_id} / make stop JOB={job_id})")
        return 130
    info = client.get_job_info(job_id)
    # The message of a failed job repeats the log tail just streamed: its first line is the news.
    reason = (info.message or "").split(", last available logs")[0].splitlines()[:1]
    print(f"job {job_id} {info.status}" + (f": {reason[0]}" if info.status != "SUCCEEDED" and reason else ""))
    return 0 if info.status == "SUCCEEDED" else 1


def job_spec(args) -> tuple[str, dict, tuple[str, str] | None]:
    """(entrypoint, runtime_env, (SQLite store URI, experiment) on this machine or None) for this config and
    these overrides; UserError if they are not valid. Touches nothing."""
    workdir = Path(args.working_dir).resolve()
    config = Path(args.config).resolve()
    if not config.is_relative_to(workdir):
        raise UserError(f"config {args.config} is outside the uploaded working dir {workdir}: put it under configs/")
    overrides = list(args.overrides)
    cfg = load_config(config, overrides)  # fails here, in one line, rather than on the cluster
    env = {**WORKER_ENV, **env_pairs(args.env)}
    if args.mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = args.mlflow_uri
    local_store = None
    if is_loopback(args.address):
        local_store = pin_outputs_here(cfg, overrides, env)
    else:
        warn_about_head_node_outputs(cfg, env)
    entrypoint = shlex.join(["python", "-m", "dd_dist", "pipeline", "-c", str(config.relative_to(workdir)), *overrides])
    return entrypoint, {"working_dir": str(workdir), "excludes": EXCLUDES, "env_vars": env}, local_store


def pin_outputs_here(cfg, overrides: list[str], env: dict[str, str]) -> tuple[str, str] | None:
    """A cluster on this machine: relative run_dir and SQLite paths mean this checkout, as for `make demo`,
    not the job's temporary working dir. Returns (SQLite URI, experiment) when the store is such a file."""
    if not Path(cfg.run_dir).is_absolute():
        overrides.append(f"run_dir={Path(cfg.run_dir).resolve()}")
    from_config = cfg.tracking.uri != DEFAULT_URI  # the job's tracking_uri() prefers it to the env
    uri = cfg.tracking.uri if from_config else env.get("MLFLOW_TRACKING_URI", DEFAULT_URI)
    is_file = uri.startswith("sqlite:///") and ":memory:" not in uri
    if is_file:
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    if from_config:
        overrides.append(f"tracking.uri={uri}")
    else:
        env["MLFLOW_TRACKING_URI"] = uri
    return (uri, cfg.tracking.experiment) if is_file else None


def warn_about_head_node_outputs(cfg, env: dict[str, str]) -> None:
    if not Path(cfg.run_dir).is_absolute() and not cfg.cluster.storage_path:
        print(f"submit: warning: run_dir {cfg.run_dir} is relative and cluster.storage_path unset: outputs stay in "
              f"the job's temporary working dir on the head node", file=sys.stderr)
    uri = cfg.tracking.uri if cfg.tracking.uri != DEFAULT_URI else env.get("MLFLOW_TRACKING_URI", DEFAULT_URI)
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        print(f"submit: warning: MLflow store {uri} is a file on the head node; set MLFLOW_TRACKING_URI to a "
              f"server the cluster reaches", file=sys.stderr)


def create_experiment_beside_store(uri: str, name: str) -> None:
    """A SQLite store puts a new experiment's artifacts under ./mlruns of the process that creates it: the
    job's temporary working dir. Create the experiment here, its artifacts in mlruns/ beside the database."""
    import mlflow  # slow to import: only when needed

    db = Path(uri.removeprefix("sqlite:///"))
    mlflow.set_tracking_uri(uri)
    try:
        if mlflow.get_experiment_by_name(name) is None:
            mlflow.create_experiment(name, artifact_location=str(db.parent / "mlruns"))
    except Exception as error:  # a bad path or a damaged database: say which, in one line
        raise UserError(f"cannot open the MLflow store {uri}: {str(error).splitlines()[0][:200]}") from None


def env_pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item!r} must look like KEY=VALUE")
        pairs[key] = value
    return pairs


def is_loopback(address: str) -> bool:
    return (urlparse(address).hostname or address.split(":")[0]) in LOOPBACK


def connect(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError:
        raise UserError(f"no Ray job API at {address}: start a cluster (make launch-cluster) or set RAY_ADDRESS") from None
    except AuthenticationError:
        raise UserError(f"the Ray cluster at {address} wants its token: RAY_AUTH_MODE=token and ~/.ray/auth_token, "
                        f"RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH") from None


async def stream_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


if __name__ == "__main__":
    sys.exit(main())
