"""Label quality against teacher forward passes: fixed K vs antithetic masks, the control variate, mask
trees and adaptive K (dd_dist/mc_schemes.py), on MNIST and Fashion-MNIST `lenet_all`.

    .venv/bin/python -m benchmarks.label_efficiency [--data mnist,fashion-mnist] [--images 1000]
        [--reference-k 2000] [--teacher-epochs 30] [--students 3] [--student-epochs 30] [--quick]

Per dataset: a lenet_all teacher trained with the paper's MNIST schedule in the plain loop (cached in
runs/label-efficiency/), the first --images training images in their label view (augmentation epoch 0),
reference labels from --reference-k plain masks with a seed of their own, then every scheme's labels of
the same images (float32, two mask seeds): label quality = mean KL(reference || labels), against teacher
forward passes per image: K (for adaptive K the mean K its rows used) times the compute of a mask's subtree
in full passes (1 without a mask tree; multiply-adds, mc_schemes.passes_per_mask). The cheapest other scheme whose KL is no
higher than fixed K=100's is the equal-quality pick; it is then checked on the next --images images, which
played no part in picking it. On MNIST, --students N distils N students (seeds 0..N-1) from the teacher on
the whole training set labelled with K=100 and with the pick, and compares their test errors.

Writes benchmarks/results/label_efficiency.{json,md} and label_efficiency.png. --retime times every
scheme of that report again, side by side on the same images (no reference, no students: minutes), and
rewrites it with those timings: for when the first run shared the machine with other work.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch

from benchmarks.report import RESULTS, machine, write_report
from dd_dist.config import load_config
from dd_dist.core.augment import augment
from dd_dist.data.sources import FASHION_MNIST_DIR
from dd_dist.data.splits import run_split
from dd_dist.core.loop import fit, train_teacher
from dd_dist.core.mc import standard_probs
from dd_dist.core.mc_schemes import mc_label, passes_per_mask
from dd_dist.core.models import init_student_from_teacher, load_model
from dd_dist.core.tasks import StudentTask, build_for, offline_batches
from dd_dist.layout import RunDir
from dd_dist.schemes import MCScheme

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "mnist_lenet_all.yaml"
DATA = {"mnist": [], "fashion-mnist": ["data.name=fashion-mnist", f"data.path={REPO / FASHION_MNIST_DIR}"]}
REFERENCE_SEED = 7919  # the reference's masks share nothing with the schemes' (seeds 0 and 1)
SEEDS = (0, 1)
BATCH = 500  # rows per mc_label call


def schemes() -> list[tuple[str, MCScheme]]:
    """(family, scheme) of every scheme measured, cheapest first within a family."""
    fixed, reduced = (10, 30, 100, 300), (10, 30, 100)
    out = [("plain", MCScheme(k=k)) for k in fixed]
    out += [("antithetic", MCScheme(k=k, antithetic=True)) for k in reduced]
    out += [("control variate", MCScheme(k=k, control_variate=True)) for k in reduced]
    out += [("antithetic + control variate", MCScheme(k=k, antithetic=True, control_variate=True)) for k in reduced]
    # more masks at the cheap layers near the output: lenet_all's conv after the first dropout is ~8x the rest
    out += [("mask tree 4x4 + antithetic", MCScheme(k=k, fanout=(4, 4), antithetic=True)) for k in (8, 12, 16, 24)]
    out += [("mask tree 2x8 + antithetic", MCScheme(k=k, fanout=(2, 8), antithetic=True)) for k in (8, 16, 24)]
    out += [("adaptive K", MCScheme(k=None, stderr_target=t, k_min=8, k_max=400))
            for t in (0.01, 0.005, 0.0025, 0.00125)]
    out += [("adaptive K + antithetic + control variate",
             MCScheme(k=None, stderr_target=t, k_min=8, k_max=400, antithetic=True, control_variate=True))
            for t in (0.005, 0.0025, 0.00125, 0.0006)]
    return out


def label_view(cfg, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
    """(row ids, inputs): training rows as the label stage sees them (augmentation epoch 0, seed 0)."""
    split = run_split(cfg, "train")
    ids = torch.arange(rows.start, rows.stop)
    return ids, augment(torch.from_numpy(split.x)[ids], ids, 0, 0, cfg.data.zero_p, cfg.data.flip_p)


def labels(teacher, ids, inputs, seed: int, scheme: MCScheme) -> tuple[np.ndarray, np.ndarray, float]:
    """(probs float64, K per row, seconds) of one scheme over the rows, BATCH rows per call."""
    began, probs, ks = time.perf_counter(), [], []
    for start in range(0, len(ids), BATCH):
        p, _, k, _ = mc_label(teacher, inputs[start : start + BATCH], ids[start : start + BATCH], seed, scheme)
        probs.append(p.double().numpy())
        ks.append(k.numpy())
    return np.concatenate(probs), np.concatenate(ks), time.perf_counter() - began


def row_kl(reference: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """KL(reference || probs) per row; a zero in probs counts as 1e-12."""
    ref = np.clip(reference, 1e-300, None)
    return (reference * (np.log(ref) - np.log(np.clip(probs, 1e-12, None)))).sum(1)


def mean_kl(reference: np.ndarray, probs: np.ndarray) -> float:
    return float(row_kl(reference, probs).mean())


def allocation_gain(teacher, ids, inputs, reference, scheme: MCScheme) -> float:
    """The most any per-row choice of K could lower the mean KL of the fixed-K scheme at equal mean passes.
    A row's KL is about w / K (w: its spread in KL units); the best split of a budget gives K in proportion
    to sqrt(w) (Neyman), which gains E[w] / E[sqrt(w)]^2 over one K for all. w is read off the rows' KLs at
    the scheme's K; their noise only raises the figure, so it is an upper bound."""
    probs, _, _ = labels(teacher, ids, inputs, 0, scheme)
    kl = row_kl(reference, probs)
    return float(kl.mean() / np.sqrt(kl).mean() ** 2)


def measure(teacher, ids, inputs, reference, family: str, scheme: MCScheme) -> dict:
    runs = [labels(teacher, ids, inputs, seed, scheme) for seed in SEEDS]
    kls = [mean_kl(reference, probs) for probs, _, _ in runs]
    masks = statistics.fmean(float(k.mean()) for _, k, _ in runs)
    row = {"family": family, "scheme": scheme.describe(), "record": scheme.record(), "masks": masks,
           "passes": masks * passes_per_mask(teacher, scheme, inputs.shape[1:]),
           "kl": statistics.fmean(kls), "kl_per_seed": kls,
           "ms_per_image": 1000 * statistics.fmean(s for _, _, s in runs) / len(ids)}
    print(f"  {row['scheme']:<70} {row['passes']:7.1f} passes  KL {row['kl']:.2e}  {row['ms_per_image']:.2f} ms/img",
          flush=True)
    return row


def teacher_for(data: str, epochs: int, quick: bool, given: str | None) -> tuple[object, Path, dict]:
    """The dataset's lenet_all teacher (config, checkpoint, facts): `given`, or trained here unless cached."""
    run_dir = REPO / "runs" / "label-efficiency" / f"{data}-lenet_all-e{epochs}{'-quick' if quick else ''}"
    cfg = load_config(CONFIG, [*DATA[data], f"run_dir={run_dir}", f"teacher.epochs={epochs}",
                               f"teacher.lr_steps=[{max(1, 2 * epochs // 3)}]" if epochs > 1 else "teacher.lr_steps=[]",
                               *(["data.train_rows=5000", "data.test_rows=2000"] if quick else [])])
    path = Path(given).resolve() if given else RunDir(cfg).teacher
    began, cached = time.perf_counter(), path.is_file()
    if not cached:
        print(f"{data}: training the lenet_all teacher ({epochs} epochs, plain loop) into {run_dir}", flush=True)
        train_teacher(cfg)
    teacher, spec = load_model(path)
    if spec["arch"] != "lenet_all":
        raise SystemExit(f"label_efficiency: {path} is a {spec['arch']} teacher, not lenet_all")
    return cfg, teacher, {"epochs": None if given else epochs, "train_seconds": None if cached else time.perf_counter() - began,
                          "test_error": test_error(teacher, cfg), "checkpoint": str(path.relative_to(REPO))}


def test_error(model, cfg) -> float:
    split = run_split(cfg, "test")
    x = torch.from_numpy(split.x)
    predicted = torch.cat([standard_probs(model, x[i : i + BATCH]).argmax(1) for i in range(0, len(x), BATCH)])
    return (predicted.numpy() != split.y).mean().item()


def quality(cfg, teacher, images: int, reference_k: int) -> dict:
    """Every scheme on rows [0, images); the equal-quality pick checked again on [images, 2 images)."""
    ids, inputs = label_view(cfg, range(images))
    reference, _, ref_seconds = labels(teacher, ids, inputs, REFERENCE_SEED, MCScheme(k=reference_k))
    print(f"  reference K={reference_k}: {ref_seconds:.0f} s", flush=True)
    rows = [measure(teacher, ids, inputs, reference, family, scheme) for family, scheme in schemes()]
    baseline = next(r for r in rows if r["record"] == MCScheme(k=100).record())
    # the cheapest other scheme at least as good as K=100 (the lower KL among equal passes)
    equal = [r for r in rows if r["kl"] <= baseline["kl"] and r is not baseline]
    pick = min(equal, key=lambda r: (r["passes"], r["kl"])) if equal else baseline

    held_ids, held_inputs = label_view(cfg, range(images, 2 * images))
    held_reference, _, _ = labels(teacher, held_ids, held_inputs, REFERENCE_SEED, MCScheme(k=reference_k))
    print("  held-out images:", flush=True)
    held = {name: measure(teacher, held_ids, held_inputs, held_reference, r["family"], scheme_of(r))
            for name, r in (("K=100", baseline), ("pick", pick))}
    gains = {scheme.describe(): allocation_gain(teacher, ids, inputs, reference, scheme)
             for scheme in (MCScheme(k=100), MCScheme(k=100, antithetic=True, control_variate=True))}
    return {"images": images, "reference_k": reference_k, "rows": rows, "baseline": baseline, "pick": pick,
            "pass_ratio": pick["passes"] / baseline["passes"], "held_out": held, "allocation_gain": gains}


def scheme_of(row: dict) -> MCScheme:
    return MCScheme.from_record(row["record"], row["record"]["k"])


def students(cfg, teacher, pick: dict, seeds: int, epochs: int) -> dict:
    """Students distilled (plain loop, paper's schedule scaled to `epochs`) on K=100 labels and on the pick's,
    one per seed (the seed orders the batches and draws the student's dropout; the labels use seed 0)."""
    split = run_split(cfg, "train")
    ids, inputs = label_view(cfg, range(len(split)))
    distill = cfg.distill.model_copy(update={"epochs": epochs, "lr_steps": [max(1, 2 * epochs // 3)] if epochs > 1 else []})
    out = {"epochs": epochs, "lr": distill.lr, "lr_steps": distill.lr_steps, "dropout": distill.dropout, "sets": {}}
    for name, scheme in (("K=100", MCScheme(k=100)), (pick["scheme"], scheme_of(pick))):
        probs, ks, seconds = labels(teacher, ids, inputs, 0, scheme)
        soft = torch.from_numpy(probs.astype(np.float32))
        errors = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            student, _ = build_for(cfg, split)
            init_student_from_teacher(student, teacher)
            fit(student, distill, len(split), offline_batches(split, soft, 0, cfg.data.zero_p, cfg.data.flip_p),
                StudentTask, seed, log=lambda row: None)
            errors.append(test_error(student, cfg))
            print(f"  student on {name} labels, seed {seed}: test error {100 * errors[-1]:.2f} %", flush=True)
        out["sets"][name] = {"passes": float(ks.mean()) * passes_per_mask(teacher, scheme, inputs.shape[1:]),
                             "label_seconds": seconds, "errors": errors,
                             "mean": statistics.fmean(errors), "spread": max(errors) - min(errors)}
    first, second = out["sets"].values()
    out["difference"] = second["mean"] - first["mean"]
    out["agree"] = abs(out["difference"]) <= max(first["spread"], second["spread"])
    return out


def plot(report: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, len(report["data"]), figsize=(6.5 * len(report["data"]), 4.5), squeeze=False)
    for ax, (data, r) in zip(axes[0], report["data"].items()):
        q = r["quality"]
        for family in dict.fromkeys(row["family"] for row in q["rows"]):
            rows = [row for row in q["rows"] if row["family"] == family]
            ax.plot([row["passes"] for row in rows], [row["kl"] for row in rows], marker="o", label=family)
        ax.axhline(q["baseline"]["kl"], color="gray", linestyle=":", label="fixed K=100's quality")
        ax.axvline(25, color="tab:red", linestyle="--", linewidth=0.8, label="a quarter of K=100's passes")
        ax.set(xscale="log", yscale="log", xlabel="teacher forward passes per image",
               ylabel=f"mean KL(K={q['reference_k']} reference || labels)",
               title=f"{data} lenet_all, {q['images']} images")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(report: dict) -> str:
    lines = ["# Label efficiency: quality against teacher forward passes", "",
             f"Produced by `python -m benchmarks.label_efficiency` ({report['machine']}; load average at start "
             f"{report['load_average']}; {report['threads']} torch threads). Quality = mean KL(reference || labels) "
             "over the images, labels in float32, mean of mask seeds 0 and 1; reference = plain MC with its own "
             "seed. Passes = teacher forward passes per image: the masks K (adaptive K: the mean over rows) times, for a "
             "mask tree, the multiply-adds of a mask's whole subtree in full passes after the first dropout. ms / image: "
             "wall time of the labels, measured side by side in this run"
             + (f" (timed again on their own: load average {report['timed']['load_average']}, "
                f"{report['timed']['threads']} torch threads)" if report.get("timed") else "") + ".", "",
             "![label efficiency](label_efficiency.png)", ""]
    for data, r in report["data"].items():
        q, t = r["quality"], r["teacher"]
        base = q["baseline"]
        lines += [f"## {data} lenet_all", "",
                  ("Teacher: given" if t["epochs"] is None else
                   f"Teacher: {t['epochs']} epochs (the paper's schedule, plain loop"
                   + (f", trained here in {t['train_seconds']:.0f} s)" if t["train_seconds"] else ", an earlier run's)"))
                  + f", standard-dropout test error {100 * t['test_error']:.2f} %, `{t['checkpoint']}`. "
                  f"{q['images']} training images, reference K={q['reference_k']}.", "",
                  "| scheme | passes / image | mean KL | KL seed 0 / 1 | ms / image | time vs K=100 |",
                  "|---|---:|---:|---|---:|---:|"]
        for row in q["rows"]:
            mark = " **(pick)**" if row == q["pick"] else ""
            lines.append(f"| {row['scheme']}{mark} | {row['passes']:.1f} | {row['kl']:.2e} | "
                         f"{' / '.join(f'{v:.2e}' for v in row['kl_per_seed'])} | {row['ms_per_image']:.2f} | "
                         f"{row['ms_per_image'] / base['ms_per_image']:.2f}x |")
        pick, held = q["pick"], q["held_out"]
        met = "met" if q["pass_ratio"] <= 0.25 else "NOT met"
        lines += ["", f"Cheapest scheme with fixed K=100's quality (KL {base['kl']:.2e}): **{pick['scheme']}**, "
                  f"{pick['passes']:.1f} passes per image = {100 * q['pass_ratio']:.0f} % of K=100's, KL "
                  f"{pick['kl']:.2e}, {pick['ms_per_image'] / base['ms_per_image']:.2f}x its time. Target (at most a "
                  f"quarter of the passes): {met}.",
                  f"On the next {q['images']} images, which played no part in the pick: K=100 KL "
                  f"{held['K=100']['kl']:.2e}, the pick {held['pick']['kl']:.2e} at {held['pick']['passes']:.1f} "
                  "passes.", ""]
        if "allocation_gain" in q:
            lines += ["Upper bound on what adaptive K can gain at equal mean passes (the best per-row split of the "
                      "masks, K in proportion to the square root of a row's spread): "
                      + ", ".join(f"{g:.2f}x for {name}" for name, g in q["allocation_gain"].items())
                      + ". Driving every row to the same KL would give no lower a mean KL than one K for all at equal "
                      "mean passes; adaptive K as built drives every row to the same largest-class standard error, "
                      "which spends masks where the KL is not (compare its rows with fixed K above).", ""]
        if r.get("students"):
            s = r["students"]
            lines += [f"Students distilled from the teacher on the whole training set ({s['epochs']} epochs, lr "
                      f"{s['lr']:g} then a tenth after epoch {s['lr_steps']}, plain loop; labels with seed 0, the "
                      # reports from before distill.dropout existed trained their students with dropout on
                      + ("student's seed orders the batches and draws its dropout" if s.get("dropout", True) else
                         "student's seed orders the batches; the student is deterministic, dropout off") + "):", "",
                      "| labels | passes / image | label s | test error % per seed | mean | spread (max - min) |",
                      "|---|---:|---:|---|---:|---:|"]
            for name, v in s["sets"].items():
                lines.append(f"| {name} | {v['passes']:.1f} | {v['label_seconds']:.0f} | "
                             f"{', '.join(f'{100 * e:.2f}' for e in v['errors'])} | {100 * v['mean']:.2f} | "
                             f"{100 * v['spread']:.2f} |")
            lines += ["", f"Difference of the means {100 * s['difference']:+.2f} points: "
                      f"{'within' if s['agree'] else 'OUTSIDE'} the seeds' spread.", ""]
    return "\n".join(lines) + "\n"


def retime(path: Path) -> dict:
    """The report at `path` with every scheme's ms / image measured again, side by side, on its images."""
    report = json.loads(path.read_text())
    for data, r in report["data"].items():
        cfg, teacher, _ = teacher_for(data, 1, report["quick"], str(REPO / r["teacher"]["checkpoint"]))
        ids, inputs = label_view(cfg, range(r["quality"]["images"]))
        print(f"{data}: timing {len(r['quality']['rows'])} schemes on {len(ids)} images", flush=True)
        for row in r["quality"]["rows"]:
            row["ms_per_image"] = 1000 * statistics.fmean(labels(teacher, ids, inputs, seed, scheme_of(row))[2]
                                                          for seed in SEEDS) / len(ids)
            for same in ("baseline", "pick"):  # the same rows, stored twice
                if r["quality"][same]["scheme"] == row["scheme"]:
                    r["quality"][same]["ms_per_image"] = row["ms_per_image"]
    report["timed"] = {**machine(), "threads": torch.get_num_threads()}
    return report


def write(name: str, report: dict) -> str:
    """The JSON and Markdown reports (the Markdown names its own plot); returns the Markdown."""
    text = markdown(report).replace("label_efficiency.png", f"{name}.png")
    print(f"report: {write_report(name, report, text).relative_to(REPO)}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist,fashion-mnist", help="comma-separated: mnist, fashion-mnist")
    parser.add_argument("--images", type=int, default=1000, help="training images to measure label quality on")
    parser.add_argument("--reference-k", type=int, default=2000)
    parser.add_argument("--teacher-epochs", type=int, default=30, help="the paper's 20 + 10 epochs")
    parser.add_argument("--teachers", default="", metavar="DATA=PATH,...",
                        help="lenet_all teachers to use instead of training them, e.g. "
                             "mnist=runs/reproduce/mnist-lenet_all-seed0/teacher/model.pt")
    parser.add_argument("--students", type=int, default=3, help="student seeds per label set (MNIST); 0: none")
    parser.add_argument("--student-epochs", type=int, default=30, help="the paper's 20 + 10 epochs")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5k images, tiny budgets")
    parser.add_argument("--retime", action="store_true", help="time the schemes of the last report again")
    args = parser.parse_args()
    name = "label_efficiency_quick" if args.quick else "label_efficiency"
    if args.retime:
        write(name, retime(RESULTS / f"{name}.json"))
        return
    if args.quick:
        args.images, args.reference_k, args.teacher_epochs, args.students, args.student_epochs = 100, 300, 1, 1, 1
    teachers = dict(item.split("=", 1) for item in args.teachers.split(",") if item)
    report = {**machine(), "threads": torch.get_num_threads(), "quick": args.quick, "data": {}}
    for data in [d.strip() for d in args.data.split(",") if d.strip()]:
        if data == "fashion-mnist" and not (REPO / FASHION_MNIST_DIR).is_dir():
            print(f"label_efficiency: skipping fashion-mnist: no {FASHION_MNIST_DIR} (run `make fashion-mnist`)")
            continue
        cfg, teacher, facts = teacher_for(data, args.teacher_epochs, args.quick, teachers.get(data))
        print(f"{data}: teacher test error {100 * facts['test_error']:.2f} %; label quality on {args.images} images",
              flush=True)
        result = {"teacher": facts, "quality": quality(cfg, teacher, args.images, args.reference_k)}
        if data == "mnist" and args.students:
            result["students"] = students(cfg, teacher, result["quality"]["pick"], args.students, args.student_epochs)
        report["data"][data] = result
    plot(report, RESULTS / f"{name}.png")
    print(write(name, report))


if __name__ == "__main__":
    main()
