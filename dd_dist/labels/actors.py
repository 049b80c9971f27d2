"""The label actors: a Ray Data pool of ShardLabeller actors that label whole shards and write them.

The unit of work and of resume is a shard: shard s holds row ids [s*R, (s+1)*R). A Ray Data
pipeline over the missing shards maps them through an actor pool; each actor loads the teacher
once, reads and decodes only its shard's rows from the data's Parquet cache (dd_dist.data), labels
them (K masks per row, seeded by (seed, row id), so the result does not depend on actors, batches or
order) and writes the shard atomically. No process holds the split: an actor holds one shard's images.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dd_dist.config import Config
from dd_dist.core.augment import augment
from dd_dist.core.mc import MCEstimate
from dd_dist.core.mc_schemes import mc_label
from dd_dist.core.models import load_model
from dd_dist.core.precision import autocast, check_precision
from dd_dist.data.splits import load_split
from dd_dist.errors import UserError
from dd_dist.infra.cluster import ray_session
from dd_dist.labels.format import label_table, shard_name, write_shard
from dd_dist.layout import RunDir
from dd_dist.schemes import MCScheme

ACTOR_START_TIMEOUT_S = 600  # an autoscaling cluster may need minutes to add the nodes the actors need


def label_rows(model, x: torch.Tensor, ids: torch.Tensor, k: int | MCScheme, seed: int, zero_p: float,
               flip_p: float, precision: str = "fp32") -> MCEstimate:
    """The MC estimate (on the CPU) of the rows x, whose ids are `ids`: the augmented view at epoch 0,
    K masks (the plain mean) or an MCScheme, the teacher's layers computed in `precision`."""
    inputs = augment(x, ids, seed, 0, zero_p, flip_p)
    device = next(model.parameters()).device
    scheme = k if isinstance(k, MCScheme) else MCScheme(k=k)
    with autocast(precision, device):
        estimate = mc_label(model, inputs.to(device), ids, seed, scheme)
    return MCEstimate(*(t.cpu() for t in estimate))


def shard_table(ids: np.ndarray, estimate: MCEstimate, dtype: str, topk: int, store_k: bool,
                store_uncertainty: bool):
    """The shard of these rows: their labels in `dtype`, with `k` and the uncertainty columns if asked for."""
    columns = None
    if store_uncertainty:
        columns = {name: value.numpy() for name, value in estimate.uncertainty().items()}
    return label_table(ids, estimate.probs.numpy(), estimate.stderr.numpy(), dtype, topk,
                       estimate.k.numpy() if store_k else None, columns)


class ShardLabeller:
    """A Ray actor: labels whole shards and writes them (callable class for map_batches)."""

    def __init__(self, teacher: str, data: dict, scheme: MCScheme, seed: int, zero_p: float, flip_p: float,
                 dtype: str, topk: int, out: str, threads: int, batch_size: int, uncertainty: bool,
                 precision: str = "fp32", device: str = "cpu"):
        torch.set_num_threads(threads)
        check_precision(precision, device, "label.precision")  # here, where the actor's device is known
        self.model = load_model(teacher)[0].to(device)
        self.split = load_split(**data)
        self.mc = dict(k=scheme, seed=seed, zero_p=zero_p, flip_p=flip_p, precision=precision)
        # a fixed K is in the manifest; an adaptive one per row in the shards
        self.storage = dict(dtype=dtype, topk=topk, store_k=scheme.adaptive, store_uncertainty=uncertainty)
        self.out, self.batch_size = Path(out), batch_size

    def __call__(self, batch: dict) -> dict:
        done = {"shard": [], "rows": [], "started": [], "finished": [], "pid": []}
        for shard, start, stop in zip(batch["shard"], batch["start"], batch["stop"]):
            started = time.time()
            parts = []
            for a in range(start, stop, self.batch_size):
                ids = np.arange(a, min(a + self.batch_size, stop))
                x = torch.from_numpy(self.split.images(ids))
                parts.append(label_rows(self.model, x, torch.from_numpy(ids), **self.mc))
            estimate = MCEstimate(*(torch.cat(c) for c in zip(*parts)))
            write_shard(self.out / shard_name(shard), shard_table(np.arange(start, stop), estimate, **self.storage))
            for key, value in zip(done, (shard, stop - start, started, time.time(), os.getpid())):
                done[key].append(value)
        return {key: np.asarray(value) for key, value in done.items()}


def label_shards(cfg: Config, todo: list[int], n: int, teacher_file: Path, out: Path) -> dict:
    """Label and write shards `todo` of the n-row training split into `out` on the actor pool; returns
    throughput figures: rows/s over the whole call (Ray start-up included) and in the steady state (first
    shard started to last shard finished: actor start-up excluded)."""
    import ray  # heavy: only where actors run

    cfg = cfg.resolved()  # the actors may start elsewhere
    lab, use_gpu, r = cfg.label, cfg.cluster.use_gpu, cfg.label.rows_per_shard
    items = [{"shard": s, "start": s * r, "stop": min((s + 1) * r, n)} for s in todo]
    actor_args = dict(teacher=str(teacher_file.resolve()), out=str(out.resolve()), scheme=lab.scheme(), seed=cfg.seed,
                      data=RunDir(cfg).split("train"), zero_p=cfg.data.zero_p, flip_p=cfg.data.flip_p, dtype=lab.dtype,
                      topk=lab.topk, threads=lab.threads_per_actor, batch_size=lab.batch_size,
                      uncertainty=lab.uncertainty, precision=lab.precision, device="cuda" if use_gpu else "cpu")
    began = time.perf_counter()
    results = []
    with ray_session(cfg.cluster), tqdm(total=sum(i["stop"] - i["start"] for i in items), desc="label",
                                        unit="rows") as bar:
        context = ray.data.DataContext.get_current()
        # Start only once every actor is up (else the first one may take all the shards while the
        # others still load), and queue at most 2 shards per actor so the shards spread evenly.
        waited, context.wait_for_min_actors_s = context.wait_for_min_actors_s, ACTOR_START_TIMEOUT_S
        # An actor's own exception (a UserError: a full disk, say) as the cause, not only as traceback text.
        original, context.raise_original_map_exception = context.raise_original_map_exception, True
        try:
            shards = ray.data.from_items(items).map_batches(
                ShardLabeller, fn_constructor_kwargs=actor_args, batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=lab.actors, max_tasks_in_flight_per_actor=2),
                num_cpus=lab.cpus_per_actor, num_gpus=lab.gpus_per_actor if use_gpu else 0,
            )
            for row in shards.iter_rows():  # streams: one row per finished shard
                results.append(row)
                bar.update(int(row["rows"]))
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"{lab.actors} label actors ({lab.cpus_per_actor} CPU"
                            f"{f', {lab.gpus_per_actor:g} GPU' if use_gpu else ''} each) "
                            f"did not all start within {ACTOR_START_TIMEOUT_S} s: the cluster lacks the resources; "
                            f"lower label.actors or add nodes") from None
        finally:
            context.wait_for_min_actors_s, context.raise_original_map_exception = waited, original
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
