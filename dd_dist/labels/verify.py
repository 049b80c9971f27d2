"""`dd-dist verify LABELS --teacher CKPT`: check a label directory against its teacher and data.

In order, each failure a one-line UserError naming the cause: the manifest's fields; the teacher's
architecture and dropout p, then its sha256; every shard present with the manifest's checksum and
the rows adding up; the data's fingerprint; and last a replay of `rows` random rows.

The replay recomputes the rows with the manifest's seed and K, and its MC scheme (antithetic masks,
control variate, adaptive K: the manifest's "scheme" entry, the plain K-mask mean without one). A
row's MC masks depend only on (seed, row id, layer, k) and the scheme, so the teacher gives back the
same probabilities up to float rounding, and under adaptive K the same K per row, which must equal
the shards' `k` column, and the same uncertainty columns where the manifest lists them (within
ENTROPY_TOLERANCE nats); stored in the manifest's format (float16 rounding, top-k rebuild) they must match the stored rows.
Tolerance on the mean KL(stored || recomputed), both in the stored format: 1e-5 (1e-4 for labels computed in
bf16 / fp16, label.precision, which the replay uses too). Float rounding of
another batch composition or of a GPU (TF32 convolutions, ~1e-3 relative on logits) moves a
probability p by at most ~1e-3 p, a KL of ~1e-6 per row, and a float16 value that the rounding
pushes across a rounding boundary moves by one ulp (2^-11 p), a KL below 2e-7. A label of another
seed, K, input or teacher differs by the MC noise itself, a KL of order (classes - 1) / (2K)
for an uncertain row (2e-3 at K = 100 over ten classes), and shuffled rows by far more.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from dd_dist.config import Config
from dd_dist.core.models import load_model
from dd_dist.data.splits import load_split
from dd_dist.errors import UserError
from dd_dist.files import file_sha256
from dd_dist.infra.cluster import open_split
from dd_dist.labels.actors import label_rows
from dd_dist.labels.format import UNCERTAINTY, check_labels_match, check_shards, read_manifest, read_shard, stored_probs
from dd_dist.schemes import MCScheme

KL_TOLERANCE = 1e-5
# bf16 / fp16 labels (label.precision): a layer's output rounds to 2^-8 (bf16) relative, and another batch or
# device may round an element the other way; the replay then differs by more than float32's rounding, while
# another seed or K still differs by the MC noise, ~(classes - 1) / (2K) for an uncertain row.
HALF_KL_TOLERANCE = 1e-4
# float32 entropies of a float rounding apart (another batch, a GPU): ~1e-3 relative on a probability moves an
# entropy by ~1e-3 nats at most; another seed's MC noise moves a mutual information by ~(classes - 1) / (2K).
ENTROPY_TOLERANCE = 2e-3


def reference_split(manifest: dict, cfg: Config):
    """The data the labels must come from: the configured data when the config sets any data field
    or the seed (-c or overrides), else the dataset named in the manifest, reloaded afresh."""
    if cfg.data.model_fields_set or "seed" in cfg.model_fields_set:
        return open_split(cfg, "train")
    data = manifest["data"]
    return load_split(data["name"], data.get("split", "train"), cfg.data.path, data["rows"], manifest["seed"],
                      cfg.data.cache_dir, data.get("transform"), data.get("channels"), cfg.data.skip_bad)


def check_teacher(manifest: dict, teacher_file: Path) -> torch.nn.Module:
    teacher, spec = load_model(teacher_file)
    made_by = manifest["teacher"]["spec"]
    if spec["arch"] != made_by["arch"] or spec["p"] != manifest["p"]:
        raise UserError(f"labels were made with {made_by['arch']} p={manifest['p']}, "
                        f"the teacher is {spec['arch']} p={spec['p']}")
    if spec != made_by:
        raise UserError(f"labels were made with teacher spec {made_by}, {teacher_file} has {spec}")
    if file_sha256(teacher_file) != manifest["teacher"]["sha256"]:
        raise UserError(f"labels were made by another teacher than {teacher_file} (sha256 differs)")
    return teacher


def stored_rows(directory: Path, manifest: dict, ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The stored distributions of sorted row ids, reading only the shards that hold them, and their
    stored `k` and uncertainty columns, those the shards have (a fixed K is in the manifest only)."""
    out = np.zeros((len(ids), manifest["data"]["num_classes"]), np.float32)
    columns: dict[str, np.ndarray] = {}
    for shard in manifest["shards"]:
        inside = (ids >= shard["first_id"]) & (ids < shard["first_id"] + shard["rows"])
        if inside.any():
            path = directory / shard["file"]
            shard_ids, probs = read_shard(path, out.shape[1])
            rows = np.searchsorted(shard_ids, ids[inside])
            out[inside] = probs[rows]
            for name in {"k", *UNCERTAINTY} & set(pq.read_schema(path).names):
                values = pq.read_table(path, columns=[name]).column(name).to_numpy()[rows]
                columns.setdefault(name, np.zeros(len(ids), values.dtype))[inside] = values
    return out, columns


def verify_labels(directory, teacher_file, rows: int, cfg: Config) -> dict:
    """Run every check (see the module doc); returns {"rows", "mean_kl", "tolerance"} on success."""
    directory, teacher_file = Path(directory), Path(teacher_file)
    manifest = read_manifest(directory)
    teacher = check_teacher(manifest, teacher_file)
    check_shards(directory, manifest)
    split = reference_split(manifest, cfg)
    aug = manifest["augmentation"]
    check_labels_match(manifest, data_fingerprint=split.fingerprint, num_classes=split.num_classes,
                       zero_p=aug["zero_p"], flip_p=aug["flip_p"])

    ids = np.sort(np.random.default_rng().choice(len(split), size=min(rows, len(split)), replace=False))
    stored, columns = stored_rows(directory, manifest, ids)
    stored, stored_k = torch.from_numpy(stored).double(), columns.get("k")
    try:
        scheme = MCScheme.from_record(manifest.get("scheme"), manifest["k"])
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"the manifest's MC scheme {manifest.get('scheme')} is invalid: {e}") from None
    estimate = label_rows(teacher, torch.from_numpy(split.images(ids)), torch.from_numpy(ids), scheme,
                          manifest["seed"], aug["zero_p"], aug["flip_p"], manifest["precision"])
    fresh, fresh_k = estimate.probs.numpy(), estimate.k.numpy()
    if scheme.adaptive and (stored_k is None or not np.array_equal(stored_k, fresh_k)):
        wrong = len(ids) if stored_k is None else int((stored_k != fresh_k).sum())
        raise UserError(f"labels disagree with the teacher: the stored K of {wrong} of {len(ids)} replayed rows "
                        f"differs from the K their scheme gives them")
    storage = manifest["storage"]
    fresh = torch.from_numpy(stored_probs(fresh, storage["dtype"], storage["topk"] or 0)).double()
    kl = (torch.xlogy(stored, stored) - stored * fresh.clamp_min(1e-8).log()).sum(1).mean().item()
    tolerance = KL_TOLERANCE if manifest["precision"] == "fp32" else HALF_KL_TOLERANCE
    if not kl <= tolerance:
        raise UserError(f"labels disagree with the teacher: mean KL {kl:.3g} over {len(ids)} replayed rows "
                        f"exceeds the tolerance {tolerance:g}")
    _check_uncertainty(manifest, columns, estimate.uncertainty(), len(ids))
    return {"rows": len(ids), "mean_kl": kl, "tolerance": tolerance}


def _check_uncertainty(manifest: dict, stored: dict[str, np.ndarray], fresh: dict[str, torch.Tensor], rows: int) -> None:
    """The manifest's uncertainty columns are in the shards and agree with the replay within ENTROPY_TOLERANCE."""
    for name in manifest.get("uncertainty", []):
        if name not in stored:
            raise UserError(f"the manifest lists the column {name!r} but the shards lack it")
        worst = float(np.abs(stored[name] - fresh[name].numpy()).max())
        if not worst <= ENTROPY_TOLERANCE:
            raise UserError(f"labels disagree with the teacher: stored {name} differs from the replay by up to "
                            f"{worst:.3g} nats over {rows} replayed rows (tolerance {ENTROPY_TOLERANCE:g})")
