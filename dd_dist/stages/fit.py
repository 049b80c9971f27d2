"""A training task run as a stage (teacher, distill): its MLflow run, DeepSpeed on Ray Train, the model logged."""
from __future__ import annotations

from pathlib import Path

from dd_dist.config import Config
from dd_dist.core.tasks import Task
from dd_dist.infra.tracking import Tracker
from dd_dist.layout import RunDir
from dd_dist.train.driver import train


def run_task(cfg: Config, task: Task, parent: str | None = None, **tags) -> Path:
    """Train `task` under an MLflow run of its stage (a child of `parent`); returns run_dir/<role>/model.pt."""
    run = RunDir(cfg)
    run.check_writable(run.model(task.role).parent)
    tracker = Tracker(cfg)
    with tracker.stage_run(task.stage, parent, **tags) as run_id:
        path, _ = train(cfg, task, run_id)
        tracker.log_model_file(path, run_id)
    return path
