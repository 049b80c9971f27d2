"""Every path and file name of a run, and the splits a run reads: the one owner of run_dir's layout.

    run_dir/teacher/model.pt, history.json     the teacher (role "teacher")
    run_dir/labels/                            the label directory (its inside: dd_dist.labels.format)
    run_dir/student/model.pt, history.json     the distilled student (role "student")
    run_dir/eval/results.json                  what evaluate measured
    run_dir/compare/                           compare.md and the plots
    <checkpoints>/<run>-<role>-<time>/epoch-N  Ray Train's DeepSpeed checkpoints: cluster.storage_path,
                                               else run_dir/ray_results
"""
from __future__ import annotations

from pathlib import Path

from dd_dist.config import Config
from dd_dist.files import check_writable

MODEL = "model.pt"  # in run_dir/<role>/ and in the final Ray Train checkpoint
HISTORY = "history.json"  # per-epoch metrics, in run_dir/<role>/ and in every Ray Train checkpoint
ROLES = ("teacher", "student")  # the models a run trains, each in its own folder


class RunDir:
    """The files of the run that `cfg` configures (run_dir, data, storage_path)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.root = Path(cfg.run_dir)

    def model(self, role: str) -> Path:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        return self.root / role / MODEL

    def history(self, role: str) -> Path:
        return self.model(role).parent / HISTORY

    @property
    def teacher(self) -> Path:
        return self.model("teacher")

    @property
    def student(self) -> Path:
        return self.model("student")

    @property
    def labels(self) -> Path:
        return self.root / "labels"

    @property
    def results(self) -> Path:
        return self.root / "eval" / "results.json"

    @property
    def compare(self) -> Path:
        return self.root / "compare"

    @property
    def checkpoints(self) -> str:
        """Where Ray Train keeps this run's checkpoints: a local path, an NFS mount or a URI (s3://, gs://)."""
        return self.cfg.cluster.storage_path or str(self.root / "ray_results")

    def split(self, which: str) -> dict:
        """The arguments of dd_dist.data.splits.load_split for this run's `which` split (train, val, test)."""
        data = self.cfg.data
        rows = {"train": data.train_rows, "test": data.test_rows}.get(which, 0)
        return {"name": data.name, "split": which, "path": data.path, "rows": rows, "seed": self.cfg.seed,
                "cache_dir": data.cache_dir, "transform": data.transform(), "channels": data.channels,
                "skip_bad": data.skip_bad}

    def check_writable(self, folder: Path) -> None:
        """Refuse an unwritable output folder of the run (one of the paths above) or storage_path in one
        line before a stage starts anything (an MLflow run, Ray, hours of work that could not be saved)."""
        check_writable(folder, "run_dir")
        if self.cfg.cluster.storage_path:
            check_writable(self.cfg.cluster.storage_path, "cluster.storage_path")
