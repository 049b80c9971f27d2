"""Faults survived and nothing lost: a label actor killed mid-run, shards read while they are being
written, corrupted or hand-edited labels refused by verify and distill, an MLflow server that stops
answering during training, a full disk under labels and checkpoints; and the security checks that
need a live Ray (what it listens on) or a tracked run (no secret stored).

One local Ray, started the way the product starts it (cluster.ray_session), serves the module;
every process of it carries a fake AWS key in its environment, which must never reach a store.
Driver kills, training-worker kills and the launch YAMLs are tested in test_labels.py,
test_trainer.py and test_cluster.py (counted in benchmarks/reliability_report.py).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import mlflow_server as serving
from ray_logs import worker_stderr
from dd_dist.cli import main as cli_main
from dd_dist.config import load_config
from dd_dist.data.splits import load_split
from dd_dist.core.loop import train_teacher
from dd_dist.core.models import load_model, save_model
from dd_dist.errors import UserError
from dd_dist.files import file_sha256
from dd_dist.infra.cluster import ray_session
from dd_dist.labels.actors import label_rows
from dd_dist.labels.format import load_soft_labels, stored_probs, write_manifest
from dd_dist.stages.label import run_label
from dd_dist.stages import teacher as teacher_stage
from test_bad_input import Call, Payload, assert_refused, run_cli_calls

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
ROWS, SHARD_ROWS, K = 256, 32, 400  # 8 shards; K=400 makes a shard take about a second
BASE = ["data.name=synthetic", "model.arch=mlp", f"data.train_rows={ROWS}", "teacher.epochs=2", "teacher.lr=0.05",
        "teacher.lr_steps=[1]", f"label.k={K}", f"label.rows_per_shard={SHARD_ROWS}", f"label.batch_size={SHARD_ROWS}",
        "label.actors=2"]
SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAFAKE7Q2W9E4R1T6Y", "AWS_SECRET_ACCESS_KEY": "fake-secret-reliability-5c1e8a"}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on loopback with its own SQLite store; started first, ready when first used."""
    info = serving.start(tmp_path_factory.mktemp("mlflow-server"))
    yield info
    info["stop"]()


@pytest.fixture(scope="module")
def ray_with_secrets(mlflow_server):
    """The product's own local Ray; the fake keys are in the environment of the driver and every worker."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in SECRETS.items():
            env.setenv(key, value)
        with ray_session(load_config(None, ["cluster.num_cpus=4"]).cluster):
            yield


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("teacher")
    return train_teacher(load_config(None, [*BASE, f"run_dir={run}"]))


def config(run_dir: Path, teacher: Path, *overrides: str):
    target = run_dir / "teacher" / "model.pt"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(teacher, target)
    return load_config(None, [*BASE, f"run_dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def reference_labels(teacher_file) -> np.ndarray:
    """What an uninterrupted run stores: the in-process MC labels of every row, in float16."""
    teacher, _ = load_model(teacher_file)
    x = torch.from_numpy(load_split("synthetic", "train", rows=ROWS).x)
    probs = label_rows(teacher, x[:ROWS], torch.arange(ROWS), K, 0, 0.2, 0.0).probs.numpy()
    return stored_probs(probs, "float16", 0)


def shard_processes() -> list[psutil.Process]:
    """The label actors of this test's Ray (process title ray::MapWorker(MapBatches(ShardLabeller)))."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    found = []
    for p in psutil.Process(raylet).children(recursive=True):
        try:
            if "ShardLabeller" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def check_visible_shards(shards: Path) -> int:
    """Read every part-*.parquet now visible in full: each must hold its whole id range. Returns how many."""
    seen = 0
    for path in shards.glob("part-*.parquet"):
        s = int(path.stem.split("-")[1])
        ids = pq.read_table(path).column("id").to_numpy()  # a half-written file would not even parse
        assert np.array_equal(ids, np.arange(s * SHARD_ROWS, (s + 1) * SHARD_ROWS)), path.name
        seen += 1
    return seen


@contextmanager
def in_background(fn):
    """Run fn in a thread; yields a dict that holds its result or error once the block ends."""
    out = {}

    def run():
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001  handed to the test
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    out["thread"] = thread
    yield out
    thread.join(timeout=600)


@pytest.fixture(scope="module")
def killed_actor_run(ray_with_secrets, teacher_file, tmp_path_factory):
    """run_label with 2 actors; one actor is SIGKILLed once the first shard is on disk. Meanwhile
    every visible shard is read in full, again and again."""
    cfg = config(tmp_path_factory.mktemp("killed-actor"), teacher_file)
    shards = Path(cfg.run_dir) / "labels" / "train"
    info = {"reads": 0, "pids": set(), "bad_reads": []}
    with in_background(lambda: run_label(cfg)) as job:
        while job["thread"].is_alive():
            actors = shard_processes()
            info["pids"].update(p.pid for p in actors)
            try:
                info["reads"] += check_visible_shards(shards) if shards.is_dir() else 0
            except Exception as e:  # noqa: BLE001  a half shard under its final name
                info["bad_reads"].append(repr(e))
            if "killed" not in info and actors and list(shards.glob("part-*.parquet")):
                info["shards_at_kill"] = len(list(shards.glob("part-*.parquet")))
                info["killed"] = actors[0].pid
                os.kill(actors[0].pid, signal.SIGKILL)
            time.sleep(0.05)
    return cfg, job, info


def test_label_actor_killed_mid_run_is_replaced_and_the_labels_equal_an_uninterrupted_run(
        killed_actor_run, reference_labels):
    cfg, job, info = killed_actor_run
    assert "error" not in job, job.get("error")
    assert info.get("killed") and 0 < info["shards_at_kill"] < ROWS // SHARD_ROWS  # killed mid-run
    assert not psutil.pid_exists(info["killed"]) or psutil.Process(info["killed"]).status() == psutil.STATUS_ZOMBIE
    assert len(info["pids"]) >= 3  # two actors, and the one Ray Data started in place of the killed one
    ids, probs = load_soft_labels(job["result"])  # checks the manifest's checksums too
    assert torch.equal(ids, torch.arange(ROWS)) and np.array_equal(probs.numpy(), reference_labels)


def test_no_half_written_shard_is_ever_visible(killed_actor_run):
    _, _, info = killed_actor_run
    assert info["bad_reads"] == [] and info["reads"] > 0


# --- corrupted or hand-edited labels ---------------------------------------------------------

def corrupt(labels: Path, kind: str) -> None:
    """Damage a copy of a good label directory the way `kind` says."""
    shard = labels / "train" / "part-00002.parquet"
    manifest = json.loads((labels / "manifest.json").read_text())
    if kind == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif kind == "bit-flipped-shard":
        raw = bytearray(shard.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        shard.write_bytes(bytes(raw))
    elif kind == "missing-shard":
        shard.unlink()
    elif kind == "manifest-not-json":
        (labels / "manifest.json").write_text(json.dumps(manifest)[:-40])
    elif kind == "manifest-classes-edited":
        manifest["data"]["num_classes"] = 10
    elif kind == "manifest-shard-dropped":
        manifest["shards"].pop(3)
    elif kind == "manifest-k-edited":
        manifest["k"] = 100
    elif kind == "shard-ids-shifted":  # a writer's bug, not a hand edit: checksum and digest written anew
        table = pq.read_table(shard)
        table = table.set_column(0, "id", pa.array(table.column("id").to_numpy() + 1))
        pq.write_table(table, shard)
        manifest["shards"][2]["sha256"] = file_sha256(shard)
        write_manifest(labels, {k: v for k, v in manifest.items() if k != "digest"})
    if kind.startswith("manifest") and kind != "manifest-not-json":
        (labels / "manifest.json").write_text(json.dumps(manifest, indent=2))


CORRUPTIONS = {  # kind -> the cause both verify and distill must name
    "truncated-shard": "part-00002.parquet is corrupted: its sha256 differs",
    "bit-flipped-shard": "part-00002.parquet is corrupted: its sha256 differs",
    "missing-shard": "part-00002.parquet listed in the manifest is missing",
    "manifest-not-json": "manifest.json is not valid JSON",
    "manifest-classes-edited": "manifest.json was edited after it was written",
    "manifest-shard-dropped": "manifest.json was edited after it was written",
    "shard-ids-shifted": "labels and data ids do not match",
}
VERIFY = "verify {run}/labels --teacher {run}/teacher/model.pt --rows 64"
DISTILL = f"distill data.train_rows={ROWS}"  # the BASE of test_bad_input, with the labels' rows
LABEL_CALLS = [
    *(Call(f"verify-{kind}", VERIFY, cause, f"labels:{kind}", base=False) for kind, cause in CORRUPTIONS.items()),
    *(Call(f"distill-{kind}", DISTILL, cause, f"labels:{kind}") for kind, cause in CORRUPTIONS.items()),
    Call("distill-labels-of-other-data", "distill data.train_rows=128", "labels were made from other data",
         "labels:intact"),
    Call("verify-pickle-payload-teacher", "verify {run}/labels --teacher {ws}/evil.pt", "not plain weights",
         "labels:intact", base=False),
]


# K edited by hand: verify replays rows with K=100, but this confident teacher gives (nearly) the same
# probabilities at any K, so only the manifest's digest can tell.
EDITED_K = Call("verify-manifest-k-edited", VERIFY, "manifest.json was edited after it was written",
                "labels:manifest-k-edited", base=False)


@pytest.fixture(scope="module")
def label_call_outcomes(killed_actor_run, tmp_path_factory):
    labels = Path(killed_actor_run[0].run_dir) / "labels"
    ws = tmp_path_factory.mktemp("label-calls")
    torch.save({"spec": {}, "state_dict": {}, "evil": Payload(ws / "PWNED")}, ws / "evil.pt")

    def prepare(run: Path, state: str) -> None:
        if not state:
            return
        shutil.copytree(labels.parent / "teacher", run / "teacher")
        shutil.copytree(labels, run / "labels")
        corrupt(run / "labels", state.removeprefix("labels:"))

    return ws, run_cli_calls([*LABEL_CALLS, EDITED_K], ws, prepare)


@pytest.mark.parametrize("call", LABEL_CALLS, ids=[c.id for c in LABEL_CALLS])
def test_damaged_or_mismatched_labels_are_refused_in_one_line(label_call_outcomes, call):
    ws, outcomes = label_call_outcomes
    assert_refused(outcomes[call.id], call.cause)
    assert not (ws / "PWNED").exists()


def test_verify_refuses_a_hand_edited_k(label_call_outcomes):
    assert_refused(label_call_outcomes[1][EDITED_K.id], EDITED_K.cause)


def test_distill_refuses_a_hand_edited_k(killed_actor_run, tmp_path):
    from dd_dist.data.splits import run_split
    from dd_dist.train.driver import checked_labels

    cfg = killed_actor_run[0]
    run = tmp_path / "run"
    shutil.copytree(Path(cfg.run_dir) / "labels", run / "labels")
    corrupt(run / "labels", "manifest-k-edited")
    edited = load_config(None, [*BASE, f"run_dir={run}"])
    with pytest.raises(UserError, match="manifest.json was edited after it was written"):
        checked_labels(edited, run_split(edited, "train"))


# --- the MLflow server stops answering during training ---------------------------------------

@pytest.fixture(scope="module")
def teacher_through_a_frozen_server(ray_with_secrets, mlflow_server, tmp_path_factory):
    """The teacher stage (DeepSpeed on Ray Train, 2 workers, 4 epochs) tracked by the server, which is
    frozen (SIGSTOP: requests hang, as on a lost network) from the stage's start until epoch 2's
    checkpoint exists, then resumed."""
    serving.wait_until_serving(mlflow_server)
    run_dir = tmp_path_factory.mktemp("frozen-server")
    cfg = load_config(None, [
        "data.name=synthetic", "model.arch=mlp", f"run_dir={run_dir}", "teacher.epochs=4", "teacher.lr=0.05",
        "teacher.lr_steps=[3]", "teacher.batch_size=32", "cluster.num_workers=2", "cluster.deepspeed=configs/deepspeed/zero0.json",
        f"tracking.uri={mlflow_server['url']}", "tracking.experiment=frozen-server", "tracking.http_retries=0",
        "tracking.http_timeout_s=2", "tracking.retry_s=0"])
    artifacts, group = mlflow_server["root"] / "artifacts", mlflow_server["proc"].pid
    events = {}

    def freeze_then_resume():
        deadline = time.monotonic() + 400
        while not list(artifacts.rglob("config.yaml")) and time.monotonic() < deadline:  # the run is set up
            time.sleep(0.05)
        os.killpg(group, signal.SIGSTOP)
        events["frozen"] = time.monotonic()
        while not list((run_dir / "ray_results").glob("*/epoch-0002")) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(group, signal.SIGCONT)
        events["resumed"] = time.monotonic()

    watcher = threading.Thread(target=freeze_then_resume, daemon=True)
    watcher.start()
    try:
        path = teacher_stage.run(cfg)
    finally:
        os.killpg(group, signal.SIGCONT)
    watcher.join(timeout=5)
    return cfg, path, events, worker_stderr()


def test_training_outlives_a_frozen_tracking_server_and_logs_every_epoch_once_it_is_back(
        teacher_through_a_frozen_server, mlflow_server):
    cfg, path, events, stderr = teacher_through_a_frozen_server
    assert events.get("frozen") and events.get("resumed")
    model, spec = load_model(path)  # the model is not lost
    final_loss = torch.load(path, weights_only=True)["final_loss"]
    assert stderr.count("dd-dist: warning: MLflow logging metrics failed") == 1, stderr[-3000:]
    assert "dd-dist: MLflow is reachable again" in stderr
    store = mlflow.MlflowClient(tracking_uri=f"sqlite:///{mlflow_server['root']}/store.db")
    run = store.search_runs([store.get_experiment_by_name("frozen-server").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "teacher"
    history = store.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # every epoch, each once
    assert [m.value for m in history if m.step == 4] == [pytest.approx(final_loss)]
    uploaded = list((mlflow_server["root"] / "artifacts").rglob("model/model.pt"))
    assert len(uploaded) == 1 and file_sha256(uploaded[0]) == file_sha256(path)


def test_a_fit_on_the_local_ray_does_not_flood_the_log(teacher_through_a_frozen_server):
    # The local Ray has no dashboard, so Ray Train's placement-group cleaner cannot reach the state API:
    # unsilenced it warns every ~1.5 s of every fit (infra.worker_setup)
    stderr = teacher_through_a_frozen_server[3]
    assert "Failed to query Ray Train Controller actor state" not in stderr


# --- a full disk -----------------------------------------------------------------------------

@contextmanager
def small_filesystem(folder: Path, size: str):
    """A tmpfs of `size` mounted on folder; skips where mounting is not allowed (unprivileged CI)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here to fill it up: {mounted.stderr.strip()[:200]}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of folder with a filler file until `leave` bytes are free."""
    filler = folder / "filler"
    stat = os.statvfs(folder)
    try:
        filler.write_bytes(b"\0" * max(stat.f_bavail * stat.f_frsize - leave, 0))
    except OSError:  # the last partial block: full is what we wanted
        pass
    return filler


def test_disk_full_while_labelling_is_one_line_keeps_finished_shards_and_resumes(
        killed_actor_run, teacher_file, reference_labels, tmp_path, capfd):
    good = Path(killed_actor_run[0].run_dir) / "labels"
    run = tmp_path / "run"
    cfg = config(run, teacher_file)
    with small_filesystem(run / "labels", "128k") as labels:
        # The previous good state: a run that finished shards 0-3 and was stopped (its settings pending).
        (labels / "train").mkdir()
        for s in range(4):
            shutil.copyfile(good / "train" / f"part-{s:05d}.parquet", labels / "train" / f"part-{s:05d}.parquet")
        shutil.copyfile(good / "manifest.json", labels / ".pending.json")
        kept = {p.name: (file_sha256(p), p.stat().st_ino) for p in (labels / "train").iterdir()}
        filler = fill(labels, leave=4096)  # room for one more small file at most
        capfd.readouterr()

        assert cli_main(["label", *BASE, f"run_dir={run}"]) == 2
        err = capfd.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("dd-dist label: error:")]
        assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err[-3000:]
        assert "no space left on the device while writing" in errors[0] and "Traceback" not in err
        assert not (labels / "manifest.json").exists()
        assert {name: (file_sha256(labels / "train" / name), (labels / "train" / name).stat().st_ino)
                for name in kept} == kept
        visible = check_visible_shards(labels / "train")  # finished shards only, each complete
        assert 4 <= visible < 8

        filler.unlink()  # space freed: the same command finishes the job
        assert run_label(cfg) == labels
        assert {name: (labels / "train" / name).stat().st_ino for name in kept} == {n: i for n, (_, i) in kept.items()}
        ids, probs = load_soft_labels(labels)
        assert torch.equal(ids, torch.arange(ROWS)) and np.array_equal(probs.numpy(), reference_labels)


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(teacher_file, tmp_path):
    model, spec = load_model(teacher_file)
    with small_filesystem(tmp_path / "checkpoints", "8m") as folder:
        target = folder / "model.pt"
        save_model(target, model, spec, {"epoch": 1})
        before = file_sha256(target)
        filler = fill(folder)
        with pytest.raises(UserError, match=f"no space left on the device while writing {target}") as error:
            save_model(target, model, spec, {"epoch": 2})
        assert "\n" not in str(error.value)
        assert file_sha256(target) == before and sorted(os.listdir(folder)) == ["filler", "model.pt"]  # no temp file
        filler.unlink()
        save_model(target, model, spec, {"epoch": 2})
        assert torch.load(target, weights_only=True)["epoch"] == 2


# --- what the services listen on, what the stores hold -----------------------------------------

def session_listeners() -> list[tuple[str, int, str]]:
    """(address, port, process) of every listening TCP socket of this Ray session's processes."""
    import ray

    node = ray._private.worker._global_node
    pids = {os.getpid()}
    for procs in node.all_processes.values():
        for proc in procs:
            pids.add(proc.process.pid)
            pids.update(c.pid for c in psutil.Process(proc.process.pid).children(recursive=True))
    return sorted((c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()) for c in psutil.net_connections("tcp")
                  if c.status == psutil.CONN_LISTEN and c.pid in pids)


def test_the_local_ray_serves_no_dashboard(ray_with_secrets):
    import ray

    listeners = session_listeners()
    assert listeners  # the check sees Ray's sockets at all
    assert not ray._private.worker._global_node.webui_url and 8265 not in [port for _, port, _ in listeners]
    # Ray still runs its dashboard head (without the UI) for internal APIs: bound to loopback should it serve HTTP.
    heads = [" ".join(p.cmdline()) for p in psutil.Process(os.getpid()).children(recursive=True)
             if "dashboard/dashboard.py" in " ".join(p.cmdline())]
    assert heads and all("--host=127.0.0.1" in head for head in heads)


def test_the_local_rays_open_ports_refuse_a_client_without_its_token(ray_with_secrets):
    """Ray 2.60 binds GCS, raylet and worker ports to every interface even with _node_ip_address=127.0.0.1,
    so the CLI starts its local Ray with token auth (cluster.default_auth): a stranger is refused."""
    import ray

    from dd_dist.infra.cluster import default_auth

    exposed = [item for item in session_listeners() if item[0] not in ("127.0.0.1", "::1")]
    gcs = ray.get_runtime_context().gcs_address
    assert exposed and int(gcs.rsplit(":", 1)[1]) in [port for _, port, _ in exposed]  # what the token guards
    # One connection attempt (Ray retries a refused GCS for 20 s by default): the refusal is the answer.
    stranger = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {
        "RAY_AUTH_MODE": "disabled", "RAY_gcs_server_port_wait_time_s": "1"}
    attempt = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{gcs}')"], env=stranger,
                             capture_output=True, text=True, timeout=180)
    assert attempt.returncode != 0 and "InvalidAuthToken" in attempt.stderr

    env = {}
    default_auth(load_config(None, []).cluster, env)
    assert env == {"RAY_AUTH_MODE": "token"}  # the CLI's local Ray
    for chosen, cluster in (({"RAY_AUTH_MODE": "disabled"}, []), ({}, ["cluster.address=10.0.0.1:6379"]),
                            ({"RAY_ADDRESS": "auto"}, [])):
        env = dict(chosen)
        default_auth(load_config(None, cluster).cluster, env)
        assert env == chosen  # the user's choice, or an existing cluster's own mode


def test_the_mlflow_ui_binds_loopback_unless_asked(tmp_path):
    script = REPO / "launch" / "mlflow_ui.sh"
    env = {k: v for k, v in os.environ.items() if k not in ("HOST", "PORT", "STORE")}
    shown = subprocess.run(["bash", str(script)], env={**env, "MLFLOW": "echo"}, capture_output=True, text=True)
    assert shown.returncode == 0 and "ui --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1 --port 5000" \
        in shown.stdout
    asked = subprocess.run(["bash", str(script)], env={**env, "MLFLOW": "echo", "HOST": "0.0.0.0"},
                           capture_output=True, text=True)
    assert "--host 0.0.0.0" in asked.stdout
    launcher = (REPO / "launch" / "cluster.py").read_text()  # `make launch-cluster`: dashboard on loopback
    assert '"--dashboard-host=127.0.0.1"' in launcher and "0.0.0.0" not in launcher


def test_no_secret_reaches_the_store_the_artifacts_or_the_outputs(teacher_through_a_frozen_server, killed_actor_run,
                                                                   mlflow_server):
    import ray

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRETS["AWS_SECRET_ACCESS_KEY"]  # it was there all along
    cfg, *_ = teacher_through_a_frozen_server
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    searched = [mlflow_server["root"] / "store.db", *(mlflow_server["root"] / "artifacts").rglob("*"),
                *Path(cfg.run_dir).rglob("*"), *Path(killed_actor_run[0].run_dir).rglob("*"), *logs.rglob("*")]
    searched = [p for p in searched if p.is_file()]
    assert len(searched) > 20 and any(p.name == "config.yaml" for p in searched)
    for path in searched:
        raw = path.read_bytes()
        for secret in SECRETS.values():
            assert secret.encode() not in raw, path
