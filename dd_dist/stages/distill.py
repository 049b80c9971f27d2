"""`dd-dist distill`: the deterministic student on the teacher's soft labels, offline (the stored MC
labels) or online (one teacher mask per step), DeepSpeed on Ray Train (core.tasks.StudentTask)."""
from __future__ import annotations

from pathlib import Path

from dd_dist.config import Config
from dd_dist.core.tasks import StudentTask
from dd_dist.stages.fit import run_task


def run(cfg: Config, parent: str | None = None) -> Path:
    """Train the student; returns run_dir/student/model.pt."""
    return run_task(cfg, StudentTask, parent, mode=cfg.distill.mode)
