"""The training stream (dd_dist/train/rows.py) on a real local Ray: what each Ray Train worker iterates.

The split over two workers is Ray Train's own (its DataConfig.configure, as TorchTrainer calls it), and
each worker's epoch is the worker's own call (stream_batches); the rows are read from the Parquet cache
and the label shards by the Ray Data tasks the trainer runs.
"""
import threading

import numpy as np
import pytest
import torch

from dd_dist.data.splits import load_split
from dd_dist.files import file_sha256
from dd_dist.labels.format import FORMAT, label_table, load_soft_labels, shard_name, write_manifest, write_shard
from dd_dist.train.rows import CHUNK_ROWS, chunks, data_config, stream_batches, training_dataset

ROWS_PER_SHARD = 300  # chunks end at shard ends: not a multiple of the batch


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def split():
    return load_split("synthetic", "train")  # 512 rows, 4 classes


@pytest.fixture(scope="module")
def label_dir(tmp_path_factory, split):
    """Top-k (k=2) label shards of random distributions over the split's 512 rows, as `label` writes them."""
    out, rng, shards = tmp_path_factory.mktemp("labels"), np.random.default_rng(0), []
    for s, first in enumerate(range(0, len(split), ROWS_PER_SHARD)):
        ids = np.arange(first, min(first + ROWS_PER_SHARD, len(split)))
        probs = rng.dirichlet(np.ones(4), len(ids)).astype(np.float32)
        write_shard(out / shard_name(s), label_table(ids, probs, np.zeros(len(ids)), "topk", 2))
        shards.append({"file": shard_name(s), "rows": len(ids), "first_id": first})
    return out, shards


def epochs_of_two_workers(dataset, epochs: int, batch_size: int = 24) -> list[list[dict]]:
    """Per epoch, per worker: the batches it iterates, both workers at once (as the ranks of a train run)."""
    iterators = [shard["train"] for shard in data_config(256).configure({"train": dataset}, 2, None, None)]
    out = []
    for epoch in range(epochs):
        seen = [[], []]

        def run(rank):
            seen[rank] = list(stream_batches(iterators[rank], batch_size, 64, 0, epoch, rank))

        threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        out.append(seen)
    return out


def ids_of(batches: list[dict]) -> list[int]:
    return [i for b in batches for i in b["id"].tolist()]


def test_chunks_cover_every_row_once_and_stay_inside_their_label_shard(label_dir):
    _, shards = label_dir
    spans = chunks(512, shards)
    assert np.array_equal(np.concatenate([np.arange(c["start"], c["stop"]) for c in spans]), np.arange(512))
    for c in spans:
        shard = next(s for s in shards if s["file"] == c["file"])
        assert shard["first_id"] <= c["start"] < c["stop"] <= shard["first_id"] + shard["rows"]
        assert c["offset"] == c["start"] - shard["first_id"] and c["stop"] - c["start"] <= CHUNK_ROWS
    assert [(c["start"], c["stop"]) for c in chunks(2500)] == [(0, 1024), (1024, 2048), (2048, 2500)]


def test_each_epoch_gives_every_row_once_over_the_workers_in_a_fresh_seeded_order(ray_local, split, label_dir):
    labels, shards = label_dir
    first = epochs_of_two_workers(training_dataset(split, 0, labels, shards), epochs=2)
    for epoch in first:
        ranks = [ids_of(batches) for batches in epoch]
        assert len(ranks[0]) == len(ranks[1]) == 256  # an equal split: the ranks take the same steps
        assert [len(b["id"]) for b in epoch[0]] == [len(b["id"]) for b in epoch[1]]
        assert sorted(ranks[0] + ranks[1]) == list(range(512))  # nothing lost, nothing twice
    order = [ids_of(e[0]) + ids_of(e[1]) for e in first]
    assert order[0] != order[1]  # reshuffled each epoch
    # The same seed, a fresh dataset (a fresh run): the same batches on the same ranks.
    again = epochs_of_two_workers(training_dataset(split, 0, labels, shards), epochs=2)
    assert [ids_of(e[0]) + ids_of(e[1]) for e in again] == order
    other = epochs_of_two_workers(training_dataset(split, 1, labels, shards), epochs=1)
    assert ids_of(other[0][0]) + ids_of(other[0][1]) != order[0]


def test_streamed_rows_are_the_cached_images_and_the_expanded_soft_labels(ray_local, split, label_dir):
    labels, shards = label_dir
    write_manifest(labels, {"format": FORMAT, "teacher": {}, "data": {"num_classes": 4}, "augmentation": {},
                            "k": 1, "seed": 0, "precision": "fp32", "storage": {}, "rows": 512,
                            "shards": [{**s, "sha256": file_sha256(labels / s["file"])} for s in shards]})
    ids, probs = load_soft_labels(labels)  # the whole label matrix, top-k expanded, for comparison only
    batch = epochs_of_two_workers(training_dataset(split, 0, labels, shards), epochs=1)[0][1][0]
    rows = batch["id"].numpy()
    assert batch["x"].dtype == torch.float32 and np.array_equal(batch["x"].numpy(), split.images(rows))
    assert torch.equal(batch["target"], probs[rows]) and torch.allclose(batch["target"].sum(1), torch.ones(len(rows)))
    teacher_batch = epochs_of_two_workers(training_dataset(split, 0), epochs=1)[0][0][0]
    assert torch.equal(teacher_batch["target"], torch.from_numpy(split.y[teacher_batch["id"].numpy()]))

