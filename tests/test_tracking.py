"""Tracking: run status and nesting on a SQLite store; then, through a real `mlflow server`, a
pipeline-shaped run found by compare and the REST API, no secrets in the store, and a stage that
outlives its server."""
import json
import threading
import urllib.request

import mlflow
import pytest

import mlflow_server

from dd_dist.config import load_config
from dd_dist.core.loop import train_student, train_teacher
from dd_dist.infra.tracking import Tracker, tracking_uri
from dd_dist.layout import RunDir
from dd_dist.stages.compare import compare
from dd_dist.stages.evaluate import evaluate

SECRET = "fake-secret-9f3c1d2e7b"  # set as AWS_SECRET_ACCESS_KEY: must never reach the store
RAY_PASSWORD = "hunter2-pw"  # inside cluster.address: must be masked in params and config.yaml


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on a free loopback port with its own SQLite store and artifact folder."""
    info = mlflow_server.start(tmp_path_factory.mktemp("mlflow-server"))
    try:
        mlflow_server.wait_until_serving(info)
        yield info
    finally:
        info["stop"]()


def rest(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def config(server, run_dir, experiment):
    return load_config(None, [
        "data.name=synthetic", "model.arch=mlp", f"run_dir={run_dir}", f"tracking.uri={server['url']}",
        f"tracking.experiment={experiment}", f"cluster.address=ray://bob:{RAY_PASSWORD}@head:10001",
        "teacher.epochs=2", "teacher.lr=0.01", "teacher.lr_steps=[1]", "distill.epochs=2", "distill.lr_steps=[1]",
        "label.k=5", "eval.ks=[1,5]", "eval.repeats=2", "eval.batch_size=128"])


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_pipeline_run_is_compared_and_served(server, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    cfg = config(server, tmp_path / "run", "pipeline-test")
    tracker = Tracker(cfg)
    with tracker.pipeline_run() as parent_id:
        with tracker.stage_run("teacher"):
            train_teacher(cfg)
            tracker.log_model_file(RunDir(cfg).teacher)
        with tracker.stage_run("label", parent_run_id=parent_id):
            tracker.log_metrics({"rows": 512, "rows_per_s": 900.0})

        def distill_on_a_worker():  # a rank-0 worker has no active run: it links by id
            with tracker.stage_run("distill", parent_run_id=parent_id):
                train_student(cfg)
                for epoch, loss in enumerate([0.5, 0.3]):
                    tracker.log_metrics({"loss": loss}, step=epoch)
                tracker.log_model_file(RunDir(cfg).student)

        worker = threading.Thread(target=distill_on_a_worker)
        worker.start()
        worker.join()
        results = evaluate(cfg)
    assert parent_id and mlflow.active_run() is None

    report = compare(cfg, out_dir=tmp_path / "compare")
    m = results["methods"]
    standard, mc5, distilled = m["standard"]["error"], m["mc-5"]["error_mean"], m["distilled"]["error"]
    gap = standard - mc5
    # no gap to recover when MC does not beat standard dropout by half a test image
    share = "n/a" if gap < 0.5 / 256 else f"{100 * (standard - distilled) / gap:.0f} %"
    assert (f"| synthetic | mlp | 0.5 | 5 | 256 | {100 * standard:.2f} | {100 * mc5:.2f} (5) | {100 * distilled:.2f} "
            f"| {share} |" in report)
    assert f"pipeline run `{parent_id}` with stages: teacher, label, distill, evaluate" in report
    assert (f"| MC K=5 | 5 | {100 * mc5:.2f} | {100 * m['mc-5']['error_std']:.2f} | {m['mc-5']['nll_mean']:.4f} | "
            f"{m['mc-5']['ece_mean']:.4f} |") in report
    assert f"| distilled | 1 | {100 * distilled:.2f} |  | {m['distilled']['nll']:.4f} |" in report
    out = tmp_path / "compare"
    assert (out / "compare.md").read_text() == report + "\n"
    assert sorted(p.name for p in out.glob("*.png")) == [
        "synthetic_mlp_error_vs_k.png", "synthetic_mlp_error_vs_latency.png", "synthetic_mlp_reliability.png"]

    # The REST API lists the whole family: the parent, its four stages, and the compare run.
    experiment = rest(server["url"], "/api/2.0/mlflow/experiments/get-by-name?experiment_name=pipeline-test")
    # tagged as training runs, so that the UI opens on the runs table, not on GenAI traces
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["experiment"]["tags"]
    runs = rest(server["url"], "/api/2.0/mlflow/runs/search",
                {"experiment_ids": [experiment["experiment"]["experiment_id"]], "max_results": 100})["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs}
    by_stage = {t["stage"]: run_id for run_id, t in tags.items() if t["stage"] != "method"}
    assert sorted(by_stage) == ["compare", "distill", "evaluate", "label", "pipeline", "teacher"]
    assert by_stage["pipeline"] == parent_id
    for stage in ("teacher", "label", "distill", "evaluate"):
        assert tags[by_stage[stage]]["mlflow.parentRunId"] == parent_id
    # The methods are runs of their own under the evaluate run, and name the pipeline run.
    methods = {t["method"]: run_id for run_id, t in tags.items() if t["stage"] == "method"}
    assert sorted(methods) == ["distilled", "mc-1", "mc-5", "standard"]
    for method, run_id in methods.items():
        assert tags[run_id]["mlflow.parentRunId"] == by_stage["evaluate"] and tags[run_id]["pipeline_run"] == parent_id
    def metrics_of(run_id):
        run = rest(server["url"], f"/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
        return {x["key"]: x["value"] for x in run["data"]["metrics"]}
    assert metrics_of(methods["standard"])["error"] == pytest.approx(standard)
    assert metrics_of(methods["mc-5"])["error"] == pytest.approx(mc5)
    evaluate_run = rest(server["url"], f"/api/2.0/mlflow/runs/get?run_id={by_stage['evaluate']}")["run"]
    params = {x["key"]: x["value"] for x in evaluate_run["data"]["params"]}
    assert params["cluster.address"] == "ray://bob:***@head:10001"
    distill_run = rest(server["url"], f"/api/2.0/mlflow/runs/get?run_id={by_stage['distill']}")["run"]
    assert {x["key"]: x["value"] for x in distill_run["data"]["metrics"]}["loss"] == pytest.approx(0.3)
    files = rest(server["url"], f"/api/2.0/mlflow/artifacts/list?run_id={by_stage['distill']}&path=model")
    assert [f["path"] for f in files["files"]] == ["model/model.pt"]

    # No secret anywhere: not in what the API serves, the database, or any artifact.
    served = json.dumps(runs)
    stored = [server["root"] / "store.db", *(p for p in (server["root"] / "artifacts").rglob("*") if p.is_file())]
    assert len(stored) > 8 and b"ray://bob:***@head" in stored[0].read_bytes()  # the search does see params
    for secret in (SECRET, RAY_PASSWORD):
        assert secret not in served
        for path in stored:
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_stage_outlives_its_server(server, tmp_path, capsys):
    cfg = config(server, tmp_path / "run", "dead-server-test")
    tracker = Tracker(cfg)
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    finished = False
    with tracker.stage_run("distill") as run_id:
        tracker.log_metrics({"loss": 1.0}, step=0)
        server["stop"]()
        for step in range(1, 4):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        tracker.log_model_file(weights)
        finished = True
    assert finished and run_id and mlflow.active_run() is None
    err = capsys.readouterr().err
    assert err.count("dd-dist: warning: MLflow") == 1, err
    assert "3 buffered metric values were not logged" in err
    # What was logged before the server stopped is in its store.
    store = mlflow.MlflowClient(tracking_uri=f"sqlite:///{server['root']}/store.db")
    assert [(p.step, p.value) for p in store.get_metric_history(run_id, "loss")] == [(0, 1.0)]


def test_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    default = load_config().tracking
    assert tracking_uri(default) == f"sqlite:///{tmp_path}/mlruns.db"  # pinned to this directory
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking_uri(default) == "http://tracking.example:5000"
    assert tracking_uri(load_config(None, ["tracking.uri=sqlite:////data/x.db"]).tracking) == "sqlite:////data/x.db"


def test_failed_stage_is_marked_failed_and_nested(tmp_path):
    cfg = load_config(None, [f"tracking.uri=sqlite:///{tmp_path}/m.db", "tracking.experiment=status-test",
                             "cluster.address=ray://bob:pw1234@head:10001"])
    tracker = Tracker(cfg)
    with pytest.raises(ZeroDivisionError):
        with tracker.pipeline_run() as parent_id:
            with tracker.stage_run("teacher", note="first try") as child_id:
                tracker.log_metrics({"loss": 0.5}, step=3)
                1 / 0
    assert mlflow.active_run() is None
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    parent, child = client.get_run(parent_id), client.get_run(child_id)
    assert parent.info.status == child.info.status == "FAILED"
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.data.tags["stage"] == "teacher" and child.data.tags["note"] == "first try"
    assert child.data.params["cluster.address"] == "ray://bob:***@head:10001"
    assert [(m.step, m.value) for m in client.get_metric_history(child_id, "loss")] == [(3, 0.5)]
