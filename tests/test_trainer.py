"""DeepSpeed on Ray Train (dd_dist/trainer.py): real local Ray, real DeepSpeed engines on CPU.

One teacher run (killed once mid-run), one label directory and three student runs are shared by
the tests of this module; each run takes ~30 s on 2 busy cores.
"""
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import torch
from scipy.stats import spearmanr

from dd_dist.config import load_config
from dd_dist.data.splits import run_split
from dd_dist.core.heads import FORM
from dd_dist.core.mc import soft_target_kl, standard_probs
from dd_dist.core.models import load_model
from dd_dist.errors import UserError
from dd_dist.labels.format import load_soft_labels, write_manifest
from dd_dist.core.tasks import StudentTask, TeacherTask
from dd_dist.layout import RunDir
from dd_dist.train.driver import checked_labels, train
from ray_logs import worker_stderr

EPOCHS = 6


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from dd_dist.infra.cluster import LOCAL_ENV

    # The controller polls workers for reports every 0.5 s in this suite (conftest); faster, so that the
    # kill below lands right after epoch 2's checkpoint is registered, well before the run ends.
    poll = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {**LOCAL_ENV, **poll, "DS_ACCELERATOR": "cpu"}})
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trainer")


def config(run_dir: Path, *overrides: str):
    """A 4-class 8x8 synthetic task (512 training rows) and the 800-800 MLP with dropout 0.5."""
    return load_config(None, [
        "data.name=synthetic", "model.arch=mlp", "model.p=0.5", f"run_dir={run_dir}",
        f"cluster.storage_path={run_dir / 'ray_results'}", "cluster.num_workers=2", "cluster.max_failures=2",
        f"teacher.epochs={EPOCHS}", "teacher.lr=0.05", "teacher.lr_steps=[4]", "teacher.batch_size=16",
        "distill.epochs=3", "distill.lr=0.01", "distill.lr_steps=[2]", "distill.batch_size=32",
        "label.k=16", "label.actors=1", "label.rows_per_shard=256", "label.dtype=float32", *overrides])


def registered_epoch(storage: Path) -> int:
    """The epoch of the latest checkpoint Ray Train's controller has registered (0 if none yet)."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        except (OSError, ValueError, KeyError):  # being rewritten: look again
            return 0
        return latest["metrics"]["epoch"] if latest else 0
    return 0


def kill_a_worker_once(storage: Path, after_epoch: int) -> dict:
    """In a background thread: SIGKILL one Ray Train worker of this test's Ray as soon as the
    checkpoint of `after_epoch` is registered (reported is not enough: the controller collects
    reports when it polls the workers, and a report still queued in a dead worker is lost)."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    killed = {}

    def watch():
        deadline = time.time() + 300
        while time.time() < deadline and registered_epoch(storage) < after_epoch:
            time.sleep(0.02)
        workers = [p for p in psutil.Process(raylet).children(recursive=True)
                   if "RayTrainWorker" in " ".join(p.cmdline())]
        if workers:
            killed["pid"], killed["after_epoch"] = workers[-1].pid, registered_epoch(storage)
            os.kill(killed["pid"], signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()
    return killed


@pytest.fixture(scope="module")
def teacher_run(ray_local, run_dir):
    """The teacher, 2 workers with ZeRO-1; one worker is killed once epoch 2's checkpoint is registered."""
    cfg = config(run_dir, "cluster.deepspeed=configs/deepspeed/zero1.json")
    killed = kill_a_worker_once(run_dir / "ray_results", after_epoch=2)
    path, history = train(cfg, TeacherTask)
    return cfg, path, history, killed


@pytest.fixture(scope="module")
def labels(teacher_run):
    from dd_dist.stages.label import run_label

    cfg = teacher_run[0]
    return run_label(cfg)


@pytest.fixture(scope="module")
def offline_runs(labels, run_dir):
    """The offline student with ZeRO-2 on 2 workers and on 1, same global batch and seed, student dropout off."""
    runs = {}
    for workers in (2, 1):
        cfg = config(run_dir, "model.p=0", "distill.init=teacher", "cluster.deepspeed=configs/deepspeed/zero2.json",
                     f"cluster.num_workers={workers}")
        path, history = train(cfg, StudentTask)
        runs[workers] = (load_model(path)[0], history)
    return runs


def augmented_inputs_and_labels(cfg, labels_dir):
    """The augmented training view the labels were made on, and the stored MC labels (K=16)."""
    from dd_dist.core.augment import augment

    split = run_split(cfg, "train")
    ids, probs = load_soft_labels(labels_dir)
    return augment(torch.from_numpy(split.x)[ids], ids, cfg.seed, 0, cfg.data.zero_p, cfg.data.flip_p), probs


def kl_to(model, inputs, target_probs) -> float:
    probs = standard_probs(model, inputs)
    return soft_target_kl(torch.log(probs.clamp_min(1e-12)), target_probs).item()


@pytest.mark.slow
def test_killed_worker_resumes_from_the_last_checkpoint(teacher_run):
    cfg, path, history, killed = teacher_run
    assert killed.get("pid"), "no training worker was found to kill"
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))  # every epoch once
    restart = max(row["resumed_from"] for row in history)  # the epoch of the checkpoint it resumed from
    assert 2 <= killed["after_epoch"] <= restart < EPOCHS
    # Epochs up to the checkpoint come from the first worker group, the rest from the restarted
    # one, which began at the checkpoint's epoch, not at epoch 0.
    assert [row["resumed_from"] for row in history] == [0] * restart + [restart] * (EPOCHS - restart)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]  # it kept learning after the restart
    assert json.loads((path.parent / "history.json").read_text()) == {"stage": "teacher", "epochs": history}
    assert [round(row["lr"], 6) for row in history] == [0.05] * 4 + [0.005] * 2  # the schedule survived


@pytest.mark.slow
def test_export_loads_weights_only_and_predicts_like_the_engine(teacher_run, run_dir):
    cfg, path, history, _ = teacher_run
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["data_fingerprint"] == run_split(cfg, "train").fingerprint
    assert checkpoint["final_loss"] == pytest.approx(history[-1]["loss"])
    exported, spec = load_model(path)
    # The engine's own weights, as DeepSpeed saved them in the final checkpoint.
    final = next((run_dir / "ray_results").glob(f"*-teacher-*/epoch-{EPOCHS:04d}"))
    engine_state = torch.load(final / "ds" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    engine_model, _ = load_model(path)
    engine_model.load_state_dict(engine_state)
    x = torch.from_numpy(run_split(cfg, "train").x[:64])
    assert torch.equal(standard_probs(exported, x), standard_probs(engine_model, x))
    assert spec["arch"] == "mlp" and spec["p"] == 0.5


@pytest.mark.slow
def test_two_zero2_workers_learn_like_one(offline_runs, labels, teacher_run):
    """Two workers split the stream (other batches than one worker's, same global batch size): every row
    once per epoch, and the same fit to the MC labels within the noise of the order."""
    (model2, hist2), (model1, hist1) = offline_runs[2], offline_runs[1]
    assert [r["world"] for r in hist2] == [2] * 3 and [r["world"] for r in hist1] == [1] * 3
    assert [r["rows"] for r in hist2] == [r["rows"] for r in hist1] == [512] * 3
    losses2, losses1 = [r["loss"] for r in hist2], [r["loss"] for r in hist1]
    assert losses2[-1] < losses2[0] and losses1[-1] < losses1[0]
    np.testing.assert_allclose(losses2, losses1, rtol=0.1)
    inputs, mc = augmented_inputs_and_labels(teacher_run[0], labels)
    assert kl_to(model2, inputs, mc) == pytest.approx(kl_to(model1, inputs, mc), rel=0.1)


def test_zero2_workers_do_not_repeat_a_warning_every_step(offline_runs):
    assert "all_gather_into_tensor` is deprecated" not in worker_stderr()


@pytest.mark.slow
def test_offline_and_online_distillation_lower_the_kl_to_the_mc_teacher(teacher_run, labels, offline_runs, run_dir,
                                                                       monkeypatch):
    cfg = teacher_run[0]
    inputs, mc = augmented_inputs_and_labels(cfg, labels)
    before = kl_to(load_model(teacher_run[1])[0], inputs, mc)  # the students start as the teacher
    offline = kl_to(offline_runs[2][0], inputs, mc)
    # run_dir relative to this directory, as in configs/demo.yaml: Ray Train's workers start elsewhere.
    monkeypatch.chdir(run_dir.parent)
    online_cfg = config(Path(run_dir.name), "distill.mode=online", "distill.init=teacher",
                        "cluster.deepspeed=configs/deepspeed/zero2.json")
    path, history = train(online_cfg, StudentTask)
    online = kl_to(load_model(path)[0], inputs, mc)
    print(f"KL(MC teacher || student): teacher init {before:.4f}, offline {offline:.4f}, online {online:.4f}")
    assert offline < 0.8 * before
    assert online < 0.9 * before  # one mask per step: noisier targets, a smaller gain in 3 epochs


@pytest.mark.slow
@pytest.mark.parametrize("override, cause", [
    ("data.zero_p=0.1", "augmentation zero_p=0.2"),
    ("data.train_rows=256", "labels were made from other data"),
])
def test_mismatched_labels_are_refused_before_ray_train_starts(labels, run_dir, override, cause):
    storage = run_dir / "ray_results"
    runs_before = sorted(storage.iterdir())
    with pytest.raises(UserError, match=cause) as error:
        train(config(run_dir, override), StudentTask)
    assert "\n" not in str(error.value)
    assert sorted(storage.iterdir()) == runs_before  # no Ray Train run was started


@pytest.mark.parametrize("override, cause", [
    ("teacher.batch_size=15", "batch size 15 must be divisible by cluster.num_workers=2"),
    ("cluster.deepspeed=configs/deepspeed/zero2_bf16_gpu.json", "enables bf16, which needs GPUs"),
    ("cluster.deepspeed=no/such.json", "DeepSpeed config not found"),
    ("teacher.optimizer=deepspeed", "needs an 'optimizer' block"),
])
def test_bad_settings_are_one_line_errors(tmp_path, override, cause):
    with pytest.raises(UserError, match=cause) as error:
        train(config(tmp_path, override), TeacherTask)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "ray_results").exists()


STEP_FOR_STEP = """
import copy, json, os, sys
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
import numpy as np, torch, torch.distributed as dist
import torch.nn.functional as F
from dd_dist.config import load_config
from dd_dist.data.splits import run_split
from dd_dist.core.loop import epoch_batches, make_optimizer
from dd_dist.core.tasks import build_for, teacher_batches
from dd_dist.train.worker import _engine

dist.init_process_group("gloo", rank=0, world_size=1)
cfg = load_config(None, ["data.name=synthetic", "model.arch=mlp", "teacher.lr=0.05", "teacher.batch_size=16"])
split = run_split(cfg, "train")
torch.manual_seed(0)
plain, _ = build_for(cfg, split)
engine, _ = _engine(copy.deepcopy(plain), cfg.teacher, json.load(open(sys.argv[2])), 1)
optimizer, batch, norms, gaps = make_optimizer(plain.parameters(), cfg.teacher), teacher_batches(split), [], []
plain.train(); engine.train()
for step, ids in enumerate(epoch_batches(np.arange(len(split)), 16, 0, 0)):
    x, y = batch(ids, 0, step)
    torch.manual_seed(step)  # the same dropout masks in both
    loss = F.cross_entropy(plain(x), y)
    optimizer.zero_grad(); loss.backward()
    norms.append(torch.cat([p.grad.flatten() for p in plain.parameters()]).norm().item())
    optimizer.step()
    torch.manual_seed(step)
    engine.backward(F.cross_entropy(engine(x), y)); engine.step()
    gaps.append(max((a - b).abs().max().item() for a, b in zip(plain.parameters(), engine.module.parameters())))
print(json.dumps({"max_grad_norm": max(norms), "max_gap": max(gaps), "steps": len(gaps)}))
"""


def test_the_deepspeed_engine_takes_the_plain_loops_steps(tmp_path):
    """Same init, batches and masks: DeepSpeed's SGD steps equal the plain loop's, also when the gradient
    norm exceeds 1 (DeepSpeed clips at 1.0 by default, which once made the DeepSpeed teacher lag)."""
    import subprocess
    import sys

    from mlflow_server import free_port

    script = tmp_path / "step_for_step.py"
    script.write_text(STEP_FOR_STEP)
    done = subprocess.run([sys.executable, str(script), str(free_port()), "configs/deepspeed/zero2.json"],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == 32 and result["max_grad_norm"] > 1  # clipping at 1 would have shown
    assert result["max_gap"] < 1e-5, result


@pytest.mark.slow
def test_a_student_with_an_uncertainty_head_trains_on_deepspeed(labels, run_dir):
    # lr 0.01: at 0.05 the head's ReLUs died on some row orders (a constant head; its loss stayed at 3.7)
    cfg = config(run_dir, "distill.uncertainty=true", "cluster.num_workers=1", "distill.epochs=10",
                 "distill.lr=0.01", "distill.lr_steps=[8]")
    path, history = train(cfg, StudentTask)
    model, spec = load_model(path)  # the export records the head and loads with weights_only=True
    assert spec["uncertainty_head"] == {"hidden": 32, "form": FORM} and history[-1]["loss"] < history[0]["loss"]
    inputs, _ = augmented_inputs_and_labels(cfg, labels)
    stored = pq.read_table(labels / "train").sort_by("id").column("mutual_info").to_numpy()
    with torch.no_grad():
        head = model(inputs, uncertainty=True)[1]
    rho = spearmanr(head.numpy(), stored).statistic
    assert rho > 0.5, rho  # it learned the stored mutual information's ranking (0.87 when written)


@pytest.mark.slow
def test_an_uncertainty_head_needs_labels_with_the_mutual_info_column(labels, tmp_path):
    cfg = config(tmp_path, "distill.uncertainty=true")
    shutil.copytree(labels, RunDir(cfg).labels)
    manifest = json.loads((RunDir(cfg).labels / "manifest.json").read_text())
    del manifest["uncertainty"], manifest["digest"]
    write_manifest(RunDir(cfg).labels, manifest)  # labels made with label.uncertainty=false
    with pytest.raises(UserError, match="distill.uncertainty needs labels with the mutual_info column") as error:
        checked_labels(cfg, run_split(cfg, "train"))
    assert "\n" not in str(error.value)
