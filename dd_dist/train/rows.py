"""The training stream: the rows a teacher or student trains on, as a lazy Ray Dataset.

The dataset holds only id ranges ("chunks" of at most CHUNK_ROWS rows, one block each, never across
a label shard); streaming Ray Data tasks turn each chunk into its rows, read from the Parquet cache
(images decoded and transformed, dd_dist.data.splits.Split.examples) and, for an offline student,
joined by id to the soft labels of the label shard holding them (top-k expanded there, per chunk).
Ray Train splits the stream over the workers (get_dataset_shard); nothing, in the driver or a worker,
holds a split or the label matrix.

Shuffle: the chunks' order is drawn afresh each epoch (randomize_block_order seeded by `seed`; Ray
Data reseeds it for each pass), and each worker shuffles its rows in a buffer seeded by
(seed, epoch, rank) (stream_batches). With preserve_order (data_config) the same seed gives the same
batches. A worker group restarted from a checkpoint draws its epochs' orders anew.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from dd_dist.core.splitmix import row_rng_seed
from dd_dist.data.cache import ROW_GROUP
from dd_dist.data.splits import Split
from dd_dist.labels.format import table_probs

CHUNK_ROWS = ROW_GROUP  # a chunk reads one row group of the cache


def chunks(rows: int, shards: list[dict] | None = None) -> list[dict]:
    """Id ranges [start, stop) covering rows 0..rows-1; with label shards (the manifest's list), each
    range inside one shard, `file` naming it and `offset` where the range starts in it."""
    spans = [{"file": s["file"], "first_id": s["first_id"], "rows": s["rows"]} for s in shards] if shards else \
        [{"file": "", "first_id": 0, "rows": rows}]
    out = []
    for span in spans:
        first, end = span["first_id"], span["first_id"] + span["rows"]
        for start in range(first, end, CHUNK_ROWS):
            out.append({"start": start, "stop": min(start + CHUNK_ROWS, end), "file": span["file"],
                        "offset": start - first})
    return out


def read_chunks(batch: dict[str, np.ndarray], split: Split, labels: str | None, uncertainty: bool) -> dict:
    """A Ray Data task: the rows of these chunks as {"id", "x" (float32 images), "target"}: the hard labels,
    or with `labels` (a label directory) the soft labels (with the mutual information as one more column)."""
    ids = np.concatenate([np.arange(a, b) for a, b in zip(batch["start"], batch["stop"])])
    x, y = split.examples(ids)
    if labels is None:
        return {"id": ids, "x": x, "target": y}
    parts = [_soft_rows(Path(labels) / f, off, b - a, split.num_classes, uncertainty)
             for f, off, a, b in zip(batch["file"], batch["offset"], batch["start"], batch["stop"])]
    label_ids = np.concatenate([p[0] for p in parts])
    if not np.array_equal(label_ids, ids):  # the manifest's first_id and rows disagree with its shards
        wrong = int(np.flatnonzero(label_ids != ids)[0])
        raise ValueError(f"label shard rows do not match the data's ids: id {label_ids[wrong]} where the data "
                         f"has row {ids[wrong]}")
    return {"id": ids, "x": x, "target": np.concatenate([p[1] for p in parts])}


def _soft_rows(path: Path, offset: int, count: int, num_classes: int, uncertainty: bool):
    columns = [c for c in pq.ParquetFile(path).schema_arrow.names if c in ("id", "probs", "idx", "val", "rest")]
    table = pq.read_table(path, columns=columns + ["mutual_info"] * uncertainty).slice(offset, count)
    targets = [table_probs(table, num_classes)]
    if uncertainty:
        targets.append(table.column("mutual_info").to_numpy().astype(np.float32)[:, None])
    return table.column("id").to_numpy(), np.concatenate(targets, 1)


def training_dataset(split: Split, seed: int, labels: Path | None = None, shards: list[dict] | None = None,
                     uncertainty: bool = False):
    """The lazy Ray Dataset of the training rows (a fresh chunk order each pass); `labels` and `shards`
    (the directory and its manifest's list) join an offline student's soft labels."""
    import ray  # heavy: only where training runs

    items = chunks(len(split), shards)
    rows = (ray.data.from_items(items, override_num_blocks=len(items))
            .randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))
            .map_batches(read_chunks, batch_size=None, batch_format="numpy",
                         fn_kwargs={"split": split, "labels": str(labels) if labels else None,
                                    "uncertainty": uncertainty}))
    rows.context.enable_progress_bars = False  # Ray Data's bars, redrawn each epoch; the epoch lines are the progress
    return rows


def data_config(read_ahead_mb: int):
    """Ray Train's DataConfig for the training stream: split over the workers, in the same order for the same
    seed, its read tasks at most `read_ahead_mb` of the object store ahead of the workers. Unbounded, they fill
    the store while the workers train, and each new block lands on fresh shared pages that every worker maps
    and that count in its RSS: 1.4 GB per worker at 100k 32x32 RGB rows, growing with the data."""
    from ray.data import ExecutionOptions, ExecutionResources  # heavy: only where training runs
    from ray.train import DataConfig

    limits = ExecutionResources.for_limits(object_store_memory=read_ahead_mb * 2**20)
    return DataConfig(execution_options=ExecutionOptions(preserve_order=True, resource_limits=limits))


def stream_batches(shard, batch_size: int, shuffle_buffer: int, seed: int, epoch: int, rank: int):
    """One epoch of a worker's shard (ray.train.get_dataset_shard) as dicts of CPU tensors "id", "x", "target";
    its rows shuffled in a buffer of `shuffle_buffer` rows seeded by (seed, epoch, rank)."""
    return shard.iter_torch_batches(batch_size=batch_size, device="cpu", local_shuffle_buffer_size=shuffle_buffer or None,
                                    local_shuffle_seed=row_rng_seed(seed, epoch, rank, 1) % 2**32)  # numpy's 32 bits
