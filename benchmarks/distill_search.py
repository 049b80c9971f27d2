"""`make distill-search`: the student's distillation settings, chosen on the validation split only.

    .venv/bin/python -m benchmarks.distill_search --rows mnist-lenet [--seed 0]
                                                  [--weight-decays 0.0005,0] [--lr-scales 1] [overrides]

The paper fixes the distillation schedule (the teacher's final lr, then a tenth) but not the weight decay,
and the pruned start of a smaller student may want another rate. This searches both from a finished
`make reproduce` unit of the row and seed (runs/reproduce/ROW-seedS; a smaller student's row reads its
full row's unit): its teacher and its stored MC labels. For each grid point (weight decay, lr scale: the
config's distill.lr times it, the steps unchanged) a student is distilled in this process (the plain loop,
dd_dist.core.loop: the same steps as the DeepSpeed workers, in another batch order), and the validation
error of each student is reported beside the teacher's (weight scaling, and MC with --k masks). The pick is
the lowest validation error (ties: the config's own point first). The test split is never read. Each
finished (row, seed) is merged at once into benchmarks/results/distill_search.{json,md}; the students stay
in runs/distill-search/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import time
from pathlib import Path

import torch

from benchmarks.report import RESULTS, merge_rows
from benchmarks.reproduce import REPO, ROWS, full_row, labelled_run, parse_rows
from benchmarks.schedule_search import validation_error
from dd_dist.config import load_config
from dd_dist.core.loop import train_student
from dd_dist.core.mc import mc_estimate
from dd_dist.core.models import load_model
from dd_dist.data.splits import run_split
from dd_dist.errors import UserError
from dd_dist.labels.format import check_labels_match, load_soft_labels, read_manifest

PATH = RESULTS / "distill_search.json"
VAL_SEED_SALT = 10**7  # the validation images' MC masks: row ids no training row has


def teacher_errors(teacher: torch.nn.Module, val, k: int, seed: int, batch: int = 500) -> dict:
    """The teacher's validation error with weight scaling and with MC over k masks."""
    x, y = torch.from_numpy(val.x), torch.from_numpy(val.y)
    wrong = sum((mc_estimate(teacher, x[s : s + batch], torch.arange(s, min(s + batch, len(y))) + VAL_SEED_SALT, k,
                             seed).probs.argmax(1) != y[s : s + batch]).sum().item() for s in range(0, len(y), batch))
    return {"standard": validation_error(teacher, val), f"mc{k}": wrong / len(y)}


def search_row(row: str, seed: int, weight_decays: list[float], lr_scales: list[float], k: int,
               overrides: list[str]) -> dict:
    config, row_overrides, _ = ROWS[row]
    runs = REPO / "runs" / "reproduce"
    source = labelled_run(runs, row, seed) or runs / f"{full_row(row)}-seed{seed}"
    teacher_file, labels = source / "teacher" / "model.pt", source / "labels"
    if not (teacher_file.is_file() and (labels / "manifest.json").is_file()):
        raise UserError(f"{source} has no finished teacher and labels: run `make reproduce SEEDS={seed} "
                        f"ROWS={full_row(row)}` first")
    base = load_config(REPO / config, [*row_overrides, f"seed={seed}", *overrides])
    train, val = run_split(base, "train"), run_split(base, "val")
    check_labels_match(read_manifest(labels), data_fingerprint=train.fingerprint, num_classes=train.num_classes,
                       zero_p=base.data.zero_p, flip_p=base.data.flip_p)
    ids, probs = load_soft_labels(labels)
    if not torch.equal(ids, torch.arange(len(train))):
        raise UserError(f"labels in {labels} do not cover the training split's rows 0..{len(train) - 1}")
    began = time.perf_counter()
    teacher = teacher_errors(load_model(teacher_file)[0].eval(), val, k, seed)
    print(f"distill-search: {row} seed {seed} teacher validation error {teacher}", flush=True)
    grid = []
    for weight_decay in weight_decays:
        for scale in lr_scales:
            lr = base.distill.lr * scale
            run_dir = REPO / "runs" / "distill-search" / f"{row}-seed{seed}" / f"wd{weight_decay:g}-lr{lr:g}"
            (run_dir / "teacher").mkdir(parents=True, exist_ok=True)
            shutil.copy(teacher_file, run_dir / "teacher" / "model.pt")  # distill.init=teacher starts from it
            cfg = load_config(REPO / config, [*row_overrides, f"seed={seed}", *overrides, f"run_dir={run_dir}",
                                              f"distill.weight_decay={weight_decay}", f"distill.lr={lr}"])
            start = time.perf_counter()
            student = load_model(train_student(cfg, probs))[0]
            grid.append({"weight_decay": weight_decay, "lr": lr, "lr_scale": scale,
                         "val_error": validation_error(student, val), "seconds": time.perf_counter() - start})
            print(f"distill-search: {row} seed {seed} weight decay {weight_decay:g} lr {lr:g}: validation error "
                  f"{100 * grid[-1]['val_error']:.2f} %", flush=True)
    configured = {"weight_decay": base.distill.weight_decay, "lr": base.distill.lr, "lr_steps": base.distill.lr_steps,
                  "epochs": base.distill.epochs, "width": base.distill.width}
    return {"row": row, "seed": seed, "config": config, "overrides": [*row_overrides, *overrides],
            "configured": configured, "teacher_from": str(source.relative_to(REPO)), "teacher_val": teacher,
            "grid": grid, "pick": best(grid, configured),
            "train_rows": len(train), "val_rows": len(val), "seconds": time.perf_counter() - began,
            "finished": datetime.datetime.now().isoformat(timespec="seconds")}


def best(grid: list[dict], configured: dict) -> dict:
    """The grid point of lowest validation error; on a tie the config's own point."""
    own = (configured["weight_decay"], configured["lr"])
    return min(grid, key=lambda g: (g["val_error"], (g["weight_decay"], g["lr"]) != own))


def with_earlier_points(path: Path, result: dict) -> dict:
    """result plus the grid points of earlier searches in the report at path from the same teacher, labels and
    settings that this one did not repeat, and the pick over all of them: searches of other grids add up."""
    same = ("row", "seed", "teacher_from", "teacher_val", "overrides", "configured")
    earlier = [r for r in (json.loads(path.read_text())["rows"] if path.is_file() else [])
               if all(r[k] == result[k] for k in same)]
    repeated = {(g["weight_decay"], g["lr"]) for g in result["grid"]}
    grid = [g for r in earlier for g in r["grid"] if (g["weight_decay"], g["lr"]) not in repeated] + result["grid"]
    return {**result, "grid": grid, "pick": best(grid, result["configured"])}


def markdown(report: dict) -> str:
    lines = ["# Distillation settings chosen on the validation split", "",
             "Produced by `python -m benchmarks.distill_search` (`make distill-search`): students distilled by the plain "
             "loop from a `make reproduce` unit's teacher and stored MC labels, on the row's distillation schedule "
             "except for the weight decay and the lr (the config's times a scale, the steps unchanged). Validation "
             "error % of each student, beside its teacher's; the test split is never read.", "",
             "| row | seed | teacher standard / MC | configured (wd, lr) | grid: val error % at (wd, lr) | pick |",
             "|---|---:|---|---|---|---|"]
    for r in report["rows"]:
        mc = next(m for m in r["teacher_val"] if m.startswith("mc"))
        c, p = r["configured"], r["pick"]
        points = "; ".join(f"{100 * g['val_error']:.2f} at ({g['weight_decay']:g}, {g['lr']:g})" for g in r["grid"])
        lines.append(f"| {r['row']} | {r['seed']} | {100 * r['teacher_val']['standard']:.2f} / "
                     f"{100 * r['teacher_val'][mc]:.2f} ({mc}) | ({c['weight_decay']:g}, {c['lr']:g}) | {points} | "
                     f"({p['weight_decay']:g}, {p['lr']:g}): {100 * p['val_error']:.2f} |")
    lines += ["", "Epochs and lr steps: the row's config (the paper's rule: 20 epochs at the teacher's final lr, then 10 "
              "at a tenth of it). Each row's search time is in the JSON."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="mnist-lenet", help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--seed", type=int, default=0, help="the reproduce unit's seed (its teacher and labels)")
    parser.add_argument("--weight-decays", default="0.0005,0", help="the student's L2 weight decay")
    parser.add_argument("--lr-scales", default="1", help="the student's lr: the config's distill.lr times each")
    parser.add_argument("--k", type=int, default=100, help="MC masks for the teacher's validation error")
    parser.add_argument("--report", type=Path, default=PATH, help="the JSON report (and its .md) to merge into")
    parser.add_argument("overrides", nargs="*", help="config overrides for every student (e.g. distill.epochs=10)")
    args = parser.parse_args()
    rows = parse_rows(parser, args.rows)
    decays, scales = [float(v) for v in args.weight_decays.split(",")], [float(v) for v in args.lr_scales.split(",")]
    for row in rows:
        try:
            result = search_row(row, args.seed, decays, scales, args.k, args.overrides)
        except UserError as error:  # a missing unit, or labels of other data: one line, exit 2
            parser.exit(2, f"distill-search: {error}\n")
        merge_rows(args.report, with_earlier_points(args.report, result), markdown,
                   key=lambda r: (list(ROWS).index(r["row"]), r["seed"]))
    print(f"distill-search: report in {args.report.with_suffix('.md')}")


if __name__ == "__main__":
    main()
