"""Ray label generation: determinism across actors, resume after a kill, verify, the shard format."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dd_dist.config import load_config
from dd_dist.data.splits import load_split
from dd_dist.core.loop import train_teacher
from dd_dist.core.mc import uncertainty
from dd_dist.core.models import load_model
from dd_dist.errors import UserError
from dd_dist.files import file_sha256
from dd_dist.labels.actors import label_rows
from dd_dist.labels.format import (UNCERTAINTY, label_table, load_soft_labels, read_manifest, read_shard,
                                   rebuild_topk, stored_probs, write_manifest, write_shard)
from dd_dist.labels.verify import verify_labels
from dd_dist.stages.label import _check_resume, run_label

pytestmark = pytest.mark.slow
BASE = ["data.name=synthetic", "model.arch=mlp", "teacher.epochs=2", "teacher.lr=0.05", "teacher.lr_steps=[1]",
        "label.k=16", "label.rows_per_shard=128", "label.batch_size=50"]
ROWS = 512  # the synthetic training split


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
    """A config for run_dir, whose teacher is the module's teacher."""
    target = Path(run_dir) / "teacher" / "model.pt"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(teacher_dir / "teacher" / "model.pt")
    return load_config(None, [*BASE, f"run_dir={run_dir}", *overrides])


def dd_dist_cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "dd_dist", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def good_labels(ray_cluster, teacher_dir, tmp_path_factory):
    cfg = config(tmp_path_factory.mktemp("good"), teacher_dir, "label.actors=2")
    return cfg, run_label(cfg)


def test_labels_do_not_depend_on_actors_or_batches_and_equal_the_in_process_mc(good_labels, teacher_dir, tmp_path):
    cfg, two = good_labels
    one = run_label(config(tmp_path, teacher_dir, "label.actors=1", "label.batch_size=7"))
    ids1, p1 = load_soft_labels(one)
    ids2, p2 = load_soft_labels(two)
    assert torch.equal(ids1, torch.arange(ROWS)) and torch.equal(ids1, ids2) and torch.equal(p1, p2)
    teacher, _ = load_model(teacher_dir / "teacher" / "model.pt")
    x = torch.from_numpy(load_split("synthetic", "train").x)
    ids = torch.tensor([0, 5, 300, 511])
    expected = label_rows(teacher, x[ids], ids, 16, cfg.seed, cfg.data.zero_p, cfg.data.flip_p).probs.numpy()
    assert np.array_equal(p1[ids].numpy(), stored_probs(expected, "float16", 0))
    assert torch.allclose(p1.sum(1), torch.ones(ROWS), atol=2e-3) and p1.std(0).max() > 0.05  # real, varied labels


def test_manifest_records_what_the_labels_depend_on(good_labels, teacher_dir):
    cfg, out = good_labels
    m = read_manifest(out)
    assert m["teacher"]["sha256"] == file_sha256(teacher_dir / "teacher" / "model.pt")
    assert m["teacher"]["spec"]["arch"] == "mlp" and m["p"] == 0.5 and m["k"] == 16 and m["seed"] == 0
    assert m["augmentation"] == {"zero_p": 0.2, "flip_p": 0.0, "epoch": 0}
    assert m["data"] == {"name": "synthetic", "split": "train", "rows": ROWS, "num_classes": 4,
                         "fingerprint": load_split("synthetic", "train").fingerprint, "channels": None, "skipped": 0,
                         "transform": {"resize": None, "center_crop": None, "mean": None, "std": None}}
    assert m["storage"]["dtype"] == "float16" and m["storage"]["compression"] == "zstd" and m["version"]
    assert [s["rows"] for s in m["shards"]] == [128] * 4
    assert all(s["sha256"] == file_sha256(out / s["file"]) for s in m["shards"])
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["manifest.json"] + [f"train/part-0000{i}.parquet" for i in range(4)]
    table = pq.read_table(out / "train" / "part-00001.parquet")
    assert table.column("id").to_pylist() == list(range(128, 256)) and table.schema.field("probs").type.value_type == pa.float16()
    assert (table.column("mc_stderr").to_numpy() > 0).all()


def test_rerun_of_complete_labels_is_a_no_op_and_other_settings_are_refused(good_labels):
    cfg, out = good_labels
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.rglob("*")}
    assert run_label(cfg) == out
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.rglob("*")} == before
    for override, named in [("label.k=4", "(k)"), ("data.train_rows=500", "(data, rows)"), ("seed=3", "(data, seed)")]:
        with pytest.raises(UserError, match=re.escape(f"other settings {named}: choose another run_dir or delete it")):
            run_label(load_config(None, [*BASE, f"run_dir={cfg.run_dir}", override]))
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.rglob("*")} == before


def test_killed_run_resumes_without_recomputing_finished_shards(ray_cluster, teacher_dir, tmp_path):
    # K=400 makes a 32-row shard take about a second, so the kill lands between shards.
    args = [*BASE, "data.train_rows=256", "label.rows_per_shard=32", "label.k=400", "label.actors=1",
            "label.batch_size=32", "cluster.num_cpus=2", f"run_dir={tmp_path}"]
    config(tmp_path, teacher_dir)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = subprocess.Popen([sys.executable, "-m", "dd_dist", "label", *args], env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = tmp_path / "labels" / "train"
    deadline = time.time() + 180
    while not list(shards.glob("part-*.parquet")) and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and the local Ray it started
    job.wait()
    kept = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in shards.glob("part-*.parquet")}
    assert 0 < len(kept) < 8 and not (tmp_path / "labels" / "manifest.json").exists()
    assert all(pq.read_metadata(shards / name).num_rows == 32 for name in kept)  # no half shard under its name

    resumed = run_label(load_config(None, args))
    assert {name: (shards / name).stat().st_mtime_ns for name in kept} == {n: m for n, (m, _) in kept.items()}
    assert {name: (shards / name).stat().st_ino for name in kept} == {n: i for n, (_, i) in kept.items()}
    assert sorted(p.name for p in shards.iterdir()) == [f"part-{i:05d}.parquet" for i in range(8)]  # no temp files
    ids, probs = load_soft_labels(resumed)
    teacher, _ = load_model(teacher_dir / "teacher" / "model.pt")
    x = torch.from_numpy(load_split("synthetic", "train").x)
    uninterrupted = label_rows(teacher, x[:256], torch.arange(256), 400, 0, 0.2, 0.0).probs.numpy()  # what any clean run writes
    assert torch.equal(ids, torch.arange(256)) and np.array_equal(probs.numpy(), stored_probs(uninterrupted, "float16", 0))


def test_verify_passes_on_good_labels_from_the_api_and_the_cli(good_labels, teacher_dir):
    cfg, out = good_labels
    teacher = teacher_dir / "teacher" / "model.pt"
    report = verify_labels(out, teacher, 200, cfg)
    assert report["rows"] == 200 and 0 <= report["mean_kl"] <= report["tolerance"] == 1e-5
    result = dd_dist_cli("verify", str(out), "--teacher", str(teacher), "--rows", "64")  # data named by the manifest
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("labels OK: 64 rows recomputed, mean KL")


def copy_labels(src: Path, dst: Path) -> Path:
    for f in src.rglob("*"):
        if f.is_file():
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / f.relative_to(src)).write_bytes(f.read_bytes())
    return dst


def test_verify_refuses_each_kind_of_bad_labels_in_one_line(good_labels, teacher_dir, tmp_path):
    cfg, out = good_labels
    teacher = teacher_dir / "teacher" / "model.pt"
    other_teacher = train_teacher(load_config(None, [*BASE, "seed=1", f"run_dir={tmp_path / 'seed1'}"]))
    p_teacher = train_teacher(load_config(None, [*BASE, "model.p=0.3", f"run_dir={tmp_path / 'p03'}"]))

    flipped = copy_labels(out, tmp_path / "flipped")
    raw = bytearray((flipped / "train" / "part-00001.parquet").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (flipped / "train" / "part-00001.parquet").write_bytes(bytes(raw))
    missing = copy_labels(out, tmp_path / "missing")
    (missing / "train" / "part-00002.parquet").unlink()
    shuffled = copy_labels(out, tmp_path / "shuffled")  # consistent checksums, but rows swapped
    manifest = json.loads((shuffled / "manifest.json").read_text())
    for shard in manifest["shards"]:
        ids, probs = read_shard(shuffled / shard["file"], 4)
        write_shard(shuffled / shard["file"], label_table(ids, probs[::-1].copy(), np.zeros(len(ids)), "float16", 0))
        shard["sha256"] = file_sha256(shuffled / shard["file"])
    write_manifest(shuffled, manifest)  # a forged manifest, digest and all: only the replay can tell

    cases = [
        (out, other_teacher, cfg, "made by another teacher"),
        (out, p_teacher, cfg, "made with mlp p=0.5, the teacher is mlp p=0.3"),
        (flipped, teacher, cfg, "part-00001.parquet is corrupted"),
        (missing, teacher, cfg, "part-00002.parquet listed in the manifest is missing"),
        (out, teacher, load_config(None, [*BASE, "data.train_rows=500"]), "made from other data"),
        (shuffled, teacher, cfg, "disagree with the teacher: mean KL"),
        (tmp_path / "nowhere", teacher, cfg, "no manifest.json"),
    ]
    for labels, ckpt, cfg_, words in cases:
        with pytest.raises(UserError, match=words) as error:
            verify_labels(labels, ckpt, 100, cfg_)
        assert "\n" not in str(error.value)


def test_hf_datasets_reads_the_shards_and_storage_options_agree(good_labels, teacher_dir, tmp_path):
    _, out = good_labels
    hf = datasets.load_dataset("parquet", data_dir=str(out), split="train")
    assert len(hf) == ROWS and set(hf.column_names) == {"id", "probs", "mc_stderr", *UNCERTAINTY}
    assert str(hf.features["probs"].feature.dtype) == "float16"
    _, half = load_soft_labels(out)
    assert np.allclose(np.asarray(hf.sort("id")["probs"], np.float32), half.numpy())
    teacher, _ = load_model(teacher_dir / "teacher" / "model.pt")
    x = torch.from_numpy(load_split("synthetic", "train").x)
    full = label_rows(teacher, x[:ROWS], torch.arange(ROWS), 16, 0, 0.2, 0.0).probs  # float32 labels
    assert (full - half).abs().max() < 1e-3 and (full - half).abs().max() > 0  # float16 rounding, nothing more
    top = run_label(config(tmp_path / "top4", teacher_dir, "label.dtype=topk", "label.topk=4"))
    assert torch.allclose(load_soft_labels(top)[1], full, atol=1e-7)  # k = number of classes: exact
    assert set(datasets.load_dataset("parquet", data_dir=str(top), split="train").column_names) == {
        "id", "idx", "val", "rest", "mc_stderr", *UNCERTAINTY}
    top1 = torch.from_numpy(stored_probs(full.numpy(), "topk", 1))
    assert torch.allclose(top1.sum(1), torch.ones(ROWS), atol=1e-5) and torch.equal(top1.argmax(1), full.argmax(1))


def test_shards_store_each_rows_mc_uncertainty(good_labels, teacher_dir):
    cfg, out = good_labels
    assert read_manifest(out)["uncertainty"] == ["entropy", "expected_entropy", "mutual_info"]
    teacher, _ = load_model(teacher_dir / "teacher" / "model.pt")
    x = torch.from_numpy(load_split("synthetic", "train").x)
    estimate = label_rows(teacher, x[:ROWS], torch.arange(ROWS), 16, cfg.seed, cfg.data.zero_p, cfg.data.flip_p)
    expected = uncertainty(estimate.probs, estimate.expected_entropy)
    table = pq.read_table(out / "train").sort_by("id")
    for name in UNCERTAINTY:
        assert table.schema.field(name).type == pa.float32()
        assert np.allclose(table.column(name).to_numpy(), expected[name].numpy(), atol=1e-6), name
    mi = table.column("mutual_info").to_numpy()
    assert (mi >= 0).all() and mi.max() > 0.01 and np.allclose(
        mi, np.maximum(table.column("entropy").to_numpy() - table.column("expected_entropy").to_numpy(), 0), atol=1e-6)


def test_labels_without_uncertainty_columns_and_their_resume(ray_cluster, teacher_dir, tmp_path):
    """label.uncertainty=false writes the columns of labels from before they existed; such a directory is
    kept as it is, and the default config refuses it in one line that says how to keep it."""
    plain = run_label(config(tmp_path, teacher_dir, "label.uncertainty=false"))
    assert "uncertainty" not in read_manifest(plain)
    assert set(pq.read_schema(plain / "train" / "part-00000.parquet").names) == {"id", "probs", "mc_stderr"}
    assert verify_labels(plain, teacher_dir / "teacher" / "model.pt", 64, config(tmp_path, teacher_dir))["rows"] == 64
    with pytest.raises(UserError, match=re.escape("(uncertainty): labels without the uncertainty columns: "
                                                  "label.uncertainty=false keeps them, or choose another run_dir")):
        run_label(config(tmp_path, teacher_dir))


def test_bf16_labels_are_recorded_replayed_and_close_to_fp32(good_labels, teacher_dir, tmp_path):
    cfg, fp32 = good_labels
    bf16 = run_label(config(tmp_path, teacher_dir, "label.precision=bf16"))
    assert read_manifest(bf16)["precision"] == "bf16" and read_manifest(fp32)["precision"] == "fp32"
    assert verify_labels(bf16, teacher_dir / "teacher" / "model.pt", 200, cfg)["rows"] == 200
    stored = (load_soft_labels(fp32)[1].double(), load_soft_labels(bf16)[1].double())
    p, q = (t / t.sum(1, keepdim=True) for t in stored)  # float16 rows sum to 1 only up to rounding
    assert (torch.xlogy(p, p) - p * q.log()).sum(1).mean() < 1e-3 and not torch.equal(p, q)  # rounded layers only
    with pytest.raises(UserError, match=r"other settings \(precision\)"):  # no resume across precisions
        run_label(config(tmp_path, teacher_dir))


def test_verify_replays_the_uncertainty_columns(good_labels, teacher_dir, tmp_path):
    cfg, out = good_labels
    forged = copy_labels(out, tmp_path / "forged")  # probabilities intact, mutual information swapped between rows
    manifest = json.loads((forged / "manifest.json").read_text())
    for shard in manifest["shards"]:
        path = forged / shard["file"]
        table = pq.read_table(path)
        mi = table.column("mutual_info").to_numpy()[::-1].copy()
        write_shard(path, table.set_column(table.column_names.index("mutual_info"), "mutual_info", pa.array(mi)))
        shard["sha256"] = file_sha256(path)
    write_manifest(forged, manifest)
    with pytest.raises(UserError, match=r"stored mutual_info differs from the replay by up to [0-9.e-]+ nats") as error:
        verify_labels(forged, teacher_dir / "teacher" / "model.pt", 200, cfg)
    assert "\n" not in str(error.value)


def test_an_unfinished_run_of_another_scheme_is_not_resumed_with_the_plain_mean(good_labels, tmp_path):
    """A setting absent at its default (the plain K-mask mean has no "scheme") still differs from a run that had it."""
    cfg, out = good_labels
    settings = read_manifest(out)
    pending = {key: settings[key] for key in settings if key not in ("shards", "version", "created", "digest")}
    (tmp_path / ".pending.json").write_text(json.dumps({**pending, "scheme": {"antithetic": True}}))
    with pytest.raises(UserError, match=re.escape("other settings (scheme): choose another run_dir")):
        _check_resume(tmp_path, pending)


def test_rebuild_topk_spreads_the_rest_evenly():
    full = rebuild_topk(np.array([[2, 0]]), np.array([[0.6, 0.2]], np.float32), np.array([0.2], np.float32), 4)
    assert np.allclose(full, [[0.2, 0.1, 0.6, 0.1]])


def test_more_actors_than_a_local_ray_holds_fail_at_once_and_leave_nothing(ray_cluster, teacher_dir, tmp_path):
    """The module's local Ray has 4 CPUs: 64 actors of 0.5 CPU could never start; no 600 s wait for them."""
    cfg = config(tmp_path / "run", teacher_dir, "label.actors=64")
    began = time.monotonic()
    with pytest.raises(UserError, match=r"label.actors=64 need 32 CPUs, but this local Ray has 4 CPUs and 0 GPUs "
                                        r"and cannot grow") as error:
        run_label(cfg)
    assert time.monotonic() - began < 30 and "\n" not in str(error.value)
    assert not (tmp_path / "run" / "labels").exists()


def test_bad_config_or_missing_teacher_is_one_line_and_leaves_nothing(tmp_path, teacher_dir):
    for args, words in [([f"run_dir={tmp_path / 'run'}"], "checkpoint not found"),
                        (["label.k=0", f"run_dir={tmp_path / 'run'}"], "'label.k'")]:
        result = dd_dist_cli("label", *BASE, *args)
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        assert result.returncode == 2 and len(errors) == 1 and words in errors[0], result.stderr
        assert errors[0].startswith("dd-dist label: error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="the config says lenet with p=0.5"):
        run_label(config(tmp_path / "arch", teacher_dir, "model.arch=lenet"))
    assert not (tmp_path / "arch" / "labels").exists()
