"""Ray label generation: determinism across actor counts, resume after a kill, verify, the format."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dd_dist.config import load_config
from dd_dist.errors import UserError
from dd_dist.labels import run_label, verify_labels
from dd_dist.pipeline import train_teacher
from dd_dist.shards import load_soft_labels, read_manifest, read_shard, rebuild_topk

pytestmark = pytest.mark.slow
BASE = ["data.name=synthetic", "model.arch=mlp", "teacher.epochs=2", "teacher.lr=0.05", "teacher.lr_steps=[1]",
        "label.k=16", "label.rows_per_shard=128", "label.batch_size=50"]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher")
    train_teacher(load_config(None, [*BASE, f"run_dir={run}"]))
    return run


def config(run_dir, teacher_dir, *overrides):
    """A run dir that shares the module's teacher."""
    run_dir = Path(run_dir)
    (run_dir / "teacher").mkdir(parents=True, exist_ok=True)
    target = run_dir / "teacher" / "model.pt"
    if not target.exists():
        target.symlink_to(teacher_dir / "teacher" / "model.pt")
    return load_config(None, [*BASE, f"run_dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def good_labels(ray_cluster, teacher_dir, tmp_path_factory):
    cfg = config(tmp_path_factory.mktemp("good"), teacher_dir, "label.actors=2")
    return cfg, run_label(cfg)


def test_one_and_two_actors_write_identical_labels(good_labels, teacher_dir, tmp_path):
    _, two = good_labels
    one = run_label(config(tmp_path, teacher_dir, "label.actors=1", "label.batch_size=7"))
    ids1, p1 = load_soft_labels(one)
    ids2, p2 = load_soft_labels(two)
    assert torch.equal(ids1, torch.arange(512)) and torch.equal(ids1, ids2) and torch.equal(p1, p2)
    assert torch.allclose(p1.sum(1), torch.ones(512), atol=2e-3)


def test_manifest_records_what_the_labels_depend_on(good_labels):
    cfg, out = good_labels
    m = read_manifest(out)
    assert m["k"] == 16 and m["p"] == 0.5 and m["rows"] == 512 and len(m["shards"]) == 4
    assert m["data"]["name"] == "synthetic" and m["storage"]["dtype"] == "float16"
    assert m["augmentation"] == {"zero_p": 0.2, "flip_p": 0.0, "epoch": 0}
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == \
        ["manifest.json"] + [f"train/part-0000{i}.parquet" for i in range(4)]


def test_rerun_of_complete_labels_is_a_no_op_and_other_settings_are_refused(good_labels):
    cfg, out = good_labels
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    run_label(cfg)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(UserError, match="other settings \\(k\\)"):
        run_label(cfg.model_copy(update={"label": cfg.label.model_copy(update={"k": 4})}))


def test_killed_run_resumes_without_recomputing_finished_shards(good_labels, teacher_dir, tmp_path):
    _, reference = good_labels
    args = [*BASE, "label.actors=1", "label.rows_per_shard=32", "label.k=400", "cluster.num_cpus=2", f"run_dir={tmp_path}"]
    config(tmp_path, teacher_dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    job = subprocess.Popen([sys.executable, "-m", "dd_dist", "label", *args], env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "labels"
    deadline = time.time() + 120
    while not list(out.glob("train/part-*.parquet")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and the Ray it started
    job.wait()
    kept = {p: p.stat().st_mtime_ns for p in out.glob("train/part-*.parquet")}
    assert 0 < len(kept) < 16 and not (out / "manifest.json").exists()
    assert (out / ".pending.json").exists()

    resumed = run_label(load_config(None, args))
    for path, mtime in kept.items():
        assert path.stat().st_mtime_ns == mtime  # not recomputed
    assert len(list(out.glob("train/part-*.parquet"))) == 16 and not list(out.glob("train/.*tmp"))
    uninterrupted = run_label(config(tmp_path / "again", teacher_dir, "label.actors=2", "label.rows_per_shard=32",
                                     "label.k=400"))
    assert torch.equal(load_soft_labels(resumed)[1], load_soft_labels(uninterrupted)[1])


def test_verify_passes_on_good_labels(good_labels, teacher_dir):
    cfg, out = good_labels
    report = verify_labels(out, teacher_dir / "teacher" / "model.pt", 200, cfg)
    assert report["rows"] == 200 and report["mean_kl"] <= report["tolerance"]


def copy_labels(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def test_verify_refuses_each_kind_of_bad_labels(good_labels, teacher_dir, tmp_path):
    cfg, out = good_labels
    teacher = teacher_dir / "teacher" / "model.pt"
    other_teacher = config(tmp_path / "t2", teacher_dir, "seed=1", "run_dir=" + str(tmp_path / "t2"))
    (tmp_path / "t2" / "teacher" / "model.pt").unlink()
    train_teacher(other_teacher)
    p_teacher = config(tmp_path / "t3", teacher_dir, "model.p=0.3")
    (tmp_path / "t3" / "teacher" / "model.pt").unlink()
    train_teacher(p_teacher)

    flipped = copy_labels(out, tmp_path / "flipped")
    raw = bytearray((flipped / "train/part-00001.parquet").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (flipped / "train/part-00001.parquet").write_bytes(bytes(raw))
    missing = copy_labels(out, tmp_path / "missing")
    (missing / "train/part-00002.parquet").unlink()

    cases = [
        (out, tmp_path / "t2" / "teacher" / "model.pt", cfg, "another teacher"),
        (out, tmp_path / "t3" / "teacher" / "model.pt", cfg, "p=0.5, the teacher is mlp p=0.3"),
        (flipped, teacher, cfg, "part-00001.parquet is corrupted"),
        (missing, teacher, cfg, "part-00002.parquet listed in the manifest is missing"),
        (out, teacher, load_config(None, [*BASE, "data.train_rows=500"]), "other data"),
    ]
    for labels, ckpt, cfg_, words in cases:
        with pytest.raises(UserError, match=words) as error:
            verify_labels(labels, ckpt, 100, cfg_)
        assert "\n" not in str(error.value)


def test_verify_catches_labels_that_disagree_with_the_teacher(good_labels, teacher_dir, tmp_path):
    """Same manifest, checksums recomputed, but the stored probabilities shuffled between rows."""
    import json

    from dd_dist.files import file_sha256
    from dd_dist.shards import label_table, write_shard

    cfg, out = good_labels
    bad = copy_labels(out, tmp_path / "shuffled")
    manifest = json.loads((bad / "manifest.json").read_text())
    for shard in manifest["shards"]:
        ids, probs = read_shard(bad / shard["file"], 4)
        write_shard(bad / shard["file"], label_table(ids, probs[::-1].copy(), np.zeros(len(ids)), "float16", 0))
        shard["sha256"] = file_sha256(bad / shard["file"])
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="disagree with the teacher"):
        verify_labels(bad, teacher_dir / "teacher" / "model.pt", 200, cfg)


def test_hf_datasets_reads_the_shards_and_storage_options_agree(good_labels, teacher_dir, tmp_path):
    _, out = good_labels
    hf = datasets.load_dataset("parquet", data_dir=str(out), split="train")
    assert len(hf) == 512 and set(hf.column_names) == {"id", "probs", "mc_stderr"}
    assert str(hf.features["probs"].feature.dtype) == "float16"
    _, half = load_soft_labels(out)
    full = load_soft_labels(run_label(config(tmp_path / "f32", teacher_dir, "label.dtype=float32")))[1]
    assert (full - half).abs().max() < 1e-3
    top_all = load_soft_labels(run_label(config(tmp_path / "top4", teacher_dir, "label.dtype=topk", "label.topk=4")))[1]
    assert torch.allclose(top_all, full, atol=1e-7)  # k = number of classes: exact
    top1 = load_soft_labels(run_label(config(tmp_path / "top1", teacher_dir, "label.dtype=topk", "label.topk=1")))[1]
    assert torch.allclose(top1.sum(1), torch.ones(512), atol=1e-5) and torch.equal(top1.argmax(1), full.argmax(1))


def test_rebuild_topk_spreads_the_rest_evenly():
    full = rebuild_topk(np.array([[2, 0]]), np.array([[0.6, 0.2]], np.float32), np.array([0.2], np.float32), 4)
    assert np.allclose(full, [[0.2, 0.1, 0.6, 0.1]])


def test_missing_teacher_is_one_line_and_leaves_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dd_dist", "label", *BASE, f"run_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "checkpoint not found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
