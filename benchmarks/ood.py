"""Out-of-distribution detection with one-pass uncertainty: `make bench-ood`.

    .venv/bin/python -m benchmarks.ood [--seeds 0,1,2] [--archs lenet] [--config configs/demo.yaml] [--k 100]

For each (arch, seed): a teacher trained on MNIST, its MC labels with each row's mutual information
(K masks, computed in this process), and a student with an uncertainty head distilled on them
(distill.uncertainty). Then the MNIST test images (in distribution) against the Fashion-MNIST test
images (out of distribution; `make fashion-mnist` fetches them) and against the pixel-inverted MNIST
test images, each scored by:

    standard   max-softmax (1 - max p) and entropy of the weight-scaled teacher, one pass
    MC-K       entropy of the MC mean and mutual information, K passes
    distilled  the student's entropy and its uncertainty head, one pass

AUROC of telling out from in (0.5: no better than chance), the cost per image of each method measured
side by side on the same images, and the spread over seeds. Writes benchmarks/results/ood.{json,md}
and ood.png. The schedule is the config's (default: the demo's, minutes per seed on 2 cores), stated in
the report: not the reproduction configs' longer ones.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from scipy.stats import rankdata

from benchmarks.report import RESULTS, machine, write_report
from dd_dist.config import load_config
from dd_dist.data.sources import FASHION_MNIST_DIR
from dd_dist.data.splits import load_split
from dd_dist.core.loop import train_student, train_teacher
from dd_dist.core.mc import entropy, mc_estimate, standard_probs
from dd_dist.core.models import load_model
from dd_dist.layout import RunDir

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SCORES = {  # method -> its scores, higher = more likely out of distribution
    "standard": ("max-softmax", "entropy"),
    "mc": ("entropy", "mutual information"),
    "distilled": ("entropy", "uncertainty head"),
}
BATCH = 500
SEED_SALT = 0x00D  # masks of this benchmark, not the label stage's


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(score of an outside image > score of an inside one), ties counting half (Mann-Whitney)."""
    ranks = rankdata(np.concatenate([inside, outside]))
    return float((ranks[len(inside):].sum() - len(outside) * (len(outside) + 1) / 2) / (len(inside) * len(outside)))


def scores_of(teacher, student, x: torch.Tensor, k: int, seed: int) -> tuple[dict, dict]:
    """Every score of every image of x, and the seconds each method took for them."""
    out = {f"{m}/{s}": [] for m, names in SCORES.items() for s in names}
    seconds = dict.fromkeys(SCORES, 0.0)
    ids = torch.arange(len(x))
    with torch.inference_mode():
        for start in range(0, len(x), BATCH):
            rows = slice(start, start + BATCH)
            began = time.perf_counter()
            probs = standard_probs(teacher, x[rows])
            seconds["standard"] += time.perf_counter() - began
            out["standard/max-softmax"].append(1 - probs.amax(1))
            out["standard/entropy"].append(entropy(probs))
            began = time.perf_counter()
            estimate = mc_estimate(teacher, x[rows], ids[rows], k, seed)
            seconds["mc"] += time.perf_counter() - began
            u = estimate.uncertainty()
            out["mc/entropy"].append(u["entropy"])
            out["mc/mutual information"].append(u["mutual_info"])
            began = time.perf_counter()
            logits, head = student(x[rows], uncertainty=True)
            seconds["distilled"] += time.perf_counter() - began
            out["distilled/entropy"].append(entropy(torch.softmax(logits, 1)))
            out["distilled/uncertainty head"].append(head)
    return {key: torch.cat(v).double().numpy() for key, v in out.items()}, seconds


def one_seed(config: str, overrides: list[str], arch: str, seed: int, k: int, inside: torch.Tensor,
             labels: torch.Tensor, pairs: dict[str, torch.Tensor]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, [f"run_dir={tmp}/run", f"seed={seed}", f"model.arch={arch}", f"label.k={k}",
                                   "distill.uncertainty=true", f"tracking.uri=sqlite:///{tmp}/mlruns.db", *overrides])
        began = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the epoch lines of two trainings
            train_teacher(cfg)
            train_student(cfg)  # in-memory MC labels with the mutual information
        trained_s = time.perf_counter() - began
        teacher, student = load_model(RunDir(cfg).teacher)[0], load_model(RunDir(cfg).student)[0]
    scores_in, seconds = scores_of(teacher, student, inside, k, seed ^ SEED_SALT)
    result = {"arch": arch, "seed": seed, "train_seconds": trained_s,
              "ms_per_image": {m: 1000 * s / len(inside) for m, s in seconds.items()}, "auroc": {}}
    for pair, outside in pairs.items():
        scores_out, _ = scores_of(teacher, student, outside, k, seed ^ SEED_SALT)
        result["auroc"][pair] = {key: auroc(scores_in[key], scores_out[key]) for key in scores_in}
    result["error"] = {"standard": float((standard_probs(teacher, inside).argmax(1) != labels).float().mean()),
                       "distilled": float((standard_probs(student, inside).argmax(1) != labels).float().mean())}
    return result


def summary(runs: list[dict]) -> dict:
    """Per (arch, pair, score): mean and std over seeds; and the goal's comparison, per (arch, pair)."""
    out = {}
    for arch in sorted({r["arch"] for r in runs}):
        mine = [r for r in runs if r["arch"] == arch]
        for pair in mine[0]["auroc"]:
            values = {key: [r["auroc"][pair][key] for r in mine] for key in mine[0]["auroc"][pair]}
            stats = {key: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                     for key, v in values.items()}
            best_student = max(("distilled/entropy", "distilled/uncertainty head"), key=lambda s: stats[s]["mean"])
            best_mc = max(("mc/entropy", "mc/mutual information"), key=lambda s: stats[s]["mean"])
            out[f"{arch} / {pair}"] = {
                "scores": stats, "seeds": [r["seed"] for r in mine], "best_student": best_student, "best_mc": best_mc,
                "student_minus_mc": stats[best_student]["mean"] - stats[best_mc]["mean"],
                "student_minus_max_softmax": stats[best_student]["mean"] - stats["standard/max-softmax"]["mean"],
                "within_0.003_of_mc": stats[best_student]["mean"] >= stats[best_mc]["mean"] - 0.003,
                "above_max_softmax": stats[best_student]["mean"] > stats["standard/max-softmax"]["mean"],
            }
    return out


def markdown(report: dict) -> str:
    k = report["k"]
    lines = ["# Out-of-distribution detection: one-pass uncertainty against MC dropout", "",
             f"`{report['command']}` on {report['machine']}. Trained on MNIST ({report['schedule']}); in "
             f"distribution: the {report['images']} MNIST test images; out: Fashion-MNIST's test images, and "
             f"the MNIST test images pixel-inverted. AUROC of telling out from in, mean ± std over seeds "
             f"{report['seeds']}; MC with K={k}.", ""]
    for name, s in report["summary"].items():
        lines += [f"## {name}", "", "| score | passes | AUROC |", "|---|---|---|"]
        for key, v in s["scores"].items():
            passes = k if key.startswith("mc/") else 1
            lines.append(f"| {key.replace('mc/', f'MC-{k} ')} | {passes} | {v['mean']:.4f} ± {v['std']:.4f} |")
        lines += ["", f"Best one-pass student score: {s['best_student']} — {s['student_minus_mc']:+.4f} against MC's best "
                      f"({s['best_mc']}), {s['student_minus_max_softmax']:+.4f} against the standard net's max-softmax. "
                      f"Goal (within 0.003 of MC's best and above max-softmax): "
                      f"{'met' if s['within_0.003_of_mc'] and s['above_max_softmax'] else 'not met'}.", ""]
    lines += ["## Cost per image (ms, batch 500, mean over seeds)", "", "| arch | standard | MC | distilled |",
              "|---|---|---|---|"]
    for arch in sorted({r["arch"] for r in report["runs"]}):
        mine = [r for r in report["runs"] if r["arch"] == arch]
        cost = {m: statistics.fmean(r["ms_per_image"][m] for r in mine) for m in SCORES}
        lines.append(f"| {arch} | {cost['standard']:.4f} | {cost['mc']:.4f} | {cost['distilled']:.4f} |")
    lines += ["", "![AUROC per score](ood.png)", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    names = list(report["summary"])
    keys = list(next(iter(report["summary"].values()))["scores"])
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        stats = report["summary"][name]["scores"]
        ax.bar(np.arange(len(keys)) + i * width, [stats[k]["mean"] for k in keys], width,
               yerr=[stats[k]["std"] for k in keys], capsize=2, label=name)
    ax.set_xticks(np.arange(len(keys)) + width * (len(names) - 1) / 2, [k.replace("/", "\n") for k in keys], fontsize=7)
    ax.set(ylabel="AUROC", ylim=(0.5, 1.0), title="MNIST in distribution vs out: AUROC per score")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--archs", default="lenet")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="on top of --config")
    args = parser.parse_args()
    mnist = load_split("mnist", "test")
    inside, labels = torch.from_numpy(mnist.x), torch.from_numpy(mnist.y)
    pairs = {"fashion-mnist": torch.from_numpy(load_split("fashion-mnist", "test", FASHION_MNIST_DIR).x),
             "inverted mnist": 1 - inside}
    runs = []
    for arch in args.archs.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            runs.append(one_seed(args.config, args.overrides, arch, seed, args.k, inside, labels, pairs))
            print(f"{arch} seed {seed}: " + ", ".join(f"{pair} {max(a.values()):.4f}" for pair, a in runs[-1]["auroc"].items()),
                  flush=True)
    cfg = load_config(args.config, args.overrides)
    report = {"command": f"python -m benchmarks.ood --seeds {args.seeds} --archs {args.archs} --config {args.config} "
                         f"--k {args.k} {' '.join(args.overrides)}".strip(),
              **machine(), "k": args.k, "seeds": args.seeds, "images": len(inside),
              "schedule": f"{args.config}: {cfg.data.train_rows or 'all'} training images, teacher {cfg.teacher.epochs} "
                          f"epochs at lr {cfg.teacher.lr}, student {cfg.distill.epochs} epochs at lr {cfg.distill.lr}",
              "runs": runs, "summary": summary(runs)}
    plot(report, RESULTS / "ood.png")
    print(write_report("ood", report, markdown(report)))


if __name__ == "__main__":
    main()
