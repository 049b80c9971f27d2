"""`dd-dist pipeline`: every stage in one Ray session, each an MLflow run under one pipeline run:
teacher -> label -> distill -> evaluate, then the comparison."""
from __future__ import annotations

import time

from dd_dist.config import Config
from dd_dist.infra.cluster import check_shared_storage, ray_session
from dd_dist.infra.tracking import Tracker
from dd_dist.stages import compare, distill, evaluate, label, teacher

STAGES = {"teacher": teacher.run, "label": label.run, "distill": distill.run, "evaluate": evaluate.run}


def run_pipeline(cfg: Config, reuse: tuple[str, ...] = ()) -> dict:
    """Every stage, then the comparison printed; returns the seconds each stage took.
    Stages named in `reuse` are not run: their outputs are already in run_dir (a smaller student
    distilled from the teacher and labels of another run, for instance)."""
    began, seconds, tracker = time.perf_counter(), {}, Tracker(cfg)
    with ray_session(cfg.cluster), tracker.pipeline_run() as parent:
        check_shared_storage(cfg)  # a multi-node cluster needs storage every node sees
        for name, run in STAGES.items():
            if name in reuse or (name == "label" and cfg.distill.mode == "online"):
                continue  # reused, or Algorithm 2 that needs no stored labels
            started = time.perf_counter()
            run(cfg, parent)
            seconds[f"{name}_seconds"] = time.perf_counter() - started
        tracker.log_metrics({**seconds, "total_seconds": time.perf_counter() - began}, run_id=parent)
    print("\n" + compare.compare(cfg))
    print(f"pipeline finished in {time.perf_counter() - began:.0f} s: " +
          ", ".join(f"{k.removesuffix('_seconds')} {v:.0f} s" for k, v in seconds.items()))
    page = tracker.runs_page()
    if page:
        print(f"its runs in the MLflow UI: {page}")
    return seconds
