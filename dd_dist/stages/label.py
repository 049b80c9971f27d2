"""`dd-dist label`: MC-averaged teacher soft labels, written by the Ray label actors (dd_dist.labels.actors).

The label directory resumes: shards already on disk are kept (they are renamed into place only once
complete), the settings of an unfinished run are kept in it so that a resume cannot mix settings, and
the manifest is written last, so a directory with a manifest is complete.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import time
from pathlib import Path

import pyarrow.parquet as pq

import dd_dist
from dd_dist.config import Config
from dd_dist.core.mc_schemes import check_model
from dd_dist.core.models import check_fits, load_model
from dd_dist.core.precision import check_precision
from dd_dist.data.splits import Split
from dd_dist.errors import UserError
from dd_dist.files import file_sha256, write_json
from dd_dist.infra.cluster import check_resources, open_split, ray_session
from dd_dist.infra.tracking import Tracker
from dd_dist.labels.actors import label_shards
from dd_dist.labels.format import (FORMAT, MANIFEST, PENDING, SHARDS, UNCERTAINTY, read_manifest, shard_name,
                                   write_manifest)
from dd_dist.layout import RunDir


def run(cfg: Config, parent: str | None = None) -> Path:
    """Write (or complete) run_dir/labels under an MLflow "label" run; returns the directory."""
    run = RunDir(cfg)
    run.check_writable(run.labels)
    tracker = Tracker(cfg)
    with tracker.stage_run("label", parent) as run_id:
        began = time.perf_counter()
        out = run_label(cfg)
        tracker.log_metrics({"label_seconds": time.perf_counter() - began}, run_id=run_id)
        tracker.log_artifact(out / MANIFEST, run_id=run_id)
    return out


OPTIONAL = ("scheme", "uncertainty")  # label settings absent at their default (as in labels from before them)


def label_settings(cfg: Config, teacher_file: Path, spec: dict, split: Split) -> dict:
    """Everything the labels depend on; a resume must find exactly these."""
    lab, scheme = cfg.label, cfg.label.scheme()
    return {
        "format": FORMAT,
        "teacher": {"sha256": file_sha256(teacher_file), "spec": spec},
        "p": spec["p"], "k": lab.k, "seed": cfg.seed, "precision": lab.precision,
        # the plain K-mask mean has no entry (so labels from before schemes existed still resume)
        **({} if scheme.plain else {"scheme": scheme.record()}),
        # the columns of each row's MC uncertainty; none in labels from before they existed
        **({"uncertainty": list(UNCERTAINTY)} if lab.uncertainty else {}),
        "augmentation": {"zero_p": cfg.data.zero_p, "flip_p": cfg.data.flip_p, "epoch": 0},
        "data": {"name": split.name, "split": split.split, "fingerprint": split.fingerprint,
                 "rows": len(split), "num_classes": split.num_classes, "transform": cfg.data.transform(),
                 "channels": cfg.data.channels, "skipped": split.skipped},
        "storage": {"dtype": lab.dtype, "topk": lab.topk if lab.dtype == "topk" else None, "compression": "zstd",
                    "rows_per_shard": lab.rows_per_shard},
        "rows": len(split),
    }


def finished_shards(out: Path, n_shards: int, rows_per_shard: int, n_rows: int) -> set[int]:
    """Shards already on disk with a readable footer and the right row count. Shards are renamed
    into place only once complete, so this is a check against foreign or damaged files."""
    done = set()
    for s in range(n_shards):
        path = out / shard_name(s)
        expected = min(rows_per_shard, n_rows - s * rows_per_shard)
        try:
            if path.is_file() and pq.read_metadata(path).num_rows == expected:
                done.add(s)
        except Exception:  # a foreign or damaged file: relabel that shard
            pass
    return done


def _check_resume(out: Path, settings: dict) -> bool:
    """True when `out` already holds these labels complete; refuses a directory with other settings."""
    for name in (MANIFEST, PENDING):
        path = out / name
        if path.is_file():
            previous = read_manifest(out) if name == MANIFEST else json.loads(path.read_text())
            # an entry absent at its default is compared too, where only one side has it
            previous = {key: previous.get(key) for key in {*settings, *OPTIONAL}}
            if previous != {**dict.fromkeys(OPTIONAL), **settings}:
                changed = sorted(key for key in previous if previous[key] != settings.get(key))
                older = changed == ["uncertainty"] and previous["uncertainty"] is None
                raise UserError(f"{out} holds labels made with other settings ({', '.join(changed)}): "
                                + ("labels without the uncertainty columns: label.uncertainty=false keeps them, or "
                                   if older else "") + "choose another run_dir or delete it")
            if name == MANIFEST:
                return True
    return False


def run_label(cfg: Config) -> Path:
    """Write (or complete) run_dir/labels from run_dir/teacher/model.pt; returns the directory."""
    run = RunDir(cfg)
    out, teacher_file = run.labels, run.teacher
    teacher, spec = load_model(teacher_file)
    split = open_split(cfg, "train")
    check_fits(spec, split, f"teacher {teacher_file}")
    if spec["arch"] != cfg.model.arch or spec["p"] != cfg.model.p:
        raise UserError(f"teacher {teacher_file} is {spec['arch']} with p={spec['p']}, "
                        f"the config says {cfg.model.arch} with p={cfg.model.p}")
    if cfg.label.control_variate:
        try:
            check_model(teacher, cfg.label.scheme())
        except ValueError as e:
            raise UserError(f"label.control_variate: {e}") from None
    if not cfg.cluster.use_gpu:  # a GPU actor checks its own device
        check_precision(cfg.label.precision, "cpu", "label.precision")
    settings = label_settings(cfg, teacher_file, spec, split)
    if _check_resume(out, settings):
        print(f"labels in {out} are complete and match the config: nothing to do")
        return out
    rows_per_shard, n = cfg.label.rows_per_shard, len(split)
    n_shards = -(-n // rows_per_shard)
    done = finished_shards(out, n_shards, rows_per_shard, n)
    todo = [s for s in range(n_shards) if s not in done]
    with ray_session(cfg.cluster) if todo else contextlib.nullcontext():
        if todo:  # before anything is written: an actor pool this Ray can never hold fails at once
            lab = cfg.label
            check_resources(cfg.cluster, "label.actors", lab.actors, lab.cpus_per_actor,
                            lab.gpus_per_actor if cfg.cluster.use_gpu else 0)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / PENDING, settings)
        for stale in out.glob(f"{SHARDS}/.part-*.tmp"):  # temp files of a killed run
            stale.unlink()
        print(f"labelling {n} rows of {split.name} with {cfg.label.scheme().describe()}: {len(todo)} of {n_shards} "
              f"shards to do ({len(done)} kept from an earlier run), {cfg.label.actors} actors")
        if todo:
            label_shards(cfg, todo, n, teacher_file, out)
    shards = [{"file": shard_name(s), "rows": min(rows_per_shard, n - s * rows_per_shard),
               "first_id": s * rows_per_shard, "sha256": file_sha256(out / shard_name(s))} for s in range(n_shards)]
    write_manifest(out, {**settings, "shards": shards, "version": dd_dist.__version__,
                         "created": datetime.datetime.now(datetime.timezone.utc).isoformat()})
    (out / PENDING).unlink()
    return out
