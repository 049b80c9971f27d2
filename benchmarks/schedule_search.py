"""`make schedule-search`: each reproduction row's teacher schedule, chosen on the validation split only.

    .venv/bin/python -m benchmarks.schedule_search [--rows mnist-lenet,mnist-lenet_all,mnist-mlp]
                                                   [--lrs 0.001,0.01,0.03] [--steps 10,20] [--tail 10]

The grid; everything else stays as the paper has it (SGD with momentum 0.9, weight decay 5e-4, batch 64,
the row's dropout p, seed 0):
    lr      --lrs: the paper's stated 0.001 (which under-trains in PyTorch), Caffe's LeNet example 0.01, 0.03
    step    --steps: the epoch after which lr drops to lr * teacher.lr_gamma (0.1 in every config, as in the paper; step 20)
    epochs  step + 1 ... step + --tail: each epoch after the step is a grid point (the paper: step + 10)
A grid point (lr, step, epochs) is the schedule "step epochs at lr, then epochs - step at lr * gamma". The
points of one lr share their prefix, so each lr is one trajectory at lr up to the last step, saved at every
step point, and one branch per step point at lr * gamma for --tail epochs, with the standard (weight-scaled)
net's validation error after each of its epochs: max(steps) + len(steps) * tail epochs per lr, not one run
per point. The pick is the lowest validation error (ties: fewer epochs). The test split is never read.

The plain single-process loop (dd_dist.core.loop) trains here: the same steps as the DeepSpeed workers, in
another batch order. Each finished row is merged at once (replacing an earlier search of that row) into
benchmarks/results/schedule_search.{json,md}, so invocations with other --rows add to one report. Picks go,
by hand and commented, to configs/reproduce/.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import time
from pathlib import Path

import torch

from benchmarks.report import merge_rows
from benchmarks.reproduce import REPO, RESULTS, ROWS, parse_rows
from dd_dist.config import load_config
from dd_dist.core.loop import make_optimizer, train_epoch
from dd_dist.core.splitmix import row_rng_seed
from dd_dist.core.tasks import TeacherTask, teacher_batches
from dd_dist.data.splits import Split, run_split

SEARCH_ROWS = ["mnist-lenet", "mnist-lenet_all", "mnist-mlp"]
PATH = RESULTS / "schedule_search.json"


def validation_error(model: torch.nn.Module, val: Split, batch_size: int = 1000) -> float:
    """The standard net's (dropout off, weight scaling) error on the validation split."""
    model.eval()
    x, y = torch.from_numpy(val.x), torch.from_numpy(val.y)
    with torch.no_grad():
        wrong = sum((model(x[s : s + batch_size]).argmax(1) != y[s : s + batch_size]).sum().item()
                    for s in range(0, len(y), batch_size))
    return wrong / len(y)


def search_row(row: str, lrs: list[float], steps: list[int], tail: int, overrides: list[str]) -> dict:
    config, row_overrides, _ = ROWS[row]
    cfg = load_config(REPO / config, [*row_overrides, "seed=0", *overrides])
    train, val = run_split(cfg, "train"), run_split(cfg, "val")
    batches, seed, began = teacher_batches(train), cfg.seed, time.perf_counter()
    grid = []

    def run_epoch(model, optimizer, epoch: int, lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(row_rng_seed(seed, epoch))  # the dropout masks of this epoch, in every branch alike
        TeacherTask.train_mode(model, cfg.teacher)
        train_epoch(model, optimizer, len(train), batches, TeacherTask, cfg.teacher.batch_size, seed, epoch, 0)

    for lr in lrs:
        opt = cfg.teacher.model_copy(update={"lr": lr})
        model = TeacherTask.setup(cfg, train).model
        optimizer = make_optimizer(model.parameters(), opt)
        snapshots = {}
        for epoch in range(max(steps)):
            run_epoch(model, optimizer, epoch, lr)
            if epoch + 1 in steps:
                snapshots[epoch + 1] = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
            print(f"schedule-search: {row} lr {lr:g} epoch {epoch + 1}/{max(steps)} at lr "
                  f"({time.perf_counter() - began:.0f} s)", flush=True)
        for step in steps:
            weights, state = snapshots.pop(step)
            model.load_state_dict(weights)
            optimizer.load_state_dict(state)
            for epoch in range(step, step + tail):
                run_epoch(model, optimizer, epoch, lr * opt.lr_gamma)
                error = validation_error(model, val)
                grid.append({"lr": lr, "step": step, "epochs": epoch + 1, "val_error": error})
                print(f"schedule-search: {row} lr {lr:g} step {step} epoch {epoch + 1}: validation error "
                      f"{100 * error:.2f} %", flush=True)
    pick = min(grid, key=lambda g: (g["val_error"], g["epochs"]))
    return {"row": row, "config": config, "overrides": [*row_overrides, *overrides], "lr_gamma": cfg.teacher.lr_gamma,
            "grid": grid, "pick": pick,
            "train_rows": len(train), "val_rows": len(val), "seconds": time.perf_counter() - began,
            "finished": datetime.datetime.now().isoformat(timespec="seconds")}


def markdown(report: dict) -> str:
    lines = ["# Teacher schedules chosen on the validation split", "",
             "Produced by `python -m benchmarks.schedule_search` (`make schedule-search`): the plain loop, seed 0, "
             "SGD momentum 0.9, weight decay 5e-4, batch 64, the row's dropout p. A schedule is (lr, step, epochs): "
             "`step` epochs at lr, then `epochs - step` at lr × the config's lr_gamma. Validation error % of the standard "
             "(weight-scaled) net after each epoch past the step; the test split is never read.", ""]
    for r in report["rows"]:
        steps = sorted({g["step"] for g in r["grid"]})
        tail = max(g["epochs"] - g["step"] for g in r["grid"])
        lines += [f"## {r['row']} (`{r['config']}` {' '.join(r['overrides'])})", "",
                  "| lr | step | " + " | ".join(f"+{t}" for t in range(1, tail + 1)) + " | best |",
                  "|---:|---:|" + "---:|" * (tail + 1)]
        for lr in sorted({g["lr"] for g in r["grid"]}):
            for step in steps:
                points = [g for g in r["grid"] if (g["lr"], g["step"]) == (lr, step)]
                best = min(points, key=lambda g: (g["val_error"], g["epochs"]))
                lines.append(f"| {lr:g} | {step} | " + " | ".join(f"{100 * g['val_error']:.2f}" for g in points)
                             + f" | {100 * best['val_error']:.2f} ({best['epochs']} ep) |")
        p = r["pick"]
        lines += ["", f"Pick: lr {p['lr']:g} for {p['step']} epochs, then {p['lr'] * r['lr_gamma']:g} to epoch {p['epochs']} "
                  f"(validation error {100 * p['val_error']:.2f} %). Search time {r['seconds'] / 60:.0f} min, "
                  f"finished {r['finished']}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(SEARCH_ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--lrs", default="0.001,0.01,0.03", help="learning rates before the step")
    parser.add_argument("--steps", default="10,20", help="epochs after which lr drops to a tenth")
    parser.add_argument("--tail", type=int, default=10, help="epochs evaluated after each step")
    parser.add_argument("--report", type=Path, default=PATH, help="the JSON report (and its .md) to merge into")
    parser.add_argument("overrides", nargs="*", help="config overrides for every row (e.g. data.train_rows=2000)")
    args = parser.parse_args()
    rows = parse_rows(parser, args.rows)
    lrs, steps = [float(v) for v in args.lrs.split(",")], sorted(int(v) for v in args.steps.split(","))
    for row in rows:
        merge_rows(args.report, search_row(row, lrs, steps, args.tail, args.overrides), markdown,
                   key=lambda r: (list(ROWS).index(r["row"]),))
    print(f"schedule-search: report in {args.report.with_suffix('.md')}")


if __name__ == "__main__":
    main()
