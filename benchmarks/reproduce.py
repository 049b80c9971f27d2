"""`make reproduce`: the paper's protocol through the product's own pipeline (DeepSpeed on Ray Train,
Ray label actors, MLflow), one (row, seed) at a time, accumulated into one report.

    .venv/bin/python -m benchmarks.reproduce [--rows mnist-lenet,mnist-lenet_all] [--seeds 0,1,2]
                                             [--budget-h 2.5] [--quick]

Each finished (row, seed) is merged at once into benchmarks/results/reproduce.{json,md} (with
--quick: reproduce_quick.*), keyed by row and seed, with its stage times and finish time, so that
invocations with other SEEDS= / ROWS= add to the same table and an interrupted one loses only the
unit it was running. A unit is not started when the last unit's duration would overrun --budget-h.
The runs are in the MLflow experiment `dd-dist-reproduce` of the default store (`make mlflow-ui`).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

from dd_dist.config import load_config
from dd_dist.core.loop import lr_at
from dd_dist.core.models import read_checkpoint
from dd_dist.data.sources import FASHION_MNIST_DIR
from dd_dist.files import atomic_write, file_sha256, write_json
from dd_dist.labels.format import MANIFEST, read_manifest
from dd_dist.layout import RunDir
from dd_dist.pipeline import run_pipeline

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
EXPERIMENT = "dd-dist-reproduce"
# Each MNIST row's teacher schedule was chosen on the validation split (`make schedule-search`); the
# Fashion-MNIST rows borrow the MNIST rows' schedules.
MNIST_LENET, MNIST_LENET_ALL = "configs/reproduce/mnist_lenet.yaml", "configs/reproduce/mnist_lenet_all.yaml"
MNIST_LENET_ALL_PREPOOL = "configs/reproduce/mnist_lenet_all_prepool.yaml"
FASHION = ["data.name=fashion-mnist", f"data.path={FASHION_MNIST_DIR}"]
SMALLER = "is the smaller student below the full net's standard?"
# row -> (config, overrides, reference errors % (standard, MC K=100, distilled) and where they come from)
ROWS = {
    "mnist-lenet": (MNIST_LENET, [], ((0.67, 0.67, 0.67), "paper, Table 1")),
    "mnist-lenet_all": (MNIST_LENET_ALL, [], ((0.51, 0.49, 0.49), "paper, Table 1")),
    # LeNetAll as Gal & Ghahramani's Caffe lenet-all has it: dropout on each conv's output, before its pool
    "mnist-lenet_all_prepool": (MNIST_LENET_ALL_PREPOOL, [], ((0.51, 0.49, 0.49), "paper, Table 1")),
    # Wang & Manning 2013: weight scaling 108, MC x100 105 errors (of 10,000); no distilled figure.
    "mnist-mlp": ("configs/reproduce/mnist_mlp.yaml", [], ((1.08, 1.05, None), "Wang & Manning 2013")),
    # its student without weight decay: chosen on seed 0's validation split (benchmarks/results/distill_search.md)
    "fashion-lenet": (MNIST_LENET, [*FASHION, "distill.weight_decay=0"], (None, "not in the paper")),
    # MNIST LeNetAll's config distils without weight decay (its validation pick); this row had no search of its own
    "fashion-lenet_all": (MNIST_LENET_ALL, [*FASHION, "distill.weight_decay=0.0005"], (None, "not in the paper")),
}
# Smaller students (60 % and 80 % of every layer's units) distilled from the full teacher's labels, starting
# as that teacher pruned to its strongest units (distill.init=teacher): their "standard" column is the
# full teacher's, which they should beat.
ROWS.update({f"{row}-w{w}": (ROWS[row][0], [*ROWS[row][1], f"distill.width={w}"], (None, SMALLER))
             for row in ("mnist-lenet", "mnist-lenet_all", "mnist-lenet_all_prepool", "fashion-lenet")
             for w in (0.6, 0.8)})


def full_row(row: str) -> str:
    """The full-width row a smaller student's row ("mnist-lenet-w0.6") distils from; a full row itself."""
    return row.rsplit("-w", 1)[0]


# A smaller student learns from the full teacher's labels (same seed), as in the paper: those of its full row's
# run when it is there, else those of a sibling smaller student's run (which trained that same teacher). A full
# row whose own run has no teacher takes them from a smaller student's run in the same way (neither the teacher
# nor its labels depend on the student's width).
SAME_TEACHER = {row: [other for other in ROWS if other != row and full_row(other) == full_row(row)] for row in ROWS}
# --quick: the same pipeline on 5k training images, 2k test images, short schedules, K=20.
QUICK = ["data.train_rows=5000", "data.test_rows=2000", "teacher.epochs=3", "teacher.lr=0.01", "teacher.lr_steps=[2]",
         "distill.epochs=2", "distill.lr=0.001", "distill.lr_steps=[1]", "label.k=20", "eval.ks=[1,20]",
         "eval.repeats=2"]


def labelled_run(runs: Path, row: str, seed: int) -> Path | None:
    """The finished run whose teacher and labels the row's unit reuses (SAME_TEACHER); None where no such run
    has finished labelling, or for a full row whose own run has its teacher (it keeps that one)."""
    if row == full_row(row) and (runs / f"{row}-seed{seed}" / "teacher" / "model.pt").is_file():
        return None
    candidates = [runs / f"{other}-seed{seed}" for other in SAME_TEACHER.get(row, [])]
    return next((run for run in candidates if (run / "labels" / MANIFEST).is_file()), None)


def run_unit(row: str, seed: int, quick: bool) -> dict:
    config, overrides, _ = ROWS[row]
    runs = REPO / "runs" / ("reproduce-quick" if quick else "reproduce")
    run_dir = runs / f"{row}-seed{seed}"
    cfg = load_config(REPO / config, [*overrides, *(QUICK if quick else []), f"seed={seed}", f"run_dir={run_dir}",
                                      f"tracking.experiment={EXPERIMENT}" + ("-quick" if quick else "")])
    source = labelled_run(runs, row, seed)
    reused = source is not None
    if reused:
        for stage in ("teacher", "labels"):
            shutil.rmtree(run_dir / stage, ignore_errors=True)
            shutil.copytree(source / stage, run_dir / stage)
    if not reused:
        clear_stale_outputs(cfg)
    kept = None if reused else kept_teacher_seconds(cfg)
    # finished label shards of an earlier run are verified, not recomputed: that stage's time is not a labelling time
    resumed = bool(kept) and (RunDir(cfg).labels / MANIFEST).is_file()
    began = time.perf_counter()
    seconds = run_pipeline(cfg, reuse=("teacher", "label") if reused else ("teacher",) if kept else ())
    if kept:
        seconds = {"teacher_seconds": kept, **seconds}
    results = json.loads(RunDir(cfg).results.read_text())["methods"]
    k = max(int(m[3:]) for m in results if m.startswith("mc-"))
    return {"row": row, "seed": seed, "errors": {"standard": results["standard"]["error"],
                                                 f"mc{k}": results[f"mc-{k}"]["error_mean"],
                                                 "distilled": results["distilled"]["error"]},
            "mc_k": k, "mc_repeats": results[f"mc-{k}"]["repeats"], "seconds": seconds,
            "total_seconds": time.perf_counter() - began, "run_dir": str(run_dir.relative_to(REPO)),
            "teacher_from": str(source.relative_to(REPO)) if reused else None, "teacher_kept": bool(kept),
            "labels_resumed": resumed,
            "student_dropout": cfg.distill.dropout, "student_weight_decay": cfg.distill.weight_decay,
            "teacher_schedule": schedule_text(teacher_lrs(cfg)),
            "finished": datetime.datetime.now().isoformat(timespec="seconds")}


def schedule_text(lrs: list[float]) -> str:
    """A per-epoch learning-rate list as its runs, e.g. "0.01 x30, 0.001 x8"."""
    runs = [(lr, len(list(group))) for lr, group in itertools.groupby(lrs)]
    return ", ".join(f"{lr:g} x{n}" for lr, n in runs)


def teacher_lrs(cfg) -> list[float]:
    """The teacher's learning rate at each epoch of the config's schedule."""
    return [lr_at(cfg.teacher, e) for e in range(cfg.teacher.epochs)]


def teacher_fits(cfg) -> bool:
    """Does run_dir hold a finished teacher trained on this config's architecture and schedule?"""
    model, history = RunDir(cfg).teacher, RunDir(cfg).history("teacher")
    if not (model.is_file() and history.is_file()):
        return False
    epochs, spec = json.loads(history.read_text())["epochs"], read_checkpoint(model)["spec"]
    return (spec["arch"], spec["width"], spec["p"]) == (cfg.model.arch, 1.0, cfg.model.p) and \
        [e["lr"] for e in epochs] == teacher_lrs(cfg)


def clear_stale_outputs(cfg) -> None:
    """After a config change: a finished teacher of another schedule or architecture starts the unit over in
    an empty run_dir; labels of another teacher than the finished one go (the label stage refuses them)."""
    run = RunDir(cfg)
    if run.teacher.is_file() and not teacher_fits(cfg):
        print(f"reproduce: {cfg.run_dir} holds a teacher of another schedule or architecture: starting afresh", flush=True)
        shutil.rmtree(cfg.run_dir)
    elif run.teacher.is_file() and (run.labels / MANIFEST).is_file() and \
            read_manifest(run.labels)["teacher"]["sha256"] != file_sha256(run.teacher):
        print(f"reproduce: {run.labels} holds labels of an earlier teacher: labelling again", flush=True)
        shutil.rmtree(run.labels)


def kept_teacher_seconds(cfg) -> float | None:
    """A rerun (after a crash in a later stage, or for a new student) keeps the finished teacher of run_dir:
    its seconds (from its history), when it fits this config (teacher_fits); else None."""
    if not teacher_fits(cfg):
        return None
    print(f"reproduce: keeping the finished teacher {RunDir(cfg).teacher.relative_to(REPO)}", flush=True)
    epochs = json.loads(RunDir(cfg).history("teacher").read_text())["epochs"]
    return sum(e["epoch_seconds"] for e in epochs) + epochs[0]["setup_seconds"]


TARGET = 0.15  # points: the tolerance on a row with the paper's figures


def summarise(units: list[dict]) -> list[dict]:
    """Per row: mean and std over seeds of each method's error in %, whether the means lie within TARGET
    points of the paper, the share of the standard -> MC gap that distillation recovered (where MC beats
    standard by more than the larger std over seeds, or by 0.05 points on one seed), and the reference."""
    rows = []
    for row in ROWS:
        mine = sorted((u for u in units if u["row"] == row), key=lambda u: u["seed"])
        if not mine:
            continue
        mc = next(m for m in mine[0]["errors"] if m.startswith("mc"))
        methods = ["standard", mc, "distilled"]  # the order of the reference figures
        errors = {m: [100 * u["errors"][m] for u in mine] for m in methods}
        mean = {m: statistics.fmean(v) for m, v in errors.items()}
        std = {m: statistics.stdev(v) if len(v) > 1 else None for m, v in errors.items()}
        gap = mean["standard"] - mean[mc]
        noise = max(std["standard"], std[mc]) if len(mine) > 1 else 0.05
        reference = ROWS[row][2][0]
        within = None if not reference or None in reference else \
            all(abs(mean[m] - r) <= TARGET for m, r in zip(methods, reference))
        rows.append({"row": row, "seeds": [u["seed"] for u in mine], "methods": methods, "mean": mean, "std": std,
                     "spread": {m: (min(v), max(v)) for m, v in errors.items()},
                     "gap_recovered": (mean["standard"] - mean["distilled"]) / gap if gap > noise else None,
                     "distilled_le_standard_on_mean": mean["distilled"] <= mean["standard"],
                     "within_target": within,
                     "reference": reference, "reference_source": ROWS[row][2][1],
                     # units from before distill.dropout existed trained their students with dropout on
                     "student_dropout": any(u.get("student_dropout", True) for u in mine),
                     # units from before this was recorded distilled with the default 5e-4
                     "student_weight_decays": sorted({u.get("student_weight_decay", 5e-4) for u in mine}),
                     # a row whose seeds' teachers trained on different schedules shows them all
                     "teacher_schedules": sorted({u.get("teacher_schedule", "?") for u in mine}),
                     "stage_seconds_mean": stage_seconds_mean(mine)})
    return rows


def labels_resumed(unit: dict) -> bool:
    """Were the unit's label shards an earlier run's, only verified? Units from before this was recorded
    resumed their labels whenever they kept their teacher (only the student had changed)."""
    return unit.get("labels_resumed", unit.get("teacher_kept", False))


def stage_seconds_mean(units: list[dict]) -> dict:
    """Mean seconds of each stage over the units that ran it: a stage reused from another run, or label
    shards of an earlier run that were only verified, are not a time of that stage."""
    measured = [{k: v for k, v in u["seconds"].items() if not (k == "label_seconds" and labels_resumed(u))}
                for u in units]
    return {k: statistics.fmean(m[k] for m in measured if k in m) for k in set().union(*measured)}


def markdown(report: dict) -> str:
    def cell(s: dict, m: str) -> str:
        std = s["std"][m]
        return f"{s['mean'][m]:.2f}" + ("" if std is None else f" ± {std:.2f}")

    def ref(s: dict, i: int) -> str:
        return "–" if not s["reference"] or s["reference"][i] is None else f"{s['reference'][i]:.2f}"

    lines = [f"# Reproduction{' (quick)' if report['quick'] else ''}", "",
             f"Produced by `python -m benchmarks.reproduce{' --quick' if report['quick'] else ''}` "
             f"(`make reproduce{'-quick' if report['quick'] else ''}`) through the product pipeline "
             f"(DeepSpeed on Ray Train, Ray label actors); runs in the MLflow experiment `{report['experiment']}`. "
             f"Test error %: mean ± std over seeds; MC = K-mask MC dropout averaged over its repeats. "
             f"Within ±{TARGET}: every mean of the row within {TARGET} points of its reference. Gap recovered: "
             f"where MC beats standard by more than the larger std (one seed: 0.05 points).", "",
             "| row | seeds | standard | MC | distilled | teacher lr x epochs | student wd | reference std / MC / dist | within ±0.15 | "
             "gap recovered | distilled ≤ standard (mean) | teacher / label / distill / eval s |",
             "|---|---|---:|---:|---:|---|---|---|---|---:|---|---|"]
    for s in report["summary"]:
        mc = s["methods"][1]
        gap = "n/a" if s["gap_recovered"] is None else f"{100 * s['gap_recovered']:.0f} %"
        within = "–" if s["within_target"] is None else "yes" if s["within_target"] else "NO"
        t = s["stage_seconds_mean"]
        times = " / ".join(f"{t[f'{k}_seconds']:.0f}" if f"{k}_seconds" in t else "–"
                           for k in ("teacher", "label", "distill", "evaluate"))
        lines.append(f"| {s['row']} | {','.join(map(str, s['seeds']))} | {cell(s, 'standard')} | "
                     f"{cell(s, mc)} ({mc}) | {cell(s, 'distilled')}{' †' * s['student_dropout']} | "
                     f"{' and '.join(s['teacher_schedules'])} | "
                     f"{' and '.join(f'{w:g}' for w in s['student_weight_decays'])} | {ref(s, 0)} / {ref(s, 1)} / {ref(s, 2)} "
                     f"({s['reference_source']}) | {within} | {gap} | {'yes' if s['distilled_le_standard_on_mean'] else 'NO'} "
                     f"| {times} |")
    if any(s["student_dropout"] for s in report["summary"]):
        lines += ["", "† a student trained with its dropout on (distill.dropout=true, the behaviour before it became "
                  "an option): not the paper's deterministic student."]
    lines += ["", "Stage times are means over the units that ran the stage; – where none did (the stage's output "
              "was reused from another run, or finished label shards of an earlier run were only verified).",
              "", "Units (one pipeline run each):", "",
              "| row | seed | finished | total s | run_dir |", "|---|---:|---|---:|---|"]
    lines += [f"| {u['row']} | {u['seed']} | {u['finished']} | {u['total_seconds']:.0f} | `{u['run_dir']}`"
              + (f" (teacher and labels of `{u['teacher_from']}`)" if u.get("teacher_from") else "")
              + (" (its teacher kept from an earlier run of the row" +
                 (", and its labels" if labels_resumed(u) else "") + ")" if u.get("teacher_kept") else "")
              + " |"
              for u in report["units"]]
    return "\n".join(lines) + "\n"


def merge(path: Path, unit: dict, quick: bool) -> dict:
    """Add one finished unit to the report on disk (replacing an earlier run of the same row and seed)."""
    units = json.loads(path.read_text())["units"] if path.is_file() else []
    units = [u for u in units if (u["row"], u["seed"]) != (unit["row"], unit["seed"])] + [unit]
    report = {"quick": quick, "experiment": EXPERIMENT + ("-quick" if quick else ""),
              "machine": f"{platform.machine()}, {platform.python_version()}", "units": units,
              "summary": summarise(units)}
    write_json(path, report)
    atomic_write(path.with_suffix(".md"), lambda tmp: Path(tmp).write_text(markdown(report)))
    return report


def parse_rows(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """The comma-separated --rows, each a key of ROWS (else the parser's one-line error)."""
    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="mnist-lenet,mnist-lenet_all", help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--budget-h", type=float, default=2.5, help="start no unit that would end after this")
    parser.add_argument("--quick", action="store_true", help="5k images, short schedules, K=20 (minutes)")
    args = parser.parse_args()
    rows = parse_rows(parser, args.rows)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    path = RESULTS / ("reproduce_quick.json" if args.quick else "reproduce.json")
    began, last = time.perf_counter(), 0.0
    for row in rows:
        if "data.name=fashion-mnist" in ROWS[row][1] and not (REPO / FASHION_MNIST_DIR).is_dir():
            print(f"reproduce: skipping {row}: no {FASHION_MNIST_DIR} (run `make fashion-mnist`)")
            continue
        for seed in seeds:
            used = time.perf_counter() - began
            if used + last > 3600 * args.budget_h:
                print(f"reproduce: stopping before {row} seed {seed}: {used / 3600:.2f} h used, the last unit took "
                      f"{last / 3600:.2f} h, budget {args.budget_h} h; run again for the rest")
                return
            print(f"reproduce: {row} seed {seed}", flush=True)
            unit = run_unit(row, seed, args.quick)
            last = unit["total_seconds"]
            merge(path, unit, args.quick)
    print(f"reproduce: report in {path.with_suffix('.md').relative_to(REPO)}")


if __name__ == "__main__":
    main()
