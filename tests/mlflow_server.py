"""A real `mlflow server` on a free loopback port with its own SQLite store and artifact folder,
shared by the tracking and reliability tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


# No job runner: its 7 huey processes serve GenAI features dd-dist does not use, cost CPU beside the
# tests, and take ~15 s to stop once they have run a while.
SERVER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(root: Path) -> dict:
    """Starts the server in its own process group (uvicorn and its job runner stop, freeze and
    resume as one); returns {url, root, proc, stop}. Call wait_until_serving before using it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/store.db",
         "--artifacts-destination", str(root / "artifacts")],
        cwd=root, env={**os.environ, **SERVER_ENV}, stdout=open(root / "server.log", "w"),
        stderr=subprocess.STDOUT, start_new_session=True)
    return {"url": f"http://127.0.0.1:{port}", "root": root, "proc": proc, "stop": lambda: stop(proc)}


def wait_until_serving(server: dict) -> None:
    """Until the tracking API answers: /health answers first, while the app still warms up for a while."""
    deadline = time.monotonic() + 240  # ≈5 s idle, much longer on a loaded machine
    while True:
        try:
            url = f"{server['url']}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
            if urllib.request.urlopen(url, timeout=5).status == 200:
                return
        except OSError:
            pass
        assert server["proc"].poll() is None and time.monotonic() < deadline, \
            (server["root"] / "server.log").read_text()[-2000:]
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGCONT)  # a frozen server must run to handle SIGTERM
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
