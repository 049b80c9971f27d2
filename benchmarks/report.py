"""What every benchmark report shares: where it ran, and writing its JSON + Markdown atomically."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from dd_dist.files import atomic_write, write_json

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """The machine and its load at the start: timings are only comparable under similar load."""
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                       f"Python {platform.python_version()}",
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def write_report(name: str, report: dict, markdown: str) -> Path:
    """benchmarks/results/<name>.json and .md; returns the Markdown file's path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{name}.json", report)
    path = RESULTS / f"{name}.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text(markdown))
    return path
