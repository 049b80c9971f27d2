"""`dd-dist label`: MC-averaged teacher soft labels computed by a pool of Ray actors.

The unit of work and of resume is a shard: shard s holds row ids [s*R, (s+1)*R). A Ray Data
pipeline over the missing shards maps them through an actor pool; each actor loads the teacher
and the data once, labels its shard's rows (K masks per row, seeded by (seed, row id), so the
result does not depend on actors, batches or order) and writes the shard atomically. The manifest
is written last, so a directory with a manifest is complete.
"""
from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

import dd_dist
from dd_dist.config import Config
from dd_dist.data import augment, load_split
from dd_dist.errors import UserError
from dd_dist.files import file_sha256, write_json
from dd_dist.mc_schemes import MCScheme, check_model, mc_label
from dd_dist.models import load_model
from dd_dist.shards import (FORMAT, MANIFEST, SHARDS, label_table, read_manifest, shard_name, write_manifest,
                            write_shard)

PENDING = ".pending.json"  # the settings of an unfinished run, so that a resume cannot mix settings
ACTOR_START_TIMEOUT_S = 600  # an autoscaling cluster may need minutes to add the nodes the actors need


def labels_dir(cfg: Config) -> Path:
    return Path(cfg.run_dir) / "labels"


def label_scheme(lab) -> MCScheme:
    """The MC scheme a LabelConfig asks for."""
    return MCScheme(k=None if lab.k == "auto" else lab.k, stderr_target=lab.stderr_target, k_min=lab.k_min,
                    k_max=lab.k_max, antithetic=lab.antithetic, control_variate=lab.control_variate,
                    fanout=tuple(lab.fanout))


def label_rows(model, x: torch.Tensor, ids: torch.Tensor, k: int | MCScheme, seed: int, zero_p: float, flip_p: float,
               return_k: bool = False):
    """(probs (B, C), mc_stderr (B,)) of rows `ids` of x: the augmented view at epoch 0, K masks (the
    plain mean) or an MCScheme; with return_k also the masks each row used (B,)."""
    inputs = augment(x[ids], ids, seed, 0, zero_p, flip_p)
    device = next(model.parameters()).device
    scheme = k if isinstance(k, MCScheme) else MCScheme(k=k)
    probs, stderr, used = mc_label(model, inputs.to(device), ids, seed, scheme)
    out = probs.cpu().numpy(), stderr.cpu().numpy()
    return (*out, used.cpu().numpy()) if return_k else out


class ShardLabeller:
    """A Ray actor: labels whole shards and writes them (callable class for map_batches)."""

    def __init__(self, teacher: str, data: dict, scheme: MCScheme, seed: int, zero_p: float, flip_p: float,
                 dtype: str, topk: int, out: str, threads: int, batch_size: int, device: str = "cpu"):
        torch.set_num_threads(threads)
        self.model = load_model(teacher)[0].to(device)
        self.x = torch.from_numpy(load_split(**data).x)  # load_split is cached per process
        self.mc = dict(k=scheme, seed=seed, zero_p=zero_p, flip_p=flip_p, return_k=True)
        self.store_k = scheme.adaptive  # a fixed K is in the manifest; an adaptive one per row in the shards
        self.dtype, self.topk, self.out, self.batch_size = dtype, topk, Path(out), batch_size

    def __call__(self, batch: dict) -> dict:
        done = {"shard": [], "rows": [], "started": [], "finished": [], "pid": []}
        for shard, start, stop in zip(batch["shard"], batch["start"], batch["stop"]):
            started = time.time()
            parts = [label_rows(self.model, self.x, torch.arange(a, min(a + self.batch_size, stop)), **self.mc)
                     for a in range(start, stop, self.batch_size)]
            probs, stderr, used = (np.concatenate(c) for c in zip(*parts))
            write_shard(self.out / shard_name(shard), label_table(np.arange(start, stop), probs, stderr, self.dtype,
                                                                  self.topk, used if self.store_k else None))
            for key, value in zip(done, (shard, stop - start, started, time.time(), os.getpid())):
                done[key].append(value)
        return {key: np.asarray(value) for key, value in done.items()}


def label_settings(cfg: Config, teacher_file: Path, spec: dict, split) -> dict:
    """Everything the labels depend on; a resume must find exactly these."""
    lab, scheme = cfg.label, label_scheme(cfg.label)
    return {
        "format": FORMAT,
        "teacher": {"sha256": file_sha256(teacher_file), "spec": spec},
        "p": spec["p"], "k": lab.k, "seed": cfg.seed,
        # the plain K-mask mean has no entry (so labels from before schemes existed still resume)
        **({} if scheme.plain else {"scheme": scheme.record()}),
        "augmentation": {"zero_p": cfg.data.zero_p, "flip_p": cfg.data.flip_p, "epoch": 0},
        "data": {"name": split.name, "split": split.split, "fingerprint": split.fingerprint,
                 "rows": len(split), "num_classes": split.num_classes},
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
            previous = {key: previous.get(key) for key in settings}
            if previous != settings:
                changed = sorted(key for key in settings if previous.get(key) != settings[key])
                raise UserError(f"{out} holds labels made with other settings ({', '.join(changed)}): "
                                f"choose another run_dir or delete it")
            if name == MANIFEST:
                return True
    return False


def run_label(cfg: Config) -> Path:
    """Write (or complete) run_dir/labels from run_dir/teacher/model.pt; returns the directory."""
    from dd_dist.pipeline import teacher_path, train_split

    out, teacher_file = labels_dir(cfg), teacher_path(cfg)
    _, spec = load_model(teacher_file)
    split = train_split(cfg)
    if tuple(spec["in_shape"]) != split.in_shape or spec["num_classes"] != split.num_classes:
        raise UserError(f"teacher {teacher_file} takes {spec['in_shape']} with {spec['num_classes']} classes, "
                        f"the data has {list(split.in_shape)} with {split.num_classes}")
    if spec["arch"] != cfg.model.arch or spec["p"] != cfg.model.p:
        raise UserError(f"teacher {teacher_file} is {spec['arch']} with p={spec['p']}, "
                        f"the config says {cfg.model.arch} with p={cfg.model.p}")
    if cfg.label.control_variate:
        try:
            check_model(load_model(teacher_file)[0], label_scheme(cfg.label))
        except ValueError as e:
            raise UserError(f"label.control_variate: {e}") from None
    settings = label_settings(cfg, teacher_file, spec, split)
    if _check_resume(out, settings):
        print(f"labels in {out} are complete and match the config: nothing to do")
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / PENDING, settings)
    for stale in out.glob(f"{SHARDS}/.part-*.tmp"):  # temp files of a killed run
        stale.unlink()

    rows_per_shard, n = cfg.label.rows_per_shard, len(split)
    n_shards = -(-n // rows_per_shard)
    done = finished_shards(out, n_shards, rows_per_shard, n)
    todo = [s for s in range(n_shards) if s not in done]
    print(f"labelling {n} rows of {split.name} with {label_scheme(cfg.label).describe()}: {len(todo)} of {n_shards} shards to do "
          f"({len(done)} kept from an earlier run), {cfg.label.actors} actors")
    if todo:
        label_shards(cfg, todo, n, teacher_file, out)
    shards = [{"file": shard_name(s), "rows": min(rows_per_shard, n - s * rows_per_shard),
               "first_id": s * rows_per_shard, "sha256": file_sha256(out / shard_name(s))} for s in range(n_shards)]
    write_manifest(out, {**settings, "shards": shards, "version": dd_dist.__version__,
                         "created": datetime.datetime.now(datetime.timezone.utc).isoformat()})
    (out / PENDING).unlink()
    return out


def label_shards(cfg: Config, todo: list[int], n: int, teacher_file: Path, out: Path) -> dict:
    """Label and write shards `todo` of an n-row split on the actor pool; returns throughput figures:
    rows/s over the whole call (Ray start-up included) and in the steady state (first shard started
    to last shard finished: actor start-up excluded)."""
    import ray

    from dd_dist.cluster import ray_session

    cfg = cfg.resolved()  # the actors may start elsewhere
    lab, use_gpu, r = cfg.label, cfg.cluster.use_gpu, cfg.label.rows_per_shard
    items = [{"shard": s, "start": s * r, "stop": min((s + 1) * r, n)} for s in todo]
    actor_args = dict(teacher=str(teacher_file.resolve()), out=str(out.resolve()), scheme=label_scheme(lab), seed=cfg.seed,
                      data={"name": cfg.data.name, "split": "train", "path": cfg.data.path, "rows": cfg.data.train_rows,
                            "seed": cfg.seed},
                      zero_p=cfg.data.zero_p, flip_p=cfg.data.flip_p, dtype=lab.dtype, topk=lab.topk,
                      threads=lab.threads_per_actor, batch_size=lab.batch_size, device="cuda" if use_gpu else "cpu")
    began = time.perf_counter()
    results = []
    with ray_session(cfg.cluster), tqdm(total=sum(i["stop"] - i["start"] for i in items), desc="label",
                                        unit="rows") as bar:
        context = ray.data.DataContext.get_current()
        # Start only once every actor is up (else the first one may take all the shards while the
        # others still load), and queue at most 2 shards per actor so the shards spread evenly.
        waited, context.wait_for_min_actors_s = context.wait_for_min_actors_s, ACTOR_START_TIMEOUT_S
        try:
            shards = ray.data.from_items(items).map_batches(
                ShardLabeller, fn_constructor_kwargs=actor_args, batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=lab.actors, max_tasks_in_flight_per_actor=2),
                num_cpus=lab.cpus_per_actor, num_gpus=1 if use_gpu else 0,
            )
            for row in shards.iter_rows():  # streams: one row per finished shard
                results.append(row)
                bar.update(int(row["rows"]))
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"{lab.actors} label actors ({lab.cpus_per_actor} CPU{', 1 GPU' if use_gpu else ''} each) "
                            f"did not all start within {ACTOR_START_TIMEOUT_S} s: the cluster lacks the resources; "
                            f"lower label.actors or add nodes") from None
        finally:
            context.wait_for_min_actors_s = waited
    rows = sum(int(row["rows"]) for row in results)
    elapsed = time.perf_counter() - began
    steady = max(row["finished"] for row in results) - min(row["started"] for row in results)
    stats = {"rows": rows, "seconds": elapsed, "rows_per_s": rows / elapsed, "steady_rows_per_s": rows / steady,
             "actor_rows_per_s": _per_actor_rates(results)}
    print(f"labelled {rows} rows in {elapsed:.1f} s: {stats['rows_per_s']:.0f} rows/s overall, "
          f"{stats['steady_rows_per_s']:.0f} rows/s once the {lab.actors} actors were up")
    return stats


def _per_actor_rates(results: list[dict]) -> list[float]:
    """Each actor's rows / (its last shard's end - its first shard's start)."""
    by_actor: dict[int, list[dict]] = {}
    for row in results:
        by_actor.setdefault(int(row["pid"]), []).append(row)
    return [sum(int(r["rows"]) for r in rs) / (max(r["finished"] for r in rs) - min(r["started"] for r in rs))
            for rs in by_actor.values()]
