"""`evaluate` on tiny synthetic models: every method and K, numbers that agree with the method, MLflow."""
import json
import shutil
import socket
import time

import mlflow
import pytest
import torch

from dd_dist.cli import main
from dd_dist.config import load_config
from dd_dist.core.splitmix import row_rng_seed
from dd_dist.data.splits import run_split
from dd_dist.core.mc import mc_estimate, mc_probs, standard_probs, uncertainty
from dd_dist.core.metrics import classification_metrics
from dd_dist.core.models import build_model, load_model, model_spec, save_model
from dd_dist.errors import UserError
from dd_dist.layout import RunDir
from dd_dist.stages.compare import compare
from dd_dist.stages.evaluate import EVAL_SEED_SALT, METHOD_METRICS, evaluate
from dd_dist.core.loop import train_student, train_teacher

KS = [1, 2, 50]
REPEATS = 3


def tiny_config(run_dir, uri, *more):
    return load_config(None, [
        "data.name=synthetic", "model.arch=mlp", f"run_dir={run_dir}", f"tracking.uri={uri}",
        "tracking.experiment=test-evaluate", "teacher.epochs=3", "teacher.lr=0.01", "teacher.lr_steps=[2]",
        "distill.epochs=2", "distill.lr_steps=[1]", "label.k=10", f"eval.ks={KS}", f"eval.repeats={REPEATS}",
        "eval.batch_size=100", *more])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A teacher and a distilled student on the synthetic data, evaluated once."""
    root = tmp_path_factory.mktemp("evaluate")
    cfg = tiny_config(root / "run", f"sqlite:///{root}/mlruns.db")
    train_teacher(cfg)
    train_student(cfg)
    return cfg, evaluate(cfg)


def test_results_hold_every_method_and_k(trained):
    cfg, results = trained
    on_disk = json.loads(RunDir(cfg).results.read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert list(results["methods"]) == ["standard", "mc-1", "mc-2", "mc-50", "distilled"]
    assert on_disk["test_images"] == 256 and on_disk["notes"] == []
    for name, m in on_disk["methods"].items():
        reliability = m["reliability"]
        assert len(reliability["count"]) == 15 and sum(reliability["count"]) == 256
        assert m["forward_passes"] == (int(name[3:]) if name.startswith("mc-") else 1)
        suffix = "_mean" if name.startswith("mc") else ""
        assert 0 <= m[f"error{suffix}"] <= 1 and m[f"nll{suffix}"] > 0 and m[f"latency_ms{suffix}"] > 0
        if not suffix:  # MC reports the mean over seeds of each, which are not reciprocal
            assert m["images_per_s"] == pytest.approx(1000 / m["latency_ms"])


def test_standard_and_distilled_are_the_weight_scaled_models(trained):
    cfg, results = trained
    split = run_split(cfg, "test")
    x, y = torch.from_numpy(split.x), torch.from_numpy(split.y)
    for method, path in (("standard", RunDir(cfg).teacher), ("distilled", RunDir(cfg).student)):
        expected = classification_metrics(standard_probs(load_model(path)[0], x), y)
        assert {k: results["methods"][method][k] for k in expected} == pytest.approx(expected)


def test_mc_numbers_follow_the_method(trained):
    cfg, results = trained
    mc1, mc50 = results["methods"]["mc-1"], results["methods"]["mc-50"]
    # Each seed's number is that seed's MC prediction, reproducible from (seed, repeat).
    split = run_split(cfg, "test")
    x, y, ids = torch.from_numpy(split.x), torch.from_numpy(split.y), torch.arange(len(split))
    teacher = load_model(RunDir(cfg).teacher)[0]
    repeat = REPEATS - 1
    probs = mc_probs(teacher, x, ids, 50, row_rng_seed(cfg.seed, EVAL_SEED_SALT, repeat))
    assert mc50["nll_per_seed"][repeat] == pytest.approx(classification_metrics(probs, y)["nll"])
    # One mask is noisy: seeds disagree. Fifty masks agree much more closely.
    assert mc1["error_std"] > 0 and mc1["nll_std"] > 0
    assert mc50["nll_std"] < mc1["nll_std"] / 3
    # Averaging probabilities over more masks lowers the NLL (Jensen), towards the K -> infinity limit.
    assert mc50["nll_mean"] < results["methods"]["mc-2"]["nll_mean"] < mc1["nll_mean"]
    limit = classification_metrics(mc_probs(teacher, x, ids, 400, seed=12345), y)
    assert abs(mc50["nll_mean"] - limit["nll"]) < abs(mc1["nll_mean"] - limit["nll"]) / 5
    assert abs(mc50["error_mean"] - limit["error"]) < 0.03


def test_each_method_reports_its_mean_entropy_and_mutual_information(trained):
    cfg, results = trained
    m = results["methods"]
    split = run_split(cfg, "test")
    x, ids = torch.from_numpy(split.x), torch.arange(len(split))
    teacher = load_model(RunDir(cfg).teacher)[0]
    estimate = mc_estimate(teacher, x, ids, 50, row_rng_seed(cfg.seed, EVAL_SEED_SALT, 0))
    expected = uncertainty(estimate.probs, estimate.expected_entropy)
    assert m["mc-50"]["mutual_info_per_seed"][0] == pytest.approx(expected["mutual_info"].mean().item())
    assert m["mc-50"]["entropy_per_seed"][0] == pytest.approx(expected["entropy"].mean().item())
    assert m["mc-1"]["mutual_info_mean"] == pytest.approx(0, abs=1e-6)  # one mask: nothing to disagree with
    assert m["mc-50"]["mutual_info_mean"] > m["mc-2"]["mutual_info_mean"] > 0
    for one_pass in ("standard", "distilled"):  # a deterministic prediction has no spread over masks
        assert m[one_pass]["mutual_info"] == 0 and m[one_pass]["entropy"] > 0


def test_metrics_and_artifact_in_the_mlflow_store(trained):
    cfg, results = trained
    mlflow.set_tracking_uri(cfg.tracking.uri)
    [run] = mlflow.search_runs(experiment_names=["test-evaluate"], filter_string="tags.stage = 'evaluate'",
                               output_format="list")
    # The evaluate run keeps the MC curve and the count; the numbers of each method live in its own run.
    assert sorted(run.data.metrics) == ["mc_curve/error_mean", "mc_curve/nll_mean", "test_images"]
    assert run.data.metrics["test_images"] == 256 and run.info.status == "FINISHED"
    assert run.data.tags["dataset"] == "synthetic" and run.data.tags["arch"] == "mlp"
    assert run.data.params["eval.repeats"] == str(REPEATS)
    client = mlflow.MlflowClient()
    curve = client.get_metric_history(run.info.run_id, "mc_curve/error_mean")
    assert {p.step: p.value for p in curve} == pytest.approx({k: results["methods"][f"mc-{k}"]["error_mean"] for k in KS})
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "config.yaml"} <= artifacts


def test_one_child_run_per_method_with_the_same_keys(trained):
    cfg, results = trained
    mlflow.set_tracking_uri(cfg.tracking.uri)
    [run] = mlflow.search_runs(experiment_names=["test-evaluate"], filter_string="tags.stage = 'evaluate'",
                               output_format="list")
    children = mlflow.search_runs(experiment_names=["test-evaluate"], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    assert [c.info.run_name for c in children] == ["standard", "mc-1", "mc-2", "mc-50", "distilled"]
    for child in children:
        method, m = child.info.run_name, results["methods"][child.info.run_name]
        assert sorted(child.data.metrics) == sorted(METHOD_METRICS)
        mean = "_mean" if method.startswith("mc-") else ""
        for key in ("error", "nll", "ece", "brier", "latency_ms", "images_per_s"):
            assert child.data.metrics[key] == pytest.approx(m[key + mean]), (method, key)
        assert child.data.metrics["error_std"] == pytest.approx(m["error_std"] if mean else 0.0)
        assert child.data.metrics["forward_passes"] == m["forward_passes"]
        about = {"method": method, "K": str(m["forward_passes"]), "dataset": "synthetic", "arch": "mlp",
                 "dropout_p": str(cfg.model.p), "pipeline_run": "none", "evaluate_run": run.info.run_id}
        assert child.data.params == about  # what was compared, not the whole config again
        assert {k: child.data.tags[k] for k in about} == about and child.data.tags["stage"] == "method"
        assert child.info.status == "FINISHED"


def test_missing_student_is_skipped_with_a_note(trained, tmp_path):
    cfg, _ = trained
    cfg2 = tiny_config(tmp_path / "run", f"sqlite:///{tmp_path}/mlruns.db", "eval.ks=[3]", "eval.repeats=1")
    shutil.copytree(RunDir(cfg).teacher.parent, RunDir(cfg2).teacher.parent)
    results = evaluate(cfg2)
    assert list(results["methods"]) == ["standard", "mc-3"]
    assert results["methods"]["mc-3"]["error_std"] == 0.0
    assert "distilled skipped" in results["notes"][0]


def test_user_errors_are_one_line_and_leave_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["evaluate", "data.name=synthetic", "model.arch=mlp", f"run_dir={run_dir}"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dd-dist evaluate: error: no teacher checkpoint at") and "\n" not in err
    # A teacher built for other images: refused before anything is written or logged.
    save_model(run_dir / "teacher" / "model.pt", build_model("mlp", (1, 28, 28), 10), model_spec("mlp", (1, 28, 28), 10, 0.5))
    cfg = tiny_config(run_dir, f"sqlite:///{tmp_path}/mlruns.db")
    with pytest.raises(UserError, match=r"takes \(1, 28, 28\) images with 10 classes.*\(1, 8, 8\) with 4"):
        evaluate(cfg)
    assert not (run_dir / "eval").exists()


def test_compare_tabulates_the_store(trained, tmp_path):
    cfg, results = trained
    report = compare(cfg, out_dir=tmp_path)
    m = results["methods"]
    assert (f"| synthetic | mlp | 0.5 | 10 | 256 | {100 * m['standard']['error']:.2f} | "
            f"{100 * m['mc-50']['error_mean']:.2f} (50) | "
            f"{100 * m['distilled']['error']:.2f} |") in report
    assert [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| MC K=")] == \
        ["MC K=1", "MC K=2", "MC K=50"]
    assert (tmp_path / "compare.md").is_file() and len(list(tmp_path.glob("*.png"))) == 3
    # the CLI writes the same report where --out says
    assert main(["compare", "--experiment", "test-evaluate", "--out", str(tmp_path / "cli"),
                 f"tracking.uri={cfg.tracking.uri}", f"run_dir={tmp_path / 'elsewhere'}"]) == 0
    assert (tmp_path / "cli" / "compare.md").read_text() == report + "\n" and not (tmp_path / "elsewhere").exists()


def test_compare_without_evaluate_runs_is_a_user_error(trained, tmp_path, capsys):
    cfg, _ = trained
    uri = cfg.tracking.uri
    assert main(["compare", "--experiment", "no-such-experiment", f"tracking.uri={uri}", f"run_dir={tmp_path}"]) == 2
    assert "no MLflow experiment named 'no-such-experiment'" in capsys.readouterr().err
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("empty")
    assert main(["compare", "--experiment", "empty", f"tracking.uri={uri}", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dd-dist compare: error: MLflow experiment 'empty' has no finished evaluate runs: run `dd-dist evaluate` first"
    assert not (tmp_path / "compare").exists()


@pytest.fixture(scope="module")
def two_settings(trained, tmp_path_factory):
    """The trained teacher and student evaluated twice into a store of their own, as two pipeline runs
    with other label K and eval.ks would be."""
    root = tmp_path_factory.mktemp("filter")
    cfg, _ = trained
    configs = [tiny_config(root / "run", f"sqlite:///{root}/mlruns.db", f"label.k={k}", f"eval.ks=[{ks}]",
                           "eval.repeats=1", "tracking.experiment=filter-test") for k, ks in ((10, 2), (20, 3))]
    shutil.copytree(RunDir(cfg).teacher.parent, RunDir(configs[0]).teacher.parent)
    shutil.copytree(RunDir(cfg).student.parent, RunDir(configs[0]).student.parent)
    return configs, [evaluate(c) for c in configs]


def test_compare_filter_selects_any_set_of_runs(two_settings, tmp_path):
    (cfg10, cfg20), (results10, results20) = two_settings
    # Without a filter: the newest evaluate run of the (dataset, arch), label K 20.
    newest = compare(cfg20, out_dir=tmp_path / "newest")
    assert "| synthetic | mlp | 0.5 | 20 | 256 |" in newest and "| 0.5 | 10 |" not in newest
    only10 = compare(cfg20, out_dir=tmp_path / "k10", filter_string="tags.K = '10'")
    assert "| synthetic | mlp | 0.5 | 10 | 256 |" in only10 and "| 0.5 | 20 |" not in only10
    both = compare(cfg20, out_dir=tmp_path / "both", filter_string="params.`label.k` != '5'")
    assert "| 0.5 | 10 | 256 |" in both and "| 0.5 | 20 | 256 |" in both
    # Two runs of one (dataset, arch): the plots carry the run id instead of overwriting each other.
    assert len(list((tmp_path / "both").glob("synthetic_mlp_*_error_vs_k.png"))) == 2

    mlflow.set_tracking_uri(cfg20.tracking.uri)
    runs = mlflow.search_runs(experiment_names=["filter-test"], output_format="list",
                              order_by=["attributes.start_time DESC"])
    evaluate_ids = {r.data.tags["K"]: r.info.run_id for r in runs if r.data.tags["stage"] == "evaluate"}
    compare_run = next(r for r in runs if r.data.tags["stage"] == "compare")  # the newest: --filter over both
    assert compare_run.data.params == {"experiment": "filter-test", "filter": "params.`label.k` != '5'",
                                       "compared_runs": "2"}
    assert set(compare_run.data.tags["compared_runs"].split(",")) == set(evaluate_ids.values())
    table = mlflow.load_table("comparison.json", run_ids=[compare_run.info.run_id])
    rows = {(str(r.label_k), r.method): r for r in table.itertuples()}
    assert sorted(rows) == [("10", "distilled"), ("10", "mc-2"), ("10", "standard"),
                            ("20", "distilled"), ("20", "mc-3"), ("20", "standard")]
    assert rows["10", "mc-2"].error == pytest.approx(results10["methods"]["mc-2"]["error_mean"])
    assert rows["20", "mc-3"].forward_passes == 3 and rows["20", "mc-3"].evaluate_run == evaluate_ids["20"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(compare_run.info.run_id)}
    assert {"comparison.json", "compare.md"} <= artifacts and "config.yaml" not in artifacts


@pytest.mark.parametrize("filter_string, message", [
    ("params.label.k ==== 3", "MLflow rejects the filter 'params.label.k ==== 3': "),
    ("tags.K = '999'", "no finished evaluate run in MLflow experiment 'filter-test' matches the filter \"tags.K = '999'\""),
])
def test_compare_filter_mistakes_are_one_line(two_settings, tmp_path, capsys, filter_string, message):
    (cfg, _), _ = two_settings
    code = main(["compare", "--filter", filter_string, "--experiment", "filter-test",
                 f"tracking.uri={cfg.tracking.uri}", f"run_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"dd-dist compare: error: {message}") and "\n" not in err
    assert not (tmp_path / "compare").exists()


def test_compare_with_an_unreachable_server_names_it_quickly(tmp_path, capsys):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    began = time.monotonic()
    code = main(["compare", f"tracking.uri=http://127.0.0.1:{port}", f"run_dir={tmp_path}"])
    seconds = time.monotonic() - began
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"dd-dist compare: error: cannot query MLflow at http://127.0.0.1:{port}")
    assert "\n" not in err and seconds < 10  # one line, not MLflow's minutes of retries
    assert not (tmp_path / "compare").exists()


@pytest.mark.parametrize("standard, mc, distilled, share", [
    (0.030, 0.020, 0.025, 0.5),  # half of the standard -> MC gap recovered
    (0.030, 0.020, 0.035, -0.5),  # the student is worse than standard dropout: a negative share
    (0.0417, 0.0423, 0.0427, None),  # MC is worse than standard: nothing to recover (not "154 %")
    (0.0300, 0.02995, 0.0200, None),  # MC better by less than half a test image: no gap
])
def test_gap_recovered_needs_mc_to_beat_standard(standard, mc, distilled, share):
    from dd_dist.stages.compare import Evaluation

    methods = {"standard": {"error": standard}, "mc-50": {"error": mc}, "distilled": {"error": distilled}}
    recovered = Evaluation("run", "mnist", "lenet", "0.5", "100", 10000, methods).gap_recovered()
    assert recovered == share if share is None else recovered == pytest.approx(share)
