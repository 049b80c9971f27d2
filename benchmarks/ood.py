"""Out-of-distribution detection with one-pass uncertainty: `make bench-ood`.

    .venv/bin/python -m benchmarks.ood [--rows mnist-lenet,mnist-lenet_all] [--seeds 0,1,2] [--k 100] [overrides]

For each (row, seed), on that reproduction row's config (configs/reproduce/, teacher schedules chosen on
the validation split): the teacher of `make reproduce`'s run of that row and seed when it is there
(runs/reproduce/ROW-seedS, trained by the pipeline on this schedule), else one trained here; its MC labels
with each row's mutual information (K masks, computed in this process), and a student with an
uncertainty head distilled on them (distill.uncertainty). Then the MNIST test images (in distribution) against the Fashion-MNIST test
images (out of distribution; `make fashion-mnist` fetches them) and against the pixel-inverted MNIST
test images, each scored by:

    standard   max-softmax (1 - max p) and entropy of the weight-scaled teacher, one pass
    MC-K       entropy of the MC mean and mutual information, K passes
    distilled  the student's entropy and its uncertainty head, one pass

AUROC of telling out from in (0.5: no better than chance), the cost per image of each method measured
side by side on the same images, and the spread over seeds. Writes benchmarks/results/ood.{json,md}
and ood.png. The student's schedule is the config's unless overridden (`make bench-ood` shortens it).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from scipy.stats import rankdata

from benchmarks.report import RESULTS, machine, write_report
from benchmarks.reproduce import REPO, ROWS, full_row, kept_teacher_seconds, parse_rows
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
MNIST_ROWS = [row for row in ROWS if row.startswith("mnist-") and full_row(row) == row]  # full-width nets only
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


def row_config(row: str, seed: int, run_dir: Path | str, overrides: list[str]):
    config, row_overrides, _ = ROWS[row]
    return load_config(REPO / config, [*row_overrides, f"seed={seed}", f"run_dir={run_dir}", *overrides])


def teacher_of(row: str, seed: int, cfg, overrides: list[str]) -> tuple[float, str]:
    """Put the teacher in cfg's run_dir: `make reproduce`'s of this row and seed when it was trained on this
    schedule (copied), else one trained here. Returns its training seconds and where it came from."""
    kept = row_config(row, seed, REPO / "runs" / "reproduce" / f"{row}-seed{seed}", overrides)
    seconds = kept_teacher_seconds(kept)
    if seconds is not None:
        shutil.copytree(RunDir(kept).teacher.parent, RunDir(cfg).teacher.parent)
        return seconds, str(RunDir(kept).teacher.relative_to(REPO))
    began = time.perf_counter()
    train_teacher(cfg)
    return time.perf_counter() - began, "trained here (plain loop)"


def one_seed(row: str, overrides: list[str], seed: int, k: int, inside: torch.Tensor,
             labels: torch.Tensor, pairs: dict[str, torch.Tensor]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = row_config(row, seed, f"{tmp}/run", [f"label.k={k}", "distill.uncertainty=true",
                                                    f"tracking.uri=sqlite:///{tmp}/mlruns.db", *overrides])
        with contextlib.redirect_stdout(io.StringIO()):  # the epoch lines of two trainings
            teacher_s, teacher_from = teacher_of(row, seed, cfg, overrides)
            began = time.perf_counter()
            train_student(cfg)  # in-memory MC labels with the mutual information
            student_s = time.perf_counter() - began
        teacher, student = load_model(RunDir(cfg).teacher)[0], load_model(RunDir(cfg).student)[0]
    scores_in, seconds = scores_of(teacher, student, inside, k, seed ^ SEED_SALT)
    result = {"row": row, "arch": cfg.model.arch, "seed": seed, "teacher_seconds": teacher_s,
              "teacher_from": teacher_from, "student_seconds": student_s,
              "schedule": f"teacher {cfg.teacher.epochs} epochs at lr {cfg.teacher.lr} (steps {cfg.teacher.lr_steps}), "
                          f"student {cfg.distill.epochs} epochs at lr {cfg.distill.lr} (steps {cfg.distill.lr_steps})",
              "ms_per_image": {m: 1000 * s / len(inside) for m, s in seconds.items()}, "auroc": {}}
    for pair, outside in pairs.items():
        scores_out, _ = scores_of(teacher, student, outside, k, seed ^ SEED_SALT)
        result["auroc"][pair] = {key: auroc(scores_in[key], scores_out[key]) for key in scores_in}
    result["error"] = {"standard": float((standard_probs(teacher, inside).argmax(1) != labels).float().mean()),
                       "distilled": float((standard_probs(student, inside).argmax(1) != labels).float().mean())}
    return result


def summary(runs: list[dict]) -> dict:
    """Per (row, pair, score): mean and std over seeds; and the goal's comparison, per (row, pair)."""
    out = {}
    for row in dict.fromkeys(r["row"] for r in runs):
        mine = [r for r in runs if r["row"] == row]
        for pair in mine[0]["auroc"]:
            values = {key: [r["auroc"][pair][key] for r in mine] for key in mine[0]["auroc"][pair]}
            stats = {key: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                     for key, v in values.items()}
            best_student = max(("distilled/entropy", "distilled/uncertainty head"), key=lambda s: stats[s]["mean"])
            best_mc = max(("mc/entropy", "mc/mutual information"), key=lambda s: stats[s]["mean"])
            out[f"{row} / {pair}"] = {
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
             f"`{report['command']}` on {report['machine']}. Trained on MNIST's training split; in "
             f"distribution: the {report['images']} MNIST test images; out: Fashion-MNIST's test images, and "
             f"the MNIST test images pixel-inverted. AUROC of telling out from in, mean ± std over seeds "
             f"{report['seeds']}; MC with K={k}. Units (row, seed) done: {report['units_done']}.", "", "| row | seed | schedule | teacher | test error standard / "
             "distilled % |", "|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['seed']} | {r['schedule']} | {r['teacher_from']} | "
              f"{100 * r['error']['standard']:.2f} / {100 * r['error']['distilled']:.2f} |" for r in report["runs"]]
    lines.append("")
    for name, s in report["summary"].items():
        lines += [f"## {name}", "", "| score | passes | AUROC |", "|---|---|---|"]
        for key, v in s["scores"].items():
            passes = k if key.startswith("mc/") else 1
            lines.append(f"| {key.replace('mc/', f'MC-{k} ')} | {passes} | {v['mean']:.4f} ± {v['std']:.4f} |")
        lines += ["", f"Best one-pass student score: {s['best_student']} — {s['student_minus_mc']:+.4f} against MC's best "
                      f"({s['best_mc']}), {s['student_minus_max_softmax']:+.4f} against the standard net's max-softmax. "
                      f"Goal (within 0.003 of MC's best and above max-softmax): "
                      f"{'met' if s['within_0.003_of_mc'] and s['above_max_softmax'] else 'not met'}.", ""]
    lines += ["## Cost per image (ms, batch 500, mean over seeds)", "", "| row | standard | MC | distilled |",
              "|---|---|---|---|"]
    for row in dict.fromkeys(r["row"] for r in report["runs"]):
        mine = [r for r in report["runs"] if r["row"] == row]
        cost = {m: statistics.fmean(r["ms_per_image"][m] for r in mine) for m in SCORES}
        lines.append(f"| {row} | {cost['standard']:.4f} | {cost['mc']:.4f} | {cost['distilled']:.4f} |")
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
    parser.add_argument("--rows", default="mnist-lenet,mnist-lenet_all",
                        help=f"comma-separated reproduction rows trained on MNIST, of: {', '.join(MNIST_ROWS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="on top of each row's config")
    args = parser.parse_args()
    rows = parse_rows(parser, args.rows)
    if other := [row for row in rows if row not in MNIST_ROWS]:
        parser.error(f"--rows: {', '.join(other)} not trained on MNIST; of: {', '.join(MNIST_ROWS)}")
    mnist = load_split("mnist", "test")
    inside, labels = torch.from_numpy(mnist.x), torch.from_numpy(mnist.y)
    pairs = {"fashion-mnist": torch.from_numpy(load_split("fashion-mnist", "test", FASHION_MNIST_DIR).x),
             "inverted mnist": 1 - inside}
    seeds = [int(s) for s in args.seeds.split(",")]
    command = f"python -m benchmarks.ood --rows {args.rows} --seeds {args.seeds} --k {args.k} {' '.join(args.overrides)}"
    runs = []
    for row in rows:
        for seed in seeds:
            runs.append(one_seed(row, args.overrides, seed, args.k, inside, labels, pairs))
            print(f"{row} seed {seed}: " + ", ".join(f"{pair} {max(a.values()):.4f}" for pair, a in runs[-1]["auroc"].items()),
                  flush=True)
            # written after every (row, seed), so that a crash loses only the unit it was running
            report = {"command": command.strip(), **machine(), "k": args.k, "seeds": args.seeds, "images": len(inside),
                      "units_done": f"{len(runs)} of {len(rows) * len(seeds)}", "runs": runs, "summary": summary(runs)}
            plot(report, RESULTS / "ood.png")
            path = write_report("ood", report, markdown(report))
    print(path)

if __name__ == "__main__":
    main()
