"""`dd-dist compare`: evaluate runs from MLflow side by side (standard / MC-K / distilled), with
the share of the standard->MC gap that distillation recovered, and three plots.

Which runs: by default the newest finished evaluate run of each (dataset, arch) in the experiment;
with --filter, every finished evaluate run that an MLflow search filter selects (different p, K,
schedules, ...). Numbers come from each evaluate run's method runs (see stages/evaluate.py); the
reliability diagram reads the per-bin data from the evaluate run's results.json artifact. Writes
compare.md and PNGs to run_dir/compare (or --out) and logs them to a "compare" run, with the
comparison as an MLflow table (comparison.json) and the ids of the runs it compared.
"""
from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import mlflow

from dd_dist.config import Config
from dd_dist.errors import UserError
from dd_dist.files import atomic_write
from dd_dist.infra.tracking import Tracker, redact
from dd_dist.layout import RunDir

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

MC_METHOD = re.compile(r"mc-(\d+)$")
COLUMNS = ("error", "nll", "ece", "brier", "latency_ms", "images_per_s", "entropy", "mutual_info")
FINISHED_EVALUATE = "tags.stage = 'evaluate' and attributes.status = 'FINISHED'"


def mc_k(method: str) -> int:
    """K of an MC method run's name: 10 for 'mc-10'."""
    return int(MC_METHOD.match(method).group(1))


@dataclass
class Evaluation:
    """One evaluate run: metrics per method run ('standard', 'mc-10', 'distilled'), K-sorted MC names."""

    run_id: str
    dataset: str
    arch: str
    p: str
    label_k: str
    test_images: int
    methods: dict[str, dict[str, float]]
    parent_run_id: str | None = None
    pipeline_stages: list[str] = field(default_factory=list)  # stage runs under the same parent

    @property
    def mc_names(self) -> list[str]:
        return sorted((m for m in self.methods if MC_METHOD.match(m)), key=mc_k)

    def ordered_methods(self) -> list[str]:
        return [m for m in ("standard", *self.mc_names, "distilled") if m in self.methods]

    def value(self, method: str, key: str) -> float | None:
        return self.methods.get(method, {}).get(key)

    def gap_recovered(self) -> float | None:
        """(standard - distilled) / (standard - MC at the largest K); None without a student, or when MC
        does not beat standard dropout by at least half a test image (no gap to recover: a ratio of two
        negative or tiny differences would read as a bogus share)."""
        if "distilled" not in self.methods or not self.mc_names:
            return None
        standard, distilled = self.value("standard", "error"), self.value("distilled", "error")
        gap = standard - self.value(self.mc_names[-1], "error")
        if gap < 0.5 / max(self.test_images, 1):
            return None
        return (standard - distilled) / gap


def compare(cfg: Config, experiment: str | None = None, out_dir: str | Path | None = None,
            filter_string: str | None = None) -> str:
    """The Markdown report of the chosen evaluate runs (see the module doc); also writes it and the plots."""
    name = experiment or cfg.tracking.experiment
    cfg = cfg.model_copy(deep=True)
    cfg.tracking.experiment = name
    tracker = Tracker(cfg)
    evaluations = load_evaluations(tracker, filter_string)
    out = Path(out_dir) if out_dir else RunDir(cfg).compare
    report = markdown_report(name, evaluations)
    repeated = Counter((e.dataset, e.arch) for e in evaluations)
    plots = [path for e in evaluations for path in write_plots(e, out, repeated[e.dataset, e.arch] > 1)]
    atomic_write(out / "compare.md", lambda tmp: Path(tmp).write_text(report + "\n"))
    compared = [e.run_id for e in evaluations]
    # The compare run's params say what it compared, not the config of this call.
    params = {"experiment": name, "filter": filter_string or "", "compared_runs": len(compared)}
    with tracker.stage_run("compare", params=params, compared_runs=",".join(compared)) as run_id:
        tracker.log_table(comparison_table(evaluations), "comparison.json", run_id)
        for path in [out / "compare.md", *plots]:
            tracker.log_artifact(path, run_id=run_id)
    return report


def load_evaluations(tracker: Tracker, filter_string: str | None = None) -> list[Evaluation]:
    """Finished evaluate runs of the tracker's experiment, each with its method runs: those `filter_string`
    selects, or else the newest of each (dataset, arch)."""
    uri, experiment = tracker.use_store(), tracker.cfg.tracking.experiment
    query = f"{FINISHED_EVALUATE} and {filter_string}" if filter_string else FINISHED_EVALUATE
    try:
        exp = mlflow.get_experiment_by_name(experiment)
        runs = [] if exp is None else _search(exp.experiment_id, query, "attributes.start_time DESC")
    except mlflow.exceptions.MlflowException as error:
        if filter_string and error.error_code == "INVALID_PARAMETER_VALUE":
            raise UserError(f"MLflow rejects the filter {filter_string!r}: {_first_line(error)}") from None
        raise _unreachable(uri, error) from None
    except Exception as error:  # a server that is down or refuses us is the user's to fix
        raise _unreachable(uri, error) from None
    if exp is None:
        raise UserError(f"no MLflow experiment named {experiment!r} at {redact(uri)}")
    if not runs and filter_string:
        raise UserError(f"no finished evaluate run in MLflow experiment {experiment!r} matches the filter "
                        f"{filter_string!r}")
    if not runs:
        raise UserError(f"MLflow experiment {experiment!r} has no finished evaluate runs: run `dd-dist evaluate` first")
    chosen: dict = {}
    for run in runs:
        tags = run.data.tags
        chosen.setdefault(run.info.run_id if filter_string else (tags.get("dataset"), tags.get("arch")), run)
    evaluations = [_evaluation(exp.experiment_id, run) for run in chosen.values()]
    return sorted(evaluations, key=lambda e: (e.dataset, e.arch))


def _search(experiment_id: str, filter_string: str, order_by: str) -> list:
    return mlflow.search_runs(experiment_ids=[experiment_id], filter_string=filter_string, order_by=[order_by],
                              output_format="list")


def _evaluation(experiment_id: str, run) -> Evaluation:
    """An evaluate run with its method runs' metrics and the stages of its pipeline run."""
    run_id, tags = run.info.run_id, run.data.tags
    children = _search(experiment_id, f"tags.mlflow.parentRunId = '{run_id}' and tags.stage = 'method'",
                       "attributes.start_time ASC")
    parent = tags.get("mlflow.parentRunId")
    stages = _search(experiment_id, f"tags.mlflow.parentRunId = '{parent}'", "attributes.start_time ASC") if parent else []
    return Evaluation(run_id, tags.get("dataset", "?"), tags.get("arch", "?"), tags.get("dropout_p", "?"),
                      tags.get("K", "?"), int(run.data.metrics.get("test_images", 0)),
                      {c.data.tags.get("method", c.info.run_name): dict(c.data.metrics) for c in children}, parent,
                      [s.data.tags.get("stage", "?") for s in stages])


def _unreachable(uri: str, error: Exception) -> UserError:
    return UserError(f"cannot query MLflow at {redact(uri)}: {type(error).__name__}: {_first_line(error)}")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return redact(text.splitlines()[0][:200]) if text else ""


def comparison_table(evaluations: list[Evaluation]) -> dict[str, list]:
    """One row per (evaluate run, method): which run, its setting and its numbers (mlflow.log_table)."""
    rows = [{"evaluate_run": e.run_id, "pipeline_run": e.parent_run_id or "", "dataset": e.dataset, "arch": e.arch,
             "dropout_p": e.p, "label_k": e.label_k, "method": method,
             "forward_passes": int(e.value(method, "forward_passes") or 1),
             **{key: e.value(method, key) for key in COLUMNS}}
            for e in evaluations for method in e.ordered_methods()]
    return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}


def markdown_report(experiment: str, evaluations: list[Evaluation]) -> str:
    lines = [f"# dd-dist compare: experiment `{experiment}`", "",
             "| dataset | arch | p | label K | test images | standard error % | MC error % (K) | distilled error % "
             "| gap recovered | evaluate run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in evaluations:
        mc = e.mc_names[-1] if e.mc_names else None
        lines.append(f"| {e.dataset} | {e.arch} | {e.p} | {e.label_k} | {e.test_images} | "
                     f"{_pct(e.value('standard', 'error'))} | {_pct(e.value(mc, 'error')) if mc else 'n/a'} "
                     f"({mc_k(mc) if mc else '-'}) | {_pct(e.value('distilled', 'error'))} | {_share(e.gap_recovered())} "
                     f"| `{e.run_id[:8]}` |")
    for e in evaluations:
        lines += ["", f"## {e.dataset} / {e.arch}, p={e.p}, label K={e.label_k}", "", f"evaluate run `{e.run_id}`"]
        if e.parent_run_id:
            lines[-1] += f", pipeline run `{e.parent_run_id}` with stages: {', '.join(e.pipeline_stages)}"
        lines += ["", "| method | forward passes | error % | ± std | NLL | ECE | Brier | ms / image | images / s "
                      "| entropy | mutual info |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for method in e.ordered_methods():
            v = {key: e.value(method, key) for key in COLUMNS}
            std = f"{_pct(e.value(method, 'error_std'))}" if MC_METHOD.match(method) else ""
            lines.append(f"| {_label(method)} | {int(e.value(method, 'forward_passes') or 1)} | {_pct(v['error'])} | "
                         f"{std} | {v['nll']:.4f} | {v['ece']:.4f} | {v['brier']:.4f} | {v['latency_ms']:.4f} | "
                         f"{v['images_per_s']:.0f} | {_nats(v['entropy'])} | {_nats(v['mutual_info'])} |")
        if "distilled" not in e.methods:
            lines += ["", "no distilled student in this run"]
        elif e.value("distilled", "uncertainty_spearman") is not None:
            lines += ["", f"uncertainty head against MC's mutual information (largest K): Spearman "
                          f"{e.value('distilled', 'uncertainty_spearman'):.3f}, mean absolute error "
                          f"{e.value('distilled', 'uncertainty_mae'):.4f} nats"]
    return "\n".join(lines)


def _label(method: str) -> str:
    return f"MC K={mc_k(method)}" if MC_METHOD.match(method) else method


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _nats(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"  # runs logged before the uncertainty metrics have none


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"


def write_plots(e: Evaluation, out: Path, with_run_id: bool = False) -> list[Path]:
    """Error vs K, error vs latency, and (when the run has results.json) a reliability diagram; file names
    carry the run id where several compared runs share a dataset and arch."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{e.dataset}_{e.arch}" + (f"_{e.run_id[:8]}" if with_run_id else ""))
    paths = [_save(_error_vs_k(e), out / f"{stem}_error_vs_k.png"),
             _save(_error_vs_cost(e), out / f"{stem}_error_vs_latency.png")]
    bins = _reliability_data(e.run_id)
    if bins:
        paths.append(_save(_reliability(e, bins), out / f"{stem}_reliability.png"))
    return paths


def _error_vs_k(e: Evaluation):
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [mc_k(m) for m in e.mc_names]
    ax.errorbar(ks, [100 * e.value(m, "error") for m in e.mc_names],
                yerr=[100 * e.methods[m].get("error_std", 0) for m in e.mc_names], marker="o", capsize=3,
                label="MC dropout (mean ± std over seeds)")
    ax.axhline(100 * e.value("standard", "error"), color="tab:red", linestyle="--", label="standard dropout")
    if "distilled" in e.methods:
        ax.axhline(100 * e.value("distilled", "error"), color="tab:green", label="distilled (1 pass)")
    ax.set(xscale="log", xlabel="MC samples K", ylabel="test error %", title=f"{e.dataset} / {e.arch}: error vs K")
    ax.legend()
    return fig


def _error_vs_cost(e: Evaluation):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([e.value(m, "latency_ms") for m in e.mc_names], [100 * e.value(m, "error") for m in e.mc_names],
            marker="o", label="MC dropout")
    for m in e.mc_names:
        ax.annotate(f"K={mc_k(m)}", (e.value(m, "latency_ms"), 100 * e.value(m, "error")), fontsize=8)
    for method, color in (("standard", "tab:red"), ("distilled", "tab:green")):
        if method in e.methods:
            ax.scatter([e.value(method, "latency_ms")], [100 * e.value(method, "error")], color=color, s=60,
                       zorder=3, label=method)
    ax.set(xscale="log", xlabel="measured latency, ms per image", ylabel="test error %",
           title=f"{e.dataset} / {e.arch}: error vs inference cost")
    ax.legend()
    return fig


def _reliability(e: Evaluation, results: dict):
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfect calibration")
    chosen = ["standard", *e.mc_names[-1:], "distilled"]
    for method in (m for m in chosen if m in results["methods"]):
        r = results["methods"][method]["reliability"]
        points = [(c, a) for c, a, n in zip(r["confidence"], r["accuracy"], r["count"]) if n]
        ax.plot(*zip(*points), marker="o", label=_label(method))
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"{e.dataset} / {e.arch}: reliability ({results['ece_bins']} bins)")
    ax.legend()
    return fig


def _reliability_data(run_id: str) -> dict | None:
    """The run's results.json artifact (it holds the per-bin data), or None if it has none."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="results.json", dst_path=tmp)
        except Exception:  # an evaluate run logged while its server was down has no artifact
            return None
        return json.loads(Path(path).read_text())


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path
