"""`make launch-cluster` / `make down` / `make cluster-status`: a Ray cluster for dd-dist jobs.

Two modes, chosen by the hosts:
- single machine (HEAD_IP is loopback and there are no WORKER_IPS): `ray start --head` here, plus
  LOCAL_WORKERS extra worker nodes on the same machine. The cluster lives in its own --temp-dir, and
  `down` stops only the processes of that temp dir: a bare `ray stop` would kill every Ray on the machine.
- SSH hosts: launch/local.yaml (the cluster launcher's `local` provider) filled in with the hosts,
  then `ray up` / `ray down` on that copy.

Ray's own ports (GCS, raylets, workers) listen on every interface and cannot be narrowed, so token
auth is on by default (RAY_AUTH_MODE=token, ~/.ray/auth_token); the dashboard binds to 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import yaml

LAUNCH = Path(__file__).resolve().parent
REPO = LAUNCH.parent
STATE = "dd-dist-cluster.json"  # in the temp dir: how `down` and `status` find the cluster
LOOPBACK = ("127.0.0.1", "localhost", "::1")
BIN = Path(sys.executable).parent  # the venv that runs this script also runs Ray


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return {"up": up, "down": down, "status": status}[args.action](args)
    except ClusterError as error:
        print(f"cluster {args.action}: error: {error}", file=sys.stderr)
        return 2


class ClusterError(Exception):
    """A mistake the user can fix; printed as one line."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--temp-dir", default="/tmp/dd-dist-ray",
                   help="Ray's temp dir for a single-machine cluster, and where this script keeps its state "
                        "(keep it short: Ray's socket paths must fit in 107 characters)")
    p.add_argument("--auth", choices=["token", "disabled"], default=os.environ.get("RAY_AUTH_MODE") or "token",
                   help="Ray token auth (default token; the token is ~/.ray/auth_token or $RAY_AUTH_TOKEN_PATH)")
    hosts = p.add_argument_group("hosts")
    hosts.add_argument("--head-ip", default="127.0.0.1")
    hosts.add_argument("--worker-ips", default="", help="space- or comma-separated; any makes it an SSH cluster")
    hosts.add_argument("--hosts-file", help="one host per line, the head first; '#' starts a comment")
    hosts.add_argument("--ssh-user", default=os.environ.get("USER") or "root")
    hosts.add_argument("--ssh-key", default="~/.ssh/id_ed25519")
    local = p.add_argument_group("single machine")
    local.add_argument("--num-cpus", type=int, default=max(4, 2 * (os.cpu_count() or 1)),
                       help="logical CPUs of the head (default twice the cores, at least 4, so that Ray "
                            "Data's tasks still run beside training workers and label actors)")
    local.add_argument("--local-workers", type=int, default=0, help="extra worker nodes on this machine")
    local.add_argument("--worker-cpus", type=int, default=2, help="logical CPUs of each extra local node")
    local.add_argument("--port", type=int, default=6379, help="GCS port")
    local.add_argument("--dashboard-port", type=int, default=8265)
    local.add_argument("--client-port", type=int, default=10001, help="Ray client server port")
    local.add_argument("--agent-port", type=int, default=52365, help="the head's dashboard agent port")
    local.add_argument("--start-args", default="", help="more `ray start` flags for every node, one string")
    return p


# ---------------------------------------------------------------- hosts

def host_list(args) -> tuple[str, list[str]]:
    """(head, workers) from --hosts-file, else from --head-ip / --worker-ips."""
    if args.hosts_file:
        path = Path(args.hosts_file)
        if not path.is_file():
            raise ClusterError(f"hosts file not found: {path}")
        hosts = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        hosts = [h for h in hosts if h]
        if not hosts:
            raise ClusterError(f"hosts file {path} names no host")
        return hosts[0], hosts[1:]
    return args.head_ip, args.worker_ips.replace(",", " ").split()


def is_single_machine(head: str, workers: list[str]) -> bool:
    return head in LOOPBACK and not workers


def ray_env(auth: str, **extra: str) -> dict[str, str]:
    """The environment of every `ray` command: this venv first on PATH (job entrypoints say `python`),
    an explicit auth mode, no telemetry."""
    env = dict(os.environ, RAY_AUTH_MODE=auth, RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true", **extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def ray(*args: str, auth: str, check: bool = True, **extra_env: str) -> int:
    command = [str(BIN / "ray"), *args]
    print("+ " + shlex.join(command), flush=True)
    rc = subprocess.run(command, env=ray_env(auth, **extra_env)).returncode
    if check and rc:
        raise ClusterError(f"`ray {args[0]}` failed with exit status {rc} (see its output above)")
    return rc


def ensure_token(auth: str) -> None:
    """Token auth needs a token before `ray start`; `ray get-auth-token --generate` keeps an existing one."""
    if auth == "token" and not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=ray_env(auth), check=True,
                       stdout=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- state

def state_path(args) -> Path:
    return Path(args.temp_dir) / STATE


def read_state(args) -> dict:
    path = state_path(args)
    if not path.is_file():
        raise ClusterError(f"no cluster started from {args.temp_dir} (make launch-cluster first)")
    return json.loads(path.read_text())


def write_state(args, state: dict) -> None:
    path = state_path(args)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------- up

def up(args) -> int:
    head, workers = host_list(args)
    Path(args.temp_dir).mkdir(parents=True, exist_ok=True)
    if cluster_processes(args.temp_dir):
        raise ClusterError(f"a Ray cluster from {args.temp_dir} is already running (make down first)")
    ensure_token(args.auth)
    if is_single_machine(head, workers):
        try:
            state = start_single_machine(args)
        except BaseException:  # no half-started cluster left behind
            stop_processes(cluster_processes(args.temp_dir))
            raise
        write_state(args, state)
    else:
        state = start_ssh_cluster(args, head, workers)
    print(f"\nRay cluster up ({state['mode']}, auth {args.auth}). Dashboard and job API: {state['dashboard']} "
          f"(loopback only{'' if state['mode'] == 'single' else '; `ray dashboard ' + state['yaml'] + '` tunnels it'})")
    print(f"Submit:  make submit CONFIG=configs/demo.yaml RAY_ADDRESS={state['dashboard']}")
    return 0


def start_single_machine(args) -> dict:
    extra = shlex.split(args.start_args)
    gcs = f"127.0.0.1:{args.port}"
    dashboard = f"http://127.0.0.1:{args.dashboard_port}"
    # Ray replaces a loopback --node-ip-address by the host's routable address for its node table; the
    # dashboard still binds where --dashboard-host says. RAY_ADDRESS, inherited by every Ray process, points
    # Ray's own address look-ups (Ray Train's state API calls) at this cluster when others run on the machine.
    ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={args.port}", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={args.dashboard_port}", f"--ray-client-server-port={args.client_port}",
        f"--dashboard-agent-listen-port={args.agent_port}", f"--num-cpus={args.num_cpus}",
        "--disable-usage-stats", f"--temp-dir={args.temp_dir}", *extra, auth=args.auth, RAY_ADDRESS=gcs)
    for i in range(args.local_workers):
        # A custom resource names each node, so that work can be pinned to it; its own agent port.
        ray("start", f"--address={gcs}", "--node-ip-address=127.0.0.1", f"--num-cpus={args.worker_cpus}",
            f"--resources={json.dumps({f'local_worker_{i + 1}': 1})}", f"--dashboard-agent-listen-port={free_port()}",
            # Its own temp dir: nodes sharing one would share runtime_resources/, and one node's runtime
            # env agent would delete and re-extract a job's working dir under the feet of the other's.
            "--disable-usage-stats", f"--temp-dir={Path(args.temp_dir) / f'node-{i + 1}'}", *extra, auth=args.auth,
            RAY_ADDRESS=gcs)
    return {"mode": "single", "gcs": gcs, "dashboard": dashboard, "auth": args.auth, "nodes": 1 + args.local_workers}


def start_ssh_cluster(args, head: str, workers: list[str]) -> dict:
    config = render_local_yaml(head, workers, args.ssh_user, args.ssh_key, args.auth)
    path = Path(args.temp_dir) / "local-cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    # The dashboard listens on the head's loopback; `ray dashboard` forwards it to this port.
    state = {"mode": "ssh", "yaml": str(path), "dashboard": "http://127.0.0.1:8265", "auth": args.auth,
             "nodes": 1 + len(workers)}
    write_state(args, state)  # first: `make down` must reach hosts that a failed `ray up` left half set up
    ray("up", "-y", "--no-config-cache", str(path), auth=args.auth)
    return state


def render_local_yaml(head: str, workers: list[str], ssh_user: str, ssh_key: str, auth: str) -> dict:
    """launch/local.yaml with these hosts, this checkout as the synced code, and this auth mode."""
    config = yaml.safe_load((LAUNCH / "local.yaml").read_text())
    config["provider"].update(head_ip=head, worker_ips=workers)
    config["auth"].update(ssh_user=ssh_user, ssh_private_key=ssh_key)
    config["file_mounts"]["~/dd-dist"] = str(REPO)  # the launcher rsyncs this checkout to every host
    if auth == "disabled":
        config["file_mounts"].pop("~/.ray/auth_token", None)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        config[key] = [c.replace("RAY_AUTH_MODE=token", f"RAY_AUTH_MODE={auth}") for c in config[key]]
    return config


# ---------------------------------------------------------------- down / status

def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """Processes of the Ray cluster in temp_dir: every Ray process names its temp or session dir in a
    `--flag=<dir>...` argument. Matching that form (not any mention) spares shells that merely quote it."""
    root = str(Path(temp_dir).resolve())
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        for arg in proc.info["cmdline"] or []:
            _, eq, value = arg.partition("=")
            if arg.startswith("--") and eq and (value == root or value.startswith(root + "/")):
                found.append(proc)
                break
    return [p for p in found if p.pid != os.getpid()]


def stop_processes(procs: list[psutil.Process], grace_s: float = 5) -> int:
    """SIGTERM, then SIGKILL what is left after grace_s (gcs_server and raylet can ignore SIGTERM)."""
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def down(args) -> int:
    if state_path(args).is_file() or not cluster_processes(args.temp_dir):
        state = read_state(args)
    else:  # no state but Ray processes (an `up` killed half-way): they go too
        state = {"mode": "single"}
    if state["mode"] == "ssh":
        ray("down", "-y", state["yaml"], auth=state["auth"])
    else:
        print(f"stopped {stop_processes(cluster_processes(args.temp_dir))} Ray processes of {args.temp_dir}")
    state_path(args).unlink(missing_ok=True)
    return 0


def status(args) -> int:
    state = read_state(args)
    if state["mode"] == "ssh":
        ray("exec", state["yaml"], f"export RAY_AUTH_MODE={state['auth']}; ray status && ray list nodes",
            auth=state["auth"])
        return 0
    ray("status", f"--address={state['gcs']}", auth=state["auth"])
    ray("list", "nodes", f"--address={state['dashboard']}", auth=state["auth"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
