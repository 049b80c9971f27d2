"""The soft-label shard format: the contract between `label` and `distill`, and the names inside a label directory.

A label directory holds Parquet files `train/part-XXXXX.parquet` (shard s = row ids [s*R, (s+1)*R))
with columns `id`, `probs` (float16/float32 lists) or top-k `idx`/`val`/`rest`, and `mc_stderr`; `k`
under adaptive K; and with label.uncertainty (the manifest's "uncertainty" lists them) the float32 MC
uncertainty of the row, UNCERTAINTY: `entropy` H[mean], `expected_entropy` E_k H[p_k] and `mutual_info`,
computed from the MC estimate before the storage dtype rounds it. Plus `manifest.json`, written last, with
a digest of its own fields. The shards sit in a `train/` folder so that
`datasets.load_dataset("parquet", data_dir=...)` reads the directory as is (it would otherwise
try to read manifest.json as Parquet).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dd_dist.errors import UserError
from dd_dist.files import atomic_write, file_sha256, write_json

MANIFEST = "manifest.json"
# /2: masks from the counter-based generator (dd_dist.core.masks); /1 labels came from per-row torch generators,
# which this version can neither replay nor resume
FORMAT, OLD_FORMAT = "dd-dist-labels/2", "dd-dist-labels/1"
COMPRESSION = "zstd"
SHARDS = "train"  # the shards' folder: HF datasets names the split after it
PENDING = ".pending.json"  # the settings of an unfinished run, so that a resume cannot mix settings
UNCERTAINTY = ("entropy", "expected_entropy", "mutual_info")


def shard_name(index: int) -> str:
    """The shard's path relative to the label directory."""
    return f"{SHARDS}/part-{index:05d}.parquet"


def _lists(values: np.ndarray, arrow_type) -> pa.ListArray:
    rows, width = values.shape
    offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=arrow_type))


def label_table(ids: np.ndarray, probs: np.ndarray, stderr: np.ndarray, dtype: str, topk: int,
                k: np.ndarray | None = None, uncertainty: dict[str, np.ndarray] | None = None) -> pa.Table:
    """One shard's rows in the stored dtype; top-k keeps the k largest and the mass of the rest.
    k: the MC masks each row used (adaptive K), stored as an int32 column `k`; uncertainty: the
    UNCERTAINTY columns, stored as float32."""
    columns = {"id": pa.array(ids.astype(np.int64))}
    if dtype == "topk":
        kept = min(topk, probs.shape[1])
        idx = np.argsort(-probs, axis=1, kind="stable")[:, :kept]
        val = np.take_along_axis(probs, idx, axis=1)
        columns["idx"] = _lists(idx.astype(np.int16), pa.int16())
        columns["val"] = _lists(val.astype(np.float32), pa.float32())
        columns["rest"] = pa.array(np.clip(1 - val.sum(1), 0, 1).astype(np.float32))
    else:
        arrow = pa.float16() if dtype == "float16" else pa.float32()
        columns["probs"] = _lists(probs.astype(np.float16 if dtype == "float16" else np.float32), arrow)
    columns["mc_stderr"] = pa.array(stderr.astype(np.float32))
    if k is not None:
        columns["k"] = pa.array(np.asarray(k).astype(np.int32))
    for name in UNCERTAINTY if uncertainty is not None else ():
        columns[name] = pa.array(np.asarray(uncertainty[name]).astype(np.float32))
    return pa.table(columns)


def write_shard(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression=COMPRESSION))


def rebuild_topk(idx: np.ndarray, val: np.ndarray, rest: np.ndarray, num_classes: int) -> np.ndarray:
    """Full distributions from top-k: the remaining mass spread evenly over the other classes."""
    rows, k = idx.shape
    others = max(num_classes - k, 1)
    full = np.repeat((rest / others)[:, None], num_classes, axis=1).astype(np.float32)
    if num_classes == k:
        full[:] = 0
    np.put_along_axis(full, idx.astype(np.int64), val, axis=1)
    return full


def _column_matrix(column: pa.ChunkedArray) -> np.ndarray:
    flat = column.combine_chunks()
    return flat.values.to_numpy(zero_copy_only=False).reshape(len(flat), -1)


def table_probs(table: pa.Table, num_classes: int) -> np.ndarray:
    """Full float32 distributions (rows, num_classes) of a label table, top-k expanded."""
    if "probs" in table.column_names:
        return _column_matrix(table.column("probs")).astype(np.float32)
    return rebuild_topk(_column_matrix(table.column("idx")), _column_matrix(table.column("val")),
                        table.column("rest").to_numpy(), num_classes)


def stored_probs(probs: np.ndarray, dtype: str, topk: int) -> np.ndarray:
    """What `probs` read back as after storage in `dtype` (float16 rounding, top-k rebuild)."""
    table = label_table(np.arange(len(probs)), probs, np.zeros(len(probs)), dtype, topk)
    return table_probs(table, probs.shape[1])


def read_shard(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 probabilities (rows, num_classes)) of one shard."""
    try:
        table = pq.read_table(path)
        ids, probs = table.column("id").to_numpy(), table_probs(table, num_classes)
    except (OSError, KeyError, ValueError, pa.ArrowException) as e:
        raise UserError(f"shard {path.name} is unreadable: {str(e).splitlines()[0][:100]}") from None
    if probs.shape[1] != num_classes:
        raise UserError(f"shard {path.name} has {probs.shape[1]} classes, the manifest says {num_classes}")
    return ids, probs


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's fields other than the digest: a hand edit (k, seed, a shard dropped)
    changes it, where shard checksums and a replay of a confident teacher might not notice."""
    body = {key: value for key, value in manifest.items() if key != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(directory, manifest: dict) -> None:
    write_json(Path(directory) / MANIFEST, {**manifest, "digest": manifest_digest(manifest)})


def read_manifest(directory) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(f"no {MANIFEST} in {directory}: not a finished label directory (run `dd-dist label`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} is not a {FORMAT} manifest (not a JSON object)")
    missing = [key for key in ("format", "teacher", "data", "augmentation", "k", "seed", "precision", "storage",
                               "rows", "shards") if key not in manifest]
    if manifest.get("format") == OLD_FORMAT:
        raise UserError(f"{path} holds {OLD_FORMAT} labels, whose MC masks this version of dd-dist no "
                        f"longer draws: label again into a fresh run_dir")
    if manifest.get("format") != FORMAT or missing:
        raise UserError(f"{path} is not a {FORMAT} manifest (missing: {', '.join(missing) or 'format'})")
    if manifest.get("digest") != manifest_digest(manifest):
        raise UserError(f"{path} was edited after it was written (its digest does not match its fields): "
                        f"label again into a fresh run_dir")
    return manifest


def check_labels_match(manifest: dict, *, data_fingerprint: str, num_classes: int, zero_p: float, flip_p: float) -> None:
    """Refuse labels that were made from other data or with another augmentation than configured."""
    data, aug = manifest["data"], manifest["augmentation"]
    if data["fingerprint"] != data_fingerprint:
        raise UserError(f"labels were made from other data ({data['name']} fingerprint {data['fingerprint']}, "
                        f"configured data has {data_fingerprint})")
    if data["num_classes"] != num_classes:
        raise UserError(f"labels have {data['num_classes']} classes, the configured data has {num_classes}")
    if (aug["zero_p"], aug["flip_p"]) != (zero_p, flip_p):
        raise UserError(f"labels were made with augmentation zero_p={aug['zero_p']} flip_p={aug['flip_p']}, "
                        f"configured zero_p={zero_p} flip_p={flip_p}")


def check_shards(directory, manifest: dict) -> None:
    """Every listed shard present with its checksum, and the rows adding up."""
    for shard in manifest["shards"]:
        path = Path(directory) / shard["file"]
        if not path.is_file():
            raise UserError(f"shard {shard['file']} listed in the manifest is missing from {directory}")
        if file_sha256(path) != shard["sha256"]:
            raise UserError(f"shard {shard['file']} is corrupted: its sha256 differs from the manifest's")
        _check_ids(path, shard)
    if sum(s["rows"] for s in manifest["shards"]) != manifest["rows"]:
        raise UserError(f"manifest of {directory} lists shards whose rows do not add up to {manifest['rows']}")


def _check_ids(path: Path, shard: dict) -> None:
    """The shard's ids are the manifest's range, first_id .. first_id + rows - 1 (from the Parquet statistics:
    no row is read). Training joins labels to images by these ids."""
    meta = pq.ParquetFile(path).metadata
    column = meta.schema.names.index("id")
    stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)]
    if meta.num_rows != shard["rows"]:
        raise UserError(f"shard {shard['file']} holds {meta.num_rows} rows, the manifest says {shard['rows']}")
    if not all(st is not None and st.has_min_max for st in stats):  # written without statistics: not checked here
        return
    low, high = min(st.min for st in stats), max(st.max for st in stats)
    first = shard["first_id"]
    if (low, high) != (first, first + shard["rows"] - 1):
        raise UserError(f"shard {shard['file']} holds ids {low}..{high}, the data's rows there are "
                        f"{first}..{first + shard['rows'] - 1}: labels and data ids do not match")


def load_soft_labels(directory) -> tuple[torch.Tensor, torch.Tensor]:
    """All labels of a checked directory as (ids, float32 probs (N, C)), sorted by id."""
    manifest = read_manifest(directory)
    check_shards(directory, manifest)
    parts = [read_shard(Path(directory) / s["file"], manifest["data"]["num_classes"]) for s in manifest["shards"]]
    ids = np.concatenate([p[0] for p in parts])
    probs = np.concatenate([p[1] for p in parts])
    order = np.argsort(ids)
    return torch.from_numpy(ids[order]), torch.from_numpy(probs[order])
