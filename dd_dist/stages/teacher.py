"""`dd-dist teacher`: the dropout teacher on hard labels, DeepSpeed on Ray Train (core.tasks.TeacherTask)."""
from __future__ import annotations

from pathlib import Path

from dd_dist.config import Config
from dd_dist.core.tasks import TeacherTask
from dd_dist.stages.fit import run_task


def run(cfg: Config, parent: str | None = None) -> Path:
    """Train the teacher; returns run_dir/teacher/model.pt."""
    return run_task(cfg, TeacherTask, parent)
