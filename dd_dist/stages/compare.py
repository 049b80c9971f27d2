"""`dd-dist compare`: evaluate runs from MLflow side by side (standard / MC-K / distilled), with
the share of the standard->MC gap that distillation recovered, and three plots.

Numbers come from the store (the evaluate runs' metrics); the reliability diagram reads the
per-bin data from each run's results.json artifact. Writes compare.md and PNGs to run_dir/compare
(or --out) and logs them to a "compare" run.
"""
from __future__ import annotations

import json
import re
import tempfile
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

MC_METHOD = re.compile(r"mc(\d+)$")
COLUMNS = ("error", "nll", "ece", "brier", "latency_ms", "images_per_s")


@dataclass
class Evaluation:
    """One evaluate run: metrics per method ('standard', 'mc10', 'distilled'), K-sorted MC names."""

    run_id: str
    dataset: str
    arch: str
    test_images: int
    methods: dict[str, dict[str, float]]
    parent_run_id: str | None = None
    pipeline_stages: list[str] = field(default_factory=list)  # stage runs under the same parent

    @property
    def mc_names(self) -> list[str]:
        return sorted((m for m in self.methods if MC_METHOD.match(m)), key=lambda m: int(m[2:]))

    def value(self, method: str, key: str) -> float | None:
        m = self.methods.get(method, {})
        return m.get(key, m.get(f"{key}_mean"))

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


def compare(cfg: Config, experiment: str | None = None, out_dir: str | Path | None = None) -> str:
    """The Markdown report of the latest evaluate run per (dataset, arch); also writes it and the plots."""
    name = experiment or cfg.tracking.experiment
    cfg = cfg.model_copy(deep=True)
    cfg.tracking.experiment = name
    tracker = Tracker(cfg)
    evaluations = load_evaluations(tracker)
    out = Path(out_dir) if out_dir else RunDir(cfg).compare
    report = markdown_report(name, evaluations)
    plots = [path for e in evaluations for path in write_plots(e, out)]
    atomic_write(out / "compare.md", lambda tmp: Path(tmp).write_text(report + "\n"))
    with tracker.stage_run("compare", compared_runs=",".join(e.run_id for e in evaluations)) as run_id:
        for path in [out / "compare.md", *plots]:
            tracker.log_artifact(path, run_id=run_id)
    return report


def load_evaluations(tracker: Tracker) -> list[Evaluation]:
    """The newest finished evaluate run of each (dataset, arch) in the tracker's experiment."""
    uri, experiment = tracker.use_store(), tracker.cfg.tracking.experiment
    try:
        exp = mlflow.get_experiment_by_name(experiment)
        runs = [] if exp is None else mlflow.search_runs(
            experiment_ids=[exp.experiment_id], filter_string="tags.stage = 'evaluate' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], output_format="list")
    except Exception as error:  # a server that is down or refuses us is the user's to fix
        raise UserError(f"cannot query MLflow at {redact(uri)}: {type(error).__name__}: "
                        f"{str(error).strip().splitlines()[0][:160] if str(error).strip() else ''}") from None
    if exp is None:
        raise UserError(f"no MLflow experiment named {experiment!r} at {redact(uri)}")
    if not runs:
        raise UserError(f"MLflow experiment {experiment!r} has no finished evaluate runs: run `dd-dist evaluate` first")
    newest: dict[tuple[str, str], Evaluation] = {}
    for run in runs:
        e = _evaluation(run)
        newest.setdefault((e.dataset, e.arch), e)
    for e in newest.values():
        if e.parent_run_id:
            children = mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="list",
                                          filter_string=f"tags.mlflow.parentRunId = '{e.parent_run_id}'",
                                          order_by=["attributes.start_time ASC"])
            e.pipeline_stages = [c.data.tags.get("stage", "?") for c in children]
    return sorted(newest.values(), key=lambda e: (e.dataset, e.arch))


def _evaluation(run) -> Evaluation:
    methods: dict[str, dict[str, float]] = {}
    for name, value in run.data.metrics.items():
        method, _, key = name.partition("/")
        if key and (method in ("standard", "distilled") or MC_METHOD.match(method)):
            methods.setdefault(method, {})[key] = value
    tags = run.data.tags
    return Evaluation(run.info.run_id, tags.get("dataset", "?"), tags.get("arch", "?"),
                      int(run.data.metrics.get("test_images", 0)), methods, tags.get("mlflow.parentRunId"))


def markdown_report(experiment: str, evaluations: list[Evaluation]) -> str:
    lines = [f"# dd-dist compare: experiment `{experiment}`", "",
             "| dataset | arch | test images | standard error % | MC error % (K) | distilled error % | gap recovered |",
             "|---|---|---|---|---|---|---|"]
    for e in evaluations:
        mc = e.mc_names[-1] if e.mc_names else None
        lines.append(f"| {e.dataset} | {e.arch} | {e.test_images} | {_pct(e.value('standard', 'error'))} | "
                     f"{_pct(e.value(mc, 'error')) if mc else 'n/a'} ({mc[2:] if mc else '-'}) | "
                     f"{_pct(e.value('distilled', 'error'))} | {_share(e.gap_recovered())} |")
    for e in evaluations:
        lines += ["", f"## {e.dataset} / {e.arch}", "", f"evaluate run `{e.run_id}`"]
        if e.parent_run_id:
            lines[-1] += f", pipeline run `{e.parent_run_id}` with stages: {', '.join(e.pipeline_stages)}"
        lines += ["", "| method | forward passes | error % | ± std | NLL | ECE | Brier | ms / image | images / s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method in ["standard", *e.mc_names, "distilled"]:
            if method not in e.methods:
                continue
            v = {key: e.value(method, key) for key in COLUMNS}
            std = e.methods[method].get("error_std")
            lines.append(f"| {_label(method)} | {int(e.value(method, 'forward_passes') or 1)} | {_pct(v['error'])} | "
                         f"{_pct(std) if std is not None else ''} | {v['nll']:.4f} | {v['ece']:.4f} | "
                         f"{v['brier']:.4f} | {v['latency_ms']:.4f} | {v['images_per_s']:.0f} |")
        if "distilled" not in e.methods:
            lines += ["", "no distilled student in this run"]
    return "\n".join(lines)


def _label(method: str) -> str:
    return f"MC K={method[2:]}" if MC_METHOD.match(method) else method


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"


def write_plots(e: Evaluation, out: Path) -> list[Path]:
    """Error vs K, error vs latency, and (when the run has results.json) a reliability diagram."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{e.dataset}_{e.arch}")
    paths = [_save(_error_vs_k(e), out / f"{stem}_error_vs_k.png"),
             _save(_error_vs_cost(e), out / f"{stem}_error_vs_latency.png")]
    bins = _reliability_data(e.run_id)
    if bins:
        paths.append(_save(_reliability(e, bins), out / f"{stem}_reliability.png"))
    return paths


def _error_vs_k(e: Evaluation):
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [int(m[2:]) for m in e.mc_names]
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
        ax.annotate(f"K={m[2:]}", (e.value(m, "latency_ms"), 100 * e.value(m, "error")), fontsize=8)
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
