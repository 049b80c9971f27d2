"""`dd-dist label`: MC-averaged teacher soft labels computed by a pool of Ray actors.

The unit of work and of resume is a shard: shard s holds row ids [s*R, (s+1)*R). A Ray Data
pipeline over the missing shards maps them through an actor pool; each actor loads the teacher
and the data once, labels its shard's rows (K masks per row, seeded by (seed, row id)) and writes
the shard atomically. The manifest is written last, so a directory with a manifest is complete.
"""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

import dd_dist
from dd_dist.config import Config
from dd_dist.data import augment, load_split
from dd_dist.errors import UserError
from dd_dist.mc import mc_probs
from dd_dist.files import file_sha256, write_json
from dd_dist.models import load_model
from dd_dist.shards import MANIFEST, FORMAT, label_table, read_manifest, shard_name, write_shard

PENDING = ".pending.json"  # the settings of an unfinished run, so that a resume cannot mix settings


def labels_dir(cfg: Config) -> Path:
    return Path(cfg.run_dir) / "labels"


class ShardLabeller:
    """A Ray actor: labels whole shards and writes them (callable class for map_batches)."""

    def __init__(self, teacher: str, data: dict, k: int, seed: int, zero_p: float, flip_p: float,
                 dtype: str, topk: int, out: str, threads: int, batch_size: int, device: str = "cpu"):
        torch.set_num_threads(threads)
        self.model = load_model(teacher)[0].to(device)
        self.split = load_split(**data)
        self.x = torch.from_numpy(self.split.x)
        self.k, self.seed, self.zero_p, self.flip_p = k, seed, zero_p, flip_p
        self.dtype, self.topk, self.out, self.batch_size, self.device = dtype, topk, Path(out), batch_size, device

    def label_rows(self, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        inputs = augment(self.x[ids], ids, self.seed, 0, self.zero_p, self.flip_p).to(self.device)
        probs, stderr = mc_probs(self.model, inputs, ids, self.k, self.seed, return_stderr=True)
        return probs.cpu().numpy(), stderr.cpu().numpy()

    def __call__(self, batch: dict) -> dict:
        done = {"shard": [], "rows": [], "seconds": []}
        for shard, start, stop in zip(batch["shard"], batch["start"], batch["stop"]):
            began = time.perf_counter()
            parts = [self.label_rows(torch.arange(a, min(a + self.batch_size, stop)))
                     for a in range(start, stop, self.batch_size)]
            probs, stderr = (np.concatenate(c) for c in zip(*parts))
            write_shard(self.out / shard_name(shard), label_table(np.arange(start, stop), probs, stderr, self.dtype, self.topk))
            done["shard"].append(shard)
            done["rows"].append(stop - start)
            done["seconds"].append(time.perf_counter() - began)
        return {key: np.asarray(value) for key, value in done.items()}


def label_settings(cfg: Config, teacher_file: Path, spec: dict, split) -> dict:
    """Everything the labels depend on; a resume must find exactly these."""
    lab = cfg.label
    return {
        "format": FORMAT,
        "teacher": {"sha256": file_sha256(teacher_file), "spec": spec},
        "p": spec["p"], "k": lab.k, "seed": cfg.seed,
        "augmentation": {"zero_p": cfg.data.zero_p, "flip_p": cfg.data.flip_p, "epoch": 0},
        "data": {"name": split.name, "split": split.split, "fingerprint": split.fingerprint,
                 "rows": len(split), "num_classes": split.num_classes},
        "storage": {"dtype": lab.dtype, "topk": lab.topk if lab.dtype == "topk" else None, "compression": "zstd",
                    "rows_per_shard": lab.rows_per_shard},
        "rows": len(split),
    }


def finished_shards(out: Path, n_shards: int, rows_per_shard: int, n_rows: int) -> set[int]:
    """Shards already on disk with the right row count (a shard only exists once complete)."""
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
            previous = {key: previous.get(key) for key in settings}
            if previous != settings:
                changed = sorted(key for key in settings if previous.get(key) != settings[key])
                raise UserError(f"{out} holds labels made with other settings ({', '.join(changed)}): "
                                f"choose another run_dir or delete it")
            if name == MANIFEST:
                return True
    return False


def run_label(cfg: Config) -> Path:
    from dd_dist.pipeline import teacher_path, train_split

    out, teacher_file = labels_dir(cfg), teacher_path(cfg)
    teacher, spec = load_model(teacher_file)
    split = train_split(cfg)
    if tuple(spec["in_shape"]) != split.in_shape or spec["num_classes"] != split.num_classes:
        raise UserError(f"teacher {teacher_file} takes {spec['in_shape']} with {spec['num_classes']} classes, "
                        f"the data has {list(split.in_shape)} with {split.num_classes}")
    if spec["arch"] != cfg.model.arch or spec["p"] != cfg.model.p:
        raise UserError(f"teacher {teacher_file} is {spec['arch']} with p={spec['p']}, "
                        f"the config says {cfg.model.arch} with p={cfg.model.p}")
    settings = label_settings(cfg, teacher_file, spec, split)
    if _check_resume(out, settings):
        print(f"labels in {out} are complete and match the config: nothing to do")
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / PENDING, settings)
    for stale in out.glob("*/.part-*.tmp"):  # temp files of a killed run
        stale.unlink()

    rows_per_shard, n = cfg.label.rows_per_shard, len(split)
    n_shards = -(-n // rows_per_shard)
    done = finished_shards(out, n_shards, rows_per_shard, n)
    todo = [s for s in range(n_shards) if s not in done]
    print(f"labelling {n} rows of {split.name} with K={cfg.label.k}: {len(todo)} of {n_shards} shards to do "
          f"({len(done)} kept from an earlier run), {cfg.label.actors} actors")
    if todo:
        _label_shards(cfg, todo, rows_per_shard, n, teacher_file, out)
    shards = [{"file": shard_name(s), "rows": min(rows_per_shard, n - s * rows_per_shard),
               "first_id": s * rows_per_shard, "sha256": file_sha256(out / shard_name(s))} for s in range(n_shards)]
    write_json(out / MANIFEST, {**settings, "shards": shards, "version": dd_dist.__version__,
                                "created": datetime.datetime.now(datetime.timezone.utc).isoformat()})
    (out / PENDING).unlink()
    return out


def _label_shards(cfg: Config, todo: list[int], rows_per_shard: int, n: int, teacher_file: Path, out: Path) -> None:
    import ray

    from dd_dist.cluster import ray_session

    lab, use_gpu = cfg.label, cfg.cluster.use_gpu
    items = [{"shard": s, "start": s * rows_per_shard, "stop": min((s + 1) * rows_per_shard, n)} for s in todo]
    actor_args = dict(teacher=str(teacher_file.resolve()), out=str(out.resolve()), k=lab.k, seed=cfg.seed,
                      data={"name": cfg.data.name, "split": "train", "path": cfg.data.path, "rows": cfg.data.train_rows,
                            "seed": cfg.seed},
                      zero_p=cfg.data.zero_p, flip_p=cfg.data.flip_p, dtype=lab.dtype, topk=lab.topk,
                      threads=lab.threads_per_actor, batch_size=lab.batch_size, device="cuda" if use_gpu else "cpu")
    started = time.perf_counter()
    with ray_session(cfg.cluster):
        results = ray.data.from_items(items).map_batches(
            ShardLabeller, fn_constructor_kwargs=actor_args, batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=lab.actors),
            num_cpus=lab.cpus_per_actor, num_gpus=1 if use_gpu else 0,
        ).take_all()
    rows = sum(int(r["rows"]) for r in results)
    elapsed = time.perf_counter() - started
    print(f"labelled {rows} rows in {elapsed:.1f} s: {rows / elapsed:.0f} rows/s "
          f"({rows / sum(float(r['seconds']) for r in results):.0f} rows/s per actor)")


def verify_labels(directory, teacher_file, rows: int, cfg: Config) -> dict:
    """Check manifest, checksums, teacher and the configured data, then recompute `rows` random rows
    with an independent seed.

    Tolerance: two independent K-mask estimates of the same mean differ in KL by about
    sum_c se_c^2 / p_c per row (se = per-class standard error of one estimate; the two variances
    add and KL ~ chi^2 / 2). We allow 4x its mean over the checked rows plus the storage error:
    1e-3 for float16 and the mean dropped mass for top-k.
    """
    from dd_dist.mc import mc_moments
    from dd_dist.shards import check_labels_match, check_shards, read_shard

    directory, teacher_file = Path(directory), Path(teacher_file)
    manifest = read_manifest(directory)
    teacher, spec = load_model(teacher_file)
    if spec["p"] != manifest["p"] or spec["arch"] != manifest["teacher"]["spec"]["arch"]:
        raise UserError(f"labels were made with {manifest['teacher']['spec']['arch']} p={manifest['p']}, "
                        f"the teacher is {spec['arch']} p={spec['p']}")
    if file_sha256(teacher_file) != manifest["teacher"]["sha256"]:
        raise UserError(f"labels in {directory} were made by another teacher than {teacher_file} (sha256 differs)")
    check_shards(directory, manifest)
    from dd_dist.pipeline import train_split

    split = train_split(cfg)  # the configured data: labels of other data are refused
    aug = manifest["augmentation"]
    check_labels_match(manifest, data_fingerprint=split.fingerprint, num_classes=split.num_classes,
                       zero_p=aug["zero_p"], flip_p=aug["flip_p"])

    rng = np.random.default_rng()
    ids = np.sort(rng.choice(manifest["rows"], size=min(rows, manifest["rows"]), replace=False))
    stored = np.zeros((len(ids), split.num_classes), np.float32)
    for shard in manifest["shards"]:
        inside = (ids >= shard["first_id"]) & (ids < shard["first_id"] + shard["rows"])
        if inside.any():
            shard_ids, probs = read_shard(directory / shard["file"], split.num_classes)
            stored[inside] = probs[np.searchsorted(shard_ids, ids[inside])]
    t_ids = torch.from_numpy(ids)
    inputs = augment(torch.from_numpy(split.x[ids]), t_ids, manifest["seed"], aug["epoch"], aug["zero_p"], aug["flip_p"])
    fresh, se = mc_moments(teacher, inputs, t_ids, manifest["k"], manifest["seed"] + 1_000_003)
    p = torch.from_numpy(stored).double().clamp_min(1e-7)
    q = fresh.double().clamp_min(1e-7)
    kl = (p * (p / q).log()).sum(1).mean().item()
    noise = (se.double() ** 2 / q).sum(1).mean().item()
    storage = manifest["storage"]
    quantisation = {"float16": 1e-3, "float32": 1e-5}.get(storage["dtype"], None)
    if quantisation is None:  # top-k: the dropped mass is spread evenly, an error of at most that mass
        quantisation = float(np.mean(1 - np.sort(stored, 1)[:, -storage["topk"]:].sum(1))) + 1e-3
    tolerance = 4 * noise + quantisation
    if kl > tolerance:
        raise UserError(f"labels disagree with the teacher: mean KL {kl:.4g} over {len(ids)} rows exceeds the "
                        f"tolerance {tolerance:.4g} for K={manifest['k']}")
    return {"rows": len(ids), "mean_kl": kl, "tolerance": tolerance}
