"""MLflow for every stage: where runs go, one run per stage, and logging that never stops training.

A Tracker carries the state of one stage's connection to the store. Only rank 0 logs. If the store
cannot be reached, the first failure prints one warning on stderr and the stage goes on: metrics
logged meanwhile are buffered and sent when the server answers again (tried at most every
tracking.retry_s seconds, and once more when the stage's run ends). Training workers get the driver's
URI and the run id (Tracker.for_workers) and build their own Tracker from it. Params come only from
the config tree (never from the environment), with any password inside a URI masked.
"""
from __future__ import annotations

import os
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from dd_dist.config import Config, TrackingConfig

DEFAULT_URI = TrackingConfig.model_fields["uri"].default
_URI_PASSWORD = re.compile(r"(\w[\w+.-]*://[^/:@\s]+):[^/@\s]+@")
# Tells MLflow's UI that the experiment holds training runs, so that it opens on the runs table: MLflow 3.0-3.x
# read this experiment tag. MLflow 3.17's UI ignores it and takes the view from the page's `workflowType`
# query parameter, else the GenAI / Model training toggle saved in the browser (default GenAI): the links
# dd-dist prints carry RUNS_VIEW.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
RUNS_VIEW = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # `make mlflow-ui` over a file or SQLite store


def tracking_uri(cfg: TrackingConfig) -> str:
    """A config value other than the default wins, then MLFLOW_TRACKING_URI, then the default."""
    uri = cfg.uri if cfg.uri != DEFAULT_URI else os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    # Pin a relative SQLite path to this working directory, so Ray workers started elsewhere share it.
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def is_rank_zero() -> bool:
    """True outside Ray Train, and on the world-rank-0 worker inside it."""
    if "ray" not in sys.modules:  # no Ray in this process: a single-process stage
        return True
    import ray.train  # already imported (see above): no cost

    try:
        return ray.train.get_context().get_world_rank() == 0
    except RuntimeError:  # the driver or a plain Ray task, not a training worker
        return True


def redact(value: Any) -> Any:
    """Mask the password of `scheme://user:password@host` inside strings."""
    return _URI_PASSWORD.sub(r"\1:***@", value) if isinstance(value, str) else value


def redact_tree(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: redact_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact_tree(v) for v in tree]
    return redact(tree)


def run_tags(cfg: Config, stage: str, extra: dict) -> dict[str, str]:
    tags = {"stage": stage, "dataset": cfg.data.name, "arch": cfg.model.arch, "dropout_p": cfg.model.p,
            "K": cfg.label.k, "method": f"dropout-distillation-{cfg.distill.mode}", "run_dir": cfg.run_dir}
    return {k: str(redact(v)) for k, v in {**tags, **extra}.items()}


class Tracker:
    """The MLflow store of `cfg` (its URI as `uri`, default: resolved here), and what this process
    knows of the server: unreachable since when, the metrics waiting for it."""

    def __init__(self, cfg: Config, uri: str | None = None):
        self.cfg = cfg
        self.uri = uri or tracking_uri(cfg.tracking)
        self.offline = self.warned = False
        self.failed_at = 0.0  # time.monotonic() of the last failed call
        self.pending: list[tuple[str, list[Metric]]] = []  # (run id, metrics) waiting for the server

    def for_workers(self, run_id: str | None) -> dict:
        """What a Ray Train worker needs to log to `run_id`: plain data (see from_workers)."""
        return {"uri": self.uri, "run_id": run_id}

    @classmethod
    def from_workers(cls, cfg: Config, info: dict) -> tuple[Tracker, str | None]:
        """A worker's Tracker of the driver's store, and the run it logs to."""
        return cls(cfg, info["uri"]), info["run_id"]

    def use_store(self) -> str:
        """Point MLflow at the store with short network timeouts; no experiment is created. Returns the URI."""
        t = self.cfg.tracking
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
        # Defaults (7 retries, 120 s timeout) block each call for minutes when the server is gone.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(t.http_retries)
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(t.http_timeout_s)
        os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
        mlflow.set_tracking_uri(self.uri)
        self.offline = self.warned = False  # each stage gives the server a fresh chance
        return self.uri

    def experiment_id(self) -> str | None:
        """use_store() plus the experiment by name (created if missing); its id, or None if unreachable."""
        uri, name = self.use_store(), self.cfg.tracking.experiment
        ok, experiment = self._attempt(f"opening experiment {name!r} at {redact(uri)}", mlflow.set_experiment, name)
        if not ok:
            return None
        if experiment.tags.get(EXPERIMENT_KIND[0]) is None:  # MLflow 3's UI opens untagged experiments on GenAI traces
            self._attempt("tagging the experiment", mlflow.set_experiment_tag, *EXPERIMENT_KIND)
        return experiment.experiment_id

    def runs_page(self) -> str | None:
        """The experiment's runs table in the MLflow UI, training view; None if the store is unreachable."""
        experiment_id = self.experiment_id()
        base = self.uri if self.uri.startswith(("http://", "https://")) else LOCAL_UI
        return experiment_id and f"{redact(base).rstrip('/')}/#/experiments/{experiment_id}?{RUNS_VIEW}"

    @contextmanager
    def stage_run(self, stage: str, parent_run_id: str | None = None, run_name: str | None = None,
                  params: dict | None = None, **tags) -> Iterator[str | None]:
        """One MLflow run for a stage (named `run_name`, default the stage), yielding its id (None off
        rank 0 or without a server).

        Nested under `parent_run_id`, or else under the run active in this thread. Logs `params`, by
        default the flattened config as params and as config.yaml; ends FAILED (KILLED on Ctrl-C) if
        the body raises.
        """
        if not is_rank_zero():
            yield None
            return
        experiment_id = self.experiment_id()
        run_id = None
        if experiment_id is not None:
            ok, run = self._attempt(f"starting the {stage} run", mlflow.start_run, experiment_id=experiment_id,
                                    run_name=run_name or stage, nested=mlflow.active_run() is not None,
                                    parent_run_id=parent_run_id, tags=run_tags(self.cfg, stage, tags),
                                    log_system_metrics=False)
            run_id = run.info.run_id if ok else None
        if run_id:
            config = params is None
            params = self.cfg.flat() if config else params
            self._attempt("logging params", mlflow.log_params, {k: redact(v) for k, v in params.items()})
            if config:
                self._attempt("logging config.yaml", mlflow.log_dict, redact_tree(self.cfg.model_dump()), "config.yaml")
        status = "FINISHED"
        try:
            yield run_id
        except BaseException as error:
            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            raise
        finally:
            if run_id:
                with _brief_requests() if self.offline else nullcontext():
                    self._flush_pending()
                    # end_run pops the run before it calls the server, so a failure here leaves no stale run.
                    self._attempt(f"ending the {stage} run", mlflow.end_run, status)

    def pipeline_run(self, **tags):
        """The parent run of `dd-dist pipeline`: stage runs started inside it become its children."""
        return self.stage_run("pipeline", **tags)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, run_id: str | None = None) -> None:
        """Log to `run_id` or the active run; never raises. A no-op off rank 0 or without a run."""
        run_id = run_id or active_run_id()
        if not run_id or not is_rank_zero():
            return
        now = int(time.time() * 1000)
        # Queued first and sent oldest first: a server that comes back gets every value, in order. A resent
        # batch keeps its timestamps, so one the server did store before a timeout is not stored twice.
        self.pending.append((run_id, [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]))
        if not self.offline or self._retry_due():
            self._send_pending()

    def log_artifact(self, path, artifact_path: str | None = None, run_id: str | None = None) -> None:
        """Upload a file; skipped (after the one warning) while the server is unreachable, unless
        tracking.retry_s has passed since it last failed."""
        run_id = run_id or active_run_id()
        if run_id and self._may_upload():
            self._attempt(f"uploading {path}", MlflowClient().log_artifact, run_id, str(path), artifact_path)

    def log_table(self, table: dict[str, list], artifact_file: str, run_id: str | None) -> None:
        """An MLflow table (a JSON artifact the UI shows as a table, readable with mlflow.load_table)."""
        if run_id and self._may_upload():
            self._attempt(f"logging the table {artifact_file}", mlflow.log_table, table, artifact_file, run_id=run_id)

    def log_model_file(self, path, run_id: str | None = None) -> None:
        """The final checkpoint as a plain artifact under model/ (no slow mlflow.pytorch packaging)."""
        self.log_artifact(path, "model", run_id)

    def _may_upload(self) -> bool:
        """Rank 0, and a server not known to be down (or due for another try)."""
        if (self.offline and not self._retry_due()) or not is_rank_zero():
            return False
        self.offline = False
        return True

    def _retry_due(self) -> bool:
        return time.monotonic() - self.failed_at >= self.cfg.tracking.retry_s

    def _send_pending(self) -> bool:
        """Send the buffered metrics, oldest first, until a call fails; True when all went through.
        A server already found unreachable gets one short try."""
        retrying, sent = self.offline, 0
        with _brief_requests() if retrying else nullcontext():
            self.offline = False
            while self.pending:
                run_id, batch = self.pending[0]
                ok, _ = self._attempt("logging metrics", MlflowClient().log_batch, run_id, metrics=batch)
                if not ok:
                    return False
                self.pending.pop(0)
                sent += len(batch)
        if retrying:
            print(f"dd-dist: MLflow is reachable again: {sent} buffered metric values logged", file=sys.stderr,
                  flush=True)
        return True

    def _flush_pending(self) -> None:
        """A last try at the buffered metrics; dropped with a count if the server is still away."""
        if self.pending and not self._send_pending():
            print(f"dd-dist: warning: {sum(len(b) for _, b in self.pending)} buffered metric values were not logged",
                  file=sys.stderr, flush=True)
            self.pending.clear()

    def _attempt(self, what: str, call: Callable, *args, **kwargs) -> tuple[bool, Any]:
        """(True, result), or (False, None) after warning once that tracking is off for this stage."""
        try:
            return True, call(*args, **kwargs)
        except Exception as error:
            self.offline, self.failed_at = True, time.monotonic()
            if not self.warned:
                self.warned = True
                reason = redact(str(error).strip().splitlines()[0][:200]) if str(error).strip() else ""
                print(f"dd-dist: warning: MLflow {what} failed ({type(error).__name__}: {reason}); "
                      f"the stage goes on without tracking", file=sys.stderr, flush=True)
            return False, None


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


@contextmanager
def _brief_requests():
    """One try with a 1 s timeout: how a stage wraps up with a server it already found unreachable."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "1"})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
