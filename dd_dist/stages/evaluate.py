"""`dd-dist evaluate`: standard dropout, MC dropout at each K (several seeds) and the distilled
student on the test split: error, NLL, ECE, Brier, reliability bins and latency.

Writes run_dir/eval/results.json (layout.RunDir.results) and logs to MLflow an "evaluate" stage run
(the MC curve: error and NLL over K as steps, results.json) with one child run per method: `standard`,
`mc-K` for each K, `distilled`. Every method run carries the same metric keys (METHOD_METRICS) and
says its method, K, dataset, arch, p and pipeline run as params and tags, so the MLflow UI charts
"method" as a dimension and runs with different eval.ks line up. The test split is read batch by batch
(test_batches), never held whole; latency counts the predictions, not the reading.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm import tqdm

from dd_dist.config import Config
from dd_dist.core.heads import UncertaintyStudent
from dd_dist.core.mc import entropy, full_precision, mc_estimate, standard_probs, uncertainty
from dd_dist.core.metrics import classification_metrics, reliability_bins
from dd_dist.core.models import check_fits, load_model
from dd_dist.core.precision import autocast, check_precision
from dd_dist.core.splitmix import row_rng_seed
from dd_dist.data.splits import Split
from dd_dist.errors import UserError
from dd_dist.files import write_json
from dd_dist.infra.cluster import open_split
from dd_dist.infra.tracking import Tracker, active_run_id
from dd_dist.layout import RunDir

# mutual_info: the mean over the test rows of H[mean] - E_k H[p_k]; 0 for a one-pass method, whose one
# deterministic prediction has no spread over masks (dd_dist.core.mc.uncertainty)
QUALITY = ("error", "nll", "ece", "brier", "entropy", "mutual_info")
SPEED = ("latency_ms", "images_per_s")
# Each method run's metrics; for MC the mean over eval.repeats seeds, `_std` their spread (0: one pass
# has no masks to vary, only its latency varies).
METHOD_METRICS = (*QUALITY, *SPEED, "forward_passes", *(f"{key}_std" for key in QUALITY), "latency_ms_std")
EVAL_SEED_SALT = 0xE7A1  # evaluation masks must not repeat the label stage's masks

# (images, row ids) -> (probabilities, expected entropy over the method's masks)
Predict = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def run(cfg: Config, parent: str | None = None) -> Path:
    """Score every method on the test split under an MLflow "evaluate" run; returns run_dir/eval/results.json."""
    evaluate(cfg, parent)
    return RunDir(cfg).results


def evaluate(cfg: Config, parent_run_id: str | None = None) -> dict:
    """Score every method on the test split; returns what run_dir/eval/results.json holds."""
    run = RunDir(cfg)
    run.check_writable(run.results.parent)
    split = open_split(cfg, "test")
    e, tracker, device = cfg.eval, Tracker(cfg), eval_device(cfg)
    teacher = _load_checked(run.teacher, split, "teacher").to(device)
    student = _load_checked(run.student, split, "student").to(device) if run.student.is_file() else None
    one_pass = lambda model: on_device(lambda x, ids: _one_pass(model, x), device, e.precision)  # noqa: E731
    pipeline_run_id = parent_run_id or active_run_id()
    with _torch_threads(e.threads), tracker.stage_run("evaluate", parent_run_id, eval_ks=e.ks) as run_id:
        results = {"dataset": split.name, "arch": cfg.model.arch, "test_images": len(split),
                   "data_fingerprint": split.fingerprint, "batch_size": e.batch_size, "device": str(device),
                   "precision": e.precision,
                   "threads": torch.get_num_threads(), "ece_bins": e.ece_bins, "methods": {}, "notes": []}
        steps = 1 + len(e.ks) * e.repeats + (student is not None)
        with tqdm(total=steps, desc="evaluate", unit="pass") as bar:
            # One-pass methods are timed as often as MC runs seeds, so each latency is a mean of as many runs.
            results["methods"]["standard"], _ = _score(one_pass(teacher), split, e, 1, bar, timings=e.repeats)
            mutual_info = {}  # per test row, of each K's first seed: what an uncertainty head is compared with
            for k in e.ks:
                results["methods"][f"mc-{k}"], mutual_info[k] = _score_mc(teacher, split, cfg, k, bar, device)
            if student is not None:
                results["methods"]["distilled"], _ = _score(one_pass(student), split, e, 1, bar, timings=e.repeats)
                if isinstance(student, UncertaintyStudent) and e.ks:
                    k = max(e.ks)
                    results["methods"]["distilled"]["uncertainty"] = head_agreement(
                        on_device(lambda x, ids: student(x, uncertainty=True)[1:], device, e.precision), split,
                        e.batch_size, f"mc-{k}", mutual_info[k])
            else:
                results["notes"].append(f"no student at {run.student}: distilled skipped")
        write_json(run.results, results)
        tracker.log_metrics({"test_images": len(split)}, run_id=run_id)
        for k in e.ks:  # the MC curve as a stepped series, for MLflow's charts
            mc = results["methods"][f"mc-{k}"]
            tracker.log_metrics({"mc_curve/error_mean": mc["error_mean"], "mc_curve/nll_mean": mc["nll_mean"]},
                                step=k, run_id=run_id)
        tracker.log_artifact(run.results, run_id=run_id)
        if run_id:
            _log_method_runs(tracker, cfg, results, run_id, pipeline_run_id)
    print(format_table(results))
    agreement = results["methods"].get("distilled", {}).get("uncertainty")
    if agreement:
        print(f"uncertainty head vs {agreement['reference']} mutual information: Spearman {agreement['spearman']:.3f}, "
              f"MAE {agreement['mae']:.4f} nats (means {agreement['head_mean']:.4f} vs {agreement['reference_mean']:.4f})")
    for note in results["notes"]:
        print(f"note: {note}")
    return results


def method_metrics(m: dict) -> dict[str, float]:
    """METHOD_METRICS of one results.json method: MC's means over seeds under the plain names."""
    mc = "k" in m
    out = {key: m[f"{key}_mean"] if mc else m[key] for key in (*QUALITY, *SPEED)}
    out.update({f"{key}_std": m[f"{key}_std"] if mc else 0.0 for key in QUALITY})
    out.update(latency_ms_std=m["latency_ms_std"], forward_passes=m["forward_passes"])
    if "uncertainty" in m:  # a student's uncertainty head against MC's mutual information
        out.update({f"uncertainty_{key}": m["uncertainty"][key] for key in ("spearman", "mae")})
    return out


def head_agreement(head_of: Predict, split: Split, batch_size: int, name: str, reference: torch.Tensor) -> dict:
    """The student head's mutual information (head_of(x, ids): (the head's output,)) on the test split against
    `reference`, MC's per row (the MC method `name`, the masks of its first seed): Spearman rank correlation
    and mean absolute error in nats."""
    with torch.inference_mode():
        head = torch.cat([head_of(x, ids)[0].double() for x, ids in test_batches(split, batch_size)])
    return {"reference": name, "spearman": float(spearmanr(head, reference).statistic),
            "mae": float((head - reference).abs().mean()), "head_mean": float(head.mean()),
            "reference_mean": float(reference.mean())}


def _log_method_runs(tracker: Tracker, cfg: Config, results: dict, evaluate_run_id: str,
                     pipeline_run_id: str | None) -> None:
    """One child run of the evaluate run per method, with the same metric keys, params and tags."""
    for method, m in results["methods"].items():
        about = {"method": method, "K": m["forward_passes"], "dataset": results["dataset"], "arch": results["arch"],
                 "dropout_p": cfg.model.p, "pipeline_run": pipeline_run_id or "none", "evaluate_run": evaluate_run_id}
        with tracker.stage_run("method", evaluate_run_id, run_name=method, params=about, **about) as child:
            tracker.log_metrics(method_metrics(m), run_id=child)


def format_table(results: dict) -> str:
    lines = [f"{results['dataset']} / {results['arch']}, {results['test_images']} test images, "
             f"{results['threads']} threads",
             f"{'method':<10} {'passes':>6} {'error %':>8} {'± std':>6} {'NLL':>7} {'ECE':>7} {'Brier':>7} "
             f"{'ms/img':>8} {'img/s':>9} {'MI':>7}"]
    for method, m in results["methods"].items():
        get = (lambda key: m[f"{key}_mean"]) if method.startswith("mc") else (lambda key: m[key])
        std = f"{100 * m['error_std']:6.2f}" if method.startswith("mc") else " " * 6
        lines.append(f"{method:<10} {m['forward_passes']:>6} {100 * get('error'):8.2f} {std} {get('nll'):7.4f} "
                     f"{get('ece'):7.4f} {get('brier'):7.4f} {get('latency_ms'):8.4f} {get('images_per_s'):9.0f} "
                     f"{get('mutual_info'):7.4f}")
    return "\n".join(lines)


def _score(predict: Predict, split: Split, e, passes: int, bar: tqdm, warm_up: bool = True,
           timings: int = 1) -> tuple[dict, torch.Tensor]:
    """Quality of one prediction of the split, its speed from `timings` timed runs (mean, std); and each
    row's mutual information."""
    runs = [_timed_predict(predict, split, e.batch_size, warm_up and i == 0) for i in range(timings)]
    (probs, expected_entropy), labels = runs[0][0], torch.from_numpy(split.y)
    latency = [1000 * seconds / len(split) for _, seconds in runs]
    bar.update()
    bar.set_postfix(images_per_s=f"{1000 / latency[0]:.0f}")
    spread = uncertainty(probs, expected_entropy)
    return {**classification_metrics(probs, labels, e.ece_bins), "entropy": float(spread["entropy"].mean()),
            "mutual_info": float(spread["mutual_info"].mean()), "latency_ms": statistics.fmean(latency),
            "latency_ms_std": statistics.stdev(latency) if timings > 1 else 0.0,
            "images_per_s": 1000 / statistics.fmean(latency), "forward_passes": passes,
            "reliability": reliability_bins(probs, labels, e.ece_bins)}, spread["mutual_info"]


def _score_mc(teacher, split: Split, cfg: Config, k: int, bar: tqdm, device: torch.device) -> tuple[dict, torch.Tensor]:
    """MC dropout with K masks, once per seed; mean and sample std over the seeds; and the first seed's
    mutual information per row."""
    runs, first_mutual_info = [], None
    for repeat in range(cfg.eval.repeats):
        seed = row_rng_seed(cfg.seed, EVAL_SEED_SALT, repeat)

        def predict(x, ids, seed=seed):
            estimate = mc_estimate(teacher, x, ids, k, seed)
            return estimate.probs, estimate.expected_entropy

        scored, mutual_info = _score(on_device(predict, device, cfg.eval.precision), split, cfg.eval, k, bar,
                                     warm_up=repeat == 0)
        runs.append(scored)
        first_mutual_info = mutual_info if first_mutual_info is None else first_mutual_info
    out = {"k": k, "forward_passes": k, "repeats": len(runs), "reliability": runs[0]["reliability"]}
    for key in (*QUALITY, *SPEED):
        values = [r[key] for r in runs]
        out[f"{key}_mean"] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[f"{key}_per_seed"] = values
    return out, first_mutual_info


def test_batches(split: Split, batch_size: int):
    """(images, ids) of the split, batch by batch, each read and decoded when it is reached: the split is
    never held whole."""
    for start in range(0, len(split), batch_size):
        ids = np.arange(start, min(start + batch_size, len(split)))
        yield torch.from_numpy(split.images(ids)), torch.from_numpy(ids)


def _timed_predict(predict: Predict, split: Split, batch_size: int, warm_up: bool):
    """(probabilities, expected entropy) of the whole split, batch by batch, and the time its predictions took
    (reading and decoding the images excluded: they are the data pipeline's, not the method's)."""
    parts, seconds = [], 0.0
    with torch.inference_mode():
        for i, (x, ids) in enumerate(test_batches(split, batch_size)):
            if warm_up and i == 0:  # first-call allocations are not per-image latency
                predict(x, ids)
            _synchronize()
            start = time.perf_counter()
            parts.append(predict(x, ids))
            _synchronize()
            seconds += time.perf_counter() - start
    return tuple(torch.cat(column) for column in zip(*parts)), seconds


def eval_device(cfg: Config) -> torch.device:
    """The GPU with cluster.use_gpu (refused in one line where there is none), else the CPU; checked for
    eval.precision."""
    if cfg.cluster.use_gpu and not torch.cuda.is_available():
        raise UserError(f"cluster.use_gpu=true, but evaluate runs where torch {torch.__version__} sees no CUDA device")
    device = torch.device("cuda" if cfg.cluster.use_gpu else "cpu")
    check_precision(cfg.eval.precision, device, "eval.precision")
    return device


def on_device(predict: Predict, device: torch.device, precision: str) -> Predict:
    """predict on `device` in `precision` (autocast), its outputs back on the CPU: the copy back waits for
    the device, so a timed call counts the whole prediction."""

    def run(x: torch.Tensor, ids: torch.Tensor):
        with autocast(precision, device):
            out = predict(x.to(device), ids.to(device))
        return tuple(full_precision(t).cpu() for t in out)

    return run


def _one_pass(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic prediction: its expected entropy is its own entropy (no masks to vary)."""
    probs = standard_probs(model, x)
    return probs, entropy(probs.double())  # as uncertainty() takes H[mean]: their difference is exactly 0


def _load_checked(path: Path, split: Split, role: str):
    if not path.is_file():
        raise UserError(f"no {role} checkpoint at {path}: run `dd-dist {'teacher' if role == 'teacher' else 'distill'}` first")
    model, spec = load_model(path)
    check_fits(spec, split, f"{role} at {path}")
    return model


def _synchronize() -> None:
    """Wait for queued GPU work, so that a clock read brackets the work of the call alone."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def _torch_threads(threads: int):
    """The same torch thread count for every method; 0 keeps torch's default."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
